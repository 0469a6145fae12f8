"""Tokenization of pairs: boundary checks, BOS/EOS, chat templates, masks, truncation, on three tokenizers.

Tokenizers: the tiny GPT-2 (byte-level BPE, no BOS), the tiny Llama (``<s>`` prepended, ChatML template whose
turn end ``<|im_end|>`` is not its EOS ``</s>``) and the embedded SmolLM2 (``<|im_start|>`` is its BOS and starts
every template turn, ``<|im_end|>`` is EOS and pad).
"""

import math

import pytest
import torch
from datasets import Dataset

from dpolab.data.batch import collate_pairs
from dpolab.data.inspector import inspect_pair, token_table
from dpolab.data.readers import iter_dataset
from dpolab.data.records import PreferenceExample, example_from_record
from dpolab.data.render import BoundaryError, TemplateError, bos_prefix
from dpolab.data.tokenize import (
    IDENTICAL,
    NO_SCORED,
    TokenizeConfig,
    TruncationError,
    tokenize_examples,
    tokenize_pair,
    tokenize_response,
)
from dpolab.models.tiny import tiny_causal_lm, tiny_tokenizer


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_bos_policy_of_each_tokenizer(smol):
    assert bos_prefix(tiny_tokenizer("gpt2")) == []
    assert bos_prefix(tiny_tokenizer("llama")) == [0]  # <s>
    assert bos_prefix(smol) == []  # SmolLM2 adds nothing to plain text; its template starts with <|im_start|>


def test_text_pair_is_the_joint_tokenization_with_bos_once_and_eos_last(tok):
    ex = PreferenceExample("The movie was", " great fun.", " awful.")
    pair = tokenize_pair(ex, tok)
    lead = bos_prefix(tok)
    assert pair.prompt_ids == lead + enc(tok, "The movie was")
    assert pair.prompt_ids + pair.chosen_ids == lead + enc(tok, "The movie was great fun.") + [tok.eos_token_id]
    assert pair.prompt_ids + pair.rejected_ids == lead + enc(tok, "The movie was awful.") + [tok.eos_token_id]
    assert pair.chosen_mask == [1] * len(pair.chosen_ids) and pair.rejected_mask == [1] * len(pair.rejected_ids)
    assert not pair.truncated and not pair.repaired


def test_bos_not_duplicated_when_text_already_has_it():
    llama = tiny_tokenizer("llama")
    pair = tokenize_pair(PreferenceExample("<s>The movie was", " great.", " bad."), llama)
    assert pair.prompt_ids[:2] == [0, 289] and pair.prompt_ids.count(0) == 1


def test_eos_not_duplicated_when_response_ends_with_it(tok):
    pair = tokenize_pair(PreferenceExample("The movie was", " great." + tok.eos_token, " bad."), tok)
    assert pair.chosen_ids[-1] == tok.eos_token_id and pair.chosen_ids[-2] != tok.eos_token_id
    no_eos = tokenize_pair(PreferenceExample("The movie was", " great.", " bad."), tok, TokenizeConfig(add_eos=False))
    assert no_eos.chosen_ids == enc(tok, " great.")


@pytest.mark.parametrize("prompt", ["The movie ", "Rate it: "])
def test_boundary_merge_is_caught(tok, prompt):
    """Byte-level BPE: a trailing space (or a word split mid-way) fuses with the response's first token."""
    assert enc(tok, prompt + "was great")[: len(enc(tok, prompt))] != enc(tok, prompt)  # the hazard is real here
    with pytest.raises(BoundaryError, match="boundary") as err:
        tokenize_pair(PreferenceExample(prompt, "was great", "was bad", "d.jsonl:row 5"), tok)
    assert err.value.source == "d.jsonl:row 5" and err.value.field == "chosen"


def test_boundary_repair_tokenizes_pieces_separately_and_is_counted(tok):
    ex = PreferenceExample("The movie ", "was great", "was bad", "d.jsonl:row 5")
    config = TokenizeConfig(boundary="repair")
    pair = tokenize_pair(ex, tok, config)
    assert pair.repaired
    assert pair.prompt_ids == bos_prefix(tok) + enc(tok, "The movie ")  # exactly the ids seen at inference
    assert pair.chosen_ids == enc(tok, "was great") + [tok.eos_token_id]
    assert decode(tok, pair.prompt_ids + pair.chosen_ids).endswith("The movie was great" + tok.eos_token)
    clean = PreferenceExample("The movie", " was great", " was bad")
    _, report = tokenize_examples([ex, clean, ex], tok, config)
    assert (report.rows, report.kept, report.repaired) == (3, 3, 2)


