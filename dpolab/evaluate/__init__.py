"""Evaluation: win rates with their uncertainty, ratings of many models, the reward–KL frontier, saved rows.

- :mod:`~dpolab.evaluate.win_rates`: win rate of A over B (ties ½, paired bootstrap), length-controlled win rate,
  held-out preference accuracy;
- :mod:`~dpolab.evaluate.rank`: Bradley–Terry ratings with bootstrap intervals, Elo, Kendall's τ, the best run of a
  sweep; its table of comparisons (:mod:`~dpolab.evaluate.comparisons`) and logistic fit
  (:mod:`~dpolab.evaluate.logistic`);
- :mod:`~dpolab.evaluate.scores`: per-prompt scores as checked arrays, aligned by label;
- :mod:`~dpolab.evaluate.frontier`: each method's reward–KL frontier and comparisons at matched KL;
- :mod:`~dpolab.evaluate.results`: evaluated models as typed rows saved one per JSON file.

The documented entry points ``dpolab.evaluate.win_rate`` and ``dpolab.evaluate.bradley_terry`` (and every other
public function of the former ``dpolab/evaluate.py``) are re-exported here.
"""

from dpolab.evaluate.rank import bradley_terry, kendall_tau, online_elo, select_best
from dpolab.evaluate.win_rates import (
    implicit_preference_accuracy,
    implicit_reward_win_rate,
    judge_win_rate,
    length_controlled_win_rate,
    outcomes,
    preference_accuracy,
    summarise_preferences,
    wilson_interval,
    win_rate,
)

__all__ = ["bradley_terry", "implicit_preference_accuracy", "implicit_reward_win_rate", "judge_win_rate",
           "kendall_tau", "length_controlled_win_rate", "online_elo", "outcomes", "preference_accuracy",
           "select_best", "summarise_preferences", "wilson_interval", "win_rate"]
