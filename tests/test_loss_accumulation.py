"""Exact gradient accumulation for every registered loss and for trl's combinations and weightings.

Eight pairs of unequal lengths on a tiny GPT-2 whose policy has moved away from its reference: one micro-batch
of 8 (one optimizer step's global batch) against 4 micro-batches of 2 accumulated. The loss sums and every
parameter gradient must agree. Losses that are not sums of per-pair terms — trl's ``sft`` (a token mean over the
batch), ``aot``/``aot_unpaired`` (they sort the batch), and ``sft`` under WPO (scaled by the mean weight) — get the
global batch's numbers from :func:`dpolab.train.objective.global_contexts`; the last test shows that without them
accumulation would not be exact.
"""

import math

import pytest
import torch
from tiny_runs import FAST, PROMPTS, make_examples

from dpolab.data.batch import collate_pairs
from dpolab.data.prepare import prepare_pairs, tokenize_config
from dpolab.data.records import PreferenceExample
from dpolab.losses import LOSSES
from dpolab.models.tiny import tiny_causal_lm
from dpolab.train.config import TrainConfig
from dpolab.train.objective import Objective, batch_objective
from dpolab.train.reference import make_reference
from dpolab.train.step import accumulate_gradients
from dpolab.train.trainer import train

PARAMS = {"exo_pair": {"label_smoothing": 1e-3}, "robust": {"label_smoothing": 0.1},
          "aot": {"label_smoothing": 0.1}, "simpo": {"gamma": 0.3}, "discopop": {"discopop_tau": 0.5}}


pytestmark = pytest.mark.usefixtures("one_thread")


def examples(n: int = 8, offset: int = 0) -> list[PreferenceExample]:
    """``n`` synthetic pairs over the first four prompts (the rows these cases were written with)."""
    return make_examples(n, offset, prompts=PROMPTS[:4])


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model, tok = tiny_causal_lm("gpt2", seed=0)
    model.eval()
    pairs = prepare_pairs(examples(), tok, tokenize_config(TrainConfig())).pairs
    assert len({len(p.chosen_ids) for p in pairs}) > 1
    reference = make_reference("copy", model)
    with torch.no_grad():  # π ≠ π_ref, so no loss sits at its trivial point
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model, tok, pairs, reference


def split(pairs, tok, size):
    return [collate_pairs(pairs[i : i + size], tok.pad_token_id, index=list(range(i, i + size)))
            for i in range(0, len(pairs), size)]


def grads(model, reference, batches, config, *, exact=True):
    model.zero_grad(set_to_none=True)
    n = sum(b.num_pairs for b in batches)
    if exact:
        totals, bad = accumulate_gradients(model, reference, batches, objective=Objective.from_config(config),
                                           scale=1.0 / n)
        assert bad is None
    else:  # each micro-batch taken as if it were the whole batch
        totals = 0
        for batch in batches:
            losses, sums = batch_objective(model, reference, batch, Objective.from_config(config))
            (losses.sum() / n).backward()
            totals = totals + sums
    return totals, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_exact(setup, fields):
    model, tok, pairs, reference = setup
    config = TrainConfig.load(None, {**FAST, "beta": 0.5, **fields})
    one_totals, one = grads(model, reference, split(pairs, tok, 8), config)
    four_totals, four = grads(model, reference, split(pairs, tok, 2), config)
    torch.testing.assert_close(four_totals, one_totals, rtol=1e-5, atol=1e-5)
    assert one.keys() == four.keys() and one
    scale = max(g.abs().max() for g in one.values())
    assert scale > 1e-6
    for name in one:
        torch.testing.assert_close(four[name], one[name], rtol=1e-4, atol=1e-6 * float(scale), msg=name)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_registered_loss_accumulates_exactly(setup, loss):
    reference_free = loss in ("simpo", "reference_free", "unlikelihood")
    assert_exact(setup, {"loss": loss, "loss_params": PARAMS.get(loss, {}),
                         **({"reference": "none"} if reference_free else {})})


