"""dpolab.data.sources: every local dataset form, splits, and a hub id refused fast offline."""

import json
import math

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
    """Offline (dpolab.models.hub_reachable is False under HF_HUB_OFFLINE=1), datasets' own offline switch is on for
    the one call and restored after it."""
    import datasets.config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # as if datasets was imported while online
    seen = []

    def load_dataset(*args, **kwargs):
        seen.append(datasets.config.HF_HUB_OFFLINE)
        raise ConnectionError("offline")

    monkeypatch.setattr("datasets.load_dataset", load_dataset)
    with pytest.raises(ValueError, match="no-such-org/no-such-dataset: not a local file or folder, and the hub"):
        open_dataset("no-such-org/no-such-dataset")
    assert seen == [True] and datasets.config.HF_HUB_OFFLINE is False


# ---- end to end: `dpolab train` on these sources ------------------------------------------------------------------

def pair_rows(n, offset=0):
    from tiny_runs import make_examples

    return [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for e in make_examples(n, offset)]


@pytest.mark.parametrize("suffix", [".parquet", ".json"])
def test_dpolab_train_on_a_parquet_file_or_a_json_array(tmp_path, suffix, capsys):
    """Parquet once failed as "invalid UTF-8" and a JSON array as bad JSON lines: both read as rows now."""
    import json as json_module

    from dpolab.cli import main

    path = tmp_path / f"pairs{suffix}"
    if suffix == ".parquet":
        Dataset.from_list(pair_rows(8)).to_parquet(path)
    else:
        path.write_text(json_module.dumps(pair_rows(8)))
    code = main(["train", "model=tiny-gpt2", f"train_data={path}", f"eval_data={path}", "max_steps=2",
                 "micro_batch_size=4", "kl_samples=0", "progress=false", f"output_dir={tmp_path / 'run'}"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["final"]["step"] == 2 and "eval_loss" in summary["final"]


def test_a_dataset_dict_folder_trains_on_train_split_and_evaluates_on_test(tmp_path):
    """A DatasetDict folder once failed with "got str"; train_split / eval_split (trl's "train" / "test") pick."""
    from tiny_runs import FAST

    from dpolab.train.trainer import train

    DatasetDict({"train": Dataset.from_list(pair_rows(8)), "test": Dataset.from_list(pair_rows(4, 8)),
                 "other": Dataset.from_list(pair_rows(2, 12))}).save_to_disk(tmp_path / "dd")
    run = {**FAST, "max_steps": 1, "micro_batch_size": 2, "train_data": str(tmp_path / "dd"),
           "eval_data": str(tmp_path / "dd"), "output_dir": str(tmp_path / "run")}
    result = train(run)
    assert (result.data["train"]["rows"], result.data["eval"]["rows"]) == (8, 4)
    result = train({**run, "eval_data": f"{tmp_path / 'dd'}:other", "train_split": "test", "overwrite": True})
    assert (result.data["train"]["rows"], result.data["eval"]["rows"]) == (4, 2)
    with pytest.raises(ValueError, match=r"splits \['train', 'test', 'other'\] but no split 'dev'; choose one"):
        train({**run, "train_split": "dev", "overwrite": True})


def test_sft_on_prompt_completion_text_and_messages_rows(tmp_path):
    """One parquet file of mixed SFT rows (each row's other columns are None), tokenized by two workers."""
    from tiny_runs import FAST

    from dpolab.train.trainer import train

    user, bot = {"role": "user", "content": "Hello! How are you?"}, {"role": "assistant", "content": "I am fine."}
    rows = [{"prompt": "The movie was", "completion": " good"}, {"text": "It is a wonderful film."},
            {"messages": [user, bot]}, {"prompt": "It is a", "chosen": " good film", "rejected": " mess"}] * 2
    Dataset.from_list([{k: r.get(k) for k in ("prompt", "completion", "text", "messages", "chosen", "rejected")}
                       for r in rows]).to_parquet(tmp_path / "sft.parquet")
    result = train({**FAST, "model": "tiny-llama", "stage": "sft", "max_steps": 2, "micro_batch_size": 4,
                    "dataset_num_proc": 2, "assistant_only_loss": True, "train_data": str(tmp_path / "sft.parquet"),
                    "output_dir": str(tmp_path / "run")})
    assert result.data["train"]["kept"] == 8 and all(math.isfinite(r["loss"]) for r in result.history)
    with pytest.raises(ValueError, match="sft.parquet:row 0: field 'completion': a prompt/completion row is SFT data"):
        train({**FAST, "model": "tiny-llama", "train_data": str(tmp_path / "sft.parquet"),
               "output_dir": str(tmp_path / "dpo")})
