"""Fault and bad-input cases (issue 20): nothing already written is lost or corrupted, nothing silently wrong,
and every error names the file, the row and the field.

Each case is a class of the issue; each fails on the code before the fix. Tiny GPT-2 runs of 1-3 steps.
Run them alone with ``pytest tests/test_faults.py``.
"""

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from tiny_runs import PROMPTS, make_examples

import dpolab.train.reference_table as reference_module
from dpolab.data import tokenize as tokenize_module
from dpolab.data.prepare import prepare_pairs
from dpolab.data.readers import load_jsonl
from dpolab.data.records import DataError, PreferenceExample, example_from_record
from dpolab.data.tokenize import TokenizationError, TokenizeConfig, tokenize_pair
from dpolab.models import load_policy
from dpolab.models.lora import add_lora
from dpolab.models.tiny import tiny_causal_lm, tiny_tokenizer
from dpolab.train import checkpoint as ckpt
from dpolab.train import metrics
from dpolab.train.config import ConfigError, TrainConfig
from dpolab.train.metrics import MetricsWriter, read_metrics
from dpolab.train.reference_table import precompute_reference, reference_key
from dpolab.train.step import BatchPlan
from dpolab.train.trainer import train

# names introduced with the fixes are looked up inside the tests, so that on the old code each case fails alone

