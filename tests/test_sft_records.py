"""SFT rows (dpolab.data.sft_records, dpolab.data.sft_tokenize): trl's record forms, which tokens each scores, and
errors that name the row and the field.

The expected scored text of each case is written out by hand from trl's SFT semantics:

- prompt/completion: the completion only (``completion_only_loss`` True, trl's default), EOS included;
- ``messages``: every token of the rendered conversation (trl's default), or with ``assistant_only_loss`` each
  assistant turn's body and its turn end, nothing else;
- ``text``: every token, EOS appended.

"Every token" is every token after the first (the BOS ``<s>`` of the tiny Llama tokenizer; for GPT-2, which adds
none, the first word), because the first token of a sequence is never predicted.
"""

import json

import pytest

from dpolab.data.prepare import prepare_pairs
from dpolab.data.records import DataError
from dpolab.data.sft_records import CompletionExample, dpo_row, row_form, sft_row
from dpolab.data.sft_tokenize import tokenize_completion
from dpolab.data.tokenize import TokenizeConfig
from dpolab.models.tiny import tiny_tokenizer

USER, BOT = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}
USER2, BOT2 = {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Bye."}
CHATML = "<|im_start|>{}\n{}<|im_end|>\n"


@pytest.fixture(scope="module")
def llama():
    return tiny_tokenizer("llama")


def scored_runs(pair, tok) -> list[str]:
    """The text of each maximal run of scored tokens, in order."""
    runs, current = [], []
    for i, m in zip(pair.chosen_ids, pair.chosen_mask):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def context(pair, tok) -> str:
    return tok.decode(pair.prompt_ids, skip_special_tokens=False)


@pytest.mark.parametrize("record, form", [
    ({"text": "a"}, "text"),
    ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"messages": [USER, BOT]}, "messages"),
    ({"prompt": "a", "chosen": "b", "rejected": "c"}, "preference"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "text": None, "completion": None}, "preference"),
    ({"prompt": None, "chosen": None, "rejected": None, "text": "a"}, "text"),  # a mixed parquet file's None columns
])
def test_the_form_is_read_from_the_keys(record, form):
    assert row_form(record) == form


def test_text_scores_every_token_after_the_first(llama):
    pair = tokenize_completion(sft_row({"text": "The movie was good"}, "t:row 0"), llama)
    assert context(pair, llama) == "<s>" and scored_runs(pair, llama) == ["The movie was good</s>"]
    gpt2 = tiny_tokenizer("gpt2")  # no BOS: the first word is the context
    pair = tokenize_completion(sft_row({"text": "The movie was good"}), gpt2)
    assert context(pair, gpt2) == "The" and scored_runs(pair, gpt2) == [" movie was good<|endoftext|>"]
    assert pair.rejected_ids == [] and pair.rejected_mask == []


def test_prompt_completion_scores_the_completion_only_by_default(llama):
    example = sft_row({"prompt": "The movie was", "completion": " good"})
    pair = tokenize_completion(example, llama)
    assert context(pair, llama) == "<s>The movie was" and scored_runs(pair, llama) == [" good</s>"]
    pair = tokenize_completion(example, llama, TokenizeConfig(completion_only_loss=False))
    assert context(pair, llama) == "<s>" and scored_runs(pair, llama) == ["The movie was good</s>"]


def test_conversational_prompt_completion(llama):
    pair = tokenize_completion(sft_row({"prompt": [USER], "completion": [BOT]}), llama)
    assert context(pair, llama) == "<s>" + CHATML.format("user", "Hi") + "<|im_start|>assistant\n"
    assert scored_runs(pair, llama) == ["Hello!<|im_end|>"]
    string_completion = tokenize_completion(sft_row({"prompt": [USER], "completion": "Hello!"}), llama)
    assert string_completion == pair  # a string completion is one assistant turn


