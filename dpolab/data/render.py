"""One (prompt, response) as token ids before truncation: the prompt/response boundary, BOS/EOS, multi-turn masks
(:mod:`dpolab.data.tokenize` truncates the result and builds pairs).

Every sequence is rendered *jointly* (prompt + response tokenized as one text, the way the model reads it) and
split where the prompt's own tokens end. Each split point is checked: ``tokens(prompt)`` must be a prefix of
``tokens(prompt + response)``. Byte-level BPE breaks this when the prompt ends with a space ("The movie " +
"was" tokenizes to "The", " movie", " was": the space merged into the response's first token), so the prompt
the model is trained on differs from the prompt it sees at inference, and prompt+chosen and prompt+rejected
disagree at the boundary. ``boundary="error"`` (default) raises; ``boundary="repair"`` tokenizes each piece
*separately* and concatenates (prompt ids exactly as at inference, then the response's own ids), checks that
the ids still decode to the same text, and marks the pair ``repaired`` (counted in the report).

Special tokens:

- BOS: the tokenizer's own policy (what ``tokenizer("a")`` prepends: ``<s>`` for Llama, nothing for GPT-2),
  applied once; not added again when the text (e.g. a chat template) already starts with it.
- EOS: a plain-text response ends with ``eos_token_id`` (not doubled when the text already ends with it). A chat
  turn ends with the template's turn-end token (the last special token of the turn, e.g. ``<|im_end|>``); the
  template's formatting after it (``"\\n"``) is dropped from the final turn and unscored in earlier turns.
- A response cut by truncation keeps its start and does not end with EOS, because it did not end there.

Multi-turn (``mask_policy``): the prompt is the history rendered with the generation prompt; the response side
may hold several turns (assistant, user, assistant, …). ``"final_turn"`` scores only the last assistant turn's
tokens; ``"all_assistant"`` scores every assistant turn of the response side; user turns and turn headers are
never scored. Tool turns (the results of an assistant turn's ``tool_calls``) are never scored either, under both
policies; an assistant turn that calls a tool is an assistant turn: scored under ``"all_assistant"``, and under
``"final_turn"`` when it is the last one. Consecutive turns that are not the assistant's (tool results, or tool
results then a user turn) are rendered as one unscored piece, since templates group them (Qwen's
``<tool_response>`` blocks). ``tools`` and ``chat_template_kwargs`` (e.g. ``enable_thinking``) go to every
``apply_chat_template`` call (:func:`template_args`); a template that would ignore given tools or ``tool_calls``
is refused (:class:`TemplateError`) rather than silently training on a conversation without them. The template
must render the history as a stable prefix when a turn is added, else :class:`TemplateError`. Which losses the
policy leaves unchanged:

- Every loss is unchanged when the response side holds a single assistant turn (the masks are equal).
- With more turns, ``all_assistant`` adds the earlier turns' log-probs to ``log π(y|x)`` of each side. Losses
  that see the responses only through the *difference* of summed log-ratios, h = β[(log π_θ − log π_ref)(y_w)
  − (log π_θ − log π_ref)(y_l)] (sigmoid DPO Eq. 7, conservative/robust DPO, IPO-sum, hinge) or of summed
  log-probs (reference-free), are invariant, in value and gradient, exactly when the extra scored tokens are
  the same tokens in the same context on both sides, because they then cancel. A prompt taken as the longest
  common prefix of messages puts such shared turns into the prompt, so for those rows these losses *do* change.
- Length-normalised losses (SimPO, IPO with per-token means), the SFT/NLL term, and the per-side metrics
  (``rewards/chosen``, ``logps/chosen``, lengths) change whenever extra turns are scored, shared or not.
- At θ = θ_ref all log-ratios vanish, so reference-based loss *values* agree at the first step (log 2 for
  sigmoid DPO), but not their gradients. ``tests/test_tokenize.py`` checks each of these statements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dpolab.data.records import DataError, Message

if TYPE_CHECKING:
    from dpolab.data.tokenize import TokenizeConfig

Prompt = str | tuple[Message, ...] | list[Message]
Response = str | tuple[Message, ...] | list[Message]


class TokenizationError(DataError):
    """A row that cannot be tokenized as asked; names the source, the field and the reason."""


class BoundaryError(TokenizationError):
    """``tokens(prompt)`` is not a prefix of ``tokens(prompt + response)`` (tokens merge across the boundary)."""


class TemplateError(TokenizationError):
    """The chat template renders the history differently once a turn is added."""


@dataclass
class Rendered:
    """One (prompt, response) as ids plus what the checks found; the inspector shows these fields."""

    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[int]
    repaired: bool = False
    merges: list[str] = field(default_factory=list)
    """Boundary merges found (each: the prompt-side tokens vs. the joint tokens)."""
    unstable: list[str] = field(default_factory=list)
    """Template instabilities found (only filled when ``strict=False``)."""


def _enc(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def bos_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer itself puts before a text (its BOS policy), e.g. ``[1]`` for Llama, ``[]`` for GPT-2."""
    plain, full = _enc(tokenizer, "a"), tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def turn_end_ids(tokenizer) -> set[int]:
    """Ids that can end a chat turn: every special added token (``<|im_end|>``, ``<|eot_id|>``, …) and EOS."""
    ids = {i for i, tok in tokenizer.added_tokens_decoder.items() if getattr(tok, "special", False)}
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _split_pieces(pieces: list[str], tokenizer, repair: bool, source: str,
                  name: str) -> tuple[list[list[int]], list[str]]:
    """Tokenize ``"".join(pieces)`` once and cut it at every piece boundary, checking each cut is a token boundary.

    Returns the per-piece ids and the merges found; a merge raises :class:`BoundaryError` unless ``repair``, which
    tokenizes every piece on its own instead (checked to decode to the same text).
    """
    text = "".join(pieces)
    joint = _enc(tokenizer, text)
    cuts, merges, prefix = [0], [], ""
    for piece in pieces[:-1]:
        prefix += piece
        alone = _enc(tokenizer, prefix)
        if joint[:len(alone)] != alone:
            common = next(i for i, (a, b) in enumerate(zip(alone + [-1], joint + [-2])) if a != b)
            merges.append(f"after {prefix[-12:]!r}: alone it ends {_decode(tokenizer, alone[common:])!r}, "
                          f"jointly {_decode(tokenizer, joint[common:len(alone) + 1])!r}")
        cuts.append(len(alone))
    if not merges:
        cuts.append(len(joint))
        return [joint[a:b] for a, b in zip(cuts, cuts[1:])], merges
    if not repair:
        raise BoundaryError(source, name, f"tokens merge across the prompt/response boundary ({merges[0]}); end the "
                            "prompt on a token boundary (e.g. move a trailing space into the response) or pass "
                            "boundary='repair'")
    parts = [_enc(tokenizer, piece) for piece in pieces]
    if _decode(tokenizer, [i for p in parts for i in p]) != _decode(tokenizer, joint):
        raise BoundaryError(source, name, f"tokens merge across a boundary ({merges[0]}) and tokenizing the pieces "
                            "separately changes the text, so boundary='repair' cannot fix this row")
    return parts, merges


