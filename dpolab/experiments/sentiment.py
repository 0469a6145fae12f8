"""The paper's controlled-sentiment experiment (§6.1, Fig. 2 left) on the embedded default.

Pipeline (every step a library call):

1. prompts: 2–8-token prefixes of the Rotten Tomatoes review snippets, disjoint train/held-out snippets;
2. optional SFT of the default model on review text (then this SFT model is π_ref), as the paper fine-tunes
   GPT-2-large on IMDb first;
3. ``samples_per_prompt`` samples of π_ref per training prefix, scored by the ground truth (VADER), turned
   into preference pairs (all pairs of the samples, the paper's choice; ties dropped);
4. DPO over a grid of β, Preferred-FT (SFT on the chosen responses), RLOO (the RL baseline) and Best-of-N
   sampling from π_ref;
5. every policy sampled on the held-out prefixes: mean VADER reward, KL(π‖π_ref), TextBlob as a second
   judge; the reward–KL frontier figure and a table.

The settings are :class:`dpolab.experiments.sentiment_config.SentimentConfig` (defaults: the small CPU run, minutes
on two cores; ``configs/sentiment_full.yaml`` is the full one). Its parts live beside this module: π_ref's samples
and pairs (``sentiment_samples``), the trained policies and the SFT on reviews (``sentiment_policies``), evaluation
(``sentiment_eval``, ``sentiment_curves``) and the results file (``sentiment_report``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dpolab.cache import atomic_write_text, from_repo_root
from dpolab.data.tokenize import pad_token_id
from dpolab.device import resolve_device
from dpolab.experiments import sentiment_curves as curves
from dpolab.experiments.sentiment_config import RL_METHODS, SentimentConfig
from dpolab.experiments.sentiment_eval import (
    best_of_n_rows,
    evaluate_policy,
    evaluate_samples,
    heldout_pair_accuracy,
    temperature_win_rates,
)
from dpolab.experiments.sentiment_policies import (
    sft_reference,
    train_dpo,
    train_online_dpo,
    train_ppo,
    train_preferred_ft,
    train_reward_model_on_pairs,
    train_rloo,
    train_unlikelihood,
)
from dpolab.experiments.sentiment_report import assemble, write_results
from dpolab.experiments.sentiment_samples import heldout_samples, make_pairs
from dpolab.hub_check import Source, check_sources
from dpolab.models import DEFAULT_MODEL, TINY_MODELS, load_policy
from dpolab.results import save_model_row
from dpolab.sample.completions import completion_logprobs
from dpolab.sample.judges import BUILTIN_JUDGES, RewardFunction, get_judge, load_classifier_judge
from dpolab.sample.pairs import check_pair_request
from dpolab.sample.review_text import review_texts
from dpolab.sample.sentiment import review_snippets
from dpolab.train.fingerprint import weights_digest


def make_prefixes(tokenizer, n_train: int, n_eval: int, lo: int, hi: int, seed: int,
                  texts: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Review prefixes of lo..hi tokens; train and held-out prefixes come from disjoint snippets.

    The held-out prefixes are drawn first, so every run with the same ``seed`` and ``n_eval`` evaluates on
    the same prompts whatever its ``n_train`` (runs of different notebooks can be ranked against each other).
    ``texts``: the reviews to cut (default: the embedded snippets; :func:`dpolab.sample.review_text.review_texts`).
    """
    texts = review_snippets()["text"] if texts is None else texts
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    prefixes = []
    for i in order:
        ids = tokenizer(texts[int(i)], add_special_tokens=False).input_ids
        k = int(rng.integers(lo, hi + 1))
        if len(ids) <= k:  # a snippet no longer than its prefix leaves nothing to continue
            continue
        prefixes.append(tokenizer.decode(ids[:k]))
        if len(prefixes) == n_train + n_eval:
            break
    return prefixes[n_eval:], prefixes[:n_eval]


@dataclass
class Setup:
    """What every step of the experiment shares: π_ref, its tokenizer, the prefixes and the judges."""

    config: SentimentConfig
    reference: torch.nn.Module
    tokenizer: object
    train_prefixes: list[str]
    eval_prefixes: list[str]
    reward_fn: object
    judge_fn: object
    out: Path
    timings: dict = field(default_factory=dict)
    heldout: dict | None = None
    """π_ref's held-out samples, their rewards and π_ref's log-probs (:func:`~.sentiment_samples.heldout_samples`)."""
    reference_row: dict | None = None
    """π_ref's checkpoint row (:func:`dpolab.experiments.sentiment_curves.reference_curve_row`), once evaluated."""
    reference_id: str = ""
    """π_ref's identity, recorded with the pairs: the initial weights' SHA-256, or its cached SFT weights' name."""
    reference_source: str = ""
    """Where π_ref came from, in words: the initial model, SFT trained now, or SFT reused from an earlier run."""

    def heldout_samples(self) -> dict:
        """π_ref's held-out samples (drawn once; :func:`dpolab.experiments.sentiment_samples.heldout_samples`)."""
        return heldout_samples(self)


