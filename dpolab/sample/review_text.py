"""Review texts for the sentiment experiment: the embedded snippets, or any dataset of IMDb's shape (``text``,
``label``) from the hub or a local file, read the same way.

The paper's §6.1 draws its prompts from IMDb (``stanfordnlp/imdb`` on the hub, 25,000 training reviews); on a
machine without a hub the embedded Rotten Tomatoes snippets (:func:`dpolab.sample.sentiment.review_snippets`) take
their place. A local ``.parquet``, ``.csv``, ``.tsv``, ``.json``/``.jsonl`` or ``.arrow`` file, a ``save_to_disk``
folder, or a folder of data files works as the hub id does (:func:`dpolab.data.sources.open_dataset`); only the
text column is read, so the ``label`` column may be there or not.
"""

from __future__ import annotations

import re
from pathlib import Path

EMBEDDED = ""
"""``dataset_name`` of the embedded review snippets (the default)."""

_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)  # IMDb's reviews carry HTML line breaks


def review_texts(dataset_name: str = EMBEDDED, split: str = "train", text_field: str = "text") -> list[str]:
    """The texts of ``dataset_name``'s ``split`` (column ``text_field``), HTML line breaks turned into spaces.

    Raises ``ValueError`` naming the source and the field when the column is missing or a row has no text.
    """
    if dataset_name == EMBEDDED:
        from dpolab.sample.sentiment import review_snippets

        return list(review_snippets()["text"])
    data = _open(dataset_name, split)
    columns = list(getattr(data, "column_names", []) or [])
    if text_field not in columns:
        raise ValueError(f"{dataset_name}: no column {text_field!r} (columns: {columns}); set dataset_text_field")
    texts = []
    for row, text in enumerate(data[text_field]):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{dataset_name}, row {row}, field {text_field!r}: no text ({text!r:.40})")
        texts.append(" ".join(_HTML_BREAK.sub(" ", text).split()))
    return texts


def _open(dataset_name: str, split: str):
    """A ``datasets.Dataset``; a ``.jsonl`` file is read as plain JSON lines (it holds texts, not preference rows)."""
    path = Path(dataset_name)
    if path.is_file() and path.suffix.lower() == ".jsonl":
        from datasets import load_dataset

        return load_dataset("json", data_files=str(path), split="train")
    from dpolab.data.sources import open_dataset

    return open_dataset(dataset_name, default_split=split)