def template_args(config: TokenizeConfig, tools=None, kwargs=None) -> dict:
    """The extra arguments of ``apply_chat_template`` for one row: its own ``tools`` (else the config's; none when
    empty, as trl passes them) and the config's ``chat_template_kwargs`` updated with the row's own."""
    tools = tools if tools is not None else config.tools
    return {**(config.chat_template_kwargs or {}), **(kwargs or {}), **({"tools": list(tools)} if tools else {})}


def check_template(tokenizer, conv: list, template: dict, source: str, name: str, n: int = 0) -> None:
    """Refuse a tokenizer without a chat template, and tools or tool calls that its template would not render (its
    source never names them). ``conv[:n]`` is the prompt, the rest the field ``name``."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise TemplateError(source, name, "the tokenizer has no chat template; conversational data needs one")
    text = str(tokenizer.chat_template)
    if template.get("tools") and "tools" not in text:
        raise TemplateError(source, name, "tools were given, but the chat template does not render them")
    for j, m in enumerate(conv):
        if m.get("tool_calls") and "tool_calls" not in text:
            where = f"prompt[{j}]" if j < n else f"{name}[{j - n}]"
            raise TemplateError(source, f"{where}.tool_calls", "the chat template does not render tool calls, so "
                                "training would drop them; use the model's own template (with tool support)")


def _chat_pieces(prompt, response, tokenizer, source: str, name: str, strict: bool, unstable: list[str],
                 template: dict):
    """Cut the rendered conversation into pieces: the prompt with its generation prompt, then per response turn
    a header (assistant turns after the first) and a body; consecutive turns that are not the assistant's are one
    piece. Returns (pieces, kinds) with kinds in ``{"prompt", "header", "user", "tool", "assistant"}``."""

    def render(messages, generation: bool) -> str:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation,
                                             **template)

    conv, n = list(prompt) + list(response), len(prompt)
    check_template(tokenizer, conv, template, source, name, n)
    pieces, kinds, done = [render(prompt, True)], ["prompt"], render(prompt, True)
    for j in range(n, len(conv)):
        role = conv[j]["role"]
        if role != "assistant" and j + 1 < len(conv) and conv[j + 1]["role"] != "assistant":
            continue  # rendered together with the next turn: templates group tool results
        if role == "assistant" and j > n:
            header = render(conv[:j], True)
            if not header.startswith(done):
                _unstable(unstable, strict, source, name, j - n, "the history rendered with the generation prompt")
                header = done + header[len(_common(done, header)):]
            pieces.append(header[len(done):])
            kinds.append("header")
            done = header
        full = render(conv[:j + 1], False)
        if not full.startswith(done):
            _unstable(unstable, strict, source, name, j - n, "adding this turn re-renders the earlier text")
            full = done + full[len(_common(done, full)):]
        pieces.append(full[len(done):])
        kinds.append(role)
        done = full
    return pieces, kinds


def _common(a: str, b: str) -> str:
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return a[:k]


def _unstable(notes: list[str], strict: bool, source: str, name: str, turn: int, what: str) -> None:
    message = f"turn {turn}: chat template instability: {what} is not a prefix of the longer rendering"
    if strict:
        raise TemplateError(source, name, message)
    notes.append(message)


def special_texts(tokenizer) -> list[str]:
    """The literal texts of the tokenizer's special tokens (``<|endoftext|>``, ``<|im_end|>``, …)."""
    texts = set(getattr(tokenizer, "all_special_tokens", []) or [])
    texts |= {str(t) for t in tokenizer.added_tokens_decoder.values() if getattr(t, "special", False)}
    return sorted((t for t in texts if t), key=len, reverse=True)


