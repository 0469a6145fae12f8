"""``python -m dpolab``: the ``dpolab`` command."""

from dpolab.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
