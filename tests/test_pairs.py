"""Preference pairs: hand-counted pairs and ties, Bradley–Terry labels and confidences, saved-set integrity."""

import math
import shutil

import numpy as np
import pytest

from dpolab.sample.pairs import (
    build_pairs,
    check_pair_request,
    load_pairs,
    pair_settings,
    pairs_match,
    pairs_mismatches,
    save_pairs,
)

PROMPTS = ["The movie was", "A dull"]
COMPLETIONS = [["a", "b", "c", "d", "e"], ["x", "y", "z", "w", "v"]]
SCORES = [[0.5, 0.5, 0.1, 0.9, 0.1], [0.0, 0.0, 0.0, 0.0, 0.0]]


def test_all_pairs_counts_and_ties():
    """n = 5 gives 10 pairs per prompt. Prompt 0 ties (a, b) and (c, e): 10 − 2 = 8 rows.

    Prompt 1 is all ties (10) and yields no row. Total: 20 candidates, 12 ties, 8 pairs.
    """
    ds, stats = build_pairs(PROMPTS, COMPLETIONS, SCORES, "all_pairs")
    assert (stats.candidate_pairs, stats.ties, stats.num_pairs, stats.prompts_without_pairs) == (20, 12, 8, 1)
    assert ds.num_rows == 8 and set(ds["prompt"]) == {"The movie was"}
    assert ds.column_names == ["prompt", "chosen", "rejected", "chosen_score", "rejected_score", "confidence"]
    assert {(r["chosen"], r["rejected"]) for r in ds} == {
        ("a", "c"), ("d", "a"), ("a", "e"), ("b", "c"), ("d", "b"), ("b", "e"), ("d", "c"), ("d", "e")}
    assert all(r["chosen_score"] > r["rejected_score"] and r["confidence"] == 1.0 for r in ds)


def test_best_vs_worst():
    """Prompt 0: best d (0.9) over worst c (0.1, the first of the equal worst); prompt 1 is one tie."""
    ds, stats = build_pairs(PROMPTS, COMPLETIONS, SCORES, "best_vs_worst")
    assert (stats.candidate_pairs, stats.ties, stats.num_pairs) == (2, 1, 1)
    assert ds[0] == {"prompt": "The movie was", "chosen": "d", "rejected": "c", "chosen_score": 0.9,
                     "rejected_score": 0.1, "confidence": 1.0}


def test_tie_margin():
    """0.9 − 0.5 = 0.4 and 0.5 − 0.1 = 0.4 are within a 0.4 margin; only 0.9 vs 0.1 survives (twice: c and e)."""
    ds, stats = build_pairs(PROMPTS[:1], COMPLETIONS[:1], SCORES[:1], "all_pairs", tie_margin=0.4)
    assert stats.num_pairs == 2 and {(r["chosen"], r["rejected"]) for r in ds} == {("d", "c"), ("d", "e")}


def test_bradley_terry_confidences():
    """Scores (1, 0): P(first ≻ second) = σ(1) = 1/(1 + e^−1) = 0.7310586; at T = 2, σ(0.5) = 0.6224593.

    The confidence is σ of the drawn label's margin, so σ(1) when the first is chosen and σ(−1) = 0.2689414
    otherwise. Over 2000 prompts the first is chosen with frequency σ(1) ± 4 × sqrt(0.731·0.269/2000) = ± 0.040.
    """
    m = 2000
    ds, stats = build_pairs([f"p{i}" for i in range(m)], [["hi", "lo"]] * m, [[1.0, 0.0]] * m, "bradley_terry",
                            seed=0)
    assert stats.num_pairs == m and stats.ties == 0
    first = np.array(ds["chosen"]) == "hi"
    confidence = np.array(ds["confidence"])
    np.testing.assert_allclose(confidence[first], 0.7310586, atol=1e-7)
    np.testing.assert_allclose(confidence[~first], 0.2689414, atol=1e-7)
    assert abs(first.mean() - 0.7310586) < 0.040
    warm, _ = build_pairs(["p"], [["hi", "lo"]], [[1.0, 0.0]], "bradley_terry", bt_temperature=2.0)
    assert warm[0]["confidence"] == pytest.approx(0.6224593 if warm[0]["chosen"] == "hi" else 1 - 0.6224593)
    again, _ = build_pairs([f"p{i}" for i in range(m)], [["hi", "lo"]] * m, [[1.0, 0.0]] * m, "bradley_terry", seed=0)
    assert again["chosen"] == ds["chosen"]  # seeded


def test_bradley_terry_over_all_pairs_keeps_sigmoid_of_margin():
    ds, stats = build_pairs(PROMPTS, COMPLETIONS, SCORES, "bradley_terry", seed=3)
    assert (stats.candidate_pairs, stats.ties, stats.num_pairs) == (20, 12, 8)  # same ties as all_pairs
    for r in ds:
        assert r["confidence"] == pytest.approx(1 / (1 + math.exp(r["rejected_score"] - r["chosen_score"])))


