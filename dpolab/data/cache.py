"""Where dpolab keeps derived artifacts, and how it writes them so a crash never leaves a bad one.

Everything dpolab derives (the dequantised default model, the parsed review snippets, reference
log-probs) lives under one cache folder: ``$DPOLAB_CACHE`` if set, else ``~/.cache/dpolab``.
An artifact is built in a temporary sibling folder and renamed into place only when complete,
under a file lock so two processes never build the same artifact at once. A folder without its
``COMPLETE`` marker is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

COMPLETE_MARKER = "COMPLETE"
REPO_ROOT = Path(__file__).resolve().parents[2]
"""The repository root: relative paths of notebooks, configs and results resolve from here, because nbval runs a
notebook in its own folder and papermill in the caller's."""


def from_repo_root(path: str | Path) -> Path:
    """``path`` itself when absolute, else the same path under :data:`REPO_ROOT`."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


def cache_dir() -> Path:
    """The root cache folder (``$DPOLAB_CACHE`` or ``~/.cache/dpolab``), created if missing."""
    root = Path(os.environ.get("DPOLAB_CACHE", Path.home() / ".cache" / "dpolab")).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"dpolab cache folder {root} cannot be created ({err}); set DPOLAB_CACHE to a writable folder") from err
    return root


def is_complete(folder: Path) -> bool:
    """True when ``folder`` was fully written (it carries the completion marker)."""
    return (folder / COMPLETE_MARKER).is_file()


def build_artifact(folder: Path, build: Callable[[Path], None], info: dict | None = None) -> Path:
    """Build ``folder`` once, atomically, under a lock; return it.

    ``build(tmp)`` writes the artifact's files into an empty temporary folder next to ``folder``.
    Only when it returns is the folder renamed into place and marked complete, so an interrupted
    build leaves at most a stray temporary folder (removed on the next attempt), never a folder
    that a later run mistakes for a good artifact. An incomplete ``folder`` is rebuilt.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if is_complete(folder):
            return folder
        for stale in folder.parent.glob(folder.name + ".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if folder.exists():  # a folder without marker: half-written by an older layout; never trust it
            shutil.rmtree(folder)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; a cache is shared by the user's processes
            (tmp / COMPLETE_MARKER).write_text(json.dumps(info or {}, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return folder


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (never a torn file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
