"""Before any work: every hub id a run needs, checked at once, so that a machine without the hub (or without one of
them in its local Hugging Face cache) is told all the missing ids in one error instead of failing on the first one
after minutes of loading.

A name is a *hub id* when it is not a local file or folder, not a built-in name (``vader``, ``tiny-gpt2``, the
embedded default model, ...), and does not look like a path. When the hub is reachable, hub ids are left to the
loaders; when it is not (no network, or ``HF_HUB_OFFLINE=1``), each must be in the local cache.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    """One thing a run loads: the config field that names it, the name, and its hub repository type."""

    field: str
    name: str
    repo_type: str = "model"  # "model" or "dataset"


class MissingSourcesError(OSError):
    """Some sources a run needs are neither local nor reachable; the message lists every one."""


def is_hub_id(name: str, builtin: Iterable[str] = ()) -> bool:
    """Whether ``name`` would be looked up on the hub (not empty, built in, an existing path, or path-like)."""
    from dpolab.models import looks_local

    return bool(name) and name not in set(builtin) and not Path(name).expanduser().exists() and not looks_local(name)


def in_local_cache(repo_id: str, repo_type: str = "model") -> bool:
    """Whether the local Hugging Face cache holds a snapshot of ``repo_id`` (or, for a dataset, ``datasets``' own
    cache holds a prepared copy)."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, repo_type=repo_type, local_files_only=True)
        return True
    except Exception:  # LocalEntryNotFoundError, or an id that is not a valid repository name
        pass
    if repo_type == "dataset":
        import datasets.config

        return (Path(datasets.config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")).is_dir()
    return False


def check_sources(sources: Iterable[Source], builtin: Iterable[str] = ()) -> None:
    """Raise :class:`MissingSourcesError` naming every source that cannot be loaded here: a local-looking path that
    does not exist, or a hub id while the hub is unreachable and the local cache lacks it."""
    from dpolab.models import hub_endpoint, hub_reachable, looks_local

    builtin = set(builtin)
    missing, reachable = [], None
    for s in sources:
        if not s.name or s.name in builtin or Path(s.name).expanduser().exists():
            continue
        if looks_local(s.name):
            missing.append(f"{s.field}: {s.name!r} is no such file or folder")
            continue
        if reachable is None:
            reachable = hub_reachable()
        if not reachable and not in_local_cache(s.name, s.repo_type):
            missing.append(f"{s.field}: hub {s.repo_type} {s.name!r} is not in the local Hugging Face cache")
    if missing:
        where = "" if reachable is None or reachable else f" and the hub ({hub_endpoint()}) cannot be reached"
        raise MissingSourcesError(
            f"{len(missing)} source(s) this run needs cannot be loaded here{where}:\n  " + "\n  ".join(missing)
            + "\nDownload them where the hub is reachable (huggingface-cli download ID; for a dataset, "
              "--repo-type dataset) and copy the cache, or give local folders/files in these fields.")
