"""The record of one sweep: its grid, its fixed parameters, and what became of every point.

``dpolab sweep`` keeps one JSON manifest in the sweep's output folder (``<out>/manifest.json``), rewritten
atomically after every point, so an interrupted sweep still says which points finished::

    {"format": "dpolab.sweep/1", "notebook": "...", "grid": {"beta": [0.05, 0.1]}, "fixed": {...},
     "first_only": {...}, "points": [
        {"parameters": {"beta": 0.05, "baselines": true}, "status": "completed", "output": "...ipynb",
         "error": null, "seconds": 41.2, "rows": [{"path": "runs/03_beta_sweep/models/...json", "sha256": "..."}]},
        ...]}

A point's ``status`` is ``pending`` (not started), ``running`` (started and not finished: the sweep was stopped),
``completed`` or ``failed`` (with ``error``). Its ``rows`` are the model-row files
(:func:`dpolab.evaluate.results.save_model_row`) that were created or rewritten in its models folder while it ran, with their SHA-256; they are how
:func:`dpolab.cli.sweep.collect` reads this sweep's results and no stale row of an earlier run. Points that run at the
same time (``--jobs``) may each list the rows of the others: the sweep's results are the union over its completed
points either way.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dpolab.data.cache import REPO_ROOT, atomic_write_text, from_repo_root, sha256_file

FORMAT = "dpolab.sweep/1"
MANIFEST_NAME = "manifest.json"
STATUSES = ("pending", "running", "completed", "failed")


@dataclass
class Point:
    """One grid point: the parameters that differ between points, and its outcome."""

    parameters: dict
    output: str
    """The executed copy of the notebook (written also when the point fails: it shows the failing cell)."""
    status: str = "pending"
    error: str | None = None
    seconds: float | None = None
    rows: list[dict] = field(default_factory=list)
    """``{"path", "sha256"}`` of each model-row file written while the point ran."""


@dataclass
class Manifest:
    """A sweep's grid, fixed parameters and points, saved as ``folder/manifest.json``."""

    folder: Path
    notebook: str
    grid: dict
    fixed: dict
    first_only: dict
    points: list[Point]

    @property
    def path(self) -> Path:
        """Where the manifest is saved."""
        return self.folder / MANIFEST_NAME

    def to_dict(self) -> dict:
        """The JSON object of the file (module docstring)."""
        return {"format": FORMAT, "notebook": self.notebook, "grid": self.grid, "fixed": self.fixed,
                "first_only": self.first_only, "points": [asdict(p) for p in self.points]}

    def save(self) -> Path:
        """Write the manifest atomically (a reader never sees half a file) and return its path."""
        atomic_write_text(self.path, json.dumps(self.to_dict(), indent=1, default=str) + "\n")
        return self.path

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        """The manifest saved in ``folder``; FileNotFoundError when there is none, ValueError when it is not one."""
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no sweep manifest ({MANIFEST_NAME}); run `dpolab sweep ... --out "
                                    f"{folder}` first")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}, field 'format': expected {FORMAT!r}, got "
                             f"{data.get('format') if isinstance(data, dict) else type(data).__name__!r}")
        points = []
        for i, p in enumerate(data["points"]):
            if p.get("status") not in STATUSES:
                raise ValueError(f"{path}, point {i}, field 'status': {p.get('status')!r} is not one of {STATUSES}")
            points.append(Point(**p))
        return cls(folder, data["notebook"], data["grid"], data["fixed"], data.get("first_only") or {}, points)

    def differences(self, other: Manifest) -> list[str]:
        """Why ``other`` is not a continuation of this sweep: another notebook or other fixed parameters."""
        return [f"{key}: recorded {getattr(self, key)!r}, now {getattr(other, key)!r}"
                for key in ("notebook", "fixed", "first_only") if _jsonable(getattr(self, key)) !=
                _jsonable(getattr(other, key))]

    def completed(self, parameters: dict) -> Point | None:
        """The completed point with these parameters whose executed copy still exists, else None."""
        wanted = _jsonable(parameters)
        for p in self.points:
            if p.status == "completed" and _jsonable(p.parameters) == wanted and from_repo_root(p.output).is_file():
                return p
        return None


def _jsonable(value):
    """``value`` as it reads back from the manifest (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value, default=str))


def repo_relative(path: Path) -> str:
    """``path`` relative to the repository root when it lies inside it (manifests stay valid in a moved checkout),
    else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def row_files(folder: Path | None) -> dict[str, tuple[int, int, int]]:
    """The model-row files of ``folder``, each with (inode, mtime in ns, size): a file rewritten atomically (a new
    file renamed into place) gets a new inode or mtime, even when its content is the same."""
    if folder is None or not Path(folder).is_dir():
        return {}
    files = {}
    for path in sorted(Path(folder).glob("*.json")):
        stat = path.stat()
        files[path.name] = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
    return files


def written_rows(folder: Path | None, before: dict[str, tuple[int, int, int]]) -> list[dict]:
    """``{"path", "sha256"}`` of the row files of ``folder`` that are new or rewritten since ``before``
    (:func:`row_files`)."""
    if folder is None:
        return []
    after = row_files(folder)
    return [{"path": repo_relative(Path(folder) / name), "sha256": sha256_file(Path(folder) / name)}
            for name, stat in after.items() if before.get(name) != stat]
