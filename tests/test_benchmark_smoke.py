"""Smoke run of benchmarks/dpo_throughput.py's machinery on a 2-layer GPT-2: both trainers, 3 steps each.

What must hold for the benchmark's table to mean anything, checked on a workload small enough for the unit suite:

- trl tokenizes the workload's text to exactly the ids dpolab is handed (else the arms train on different data);
- both trainers' first optimizer step covers the same 8 pairs, so their first-step losses agree to 1e-5
  (sigmoid DPO: −log σ(β·margin), the same function of the same four log-prob sums);
- that loss is not the trivial log 2 of π_θ = π_ref, because the reference is a perturbed copy of the policy;
- the table marks an arm whose first-step loss differs by more than 1e-5 as void;
- each arm's setup time (arm start to the policy's first training forward) is recorded;
- a patch (``patches.py``) reaches the library through its own setting, and the lever benchmark times the
  trainer's own step: switched-off speed paths give the same first-step loss.

No wall-clock time is asserted.
"""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytest.importorskip("trl")

import arms  # noqa: E402
import dpo_throughput  # noqa: E402
import levers  # noqa: E402
import patches  # noqa: E402
from workloads import load_workload, pair_tokens, prepare_tiny, tokenized_pairs  # noqa: E402

from dpolab.fast.paths import FastPaths  # noqa: E402

STEPS = 3


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    return prepare_tiny(tmp_path_factory.mktemp("tiny"), num_pairs=24, num_layers=2, hidden=64, vocab=512,
                        context=128, prompt_range=(4, 12), response_range=(6, 24))


