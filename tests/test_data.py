"""Preference records: the four forms, the lazy ``datasets`` loader, and every bad-input error (file, row, field)."""

import json

import pytest
from datasets import Dataset, IterableDataset

from dpolab.data.readers import iter_dataset, load_jsonl
from dpolab.data.records import DataError, PreferenceExample, example_from_record, split_hh


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows):
    path.write_bytes(b"\n".join(r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows) + b"\n")
    return path


TEXT = {"prompt": "The movie was", "chosen": " great.", "rejected": " dull."}


def test_text_form():
    ex = example_from_record(TEXT, "t.jsonl:row 1")
    assert ex == PreferenceExample("The movie was", " great.", " dull.", "t.jsonl:row 1")
    assert not ex.is_conversational


def test_hh_form_prompt_ends_with_last_assistant_marker():
    history = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Tell me a joke.\n\nAssistant:"
    ex = example_from_record({"chosen": history + " A pun.", "rejected": history + " No."})
    assert ex.prompt == history  # up to and including the *last* "\n\nAssistant:"
    assert (ex.chosen, ex.rejected) == (" A pun.", " No.")
    assert split_hh("\n\nHuman: a\n\nAssistant: b") == ("\n\nHuman: a\n\nAssistant:", " b")


def test_hh_histories_must_agree():
    with pytest.raises(DataError, match=r"hh:row 4: field 'rejected': its history"):
        example_from_record({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: X\n\nAssistant: c"},
                            "hh:row 4")
    with pytest.raises(DataError, match="'chosen'.*Assistant"):
        example_from_record({"chosen": "no markers", "rejected": "\n\nHuman: X\n\nAssistant: c"})


def test_conversational_prompt_is_longest_common_prefix():
    shared = [user("Hi"), assistant("Hello!"), user("Name a colour.")]
    ex = example_from_record({"chosen": shared + [assistant("Green.")], "rejected": shared + [assistant("No.")]})
    assert ex.prompt == tuple(shared) and ex.chosen == (assistant("Green."),)
    assert ex.is_conversational


def test_conversational_prefix_backs_off_to_an_assistant_turn():
    """Responses that share their first assistant turn and diverge at a user turn: the prompt stops before the
    shared assistant turn, so both response sides start with an assistant turn."""
    chosen = [user("Hi"), assistant("Hello!"), user("a"), assistant("b")]
    rejected = [user("Hi"), assistant("Hello!"), user("c"), assistant("d")]
    ex = example_from_record({"chosen": chosen, "rejected": rejected})
    assert ex.prompt == (user("Hi"),) and ex.chosen == tuple(chosen[1:])


def test_explicit_prompt_conversational_form():
    ex = example_from_record({"prompt": [user("Hi")], "chosen": [assistant("Yo")], "rejected": [assistant("Go")]})
    assert ex.prompt == (user("Hi"),) and ex.rejected == (assistant("Go"),)


def test_ultrafeedback_binarised_form():
    row = {"prompt": "Name a colour.", "chosen": [user("Name a colour."), assistant("Green.")],
           "rejected": [user("Name a colour."), assistant("I won't.")], "score_chosen": 8.0}
    ex = example_from_record(row)
    assert ex.prompt == (user("Name a colour."),) and ex.chosen == (assistant("Green."),)
    with pytest.raises(DataError, match="field 'prompt'"):
        example_from_record({**row, "prompt": "another prompt"})


@pytest.mark.parametrize(
    ("record", "field", "reason"),
    [
        ({"prompt": "p", "chosen": "a"}, "rejected", "missing key"),
        ({"chosen": "a", "rejected": "b", "prompt": 3}, "prompt", "expected a string"),
        ({**TEXT, "chosen": ""}, "chosen", "empty string"),
        ({**TEXT, "chosen": "   "}, "chosen", "empty string"),
        ({**TEXT, "rejected": 7}, "rejected", "expected a string"),
        ({**TEXT, "rejected": TEXT["chosen"]}, "rejected", "identical"),
        ({"prompt": [user("Hi")], "chosen": [assistant("a")], "rejected": [assistant("a")]}, "rejected", "identical"),
        ({"prompt": [user("Hi")], "chosen": [assistant("a")], "rejected": [{"role": "assistant"}]},
         "rejected[0].content", "missing key"),
        ({"prompt": [user("Hi")], "chosen": [assistant("a")], "rejected": [assistant("")]}, "rejected[0].content",
         "empty content"),
        ({"prompt": [user("Hi")], "chosen": [assistant("a")], "rejected": [{"role": "bot", "content": "x"}]},
         "rejected[0].role", "unknown role"),
    ],
)
def test_bad_fields_are_named(record, field, reason):
    with pytest.raises(DataError, match=reason) as err:
        example_from_record(record, "f.jsonl:row 9")
    assert err.value.field == field and err.value.source == "f.jsonl:row 9"
    assert "f.jsonl:row 9" in str(err.value) and repr(field) in str(err.value)


@pytest.mark.parametrize(
    ("prompt", "chosen", "field", "turn_text"),
    [
        ([user("a"), user("b")], [assistant("c")], "prompt[1].role", "turn 1: two 'user' turns in a row"),
        ([user("a"), assistant("b")], [assistant("c")], "prompt[1].role", "turn 1: the prompt must end"),
        ([assistant("a"), user("b")], [assistant("c")], "prompt[0].role", "turn 0: the conversation must start"),
        ([user("a"), {"role": "system", "content": "s"}, user("b")], [assistant("c")], "prompt[1].role",
         "turn 1: a system message"),
        ([user("a")], [assistant("c"), user("d")], "chosen[1].role", "turn 1: the response must end"),
        ([user("a")], [assistant("c"), assistant("d")], "chosen[1].role", "turn 1: two 'assistant'"),
        ([user("a")], [user("c"), assistant("d")], "chosen[0].role", "turn 0: the response must start"),
    ],
)
def test_roles_out_of_order_name_the_turn(prompt, chosen, field, turn_text):
    with pytest.raises(DataError, match=turn_text) as err:
        PreferenceExample(tuple(prompt), tuple(chosen), (assistant("other"),), "c.jsonl:row 2")
    assert err.value.field == field


def test_system_first_is_allowed():
    ex = PreferenceExample(({"role": "system", "content": "Be brief."}, user("Hi")), (assistant("a"),),
                           (assistant("b"),))
    assert len(ex.prompt) == 2


def test_mixed_text_and_messages_rejected():
    with pytest.raises(DataError, match="field 'chosen'"):
        PreferenceExample("prompt", (assistant("a"),), "b")


def test_jsonl_roundtrip_and_row_numbers(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [TEXT, b"", {**TEXT, "chosen": " fine."}])
    examples = load_jsonl(path)
    assert [e.source for e in examples] == ["prefs.jsonl:row 1", "prefs.jsonl:row 3"]  # blank line 2 skipped
    assert str(examples.report) == "2 rows read, 2 kept, 0 skipped"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (b'{"prompt": "p", "chosen": "a", "rejected": "b"', r"prefs.jsonl:row 2: not valid JSON"),
        (b'{"prompt": "p\xff", "chosen": "a", "rejected": "b"}', r"prefs.jsonl:row 2: invalid UTF-8 at byte 13"),
        (b'["p", "a", "b"]', r"prefs.jsonl:row 2: expected a JSON object"),
        (json.dumps({**TEXT, "rejected": TEXT["chosen"]}).encode(), r"prefs.jsonl:row 2: field 'rejected': identical"),
    ],
)
def test_jsonl_bad_rows_raise_with_file_and_row(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "prefs.jsonl", [TEXT, bad, TEXT])
    with pytest.raises(DataError, match=message):
        load_jsonl(path)


