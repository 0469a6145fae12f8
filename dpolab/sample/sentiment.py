"""The embedded sentiment material: Rotten Tomatoes review snippets with human ratings, VADER and TextBlob.

The 10,605 snippets (each with the mean of about 20 human sentiment ratings on [-4, 4]) ship inside
the *source* distribution of ``vaderSentiment==3.3.2`` as
``additional_resources/hutto_ICWSM_2014.tar.gz`` → ``movieReviewSnippets_GroundTruth.txt``
(lines ``id<TAB>rating<TAB>text``). The source archive is fetched once from the package registry
with ``pip download``, both archives are checked against known SHA-256 sums, and the parsed table
is cached as a ``datasets`` folder.

Reward functions map a list of texts to a float array of scores: VADER's compound score in
[-1, 1] is the ground-truth reward of the sentiment experiment; TextBlob's polarity in [-1, 1] is
an independent second judge.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dpolab.data.cache import build_artifact, cache_dir, sha256_file

VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
INNER_ARCHIVE_SHA256 = "d5bb07d87474b3eb8d30b4deccbc23f19d742a6c5718fbacc65485b70b95c5fa"
SNIPPETS_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
N_SNIPPETS = 10605


def _fetch_sdist(dest: Path) -> Path:
    """Download the vaderSentiment source archive into ``dest`` (package registry only) and verify it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "vaderSentiment==3.3.2",
           "-d", str(dest), "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    path = dest / VADER_SDIST
    if result.returncode != 0 or not path.is_file():
        raise RuntimeError(
            "could not fetch the vaderSentiment 3.3.2 source archive from the package registry "
            f"(command: {' '.join(cmd)}): {result.stderr.strip()[-500:]}. Check that PyPI is reachable, or place "
            f"{VADER_SDIST} in {dest} by hand."
        )
    return path


def _verify(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise ValueError(f"{path}: SHA-256 {actual} does not match the expected {expected}; delete it and retry")


def parse_snippets(raw: bytes, source: str = SNIPPETS_MEMBER) -> list[dict]:
    """Parse ``id<TAB>rating<TAB>text`` lines into records; a malformed line names its row and field."""
    records = []
    for row, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise ValueError(f"{source}, row {row}: expected 3 tab-separated fields id/rating/text, got {len(parts)}")
        try:
            rating = float(parts[1])
        except ValueError as err:
            raise ValueError(f"{source}, row {row}, field 'rating': {parts[1]!r} is not a number") from err
        text = parts[2].strip()
        if not text:
            raise ValueError(f"{source}, row {row}, field 'text': empty")
        records.append({"id": int(parts[0]), "text": text, "human_rating": rating})
    return records


def _build_snippets(out: Path) -> None:
    from datasets import Dataset

    from dpolab.sample.pairs import save_dataset

    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    sdist = downloads / VADER_SDIST
    if not sdist.is_file():
        sdist = _fetch_sdist(downloads)
    _verify(sdist, VADER_SDIST_SHA256)
    with tarfile.open(sdist, "r:gz") as outer:
        inner_bytes = outer.extractfile(INNER_ARCHIVE).read()
    with tempfile.NamedTemporaryFile(suffix=".tar.gz") as tmp:
        tmp.write(inner_bytes)
        tmp.flush()
        _verify(Path(tmp.name), INNER_ARCHIVE_SHA256)
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        raw = inner.extractfile(SNIPPETS_MEMBER).read()
    records = parse_snippets(raw)
    save_dataset(Dataset.from_list(records), out)


def review_snippets():
    """The movie-review snippets as a ``datasets.Dataset`` with columns ``id``, ``text``, ``human_rating``."""
    from datasets import load_from_disk

    folder = build_artifact(cache_dir() / "data" / "movie_review_snippets", _build_snippets,
                            info={"sdist_sha256": VADER_SDIST_SHA256, "member": SNIPPETS_MEMBER})
    return load_from_disk(str(folder))


_VADER = None


def vader_reward(texts: Sequence[str]) -> np.ndarray:
    """VADER compound sentiment in [-1, 1] for each text (the ground-truth reward). Shape: (len(texts),)."""
    global _VADER
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _VADER = SentimentIntensityAnalyzer()
    return np.array([_VADER.polarity_scores(t)["compound"] for t in texts], dtype=np.float64)


def textblob_reward(texts: Sequence[str]) -> np.ndarray:
    """TextBlob pattern-lexicon polarity in [-1, 1] (an independent second judge). Shape: (len(texts),)."""
    from textblob import TextBlob

    return np.array([TextBlob(t).sentiment.polarity for t in texts], dtype=np.float64)


REWARD_FUNCTIONS = {"vader": vader_reward, "textblob": textblob_reward}