@pytest.fixture(scope="module")
def records(workload, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DPOLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.setenv("TQDM_DISABLE", "1")
    first = arms.dpolab_plan(workload, 1)[0]
    out = {"dpolab": arms.run_dpolab(workload, STEPS),
           "trl-fast": arms.run_trl(workload, STEPS, "trl-fast", first_rows=first)}
    mp.undo()
    for name, record in out.items():
        record.update(arm=name, load_start=0.0, load_end=0.0, malloc=False)
    return out


def test_workload_round_trips(workload):
    loaded = load_workload(workload.folder)
    assert (loaded.name, loaded.num_pairs) == ("tiny", 24)
    # everything but the position embeddings (the input embedding is tied to the LM head: counted once)
    assert loaded.matmul_params == sum(p.numel() for p in _policy(workload).parameters()) - 128 * 64


def _policy(workload):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(workload.policy_dir)


def test_first_step_losses_agree(records):
    ours, theirs = records["dpolab"], records["trl-fast"]
    assert ours["first_rows"] == theirs["first_rows"]
    assert len(ours["losses"]) == len(theirs["losses"]) == STEPS
    assert abs(ours["first_loss"] - theirs["first_loss"]) < 1e-5
    assert abs(ours["first_loss"] - math.log(2)) > 1e-4  # π_ref ≠ π_θ: not the trivial value


def test_token_counts_are_the_same_pairs(workload, records):
    pairs = workload.pairs()
    first = sum(pair_tokens(pairs[i]) for i in records["dpolab"]["first_rows"])
    assert records["dpolab"]["tokens"][0] == records["trl-fast"]["tokens"][0] == first


def test_setup_time_is_recorded_for_both_trainers(records):
    # the first training forward happens after the arm starts and before its first step ends; dpolab's fused output
    # layer bypasses the top-level module, so a hook placed there would leave this NaN
    for record in records.values():
        assert 0.0 < record["setup_s"] < record["step_end_s"][0]


def test_trl_tokenization_mismatch_is_refused(workload):
    ordered = workload.pairs()[:2]
    tampered = [dict(r) for r in ordered]
    tampered[1]["chosen_ids"] = tampered[1]["chosen_ids"][:-1]
    dataset = {name: [r[name] for r in ordered] for name in ("prompt_ids", "chosen_ids", "rejected_ids")}
    arms.check_trl_tokens(dataset, ordered)
    with pytest.raises(ValueError, match="row 1, field chosen_ids"):
        arms.check_trl_tokens(dataset, tampered)


def test_table_reports_agreement_and_void(workload, records):
    rows = dpo_throughput.summarise(list(records.values()), warmup=1, params=workload.matmul_params, peak_gflops=100.0)
    table = dpo_throughput.format_table(rows, title="smoke", warmup=1)
    assert "the comparison holds" in table and "÷ trl fastest, same reference" in table and "(trl-fast)" in table
    broken = dict(records["trl-fast"], first_loss=records["trl-fast"]["first_loss"] + 1e-3)
    rows = dpo_throughput.summarise([records["dpolab"], broken], warmup=1, params=workload.matmul_params,
                                    peak_gflops=100.0)
    table = dpo_throughput.format_table(rows, title="smoke", warmup=1)
    assert "VOID" in table and "(void)" in table


def test_steady_state_excludes_warmup_and_last_step():
    """Steps end at 10, 12, 15, 19 s with 100, 200, 300, 400 tokens; warm-up 1: steps 2–3 are timed,
    (200 + 300) tokens over 15 − 10 = 5 s → 100 tokens/s, 2.5 s/step."""
    record = {"step_end_s": [10, 12, 15, 19], "step_end_cpu_s": [5, 6, 8, 9], "tokens": [100, 200, 300, 400],
              "setup_s": 1.0}
    state = dpo_throughput.steady_state(record, warmup=1)
    assert state["tokens_per_s"] == pytest.approx(100.0)
    assert state["s_per_step"] == pytest.approx(2.5)
    assert state["cpu_s_per_step"] == pytest.approx(1.5)


def test_levers_refuse_unknown_names():
    assert levers.lever_parts("micro4+precomputed") == {"micro4", "precomputed"}
    with pytest.raises(ValueError, match="micro8"):  # renamed lever: would otherwise time the baseline twice
        levers.lever_parts("micro4+micro8")
    with pytest.raises(ValueError, match="system-malloc"):  # process-wide: levers.py --malloc measures it
        levers.lever_parts("system-malloc")
    with pytest.raises(ValueError, match="unknown patches"):
        arms.parse_spec("dpolab+two-row")


def test_patches_are_library_settings():
    assert patches.fast_paths(["two-rows", "model-head"]) == FastPaths(pair_tree=False, fused_output_layer=False)
    assert patches.fast_paths(["full-logits"]) == FastPaths.off()
    assert patches.fast_paths(["micro4", "fused-gelu"]) == FastPaths()
    assert patches.config_fields(["micro2", "system-malloc"]) == {"micro_batch_size": 2, "grad_accum_steps": 4,
                                                                 "keep_freed_memory": False}
    assert patches.config_fields(["grad-ckpt"]) == {"gradient_checkpointing": True}


def test_levers_time_the_trainers_step_with_the_same_loss(workload):
    """One step of the baseline and of the slow reference path (every speed path off) on the same batch: the
    trainer's optimizer_step runs both, and their losses agree to float32 rounding."""
    pairs = tokenized_pairs(workload)
    losses = {}
    for lever in ("baseline", "full-logits", "two-rows+dense-embedding+model-head"):
        setup, context = levers.build(lever, workload, pairs, steps=1)
        with context():
            seconds, losses[lever], tokens, _ = setup.step(0)
        assert seconds > 0 and tokens == sum(pair_tokens(workload.pairs()[i]) for i in setup.batches[0][0].index)
    assert losses["full-logits"] == pytest.approx(losses["baseline"], abs=1e-5)
    assert losses["two-rows+dense-embedding+model-head"] == pytest.approx(losses["baseline"], abs=1e-5)


def test_patched_arm_trains_through_the_library_setting(workload, records, tmp_path, monkeypatch):
    """``dpolab+model-head+dense-embedding`` runs train(fast=...) with the fused output layer and the sparse lookup
    off (the pair tree on, so the batches are the default arm's): the same first-step loss."""
    monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path))
    record = arms.run_dpolab(workload, 1, patches=["model-head", "dense-embedding"])
    assert record["first_rows"] == records["dpolab"]["first_rows"]
    assert abs(record["first_loss"] - records["dpolab"]["first_loss"]) < 1e-5
