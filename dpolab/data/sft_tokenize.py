"""SFT rows (:mod:`dpolab.data.sft_records`) as token ids and the mask of the tokens the NLL scores.

An SFT row becomes a :class:`dpolab.data.tokenize.TokenizedPair` with no rejected side: ``prompt_ids`` are the
context, ``chosen_ids`` / ``chosen_mask`` the sequence after it and its scored tokens, ``rejected_ids`` empty
(an SFT run trains on prompt + chosen, as it does on preference rows). What is scored, as trl's SFTTrainer:

=====================  ==========================================  ==============================================
form                   default                                     switch
=====================  ==========================================  ==============================================
prompt/completion      the completion (EOS included; a multi-turn  ``completion_only_loss=False``: every token
                       completion by ``mask_policy``)
messages               every token of the rendered conversation    ``assistant_only_loss=True``: every assistant
                                                                   turn (tool calls included), nothing else
text                   every token, EOS appended                   —
=====================  ==========================================  ==============================================

"Every token" is every token after the first: the sequence's first token (the BOS where the tokenizer adds one)
is the context, since nothing before it predicts it. Tool turns are never scored under ``assistant_only_loss``
(:mod:`dpolab.data.render`). Truncation keeps the start of a whole sequence (trl's ``keep_start``) and treats a
prompt/completion row as one side of a pair (:mod:`dpolab.data.tokenize`).
"""

from __future__ import annotations

import dataclasses

from dpolab.data.records import PreferenceExample
from dpolab.data.render import (
    TokenizationError,
    bos_prefix,
    check_special_text,
    check_template,
    render_response,
    template_args,
)
from dpolab.data.sft_records import CompletionExample
from dpolab.data.tokenize import TokenizeConfig, TokenizedPair, leading_bos, tokenize_pair, truncate_ids


def whole_sequence_ids(example: CompletionExample, tokenizer, config: TokenizeConfig, template: dict) -> list[int]:
    """Every token of a ``text`` row (plus EOS) or of a ``messages`` row rendered by the chat template, with the
    tokenizer's BOS in front (once)."""
    src = example.source
    if example.form == "text":
        if config.special_tokens == "error":
            check_special_text(example.completion, tokenizer, src, "text", trailing_eos=True)
        ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        if config.add_eos and (not ids or ids[-1] != eos):
            if eos is None:
                raise TokenizationError(src, "text", "add_eos=True but the tokenizer has no eos_token_id")
            ids = ids + [eos]
    else:
        messages = list(example.completion)
        if config.special_tokens == "error":
            check_special_text(messages, tokenizer, src, "messages")
        check_template(tokenizer, messages, template, src, "messages")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, **template)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    lead = bos_prefix(tokenizer)
    return ids if not lead or ids[:len(lead)] == lead else lead + ids


def tokenize_completion(example: CompletionExample, tokenizer, config: TokenizeConfig | None = None) -> TokenizedPair:
    """Token ids of an SFT row, truncated, as a pair without a rejected side (module docstring); raises a
    :class:`dpolab.data.render.TokenizationError` naming the row."""
    config = config or TokenizeConfig()
    src, template = example.source, template_args(config, example.tools, example.chat_template_kwargs)
    repaired, name = False, "completion" if example.form == "prompt_completion" else example.form
    if example.form == "messages" and config.assistant_only_loss:
        messages = example.completion
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        r = render_response(messages[:first], messages[first:], tokenizer,
                            dataclasses.replace(config, mask_policy="all_assistant"), source=src, name=name,
                            template=template)
        prompt_ids, ids, mask, repaired = r.prompt_ids, r.response_ids, r.response_mask, r.repaired
    elif example.form == "prompt_completion":
        r = render_response(example.prompt, example.completion, tokenizer, config, source=src, name=name,
                            template=template)
        prompt_ids, ids, mask, repaired = r.prompt_ids, r.response_ids, r.response_mask, r.repaired
        if not config.completion_only_loss:
            whole = prompt_ids + ids
            prompt_ids, ids, mask = whole[:1], whole[1:], [1] * (len(whole) - 1)
    else:
        whole = whole_sequence_ids(example, tokenizer, config, template)
        prompt_ids, ids, mask = whole[:1], whole[1:], [1] * (len(whole) - 1)
    if not any(mask):
        raise TokenizationError(src, name, "no token to score")
    prompt_ids, [(ids, mask)], truncated = truncate_ids(prompt_ids, [(ids, mask)], config,
                                                        leading_bos(prompt_ids, tokenizer), src, [name])
    return TokenizedPair(prompt_ids, ids, [], mask, [], truncated=truncated, repaired=repaired)


def tokenize_row(example: PreferenceExample | CompletionExample, tokenizer, config: TokenizeConfig) -> TokenizedPair:
    """A preference pair (:func:`dpolab.data.tokenize.tokenize_pair`) or an SFT row (:func:`tokenize_completion`)."""
    if isinstance(example, CompletionExample):
        return tokenize_completion(example, tokenizer, config)
    return tokenize_pair(example, tokenizer, config)
