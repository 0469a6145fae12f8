"""From preference examples to truncated token ids: one pair, one scored response, or a whole dataset with a report.

Each side is rendered by :func:`dpolab.data.render.render_response` (the prompt/response boundary, BOS/EOS, chat
turns and the multi-turn mask, special-token text; see that module). Then:

Truncation (per pair, prompt shared): if prompt + longest response exceeds ``max_length``, the prompt keeps its
end (and its BOS), cut down to ``max(max_prompt_length, max_length - longest response)``; then responses keep
their start within what is left. A pair with no room for a response token, or with no scored token left, is
dropped: :class:`TruncationError` (``on_error="skip"`` counts it by reason in the report).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from dpolab.data.records import PreferenceExample
from dpolab.data.render import Prompt, Response, TokenizationError, bos_prefix, render_response, template_args

PROMPT_FILLS = "the prompt fills the length budget, no response token fits"
NO_SCORED = "no scored response token survives truncation"
IDENTICAL = "chosen and rejected are identical after truncation"


class TruncationError(TokenizationError):
    """No response token (or no scored token) survives truncation; the row is dropped. ``why`` is the short reason."""

    def __init__(self, source: str, field: str | None, why: str, detail: str):
        super().__init__(source, field, f"{why} ({detail})")
        self.why = why


@dataclass
class TokenizeConfig:
    """How examples become token ids (each policy: :mod:`dpolab.data.render`, truncation: this module)."""

    max_length: int = 512
    """Most prompt + response tokens in one sequence."""
    max_prompt_length: int | None = None
    """The prompt is never cut below this many tokens to make room for a response; ``1 <= max_prompt_length <
    max_length``. None (default): 256, or ``max_length - 1`` when that is smaller."""
    boundary: str = "error"
    """``"error"`` or ``"repair"`` when tokens(prompt) is not a prefix of tokens(prompt + response)."""
    mask_policy: str = "final_turn"
    """Multi-turn scoring: ``"final_turn"`` or ``"all_assistant"`` (every assistant turn of the response side)."""
    add_eos: bool = True
    """End every plain-text response with the tokenizer's EOS."""
    special_tokens: str = "error"
    """Data text holding a special token's literal text: ``"error"`` (default), or ``"allow"`` it to become that
    token. A plain-text response may always end with the EOS text (it is then not added twice)."""
    tools: list = field(default_factory=list)
    """Tool schemas passed to the chat template (a row's own ``tools`` column replaces them); empty: none."""
    chat_template_kwargs: dict = field(default_factory=dict)
    """Extra arguments of the chat template, e.g. ``{"enable_thinking": False}`` (a row's own column updates them)."""
    completion_only_loss: bool = True
    """trl's name: an SFT prompt/completion row scores only its completion; False scores every token."""
    assistant_only_loss: bool = False
    """trl's name: an SFT ``messages`` row scores only its assistant turns; False (trl's default) every token."""

    def __post_init__(self):
        if self.boundary not in ("error", "repair"):
            raise ValueError(f"boundary must be 'error' or 'repair', got {self.boundary!r}")
        if self.mask_policy not in ("final_turn", "all_assistant"):
            raise ValueError(f"mask_policy must be 'final_turn' or 'all_assistant', got {self.mask_policy!r}")
        if self.special_tokens not in ("error", "allow"):
            raise ValueError(f"special_tokens must be 'error' or 'allow', got {self.special_tokens!r}")
        if self.max_prompt_length is None:
            self.max_prompt_length = min(256, self.max_length - 1) if isinstance(self.max_length, int) else 256
        for name in ("max_length", "max_prompt_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"TokenizeConfig.{name} must be an int, got {type(value).__name__} {value!r}")
        # a prompt of 0 tokens leaves the first response token with nothing before it: it can never be scored
        if self.max_prompt_length < 1:
            raise ValueError(f"TokenizeConfig.max_prompt_length must be >= 1, got {self.max_prompt_length}")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"TokenizeConfig.max_prompt_length ({self.max_prompt_length}) must be smaller than "
                             f"max_length ({self.max_length}), else no response token fits")


@dataclass
class TokenizedPair:
    """One pair as token ids; the prompt is shared, each response is the tokens after it."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_mask: list[int]
    rejected_mask: list[int]
    truncated: bool = False
    repaired: bool = False


def pad_token_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, or its EOS when it has none (GPT-2, Llama).

    Padding never reaches the loss (labels and attention masks exclude it), so any id is correct; EOS is the usual
    choice for tokenizers without a pad token.
    """
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def truncate_ids(prompt_ids: list[int], sides: list[tuple[list[int], list[int]]], config: TokenizeConfig, keep: int,
              source: str, names: list[str]) -> tuple[list[int], list[tuple[list[int], list[int]]], bool]:
    """Apply the truncation policy (module docstring) to a prompt shared by one or more (ids, mask) responses."""
    longest = max(len(ids) for ids, _ in sides)
    if len(prompt_ids) + longest <= config.max_length:
        return prompt_ids, sides, False
    budget = max(config.max_prompt_length, config.max_length - longest)
    if len(prompt_ids) > budget:
        prompt_ids = prompt_ids[:keep] + prompt_ids[len(prompt_ids) - max(budget - keep, 0):]
    room = config.max_length - len(prompt_ids)
    if room <= 0:
        raise TruncationError(source, "prompt", PROMPT_FILLS, f"{len(prompt_ids)} prompt tokens kept with "
                              f"max_prompt_length={config.max_prompt_length}, max_length={config.max_length}")
    cut = [(ids[:room], mask[:room]) for ids, mask in sides]
    for name, (_, mask) in zip(names, cut):
        if sum(mask) == 0:
            raise TruncationError(source, name, NO_SCORED, f"{room} response tokens fit")
    return prompt_ids, cut, True