def test_chat_prompts_give_conversational_rows():
    chat = [[{"role": "user", "content": "Review a film."}]]
    ds, _ = build_pairs(chat, [["Great!", "Awful."]], [[0.8, -0.6]], "all_pairs")
    assert ds[0]["prompt"] == chat[0]
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "Great!"}]
    assert ds[0]["rejected"] == [{"role": "assistant", "content": "Awful."}]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="needs n >= 2 samples per prompt, got n=1"):
        check_pair_request(1, "all_pairs")
    with pytest.raises(ValueError, match="unknown pair strategy 'best'"):
        check_pair_request(4, "best")
    with pytest.raises(ValueError, match="prompt 1: 1 completion"):
        build_pairs(["a", "b"], [["x", "y"], ["z"]], [[0, 1], [0]], "all_pairs")
    with pytest.raises(ValueError, match=r"prompt 0, completion 1, field 'score': nan for text 'y'"):
        build_pairs(["a"], [["x", "y"]], [[0.0, float("nan")]], "all_pairs")
    with pytest.raises(ValueError, match="2 prompts, 1 rows of completions"):
        build_pairs(["a", "b"], [["x", "y"]], [[0, 1]], "all_pairs")
    with pytest.raises(ValueError, match="prompt 1: mixes text and message-list prompts"):
        build_pairs(["a", [{"role": "user", "content": "b"}]], [["x", "y"]] * 2, [[0, 1]] * 2)


def settings(**changes):
    base = dict(generator="tiny-gpt2", judge="vader", sampling={"n": 5, "temperature": 1.0, "top_k": None},
                strategy="all_pairs", seed=0, prompts=PROMPTS)
    return pair_settings(**{**base, **changes})


def test_save_load_roundtrip_and_reuse_check(tmp_path):
    ds, stats = build_pairs(PROMPTS, COMPLETIONS, SCORES, "all_pairs")
    folder = save_pairs(ds, tmp_path / "pairs", settings(), stats)
    loaded, metadata = load_pairs(folder)
    assert loaded.to_list() == ds.to_list()
    assert metadata["num_rows"] == 8 and metadata["stats"]["ties"] == 12 and metadata["settings"]["judge"] == "vader"
    assert len(metadata["content_hash"]) == 64 and metadata["settings"]["num_prompts"] == 2
    assert pairs_match(folder, settings())
    assert pairs_mismatches(folder, settings(seed=1, judge="textblob")) == [
        "judge: saved 'vader', requested 'textblob'", "seed: saved 0, requested 1"]
    assert not pairs_match(folder, settings(prompts=PROMPTS[::-1]))
    assert not pairs_match(tmp_path / "elsewhere", settings())
    assert save_pairs(ds, folder, settings(), stats) == folder  # same pairs again: nothing to do

    other, _ = build_pairs(PROMPTS, COMPLETIONS, SCORES, "best_vs_worst")
    with pytest.raises(FileExistsError, match="strategy: saved 'all_pairs', requested 'best_vs_worst'"):
        save_pairs(other, folder, settings(strategy="best_vs_worst"))
    save_pairs(other, folder, settings(strategy="best_vs_worst"), overwrite=True)
    assert load_pairs(folder)[0].to_list() == other.to_list()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs", "pairs.lock"]


def test_load_reports_rows_changed_after_saving(tmp_path):
    ds, _ = build_pairs(PROMPTS, COMPLETIONS, SCORES, "all_pairs")
    folder = save_pairs(ds, tmp_path / "pairs", settings())
    edited = ds.map(lambda row: {"chosen": row["chosen"].upper()})  # rows edited behind the metadata's back
    edited.save_to_disk(str(tmp_path / "edited"))
    shutil.rmtree(folder / "data")
    shutil.copytree(tmp_path / "edited", folder / "data")
    with pytest.raises(ValueError, match="pairs: the rows' content hash .* does not match field 'content_hash'"):
        load_pairs(folder)


def test_failed_save_leaves_no_usable_folder(tmp_path, monkeypatch):
    ds, _ = build_pairs(PROMPTS, COMPLETIONS, SCORES, "all_pairs")

    def crash(path):
        raise OSError("disk full")

    monkeypatch.setattr(ds, "save_to_disk", crash)
    with pytest.raises(OSError, match="disk full"):
        save_pairs(ds, tmp_path / "pairs", settings())
    assert not (tmp_path / "pairs").exists() and not pairs_match(tmp_path / "pairs", settings())
    with pytest.raises(FileNotFoundError, match="no complete saved pairs"):
        load_pairs(tmp_path / "pairs")
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_pairs(ds, tmp_path / "other", {"prompts": {1, 2}})
