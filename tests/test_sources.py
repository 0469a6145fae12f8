"""dpolab.data.sources: every local dataset form, splits, and a hub id refused fast offline."""

import json

import pytest
from datasets import Dataset, DatasetDict

from dpolab.data.sources import open_dataset, split_spec

ROWS = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]


def rows_of(data):
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in data]


@pytest.mark.parametrize("spec, expected", [
    ("data/pairs:test", ("data/pairs", "test")),
    ("data/pairs", ("data/pairs", None)),
    ("C:/data/pairs", ("C:/data/pairs", None)),
    ("./a:b/c", ("./a:b/c", None)),
    ("org/name:validation", ("org/name", "validation")),
])
def test_split_spec(spec, expected):
    assert split_spec(spec) == expected


def test_every_local_file_form_reads_the_same_rows(tmp_path):
    ds = Dataset.from_list(ROWS)
    (tmp_path / "a.json").write_text(json.dumps(ROWS))  # a JSON array
    ds.to_parquet(tmp_path / "a.parquet")
    ds.to_csv(tmp_path / "a.csv", index=False)
    ds.to_csv(tmp_path / "a.tsv", index=False, sep="\t")
    ds.save_to_disk(tmp_path / "saved")
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for name in ("a.json", "a.parquet", "a.csv", "a.tsv", arrow):
        assert rows_of(open_dataset(tmp_path / name)) == ROWS, name
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    examples = open_dataset(tmp_path / "a.jsonl")
    assert [(e.prompt, e.chosen, e.rejected) for e in examples] == [tuple(r.values()) for r in ROWS]
    with pytest.raises(ValueError, match="a.jsonl: a .jsonl file has no splits"):
        open_dataset(f"{tmp_path / 'a.jsonl'}:test")


def test_saved_folders_and_splits(tmp_path):
    Dataset.from_list(ROWS).save_to_disk(tmp_path / "one")
    assert rows_of(open_dataset(tmp_path / "one")) == ROWS
    DatasetDict({"train": Dataset.from_list(ROWS[:3]), "test": Dataset.from_list(ROWS[3:])}).save_to_disk(
        tmp_path / "dict")
    assert rows_of(open_dataset(f"{tmp_path / 'dict'}:test")) == ROWS[3:]
    assert rows_of(open_dataset(tmp_path / "dict", split="train")) == ROWS[:3]
    assert rows_of(open_dataset(f"{tmp_path / 'dict'}:test", split="train")) == ROWS[3:]  # the suffix wins
    with pytest.raises(ValueError, match=r"splits \['train', 'test'\]; choose one"):
        open_dataset(tmp_path / "dict")
    with pytest.raises(ValueError, match=r"no split 'dev'; it has \['train', 'test'\]"):
        open_dataset(f"{tmp_path / 'dict'}:dev")
    with pytest.raises(ValueError, match="single dataset with no splits"):
        open_dataset(f"{tmp_path / 'one'}:test")


def test_a_folder_of_data_files(tmp_path):
    (tmp_path / "shards").mkdir()
    Dataset.from_list(ROWS[:2]).to_parquet(tmp_path / "shards" / "part-0.parquet")
    Dataset.from_list(ROWS[2:]).to_parquet(tmp_path / "shards" / "part-1.parquet")
    assert sorted(r["prompt"] for r in open_dataset(tmp_path / "shards")) == [r["prompt"] for r in ROWS]


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.parquet: no such file"):
        open_dataset(tmp_path / "missing.parquet")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes.txt: unknown data file type '.txt'"):
        open_dataset(tmp_path / "notes.txt")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="broken.parquet: could not be read as parquet"):
        open_dataset(tmp_path / "broken.parquet")


def test_a_hub_id_is_refused_at_once_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match="no-such-org/no-such-dataset: not a local file or folder, and the hub"):
        open_dataset("no-such-org/no-such-dataset")
