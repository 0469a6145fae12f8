"""Learning-rate schedules (lr_scheduler_type, warmup_steps / warmup_ratio) and num_train_epochs."""

import math

import pytest
import torch
from tiny_runs import FAST, make_examples

from dpolab.train.config import ConfigError, TrainConfig
from dpolab.train.schedule import learning_rate, lr_factor, warmup_steps
from dpolab.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_hand_derived_factors_for_ten_steps_with_two_of_warm_up():
    """T = 10, W = 2. Warm-up (s + 1) / (W + 1): 1/3, 2/3. At s = 6, (s − W) / (T − W) = 1/2 of the decay is done:
    linear (T − s) / (T − W) = 4/8, cosine ½ (1 + cos(π/2)) = ½. At s = 2 every decay is still 1."""
    f = {kind: [lr_factor(s, total_steps=10, warmup=2, kind=kind) for s in range(10)]
         for kind in ("constant", "linear", "cosine")}
    for kind in f:
        assert f[kind][:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert f["constant"][3:] == [1.0] * 7
    assert f["linear"][6] == pytest.approx(0.5) and f["cosine"][6] == pytest.approx(0.5)
    assert f["linear"][9] == pytest.approx(1 / 8)  # the last step still trains; 0 would come at step T
    assert f["cosine"][9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_decays_equal_transformers_schedules_step_for_step(kind):
    """After the warm-up the factors are transformers' get_scheduler ones (its warm-up starts at 0, ours at
    1/(W + 1), so those steps differ by design)."""
    from transformers import get_scheduler

    total, warm = 13, 3
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler(kind, optimizer, num_warmup_steps=warm, num_training_steps=total)
    theirs = []
    for _ in range(total):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    ours = [lr_factor(s, total_steps=total, warmup=warm, kind=kind) for s in range(total)]
    assert ours[warm:] == pytest.approx(theirs[warm:], rel=1e-12)


def test_warmup_ratio_replaces_warmup_steps_and_rounds_up():
    assert warmup_steps(10, warmup_steps=5, warmup_ratio=0.25) == 3  # ceil(2.5)
    assert warmup_steps(10, warmup_steps=5, warmup_ratio=0.0) == 5
    config = TrainConfig.load(None, {"lr": 1e-3, "warmup_ratio": 0.1, "lr_scheduler_type": "linear"})
    assert learning_rate(0, config, 20) == pytest.approx(1e-3 / 3)  # W = ceil(2.0) = 2
    assert learning_rate(2, config, 20) == pytest.approx(1e-3)


@pytest.mark.parametrize("override, message", [
    ({"warmup_ratio": 1.0}, r"'warmup_ratio' must be in \[0, 1\)"),
    ({"warmup_ratio": -0.1}, "'warmup_ratio' must be >= 0"),
    ({"num_train_epochs": -1}, "'num_train_epochs' must be >= 0"),
    ({"lr_scheduler_type": "polynomial"}, "lr_scheduler_type"),
])
def test_bad_schedule_fields_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.load(None, override)


def test_a_run_logs_the_scheduled_learning_rates_and_num_train_epochs_sets_its_length(tmp_path):
    """24 pairs, global batch 4: 6 steps per epoch, so 1.5 epochs = 9 steps (max_steps ignored), the last three in
    epoch 1; linear decay after 2 warm-up steps: step s (0-based) ≥ 2 runs at lr (9 − s) / 7."""
    config = {**FAST, "max_steps": 100, "num_train_epochs": 1.5, "micro_batch_size": 4, "grad_accum_steps": 1,
              "warmup_steps": 2, "lr_scheduler_type": "linear", "output_dir": str(tmp_path)}
    result = train(config, train_pairs=make_examples(24))
    assert result.step == 9 and [r["epoch"] for r in result.history] == [0] * 6 + [1] * 3
    expected = [1e-3 / 3, 2e-3 / 3] + [1e-3 * (9 - s) / 7 for s in range(2, 9)]
    assert [r["learning_rate"] for r in result.history] == pytest.approx(expected, rel=1e-12)


def test_resume_refuses_a_new_length_when_the_schedule_depends_on_it(tmp_path):
    base = {**FAST, "micro_batch_size": 4, "grad_accum_steps": 1, "max_steps": 2}
    train({**base, "lr_scheduler_type": "cosine", "output_dir": str(tmp_path / "cosine")},
          train_pairs=make_examples(8))
    with pytest.raises(ValueError, match=r"max_steps: checkpoint 2, now 4 \(the 'cosine' schedule"):
        train({**base, "lr_scheduler_type": "cosine", "max_steps": 4, "resume_from": "auto",
               "output_dir": str(tmp_path / "cosine")}, train_pairs=make_examples(8))
    # a constant schedule does not depend on the length: the run is extended
    train({**base, "output_dir": str(tmp_path / "constant")}, train_pairs=make_examples(8))
    longer = train({**base, "max_steps": 4, "resume_from": "auto", "output_dir": str(tmp_path / "constant")},
                   train_pairs=make_examples(8))
    assert longer.step == 4
