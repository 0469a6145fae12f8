"""Judges: failures named with the offending text, built-ins, and the sequence-classifier adapter."""

import numpy as np
import pytest
import torch

from dpolab.models.tiny import tiny_tokenizer
from dpolab.sample.judges import RewardFunction, RewardFunctionError, classifier_judge, get_judge, score_completions
from dpolab.sample.sentiment import textblob_reward, vader_reward

TEXTS = ["a fine film", "a dull film", "bad movie", "great fun"]


def test_nan_is_reported_with_the_offending_text():
    judge = RewardFunction("nan-on-bad", lambda texts: [float("nan") if "bad" in t else 1.0 for t in texts])
    with pytest.raises(RewardFunctionError, match=r"'nan-on-bad' returned nan for text 2: 'bad movie'"):
        judge(TEXTS)
    batched = RewardFunction("inf-on-great", lambda texts: [np.inf if "great" in t else 0.0 for t in texts], 2)
    with pytest.raises(RewardFunctionError, match=r"returned inf for text 3: 'great fun'"):  # index across batches
        batched(TEXTS)


def test_wrong_number_of_scores_is_reported():
    judge = RewardFunction("drops-one", lambda texts: [0.0] * (len(texts) - 1))
    with pytest.raises(RewardFunctionError, match=r"'drops-one' returned 3 score\(s\) .* for 4 text\(s\) 0\.\.3 "
                                                  r"\(first: 'a fine film'\)"):
        judge(TEXTS)
    matrix = RewardFunction("two-per-text", lambda texts: np.zeros((len(texts), 2)))
    with pytest.raises(RewardFunctionError, match=r"in shape \(4, 2\)"):
        matrix(TEXTS)
    with pytest.raises(RewardFunctionError, match="not a list of numbers"):
        RewardFunction("words", lambda texts: ["good"] * len(texts))(TEXTS)


def test_exception_is_reported_with_the_text_that_raises():
    def picky(texts):
        return [1.0 / len(t.split()[1]) if "dull" not in t else {}["dull"] for t in texts]

    judge = RewardFunction("picky", picky, batch_size=3)
    with pytest.raises(RewardFunctionError, match=r"'picky' raised KeyError: 'dull' on text 1: 'a dull film'") as err:
        judge(TEXTS)
    assert isinstance(err.value.__cause__, KeyError)

    def batch_only(texts):  # fails on the batch as a whole, never on one text
        if len(texts) > 1:
            raise RuntimeError("out of memory")
        return [0.0]

    with pytest.raises(RewardFunctionError, match=r"RuntimeError: out of memory on the batch of texts 0\.\.3 "
                                                  r"\(each alone scores fine"):
        RewardFunction("batch-only", batch_only)(TEXTS)


def test_builtins_and_callables():
    vader = get_judge("vader")
    assert vader.name == "vader"
    np.testing.assert_array_equal(vader(TEXTS), vader_reward(TEXTS))
    np.testing.assert_array_equal(get_judge("textblob")(TEXTS), textblob_reward(TEXTS))
    assert vader(["a great, wonderful film"])[0] > 0 > vader(["a terrible, awful film"])[0]
    assert get_judge(len).name == "len" and get_judge(vader) is vader
    assert get_judge(lambda t: torch.ones(len(t), 1))(TEXTS).tolist() == [1.0] * 4  # (N, 1) tensors accepted
    with pytest.raises(ValueError, match="unknown judge 'bert'"):
        get_judge("bert")
    with pytest.raises(TypeError, match="single string"):
        vader("a fine film")


def test_score_completions_shapes_and_prompt_prefix():
    judge = RewardFunction("chars", lambda texts: [len(t) for t in texts])
    completions = [[" good", " bad!"], [" ok", ""]]
    np.testing.assert_array_equal(score_completions(judge, completions), [[5, 5], [3, 0]])
    np.testing.assert_array_equal(score_completions(judge, completions, prompts=["It was", "Meh"]),
                                  [[11, 11], [6, 3]])
    with pytest.raises(ValueError, match="same number of completions"):
        score_completions(judge, [["a", "b"], ["c"]])


def tiny_classifier(num_labels, kind="llama"):
    from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    tok = tiny_tokenizer(kind)
    torch.manual_seed(0)
    labels = {0: "NEGATIVE", 1: "POSITIVE"} if num_labels == 2 else {0: "LABEL_0"}
    if kind == "llama":
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, num_labels=num_labels, id2label=labels,
                             label2id={v: k for k, v in labels.items()})
        return LlamaForSequenceClassification(config), tok
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, num_labels=num_labels, id2label=labels,
                        label2id={v: k for k, v in labels.items()})
    return GPT2ForSequenceClassification(config), tok


def one_by_one(model, tok, texts):
    """Reference: each text alone, no padding."""
    with torch.no_grad():
        return torch.cat([model(**tok(t, return_tensors="pt")).logits for t in texts]).float()


def test_classifier_judge_batched_equals_one_text_at_a_time():
    model, tok = tiny_classifier(2)
    texts = ["A dull film.", "The acting is superb, the script sharp, and the ending earns every tear.", "Hello"]
    expected = one_by_one(model, tok, texts)
    positive = classifier_judge(model, tok, label="POSITIVE", batch_size=2)
    assert positive.name.endswith(":POSITIVE:logit")
    np.testing.assert_allclose(positive(texts), expected[:, 1].numpy(), atol=1e-5)
    probability = classifier_judge(model, tok, label=0, output="probability")
    np.testing.assert_allclose(probability(texts), expected.softmax(-1)[:, 0].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="has 2 classes .* say which one"):
        classifier_judge(model, tok)
    with pytest.raises(ValueError, match="label 'happy' is not one of"):
        classifier_judge(model, tok, label="happy")


def test_reward_model_judge_uses_its_single_output():
    model, tok = tiny_classifier(1, kind="gpt2")  # GPT-2: the score is read at the last non-pad token
    texts = ["great fun", "It is a mess: too long, too loud, and too pleased with itself."]
    judge = classifier_judge(model, tok, batch_size=4, name="rm")
    np.testing.assert_allclose(judge(texts), one_by_one(model, tok, texts)[:, 0].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="no class probability"):
        classifier_judge(model, tok, output="probability")