def test_chat_single_turn_matches_the_template(chat_tok):
    prompt, chosen = (user("Hi"),), (assistant("Hello! How are you?"),)
    pair = tokenize_pair(PreferenceExample(prompt, chosen, (assistant("Go away."),)), chat_tok)
    lead = bos_prefix(chat_tok)
    generation_prompt = chat_tok.apply_chat_template(list(prompt), add_generation_prompt=True)["input_ids"]
    assert pair.prompt_ids == lead + generation_prompt
    full = chat_tok.apply_chat_template(list(prompt + chosen))["input_ids"]
    # the response ends with the turn-end token; the template's "\n" after it is not part of the response
    assert lead + full == pair.prompt_ids + pair.chosen_ids + enc(chat_tok, "\n")
    assert decode(chat_tok, pair.chosen_ids) == "Hello! How are you?<|im_end|>"
    assert pair.chosen_mask == [1] * len(pair.chosen_ids)
    bos = chat_tok.bos_token_id
    assert pair.prompt_ids[0] == bos and pair.prompt_ids[1] != bos  # BOS once (SmolLM2: <|im_start|> is BOS)


def test_hh_split_needs_no_repair(tok):
    """HH prompts end with "Assistant:" and responses start with a space, which byte-level BPE attaches to the
    next word: the cut is a token boundary."""
    history = "\n\nHuman: What is your name?\n\nAssistant:"
    ex = example_from_record({"chosen": history + " My name is Ada.", "rejected": history + " No."})
    pair = tokenize_pair(ex, tok)
    assert not pair.repaired and decode(tok, pair.chosen_ids) == " My name is Ada." + tok.eos_token


def test_conversation_needs_a_chat_template():
    with pytest.raises(TemplateError, match="no chat template"):
        tokenize_pair(MULTI, tiny_tokenizer("gpt2"))


def test_tokenize_response_truncates_like_a_pair():
    llama = tiny_tokenizer("llama")
    prompt_ids, response_ids, mask = tokenize_response("The movie was", " a delight from start to finish.", llama,
                                                       TokenizeConfig(max_length=6, max_prompt_length=3))
    assert prompt_ids == [0] + enc(llama, "The movie was")[-2:]  # <s> and the prompt's last 2 tokens
    assert response_ids == enc(llama, " a delight")[:3] and mask == [1, 1, 1]


def test_bos_once_when_the_template_already_has_it():
    """Llama-style: the tokenizer prepends <s> to plain text and the template starts with {{ bos_token }};
    tokenizing the rendered text with special tokens would give <s><s>."""
    llama = tiny_tokenizer("llama")
    llama.chat_template = "{{ bos_token }}" + llama.chat_template
    pair = tokenize_pair(PreferenceExample((user("Hi"),), (assistant("a"),), (assistant("b"),)), llama)
    assert pair.prompt_ids[:2] == [0, 3] and pair.prompt_ids.count(0) == 1
    assert llama(llama.apply_chat_template([user("Hi")], tokenize=False))["input_ids"][:2] == [0, 0]  # the hazard


def test_datasets_rows_end_to_end():
    ds = Dataset.from_list([{"prompt": "Hello!", "chosen": " Hi.", "rejected": " Go."},
                            {"prompt": "Hello! ", "chosen": "Hi.", "rejected": "Go."}])
    pairs, report = tokenize_examples(iter_dataset(ds, name="train"), tiny_tokenizer("gpt2"), on_error="skip")
    assert len(pairs) == 1 and report.index == [0] and report.errors[0].startswith("train:row 1: field 'chosen'")


def test_string_response_to_chat_prompt_is_an_assistant_turn(chat_tok):
    a = tokenize_response((user("Hi"),), "Hello!", chat_tok)
    b = tokenize_response((user("Hi"),), (assistant("Hello!"),), chat_tok)
    assert a == b and decode(chat_tok, a[1]) == "Hello!<|im_end|>"


MULTI = PreferenceExample(
    (user("Hi"),),
    (assistant("Hello! How are you?"), user("fine"), assistant("good")),
    (assistant("bad"),),
)