def check_special_text(value: Prompt | Response, tokenizer, source: str, name: str,
                       trailing_eos: bool = False) -> None:
    """Raise when data text holds a special token's literal text, which the tokenizer would turn into the real
    token (e.g. ``<|endoftext|>`` inside a response would be scored as an end of text). A plain-text prompt
    may start with the BOS text, a plain-text response (``trailing_eos``) may end with the EOS text."""
    texts = special_texts(tokenizer)
    if not texts:
        return
    if isinstance(value, str):
        bos, eos = tokenizer.bos_token, tokenizer.eos_token
        if not trailing_eos and bos and value.startswith(bos):
            value = value[len(bos):]
        if trailing_eos and eos and value.endswith(eos):
            value = value[: -len(eos)]
        items = [(name, value)]
    else:
        items = [(f"{name}[{i}].content", m["content"]) for i, m in enumerate(value)]
    for field_name, text in items:
        for special in texts:
            at = text.find(special)
            if at >= 0:
                raise TokenizationError(source, field_name, f"contains the special token text {special!r} at "
                                        f"character {at}; it would become the real special token. Remove it, or "
                                        "pass special_tokens='allow' if that is what the data means")


def render_response(prompt: Prompt, response: Response, tokenizer, config: TokenizeConfig, *, source: str = "",
                    name: str = "response", strict: bool = True, template: dict | None = None) -> Rendered:
    """Tokenize one (prompt, response) without truncation: ids, scored-token mask, and the boundary checks.

    A string response to a message-list prompt is taken as one assistant turn. ``strict=False`` (the inspector)
    records merges and template instabilities instead of raising. ``template``: the extra arguments of the chat
    template (:func:`template_args`; default: the config's).
    """
    template = template_args(config) if template is None else template
    repair = config.boundary == "repair" or not strict
    if strict and config.special_tokens == "error":
        check_special_text(prompt, tokenizer, source, "prompt")
        check_special_text(response, tokenizer, source, name, trailing_eos=True)
    lead = bos_prefix(tokenizer)
    unstable: list[str] = []
    if isinstance(prompt, str):
        if not isinstance(response, str):
            raise TokenizationError(source, name, "a text prompt needs a string response")
        pieces, kinds = [prompt, response], ["prompt", "assistant"]
    else:
        if isinstance(response, str):
            response = ({"role": "assistant", "content": response},)
        pieces, kinds = _chat_pieces(prompt, response, tokenizer, source, name, strict, unstable, template)
    parts, merges = _split_pieces(pieces, tokenizer, repair, source, name)
    prompt_ids = parts[0]
    if lead and prompt_ids[:len(lead)] != lead:
        prompt_ids = lead + prompt_ids
    ends, eos = turn_end_ids(tokenizer), tokenizer.eos_token_id
    last_assistant = max(i for i, k in enumerate(kinds) if k == "assistant")
    response_ids: list[int] = []
    mask: list[int] = []
    for i in range(1, len(parts)):
        ids, kind = parts[i], kinds[i]
        scored = kind == "assistant" and (i == last_assistant or config.mask_policy == "all_assistant")
        if kind == "assistant" and not isinstance(prompt, str):
            stop = max((k for k, t in enumerate(ids) if t in ends), default=None)
            if stop is not None:
                body, tail = ids[:stop + 1], ids[stop + 1:]
                if i == last_assistant:
                    tail = []
                response_ids += body + tail
                mask += [int(scored)] * len(body) + [0] * len(tail)
                continue
        if i == last_assistant and config.add_eos and (not ids or ids[-1] != eos):
            if eos is None:
                raise TokenizationError(source, name, "add_eos=True but the tokenizer has no eos_token_id")
            ids = ids + [eos]
        response_ids += ids
        mask += [int(scored)] * len(ids)
    if sum(mask) == 0:
        raise TokenizationError(source, name, "the response has no scored token")
    return Rendered(prompt_ids, response_ids, mask, repaired=bool(merges), merges=merges, unstable=unstable)
