"""The paper's §6.1 configs without a hub or a GPU: they load and validate; offline, every missing hub id is named at
once before any work; and the whole pipeline runs on tiny stand-ins saved in the same shapes (a GPT-2 folder, a
DistilBERT sequence-classifier folder, an IMDb-shaped parquet file), built in tmp_path by the test."""

import numpy as np
import pytest

from dpolab.data.cache import REPO_ROOT
from dpolab.experiments.sentiment.config import SentimentConfig

PAPER = REPO_ROOT / "configs" / "paper_imdb_gpt2_large.yaml"
SMALL = REPO_ROOT / "configs" / "paper_imdb_gpt2.yaml"
HUB_IDS = {"model": "openai-community/gpt2-large", "dataset_name": "stanfordnlp/imdb",
           "judge": "lvwerra/distilbert-imdb"}


def test_paper_config_holds_the_papers_settings():
    """§6.1 and appendix B: GPT-2 large, IMDb, the IMDb classifier, 25,000 prefixes x 4 samples, RMSprop at 1e-6 with
    150 warm-up steps, batch 64, β in {0.05, 0.1, 1, 5}, DPO against PPO on a learned reward model and PPO-GT."""
    c = SentimentConfig.load(PAPER)
    assert (c.model, c.dataset_name, c.judge) == tuple(HUB_IDS.values())
    assert (c.n_train_prompts, c.samples_per_prompt, c.pair_strategy) == (25000, 4, "all_pairs")
    assert (c.min_prefix_tokens, c.max_prefix_tokens) == (2, 8)
    assert (c.optim, c.lr, c.warmup_steps, c.batch_size) == ("rmsprop", 1e-6, 150, 64)
    assert c.betas == (0.05, 0.1, 1.0, 5.0)
    assert {"dpo", "ppo_rm", "ppo", "preferred_ft", "unlikelihood"} <= set(c.methods)
    small = SentimentConfig.load(SMALL)
    assert small.model == "openai-community/gpt2" and small.betas == c.betas and small.optim == "rmsprop"


@pytest.mark.parametrize("field, value, message", [("optim", "adam", "optim must be one of"),
                                                   ("device", "tpu", "'auto', 'cpu' or 'cuda"),
                                                   ("judge_output", "score", "judge_output must be")])
def test_bad_new_fields_fail_at_load(field, value, message):
    with pytest.raises(ValueError, match=message):
        SentimentConfig.load(PAPER, [f"{field}={value}"])