def scored_text(tok, ids, mask):
    """The scored tokens decoded, one string per contiguous scored run."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs, cur = runs + [decode(tok, cur)], []
    return runs + ([decode(tok, cur)] if cur else [])


def test_multi_turn_masks(chat_tok):
    final = tokenize_pair(MULTI, chat_tok)
    every = tokenize_pair(MULTI, chat_tok, TokenizeConfig(mask_policy="all_assistant"))
    assert final.chosen_ids == every.chosen_ids  # same sequence, only the mask differs
    assert scored_text(chat_tok, final.chosen_ids, final.chosen_mask) == ["good<|im_end|>"]
    assert scored_text(chat_tok, every.chosen_ids, every.chosen_mask) == ["Hello! How are you?<|im_end|>",
                                                                          "good<|im_end|>"]
    full = chat_tok.apply_chat_template(list(MULTI.prompt + MULTI.chosen))["input_ids"]
    assert bos_prefix(chat_tok) + full == final.prompt_ids + final.chosen_ids + enc(chat_tok, "\n")
    assert final.rejected_mask == every.rejected_mask == [1] * len(final.rejected_ids)  # one turn: policies agree


def unstable_tokenizer(kind):
    """Tiny Llama with a template that hides earlier assistant turns (as reasoning templates drop old thoughts),
    or one whose generation prompt differs from the header of a rendered assistant turn."""
    tok = tiny_tokenizer("llama")
    if kind == "history":
        tok.chat_template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
    else:
        tok.chat_template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n\n\n{% endif %}"
        )
    return tok


@pytest.mark.parametrize(("kind", "turn"), [("history", "turn 1"), ("generation", "turn 0")])
def test_template_instability_is_an_error_naming_the_turn(kind, turn):
    with pytest.raises(TemplateError, match=f"{turn}: chat template instability") as err:
        tokenize_pair(PreferenceExample(MULTI.prompt, MULTI.chosen, MULTI.rejected, "c.jsonl:row 1"),
                      unstable_tokenizer(kind))
    assert err.value.field == "chosen" and err.value.source == "c.jsonl:row 1"


def test_truncation_keeps_prompt_end_and_bos():
    llama = tiny_tokenizer("llama")
    prompt = "The movie was a delight from start to finish, warm and funny and wise. It is"
    ex = PreferenceExample(prompt, " great.", " bad.")
    full = tokenize_pair(ex, llama, TokenizeConfig(max_length=512))
    pair = tokenize_pair(ex, llama, TokenizeConfig(max_length=12, max_prompt_length=6))
    assert pair.truncated and pair.chosen_ids == full.chosen_ids and pair.rejected_ids == full.rejected_ids
    # budget = max(6, 12 - longest response): prompt keeps <s> and its last tokens
    keep = max(6, 12 - len(full.chosen_ids))
    assert pair.prompt_ids == [0] + full.prompt_ids[len(full.prompt_ids) - (keep - 1):]


def test_truncation_cuts_response_end_without_eos():
    gpt2 = tiny_tokenizer("gpt2")
    ex = PreferenceExample("The movie was", " a delight from start to finish, warm and funny and wise.", " bad.")
    full = tokenize_pair(ex, gpt2)
    pair = tokenize_pair(ex, gpt2, TokenizeConfig(max_length=len(full.prompt_ids) + 5, max_prompt_length=4))
    assert pair.chosen_ids == full.chosen_ids[:5] and gpt2.eos_token_id not in pair.chosen_ids
    assert pair.rejected_ids == full.rejected_ids  # the short response is untouched


def test_prompt_filling_the_budget_is_refused_and_drops_are_counted_with_reason():
    """max_prompt_length >= max_length would let the prompt fill the budget: refused up front (issue 20).
    Truncation that leaves chosen = rejected (" great fun." and " great." both cut to " great") drops the row."""
    gpt2 = tiny_tokenizer("gpt2")
    with pytest.raises(ValueError, match="max_prompt_length"):
        TokenizeConfig(max_length=6, max_prompt_length=6)
    ex = PreferenceExample("The movie was a delight from start to finish", " great fun.", " great.", "p.jsonl:row 4")
    config = TokenizeConfig(max_length=6, max_prompt_length=5)
    with pytest.raises(TruncationError, match=f"p.jsonl:row 4: field 'rejected': {IDENTICAL}"):
        tokenize_pair(ex, gpt2, config)
    ok = PreferenceExample("Hello!", " great.", " bad.")
    pairs, report = tokenize_examples([ex, ok, ex], gpt2, config, on_error="skip")
    assert len(pairs) == 1 and report.index == [1] and report.dropped == {IDENTICAL: 2}
    assert "3 rows: 1 kept" in str(report)


def test_multi_turn_truncation_that_leaves_no_scored_token_is_dropped():
    llama = tiny_tokenizer("llama")
    config = TokenizeConfig(max_length=20, max_prompt_length=4)
    with pytest.raises(TruncationError, match=f"field 'chosen': {NO_SCORED}"):
        tokenize_pair(MULTI, llama, config)
    _, report = tokenize_examples([MULTI], llama, config, on_error="skip")
    assert report.dropped == {NO_SCORED: 1} and report.kept == 0


@pytest.mark.parametrize("max_length", range(1, 30, 3))
@pytest.mark.parametrize("max_prompt_length", [0, 3, 8, 40])
def test_never_a_zero_length_response(max_length, max_prompt_length):
    """Whatever the budget: either a TruncationError or every response keeps >= 1 scored token within max_length."""
    llama = tiny_tokenizer("llama")
    if not 1 <= max_prompt_length < max_length:  # refused up front (issue 20)
        with pytest.raises(ValueError, match="max_prompt_length"):
            TokenizeConfig(max_length=max_length, max_prompt_length=max_prompt_length)
        return
    config = TokenizeConfig(max_length=max_length, max_prompt_length=max_prompt_length)
    for ex in (MULTI, PreferenceExample("The movie was a delight from start to finish", " great fun.", " bad.")):
        try:
            pair = tokenize_pair(ex, llama, config)
        except TruncationError:
            continue
        for ids, mask in ((pair.chosen_ids, pair.chosen_mask), (pair.rejected_ids, pair.rejected_mask)):
            assert sum(mask) >= 1 and len(pair.prompt_ids) + len(ids) <= max_length


def test_tokenize_examples_raise_names_the_row():
    gpt2 = tiny_tokenizer("gpt2")
    rows = [PreferenceExample("Hi", " a", " b", "x:row 0"), PreferenceExample("Hi ", "a", "b", "x:row 1")]
    with pytest.raises(BoundaryError, match="x:row 1"):
        tokenize_examples(rows, gpt2)
    pairs, report = tokenize_examples(rows, gpt2, on_error="skip")
    assert len(pairs) == 1 and report.errors[0].startswith("x:row 1: field 'chosen'")


# ---- which losses the mask policy leaves unchanged (claims in the dpolab.data.tokenize docstring) ----


def summed_logps(model, pair, pad_token_id):
    """Reference computation: per-row summed log-probs of scored tokens and their counts, rows (chosen, rejected)."""
    batch = collate_pairs([pair], pad_token_id)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    labels = batch.labels[:, 1:]
    scored = labels != -100
    token_logps = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * scored).sum(-1), scored.sum(-1)


def quantities(policy, reference, example, mask_policy):
    """The numbers each loss family sees for one pair: DPO margin (Eq. 7 inside the sigmoid, over beta),
    reference-free margin, length-normalised margin (SimPO), SFT NLL per token, and rewards/chosen."""
    tok = tiny_tokenizer("llama")
    pair = tokenize_pair(example, tok, TokenizeConfig(mask_policy=mask_policy))
    (pc, pr), (nc, nr) = summed_logps(policy, pair, tok.pad_token_id)
    (rc, rr), _ = summed_logps(reference, pair, tok.pad_token_id)
    return {
        "dpo_margin": ((pc - rc) - (pr - rr)).item(),
        "reference_free_margin": (pc - pr).item(),
        "length_normalised_margin": (pc / nc - pr / nr).item(),
        "sft_nll": (-pc / nc).item(),
        "reward_chosen": (pc - rc).item(),
    }


SHARED_FIRST_TURN = PreferenceExample(
    (user("Hi"),),
    (assistant("Hello! How are you?"), user("fine"), assistant("good")),
    (assistant("Hello! How are you?"), user("bad day"), assistant("sorry")),
)


@pytest.fixture(scope="module")
def models():
    """Policy and reference: tiny Llamas whose output layers are scaled up so that log-probs vary by token
    (a freshly initialised model is nearly uniform, which would make every per-token mean nearly log V)."""
    pair = tiny_causal_lm("llama", seed=0)[0].eval(), tiny_causal_lm("llama", seed=1)[0].eval()
    with torch.no_grad():
        for model in pair:
            model.lm_head.weight.mul_(30.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 36-token forwards: threading only costs here, badly so on a shared machine
    yield pair
    torch.set_num_threads(threads)


@torch.no_grad()
def test_margin_losses_invariant_when_extra_turns_are_shared(models):
    """The shared first turn adds the same log-probs to chosen and rejected; the differences cancel it."""
    final = quantities(*models, SHARED_FIRST_TURN, "final_turn")
    every = quantities(*models, SHARED_FIRST_TURN, "all_assistant")
    assert abs(final["reward_chosen"] - every["reward_chosen"]) > 1e-2  # the extra turn does contribute
    for margin in ("dpo_margin", "reference_free_margin"):
        assert every[margin] == pytest.approx(final[margin], abs=1e-4)
    for changed in ("length_normalised_margin", "sft_nll", "reward_chosen"):
        assert abs(every[changed] - final[changed]) > 1e-2


@torch.no_grad()
def test_margin_losses_change_when_extra_turns_differ(models):
    """With the prompt as the longest common prefix, the chosen side's extra turn has no counterpart."""
    final = quantities(*models, MULTI, "final_turn")
    every = quantities(*models, MULTI, "all_assistant")
    for name in final:
        assert abs(every[name] - final[name]) > 1e-2


