"""The paper's controlled-sentiment experiment (§6.1, Fig. 2 left) on the embedded default, as named stages.

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

:func:`run` calls the stages in order: :func:`reference_stage` (π_ref, the pairs, π_ref's held-out samples and
row), :func:`offline_stage` (DPO over β, Preferred-FT, Unlikelihood on the pairs), :func:`reward_model_stage` (the
RLHF pipeline's reward model on the same pairs, when an arm reads it), :func:`online_stage` (RLOO, PPO, online
DPO) and :func:`finish` (the results file, the model rows, the figure). Every curve goes through one
:class:`CurveRecorder`.

The settings are :class:`dpolab.experiments.sentiment.config.SentimentConfig` (defaults: the small CPU run, minutes
on two cores; ``configs/sentiment_full.yaml`` is the full one). The other parts live beside this module: π_ref and
the prefixes (``setup``), π_ref's samples and pairs (``samples``), the trained policies and the SFT on reviews
(``policies``), evaluation (``evaluation``, ``curves``) and the results file (``report``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from dpolab.data.cache import atomic_write_text, from_repo_root
from dpolab.evaluate.results import save_model_row
from dpolab.experiments.sentiment import curves
from dpolab.experiments.sentiment.config import RL_METHODS, SentimentConfig
from dpolab.experiments.sentiment.policies import (
    train_dpo,
    train_online_dpo,
    train_ppo,
    train_preferred_ft,
    train_reward_model_on_pairs,
    train_rloo,
    train_unlikelihood,
)
from dpolab.experiments.sentiment.report import assemble, write_results
from dpolab.experiments.sentiment.samples import make_pairs
from dpolab.experiments.sentiment.setup import Setup, prepare, temperature_sweep

OFFLINE_ARMS = (("preferred_ft", "Preferred-FT"), ("unlikelihood", "Unlikelihood"))
"""The offline arms besides DPO: method key and curve name."""
REWARD_MODEL_METHODS = {"rloo_rm", "ppo_rm", "reward_model", "online_dpo_rm"}
"""Methods that need the RLHF pipeline's reward model."""


def run(config: SentimentConfig | None = None, **overrides) -> dict:
    """The whole experiment: every method's reward–KL curve, the matched-KL comparisons, the results file.

    Returns ``{"results", "table", "figure", "timings", "pair_stats"}``; ``results`` is the dict written to
    ``output_dir/results.json`` (and to ``config.results`` when set), in the format that
    :func:`dpolab.experiments.sentiment.report.from_results` reads. The last checkpoint of every curve and the
    Best-of-N rows are also saved with :func:`dpolab.evaluate.results.save_model_row` under ``output_dir/models``
    for ranking.
    """
    config = dataclasses.replace(config or SentimentConfig(), **overrides)
    say = _stage_printer(stage_names(config), config.progress)
    t0 = time.perf_counter()
    setup, pairs, metadata = reference_stage(config, say)
    recorder = CurveRecorder.start(setup, say)
    offline_stage(recorder, pairs)
    judge, reward_model_summary = None, None
    if REWARD_MODEL_METHODS & set(setup.config.methods):
        judge, reward_model_summary = reward_model_stage(setup, pairs, say)
    online_stage(recorder, judge)
    return finish(recorder, metadata, reward_model_summary, started=t0)


def stage_names(config: SentimentConfig) -> list[str]:
    """The names of the stages that ``config`` runs, in order, as the progress lines number them."""
    seeds = config.train_seeds or (config.seed,)
    stages = ["load + SFT", "preference pairs", "π_ref held-out samples"]
    if "dpo" in config.methods:
        stages += [curve_name(f"DPO β={b:g}", s, config) for b in config.betas for s in seeds]
    stages += [curve_name(name, s, config) for key, name in OFFLINE_ARMS if key in config.methods for s in seeds]
    stages += ["reward model"] if REWARD_MODEL_METHODS & set(config.methods) else []
    for key, arm in RL_METHODS.items():
        knobs, _, label, *_ = _rl_arm(config, key)
        stages += [curve_name(f"{arm} {label} {k:g}", s, config) for k in knobs for s in seeds] \
            if key in config.methods else []
    return stages


def curve_name(name: str, seed: int, config: SentimentConfig) -> str:
    """A curve's name: with its training seed when that is not the experiment's ``seed``."""
    return name if seed == config.seed else f"{name} seed {seed}"


def reference_stage(config: SentimentConfig, say: Callable) -> tuple[Setup, list, dict]:
    """π_ref (after the optional SFT on reviews), the preference pairs from its samples, its held-out samples and
    its checkpoint row. Returns ``(setup, pairs, pair metadata)``."""
    say("load + SFT")
    setup = prepare(config)
    say("preference pairs")
    _, pairs, metadata = make_pairs(setup)
    say("π_ref held-out samples")
    t = time.perf_counter()
    setup.heldout_samples()
    setup.timings["reference_samples"] = time.perf_counter() - t
    setup.reference_row = curves.reference_curve_row(setup)
    if setup.config.progress:
        r = setup.reference_row
        print(f"    π_ref: reward {r['reward']:.6f} ± {r['reward_se']:.6f} over {len(r['prompt_rewards'])} prefixes",
              file=sys.stderr, flush=True)
    return setup, pairs, metadata


