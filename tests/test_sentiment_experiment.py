"""The controlled-sentiment experiment end to end on a tiny model, its table, and its argument checks."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dpolab.experiments.sentiment import SentimentConfig, make_pairs, prepare, run
from dpolab.experiments.sentiment.evaluation import add_paired_gains
from dpolab.experiments.sentiment.report import from_results, table_markdown
from dpolab.train.overrides import ConfigError


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
    ("rloo_steps", 0, "rloo_steps must be >= 1.*leave 'rloo' out of methods"),
    ("rloo_k", 1, "rloo_k must be >= 2"),
    ("eval_samples_per_prompt", 0, "eval_samples_per_prompt must be >= 1"),
    ("lr", 0.0, "lr must be finite and > 0"),
    ("betas", (0.1, -0.1), "betas must be finite"),
    ("ppo_steps", 0, "ppo_steps must be >= 1.*leave 'ppo' out of methods"),
    ("ppo_lr", float("nan"), "ppo_lr must be finite"),
    ("methods", ("dpo", "trpo"), "methods: unknown"),
    ("train_seeds", (1, 1), "train_seeds must list distinct integers"),
    ("train_seeds", (-1,), "train_seeds must list distinct integers"),
])
def test_bad_settings_fail_before_any_model_load(field, value, message):
    with pytest.raises(ValueError, match=message):
        SentimentConfig(model="/nonexistent/model/folder", **{field: value},
                        **({"methods": ("dpo", field[:field.index("_")])} if field.startswith(("rloo", "ppo"))
                           else {}))


def test_unknown_or_mistyped_cli_key_is_named():
    """SentimentConfig goes through the loader of every config (dpolab.train.overrides): the same syntax, the same errors."""
    with pytest.raises(ConfigError, match=r"override 'stepz=3': 'stepz' is not a SentimentConfig field \(did you mean "
                                          r"'steps'\?\); see `dpolab reproduce --help`"):
        SentimentConfig.load(None, ["stepz=3"])
    with pytest.raises(ConfigError, match="field 'steps' expects int, got str 'many'"):
        SentimentConfig.load(None, ["steps=many"])
    with pytest.raises(ConfigError, match=r"field 'betas' expects tuple\[float, ...\]"):
        SentimentConfig.load(None, ["betas=0.1,high"])
    config = SentimentConfig.load(None, ["betas=0.1,0.5", "lr=1", "progress=false"])
    assert config.betas == (0.1, 0.5) and config.lr == 1.0 and isinstance(config.lr, float) and config.progress is False
    assert SentimentConfig.load(None, ["methods=dpo,rloo"]).methods == ("dpo", "rloo")
    assert SentimentConfig.load(None, ["methods=[dpo, rloo]", "best_of_n=1,4"]).best_of_n == (1, 4)
    with pytest.raises(ValueError, match="methods: unknown"):
        SentimentConfig.load(None, ["methods=dpo,trpo"])


def test_config_files_load_as_before():
    """The committed configs give the values their YAML holds (tuples of floats and ints, strings, numbers)."""
    from dpolab.data.cache import REPO_ROOT

    full = SentimentConfig.load(REPO_ROOT / "configs" / "sentiment_full.yaml")
    assert full.methods == ("dpo", "preferred_ft", "unlikelihood", "rloo") and full.betas == (0.05, 0.1, 0.5)
    assert full.best_of_n == (1, 2, 4, 8, 16, 32, 64) and full.lr == 5e-5 and full.results == "results/sentiment_full.json"
    assert SentimentConfig.load(REPO_ROOT / "configs" / "sentiment_ppo.yaml", ["steps=8"]).steps == 8


def test_reproduce_refuses_a_bad_key_before_any_work(capsys):
    from dpolab.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["reproduce", "stepz=3", "model=/nonexistent/model/folder"])
    assert exit_.value.code == 2
    assert "dpolab reproduce: error: override 'stepz=3': 'stepz' is not a SentimentConfig field" in capsys.readouterr().err


def letter_e_reward(texts):
    """A dense stand-in ground truth for a random tiny model (VADER scores its gibberish 0, so every pair would tie)."""
    return np.array([text.count("e") + 0.01 * len(text) for text in texts], dtype=float)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The whole frontier pipeline on a tiny random Llama: 4 train / 3 held-out prefixes, every method, two steps
    each, evaluated at every step; two β and two KL coefficients.

    The ground truth is :func:`letter_e_reward` in place of VADER (the second judge stays TextBlob).
    """
    import dpolab.experiments.sentiment.setup as experiment_setup
    from dpolab.models.tiny import tiny_causal_lm
    from dpolab.sample.judges import get_judge

    folder = tmp_path_factory.mktemp("tiny_model")
    model, tokenizer = tiny_causal_lm("llama", seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path_factory.mktemp("run")
    config = SentimentConfig(model=str(folder), n_train_prompts=4, n_eval_prompts=3, samples_per_prompt=3,
                             max_new_tokens=4, sft_steps=0, methods=("dpo", "preferred_ft", "unlikelihood", "rloo", "ppo",
                                                                  "rloo_rm", "ppo_rm"),
                             betas=(0.1, 0.5), steps=2, eval_every=1, batch_size=4, rloo_steps=2,
                             rloo_prompts_per_step=2, rloo_k=2, rloo_kl_coefs=(0.0, 0.1), ppo_steps=2,
                             ppo_prompts_per_step=2, ppo_k=2, ppo_kl_coefs=(0.1,), best_of_n=(1, 2, 4),
                             eval_samples_per_prompt=2, heldout_pair_samples=4, output_dir=str(out),
                             figure=str(out / "frontier.png"), results=str(out / "copy" / "results.json"),
                             reward_model_epochs=1.0, reward_model_batch_size=2, win_rate_temperatures=(0.5, 1.0),
                             heldout_acc_every_eval=True, progress=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experiment_setup, "get_judge", lambda name: get_judge(letter_e_reward if name == "vader" else name))
        return config, run(config)


def test_tiny_run_curves_and_invariants(tiny_run):
    """Every trained curve has its step-0 point (π_ref: KL 0, gain 0) and one row per step; Best-of-N sits at the
    analytic KL log N − (N−1)/N and Best-of-1 is π_ref's mean reward (the unbiased estimator at N = 1); DPO's first
    step starts at π_θ = π_ref, so its loss is log 2; the gains are paired against π_ref's per-prefix means."""
    config, result = tiny_run
    rows = result["results"]["policies"]
    reference = next(r for r in rows if r["method"] == "Reference")
    assert reference["kl"] == 0.0 and reference["n_samples"] == 3 * 4
    curves = {}
    for r in rows:
        curves.setdefault((r["method"], r["knob"]), []).append(r["step"])
    expected = {("DPO", 0.1), ("DPO", 0.5), ("Preferred-FT", 0.0), ("Unlikelihood", 0.0), ("RLOO-GT", 0.0),
                ("RLOO-GT", 0.1), ("PPO-GT", 0.1), ("RLOO", 0.0), ("RLOO", 0.1), ("PPO", 0.1)}
    assert {k for k in curves if k[0] not in ("Reference", "Best of N")} == expected
    for key in expected:
        assert sorted(curves[key]) == [0, 1, 2]
    for r in rows:
        assert len(r["prompt_rewards"]) == len(r["prompt_kls"]) == 3
        if r["step"] == 0 and r["method"] != "Best of N":
            assert r["reward"] == reference["reward"] and r["kl"] == 0.0
        elif r["method"] not in ("Reference", "Best of N"):
            assert r["gain"] == pytest.approx(r["reward"] - reference["reward"])
            assert r["n_samples"] == 3 * config.eval_samples_per_prompt
        if r.get("final"):
            assert 0.0 <= r["heldout_acc"] <= 1.0 and r["heldout_pairs"] <= 3 * math.comb(4, 2)
    bon = {r["knob"]: r for r in rows if r["method"] == "Best of N"}
    for n in (1, 2, 4):
        assert bon[n]["kl"] == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-12)
    assert bon[1]["reward"] == pytest.approx(reference["reward"])
    assert bon[4]["reward"] >= bon[2]["reward"] - 1e-12 >= bon[1]["reward"] - 2e-12  # E[max] grows with N
    metrics = [json.loads(line) for line in (config_out(config) / "dpo_beta0.1" / "metrics.jsonl").open()]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    curves_logged = result["results"]["learning_curves"]
    for name in ("rloo_gt_0.1", "ppo_gt_0.1", "rloo_0.1", "ppo_0.1"):
        assert len(curves_logged[name]) == 2 and all("reward" in r and "kl" in r for r in curves_logged[name])
    assert all("clipfrac" in r and "vf_loss" in r for r in curves_logged["ppo_gt_0.1"])
    assert result["figure"].is_file()
    assert result["figure"].with_name("frontier_rl_training.png").is_file()  # the RL baseline's learning curves


