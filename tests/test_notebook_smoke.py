"""Notebooks 02–05 executed end to end by papermill on a tiny random Llama (``model="tiny-llama"``) and tiny sizes.

They take the model, and 02–04 the preference data, as parameters, and finish: notebook 02 trains on a local parquet
file of preference rows with a held-out JSONL file; 03 runs as a two-β sweep, whose second β reuses the first one's
π_ref (the SFT model) and pairs and says so in its output; 04 trains on conversations from a JSONL file; 05 builds
its Best-of-N set from the tiny model. The dpolab cache is a fresh folder (holding only the review snippets), so the
first β trains the SFT model and samples the pairs.
"""

import json
import shutil

import pytest

papermill = pytest.importorskip("papermill")

from dpolab.data.cache import REPO_ROOT  # noqa: E402

NOTEBOOKS = REPO_ROOT / "notebooks"


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A dpolab cache of its own for the notebooks' kernels (they inherit the environment), with the review snippets
    copied from the usual cache so that nothing is fetched."""
    from dpolab.data.cache import cache_dir
    from dpolab.sample.sentiment import review_snippets

    review_snippets()  # built once in the usual cache
    cache = tmp_path / "cache"
    shutil.copytree(cache_dir() / "data", cache / "data", ignore=shutil.ignore_patterns("*.lock"))
    monkeypatch.setenv("DPOLAB_CACHE", str(cache))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return cache


def execute(name: str, out, **parameters):
    """Run notebook ``name`` with ``parameters``; return the text of every stream output of the executed copy."""
    executed = out / f"{name}.ipynb"
    papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(executed), parameters=parameters,
                               kernel_name="python3", cwd=str(NOTEBOOKS), progress_bar=False)
    return stream_text(executed)


def stream_text(path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "".join("".join(o.get("text", "")) for c in cells for o in c.get("outputs", []) if o["output_type"] == "stream")


PREFERENCES = [("The movie was", " a delight from start to finish.", " a dull mess."),
               ("The acting is", " superb and warm.", " too loud."),
               ("It is", " wonderful and wise.", " awful and plodding."),
               ("The script", " is sharp and funny.", " never finds its rhythm."),
               ("A film that", " earns every tear.", " is too pleased with itself."),
               ("The ending", " is great.", " is terrible."),
               ("Hello! How are you", " today? I am fine.", " today? Bad."),
               ("The assistant answered", " clearly and politely.", " with a mess."),
               ("Numbers like", " 10 and 100 appear in good text.", " 0 appear in awful text."),
               ("My favourite colour", " is green, a wonderful colour.", " is a dull one.")]


def test_02_training_with_a_tiny_model_and_a_local_parquet_file(fresh_cache, tmp_path):
    import pandas as pd

    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PREFERENCES]
    pd.DataFrame(rows[:8]).to_parquet(tmp_path / "pairs.parquet")  # one batch of 8 pairs
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[8:]))
    text = execute("02_training", tmp_path, model="tiny-llama", train_data=str(tmp_path / "pairs.parquet"),
                   eval_data=str(tmp_path / "heldout.jsonl"), n_train_prompts=2, n_eval_prompts=2, max_new_tokens=4,
                   sft_steps=1, dpo_steps=2, eval_samples_per_prompt=1, output_dir=str(tmp_path / "run"),
                   models_dir=str(tmp_path / "models"))
    assert f"pairs: read from {tmp_path / 'pairs.parquet'}" in text and "'kept': 8" in text
    assert "held-out reward accuracy" in text and "over 2 pairs" in text
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["02_training__dpo_beta0.1.json",
                                                                      "02_training__reference.json"]


def test_03_sweep_reuses_the_reference_and_the_pairs_of_its_first_beta(fresh_cache, tmp_path):
    from dpolab.cli.sweep import collect, run_sweep

    fixed = dict(model="tiny-llama", n_train_prompts=12, n_eval_prompts=2, samples_per_prompt=4, max_new_tokens=8,
                 sft_steps=1, dpo_steps=1, eval_samples_per_prompt=1, output_dir=str(tmp_path / "run"))
    manifest = run_sweep(NOTEBOOKS / "03_beta_sweep.ipynb", {"beta": [0.1, 0.5]}, parameters=fixed,
                         out_dir=tmp_path / "sweep", first_only={"baselines": True}, progress=False)
    assert [p.status for p in manifest.points] == ["completed", "completed"]
    first, second = (stream_text(tmp_path / "sweep" / f"03_beta_sweep__beta={b}.ipynb") for b in (0.1, 0.5))
    assert "π_ref: SFT on reviews (1 steps) trained now" in first and "pairs: sampled now" in first
    assert "π_ref: SFT on reviews (1 steps) reused from an earlier run" in second and "pairs: reused from" in second
    table = collect(tmp_path / "sweep")
    assert {"dpo_beta0.1", "dpo_beta0.5", "reference", "preferred_ft"} <= set(table["policy"])


def test_sft_reference_and_pairs_are_reused_bit_for_bit(fresh_cache, tmp_path):
    """What notebook 03's reuse rests on: a second prepare loads the cached SFT weights (equal to the first run's,
    which trained them) and make_pairs loads the first run's pairs, so DPO from either gives the same losses."""
    import torch

    from dpolab.experiments import sentiment as exp

    config = exp.SentimentConfig(model="tiny-llama", n_train_prompts=8, n_eval_prompts=2, samples_per_prompt=4,
                                 max_new_tokens=8, sft_steps=2, steps=2, output_dir=str(tmp_path / "run"), figure="",
                                 progress=False)
    first, second = exp.prepare(config), exp.prepare(config)
    assert "trained now" in first.reference_source and "reused" in second.reference_source
    assert first.reference_id == second.reference_id
    for a, b in zip(first.reference.state_dict().values(), second.reference.state_dict().values()):
        assert torch.equal(a, b)
    (_, pairs, made), (_, again, loaded) = exp.make_pairs(first), exp.make_pairs(second)
    assert not made["reused"] and loaded["reused"] and [p.chosen_ids for p in pairs] == [p.chosen_ids for p in again]
    losses = [[r["loss"] for r in exp.train_dpo(setup, pairs, 0.1)[1].history] for setup in (first, second)]
    assert losses[0] == losses[1]
    other = exp.prepare(config, lr=1e-4)  # another setting of the SFT: trained anew, and new pairs
    assert "trained now" in other.reference_source and not exp.make_pairs(other)[2]["reused"]


