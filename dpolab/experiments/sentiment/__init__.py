"""The controlled-sentiment experiment (paper §6.1, Fig. 2 left): π_ref's samples labelled by VADER, every arm's
reward–KL curve, the matched-KL comparisons, the results files.

- :mod:`~dpolab.experiments.sentiment.config`: :class:`SentimentConfig`, the settings;
- :mod:`~dpolab.experiments.sentiment.setup`: π_ref, its prefixes and judges (:func:`prepare`), evaluation against it;
- :mod:`~dpolab.experiments.sentiment.samples`: π_ref's samples, the preference pairs, the held-out samples;
- :mod:`~dpolab.experiments.sentiment.policies`: every arm's trained policy (DPO, Preferred-FT, Unlikelihood, RLOO,
  PPO, online DPO, the reward model, the SFT on reviews);
- :mod:`~dpolab.experiments.sentiment.evaluation`, :mod:`~dpolab.experiments.sentiment.curves`: rows of evaluated
  policies and checkpoints;
- :mod:`~dpolab.experiments.sentiment.pipeline`: :func:`run`, the whole experiment as named stages;
- :mod:`~dpolab.experiments.sentiment.report`: the results file, its tables and figure (``dpolab reproduce``);
- :mod:`~dpolab.experiments.sentiment.data_axis`: offline DPO by amount of data against the on-policy arms.

The names notebooks call (``from dpolab.experiments import sentiment as exp``) are re-exported here.
"""

from dpolab.experiments.sentiment.config import SentimentConfig
from dpolab.experiments.sentiment.pipeline import run
from dpolab.experiments.sentiment.policies import train_dpo, train_preferred_ft
from dpolab.experiments.sentiment.samples import make_pairs
from dpolab.experiments.sentiment.setup import (
    Setup,
    evaluate,
    make_prefixes,
    prepare,
    reference_rows,
    temperature_sweep,
)

__all__ = ["Setup", "SentimentConfig", "evaluate", "make_pairs", "make_prefixes", "prepare", "reference_rows", "run",
           "temperature_sweep", "train_dpo", "train_preferred_ft"]