FAST = {"model": "tiny-gpt2", "progress": False, "kl_samples": 0, "lr": 1e-3, "warmup_steps": 1,
        "micro_batch_size": 4, "grad_accum_steps": 1, "max_steps": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def examples(n: int = 8, offset: int = 0) -> list[PreferenceExample]:
    """``n`` synthetic pairs over the first four prompts (the rows these cases were written with)."""
    return make_examples(n, offset, prompts=PROMPTS[:4])


def records(n: int = 8) -> list[dict]:
    return [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for e in examples(n)]


# ---- 1. range checks, loss_params, duplicate YAML keys, TokenizeConfig bounds: refused at load ----------------

BAD_CONFIGS = [
    ({"beta": -0.1}, "'beta' must be > 0"),
    ({"beta": 0}, "'beta' must be > 0"),
    ({"beta": float("nan")}, "'beta' must be a finite number"),
    ({"beta": float("inf")}, "'beta' must be a finite number"),
    ({"lr": 0}, "'lr' must be > 0"),
    ({"lr": float("inf")}, "'lr' must be a finite number"),
    ({"lr": float("nan")}, "'lr' must be a finite number"),
    ({"max_grad_norm": -1.0}, "'max_grad_norm' must be >= 0"),
    ({"max_grad_norm": float("inf")}, "'max_grad_norm' must be a finite number"),
    ({"loss_params": {"label_smothing": 0.1}}, "no parameter 'label_smothing' \\(did you mean 'label_smoothing'\\?\\)"),
    ({"loss_params": {"label_smoothing": 0.7}}, "label_smoothing must be in \\[0, 0.5\\)"),
    ({"loss_params": {"beta": 0.3}}, "'beta' is set by the trainer"),
    ({"loss": "simpo", "loss_params": {"label_smoothing": 0.1}}, "loss 'simpo' has no parameter 'label_smoothing'"),
    ({"max_prompt_length": 0}, "'max_prompt_length' must be > 0"),
]


@pytest.mark.parametrize("overrides, message", BAD_CONFIGS, ids=[json.dumps(o, default=str) for o, _ in BAD_CONFIGS])
def test_bad_config_values_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.load(None, overrides)


def test_bad_loss_params_fail_before_the_model_is_loaded(tmp_path, monkeypatch):
    import dpolab.train.trainer

    monkeypatch.setattr(dpolab.train.trainer, "load_policy", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ConfigError, match="label_smothing"):
        train({**FAST, "output_dir": str(tmp_path), "loss_params": {"label_smothing": 0.1}}, train_pairs=records())


def test_duplicate_yaml_key_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("beta: 0.1\nlr: 1e-3\nbeta: 0.5\n")
    with pytest.raises(ConfigError, match=r"run.yaml.*duplicate key 'beta' \(line 3; first given on line 1\)"):
        TrainConfig.load(path)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_prompt_length": 0}, "max_prompt_length must be >= 1"),
    ({"max_length": 16, "max_prompt_length": 16}, "must be smaller than max_length"),
    ({"max_length": 16, "max_prompt_length": 40}, "must be smaller than max_length"),
    ({"max_prompt_length": 2.5}, "must be an int"),
], ids=["zero", "equal", "larger", "float"])
def test_tokenize_config_bounds(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenizeConfig(**kwargs)


# ---- 2. data: the real fault named (file, row, field), nothing silently dropped or guessed -----------------------

USER = {"role": "user", "content": "Hi"}
BOT = {"role": "assistant", "content": "Hello!"}
BOT2 = {"role": "assistant", "content": "Go away."}
BAD_RECORDS = [
    ({"promt": "x", "chosen": " a", "rejected": " b"}, "promt", "did you mean 'prompt'"),
    ({"prompt": "x", "chosen": " a", "rejectd": " b"}, "rejectd", "did you mean 'rejected'"),
    ({"chosen": [USER, {"role": "assitant", "content": "a"}], "rejected": [USER, BOT2]}, "chosen[1].role",
     "unknown role 'assitant' \\(did you mean 'assistant'\\?\\)"),
    ({"chosen": [USER, BOT], "rejected": [USER]}, "rejected", "no assistant turn"),
    ({"chosen": [USER, BOT], "rejected": [USER, BOT2, USER]}, "rejected[2].role", "must end with the assistant"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?", "rejected": "\n\nHuman: hi\n\nAssistant: go"},
     "chosen", "ends on a Human turn"),
    ({"prompt": [{**USER, "tool_calls": [{"name": "f"}]}], "chosen": [BOT], "rejected": [BOT2]}, "prompt[0].tool_calls",
     "not supported"),  # only an assistant turn calls tools (tests/test_tokenize.py trains on those)
    ({"prompt": [{**USER, "name": "ada"}], "chosen": [BOT], "rejected": [BOT2]}, "prompt[0].name", "not supported"),
]


@pytest.mark.parametrize("record, field, message", BAD_RECORDS,
                         ids=["promt", "rejectd", "role", "no-assistant", "trailing-user", "hh-human-last",
                              "tool_calls", "name"])
def test_bad_records_name_the_real_fault(tmp_path, record, field, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(records(1)[0]) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=f"pairs.jsonl:row 2: field '{re.escape(field)}'.*{message}") as err:
        load_jsonl(path)
    assert err.value.field == field


def test_message_keys_set_to_none_by_datasets_are_not_refused():
    """datasets fills keys absent in one message with None: those are absent, not dropped data."""
    example = example_from_record({"prompt": [USER], "chosen": [{**BOT, "name": None}], "rejected": [BOT2]})
    assert example.chosen == (BOT,)


@pytest.mark.parametrize("prompt, chosen, field", [
    ("The movie was", " great<|endoftext|> and more", "chosen"),
    ("The movie was<|endoftext|>", " great", "prompt"),
    ("The movie was", " great", "rejected"),
], ids=["in-response", "in-prompt", "rejected"])
def test_special_token_text_in_data_is_refused(prompt, chosen, field):
    tok = tiny_tokenizer("gpt2")
    rejected = " bad<|endoftext|>x" if field == "rejected" else " bad"
    example = PreferenceExample(prompt, chosen, rejected, "s.jsonl:row 3")
    with pytest.raises(TokenizationError, match=f"s.jsonl:row 3: field '{field}': contains the special token text "
                                                "'<\\|endoftext\\|>'"):
        tokenize_pair(example, tok)
    allowed = tokenize_pair(example, tok, TokenizeConfig(special_tokens="allow"))  # the explicit escape hatch
    assert tok.eos_token_id in allowed.prompt_ids + allowed.chosen_ids + allowed.rejected_ids


def test_truncation_that_makes_chosen_equal_rejected_drops_and_counts_the_pair(tmp_path, capsys):
    """" great fun." vs " great." both cut to " great" when 1 response token fits: a margin of exactly 0 and no
    preference. Dropped, counted with its reason in the result, the metrics and one stderr line; on_truncation=error
    stops instead."""
    long_prompt = "The movie was a delight from start to finish and"
    data = records(8) + [{"prompt": long_prompt, "chosen": " great fun.", "rejected": " great."}]
    config = {**FAST, "max_steps": 1, "max_length": 12, "max_prompt_length": 11, "output_dir": str(tmp_path / "a")}
    result = train(config, train_pairs=data)
    assert result.data["train"]["rows"] == 9 and result.data["train"]["dropped"] == 1
    assert result.data["train"]["dropped_by_reason"] == {tokenize_module.IDENTICAL: 1}
    assert result.history[0]["data/train/dropped"] == 1
    assert read_metrics(tmp_path / "a" / "metrics.jsonl")[0]["data/train/dropped"] == 1
    assert "train 9 rows, 8 kept" in capsys.readouterr().err
    with pytest.raises(TokenizationError, match=f"train_pairs:row 8: field 'rejected': {tokenize_module.IDENTICAL}"):
        train({**config, "on_truncation": "error", "output_dir": str(tmp_path / "b")}, train_pairs=data)


def test_local_looking_model_path_that_does_not_exist_fails_fast(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder or file .*never looked up on a hub"):
        load_policy(str(tmp_path / "models" / "nope"))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_policy("./my-sft-model")


# ---- 3. lost data: metrics rewrite, resume_from=auto, failed runs, pruning ------------------------------------

def test_resume_rewrite_of_metrics_is_atomic_on_a_full_disk(tmp_path, monkeypatch):
    import dpolab.data.cache

    path = tmp_path / "metrics.jsonl"
    before = '{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n{"step": 3, "loss": 0.5}\n'
    path.write_text(before)

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dpolab.data.cache.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        MetricsWriter(path, resume_step=2)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_a_damaged_line_before_the_last_is_an_error_not_a_silent_cut(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "lo\n{"step": 3, "loss": 0.5}\n')
    with pytest.raises(ValueError, match="metrics.jsonl: line 2 is not valid JSON"):
        read_metrics(path)


@pytest.mark.parametrize("leftover", ["metrics", "incomplete-checkpoint"])
def test_resume_auto_without_a_complete_checkpoint_refuses_and_keeps_the_files(tmp_path, leftover):
    metrics = tmp_path / "metrics.jsonl"
    if leftover == "metrics":
        metrics.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n')
    else:
        (tmp_path / "checkpoints" / "step-000002").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="resume_from=auto found no complete checkpoint.*overwrite=true"):
        train({**FAST, "output_dir": str(tmp_path), "resume_from": "auto"}, train_pairs=records())
    if leftover == "metrics":
        assert len(read_metrics(metrics)) == 2
    result = train({**FAST, "output_dir": str(tmp_path), "resume_from": "auto", "overwrite": True},
                   train_pairs=records())
    assert result.step == 2


def test_a_run_that_fails_before_its_first_checkpoint_does_not_block_its_rerun(tmp_path):
    def fail(step, record):
        raise RuntimeError("user callback failed")

    with pytest.raises(RuntimeError, match="user callback failed") as err:
        train({**FAST, "output_dir": str(tmp_path), "save_every": 0}, train_pairs=records(), on_step=fail)
    assert any("a rerun with the same output_dir starts fresh" in note for note in err.value.__notes__)
    assert len(read_metrics(tmp_path / ckpt.FAILED_METRICS)) == 1  # kept for reading, out of the way
    result = train({**FAST, "output_dir": str(tmp_path)}, train_pairs=records())  # no overwrite needed
    assert result.step == 2


def test_a_kill_during_pruning_never_leaves_a_complete_looking_broken_checkpoint(tmp_path, monkeypatch):
    train({**FAST, "max_steps": 2, "save_every": 1, "keep_last": 3, "output_dir": str(tmp_path)},
          train_pairs=records())
    folder = ckpt.checkpoint_dir(tmp_path, 1)
    real_rmtree = ckpt.shutil.rmtree

    def killed_midway(path, *a, **k):  # delete the weights, then die
        (Path(path) / ckpt.WEIGHTS).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune_checkpoints(tmp_path, keep_last=1)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    assert not folder.exists()
    for complete in ckpt.list_checkpoints(tmp_path):
        ckpt.load_checkpoint(complete)
    ckpt.prune_checkpoints(tmp_path, keep_last=1)  # the next prune removes the stray folder
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()) == ["step-000002"]


# ---- 4. integrity: checkpoints, reference cache, data fingerprint, finite weights, provenance -----------------

@pytest.fixture
def saved_run(tmp_path):
    train({**FAST, "max_steps": 1, "output_dir": str(tmp_path)}, train_pairs=records())
    return tmp_path, ckpt.latest_checkpoint(tmp_path)


def _flip_a_bit(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, file", [
    ("flip-weights", ckpt.WEIGHTS), ("truncate-optimizer", ckpt.OPTIMIZER), ("flip-rng", ckpt.RNG),
    ("garble-state", ckpt.STATE), ("delete-weights", ckpt.WEIGHTS),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file(saved_run, damage, file):
    out, folder = saved_run
    path = folder / file
    if damage.startswith("flip"):
        _flip_a_bit(path, path.stat().st_size - 3)  # inside the tensor data: still parses
    elif damage.startswith("truncate"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage.startswith("garble"):
        path.write_text(path.read_text()[:-20])
    else:
        path.unlink()
    with pytest.raises(ckpt.CheckpointError, match=f"{path}.*(resume from an earlier checkpoint|overwrite=true)"):
        ckpt.load_checkpoint(folder)
    with pytest.raises(ckpt.CheckpointError, match=str(path)):
        train({**FAST, "max_steps": 2, "output_dir": str(out), "resume_from": "auto"}, train_pairs=records())


def test_resuming_with_different_training_data_is_refused_naming_the_field(saved_run):
    out, _ = saved_run
    with pytest.raises(ckpt.CheckpointError, match="trainer_state.json field 'data' differs.*training data changed"):
        train({**FAST, "max_steps": 2, "output_dir": str(out), "resume_from": "auto"},
              train_pairs=records(8)[::-1])


def test_resuming_from_another_starting_model_is_refused(tmp_path):
    model, tok = tiny_causal_lm("gpt2", seed=0)
    train({**FAST, "max_steps": 1, "output_dir": str(tmp_path)}, model=model, tokenizer=tok, train_pairs=records())
    other, _ = tiny_causal_lm("gpt2", seed=1)
    with pytest.raises(ckpt.CheckpointError, match="field 'model' differs"):
        train({**FAST, "output_dir": str(tmp_path), "resume_from": "auto"}, model=other, tokenizer=tok,
              train_pairs=records())


def test_provenance_names_the_model_or_its_digest(tmp_path):
    train({**FAST, "max_steps": 1, "output_dir": str(tmp_path / "a")}, train_pairs=records())
    state = json.loads((ckpt.latest_checkpoint(tmp_path / "a") / ckpt.STATE).read_text())
    assert state["model"] == {"name": "tiny-gpt2"} and len(state["data"]["train_sha256"]) == 64
    assert set(state["sha256"]) == {ckpt.WEIGHTS, ckpt.OPTIMIZER, ckpt.RNG}
    model, tok = tiny_causal_lm("gpt2", seed=3)
    train({**FAST, "max_steps": 1, "output_dir": str(tmp_path / "b")}, model=model, tokenizer=tok,
          train_pairs=records())
    state = json.loads((ckpt.latest_checkpoint(tmp_path / "b") / ckpt.STATE).read_text())
    assert state["model"]["passed_in"] and len(state["model"]["weights_sha256"]) == 64
    assert "final/" not in TrainConfig.__doc__ + str(TrainConfig.output_dir)


def test_non_finite_weights_are_never_written(tmp_path):
    train({**FAST, "max_steps": 1, "output_dir": str(tmp_path)}, train_pairs=records())
    good = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    bad = {**good.model_state, "transformer.h.0.mlp.c_fc.weight": good.model_state["transformer.h.0.mlp.c_fc.weight"]
           * float("nan")}
    with pytest.raises(metrics.NonFiniteWeightsError, match="transformer.h.0.mlp.c_fc.weight holds .* non-finite"):
        ckpt.save_checkpoint(tmp_path, 2, model_state=bad, optimizer_state=good.optimizer_state, config=good.config,
                             metrics={}, seed=0, rng_states=good.rng_states, keep_last=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000001"]  # and not pruned
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))


def test_non_finite_weights_stop_the_trainer_before_a_save(tmp_path, monkeypatch):
    import dpolab.train.trainer

    real = dpolab.train.trainer.build_optimizer

    def poisoned(params, config, **k):
        optimizer = real(params, config, **k)
        step = optimizer.step

        def step_then_poison(*a, **kw):
            out = step(*a, **kw)
            with torch.no_grad():
                params[0].view(-1)[0] = float("inf")
            return out

        optimizer.step = step_then_poison
        return optimizer

    monkeypatch.setattr(dpolab.train.trainer, "build_optimizer", poisoned)
    with pytest.raises(metrics.NonFiniteWeightsError, match="no checkpoint written"):
        train({**FAST, "max_steps": 1, "output_dir": str(tmp_path)}, train_pairs=records())
    assert ckpt.list_checkpoints(tmp_path) == []


@pytest.fixture
def tiny_pairs():
    model, tok = tiny_causal_lm("gpt2", seed=0)
    pairs = prepare_pairs(records(6), tok, TokenizeConfig(max_length=64)).pairs
    return model.eval(), tok, pairs


@pytest.mark.parametrize("damage", ["alter-values", "truncate", "delete-digest"])
def test_a_damaged_reference_table_is_rebuilt(tmp_path, tiny_pairs, damage):
    model, tok, pairs = tiny_pairs
    table = precompute_reference(model, tok, pairs, batch_size=4, root=tmp_path)
    chosen, rejected = table.chosen.clone(), table.rejected.clone()
    path = table.folder / reference_module.TABLE
    if damage == "alter-values":  # a table that still parses, with other numbers
        from safetensors.torch import save_file

        save_file({"chosen": table.chosen + 1.0, "rejected": table.rejected}, str(path))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:40])
    else:
        (table.folder / reference_module.TABLE_DIGEST).unlink()
    with pytest.warns(RuntimeWarning, match="rebuilding it"):
        again = precompute_reference(model, tok, pairs, batch_size=4, root=tmp_path)
    assert torch.equal(again.chosen, chosen) and torch.equal(again.rejected, rejected)
    assert torch.equal(table.chosen, chosen)  # the table in use never changes with the file