@dataclass
class CurveRecorder:
    """The rows, learning curves and temperature sweeps of the experiment's curves, one :meth:`trace` per curve;
    each finished curve is written to ``results.partial.json`` at once, so a run stopped later keeps it and its
    rerun with the same settings reuses it (``finished``)."""

    setup: Setup
    say: Callable
    rows: list[dict]
    partial_path: Path
    finished: dict = field(default_factory=dict)  # curves of an earlier stopped run of the same settings, by name
    learning_curves: dict = field(default_factory=dict)
    sweeps: dict = field(default_factory=dict)  # temperature win rates, by curve name (and "π_ref")
    saved: dict = field(default_factory=dict)  # the finished curves of this run, as results.partial.json holds them

    @classmethod
    def start(cls, setup: Setup, say: Callable) -> CurveRecorder:
        """π_ref's row and the Best-of-N rows, π_ref's temperature sweep, and the curves a stopped run finished."""
        config, timings = setup.config, setup.timings
        recorder = cls(setup, say, rows=[setup.reference_row, *curves.best_of_n_curve_rows(setup, config.best_of_n)],
                       partial_path=setup.out / "results.partial.json")
        if config.win_rate_temperatures:
            t = time.perf_counter()
            recorder.sweeps["π_ref"] = temperature_sweep(setup, setup.reference)
            timings["evaluation: temperature win rates"] = time.perf_counter() - t
        recorder.finished = _finished_curves(recorder.partial_path, config)
        return recorder

    def trace(self, method: str, knob: float, name: str, train_fn: Callable, every: int, steps: int, seed: int,
              **row_fields) -> None:
        """Train one curve (``train_fn(on_step=...)`` returns ``(policy, history or TrainResult)``) with training
        seed ``seed``, evaluating at the checkpoint steps; record train and eval seconds apart. ``row_fields``: the
        rows' extra fields, a value or a function of the step."""
        setup, config, timings = self.setup, self.setup.config, self.setup.timings
        name = curve_name(name, seed, config)
        row_fields["train_seed"] = seed
        self.say(name)
        if name in self.finished:  # measured by an earlier run of the same settings that stopped later
            self._reuse(name)
            return
        at = curves.checkpoint_steps(steps, every)

        def fields(step: int) -> dict:
            return {key: value(step) if callable(value) else value for key, value in row_fields.items()}

        points = [_seeded({**curves.start_row(setup.reference_row, method, knob), **fields(0)}, seed, config.seed)]
        spent = {"eval": 0.0}

        def on_step(policy, step, record):
            if step not in at:
                return
            started = time.perf_counter()
            points.append(curves.evaluate_checkpoint(
                setup, policy, method, knob, step, pair_accuracy=step == steps or config.heldout_acc_every_eval))
            points[-1] = _seeded({**points[-1], **fields(step)}, seed, config.seed)
            spent["eval"] += time.perf_counter() - started
            for part, seconds in points[-1]["eval_seconds"].items():
                key = f"evaluation: {part} (all curves)"
                timings[key] = timings.get(key, 0.0) + seconds
            if config.progress:
                r = points[-1]
                print(f"    step {step}: reward {r['reward']:.3f} ± {r['reward_se']:.3f}, "
                      f"KL {r['kl']:.2f} ± {r['kl_se']:.2f}, gain {r['gain']:+.3f} ± {r['gain_se']:.3f}",
                      file=sys.stderr, flush=True)

        started = time.perf_counter()
        policy, result = train_fn(on_step=on_step)
        timings[f"{name} (train)"] = time.perf_counter() - started - spent["eval"]
        if config.win_rate_temperatures:
            started = time.perf_counter()
            self.sweeps[name] = temperature_sweep(setup, policy)
            timings["evaluation: temperature win rates"] = (timings.get("evaluation: temperature win rates", 0.0)
                                                            + time.perf_counter() - started)
        history = getattr(result, "history", result)
        key = points[-1]["policy"].rsplit("_step", 1)[0]
        self.learning_curves[key] = [{k: v for k, v in record.items() if isinstance(v, int | float)
                                      and not isinstance(v, bool)} for record in history]
        self.rows.extend(points)
        self.saved[name] = {"rows": points, "key": key, "learning_curve": self.learning_curves[key],
                            "train_seconds": timings[f"{name} (train)"], "temperature_win_rates": self.sweeps.get(name)}
        atomic_write_text(self.partial_path, json.dumps({"config": _reuse_key(config), "curves": self.saved},
                                                        default=float))

    def _reuse(self, name: str) -> None:
        """Take the curve ``name`` as an earlier stopped run finished it."""
        done = self.finished[name]
        self.rows.extend(done["rows"])
        self.learning_curves[done["key"]] = done["learning_curve"]
        self.setup.timings[f"{name} (train, reused from an earlier run)"] = done["train_seconds"]
        if done.get("temperature_win_rates"):
            self.sweeps[name] = done["temperature_win_rates"]
        self.saved[name] = done