def test_jsonl_skip_counts_and_keeps_the_rest(tmp_path):
    rows = [TEXT, b"not json", b'{"prompt": "\xc3\x28", "chosen": "a", "rejected": "b"}', {"prompt": "p"}, TEXT]
    examples = load_jsonl(write_jsonl(tmp_path / "d.jsonl", rows), on_error="skip")
    assert [e.source for e in examples] == ["d.jsonl:row 1", "d.jsonl:row 5"]
    assert (examples.report.rows, examples.report.kept, len(examples.report.skipped)) == (5, 2, 3)
    assert [s.split(":")[1] for s in examples.report.skipped] == ["row 2", "row 3", "row 4"]


def test_datasets_loader_is_lazy():
    """Rows are read one at a time: an IterableDataset whose generator fails at row 3 still yields rows 0-2."""
    read = []

    def gen():
        for i in range(10**9):  # far larger than memory if it were materialised
            read.append(i)
            yield {"prompt": f"p{i}", "chosen": "a", "rejected": "b" if i != 3 else "a"}

    examples = iter_dataset(IterableDataset.from_generator(gen), name="big")
    it = iter(examples)
    assert [next(it).prompt for _ in range(3)] == ["p0", "p1", "p2"]
    assert len(read) <= 4
    with pytest.raises(DataError, match=r"big:row 3: field 'rejected': identical"):
        next(it)