@pytest.mark.parametrize("change", ["precision", "batch_size", "torch", "transformers"])
def test_reference_key_covers_what_changes_the_numbers(tiny_pairs, monkeypatch, change):
    model, tok, pairs = tiny_pairs
    settings = TokenizeConfig(max_length=64)
    base = reference_key(model, tok, pairs, settings, precision="fp32", batch_size=8)
    if change == "precision":
        other = reference_key(model, tok, pairs, settings, precision="bf16", batch_size=8)
    elif change == "batch_size":
        other = reference_key(model, tok, pairs, settings, precision="fp32", batch_size=4)
    else:
        module = torch if change == "torch" else __import__("transformers")
        monkeypatch.setattr(module, "__version__", module.__version__ + ".changed")
        other = reference_key(model, tok, pairs, settings, precision="fp32", batch_size=8)
    assert other != base


# ---- 5. silently wrong training: batch-drop bias, LoRA → LoRA reference, bf16 precomputed reference -----------

def test_every_pair_is_trained_equally_often_over_epochs():
    """21 pairs, global batch 4: one pair sits out each epoch. Before, the length-bucketed incomplete batch was the
    same longest pair every epoch; now the held-out pair rotates: over 21 epochs each pair is trained 20 times."""
    config = TrainConfig.load(None, {"micro_batch_size": 4, "grad_accum_steps": 1})
    lengths = list(range(10, 31))  # pair 20 is the longest
    plan = BatchPlan(lengths, config, world_size=1)
    counts = [0] * 21
    for epoch in range(21):
        batches = plan.epoch_batches(epoch)
        assert len(batches) == 5 and all(len(b) == 4 for b in batches)
        for b in batches:
            for i in b:
                counts[i] += 1
    assert counts == [20] * 21


