"""The documented entry point ``dpolab.trainer.train``; the loop lives in :mod:`dpolab.train.trainer`."""

from dpolab.train.trainer import train

__all__ = ["train"]