def test_offline_every_missing_hub_id_is_named_before_any_work(monkeypatch, tmp_path):
    """No hub and an empty cache: one error lists the model, the dataset and the judge; nothing is loaded or written."""
    import dpolab.experiments.sentiment.setup as experiment
    import dpolab.models
    import dpolab.models.hub_check as hub_check

    monkeypatch.setattr(dpolab.models, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(hub_check, "in_local_cache", lambda repo_id, repo_type="model": False)
    monkeypatch.setattr(experiment, "load_policy", lambda *a, **k: pytest.fail("loaded a model before the check"))
    out = tmp_path / "never"
    config = SentimentConfig.load(PAPER, [f"output_dir={out}"])
    with pytest.raises(hub_check.MissingSourcesError) as err:
        experiment.prepare(config)
    message = str(err.value)
    assert "3 source(s)" in message and "cannot be reached" in message
    for field, name in HUB_IDS.items():
        assert f"{field}: hub" in message and repr(name) in message
    assert not out.exists()


def test_a_missing_local_path_is_named_with_the_hub_ids(monkeypatch, tmp_path):
    import dpolab.models
    import dpolab.models.hub_check as hub_check

    monkeypatch.setattr(dpolab.models, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(hub_check.MissingSourcesError, match=r"(?s)dataset_name: '\./no/imdb\.parquet' is no such.*"
                                                            r"judge: hub model 'someone/absent-classifier'"):
        hub_check.check_sources([hub_check.Source("model", "tiny-gpt2"),
                                 hub_check.Source("dataset_name", "./no/imdb.parquet", "dataset"),
                                 hub_check.Source("judge", "someone/absent-classifier")], builtin=["tiny-gpt2"])
    assert not hub_check.in_local_cache("nobody-at-all/never-published-x7")


REVIEWS = ["This movie was wonderful,<br /><br />warm and funny and wise from start to finish.",
           "A dull, plodding film that never finds its rhythm or its reason to exist.",
           "The acting is superb, the script sharp, and the ending earns every tear.",
           "It is a mess: too long, too loud, and too pleased with itself.",
           "Great film. I loved every minute of it and would watch it again.",
           "Terrible, awful, bad. The worst thing I have seen this year."]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A tiny GPT-2 folder, a tiny DistilBERT classifier folder (NEGATIVE/POSITIVE) and an IMDb-shaped parquet file."""
    import torch
    from datasets import Dataset
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, DistilBertTokenizerFast

    from dpolab.models.tiny import tiny_causal_lm

    root = tmp_path_factory.mktemp("stand_ins")
    model, tokenizer = tiny_causal_lm("gpt2", seed=0)
    model.save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    words = sorted({w.strip(".,:").lower() for text in REVIEWS for w in text.replace("<br", " ").split()})
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    cls_tok = DistilBertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    torch.manual_seed(0)
    classifier = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=len(cls_tok), dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=128,
        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1}))
    classifier.save_pretrained(root / "classifier")
    cls_tok.save_pretrained(root / "classifier")
    rows = {"text": REVIEWS * 5, "label": [i % 2 for i in range(len(REVIEWS) * 5)]}
    Dataset.from_dict(rows).to_parquet(str(root / "imdb_train.parquet"))
    return root


def test_review_texts_from_a_local_file_of_imdbs_shape(stand_ins, tmp_path):
    from dpolab.sample.review_text import review_texts

    texts = review_texts(str(stand_ins / "imdb_train.parquet"))
    assert len(texts) == 30 and texts[0].startswith("This movie was wonderful, warm")  # <br /> gone
    jsonl = tmp_path / "imdb.jsonl"
    jsonl.write_text('{"text": "one review", "label": 1}\n{"text": "another", "label": 0}\n')
    assert review_texts(str(jsonl)) == ["one review", "another"]
    with pytest.raises(ValueError, match="no column 'review'"):
        review_texts(str(jsonl), text_field="review")


def test_classifier_judge_reads_the_positive_class(stand_ins):
    from dpolab.sample.judges import load_classifier_judge

    judge = load_classifier_judge(str(stand_ins / "classifier"), label="POSITIVE", output="probability")
    scores = judge(REVIEWS)
    assert scores.shape == (6,) and np.all((scores > 0) & (scores < 1))


def test_paper_pipeline_on_tiny_stand_ins(stand_ins, tmp_path, monkeypatch):
    """The paper config with only sizes and paths overridden: SFT on the parquet's reviews, pairs judged by the
    classifier, DPO with RMSprop, the reward model and PPO on it; rows for every curve."""
    from dpolab.experiments.sentiment import run

    monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path / "cache"))
    config = SentimentConfig.load(PAPER, {
        "model": str(stand_ins / "gpt2"), "dataset_name": str(stand_ins / "imdb_train.parquet"),
        "judge": str(stand_ins / "classifier"), "n_train_prompts": 4, "n_eval_prompts": 3, "samples_per_prompt": 3,
        "max_new_tokens": 4, "sft_steps": 1, "methods": ("dpo", "ppo_rm"), "betas": (0.1, 5.0),
        "num_train_epochs": 0.0, "steps": 2, "eval_every": 2, "batch_size": 4, "warmup_steps": 1, "lr": 1e-3,
        "ppo_steps": 1, "ppo_prompts_per_step": 2, "ppo_k": 2, "ppo_kl_coefs": (0.1,), "ppo_eval_every": 1,
        "num_ppo_epochs": 1, "reward_model_batch_size": 2, "best_of_n": (1, 2), "eval_samples_per_prompt": 2,
        "heldout_pair_samples": 2, "output_dir": str(tmp_path / "run"), "device": "cpu", "progress": False})
    result = run(config)
    rows = result["results"]["policies"]
    methods = {row["method"] for row in rows}
    assert {"Reference", "DPO", "PPO", "Best of N"} <= methods
    assert all(np.isfinite(row["reward"]) and 0 < row["reward"] < 1 for row in rows)  # classifier probabilities
    assert (tmp_path / "run" / "reward_model").is_dir()
    dpo = [row for row in rows if row["method"] == "DPO" and row.get("final")]
    assert sorted(row["beta"] if "beta" in row else row.get("knob") for row in dpo) == [0.1, 5.0]