def test_datasets_loader_skip_and_len():
    ds = Dataset.from_list([TEXT, {**TEXT, "chosen": ""}, TEXT])
    examples = iter_dataset(ds, name="train", on_error="skip")
    assert len(examples) == 3
    assert [e.source for e in examples] == ["train:row 0", "train:row 2"]
    assert examples.report.kept == 2 and "train:row 1: field 'chosen': empty string" in examples.report.skipped[0]


CALL = {"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": {"x": 1}}]}
RESULT = {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "f"}


def test_tool_turns_are_kept_with_their_keys():
    example = PreferenceExample((user("Q"), CALL, RESULT), (assistant("42."),), (assistant("No."),))
    assert example.prompt[1] == {**CALL, "content": ""} and example.prompt[2] == RESULT  # a call needs no words
    parallel = (user("Q"), CALL, RESULT, {**RESULT, "content": "43"})  # several results in a row
    assert len(PreferenceExample(parallel, (assistant("a"),), (assistant("b"),)).prompt) == 4


@pytest.mark.parametrize(("prompt", "chosen", "field", "reason"), [
    ((user("Q"), RESULT), (assistant("a"),), "prompt[1].role", "turn 1: a tool turn must follow an assistant turn"),
    ((user("Q"),), ({"role": "assistant", "content": ""},), "chosen[0].content", "turn 0: empty content"),
    ((user("Q"),), ({**CALL, "tool_calls": "f()"},), "chosen[0].tool_calls", "turn 0: expected a list"),
    ((user("Q"), CALL, {**RESULT, "tool_calls": []}), (assistant("a"),), "prompt[2].tool_calls",
     r"\['tool_calls'\] are not supported in a 'tool' turn"),
    ((user("Q"), {**CALL, "name": "x"}, RESULT), (assistant("a"),), "prompt[1].name", "not supported"),
])
def test_bad_tool_turns_are_named(prompt, chosen, field, reason):
    with pytest.raises(DataError, match=reason) as err:
        PreferenceExample(prompt, chosen, (assistant("other"),), "t.jsonl:row 3")
    assert err.value.field == field


def test_data_errors_cross_process_boundaries():
    """Worker processes (dataset_num_proc) send errors back pickled: the same message, source and field."""
    import pickle

    from dpolab.data.tokenize import TruncationError

    for err in (DataError("f.jsonl:row 2", "chosen", "empty string"), TruncationError("f:row 1", "prompt", "why", "d")):
        back = pickle.loads(pickle.dumps(err))
        assert (type(back), str(back), back.source, back.field) == (type(err), str(err), err.source, err.field)
    assert back.why == "why"
