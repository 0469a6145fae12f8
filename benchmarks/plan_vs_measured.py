"""`dpolab plan`'s memory estimates against the peak resident memory of real CPU training runs.

Each workload trains a random GPT-2 (built from a config, saved to a temporary folder) for a few DPO or SFT steps
in a fresh process, and reads the process's peak RSS (``ru_maxrss``) before training (interpreter, torch,
transformers, the model's weights, the pairs) and after it. The training's own peak is the difference; the plan's
estimate of it is its total less the weights, which were loaded before. Run from the repository root::

    .venv/bin/python benchmarks/plan_vs_measured.py            # the table (a minute or two on two cores)
    .venv/bin/python benchmarks/plan_vs_measured.py --quick    # the smallest workload only

Nothing else may run meanwhile: another process's memory does not enter ru_maxrss, but its load slows the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
WORKLOADS = {  # name: (model shape, TrainConfig fields)
    "gpt2-w256-l4 dpo adamw copy": (dict(n_embd=256, n_layer=4, n_head=4, vocab_size=8192),
                                    dict(stage="dpo", optimizer="adamw", reference="copy", micro_batch_size=8)),
    "gpt2-w512-l8 dpo adamw copy": (dict(n_embd=512, n_layer=8, n_head=8, vocab_size=16384),
                                    dict(stage="dpo", optimizer="adamw", reference="copy", micro_batch_size=8)),
    "gpt2-w512-l8 dpo rmsprop precomputed": (dict(n_embd=512, n_layer=8, n_head=8, vocab_size=16384),
                                             dict(stage="dpo", optimizer="rmsprop", reference="precomputed",
                                                  micro_batch_size=8)),
    "gpt2-w512-l8 sft adamw checkpointing": (dict(n_embd=512, n_layer=8, n_head=8, vocab_size=16384),
                                             dict(stage="sft", optimizer="adamw", micro_batch_size=16,
                                                  gradient_checkpointing=True)),
}
COMMON = dict(max_length=128, max_prompt_length=32, max_steps=3, kl_samples=0, progress=False, device="cpu",
              overwrite=True)

CHILD = r"""
import json, resource, sys, torch
from dpolab.data.tokenize import TokenizedPair
from dpolab.models import load_policy
from dpolab.train.trainer import train
config = json.loads(sys.argv[1])
model, tok = load_policy(config["model"])
g = torch.Generator().manual_seed(0)
ids = lambda n: torch.randint(3, 500, (n,), generator=g).tolist()
pairs = [TokenizedPair(ids(32), ids(96), ids(96), [1] * 96, [1] * 96) for _ in range(64)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
train(config, model=model, tokenizer=tok, train_pairs=pairs)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "after": after}))
"""


def run(name: str, shape: dict, fields: dict, tmp: Path) -> dict:
    import yaml
    from transformers import GPT2Config, GPT2LMHeadModel

    from dpolab.cli.plan import GB, plan_config
    from dpolab.models.tiny import tiny_tokenizer

    folder = tmp / name.split()[0]
    if not folder.exists():
        GPT2LMHeadModel(GPT2Config(**shape, n_positions=256)).save_pretrained(folder)
        tiny_tokenizer("gpt2").save_pretrained(folder)
    config = {**COMMON, **fields, "model": str(folder), "output_dir": str(tmp / "out")}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    plan = plan_config(path)
    stage = plan.stages[0]
    estimate = stage.total - stage.parts["weights"]
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config)], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    grown = measured["after"] - measured["before"]
    return {"workload": name, "parameters_M": plan.parameters / 1e6, "estimate_GB": estimate / GB,
            "measured_GB": grown / GB, "ratio": grown / estimate, "rss_before_GB": measured["before"] / GB,
            "rss_peak_GB": measured["after"] / GB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smallest workload only")
    args = parser.parse_args()
    names = list(WORKLOADS)[:1] if args.quick else list(WORKLOADS)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"{'workload':<40}{'params M':>9}{'estimate GB':>12}{'measured GB':>12}{'ratio':>7}{'RSS peak GB':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            row = run(name, *WORKLOADS[name], Path(tmp))
            print(f"{row['workload']:<40}{row['parameters_M']:>9.1f}{row['estimate_GB']:>12.3f}"
                  f"{row['measured_GB']:>12.3f}{row['ratio']:>7.2f}{row['rss_peak_GB']:>12.3f}", flush=True)


if __name__ == "__main__":
    main()