def test_at_the_reference_loss_values_agree_but_gradients_do_not(models):
    """theta = theta_ref: every log-ratio is 0 so sigmoid DPO = log 2 under both policies; the gradients differ."""
    policy = models[0]
    grads = []
    for mask_policy in ("final_turn", "all_assistant"):
        q_policy = quantities_with_grad(policy, MULTI, mask_policy)
        loss = -torch.nn.functional.logsigmoid(0.1 * (q_policy - q_policy.detach()))
        assert loss.item() == pytest.approx(math.log(2))
        policy.zero_grad()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]))
    assert not torch.allclose(grads[0], grads[1], atol=1e-6)


def quantities_with_grad(policy, example, mask_policy):
    tok = tiny_tokenizer("llama")
    pair = tokenize_pair(example, tok, TokenizeConfig(mask_policy=mask_policy))
    (pc, pr), _ = summed_logps(policy, pair, tok.pad_token_id)
    return pc - pr


# ---- the inspector ----


def test_inspector_flags_boundary_merge():
    example = PreferenceExample("The movie ", "was great", "was bad", "d.jsonl:row 5")
    text = inspect_pair(example, tiny_tokenizer("gpt2"))
    assert text.splitlines()[0].startswith("row d.jsonl:row 5")
    assert "BOUNDARY MERGE (chosen) after 'The movie '" in text and "BOUNDARY MERGE (rejected)" in text
    assert "no problems found" not in text