def prepare(config: SentimentConfig | None = None, **overrides) -> Setup:
    """Check the settings, load π_ref (``config.model``, or a tiny test model's name) after the optional SFT on
    reviews (trained once per settings, then reused: ``setup.reference_source`` says which), draw the prefixes."""
    config = dataclasses.replace(config or SentimentConfig(), **overrides)
    check_pair_request(config.samples_per_prompt, config.pair_strategy)  # argument errors before any model load
    check_sources(sources(config), builtin=BUILTIN_NAMES)  # every missing hub id named at once, before any work
    device = resolve_device(config.device, config.use_cpu)
    out = from_repo_root(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    torch.manual_seed(config.seed)
    reference, tokenizer = load_policy(config.model, seed=config.seed)
    reference = reference.to(device)
    texts = review_texts(config.dataset_name, config.dataset_train_split, config.dataset_text_field)
    train_prefixes, eval_prefixes = make_prefixes(tokenizer, config.n_train_prompts, config.n_eval_prompts,
                                                  config.min_prefix_tokens, config.max_prefix_tokens, config.seed,
                                                  texts)
    setup = Setup(config, reference.eval(), tokenizer, train_prefixes, eval_prefixes, ground_truth(config, device),
                  get_judge("textblob"), out)
    setup.reference_id = weights_digest(reference)
    setup.reference_source = f"the initial model {config.model} (sft_steps=0)"
    setup.timings["load"] = time.perf_counter() - t
    if config.sft_steps > 0:
        t = time.perf_counter()
        setup.reference, folder, reused = sft_reference(setup.reference, tokenizer, config, out, setup.reference_id)
        setup.reference_id = folder.name
        how = "reused from an earlier run with the same settings" if reused else "trained now"
        setup.reference_source = f"SFT on reviews ({config.sft_steps} steps) {how}, cached in {folder}"
        setup.timings["sft"] = time.perf_counter() - t
    return setup


BUILTIN_NAMES = (*BUILTIN_JUDGES, *TINY_MODELS, DEFAULT_MODEL)
"""Names in a config's model/judge fields that are neither paths nor hub ids."""


def sources(config: SentimentConfig) -> list[Source]:
    """What the experiment loads: the model, the review texts and the judge (each a hub id, a path or built in)."""
    return [Source("model", config.model), Source("dataset_name", config.dataset_name, "dataset"),
            Source("judge", config.judge)]


def ground_truth(config: SentimentConfig, device) -> RewardFunction:
    """The ground-truth reward: a built-in judge by name, else a sequence classifier on ``device``."""
    if config.judge in BUILTIN_JUDGES:
        return get_judge(config.judge)
    label = int(config.judge_label) if config.judge_label.isdigit() else config.judge_label
    return load_classifier_judge(config.judge, device=device, label=label, output=config.judge_output)


def evaluate(setup: Setup, name: str, method: str, policy, **extra) -> dict:
    """One results row: ``policy`` sampled on the held-out prefixes, scored, KL to π_ref, held-out pair accuracy."""
    c = setup.config
    held = heldout_samples(setup)
    ratios = completion_logprobs(policy, held["samples"], pad_token_id(setup.tokenizer)) - held["ref_logps"]
    return evaluate_policy(name, method, policy, setup.reference, setup.tokenizer, setup.eval_prefixes,
                           n=c.eval_samples_per_prompt, max_new_tokens=c.max_new_tokens, seed=c.seed + 1,
                           reward_fn=setup.reward_fn, judge_fn=setup.judge_fn,
                           **heldout_pair_accuracy(ratios.numpy(), held["rewards"]), **extra)


def temperature_sweep(setup: Setup, policy) -> list[dict]:
    """``policy``'s win rate against π_ref's held-out samples (temperature 1) at each of the config's
    ``win_rate_temperatures`` (:func:`dpolab.experiments.sentiment_eval.temperature_win_rates`), judged by VADER."""
    c = setup.config
    return temperature_win_rates(policy, setup.tokenizer, setup.eval_prefixes, setup.heldout_samples()["rewards"],
                                 setup.reward_fn, c.win_rate_temperatures, n=c.eval_samples_per_prompt,
                                 max_new_tokens=c.max_new_tokens, seed=c.seed + 3)


def reference_rows(setup: Setup) -> list[dict]:
    """π_ref itself and the Best-of-N baselines, from max(best_of_n) reference samples per held-out prefix."""
    held = heldout_samples(setup)
    rows = [evaluate_samples("reference", "Reference", held["samples"], setup.reward_fn, setup.judge_fn, None)]
    return rows + best_of_n_rows(held["samples"], setup.reward_fn, setup.judge_fn, setup.config.best_of_n)


def run(config: SentimentConfig | None = None, **overrides) -> dict:
    """The whole experiment: every method's reward–KL curve, the matched-KL comparisons, the results file.

    Returns ``{"results", "table", "figure", "timings", "pair_stats"}``; ``results`` is the dict written to
    ``output_dir/results.json`` (and to ``config.results`` when set), in the format that
    :func:`dpolab.experiments.sentiment_report.from_results` reads. The last checkpoint of every curve and the
    Best-of-N rows are also saved with :func:`dpolab.results.save_model_row` under ``output_dir/models`` for ranking.
    """
    config = dataclasses.replace(config or SentimentConfig(), **overrides)
    stages = ["load + SFT", "preference pairs", "π_ref held-out samples"]
    seeds = config.train_seeds or (config.seed,)

    def named(name: str, seed: int) -> str:
        """A curve's name: with its training seed when that is not the experiment's ``seed``."""
        return name if seed == config.seed else f"{name} seed {seed}"

    stages += [named(f"DPO β={b:g}", s) for b in config.betas for s in seeds] if "dpo" in config.methods else []
    stages += [named(name, s) for key, name in (("preferred_ft", "Preferred-FT"), ("unlikelihood", "Unlikelihood"))
               if key in config.methods for s in seeds]
    wants_rm = bool({"rloo_rm", "ppo_rm", "reward_model", "online_dpo_rm"} & set(config.methods))
    stages += ["reward model"] if wants_rm else []
    for key, arm in RL_METHODS.items():
        knobs, _, label, *_ = _rl_arm(config, key)
        stages += [named(f"{arm} {label} {k:g}", s) for k in knobs for s in seeds] if key in config.methods else []
    say = _stage_printer(stages, config.progress)
    t0 = time.perf_counter()

    say("load + SFT")
    setup = prepare(config)
    config, timings = setup.config, setup.timings
    say("preference pairs")
    _, pairs, metadata = make_pairs(setup)
    say("π_ref held-out samples")
    t = time.perf_counter()
    setup.heldout_samples()
    timings["reference_samples"] = time.perf_counter() - t
    setup.reference_row = curves.reference_curve_row(setup)
    if config.progress:
        r = setup.reference_row
        print(f"    π_ref: reward {r['reward']:.6f} ± {r['reward_se']:.6f} over {len(r['prompt_rewards'])} prefixes",
              file=sys.stderr, flush=True)
    rows = [setup.reference_row, *curves.best_of_n_curve_rows(setup, config.best_of_n)]
    learning_curves = {}
    # ground-truth reward queries behind the offline methods: every sample of π_ref that was scored to make pairs
    offline_queries = config.n_train_prompts * config.samples_per_prompt
    epoch_steps = max(1, len(pairs) // config.batch_size)  # steps in one pass (both trainers drop a short batch)
    pair_steps = config.steps if config.num_train_epochs <= 0 else math.ceil(config.num_train_epochs * epoch_steps)

    sweeps = {}
    if config.win_rate_temperatures:
        t = time.perf_counter()
        sweeps["π_ref"] = temperature_sweep(setup, setup.reference)
        timings["evaluation: temperature win rates"] = time.perf_counter() - t
    partial_path = setup.out / "results.partial.json"
    finished = _finished_curves(partial_path, config)

    def traced(method: str, knob: float, name: str, train_fn, every: int, steps: int, seed: int, **row_fields):
        """Train one curve with training seed ``seed``, evaluating at the checkpoint steps; record train and eval
        seconds apart."""
        name = named(name, seed)
        row_fields["train_seed"] = seed
        if name in finished:  # measured by an earlier run of the same settings that stopped later
            say(name)
            done = finished[name]
            rows.extend(done["rows"])
            learning_curves[done["key"]] = done["learning_curve"]
            timings[f"{name} (train, reused from an earlier run)"] = done["train_seconds"]
            if done.get("temperature_win_rates"):
                sweeps[name] = done["temperature_win_rates"]
            saved[name] = done
            return
        say(name)
        at = curves.checkpoint_steps(steps, every)
        def fields(step: int) -> dict:
            return {key: value(step) if callable(value) else value for key, value in row_fields.items()}

        points = [_seeded({**curves.start_row(setup.reference_row, method, knob), **fields(0)}, seed, config.seed)]
        spent = {"eval": 0.0}

        def on_step(policy, step, record):
            if step in at:
                started = time.perf_counter()
                points.append(curves.evaluate_checkpoint(
                    setup, policy, method, knob, step, pair_accuracy=step == steps or config.heldout_acc_every_eval))
                points[-1] = _seeded({**points[-1], **fields(step)}, seed, config.seed)
                spent["eval"] += time.perf_counter() - started
                for part, seconds in points[-1]["eval_seconds"].items():
                    timings[f"evaluation: {part} (all curves)"] = timings.get(
                        f"evaluation: {part} (all curves)", 0.0) + seconds
                if config.progress:
                    r = points[-1]
                    print(f"    step {step}: reward {r['reward']:.3f} ± {r['reward_se']:.3f}, "
                          f"KL {r['kl']:.2f} ± {r['kl_se']:.2f}, gain {r['gain']:+.3f} ± {r['gain_se']:.3f}",
                          file=sys.stderr, flush=True)

        started = time.perf_counter()
        policy, result = train_fn(on_step)
        timings[f"{name} (train)"] = time.perf_counter() - started - spent["eval"]
        if config.win_rate_temperatures:
            started = time.perf_counter()
            sweeps[name] = temperature_sweep(setup, policy)
            timings["evaluation: temperature win rates"] = (timings.get("evaluation: temperature win rates", 0.0)
                                                            + time.perf_counter() - started)
        history = getattr(result, "history", result)
        key = points[-1]["policy"].rsplit("_step", 1)[0]
        learning_curves[key] = [{k: v for k, v in record.items() if isinstance(v, int | float)
                                 and not isinstance(v, bool)} for record in history]
        rows.extend(points)
        # each finished curve is on disk at once: a run stopped later keeps it, and its rerun reuses it
        saved[name] = {"rows": points, "key": key, "learning_curve": learning_curves[key],
                       "train_seconds": timings[f"{name} (train)"], "temperature_win_rates": sweeps.get(name)}
        atomic_write_text(partial_path, json.dumps({"config": _reuse_key(config), "curves": saved}, default=float))

    saved = {}

    offline = {"reward_source": "pairs (ground truth)", "reward_queries": offline_queries,
               "epoch": lambda step: step / epoch_steps}
    if "dpo" in config.methods:
        for beta in config.betas:
            for seed in seeds:
                traced("DPO", beta, f"DPO β={beta:g}",
                       lambda cb, beta=beta, seed=seed: train_dpo(setup, pairs, beta, on_step=cb, steps=pair_steps,
                                                                  seed=seed),
                       config.eval_every, pair_steps, seed, **offline)
    for key, method, train_fn in (("preferred_ft", "Preferred-FT", train_preferred_ft),
                                  ("unlikelihood", "Unlikelihood", train_unlikelihood)):
        if key in config.methods:
            for seed in seeds:
                traced(method, 0.0, method,
                       lambda cb, fn=train_fn, seed=seed: fn(setup, pairs, on_step=cb, steps=pair_steps, seed=seed),
                       config.eval_every, pair_steps, seed, **offline)
    judge = None
    if wants_rm:
        say("reward model")
        t = time.perf_counter()
        judge, reward_model_summary = train_reward_model_on_pairs(setup, pairs)
        timings["reward model (train + held-out accuracy)"] = time.perf_counter() - t
        if config.progress:
            r = reward_model_summary
            print(f"    reward model: held-out pair accuracy {r['heldout_acc']:.3f} ± {r['heldout_acc_se']:.3f} "
                  f"(best epoch {r['best_epoch']:g}; last {r['last_heldout_acc']:.3f})", file=sys.stderr, flush=True)
    for key, arm in RL_METHODS.items():
        if key not in config.methods:
            continue
        knobs, train_fn, label, every, steps, per_step = _rl_arm(config, key)
        reads_rm = key.endswith("_rm")
        source = {"reward_source": "reward model" if reads_rm else "ground truth",
                  # a learned reward model costs no ground-truth query beyond the pairs it learned from
                  "reward_queries": (lambda step: offline_queries) if reads_rm else (lambda step, n=per_step: step * n)}
        for knob in knobs:
            for seed in seeds:
                traced(arm, knob, f"{arm} {label} {knob:g}",
                       lambda cb, knob=knob, fn=train_fn, rm=reads_rm, seed=seed: fn(
                           setup, knob, on_step=cb, reward_fn=judge if rm else None, seed=seed),
                       every, steps, seed, **source)
    total = time.perf_counter() - t0
    timings["other (model copies, bookkeeping)"] = total - sum(timings.values())
    timings["total"] = total

    results = assemble(config, rows, learning_curves, timings, metadata.get("stats"))
    if wants_rm:
        results["reward_model"] = reward_model_summary
    if sweeps:
        results["temperature_win_rates"] = sweeps
    partial_path.unlink(missing_ok=True)  # the whole run is in the results file now
    for row in results["policies"]:  # Best-of-N rows are on π_ref's held-out prefixes, and name none of their own
        if row["method"] == "Best of N" or (row["method"] != "Reference" and row.get("final")):
            save_model_row({"prompts": setup.reference_row["prompts"], **row}, setup.out / "models", source="sentiment")
    paths = write_results(results, setup.out / "results.json", from_repo_root(config.results) if config.results else None,
                          from_repo_root(config.figure) if config.figure else None)
    say(None)
    return {"results": results, **paths, "timings": timings, "pair_stats": metadata.get("stats")}


def _seeded(row: dict, seed: int, default: int) -> dict:
    """A checkpoint row of a curve trained with ``seed``: ``train_seed`` set, and the policy's name carries the seed
    when it is not the experiment's (``dpo_0.1_seed1_step38``), so the curves of several seeds do not collide."""
    row["train_seed"] = int(seed)
    if seed != default and "_seed" not in row["policy"]:
        head, step = row["policy"].rsplit("_step", 1)
        row["policy"] = f"{head}_seed{seed}_step{step}"
    return row


def _rl_arm(config: SentimentConfig, key: str):
    """An on-policy arm's grid, trainer, knob label, evaluation interval, steps and reward queries per step. Online
    DPO takes RLOO's rollouts (the same queries per step) and has β as its knob."""
    if key.startswith("ppo"):
        return (config.ppo_kl_coefs, train_ppo, "KL coef", config.ppo_eval_every or config.eval_every,
                config.ppo_steps, config.ppo_prompts_per_step * config.ppo_k)
    knobs, train_fn, label = ((config.online_dpo_betas, train_online_dpo, "β") if key.startswith("online_dpo")
                              else (config.rloo_kl_coefs, train_rloo, "KL coef"))
    return (knobs, train_fn, label, config.rloo_eval_every or config.eval_every, config.rloo_steps,
            config.rloo_prompts_per_step * config.rloo_k)


def _reuse_key(config: SentimentConfig) -> dict:
    """The settings that decide a curve's numbers (not where files go or whether bars are shown)."""
    defaults = SentimentConfig()
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in ("progress", "figure", "results", "device",
                                                                             "use_cpu")
            and not (k in LATER_FIELDS and v == getattr(defaults, k))}


# fields added after results.partial.json files were written: in the reuse key only when changed, so an earlier
# stopped run of the same settings still resumes
LATER_FIELDS = ("dataset_name", "dataset_train_split", "dataset_text_field", "judge", "judge_label", "judge_output",
                "optim", "warmup_steps")


def _finished_curves(path: Path, config: SentimentConfig) -> dict:
    """Curves an earlier, stopped run of the same settings finished (``results.partial.json``); {} otherwise."""
    try:
        partial = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    same = partial.get("config") == json.loads(json.dumps(_reuse_key(config), default=float))
    if same and partial.get("curves"):
        print(f"dpolab reproduce: reusing {len(partial['curves'])} finished curve(s) of an earlier stopped run with "
              f"the same settings ({path})", file=sys.stderr)
    return partial.get("curves", {}) if same else {}


def _stage_printer(stages: list[str], enabled: bool):
    """``say(name)`` prints "[i/n] name" with the time since the previous stage (``say(None)``: the end)."""
    state = {"t": time.perf_counter(), "t0": time.perf_counter(), "last": None}

    def say(name):
        if not enabled:
            return
        now = time.perf_counter()
        if state["last"] is not None:
            print(f"      {state['last']} done in {now - state['t']:.0f} s", file=sys.stderr, flush=True)
        if name is None:
            print(f"[dpolab reproduce] finished in {now - state['t0']:.0f} s", file=sys.stderr, flush=True)
        else:
            i = stages.index(name) + 1 if name in stages else "?"
            print(f"[dpolab reproduce {i}/{len(stages)}] {name} …", file=sys.stderr, flush=True)
        state["t"], state["last"] = now, name

    return say