def test_04_multi_turn_with_a_tiny_model_and_conversation_files(fresh_cache, tmp_path):
    def row(name, good, bad):
        return {"prompt": [{"role": "user", "content": f"My name is {name}. What is my name?"}],
                "chosen": [{"role": "assistant", "content": good}], "rejected": [{"role": "assistant", "content": bad}]}

    rows = [row(n, f"Your name is {n}.", "I don't know.") for n in ("Ada", "Tom", "Lucy", "Omar", "Maria")]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (tmp_path / "eval.jsonl").write_text(json.dumps(rows[4]) + "\n")
    text = execute("04_multi_turn", tmp_path, model="tiny-llama", train_data=str(tmp_path / "train.jsonl"),
                   eval_data=str(tmp_path / "eval.jsonl"), n_train_conversations=2, samples_per_conversation=2,
                   n_eval_conversations=2, eval_samples=1, max_new_tokens=4, n_constructed=2, steps=1, batch_size=2,
                   output_dir=str(tmp_path / "run"))
    assert "final_turn: held-out implicit-reward accuracy" in text and "over 1 pairs" in text
    saved = json.loads((tmp_path / "run" / "04_multi_turn.json").read_text())
    assert saved["settings"]["model"] == "tiny-llama" and saved["settings"]["train_data"].endswith("train.jsonl")


def test_05_ranking_builds_its_set_from_a_tiny_model(fresh_cache, tmp_path):
    text = execute("05_ranking", tmp_path, model="tiny-llama", model_set="best_of_n", n_prompts=6,
                   samples_per_prompt=8, max_new_tokens=12, min_shared_prompts=2, n_bootstrap=20)
    assert "ranking a Best-of-N set built here" in text and "exercise checks passed" in text