def test_saved_model_rows_rank_on_the_heldout_prefixes(tiny_run):
    """The run saves Best-of-N and the last checkpoint of every curve as model rows (dpolab.evaluate.results), on π_ref's
    held-out prefixes, so the ranking report aligns all of them."""
    from dpolab.evaluate.results import load_model_rows
    from dpolab.experiments.ranking_report import align_rows

    config, result = tiny_run
    rows = load_model_rows(config_out(config) / "models")
    finals = [r for r in result["results"]["policies"] if r["method"] == "Best of N" or r.get("final")]
    assert sorted(r.policy for r in rows) == sorted(r["policy"] for r in finals)
    aligned = align_rows(rows, min_prompts=3)
    assert aligned.dropped == [] and len(aligned.prompts) == 3 and all(r.source == "sentiment" for r in rows)


def test_tiny_run_comparisons_and_timings(tiny_run):
    """One matched-KL row per pair of methods, with the result fields (or a note where the curves do not share a
    KL range); the timings name the training and evaluation of every curve."""
    _, result = tiny_run
    comparisons = result["results"]["comparisons"]
    methods = ["DPO", "PPO", "RLOO", "PPO-GT", "RLOO-GT", "Preferred-FT", "Unlikelihood", "Best of N"]
    assert {(c["method_a"], c["method_b"]) for c in comparisons} == {
        (a, b) for i, a in enumerate(methods) for b in methods[i + 1:]}
    for c in comparisons:
        if c["note"]:
            assert math.isnan(c["reward_diff"])
        else:
            assert c["kl_low"] <= c["kl_high"] and c["ci_low"] <= c["ci_high"]
            assert 0.0 <= c["dominance_share"] <= 1.0
    timings = result["results"]["timings"]
    for name in ("DPO β=0.1 (train)", "evaluation: sampling (all curves)", "evaluation: π_ref log-probs (all curves)",
                 "RLOO-GT KL coef 0.1 (train)", "PPO-GT KL coef 0.1 (train)", "RLOO KL coef 0.1 (train)",
                 "PPO KL coef 0.1 (train)", "reward model (train + held-out accuracy)", "reference_samples", "load",
                 "pairs"):
        assert name in timings
    # the stages partition the run: their sum is the total (the "other" row takes what no stage timed)
    assert sum(v for k, v in timings.items() if k != "total") == pytest.approx(timings["total"], rel=1e-9)


