"""Iterative DPO (notebook 07's loop) on a tiny model: versioned round files, reproducible, reloaded identically."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dpolab.experiments.iterative_dpo import iterative_dpo, read_round_file, round_file
from dpolab.experiments.sentiment import SentimentConfig, prepare


def letter_e_reward(texts):
    """A dense judge for a random tiny model (VADER scores its gibberish 0: every pair would tie)."""
    return np.array([text.count("e") + 0.01 * len(text) for text in texts], dtype=float)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from dpolab.models.tiny import tiny_causal_lm

    folder = tmp_path_factory.mktemp("tiny_model")
    model, tokenizer = tiny_causal_lm("llama", seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def loop(folder, out, rounds=2):
    config = SentimentConfig(model=str(folder), n_train_prompts=4, n_eval_prompts=3, samples_per_prompt=3,
                             max_new_tokens=4, sft_steps=0, batch_size=4, eval_samples_per_prompt=2,
                             heldout_pair_samples=4, best_of_n=(1, 2), output_dir=str(out), progress=False)
    setup = prepare(config)
    return setup, iterative_dpo(setup, rounds, judge=letter_e_reward, beta=0.1, steps_per_round=2, out=out / "loop")


def test_rounds_write_versioned_files_that_reload_and_reproduce(tiny_folder, tmp_path):
    """Two rounds: π_ref's row then one checkpoint per round; each round's file is named by its SHA-256, listed in
    rounds.json, and reloads to the pairs trained on; round 1 samples π_ref, round 2 the trained policy (so its
    file differs); a rerun with the same seed writes round 1's file byte for byte."""
    setup, rows = loop(tiny_folder, tmp_path / "a")
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[0]["kl"] == 0.0
    assert [r["step"] for r in rows[1:]] == [2, 4]
    manifest = json.loads((tmp_path / "a" / "loop" / "rounds.json").read_text())
    files = [tmp_path / "a" / "loop" / "pairs" / m["file"] for m in manifest]
    for m, path, row in zip(manifest, files, rows[1:]):
        import hashlib

        assert hashlib.sha256(path.read_bytes()).hexdigest() == m["sha256"] == row["pairs_sha256"]
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        pairs = read_round_file(path)
        assert len(pairs) == m["pairs"] == len(lines) == m["stats"]["num_pairs"]
        assert [p.chosen_ids for p in pairs] == [r["chosen_ids"] for r in lines]
        assert all(r["chosen_score"] > r["rejected_score"] for r in lines)  # ties were dropped
    assert files[0].read_bytes() != files[1].read_bytes()
    _, again = loop(tiny_folder, tmp_path / "b", rounds=1)
    first = tmp_path / "b" / "loop" / "pairs" / files[0].name
    assert first.read_bytes() == files[0].read_bytes() and again[1]["pairs_sha256"] == rows[1]["pairs_sha256"]


def test_a_changed_round_file_is_refused(tmp_path):
    path, _ = round_file([{"prompt": "a", "chosen": "b", "rejected": "c", "prompt_ids": [1], "chosen_ids": [2],
                           "rejected_ids": [3]}], tmp_path, 1)
    assert read_round_file(path)[0].chosen_ids == [2]
    path.write_text(path.read_text().replace('"b"', '"B"'))
    with pytest.raises(ValueError, match="does not match its name"):
        read_round_file(path)