def test_lora_policy_with_its_own_adapter_has_the_adapter_as_reference(tmp_path):
    """LoRA SFT, then LoRA DPO with reference='adapter': π_ref must be the SFT adapter's starting weights, so
    at the first step every log-ratio is 0 and the sigmoid loss is log 2 exactly (not the bare base's loss)."""
    model, tok = tiny_causal_lm("gpt2", seed=0)
    sft = add_lora(model, 4, 16.0)
    with torch.no_grad():  # a trained SFT adapter: lora_B is no longer zero
        for name, p in sft.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    result = train({**FAST, "max_steps": 1, "lora_r": 4, "reference": "adapter", "output_dir": str(tmp_path)},
                   model=sft, tokenizer=tok, train_pairs=records())
    assert math.isclose(result.history[0]["loss"], math.log(2), abs_tol=1e-6)
    assert result.history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_bf16_policy_with_a_precomputed_reference_starts_at_margin_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path / "cache"))
    config = {**FAST, "max_steps": 1, "micro_batch_size": 8, "eval_batch_size": 8, "beta": 1.0,
              "reference": "precomputed", "precision": "bf16", "output_dir": str(tmp_path / "run")}
    result = train(config, train_pairs=records(8))
    record = result.history[0]  # a table computed in fp32 is off by about 1e-3 nats per response (bf16 rounding)
    assert record["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert record["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    assert math.isclose(record["loss"], math.log(2), abs_tol=1e-6)


def test_os_replace_is_what_prunes(tmp_path):
    """Guard for the atomic-prune test above: pruning renames before it deletes."""
    train({**FAST, "max_steps": 2, "save_every": 1, "keep_last": 3, "output_dir": str(tmp_path)},
          train_pairs=records())
    renamed = []
    real = os.replace
    ckpt.os.replace = lambda a, b: renamed.append((Path(a).name, Path(b).name)) or real(a, b)
    try:
        ckpt.prune_checkpoints(tmp_path, keep_last=1)
    finally:
        ckpt.os.replace = real
    assert renamed and renamed[0][0] == "step-000001" and ".pruned-" in renamed[0][1]


def test_precomputed_reference_says_in_the_metrics_why_kl_is_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path / "cache"))
    result = train({**FAST, "max_steps": 1, "reference": "precomputed", "kl_samples": 2,
                    "output_dir": str(tmp_path / "run")}, train_pairs=records(), eval_pairs=records(4))
    note = result.eval_history[-1]["eval_kl_note"]
    assert "KL skipped" in note and "precomputed" in note and "eval_kl" not in result.eval_history[-1]