def offline_queries(config: SentimentConfig) -> int:
    """Ground-truth reward queries behind the offline methods: every sample of π_ref that was scored to make pairs."""
    return config.n_train_prompts * config.samples_per_prompt


def offline_stage(recorder: CurveRecorder, pairs: list) -> None:
    """DPO at every β, Preferred-FT and Unlikelihood on π_ref's preference pairs, each for every training seed."""
    setup = recorder.setup
    config = setup.config
    seeds = config.train_seeds or (config.seed,)
    epoch_steps = max(1, len(pairs) // config.batch_size)  # steps in one pass (both trainers drop a short batch)
    pair_steps = config.steps if config.num_train_epochs <= 0 else math.ceil(config.num_train_epochs * epoch_steps)
    offline = {"reward_source": "pairs (ground truth)", "reward_queries": offline_queries(config),
               "epoch": lambda step: step / epoch_steps}
    if "dpo" in config.methods:
        for beta in config.betas:
            for seed in seeds:
                recorder.trace("DPO", beta, f"DPO β={beta:g}",
                               partial(train_dpo, setup, pairs, beta, steps=pair_steps, seed=seed),
                               config.eval_every, pair_steps, seed, **offline)
    trainers = {"preferred_ft": train_preferred_ft, "unlikelihood": train_unlikelihood}
    for key, method in OFFLINE_ARMS:
        if key in config.methods:
            for seed in seeds:
                recorder.trace(method, 0.0, method, partial(trainers[key], setup, pairs, steps=pair_steps, seed=seed),
                               config.eval_every, pair_steps, seed, **offline)


def reward_model_stage(setup: Setup, pairs: list, say: Callable):
    """The RLHF pipeline's reward model, trained on the same pairs. Returns ``(judge, summary)``."""
    say("reward model")
    t = time.perf_counter()
    judge, summary = train_reward_model_on_pairs(setup, pairs)
    setup.timings["reward model (train + held-out accuracy)"] = time.perf_counter() - t
    if setup.config.progress:
        r = summary
        print(f"    reward model: held-out pair accuracy {r['heldout_acc']:.3f} ± {r['heldout_acc_se']:.3f} "
              f"(best epoch {r['best_epoch']:g}; last {r['last_heldout_acc']:.3f})", file=sys.stderr, flush=True)
    return judge, summary


def online_stage(recorder: CurveRecorder, judge=None) -> None:
    """The on-policy arms (RLOO, PPO, online DPO), on the ground truth or (``*_rm``) on the reward model ``judge``,
    at every knob and training seed."""
    setup = recorder.setup
    config = setup.config
    seeds, queries = config.train_seeds or (config.seed,), offline_queries(config)
    for key, arm in RL_METHODS.items():
        if key not in config.methods:
            continue
        knobs, train_fn, label, every, steps, per_step = _rl_arm(config, key)
        reads_rm = key.endswith("_rm")
        source = {"reward_source": "reward model" if reads_rm else "ground truth",
                  # a learned reward model costs no ground-truth query beyond the pairs it learned from
                  "reward_queries": ((lambda step, n=queries: n) if reads_rm
                                     else (lambda step, n=per_step: step * n))}
        for knob in knobs:
            for seed in seeds:
                recorder.trace(arm, knob, f"{arm} {label} {knob:g}",
                               partial(train_fn, setup, knob, reward_fn=judge if reads_rm else None, seed=seed),
                               every, steps, seed, **source)


def finish(recorder: CurveRecorder, metadata: dict, reward_model_summary: dict | None, *, started: float) -> dict:
    """Timings, the results file (and ``config.results``, ``config.figure``), the model rows for ranking; the
    partial file goes once the whole run is in the results file."""
    setup = recorder.setup
    config, timings = setup.config, setup.timings
    total = time.perf_counter() - started
    timings["other (model copies, bookkeeping)"] = total - sum(timings.values())
    timings["total"] = total
    results = assemble(config, recorder.rows, recorder.learning_curves, timings, metadata.get("stats"))
    if reward_model_summary is not None:
        results["reward_model"] = reward_model_summary
    if recorder.sweeps:
        results["temperature_win_rates"] = recorder.sweeps
    recorder.partial_path.unlink(missing_ok=True)  # the whole run is in the results file now
    for row in results["policies"]:  # Best-of-N rows are on π_ref's held-out prefixes, and name none of their own
        if row["method"] == "Best of N" or (row["method"] != "Reference" and row.get("final")):
            save_model_row({"prompts": setup.reference_row["prompts"], **row}, setup.out / "models", source="sentiment")
    paths = write_results(results, setup.out / "results.json", from_repo_root(config.results) if config.results else None,
                          from_repo_root(config.figure) if config.figure else None)
    recorder.say(None)
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