def test_messages_score_every_token_or_the_assistant_turns(llama):
    example = sft_row({"messages": [USER, BOT, USER2, BOT2]})
    whole = "".join(CHATML.format(m["role"], m["content"]) for m in (USER, BOT, USER2, BOT2))
    pair = tokenize_completion(example, llama)
    assert context(pair, llama) == "<s>" and scored_runs(pair, llama) == [whole]
    pair = tokenize_completion(example, llama, TokenizeConfig(assistant_only_loss=True))
    assert scored_runs(pair, llama) == ["Hello!<|im_end|>", "Bye.<|im_end|>"]  # every assistant turn, whatever
    assert context(pair, llama) == "<s>" + CHATML.format("user", "Hi") + "<|im_start|>assistant\n"
    unscored = "\n" + CHATML.format("user", "Thanks") + "<|im_start|>assistant\n"  # the user turn and the header
    assert llama.decode(pair.chosen_ids, skip_special_tokens=False) == "Hello!<|im_end|>" + unscored + "Bye.<|im_end|>"


@pytest.mark.parametrize("record, field, reason", [
    ({"text": ""}, "text", "empty string"),
    ({"text": 3}, "text", "expected a string"),
    ({"messages": [USER]}, "messages", "no assistant turn"),
    ({"messages": [BOT, USER, BOT2]}, "messages[0].role", "turn 0: the conversation must start with a user turn"),
    ({"messages": [USER, BOT, BOT2]}, "messages[2].role", "turn 2: two 'assistant' turns in a row"),
    ({"messages": [USER, BOT, USER2]}, "messages[2].role", "turn 2: the response must end with an assistant turn"),
    ({"messages": [USER, {"role": "assistant", "content": " "}]}, "messages[1].content", "turn 1: empty content"),
    ({"messages": "Hi"}, "messages", "expected a message list"),
    ({"completion": "x"}, "prompt", "missing key"),
    ({"prompt": "p", "completion": [BOT]}, "completion", "a text prompt needs a string completion"),
    ({"prompt": [USER], "completion": [USER2]}, "completion[0].role", "must start with an assistant turn"),
    ({"prompt": [USER, BOT], "completion": [BOT2]}, "prompt[1].role", "the prompt must end with a user turn"),
    ({"text": "a", "tools": "[not json"}, "tools", "not valid JSON"),
    ({"txt": "hi"}, None, r"no known keys \(\['txt'\]; 'txt': did you mean 'text'\?\)"),
])
def test_bad_sft_rows_name_the_row_and_field(record, field, reason):
    with pytest.raises(DataError, match=reason) as err:
        sft_row(record, "sft.parquet:row 4")
    assert err.value.field == field and str(err.value).startswith("sft.parquet:row 4")


def test_a_dpo_run_refuses_sft_rows_naming_the_form(tmp_path, llama):
    with pytest.raises(DataError, match="field 'completion': a prompt/completion row is SFT data; DPO needs"):
        dpo_row({"prompt": "a", "completion": "b"}, "f:row 1")
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}) + "\n" +
                    json.dumps({"text": "just text"}) + "\n")
    with pytest.raises(DataError, match="mixed.jsonl:row 2: field 'text': a text row is SFT data"):
        prepare_pairs(path, llama, TokenizeConfig(max_length=64))
    data = prepare_pairs(path, llama, TokenizeConfig(max_length=64), stage="sft")  # an SFT run reads both
    assert data.report.kept == 2 and data.pairs[1].rejected_ids == [] and data.prompts == ["a"]
    with pytest.raises(DataError, match="a text row is SFT data"):  # examples passed in are checked too
        prepare_pairs([CompletionExample("text", None, "x")], llama, TokenizeConfig(max_length=64))


def test_row_template_columns_are_kept(llama):
    example = sft_row({"messages": [USER, BOT], "tools": json.dumps([{"name": "f"}]),
                       "chat_template_kwargs": {"enable_thinking": False}})
    assert example.tools == ({"name": "f"},) and example.chat_template_kwargs == {"enable_thinking": False}