@pytest.mark.parametrize("fields", [
    {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},  # MPO
    {"loss_type": ["sigmoid", "sft"], "use_weighting": True},
    {"loss_type": ["ipo", "sft"], "loss_weights": [1.0, 0.5], "use_weighting": True, "ld_alpha": 0.3},
    {"loss_type": ["aot", "sft"], "loss_params": {"label_smoothing": 0.05}},
    {"loss_type": ["aot_unpaired", "nca_pair"], "ld_alpha": 0.5},
    {"loss": "sigmoid", "ld_alpha": 0.0},
    {"loss": "apo_zero", "use_weighting": True},
    {"loss": "sigmoid_norm", "f_divergence_type": "js_divergence"},
    {"loss_type": ["robust", "sft"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3,
     "loss_params": {"label_smoothing": 0.1}},
    {"loss": "hinge", "f_divergence_type": "forward_kl", "sft_weight": 0.2},
], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_combinations_and_weightings_accumulate_exactly(setup, fields):
    assert_exact(setup, fields)


@pytest.mark.parametrize("loss", ["sft", "aot"])
def test_without_the_global_context_accumulation_would_not_be_exact(setup, loss):
    """The control: the same split, each micro-batch normalised/sorted on its own (as trl does per micro-batch)."""
    model, tok, pairs, reference = setup
    config = TrainConfig.load(None, {**FAST, "beta": 0.5, "loss_type": [loss]})
    _, one = grads(model, reference, split(pairs, tok, 8), config)
    _, four = grads(model, reference, split(pairs, tok, 2), config, exact=False)
    assert max(float((four[k] - one[k]).abs().max() / one[k].abs().max().clamp(min=1e-12)) for k in one) > 1e-3


def test_default_objective_is_unchanged(setup):
    """The default (sigmoid, no trl options) goes through the same fast path and numbers as before: the loss of
    a batch equals dpo_loss on concatenated_forward's sums."""
    from dpolab.logprobs import concatenated_forward
    from dpolab.losses import dpo_loss

    model, tok, pairs, reference = setup
    batch = split(pairs, tok, 8)[0]
    losses, _ = batch_objective(model, reference, batch, Objective(beta=0.1))
    with torch.no_grad():
        policy = concatenated_forward(model, batch)
        ref = reference.pair_logps(batch)
    expected, _, _ = dpo_loss(policy.chosen, policy.rejected, ref.chosen, ref.rejected, 0.1)
    assert torch.equal(losses.detach(), expected)


def test_tr_dpo_mix_in_hand_value():
    """θ_ref ← α θ + (1 − α) θ_ref with α = 0.25: 0.25 · 4 + 0.75 · 0 = 1."""
    from dpolab.train.reference import FrozenReference

    policy, ref_model = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        for p in policy.parameters():
            p.fill_(4.0)
        for p in ref_model.parameters():
            p.zero_()
    FrozenReference(ref_model).mix_in(policy, 0.25)
    assert all(torch.equal(p, torch.ones_like(p)) for p in ref_model.parameters())


def test_tr_dpo_synchronises_the_reference_every_tau_steps(tmp_path):
    """α = 1, τ = 2: after steps 2 and 4 the reference becomes the policy, so steps 3 and 5 start at π_θ = π_ref
    (loss log 2, all margins 0), while steps 2 and 4 do not; without sync only step 1 does."""
    common = {**FAST, "max_steps": 5, "micro_batch_size": 4, "beta": 0.5}
    synced = train({**common, "sync_ref_model": True, "ref_model_mixup_alpha": 1.0, "ref_model_sync_steps": 2,
                    "output_dir": str(tmp_path / "tr")}, train_pairs=examples(8)).history
    plain = train({**common, "output_dir": str(tmp_path / "plain")}, train_pairs=examples(8)).history
    at_ref = [abs(r["loss"] - math.log(2)) < 1e-6 and abs(r["rewards/margins"]) < 1e-6 for r in synced]
    assert at_ref == [True, False, True, False, True]
    assert [abs(r["loss"] - math.log(2)) < 1e-6 for r in plain] == [True, False, False, False, False]


def test_trl_fields_reach_the_trainer(tmp_path):
    """A short MPO run with WPO and LD-DPO trains and logs the usual metrics."""
    result = train({**FAST, "max_steps": 2, "micro_batch_size": 2, "grad_accum_steps": 2,
                    "loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0],
                    "use_weighting": True, "ld_alpha": 0.5, "output_dir": str(tmp_path)},
                   train_pairs=examples(8), eval_pairs=examples(4, offset=50))
    assert len(result.history) == 2 and all(math.isfinite(r["loss"]) for r in result.history)
    assert "eval_loss" in result.eval_history[-1]
