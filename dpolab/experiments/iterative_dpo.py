"""Iterative (on-policy) DPO on the controlled-sentiment task: generate → score → pair → train → evaluate, repeated.

Round r samples ``samples_per_prompt`` continuations of every training prefix from the *current* policy (π_ref in
round 1), scores prompt + continuation with the judge, builds pairs (the experiment's ``pair_strategy``, ties
dropped and counted), writes them as a versioned preference file, trains the policy on them for ``steps_per_round``
DPO steps against the fixed π_ref, and evaluates it on the held-out prefixes: one point of the reward–KL plane per
round (:func:`dpolab.experiments.sentiment.curves.evaluate_checkpoint`, the frontier's own evaluation).

Each round's file is ``round_<r>-<first 12 hex of its SHA-256>.jsonl`` (prompt, chosen, rejected, their scores and
the sampled token ids; ``dpolab train train_data=...`` reads it), listed with its hash in ``rounds.json``. Sampling
and training are seeded by (seed, round), so a rerun with the same seed writes the same files byte for byte.
Notebook 07 runs this loop; papermill sets the number of rounds and the judge.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np

from dpolab.data.cache import atomic_write_text
from dpolab.data.tokenize import TokenizedPair
from dpolab.experiments.sentiment.curves import evaluate_checkpoint
from dpolab.experiments.sentiment.evaluation import full_texts
from dpolab.experiments.sentiment.policies import train_config, with_policy
from dpolab.sample.generate import sample
from dpolab.sample.judges import get_judge
from dpolab.sample.pairs import build_pairs
from dpolab.train.trainer import train


def round_file(rows: list[dict], folder: Path, round_: int) -> tuple[Path, str]:
    """Write one round's pairs as JSONL named by its content hash (canonical JSON, sorted keys); return the path and
    the SHA-256."""
    text = "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    path = Path(folder) / f"round_{round_}-{digest[:12]}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path, digest


def read_round_file(path: str | Path) -> list[TokenizedPair]:
    """The pairs of a round file, as the token ids that were sampled (nothing re-tokenized); the file's name must
    match its content hash (a changed file is refused)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if not path.stem.endswith(digest[:12]):
        raise ValueError(f"{path}: its content hash {digest[:12]} does not match its name (the file was changed)")
    rows = [json.loads(line) for line in text.splitlines()]
    return [TokenizedPair(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"], [1] * len(r["chosen_ids"]),
                          [1] * len(r["rejected_ids"])) for r in rows]


def sample_round_pairs(setup, policy, judge, round_: int) -> tuple[list[dict], dict]:
    """Round ``round_``'s pairs from ``policy``'s samples of the training prefixes, scored by ``judge``. Returns the
    rows (with token ids) and the pair statistics."""
    c = setup.config
    samples = sample(policy, setup.tokenizer, setup.train_prefixes, c.samples_per_prompt,
                     max_new_tokens=c.max_new_tokens, top_k=len(setup.tokenizer), seed=c.seed * 1000 + round_,
                     progress=False)
    scores = np.asarray(judge(full_texts(samples)), dtype=np.float64).reshape(len(samples.prompts), -1)
    dataset, stats = build_pairs(samples.prompts, samples.texts, scores, c.pair_strategy, c.seed + round_)
    ids = {}
    for p, (prompt, texts) in enumerate(zip(samples.prompts, samples.texts)):
        for i, text in enumerate(texts):
            ids.setdefault((prompt, text), (samples.prompt_ids[p], samples.token_ids[p][i]))
    rows = []
    for row in dataset:
        prompt_ids, chosen_ids = ids[(row["prompt"], row["chosen"])]
        rows.append({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
                     "chosen_score": row["chosen_score"], "rejected_score": row["rejected_score"],
                     "prompt_ids": list(prompt_ids), "chosen_ids": list(chosen_ids),
                     "rejected_ids": list(ids[(row["prompt"], row["rejected"])][1])})
    return rows, stats.to_dict()


def iterative_dpo(setup, rounds: int, *, judge="vader", beta: float = 0.1, steps_per_round: int = 8,
                  out: str | Path | None = None, on_round=None) -> list[dict]:
    """Run the loop of the module docstring for ``rounds`` rounds; return one checkpoint row per round (after
    π_ref's own row, round 0), each with ``round``, ``pairs_file``, ``pairs_sha256``, ``pair_stats`` and ``judge``.

    ``judge`` is a built-in judge's name ("vader", "textblob"), a callable texts -> scores, or a reward model's
    :class:`dpolab.sample.judges.RewardFunction`. ``on_round(row)`` runs after each round.
    """
    if rounds < 1 or steps_per_round < 1:
        raise ValueError(f"rounds and steps_per_round must be >= 1, got {rounds} and {steps_per_round}")
    judge = get_judge(judge)
    out = Path(out) if out is not None else setup.out / "iterative_dpo"
    setup.heldout_samples()
    if setup.reference_row is None:
        from dpolab.experiments.sentiment.curves import reference_curve_row

        setup.reference_row = reference_curve_row(setup)
    policy = copy.deepcopy(setup.reference)
    rows = [{**setup.reference_row, "method": "Iterative DPO", "knob": float(beta), "round": 0}]
    manifest = []
    for round_ in range(1, rounds + 1):
        pair_rows, stats = sample_round_pairs(setup, policy, judge, round_)
        if not pair_rows:
            raise ValueError(f"round {round_}: every pair of samples tied under judge {judge.name!r}; no pairs")
        path, digest = round_file(pair_rows, out / "pairs", round_)
        pairs = read_round_file(path)
        config = train_config(setup, f"iterative_dpo/round_{round_}", steps_per_round, stage="dpo", beta=beta,
                              loss=setup.config.loss, reference="copy")
        config["seed"] = setup.config.seed * 1000 + round_
        train(config, model=policy, tokenizer=setup.tokenizer, reference_model=setup.reference, train_pairs=pairs,
              on_step=with_policy(policy, None))
        policy.eval()
        row = evaluate_checkpoint(setup, policy, "Iterative DPO", beta, round_ * steps_per_round)
        row.update(round=round_, pairs_file=str(path), pairs_sha256=digest, pair_stats=stats, judge=judge.name)
        rows.append(row)
        manifest.append({"round": round_, "file": path.name, "sha256": digest, "pairs": len(pairs), "stats": stats,
                         "judge": judge.name, "steps": steps_per_round, "beta": beta})
        atomic_write_text(out / "rounds.json", json.dumps(manifest, indent=1) + "\n")
        if on_round is not None:
            on_round(row)
    return rows
