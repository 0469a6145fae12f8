"""π_ref's samples in the controlled-sentiment experiment: the training preference pairs and the held-out samples.

Both sample π_ref (the model after the optional SFT on reviews) at temperature 1 over the full vocabulary and score
the review text, prompt + continuation, with the ground truth. ``setup`` is the experiment's
:class:`dpolab.experiments.sentiment.Setup`.
"""

from __future__ import annotations

import time

import numpy as np
from filelock import FileLock

from dpolab.data.prepare import prepare_pairs
from dpolab.data.readers import iter_dataset
from dpolab.data.sources import open_dataset
from dpolab.data.tokenize import TokenizeConfig, TokenizedPair, pad_token_id
from dpolab.experiments.sentiment.evaluation import full_texts
from dpolab.sample.completions import completion_logprobs
from dpolab.sample.generate import sample
from dpolab.sample.pairs import build_pairs, load_pairs, pair_settings, pairs_match, read_metadata, save_pairs


def sampling_kwargs(setup, n: int, seed: int) -> dict:
    """Keyword arguments of :func:`dpolab.sample.generate.sample` for ``n`` samples of π_ref per prompt: temperature
    1 over the full vocabulary (``top_k=len(tokenizer)``), the experiment's length."""
    return dict(max_new_tokens=setup.config.max_new_tokens, top_k=len(setup.tokenizer), seed=seed,
                progress=setup.config.progress, n=n)


def make_pairs(setup):
    """Reference samples of the training prefixes → VADER scores → preference pairs, saved and reused.

    The pairs are saved under ``output_dir/pairs`` with their settings (generator and π_ref's identity, judge,
    sampling, strategy, seed, prompts) and token ids; a later run with the same settings (another β of a sweep)
    loads them instead of sampling again. Runs that start together (``dpolab sweep --jobs``) take turns: the first
    samples, the others wait and load. Returns ``(dataset, tokenized_pairs, metadata)``; ``metadata["reused"]`` says
    whether the pairs were loaded, ``metadata["provenance"]`` the same in words, with the folder.
    """
    config, t = setup.config, time.perf_counter()
    kw = sampling_kwargs(setup, config.samples_per_prompt, config.seed)
    sampling = {"n": kw["n"], "max_new_tokens": kw["max_new_tokens"], "temperature": 1.0, "top_p": 1.0,
                "top_k": kw["top_k"], "seed": kw["seed"], "chat": False}
    settings = pair_settings(generator=config.model, judge="vader", sampling=sampling, strategy=config.pair_strategy,
                             seed=config.seed, prompts=setup.train_prefixes, sft_steps=config.sft_steps,
                             reference=setup.reference_id)
    folder = setup.out / "pairs"
    with FileLock(str(folder) + ".sampling.lock"):
        # (a saved set of no pairs, every sample tied, does not load back: datasets has no table to read)
        reused = pairs_match(folder, settings) and read_metadata(folder)["num_rows"] > 0
        if reused:
            dataset, metadata = load_pairs(folder)
        else:
            kw.pop("n")
            samples = sample(setup.reference, setup.tokenizer, setup.train_prefixes, config.samples_per_prompt, **kw)
            scores = setup.reward_fn([p + c for p, row in zip(samples.prompts, samples.texts) for c in row])
            scores = scores.reshape(len(samples.prompts), config.samples_per_prompt)
            dataset, stats = build_pairs(samples.prompts, samples.texts, scores, config.pair_strategy, config.seed)
            dataset = _with_token_ids(dataset, samples)
            save_pairs(dataset, folder, settings, stats, overwrite=True)
            metadata = {"stats": stats.to_dict(), "settings": settings}
    pairs = [TokenizedPair(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"], [1] * len(r["chosen_ids"]),
                           [1] * len(r["rejected_ids"])) for r in dataset]
    setup.timings["pairs"] = time.perf_counter() - t
    provenance = (f"reused from {folder} (an earlier run with the same settings)" if reused
                  else f"sampled now and saved in {folder}")
    return dataset, pairs, {**metadata, "reused": reused, "provenance": provenance}


def data_pairs(setup, spec: str):
    """Preference rows of a local file (jsonl, json, parquet, csv, arrow), a saved datasets folder (``path:split``
    for a DatasetDict) or a hub id (:func:`dpolab.data.sources.open_dataset`), tokenized with π_ref's tokenizer.

    Text rows and message-list rows are both accepted (:mod:`dpolab.data.records`); rows that truncation leaves
    unusable are dropped and counted (:func:`dpolab.data.prepare.prepare_pairs`, default
    :class:`~dpolab.data.tokenize.TokenizeConfig`). Returns ``(dataset, tokenized_pairs, metadata)`` as
    :func:`make_pairs` does: the kept rows with their token ids, and ``metadata["stats"]`` (rows, kept, truncated,
    dropped).
    """
    from datasets import Dataset

    rows = open_dataset(spec)
    examples = list(rows if isinstance(rows, list) else iter_dataset(rows, name=str(spec)))
    data = prepare_pairs(examples, setup.tokenizer, TokenizeConfig(), name=str(spec))
    kept = [examples[i] for i in data.report.index]
    dataset = Dataset.from_list([{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected,
                                  "prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids}
                                 for e, p in zip(kept, data.pairs)])
    return dataset, data.pairs, {"stats": data.summary(), "reused": False, "provenance": f"read from {spec}"}


def _with_token_ids(dataset, samples):
    """Add the exact sampled token ids to each pair (training never re-tokenizes, so no boundary can shift)."""
    lookup = {}
    for p, (prompt, row) in enumerate(zip(samples.prompts, samples.texts)):
        for i, text in enumerate(row):
            lookup.setdefault((prompt, text), (samples.prompt_ids[p], samples.token_ids[p][i]))
    prompt_ids, chosen_ids, rejected_ids = [], [], []
    for row in dataset:
        ids, chosen = lookup[(row["prompt"], row["chosen"])]
        prompt_ids.append(list(ids))
        chosen_ids.append(list(chosen))
        rejected_ids.append(list(lookup[(row["prompt"], row["rejected"])][1]))
    return (dataset.add_column("prompt_ids", prompt_ids).add_column("chosen_ids", chosen_ids)
            .add_column("rejected_ids", rejected_ids))


def heldout_samples(setup) -> dict:
    """max(best_of_n) samples of π_ref per held-out prefix, their VADER rewards and π_ref's log-probs (cached).

    They serve Best-of-N and the reference row, and their pairs are the held-out preference pairs on which every
    trained policy's implicit-reward accuracy is measured (pairs from π_ref's samples, like the training pairs).
    """
    if setup.heldout is None:
        c = setup.config
        kw = sampling_kwargs(setup, max(*c.best_of_n, c.heldout_pair_samples, 2), c.seed + 1)
        samples = sample(setup.reference, setup.tokenizer, setup.eval_prefixes, kw.pop("n"), **kw)
        rewards = np.asarray(setup.reward_fn(full_texts(samples))).reshape(len(samples.prompts), -1)
        setup.heldout = {"samples": samples, "rewards": rewards,
                         "ref_logps": completion_logprobs(setup.reference, samples, pad_token_id(setup.tokenizer))}
    return setup.heldout
