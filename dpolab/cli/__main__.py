"""``python -m dpolab.cli``: the ``dpolab`` command (``torchrun -m dpolab.cli train ...`` starts it this way)."""

from dpolab.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
