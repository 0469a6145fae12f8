"""Sampling throughput: plain ``model.generate``, dpolab's slow reference engine and its fast engine, in one run.

The workload is the flagship's: review prefixes of 2–8 tokens, ``n`` samples each, ``max_new_tokens`` new tokens,
temperature 1 over the full vocabulary. Arms run interleaved, ``--repeats`` rounds, so that a load change on the
machine hits every arm alike. Tokens are the generated non-pad tokens (EOS included, nothing after it).

The baseline is the ``generate`` call a user would write for the full distribution: ``top_k=0`` (no warper). The
``top_k=len(tokenizer)`` call samples the same distribution but runs a full-vocabulary top-k every step; it is a
second, labelled row, and the ratios are to the faster of the two (which one is faster has changed between
transformers releases). Every arm's share of the FLOP floor is its tokens/s over (the float32 matmul peak measured
in the same run ÷ the forward's FLOPs per token, 2 × the parameters that multiply: attention scores ignored).
Run from the repository root::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sampling.py            # SmolLM2-135M, 32 prompts × 4 × 24
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sampling.py --quick    # tiny Llama, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime

import torch


def load(quick: bool, prompts: int):
    """``(model, tokenizer, prompt texts)``: SmolLM2 and review prefixes, or a tiny Llama and fixed texts."""
    if quick:
        from dpolab.models.tiny import tiny_causal_lm

        model, tokenizer = tiny_causal_lm("llama", num_layers=2)
        texts = ["The movie", "A dull film", "Hello! How are", "My name is Ada and my"] * (prompts // 4 + 1)
        return model, tokenizer, texts[:prompts]
    from dpolab.experiments.sentiment import make_prefixes
    from dpolab.models import load_model

    for _attempt in range(10):  # someone else may be converting the default model into the cache right now
        try:
            model, tokenizer = load_model()
            break
        except (OSError, RuntimeError, ValueError) as err:
            print(f"load_model failed ({err}); retrying in 30 s", file=sys.stderr)
            time.sleep(30)
    else:
        raise RuntimeError("could not load the default model")
    return model, tokenizer, make_prefixes(tokenizer, prompts, 0, 2, 8, seed=0)[0]


def plain_generate(full_vocabulary_top_k: bool):
    """``model.generate`` on one left-padded batch; ``top_k=0`` (no warper) or ``top_k=len(tokenizer)``."""

    def arm(model, tokenizer, texts, n, max_new_tokens, seed) -> int:
        return _generate(model, tokenizer, texts, n, max_new_tokens, seed,
                         len(tokenizer) if full_vocabulary_top_k else 0)
    return arm


def _generate(model, tokenizer, texts, n, max_new_tokens, seed, top_k) -> int:
    """One left-padded batch of ``len(texts) · n`` rows through ``model.generate``; return generated non-pad tokens."""
    tokenizer.padding_side = "left"
    batch = tokenizer([t for t in texts for _ in range(n)], return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=True, top_k=top_k, top_p=1.0, temperature=1.0,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    new = out[:, batch.input_ids.shape[1]:]
    eos = torch.tensor(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
                       else [tokenizer.eos_token_id])
    # a row's tokens run up to and including its first EOS; generate pads after it
    after_eos = torch.isin(new, eos).long().cumsum(-1) - torch.isin(new, eos).long()
    return int((after_eos == 0).sum())


def dpolab_sample(engine):
    def arm(model, tokenizer, texts, n, max_new_tokens, seed) -> int:
        from dpolab.sample.generate import sample

        s = sample(model, tokenizer, texts, n, max_new_tokens=max_new_tokens, top_k=len(tokenizer), seed=seed,
                   progress=False, engine=engine)
        return int(s.lengths.sum())
    return arm


BASELINES = ("model.generate, top_k=0 (no warper)", "model.generate, top_k=len(tokenizer) (full-vocabulary top-k)")
ARMS = {BASELINES[0]: plain_generate(False), BASELINES[1]: plain_generate(True),
        "dpolab sample, engine=generate": dpolab_sample("generate"), "dpolab sample, engine=fast": dpolab_sample("fast")}


def forward_flops_per_token(model) -> float:
    """2 × the parameters a token's forward multiplies by: every weight except the input embedding's lookup, plus
    the output layer (which, tied to the embedding, is counted once here)."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    return 2.0 * (total - embedding.numel() + (output.numel() if output is embedding else 0))


def run(quick: bool = False, prompts: int = 32, n: int = 4, max_new_tokens: int = 24, repeats: int = 3) -> dict:
    """Time every arm ``repeats`` times, interleaved; return ``{"rates": {arm: [tokens/s, ...]}, "floor": tokens/s at
    the matmul peak, "peak": the peak measurement}``."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from dpo_throughput import matmul_peak

    model, tokenizer, texts = load(quick, prompts)
    model.eval()
    rates = {name: [] for name in ARMS}
    for arm in ARMS.values():  # warm-up (allocator, kernels) outside the timings
        arm(model, tokenizer, texts[:2], 1, 2, 0)
    for round_ in range(repeats):
        for name, arm in ARMS.items():
            start = time.perf_counter()
            tokens = arm(model, tokenizer, texts, n, max_new_tokens, seed=round_)
            rates[name].append(tokens / (time.perf_counter() - start))
            print(f"round {round_ + 1}: {name}: {rates[name][-1]:.1f} tokens/s", file=sys.stderr, flush=True)
    peak = matmul_peak()
    return {"rates": rates, "peak": peak, "floor": peak["machine"] * 1e9 / forward_flops_per_token(model),
            "gflop_per_token": forward_flops_per_token(model) / 1e9}


def table(measured: dict, command: str) -> str:
    rates, floor = measured["rates"], measured["floor"]
    base_name = max(BASELINES, key=lambda b: statistics.median(rates[b]))
    base = statistics.median(rates[base_name])
    lines = ["| arm | tokens/s (median) | runs | share of FLOP floor | ratio to the faster model.generate |",
             "|---|---:|---|---:|---:|"]
    for name, values in rates.items():
        med = statistics.median(values)
        lines.append(f"| {name} | {med:.1f} | {', '.join(f'{v:.0f}' for v in values)} | {med / floor:.0%} | "
                     f"{med / base:.2f}× |")
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(lines + ["", f"FLOP floor {floor:.0f} tokens/s = matmul peak {measured['peak']['machine']:.0f} "
                               f"GFLOP/s (measured in this run) / {measured['gflop_per_token']:.3f} GFLOP per token; "
                               f"ratios are to {base_name!r}",
                               f"`{command}` — {when}, torch threads {torch.get_num_threads()}"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny Llama, a few prompts: a smoke test in seconds")
    parser.add_argument("--prompts", type=int, default=None, help="prompts (default 32; 4 with --quick)")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="new tokens (default 24; 8 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3; 1 with --quick)")
    args = parser.parse_args(argv)
    measured = run(args.quick, args.prompts or (4 if args.quick else 32), args.n,
                args.max_new_tokens or (8 if args.quick else 24), args.repeats or (1 if args.quick else 3))
    print(table(measured, "python " + " ".join(["benchmarks/sampling.py", *(argv if argv is not None else sys.argv[1:])])))


if __name__ == "__main__":
    main()
