"""Where a dataset comes from: every local form ``datasets`` reads, a ``save_to_disk`` folder, or a hub id.

``train_data`` / ``eval_data`` name one of:

- a file: ``.jsonl`` (read by :func:`dpolab.data.readers.load_jsonl`, whose errors name the line), ``.json``
  (a JSON array of records, or JSON lines), ``.parquet``, ``.csv``, ``.tsv`` or ``.arrow``;
- a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``; a ``DatasetDict`` needs a
  split: ``folder:test``, the ``split`` argument, or ``default_split`` (the config's ``train_split`` /
  ``eval_split``, trl's ``dataset_train_split`` / ``dataset_test_split``, used only by sources that have splits);
- any other folder of data files that ``datasets.load_dataset`` reads (e.g. parquet shards);
- a hub id (``org/name``, optionally ``org/name:split``), loaded when the machine reaches the hub (or the local
  HF cache holds it) and refused at once, with what to do, when it cannot.

:func:`open_dataset` returns the rows as a ``datasets.Dataset`` (or, for ``.jsonl``, the checked examples);
the record forms inside (preference, prompt/completion, messages, text) are read by :mod:`dpolab.data.records`.
"""

from __future__ import annotations

from pathlib import Path

FILE_BUILDERS = {".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}
"""File suffix -> the ``datasets`` builder that reads it (``.jsonl`` has its own checked reader)."""


def split_spec(spec: str) -> tuple[str, str | None]:
    """``"data/pairs:test"`` -> ``("data/pairs", "test")``; a spec without a ``:split`` suffix -> ``(spec, None)``.

    Only a suffix without ``/`` counts as a split, so ``C:/data`` and ``./a:b/c`` stay paths.
    """
    head, sep, tail = str(spec).rpartition(":")
    if sep and head and tail and "/" not in tail and "\\" not in tail:
        return head, tail
    return str(spec), None


def _is_saved_folder(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _pick_split(data, split: str | None, where: str, default: str | None = None):
    """A ``Dataset`` from ``data``; a ``DatasetDict`` needs ``split``, else takes ``default`` or its only split."""
    if not hasattr(data, "keys"):  # already a Dataset
        if split is not None:
            raise ValueError(f"{where}: split {split!r} was asked for, but this is a single dataset with no splits")
        return data
    names = list(data.keys())
    if split is None:
        if default in names:
            return data[default]
        if len(names) == 1:
            return data[names[0]]
        missing = f" but no split {default!r}" if default is not None else ""
        raise ValueError(f"{where}: a DatasetDict with splits {names}{missing}; choose one as {where}:<split> or "
                         f"with the config field train_split / eval_split")
    if split not in data:
        raise ValueError(f"{where}: no split {split!r}; it has {names}")
    return data[split]


def open_dataset(spec: str | Path, *, split: str | None = None, num_proc: int | None = None,
                 default_split: str | None = None):
    """The rows named by ``spec`` (module docstring). A ``:split`` suffix in ``spec`` wins over ``split``, and
    both over ``default_split``, which only a source with splits uses (a single file or dataset ignores it).

    Returns a ``datasets.Dataset``, or for a ``.jsonl`` file the :class:`dpolab.data.records.ExampleList` of its
    checked rows. Raises ``FileNotFoundError`` for a local-looking path that does not exist and ``ValueError``
    (naming the spec) for anything else that cannot be read.
    """
    path_text, suffix_split = split_spec(str(spec))
    split = suffix_split or split
    path = Path(path_text)
    if path.is_dir():
        if _is_saved_folder(path):
            from datasets import load_from_disk

            return _pick_split(load_from_disk(str(path)), split, str(path), default_split)
        from datasets import load_dataset

        return _pick_split(load_dataset(str(path), num_proc=num_proc), split, str(path), default_split)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            from dpolab.data.readers import load_jsonl

            if split is not None:
                raise ValueError(f"{path}: a .jsonl file has no splits (asked for {split!r})")
            return load_jsonl(path)
        if suffix not in FILE_BUILDERS:
            raise ValueError(f"{path}: unknown data file type {suffix!r}; use one of .jsonl, "
                             f"{', '.join(FILE_BUILDERS)} or a save_to_disk folder")
        from datasets import load_dataset

        kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
        try:
            loaded = load_dataset(FILE_BUILDERS[suffix], data_files=str(path), split="train", num_proc=num_proc,
                                  **kwargs)
        except Exception as err:  # datasets raises many types; the user needs the file named
            raise ValueError(f"{path}: could not be read as {suffix[1:]} ({type(err).__name__}: {err})") from err
        if split not in (None, "train"):
            raise ValueError(f"{path}: a single file has no split {split!r}")
        return loaded
    looks_local = path_text.startswith((".", "/", "~")) or path.suffix.lower() in (*FILE_BUILDERS, ".jsonl") \
        or path_text.count("/") != 1
    if looks_local:
        raise FileNotFoundError(f"{path_text}: no such file or folder")
    return _hub_dataset(path_text, split, num_proc, default_split)


def _hub_dataset(repo_id: str, split: str | None, num_proc: int | None, default_split: str | None = None):
    """A hub dataset; on a machine that cannot reach the hub, only what the local HF cache holds."""
    import datasets.config
    from datasets import load_dataset

    from dpolab.models import hub_reachable

    offline = not hub_reachable()
    # datasets reads HF_HUB_OFFLINE once, at import: an environment variable set now would not reach it (and would
    # leak into the rest of the process), so its setting is switched for this one call and restored
    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = saved or offline
    try:
        data = load_dataset(repo_id, split=split, num_proc=num_proc)
    except Exception as err:
        if offline:
            raise ValueError(f"{repo_id}: not a local file or folder, and the hub cannot be reached from this "
                             f"machine (nor is it in the local HF cache); download it where the hub is reachable "
                             f"and pass the saved folder or file") from err
        raise ValueError(f"{repo_id}: could not be loaded from the hub ({type(err).__name__}: {err})") from err
    finally:
        datasets.config.HF_HUB_OFFLINE = saved
    return _pick_split(data, None, repo_id, default_split) if split is None else data