def test_inspector_parts_for_multi_turn_and_truncation():
    llama = tiny_tokenizer("llama")
    pair = tokenize_pair(MULTI, llama)
    rows, flags = token_table(MULTI, llama)
    chosen = [r["part"] for r in rows if r["side"] == "chosen"]
    assert chosen == ["chosen" if m else "masked" for m in pair.chosen_mask] and not flags
    # 12 prompt + 24 chosen tokens into 30: the prompt keeps <s> + its last 7, the chosen side its first 22
    cut = TokenizeConfig(max_length=30, max_prompt_length=8)
    truncated = tokenize_pair(MULTI, llama, cut)
    assert (len(pair.prompt_ids), len(pair.chosen_ids), len(truncated.prompt_ids)) == (12, 24, 8)
    rows, flags = token_table(MULTI, llama, cut)
    prompt_parts = [r["part"] for r in rows if r["side"] == "prompt"]
    assert prompt_parts == ["prompt"] + ["prompt·cut"] * 4 + ["prompt"] * 7
    assert [r["part"] for r in rows if r["side"] == "chosen"] == chosen[:22] + ["cut"] * 2
    assert flags == ["TRUNCATED: 4 prompt tokens cut from the start (after 1 BOS), responses keep 22/24 and 3/3 "
                     "tokens"]
    clean = inspect_pair(MULTI, llama)
    assert "no problems found" in clean and "'<|im_end|>'" in clean