def test_starting_adapter_reference_follows_tr_dpo_updates():
    """mix_in(α=1) moves π_ref to the policy's current adapter: the log-ratios vanish again."""
    from dpolab.data.batch import collate_pairs
    from dpolab.logprobs import concatenated_forward
    from dpolab.train.reference import StartingAdapterReference

    model, tok = tiny_causal_lm("gpt2", seed=0)
    policy = add_lora(model, 4, 16.0).eval()
    reference = StartingAdapterReference(policy)
    pairs = prepare_pairs(records(4), tok, TokenizeConfig(max_length=64)).pairs
    batch = collate_pairs(pairs, tok.eos_token_id, index=list(range(4)))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.3)
        moved = concatenated_forward(policy, batch).chosen
    assert not torch.allclose(reference.pair_logps(batch).chosen, moved)
    reference.mix_in(policy, 1.0)
    torch.testing.assert_close(reference.pair_logps(batch).chosen, moved)


def test_a_second_failed_run_keeps_the_first_failed_runs_metrics(tmp_path):
    def fail(step, record):
        raise RuntimeError("callback failed")

    for _ in range(2):
        with pytest.raises(RuntimeError):
            train({**FAST, "output_dir": str(tmp_path)}, train_pairs=records(), on_step=fail)
    assert (tmp_path / ckpt.FAILED_METRICS).is_file() and (tmp_path / "metrics.failed.1.jsonl").is_file()


def test_precomputed_reference_with_lora_reports_the_kl(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path / "cache"))
    result = train({**FAST, "max_steps": 1, "reference": "precomputed", "lora_r": 4, "kl_samples": 2,
                    "kl_max_new_tokens": 4, "output_dir": str(tmp_path / "run")}, train_pairs=records(),
                   eval_pairs=records(4))
    assert math.isfinite(result.eval_history[-1]["eval_kl"])
