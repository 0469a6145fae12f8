"""Data parallelism: two CPU processes under torchrun (gloo) equal one process with the same global batch."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dpolab.fast.paths import FastPaths
from dpolab.train import checkpoint as ckpt
from dpolab.train import distributed as dist
from dpolab.train.metrics import read_metrics
from dpolab.train.trainer import train

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from tiny_runs import FAST, make_examples  # noqa: E402

RUN = {**FAST, "max_steps": 3, "micro_batch_size": 2, "save_every": 1, "keep_last": 5, "eval_every": 3,
       "eval_batch_size": 2, "kl_samples": 4, "kl_max_new_tokens": 4}
# the single-process side of each comparison trains without the speed paths that only a single process takes
# (the sparse tied lookup and the fused output layer), as the distributed processes do
AS_DISTRIBUTED = FastPaths(sparse_embedding=False, fused_output_layer=False)

WORKER = """
import gc, json, os, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_distributed import RUN
from tiny_runs import make_examples
import dpolab.train.checkpoint
from dpolab.train.distributed import backend_threads
from dpolab.train.trainer import train

save = dpolab.train.checkpoint.save_checkpoint
def counted_save(*args, **kwargs):  # record which process writes checkpoints
    with open(os.path.join({out!r}, "saved-by-rank-" + os.environ["RANK"]), "a") as f:
        f.write("x")
    return save(*args, **kwargs)
dpolab.train.checkpoint.save_checkpoint = counted_save

result = train({{**RUN, "grad_accum_steps": 1, "output_dir": {out!r}{extra}}}, train_pairs=make_examples(16),
               eval_pairs=make_examples(6, offset=50))
threads = {{"after train": backend_threads()}}  # what is left for the interpreter's exit
if {save_weights}:  # (the FSDP test reads the checkpoint: DTensor operations after training would cache the mesh again)
    torch.save(result.model.state_dict(), os.path.join({out!r}, "weights-rank-" + os.environ["RANK"] + ".pt"))
del result  # an FSDP model holds the group (its DTensors' mesh) until it goes
gc.collect()
threads["after the result"] = backend_threads()
with open(os.path.join({out!r}, "threads-rank-" + os.environ["RANK"]), "w") as f:
    json.dump(threads, f)
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def _torchrun(out: Path, extra: str = "") -> subprocess.CompletedProcess:
    out.mkdir(parents=True)
    script = out / "worker.py"
    script.write_text(textwrap.dedent(WORKER.format(tests=str(TESTS), out=str(out), extra=extra,
                                                    save_weights="fsdp" not in extra)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode == 0:  # the process group was freed by train(), not left to the interpreter's shutdown
        for rank in (0, 1):  # (with FSDP, once the sharded model it returned is gone)
            threads = json.loads((out / f"threads-rank-{rank}").read_text())
            assert threads["after the result"] == [] and ("fsdp" in extra or threads["after train"] == []), (rank,
                                                                                                             threads)
    return done


def test_single_process_context_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = dist.setup("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.enabled) == (0, 1, True, False)
    values = torch.tensor([1.0, 2.0])
    assert torch.equal(dist.all_reduce_sum(values, ctx), values)
    assert dist.all_gather_objects({"a": 1}, ctx) == [{"a": 1}]


@pytest.mark.distributed
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    """2 processes × 2 pairs × 1 accumulation step vs 1 process × 2 pairs × 2 accumulation steps: the same
    4-pair global batches (the plan is a function of seed and step), the same micro-batches, only the order
    of the gradient sums differs, so weights agree to float rounding; metrics are reduced over both
    processes and files are written by rank 0 only.

    The single process trains with the model's own embedding lookup and output layer, as distributed processes do
    (the sparse tied lookup and the fused output layer of dpolab.fast are single-process only): GPT-2's
    attention-key biases get a gradient that is zero up to rounding, which Adam scales up to lr-sized steps, so any
    other summation order shows there."""
    out = tmp_path / "ddp"
    proc = _torchrun(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train({**RUN, "grad_accum_steps": 2, "output_dir": str(tmp_path / "single")},
                   train_pairs=make_examples(16), eval_pairs=make_examples(6, offset=50), fast=AS_DISTRIBUTED)

    ddp_weights = torch.load(out / "weights-rank-0.pt")
    other_rank = torch.load(out / "weights-rank-1.pt")
    for name, tensor in single.model.state_dict().items():
        assert torch.equal(ddp_weights[name], other_rank[name]), name  # replicas stay identical
        torch.testing.assert_close(ddp_weights[name], tensor, rtol=1e-4, atol=1e-6, msg=name)

    lines = read_metrics(out / "metrics.jsonl")
    steps = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and [r["step"] for r in evals] == [3]  # written once
    for got, want in zip(steps, single.history):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "lengths/rejected", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["step"], key)
        assert got["num_tokens"] == want["num_tokens"]  # both processes' tokens counted
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_logps/rejected"):
        assert evals[0][key] == pytest.approx(single.eval_history[0][key], rel=1e-5, abs=1e-6), key
    assert "eval_kl" in evals[0]  # samples gathered from both processes

    assert (out / "saved-by-rank-0").read_text() == "xxx" and not (out / "saved-by-rank-1").exists()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000001", "step-000002", "step-000003"]
    state = json.loads((ckpt.latest_checkpoint(out) / ckpt.STATE).read_text())
    assert state["world_size"] == 2 and len(ckpt.load_checkpoint(ckpt.latest_checkpoint(out)).rng_states) == 2


@pytest.mark.distributed
def test_gradient_checkpointing_under_ddp_trains_as_one_process_without_it(tmp_path):
    """The same comparison with every decoder layer recomputed in the backward pass of both DDP processes."""
    out = tmp_path / "ddp"
    proc = _torchrun(out, extra=', "gradient_checkpointing": True')
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train({**RUN, "grad_accum_steps": 2, "output_dir": str(tmp_path / "single")},
                   train_pairs=make_examples(16), eval_pairs=make_examples(6, offset=50), fast=AS_DISTRIBUTED)
    ddp_weights = torch.load(out / "weights-rank-0.pt")
    for name, tensor in single.model.state_dict().items():
        torch.testing.assert_close(ddp_weights[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in single.history], rel=1e-5, abs=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_two_processes_equal_one_process(tmp_path):
    """The same comparison with the model sharded by FSDP (fully_shard) instead of replicated by DDP."""
    out = tmp_path / "fsdp"
    proc = _torchrun(out, extra=', "fsdp": True, "kl_samples": 0')
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train({**RUN, "grad_accum_steps": 2, "kl_samples": 0, "output_dir": str(tmp_path / "single")},
                   train_pairs=make_examples(16), eval_pairs=make_examples(6, offset=50), fast=AS_DISTRIBUTED)
    sharded = ckpt.load_checkpoint(ckpt.latest_checkpoint(out)).model_state
    for name, tensor in single.model.state_dict().items():
        torch.testing.assert_close(sharded[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
    assert evals[0]["eval_loss"] == pytest.approx(single.eval_history[0]["eval_loss"], rel=1e-5)