def test_inspector_flags_template_instability_and_drops():
    text = inspect_pair(MULTI, unstable_tokenizer("history"))
    assert "TEMPLATE UNSTABLE (chosen) turn 1" in text
    dropped = inspect_pair(MULTI, tiny_tokenizer("llama"), TokenizeConfig(max_length=20, max_prompt_length=4))
    assert f"DROPPED: <example>: field 'chosen': {NO_SCORED}" in dropped


# ---- tools: tool schemas, tool calls and tool results (issue 23, item 6) -----------------------------------------

TOOL_TEMPLATE = (  # a minimal template with tool support; like Qwen's, it groups consecutive tool results
    "{% if tools or (enable_thinking is defined and not enable_thinking) %}<|im_start|>system\n"
    "{% for t in tools or [] %}tool {{ t.name }}\n{% endfor %}"
    "{% if enable_thinking is defined and not enable_thinking %}/no_think\n{% endif %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>tool\n{% endif %}"
    "<result>{{ m.content }}</result>"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.name }}</call>{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CALL = {"role": "assistant", "content": "", "tool_calls": [{"name": "weather"}]}
RESULTS = [{"role": "tool", "content": "sunny", "name": "weather"}, {"role": "tool", "content": "20 C"}]
TOOL_PAIR = {"prompt": [user("Weather in Paris?")], "chosen": [CALL, *RESULTS, assistant("Sunny, 20 C.")],
             "rejected": [assistant("I do not know.")]}


@pytest.fixture(scope="module")
def tool_tok():
    tok = tiny_tokenizer("llama")
    tok.chat_template = TOOL_TEMPLATE
    return tok


def test_tool_results_are_never_scored_and_a_tool_call_is_an_assistant_turn(tool_tok):
    """The chosen side renders as: call turn, one grouped tool piece, header, final answer. Scored by hand:
    final_turn the answer alone; all_assistant the call turn too; the tool results and headers under neither."""
    example = example_from_record(TOOL_PAIR, "tools.jsonl:row 1")
    assert example.chosen[0]["tool_calls"] == [{"name": "weather"}] and example.chosen[1]["name"] == "weather"
    final = tokenize_pair(example, tool_tok)
    every = tokenize_pair(example, tool_tok, TokenizeConfig(mask_policy="all_assistant"))
    assert final.chosen_ids == every.chosen_ids
    assert decode(tool_tok, final.chosen_ids) == ("<call>weather</call><|im_end|>\n<|im_start|>tool\n<result>sunny"
                                                  "</result><result>20 C</result><|im_end|>\n<|im_start|>assistant\n"
                                                  "Sunny, 20 C.<|im_end|>")
    assert scored_text(tool_tok, final.chosen_ids, final.chosen_mask) == ["Sunny, 20 C.<|im_end|>"]
    assert scored_text(tool_tok, every.chosen_ids, every.chosen_mask) == ["<call>weather</call><|im_end|>",
                                                                          "Sunny, 20 C.<|im_end|>"]
    call_only = tokenize_pair(example_from_record({**TOOL_PAIR, "chosen": [CALL]}), tool_tok)  # the call is the answer
    assert scored_text(tool_tok, call_only.chosen_ids, call_only.chosen_mask) == ["<call>weather</call><|im_end|>"]


def test_a_prompt_may_end_on_tool_results(tool_tok):
    conversation = [user("Weather in Paris?"), CALL, *RESULTS]
    example = example_from_record({"chosen": conversation + [assistant("Sunny.")],
                                   "rejected": conversation + [assistant("Rain.")]})
    assert example.prompt == tuple(conversation)
    pair = tokenize_pair(example, tool_tok, TokenizeConfig(mask_policy="all_assistant"))
    assert decode(tool_tok, pair.prompt_ids).endswith("<result>20 C</result><|im_end|>\n<|im_start|>assistant\n")
    assert scored_text(tool_tok, pair.chosen_ids, pair.chosen_mask) == ["Sunny.<|im_end|>"]


def test_tools_and_chat_template_kwargs_reach_the_template(tool_tok):
    row = {"prompt": [user("Hi")], "chosen": [assistant("a")], "rejected": [assistant("b")]}
    example = example_from_record(row)
    plain = decode(tool_tok, tokenize_pair(example, tool_tok).prompt_ids)
    assert plain == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    config = TokenizeConfig(tools=[{"name": "weather"}], chat_template_kwargs={"enable_thinking": False})
    pair = tokenize_pair(example, tool_tok, config)
    assert decode(tool_tok, pair.prompt_ids) == plain.replace("<s>", "<s><|im_start|>system\ntool weather\n"
                                                                     "/no_think\n<|im_end|>\n")
    own = example_from_record({**row, "tools": '[{"name": "clock"}]',
                               "chat_template_kwargs": {"enable_thinking": True}})
    pair = tokenize_pair(own, tool_tok, config)  # the row's tools replace the config's, its kwargs update them
    assert decode(tool_tok, pair.prompt_ids) == plain.replace("<s>", "<s><|im_start|>system\ntool clock\n<|im_end|>\n")


def test_a_template_without_tool_support_is_refused():
    chatml = tiny_tokenizer("llama")  # its template renders role and content only
    with pytest.raises(TemplateError, match="does not render tool calls") as err:
        tokenize_pair(example_from_record(TOOL_PAIR, "t.jsonl:row 3"), chatml)
    assert err.value.field == "chosen[0].tool_calls" and err.value.source == "t.jsonl:row 3"
    with pytest.raises(TemplateError, match="tools were given, but the chat template does not render them"):
        tokenize_pair(MULTI, chatml, TokenizeConfig(tools=[{"name": "weather"}]))


# ---- many rows: chunks, worker processes (dataset_num_proc), flat columns (issue 23, item 5) ---------------------

def rows_with_faults(n=40):
    """n text rows; in every 7th the responses differ only after max_length=24 tokens (dropped by truncation, counted),
    every 5th is truncated but kept."""
    rows = [{"prompt": f"The movie {i} was", "chosen": " good" * (1 + i % 3), "rejected": " bad" * (2 + i % 2)}
            for i in range(n)]
    for i in range(0, n, 5):
        rows[i] = {**rows[i], "chosen": " wonderful and warm and funny" * 6}
    for i in range(0, n, 7):
        rows[i] = {**rows[i], "chosen": " good" * 30 + " yes", "rejected": " good" * 30 + " no"}
    return rows


@pytest.mark.parametrize("form", ["jsonl", "parquet"])
def test_worker_processes_give_the_same_pairs_report_prompts_and_errors(tmp_path, form):
    import json

    from dpolab.data.prepare import prepare_pairs
    from dpolab.data.records import DataError
    from dpolab.data.store import PairStore

    gpt2, config = tiny_tokenizer("gpt2"), TokenizeConfig(max_length=24, max_prompt_length=8)
    rows = rows_with_faults()

    def write(rows, name):
        path = tmp_path / f"{name}.{form}"
        if form == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            Dataset.from_list(rows).to_parquet(path)
        return path

    path = write(rows, "good")
    serial, parallel = (prepare_pairs(path, gpt2, config, num_proc=n) for n in (None, 2))
    assert isinstance(parallel.pairs, PairStore) and list(parallel.pairs) == list(serial.pairs)
    assert parallel.report == serial.report and parallel.prompts == serial.prompts == [
        r["prompt"] for i, r in enumerate(rows) if i % 7]
    assert serial.report.dropped == {IDENTICAL: 6} and serial.report.kept == 34 and serial.report.truncated == 6
    expected = tokenize_examples([example_from_record(r) for r in rows], gpt2, config, on_error="skip")[0]
    assert list(serial.pairs) == expected  # the list API's pairs
    # row 5 cannot be tokenized (a boundary merge), row 33 is not a pair: every row is validated before any is
    # tokenized, so both runs name row 33 (line 34 of the JSONL file, row 33 counted from 0 in a dataset); without
    # row 33 both name row 5
    merge, same = {"prompt": "The movie was ", "chosen": "good", "rejected": "bad"}, {**rows[33], "rejected": " good"}
    bad = [*rows[:5], merge, *rows[6:33], same, *rows[34:]]
    where = "bad.jsonl:row 34" if form == "jsonl" else "bad.parquet:row 33"
    for n in (None, 2):
        with pytest.raises(DataError, match=f"{where}: field 'rejected': identical"):
            prepare_pairs(write(bad, "bad"), gpt2, config, num_proc=n)
    del bad[33]
    for n in (None, 2):
        with pytest.raises(BoundaryError, match=f"{where.replace('34', '6').replace('33', '5')}: field 'chosen': tokens merge"):
            prepare_pairs(write(bad, "bad"), gpt2, config, num_proc=n)