def leading_bos(prompt_ids: list[int], tokenizer) -> int:
    """How many leading ids of ``prompt_ids`` are the tokenizer's BOS prefix (kept when the prompt is cut)."""
    lead = bos_prefix(tokenizer)
    return len(lead) if lead and prompt_ids[:len(lead)] == lead else 0


def tokenize_response(prompt: Prompt, response: Response, tokenizer, config: TokenizeConfig | None = None, *,
                      source: str = "") -> tuple[list[int], list[int], list[int]]:
    """Token ids of one (prompt, response), truncated: ``(prompt_ids, response_ids, response_mask)``.

    Used wherever a single response is scored (implicit reward, SFT, evaluation). A string response to a
    message-list prompt is one assistant turn.
    """
    config = config or TokenizeConfig()
    r = render_response(prompt, response, tokenizer, config, source=source)
    prompt_ids, [(ids, mask)], _ = truncate_ids(r.prompt_ids, [(r.response_ids, r.response_mask)], config,
                                              leading_bos(r.prompt_ids, tokenizer), source, ["response"])
    return prompt_ids, ids, mask


def tokenize_pair(example: PreferenceExample, tokenizer, config: TokenizeConfig | None = None) -> TokenizedPair:
    """Token ids of a preference pair with a shared prompt; raises a :class:`TokenizationError` naming the row."""
    config = config or TokenizeConfig()
    src, template = example.source, template_args(config, example.tools, example.chat_template_kwargs)
    c = render_response(example.prompt, example.chosen, tokenizer, config, source=src, name="chosen", template=template)
    r = render_response(example.prompt, example.rejected, tokenizer, config, source=src, name="rejected",
                        template=template)
    if c.prompt_ids != r.prompt_ids:  # cannot happen: the prompt is tokenized alone on both sides
        raise TokenizationError(src, "prompt", "prompt tokenized differently for chosen and rejected")
    prompt_ids, [(ci, cm), (ri, rm)], truncated = truncate_ids(
        c.prompt_ids, [(c.response_ids, c.response_mask), (r.response_ids, r.response_mask)], config,
        leading_bos(c.prompt_ids, tokenizer), src, ["chosen", "rejected"],
    )
    if ci == ri and cm == rm:  # the responses differed only in what was cut: a margin of exactly 0, no preference
        if truncated:
            raise TruncationError(src, "rejected", IDENTICAL, f"they differ only after the first {len(ci)} response "
                                  f"tokens; max_length={config.max_length}")
        raise TokenizationError(src, "rejected", "tokenizes to the same ids as 'chosen'; the pair carries no preference")
    return TokenizedPair(prompt_ids, ci, ri, cm, rm, truncated=truncated, repaired=c.repaired or r.repaired)


@dataclass
class TokenizationReport:
    """What :func:`tokenize_examples` did, row counts with reasons."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    repaired: int = 0
    dropped: Counter = field(default_factory=Counter)
    """Rows dropped by truncation, by reason."""
    errors: list[str] = field(default_factory=list)
    """Every skipped row's error (drops included), in order."""
    index: list[int] = field(default_factory=list)
    """Positions in the input of the kept rows (pass to ``collate_pairs(index=...)``)."""

    def __str__(self) -> str:
        drops = ", ".join(f"{n} {why}" for why, n in self.dropped.items()) or "none"
        return (f"{self.rows} rows: {self.kept} kept, {self.truncated} truncated, {self.repaired} boundary-repaired, "
                f"{len(self.errors)} skipped (dropped by truncation: {drops})")


def tokenize_examples(examples, tokenizer, config: TokenizeConfig | None = None,
                      on_error: str = "raise") -> tuple[list[TokenizedPair], TokenizationReport]:
    """Tokenize every example; returns all pairs and the report only once the whole input is done.

    Args:
        examples: An iterable of :class:`PreferenceExample` (a list, or a lazy loader).
        tokenizer: A Hugging Face tokenizer (a chat template is needed for conversational examples).
        config: The policies; defaults to ``TokenizeConfig()``.
        on_error: ``"raise"`` stops at the first bad row; ``"skip"`` leaves it out and records it in the report;
            ``"drop"`` leaves out only rows that truncation makes unusable (:class:`TruncationError`, counted by
            reason) and raises at any other bad row.
    """
    if on_error not in ("raise", "skip", "drop"):
        raise ValueError(f"on_error must be 'raise', 'skip' or 'drop', got {on_error!r}")
    config = config or TokenizeConfig()
    pairs, report = [], TokenizationReport()
    for i, example in enumerate(examples):
        report.rows += 1
        try:
            pair = tokenize_pair(example, tokenizer, config)
        except TokenizationError as err:
            if on_error == "raise" or (on_error == "drop" and not isinstance(err, TruncationError)):
                raise
            report.errors.append(str(err))
            if isinstance(err, TruncationError):
                report.dropped[err.why] += 1
            continue
        pairs.append(pair)
        report.index.append(i)
        report.truncated += pair.truncated
        report.repaired += pair.repaired
    report.kept = len(pairs)
    return pairs, report
