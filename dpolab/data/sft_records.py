"""SFT rows: the record forms of trl's SFTTrainer, which an SFT run reads besides preference rows.

- prompt/completion: ``{"prompt": str, "completion": str}``, or message lists (``prompt`` ending on a user or tool
  turn, ``completion`` of assistant turns; a string completion to a message prompt is one assistant turn).
  Scored: the completion's tokens (trl's ``completion_only_loss``, default True), or with it False every token.
- messages: ``{"messages": [...]}``, one conversation (``[system] user assistant …``, at least one assistant turn)
  rendered by the chat template. Scored: every token (trl's default), or with ``assistant_only_loss`` only the
  assistant turns, every one of them, tool calls included (system, user and tool turns and the template's turn
  headers never).
- text: ``{"text": str}``. Scored: every token, with EOS appended as trl does.

"Every token" means every token after the first, which has nothing before it to be predicted from. Preference
rows in an SFT run train on prompt + chosen, as before (:mod:`dpolab.data.records`). A row's ``tools`` and
``chat_template_kwargs`` columns are read as for preference rows. Errors name the source, the field and the turn.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass

from dpolab.data.records import (
    DataError,
    Message,
    PreferenceExample,
    check_roles,
    example_from_record,
    message_tuple,
    template_columns,
)

SFT_FORMS = ("prompt_completion", "messages", "text")
SFT_KEYS = {"completion": "prompt_completion", "messages": "messages", "text": "text"}
"""The key that marks each SFT form (checked in this order, after ``chosen``/``rejected``)."""
KNOWN_KEYS = ("prompt", "chosen", "rejected", "completion", "messages", "text", "tools", "chat_template_kwargs")


@dataclass(frozen=True)
class CompletionExample:
    """One validated SFT row.

    Attributes:
        form: ``"prompt_completion"``, ``"messages"`` or ``"text"``.
        prompt: The prompt (text or messages) of a prompt/completion row; None for the other forms.
        completion: The completion (text or messages), the conversation, or the text.
        source: Where it came from, e.g. ``"train.parquet:row 3"``.
        tools, chat_template_kwargs: The row's own template arguments (trl's columns), as in
            :class:`dpolab.data.records.PreferenceExample`.
    """

    form: str
    prompt: str | tuple[Message, ...] | None
    completion: str | tuple[Message, ...]
    source: str = ""
    tools: tuple | None = None
    chat_template_kwargs: dict | None = None

    @property
    def is_conversational(self) -> bool:
        """True when the row is rendered by the chat template."""
        return not isinstance(self.completion, str) or not isinstance(self.prompt, str | None)


def row_form(record: Mapping) -> str:
    """``"preference"`` or one of :data:`SFT_FORMS`, by the keys the record holds (keys set to None are absent)."""
    present = {k for k, v in record.items() if v is not None} if isinstance(record, Mapping) else set()
    if present & {"chosen", "rejected"}:
        return "preference"
    return next((form for key, form in SFT_KEYS.items() if key in present), "preference")


def sft_row(record: Mapping, source: str = "") -> PreferenceExample | CompletionExample:
    """A validated example of any form an SFT run reads: a preference row, or a :class:`CompletionExample`."""
    form = row_form(record)
    if form == "preference":
        if isinstance(record, Mapping) and not set(record) & {"prompt", "chosen", "rejected"}:
            raise DataError(source, None, f"no known keys ({sorted(map(str, record))}{_close_keys(record)}); an SFT "
                            "row is prompt/completion, messages, text or prompt/chosen/rejected")
        return example_from_record(record, source)
    columns = template_columns(record, source)
    if form == "text":
        return CompletionExample("text", None, _text(record["text"], source, "text"), source, *columns)
    if form == "messages":
        messages = record["messages"]
        if not isinstance(messages, list | tuple):
            raise DataError(source, "messages", f"expected a message list, got {type(messages).__name__}")
        messages = message_tuple(messages, source, "messages")
        first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
        if first is None:
            raise DataError(source, "messages", "no assistant turn: the conversation needs the assistant's words")
        if first == 0:
            raise DataError(source, "messages[0].role", "turn 0: the conversation must start with a user turn (after "
                            "an optional system message)")
        check_roles(messages[:first], source, "messages", side="prompt")
        check_roles(messages[first:], source, "messages", first=first, numbered_from=first)
        return CompletionExample("messages", None, messages, source, *columns)
    if "prompt" not in record:
        raise DataError(source, "prompt", "missing key (a completion needs its prompt)")
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            raise DataError(source, "completion", "a text prompt needs a string completion, got "
                            f"{type(completion).__name__}")
        return CompletionExample("prompt_completion", _text(prompt, source, "prompt"),
                                 _text(completion, source, "completion"), source, *columns)
    if not isinstance(prompt, list | tuple):
        raise DataError(source, "prompt", f"expected a string or a message list, got {type(prompt).__name__}")
    prompt = message_tuple(prompt, source, "prompt")
    check_roles(prompt, source, "prompt", side="prompt")
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    if not isinstance(completion, list | tuple):
        raise DataError(source, "completion", f"expected a string or a message list, got {type(completion).__name__}")
    completion = message_tuple(completion, source, "completion")
    check_roles(completion, source, "completion", first=len(prompt))
    return CompletionExample("prompt_completion", prompt, completion, source, *columns)


def dpo_row(record: Mapping, source: str = "") -> PreferenceExample:
    """A preference example for a DPO run; an SFT-only row is refused, naming its form."""
    form = row_form(record)
    if form != "preference":
        key = next(k for k, f in SFT_KEYS.items() if f == form)
        raise DataError(source, key, f"a {form.replace('_', '/')} row is SFT data; DPO needs preference rows "
                        "(prompt, chosen, rejected; this row has no 'chosen' and no 'rejected'), as does a reward "
                        "model (stage=reward): train it with stage=sft")
    return example_from_record(record, source)


def _text(value, source: str, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(source, name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(source, name, "empty string")
    return value


def _close_keys(record: Mapping) -> str:
    hints = [f"{k!r}: did you mean {c[0]!r}?" for k in map(str, record)
             if (c := difflib.get_close_matches(k, KNOWN_KEYS, n=1, cutoff=0.75))]
    return f"; {', '.join(hints)}" if hints else ""
