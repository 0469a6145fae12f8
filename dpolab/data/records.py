"""Preference examples: the validated record type and the four record forms it is read from (the readers of
JSONL files and ``datasets`` are :mod:`dpolab.data.readers`).

A preference example is a prompt ``x`` and two responses, ``y_w`` (chosen) and ``y_l`` (rejected), as in the
DPO paper (arXiv 2305.18290, §3). Four record forms are recognised (``format="auto"`` picks by shape):

- ``"text"``: ``{"prompt": str, "chosen": str, "rejected": str}``.
- ``"conversational"``: ``chosen``/``rejected`` are full message lists sharing a history; the prompt is their
  longest common prefix of messages (backed off so that each response side starts with an assistant turn).
  An explicit ``prompt`` message list with assistant-only ``chosen``/``rejected`` lists is accepted as well.
- ``"hh"``: Anthropic HH-RLHF transcripts ``"\\n\\nHuman: … \\n\\nAssistant: …"`` in ``chosen``/``rejected``;
  the prompt is everything up to and including the last ``"\\n\\nAssistant:"``.
- ``"ultrafeedback"``: binarised UltraFeedback, ``prompt`` a string and ``chosen``/``rejected`` message lists
  that repeat the user turn; the prompt becomes the shared message history.

Messages are ``{"role", "content"}`` dicts with roles system, user, assistant and tool. An assistant turn may carry
``tool_calls`` (its ``content`` may then be empty) and a tool turn ``tool_call_id`` and ``name``; these keys reach the
chat template as they are. A tool turn follows an assistant turn (the call) or another tool turn; a prompt may end
with one. A record's own ``tools`` (a list, or its JSON text) and ``chat_template_kwargs`` columns, as trl reads
them, are kept on the example for the template.

Every error names the source (``file.jsonl:row 17``) and the field, and, for a conversation, the turn index.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass

Message = dict
ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = {"assistant": ("tool_calls",), "tool": ("tool_call_id", "name")}
"""Keys a message of a role may carry besides role and content (passed to the chat template as they are)."""
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
RECORD_KEYS = ("prompt", "chosen", "rejected")
FORMATS = ("auto", "text", "conversational", "hh", "ultrafeedback")


class DataError(ValueError):
    """Bad input: ``source`` (``file:row N``), ``field`` and the reason are in the message and attributes."""

    def __init__(self, source: str, field: str | None, reason: str):
        self.source, self.field, self.reason = source, field, reason
        where = source or "<example>"
        super().__init__(f"{where}: field {field!r}: {reason}" if field else f"{where}: {reason}")

    def __reduce__(self):  # picklable with its fields, so that it crosses process boundaries (dataset_num_proc)
        return _rebuilt_error, (type(self), self.args, self.__dict__.copy())


def _rebuilt_error(cls: type, args: tuple, state: dict) -> DataError:
    err = Exception.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


@dataclass(frozen=True)
class PreferenceExample:
    """One validated preference pair ``(x, y_w, y_l)``.

    Attributes:
        prompt: Text prompt, or the shared chat history (tuple of ``{"role", "content"}`` messages).
        chosen: Preferred response text, or the response-side messages (starting with an assistant turn).
        rejected: Dispreferred response, same type as ``chosen``.
        source: Where it came from, e.g. ``"train.jsonl:row 17"``, used in every error message.
        tools: The row's own tool schemas for the chat template (trl's ``tools`` column); None: the config's.
        chat_template_kwargs: The row's own extra template arguments (trl's column), over the config's.
    """

    prompt: str | tuple[Message, ...]
    chosen: str | tuple[Message, ...]
    rejected: str | tuple[Message, ...]
    source: str = ""
    tools: tuple | None = None
    chat_template_kwargs: dict | None = None

    def __post_init__(self):
        conv = not isinstance(self.prompt, str)
        for name in ("prompt", "chosen", "rejected"):
            value = getattr(self, name)
            if isinstance(value, str):
                if conv:
                    raise DataError(self.source, name, "a conversational example needs message lists, got a string")
                if not value.strip():
                    raise DataError(self.source, name, "empty string")
            elif isinstance(value, list | tuple):
                if not conv:
                    raise DataError(self.source, name, "a text prompt needs string responses, got a message list")
                object.__setattr__(self, name, message_tuple(value, self.source, name))
            else:
                raise DataError(self.source, name, f"expected a string or a message list, got {type(value).__name__}")
        if self.chosen == self.rejected:
            raise DataError(self.source, "rejected", "identical to 'chosen'; the pair carries no preference")
        if conv:
            check_roles(self.prompt, self.source, "prompt", first=0, side="prompt")
            for name in ("chosen", "rejected"):
                check_roles(getattr(self, name), self.source, name, first=len(self.prompt))

    @property
    def is_conversational(self) -> bool:
        """True when prompt and responses are message lists."""
        return not isinstance(self.prompt, str)


def message_tuple(value, source: str, name: str) -> tuple[Message, ...]:
    """Checked copies of the messages of field ``name``: role, content (a string; may be empty only in an
    assistant turn with ``tool_calls``) and the keys :data:`MESSAGE_KEYS` allows; any other key is refused."""
    if not value:
        raise DataError(source, name, "empty message list")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise DataError(source, f"{name}[{i}]", f"turn {i}: expected a message dict, got {type(m).__name__}")
        calls = m.get("tool_calls") if m.get("role") == "assistant" else None
        for key in ("role", "content"):
            if key == "content" and calls and m.get(key) is None:
                continue
            if key not in m:
                raise DataError(source, f"{name}[{i}].{key}", f"turn {i}: missing key {key!r}")
            if not isinstance(m[key], str):
                raise DataError(source, f"{name}[{i}].{key}",
                                f"turn {i}: expected a string, got {type(m[key]).__name__}")
        if m["role"] not in ROLES:
            raise DataError(source, f"{name}[{i}].role", f"turn {i}: unknown role {m['role']!r}{_did_you_mean(m['role'], ROLES)}, "
                            f"expected one of {ROLES}")
        if not (m.get("content") or "").strip() and not calls:
            raise DataError(source, f"{name}[{i}].content", f"turn {i}: empty content")
        allowed = MESSAGE_KEYS.get(m["role"], ())
        extra = sorted(k for k, v in m.items() if k not in ("role", "content", *allowed) and v is not None)
        if extra:  # dropping them would train on a different conversation than the data holds
            raise DataError(source, f"{name}[{i}].{extra[0]}", f"turn {i}: message key(s) {extra} are not supported "
                            f"in a {m['role']!r} turn (dpolab renders 'role', 'content', an assistant's 'tool_calls' "
                            "and a tool's 'tool_call_id' and 'name'); remove them from the data")
        if calls is not None and not isinstance(calls, list | tuple):
            raise DataError(source, f"{name}[{i}].tool_calls", f"turn {i}: expected a list, got {type(calls).__name__}")
        out.append({"role": m["role"], "content": m.get("content") or "",
                    **{k: m[k] for k in allowed if m.get(k) is not None}})
    return tuple(out)


def _did_you_mean(value, options) -> str:
    close = difflib.get_close_matches(str(value), list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_turns(messages, source: str, name: str) -> None:
    """Each message a dict with a known string role (checked before the record's form is guessed from roles)."""
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise DataError(source, f"{name}[{i}]", f"turn {i}: expected a message dict, got {type(m).__name__}")
        if "role" not in m:
            raise DataError(source, f"{name}[{i}].role", f"turn {i}: missing key 'role'")
        if m["role"] not in ROLES:
            raise DataError(source, f"{name}[{i}].role", f"turn {i}: unknown role {m['role']!r}"
                            f"{_did_you_mean(m['role'], ROLES)}, expected one of {ROLES}")


def check_roles(messages: tuple[Message, ...], source: str, name: str, first: int = 0, *,
                side: str = "response", numbered_from: int = 0) -> None:
    """Roles must read ``[system] user assistant [tool …] assistant user …``: a prompt (``side="prompt"``) starts
    with a user turn and ends on a user or tool turn; a response side starts and ends on an assistant turn; a tool
    turn follows an assistant or tool turn. ``first`` is where ``messages`` starts in the whole conversation; the
    turn index in an error is the index within the field, plus ``numbered_from``.
    """
    last = len(messages) - 1

    def fail(i: int, reason: str):
        turn = i + numbered_from
        raise DataError(source, f"{name}[{turn}].role", f"turn {turn}: {reason}")

    for i, m in enumerate(messages):
        if m["role"] == "system" and first + i != 0:
            fail(i, "a system message is only allowed first")
        if i > 0 and messages[i - 1]["role"] == m["role"] and m["role"] != "tool":
            fail(i, f"two {m['role']!r} turns in a row")
        if i > 0 and m["role"] == "tool" and messages[i - 1]["role"] not in ("assistant", "tool"):
            fail(i, "a tool turn must follow an assistant turn (the call) or another tool turn")
    if side == "prompt":
        i = 1 if messages[0]["role"] == "system" else 0
        if i > last or messages[i]["role"] != "user":
            fail(min(i, last), "the conversation must start with a user turn (after an optional system message)")
        if messages[last]["role"] not in ("user", "tool"):
            fail(last, "the prompt must end with a user turn (or a tool turn)")
    else:
        if messages[0]["role"] != "assistant":
            fail(0, "the response must start with an assistant turn")
        if messages[last]["role"] != "assistant":
            fail(last, "the response must end with an assistant turn")


def template_columns(record: Mapping, source: str = "") -> tuple[tuple | None, dict | None]:
    """A record's own ``tools`` (a list of schemas, or its JSON text, as trl reads it) and ``chat_template_kwargs``
    (a dict) columns; ``(None, None)`` when it has neither."""
    tools, kwargs = record.get("tools"), record.get("chat_template_kwargs")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise DataError(source, "tools", f"not valid JSON ({err.msg} at column {err.colno})") from None
    if tools is not None and not isinstance(tools, list | tuple):
        raise DataError(source, "tools", f"expected a list of tool schemas, got {type(tools).__name__}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise DataError(source, "chat_template_kwargs", f"expected a dict, got {type(kwargs).__name__}")
    return (None if tools is None else tuple(tools)), (None if kwargs is None else dict(kwargs))


def split_hh(transcript: str, source: str = "", name: str = "chosen") -> tuple[str, str]:
    """Split an HH-RLHF transcript into (prompt up to and including the last ``"\\n\\nAssistant:"``, response).

    A transcript that ends on a Human turn is refused, as a message list ending on a user turn is.
    """
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError(source, name, f"no {HH_ASSISTANT!r} marker: not an HH-RLHF transcript")
    cut += len(HH_ASSISTANT)
    if HH_HUMAN in transcript[cut:]:
        raise DataError(source, name, "the transcript ends on a Human turn (after its last Assistant turn); the last "
                        "turn must be the Assistant's response")
    return transcript[:cut], transcript[cut:]


def shared_history(chosen: list | tuple, rejected: list | tuple) -> int:
    """Length of the prompt of two full conversations: their longest common prefix of messages, backed off so
    that both response sides start with an assistant turn."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k > 0 and not (_role(chosen, k) == _role(rejected, k) == "assistant"):
        k -= 1
    return k


def _role(messages, k: int):
    return messages[k].get("role") if k < len(messages) and isinstance(messages[k], Mapping) else None


def example_from_record(record: Mapping, source: str = "", format: str = "auto") -> PreferenceExample:
    """Build a validated :class:`PreferenceExample` from one record of any supported form (see module doc)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if not isinstance(record, Mapping):
        raise DataError(source, None, f"expected a JSON object with keys prompt/chosen/rejected, got "
                        f"{type(record).__name__}")
    missing = [k for k in RECORD_KEYS if k not in record]
    for key in record:  # a misspelt key names itself, instead of making the row look like another format
        close = difflib.get_close_matches(str(key), missing, n=1, cutoff=0.75) if key not in RECORD_KEYS else []
        if close:
            raise DataError(source, str(key), f"unknown key (did you mean {close[0]!r}?)")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise DataError(source, key, "missing key")
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    columns = template_columns(record, source)
    for key, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if isinstance(value, list | tuple):  # roles first: the format and the prompt are guessed from them
            _check_turns(value, source, key)
    if format == "auto":
        if isinstance(chosen, str):
            format = "text" if "prompt" in record else "hh"
        elif isinstance(prompt, str):
            format = "ultrafeedback"
        else:
            format = "conversational"
    if format == "text":
        if "prompt" not in record:
            raise DataError(source, "prompt", "missing key")
        return PreferenceExample(prompt, chosen, rejected, source, *columns)
    if format == "hh":
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str):
                raise DataError(source, key, f"an HH-RLHF transcript must be a string, got {type(value).__name__}")
        prompt, chosen = split_hh(chosen, source, "chosen")
        prompt_r, rejected = split_hh(rejected, source, "rejected")
        if prompt_r != prompt:
            raise DataError(source, "rejected", "its history (up to the last Assistant turn) differs from 'chosen'")
        return PreferenceExample(prompt, chosen, rejected, source, *columns)
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, list | tuple):
            raise DataError(source, key, f"expected a message list, got {type(value).__name__}")
        if not value:
            raise DataError(source, key, "empty message list")
    if _role(chosen, 0) == "assistant":  # response sides only, the prompt is given
        if prompt is None:
            raise DataError(source, "prompt", "missing key (the responses hold no history to take it from)")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list | tuple):
            raise DataError(source, "prompt", f"expected a string or a message list, got {type(prompt).__name__}")
        return PreferenceExample(tuple(prompt), tuple(chosen), tuple(rejected), source, *columns)
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        roles = [m["role"] for m in value]
        if "assistant" not in roles:
            raise DataError(source, key, "no assistant turn: the conversation needs the assistant's response")
        if roles[-1] != "assistant":
            raise DataError(source, f"{key}[{len(roles) - 1}].role", f"turn {len(roles) - 1}: the conversation ends "
                            f"with a {roles[-1]!r} turn; it must end with the assistant's response")
    k = shared_history(chosen, rejected)  # full conversations: the prompt is their shared history
    if k == 0:
        if list(chosen) == list(rejected):
            raise DataError(source, "rejected", "identical to 'chosen'; the pair carries no preference")
        raise DataError(source, "rejected", "'chosen' and 'rejected' share no history that ends before an "
                        "assistant turn; cannot extract the prompt")
    if isinstance(prompt, str) and not any(isinstance(m, Mapping) and m.get("content") == prompt for m in chosen[:k]):
        raise DataError(source, "prompt", "the prompt text is not a turn of the history shared by 'chosen' and "
                        "'rejected'")
    return PreferenceExample(tuple(chosen[:k]), tuple(chosen[k:]), tuple(rejected[k:]), source, *columns)