def config_out(config):
    from dpolab.data.cache import from_repo_root

    return from_repo_root(config.output_dir)


def test_saved_results_rerender_the_same_tables(tiny_run):
    from dpolab.experiments.sentiment.report import report_markdown

    config, result = tiny_run
    saved = from_results(result["table"])
    assert saved["table_md"] == report_markdown(result["results"]) and saved["figure"] is None
    assert from_results(result["table"], config_out(config) / "redrawn.png")["figure"].is_file()
    assert (config_out(config) / "results.md").read_text().strip() == saved["table_md"]
    assert json.loads((config_out(config) / "copy" / "results.json").read_text()) == json.loads(
        result["table"].read_text())
    assert table_markdown(result["results"]["policies"]) in saved["table_md"]
    with pytest.raises(ValueError, match="not a results.json"):
        from_results(config_out(config) / "results.md")


def test_runs_of_one_setup_merge_into_the_same_comparisons(tiny_run, tmp_path):
    """Split the tiny run into two files (PPO in one, every other curve in the other, π_ref and Best-of-N in both):
    merging them gives back the same rows and the same matched-KL comparisons. A file whose π_ref differs, or two
    files with the same curve, are refused."""
    _, result = tiny_run
    full = json.loads(result["table"].read_text())
    shared = [r for r in full["policies"] if r["method"] in ("Reference", "Best of N")]
    a = {**full, "policies": [r for r in full["policies"] if r["method"] != "PPO"]}
    b = {**full, "policies": shared + [r for r in full["policies"] if r["method"] == "PPO"]}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, part in zip(paths, (a, b)):
        path.write_text(json.dumps(part))
    merged = from_results(paths)["results"]
    key = lambda r: (r["method"], r["knob"], r["step"])  # noqa: E731
    assert sorted(map(key, merged["policies"])) == sorted(map(key, full["policies"]))
    assert json.dumps(merged["comparisons"]) == json.dumps(full["comparisons"])  # NaN rows compare as text
    assert merged["timings"]["total"] == pytest.approx(2 * full["timings"]["total"])
    bad = json.loads(json.dumps(b))
    next(r for r in bad["policies"] if r["method"] == "Reference")["prompt_rewards"][0] += 1.0
    paths[1].write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="b.json: its π_ref row"):
        from_results(paths)
    paths[1].write_text(json.dumps(full))
    with pytest.raises(ValueError, match="b.json: the DPO row"):
        from_results(paths)
    # a stopped run's file (no Best-of-N rows) first: Best-of-N comes from the next file that has it
    a["policies"] = [r for r in a["policies"] if r["method"] != "Best of N"]
    paths[0].write_text(json.dumps(a))
    paths[1].write_text(json.dumps(b))
    merged = from_results(paths)["results"]
    assert sorted(map(key, merged["policies"])) == sorted(map(key, full["policies"]))


