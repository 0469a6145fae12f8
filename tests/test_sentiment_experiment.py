"""The controlled-sentiment experiment end to end on a tiny model, its table, and its argument checks."""

import json
import math

import numpy as np
import pytest

from dpolab.experiments.sentiment import SentimentConfig, from_results, make_pairs, prepare, run, table_markdown
from dpolab.experiments.sentiment_eval import add_paired_gains


def test_paired_gain_by_hand():
    """Baseline per-prompt rewards (0.1, 0.5, 0.3), policy (0.4, 0.5, 0.9): differences (0.3, 0, 0.6),
    mean 0.3, sample s.d. 0.3, s.e. 0.3/√3. A row on other prompts gets no gain; the baseline gets none."""
    rows = [{"policy": "reference", "prompts": ["a", "b", "c"], "prompt_rewards": [0.1, 0.5, 0.3]},
            {"policy": "dpo", "prompts": ["a", "b", "c"], "prompt_rewards": [0.4, 0.5, 0.9]},
            {"policy": "other", "prompts": ["a", "b", "d"], "prompt_rewards": [0.0, 0.0, 0.0]}]
    add_paired_gains(rows)
    assert rows[1]["reward_gain"] == pytest.approx(0.3)
    assert rows[1]["reward_gain_se"] == pytest.approx(0.3 / math.sqrt(3))
    assert "reward_gain" not in rows[0] and "reward_gain" not in rows[2]


@pytest.mark.parametrize("field, value, message", [
    ("samples_per_prompt", 1, "samples_per_prompt must be >= 2"),
    ("n_eval_prompts", 0, "empty prompt set"),
    ("max_new_tokens", 0, "max_new_tokens must be >= 1"),
])
def test_bad_settings_fail_before_any_model_load(field, value, message):
    with pytest.raises(ValueError, match=message):
        SentimentConfig(model="/nonexistent/model/folder", **{field: value})


def test_unknown_or_mistyped_cli_key_is_named():
    from dpolab.commands import sentiment_config

    with pytest.raises(SystemExit, match="unknown config key 'stepz'"):
        sentiment_config(None, ["stepz=3"])
    with pytest.raises(SystemExit, match="'steps' needs int"):
        sentiment_config(None, ["steps=many"])
    assert sentiment_config(None, ["betas=0.1,0.5", "lr=1"]).betas == (0.1, 0.5)


def letter_e_reward(texts):
    """A dense stand-in ground truth for a random tiny model (VADER scores its gibberish 0, so every pair would tie)."""
    return np.array([text.count("e") + 0.01 * len(text) for text in texts], dtype=float)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The whole experiment on a tiny random Llama: 4 train / 2 held-out prefixes, everything one or two steps.

    The ground truth is :func:`letter_e_reward` in place of VADER (the second judge stays TextBlob).
    """
    import dpolab.experiments.sentiment as experiment
    from dpolab.judges import get_judge
    from dpolab.tiny import tiny_causal_lm

    folder = tmp_path_factory.mktemp("tiny_model")
    model, tokenizer = tiny_causal_lm("llama", seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path_factory.mktemp("run")
    config = SentimentConfig(model=str(folder), n_train_prompts=4, n_eval_prompts=2, samples_per_prompt=3,
                             max_new_tokens=4, sft_steps=0, betas=(0.1,), steps=2, batch_size=4, rloo_steps=1,
                             rloo_prompts_per_step=2, rloo_k=2, best_of_n=(2, 4), eval_samples_per_prompt=2,
                             output_dir=str(out), figure=str(out / "frontier.png"), progress=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experiment, "get_judge", lambda name: get_judge(letter_e_reward if name == "vader" else name))
        return config, run(config)


def test_tiny_run_rows_and_invariants(tiny_run):
    """Every method gets a row; KL of the reference is 0 and Best-of-N's is the analytic log N − (N−1)/N; DPO's
    first step starts at π_θ = π_ref, so its loss is log 2; gains are paired against the reference."""
    config, result = tiny_run
    rows = {r["policy"]: r for r in result["rows"]}
    assert set(rows) == {"reference", "best-of-2", "best-of-4", "dpo_beta0.1", "preferred_ft", "rloo"}
    assert rows["reference"]["kl"] == 0.0 and rows["reference"]["n_samples"] == 2 * 4
    for n in (2, 4):
        assert rows[f"best-of-{n}"]["kl"] == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-12)
    # best-of-4 takes the max of all 4 reference samples of a prompt, the reference row their mean
    assert rows["best-of-4"]["reward"] >= rows["reference"]["reward"] - 1e-12
    assert rows["best-of-4"]["reward"] >= rows["best-of-2"]["reward"] - 1e-12  # max over a superset of samples
    for name in ("dpo_beta0.1", "preferred_ft", "rloo"):
        row = rows[name]
        assert row["n_samples"] == 2 * config.eval_samples_per_prompt
        assert 0.0 <= row["heldout_acc"] <= 1.0 and row["heldout_pairs"] <= 2 * math.comb(4, 2)
        assert row["reward_gain"] == pytest.approx(np.mean(row["prompt_rewards"]) - rows["reference"]["reward"])
    metrics = [json.loads(line) for line in (config_out(config) / "dpo_beta0.1" / "metrics.jsonl").open()]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert result["figure"].is_file()


def config_out(config):
    from dpolab.experiments.sentiment import resolve

    return resolve(config.output_dir)


def test_saved_results_rerender_the_same_table(tiny_run):
    config, result = tiny_run
    saved = from_results(result["table"])
    assert saved["table_md"] == table_markdown(result["rows"]) and saved["figure"] is None
    assert from_results(result["table"], config_out(config) / "redrawn.png")["figure"].is_file()
    assert (config_out(config) / "results.md").read_text().strip() == saved["table_md"]
    with pytest.raises(ValueError, match="not a results.json"):
        from_results(config_out(config) / "results.md")


def test_pairs_are_reused_with_the_same_settings(tiny_run):
    """A second make_pairs with the same settings loads the saved pairs (the loaded metadata carries the saved
    content hash, which a fresh build does not return) and the rows are the ones saved."""
    config, _ = tiny_run
    setup = prepare(config)
    first = json.loads((config_out(config) / "pairs" / "metadata.json").read_text())
    dataset, pairs, metadata = make_pairs(setup)
    assert metadata["content_hash"] == first["content_hash"] and metadata["settings"] == first["settings"]
    assert first["num_rows"] > 0
    assert len(pairs) == len(dataset) == first["stats"]["num_pairs"]
