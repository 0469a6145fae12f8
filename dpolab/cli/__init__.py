"""The top layer: the ``dpolab`` command (:mod:`~dpolab.cli.main`) and what it runs notebooks with.

- :mod:`~dpolab.cli.main`: the subcommands (``train``, ``reproduce``, ``sweep``, ``notebooks``, ``course``, ...);
- :mod:`~dpolab.cli.sweep`, :mod:`~dpolab.cli.sweep_manifest`: papermill per grid point, the sweep's manifest;
- :mod:`~dpolab.cli.notebook_output`: executing a notebook quietly, its figures, its HTML copy;
- :mod:`~dpolab.cli.notebook_params`: the check of a notebook's parameters cell.

``python -m dpolab.cli`` (what ``torchrun`` starts) and ``python -m dpolab`` are the ``dpolab`` console script.
Importing this package imports no library module: every subcommand imports what it needs when it runs.
"""

from dpolab.cli.main import main

__all__ = ["main"]
