"""A token-level view of one preference row, for when a run looks wrong.

Every token of prompt+chosen and prompt+rejected is labelled with its part:

- ``prompt``: context, never scored; ``prompt·cut``: removed by truncation (the prompt keeps its end);
- ``chosen`` / ``rejected``: scored response tokens (labels = ids);
- ``masked``: response-side tokens that are not scored (user turns, turn headers, template formatting);
- ``cut``: response tokens removed by truncation.

The header flags what the tokenizer would otherwise hide: boundary merges (the prompt's last token fuses with
the response's first, see :mod:`dpolab.data.tokenize`), chat template instability, a duplicated BOS, a missing EOS,
truncation, and the reason a row would be dropped. The inspector never raises on these; it shows them.
"""

from __future__ import annotations

from dpolab.data.records import PreferenceExample
from dpolab.data.render import TokenizationError, render_response, template_args, turn_end_ids
from dpolab.data.tokenize import TokenizeConfig, TruncationError, leading_bos, truncate_ids


def token_table(example: PreferenceExample, tokenizer,
                config: TokenizeConfig | None = None) -> tuple[list[dict], list[str]]:
    """Rows ``{"side", "pos", "id", "token", "part"}`` for prompt, chosen and rejected tokens, and the flags."""
    config = config or TokenizeConfig()
    flags: list[str] = []
    sides = {}
    for name in ("chosen", "rejected"):
        try:
            sides[name] = render_response(example.prompt, getattr(example, name), tokenizer, config,
                                          source=example.source, name=name, strict=False,
                                          template=template_args(config, example.tools, example.chat_template_kwargs))
        except TokenizationError as err:
            flags.append(f"ERROR {err}")
    if len(sides) < 2:
        return [], flags
    c, r = sides["chosen"], sides["rejected"]
    for name, side in sides.items():
        for merge in side.merges:
            action = ("repaired (pieces tokenized separately)" if config.boundary == "repair"
                      else "error with boundary='error'")
            flags.append(f"BOUNDARY MERGE ({name}) {merge}: {action}")
        flags += [f"TEMPLATE UNSTABLE ({name}) {note}" for note in side.unstable]
    bos = tokenizer.bos_token_id
    if bos is not None and c.prompt_ids[:2] == [bos, bos]:
        flags.append("BOS DUPLICATED at the start of the prompt")
    eos_ok = {n: s.response_mask[-1] == 1 and s.response_ids[-1] in turn_end_ids(tokenizer) for n, s in sides.items()}
    flags += [f"NO EOS: the {n} response does not end with an end token" for n, ok in eos_ok.items() if not ok]
    keep = leading_bos(c.prompt_ids, tokenizer)
    try:
        prompt_ids, cut_sides, truncated = truncate_ids(
            c.prompt_ids, [(c.response_ids, c.response_mask), (r.response_ids, r.response_mask)], config, keep,
            example.source, ["chosen", "rejected"],
        )
        prompt_cut = len(c.prompt_ids) - len(prompt_ids)
        kept = [len(ids) for ids, _ in cut_sides]
        if truncated:
            flags.append(f"TRUNCATED: {prompt_cut} prompt tokens cut from the start (after {keep} BOS), responses "
                         f"keep {kept[0]}/{len(c.response_ids)} and {kept[1]}/{len(r.response_ids)} tokens")
    except TruncationError as err:
        flags.append(f"DROPPED: {err}")
        prompt_cut, kept = 0, [len(c.response_ids), len(r.response_ids)]
    rows = []
    for pos, tid in enumerate(c.prompt_ids):
        part = "prompt·cut" if keep <= pos < keep + prompt_cut else "prompt"
        rows.append({"side": "prompt", "pos": pos, "id": tid, "token": _show(tokenizer, tid), "part": part})
    for (name, side), n_kept in zip(sides.items(), kept):
        for pos, (tid, m) in enumerate(zip(side.response_ids, side.response_mask)):
            part = "cut" if pos >= n_kept else (name if m else "masked")
            rows.append({"side": name, "pos": pos, "id": tid, "token": _show(tokenizer, tid), "part": part})
    return rows, flags


def _show(tokenizer, tid: int) -> str:
    return repr(tokenizer.decode([tid], skip_special_tokens=False, clean_up_tokenization_spaces=False))


def inspect_pair(example: PreferenceExample, tokenizer, config: TokenizeConfig | None = None) -> str:
    """A printable report of one row: flags first, then one line per token with its part.

    Args:
        example: The row to look at.
        tokenizer: The tokenizer the run uses.
        config: The run's tokenization config (boundary, mask policy, lengths).

    Returns:
        Text such as::

            row train.jsonl:row 3 · boundary=error · mask_policy=final_turn
            BOUNDARY MERGE (chosen) after 'The movie ': ...
            side      pos     id  part        token
            prompt      0    285  prompt      'The'
    """
    config = config or TokenizeConfig()
    rows, flags = token_table(example, tokenizer, config)
    lines = [f"row {example.source or '<example>'} · boundary={config.boundary} · mask_policy={config.mask_policy} "
             f"· max_length={config.max_length}"]
    lines += flags or ["no problems found"]
    lines.append(f"{'side':<9}{'pos':>4}{'id':>8}  {'part':<11} token")
    for row in rows:
        lines.append(f"{row['side']:<9}{row['pos']:>4}{row['id']:>8}  {row['part']:<11} {row['token']}")
    return "\n".join(lines)
