"""``python -m dpolab``: the ``dpolab`` command."""

from dpolab.cli.main import main

raise SystemExit(main())