def test_older_results_file_is_refused_naming_the_field(tmp_path):
    """A results file of the first format (one row per policy under "rows") is refused, naming 'policies'; a row
    without its KL names the row and the field."""
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"rows": [{"policy": "reference"}], "timings": {}}))
    with pytest.raises(ValueError, match="'policies' is missing"):
        from_results(old)
    from dpolab.experiments.sentiment.curves import RESULTS_FORMAT

    row = {k: 0.0 for k in ("method", "knob", "step", "reward", "reward_se", "kl_se", "gain", "gain_se")}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": RESULTS_FORMAT, "policies": [{**row, "prompt_rewards": [], "prompt_kls": []}],
                               "comparisons": [], "timings": {}}))
    with pytest.raises(ValueError, match=r"policies\[0\] has no field 'kl'"):
        from_results(bad)


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


def test_a_stopped_run_keeps_its_curves_and_the_rerun_reuses_them(tmp_path):
    """The RL stage fails after DPO finished: DPO's curve is on disk (results.partial.json). The rerun with the same
    settings does not train DPO again (train_dpo would raise), returns the saved DPO rows unchanged, finishes the RL
    stage, and removes the partial file once the whole run is in results.json."""
    import dpolab.experiments.sentiment.pipeline as experiment
    import dpolab.experiments.sentiment.setup as experiment_setup
    from dpolab.models.tiny import tiny_causal_lm
    from dpolab.sample.judges import get_judge

    folder = tmp_path / "model"
    model, tokenizer = tiny_causal_lm("llama", seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = SentimentConfig(model=str(folder), n_train_prompts=4, n_eval_prompts=2, samples_per_prompt=3,
                             max_new_tokens=4, sft_steps=0, methods=("dpo", "rloo"), betas=(0.1,), steps=1,
                             batch_size=4, rloo_steps=1, rloo_prompts_per_step=2, rloo_k=2, best_of_n=(1, 2),
                             eval_samples_per_prompt=2, heldout_pair_samples=2, output_dir=str(tmp_path / "run"),
                             figure="", progress=False)

    def fail(*args, **kwargs):
        raise RuntimeError("stopped here")

    partial = tmp_path / "run" / "results.partial.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experiment_setup, "get_judge", lambda name: get_judge(letter_e_reward if name == "vader" else name))
        patch.setattr(experiment, "train_rloo", fail)
        with pytest.raises(RuntimeError, match="stopped here"):
            run(config)
        saved = json.loads(partial.read_text())["curves"]
        assert list(saved) == ["DPO β=0.1"]
        # the stopped run's finished curves assemble into a results file (dpolab reproduce --from-results PARTIAL)
        assembled = from_results(partial)["results"]
        assert [r["method"] for r in assembled["policies"]] == ["Reference"] + ["DPO"] * len(saved["DPO β=0.1"]["rows"])
        reference = assembled["policies"][0]
        assert reference["kl"] == 0.0 and reference["prompt_rewards"] == saved["DPO β=0.1"]["rows"][0]["prompt_rewards"]
        assert "Best-of-N rows" in assembled["stopped_early"]["missing"] and assembled["policies"][-1]["final"]
        patch.undo()
        patch.setattr(experiment_setup, "get_judge", lambda name: get_judge(letter_e_reward if name == "vader" else name))
        patch.setattr(experiment, "train_dpo", fail)
        result = run(config)
    dpo_rows = [r for r in result["results"]["policies"] if r["method"] == "DPO"]
    unmarked = [{k: v for k, v in r.items() if k != "final"} for r in dpo_rows]  # assemble() marks the last one
    assert json.loads(json.dumps(unmarked, default=float)) == saved["DPO β=0.1"]["rows"]
    assert any(r["method"] == "RLOO-GT" and r["step"] == 1 for r in result["results"]["policies"])
    assert not partial.exists()


def test_win_rate_against_the_reference_by_hand():
    """Prefix 1: policy rewards (0.5, 0.1) vs π_ref's (0.1, 0.3, 0.9): pairs win, win, lose / tie, lose, lose →
    (1 + 1 + 0 + 0.5 + 0 + 0)/6 = 5/12. Prefix 2: (1, 1) vs (0, 0, 0) → 1. Win rate (5/12 + 1)/2 = 17/24; its s.e.
    over the two prefixes is |1 − 5/12| / 2 = 7/24."""
    from dpolab.experiments.sentiment.evaluation import win_rate_vs_reference

    out = win_rate_vs_reference([[0.5, 0.1], [1.0, 1.0]], [[0.1, 0.3, 0.9], [0.0, 0.0, 0.0]])
    assert out["win_rate"] == pytest.approx(17 / 24) and out["win_rate_se"] == pytest.approx(7 / 24)
    assert out["prompts"] == 2 and out["pairs"] == 12
    assert out["ci_low"] == pytest.approx(17 / 24 - 1.96 * 7 / 24)
    with pytest.raises(ValueError, match="same prefixes"):
        win_rate_vs_reference([[1.0]], [[1.0], [0.0]])


def test_tiny_run_reward_model_epochs_and_temperature_sweep(tiny_run):
    """The RLHF arms' reward model is reported with its held-out accuracy on the DPO rows' held-out pairs; offline
    rows carry their epoch and ground-truth query count (the pairs' samples), the ground-truth RL arms theirs
    (step × prefixes × k), the RM arms the pairs'; every final policy and π_ref have a temperature sweep."""
    config, result = tiny_run
    results = result["results"]
    rm = results["reward_model"]
    assert rm["train_pairs"] == results["pair_stats"]["num_pairs"] and rm["best_step"] >= 1
    assert 0.0 <= rm["heldout_acc"] <= 1.0 and Path(rm["folder"]).is_dir()
    pairs_queries = config.n_train_prompts * config.samples_per_prompt
    for r in results["policies"]:
        if r["method"] in ("DPO", "Preferred-FT", "Unlikelihood"):
            assert r["reward_queries"] == pairs_queries and r["reward_source"] == "pairs (ground truth)"
            assert r["epoch"] == pytest.approx(r["step"] / (rm["train_pairs"] // config.batch_size))
        if r["method"] == "DPO" and r["step"] > 0:
            assert "heldout_acc" in r  # every checkpoint, not only the last
        if r["method"] == "RLOO-GT":
            assert r["reward_queries"] == r["step"] * config.rloo_prompts_per_step * config.rloo_k
            assert r["reward_source"] == "ground truth"
        if r["method"] in ("RLOO", "PPO"):
            assert r["reward_queries"] == pairs_queries and r["reward_source"] == "reward model"
    sweeps = results["temperature_win_rates"]
    assert "π_ref" in sweeps and "DPO β=0.1" in sweeps and "RLOO KL coef 0.1" in sweeps
    for rows in sweeps.values():
        assert [r["temperature"] for r in rows] == [0.5, 1.0]
        assert all(0.0 <= r["win_rate"] <= 1.0 and r["prompts"] == config.n_eval_prompts for r in rows)
    assert "| reward model (kept) |" in result["table"].with_suffix(".md").read_text()
    assert result["figure"].with_name("frontier_temperature.png").is_file()


def test_format_2_files_are_upgraded_and_sources_must_agree(tmp_path):
    """The committed format-2 file reads with its RL arms renamed by what they read (RLOO → RLOO-GT, curves and
    comparisons too); a file where one method name reads two reward sources is refused."""
    from dpolab.experiments.sentiment.report import load_results

    old = json.loads(Path("results/sentiment_full.json").read_text()) if Path("results/sentiment_full.json").exists() \
        else None
    if old is None:
        pytest.skip("run from the repository root")
    assert old["format"] == "dpolab.sentiment/2"
    upgraded = load_results("results/sentiment_full.json")
    methods = {r["method"] for r in upgraded["policies"]}
    assert "RLOO-GT" in methods and "RLOO" not in methods
    assert all(r["reward_source"] == "ground truth" for r in upgraded["policies"] if r["method"] == "RLOO-GT")
    assert any(k.startswith("rloo_gt_") for k in upgraded["learning_curves"])
    assert any(c["method_b"] == "RLOO-GT" for c in upgraded["comparisons"])
    bad = json.loads(json.dumps(upgraded))
    rows = [r for r in bad["policies"] if r["method"] == "RLOO-GT"]
    rows[0]["reward_source"] = "reward model"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="one name must mean one reward source"):
        load_results(path)


def test_training_seeds_vary_training_only_and_merge(tmp_path):
    """``train_seeds=(0, 1)``: each curve is trained twice. Seed 0's rows are, number for number, those of a run
    without ``train_seeds`` (the experiment's seed is 0); seed 1's DPO sees its pairs in another order and its RLOO
    other rollouts, so its checkpoints differ, while π_ref, the prefixes and the evaluation stay the same. A run of
    seed 1 alone merges with the seed-0 run into the same curves (same names, policies and numbers), and the
    matched-KL comparisons then average each method over its two seeds."""
    import dpolab.experiments.sentiment.setup as experiment_setup
    from dpolab.models.tiny import tiny_causal_lm
    from dpolab.sample.judges import get_judge

    folder = tmp_path / "model"
    model, tokenizer = tiny_causal_lm("llama", seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    settings = dict(model=str(folder), n_train_prompts=4, n_eval_prompts=3, samples_per_prompt=3, max_new_tokens=4,
                    sft_steps=0, methods=("dpo", "rloo"), betas=(0.1,), steps=3, eval_every=1, batch_size=2,
                    lr=1e-2, rloo_steps=2, rloo_prompts_per_step=2, rloo_k=2, rloo_kl_coefs=(0.1,), rloo_lr=1e-2,
                    best_of_n=(1, 2), eval_samples_per_prompt=2, heldout_pair_samples=2, figure="", progress=False)
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experiment_setup, "get_judge", lambda name: get_judge(letter_e_reward if name == "vader" else name))
        for name, seeds in (("plain", ()), ("both", (0, 1)), ("one", (1,))):
            config = SentimentConfig(**settings, train_seeds=seeds, output_dir=str(tmp_path / name),
                                     results=str(tmp_path / f"{name}.json"))
            results[name] = run(config)["results"]
    numbers = lambda r: (r["policy"], r["step"], r["prompt_rewards"], r["prompt_kls"])  # noqa: E731
    trained = lambda rows, seed: [numbers(r) for r in rows if r.get("train_seed") == seed]  # noqa: E731
    plain, both = results["plain"]["policies"], results["both"]["policies"]
    assert {r["train_seed"] for r in plain if r["method"] in ("DPO", "RLOO-GT")} == {0}
    assert trained(both, 0) == trained(plain, 0)
    assert trained(both, 1) == trained(results["one"]["policies"], 1)
    seed1 = [r for r in both if r.get("train_seed") == 1]
    assert {r["policy"] for r in seed1 if r["step"] == 3} == {"dpo_0.1_seed1_step3"}
    for method, last in (("DPO", 3), ("RLOO-GT", 2)):
        a = next(r for r in both if r["method"] == method and r["train_seed"] == 0 and r["step"] == last)
        b = next(r for r in both if r["method"] == method and r["train_seed"] == 1 and r["step"] == last)
        assert a["prompt_rewards"] != b["prompt_rewards"] or a["prompt_kls"] != b["prompt_kls"], method
        assert a["final"] and b["final"]
    reference = [r for r in both if r["method"] in ("Reference", "Best of N")]
    assert reference == [r for r in plain if r["method"] in ("Reference", "Best of N")]
    assert "dpo_0.1_seed1" in results["both"]["learning_curves"]
    for c in results["both"]["comparisons"]:  # Best of N has no training seed: one group
        assert (c["n_seeds_a"], c["n_seeds_b"]) == (2 if c["method_a"] != "Best of N" else 1,
                                                    2 if c["method_b"] != "Best of N" else 1)
        assert len(c["seed_diffs_a"]) == (0 if c["note"] else c["n_seeds_a"])  # a tiny model's curves may not overlap

    merged = from_results([tmp_path / "plain.json", tmp_path / "one.json"])
    key = lambda r: (r["policy"], r.get("train_seed"), r["step"])  # noqa: E731
    assert sorted(map(key, merged["results"]["policies"])) == sorted(map(key, both))
    point = lambda c: json.dumps({k: c[k] for k in ("method_a", "method_b", "note", "kl_low", "kl_high", "n_seeds_a",  # noqa: E731
                                                   "n_seeds_b")} | {"diff": round(c["reward_diff"], 12)})
    assert list(map(point, merged["results"]["comparisons"])) == list(map(point, results["both"]["comparisons"]))
    assert "seeds (A, B)" in merged["table_md"]
    with pytest.raises(ValueError, match="training seed 1, step"):
        from_results([tmp_path / "both.json", tmp_path / "one.json"])


def test_comparisons_table_with_seeds_by_hand():
    """A comparison of methods trained with several seeds shows the seeds, each seed's own difference and both
    intervals; a table of single-seed comparisons keeps its former columns."""
    from dpolab.experiments.sentiment.report import comparisons_markdown

    c = {"method_a": "DPO", "method_b": "RLOO", "note": "", "kl_low": 0.0, "kl_high": 6.88, "reward_diff": 0.011,
         "ci_low": -0.05, "ci_high": 0.07, "dominance_share": 0.0, "dominance_share_b": 0.1, "n_seeds_a": 3,
         "n_seeds_b": 2, "seed_diffs_a": [0.01, -0.02, 0.04], "seed_diffs_b": [0.0, 0.02], "ci_low_prefixes": -0.035,
         "ci_high_prefixes": 0.054, "checkpoints_a": 7, "checkpoints_b": 5}
    lines = comparisons_markdown([c]).splitlines()
    assert "95% CI (prefixes and seeds)" in lines[0] and "95% CI (prefixes only)" in lines[0]
    assert lines[2] == ("| DPO | RLOO | 0.00–6.88 | 7, 5 | +0.011 | [-0.050, +0.070] | 0.00 | 0.10 | 3, 2 | "
                        "+0.010 -0.020 +0.040; +0.000 +0.020 | [-0.035, +0.054] |")
    single = comparisons_markdown([{**c, "n_seeds_a": 1, "n_seeds_b": 1}]).splitlines()
    assert "seeds" not in single[0] and single[2].count("|") == 9
    note = comparisons_markdown([{"method_a": "DPO", "method_b": "X", "note": "no common KL range", "n_seeds_a": 2,
                                  "n_seeds_b": 1}]).splitlines()[2]
    assert note == "| DPO | X | no common KL range | — | — | — | — | — | 2, 1 | — | — |"
    spent = comparisons_markdown([{**c, "n_seeds_a": 1, "n_seeds_b": 1, "reward_queries_a": 512,
                                   "reward_queries_b": None, "steps_a": 222, "steps_b": 64}]).splitlines()
    assert spent[0].endswith("| GT reward queries (A, B) | optimizer steps (A, B) |")
    assert spent[2].endswith("| 0.00 | 0.10 | 512, — | 222, 64 |")
