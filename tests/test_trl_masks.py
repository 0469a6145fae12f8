"""Our response masks against trl 1.16's DPOTrainer tokenization on the same rows.

trl tokenizes in ``DPOTrainer._prepare_dataset`` (a ``tokenize_fn`` closure: prompt alone, prompt+chosen and
prompt+rejected, split at their common token prefix; EOS appended to text responses) and masks with
``DataCollatorForPreference`` (``completion_mask``). We call both as they are, with a stand-in for the trainer
(``_prepare_dataset`` reads only ``self._tokenizer``), so no model or reference copy is built.

Where trl handles a row correctly, the masks agree exactly (text rows) or up to one documented difference
(chat rows: trl also scores the template's ``"\\n"`` after ``<|im_end|>``, which we leave out so that the
response ends with its turn-end token; and trl adds no BOS to a template that has none, the tiny Llama's case).
Where trl does not (a boundary merge), it silently trains on a shortened prompt; we raise instead.
Importing trl takes several seconds; the comparisons themselves are fast.
"""

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from dpolab.data.batch import IGNORE_INDEX, collate_pairs
from dpolab.data.records import example_from_record
from dpolab.data.render import BoundaryError, bos_prefix
from dpolab.data.tokenize import tokenize_pair

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")


def trl_tokenize(rows, tokenizer):
    """trl's own tokenization of ``rows`` (list of dicts): its prompt/chosen/rejected ids per row."""
    trainer = SimpleNamespace(_tokenizer=tokenizer)
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    out = trl_dpo.DPOTrainer._prepare_dataset(trainer, Dataset.from_list(rows), tokenizer, args, "test")
    return [{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in out]


TEXT_ROWS = [
    {"prompt": "The movie was", "chosen": " a delight from start to finish.", "rejected": " dull."},
    {"prompt": "Review: It is a mess.", "chosen": "\nToo long, too loud.", "rejected": "\nGreat!"},
    {"prompt": "Hello! How are you today?", "chosen": " I am fine, thank you.", "rejected": " What?"},
]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


CHAT_ROWS = [
    {"prompt": [user("Hello! What is your name?")], "chosen": [assistant("My name is Ada.")],
     "rejected": [assistant("No.")]},
    {"prompt": [user("Hi"), assistant("Hello!"), user("Where do you live?")],
     "chosen": [assistant("In a small town by the sea.")], "rejected": [assistant("Go away.")]},
    {"prompt": [{"role": "system", "content": "Be brief."}, user("Rate the movie.")],
     "chosen": [assistant("Great, warm and funny.")], "rejected": [assistant("It is a mess: too long.")]},
]


def test_text_rows_masks_equal_trl(tok):
    """Same ids, same attention masks, and trl's completion_mask equals our labels != -100, padded batch."""
    ours = collate_pairs([tokenize_pair(example_from_record(r), tok) for r in TEXT_ROWS], tok.pad_token_id)
    theirs = trl_dpo.DataCollatorForPreference(pad_token_id=tok.pad_token_id)(trl_tokenize(TEXT_ROWS, tok))
    assert torch.equal(ours.input_ids, theirs["input_ids"])
    assert torch.equal(ours.attention_mask, theirs["attention_mask"])
    assert torch.equal((ours.labels != IGNORE_INDEX).long(), theirs["completion_mask"])
    assert theirs["completion_mask"].sum() > 0


def test_chat_rows_masks_equal_trl_up_to_the_template_newline(chat_tok):
    trl_rows = trl_tokenize(CHAT_ROWS, chat_tok)
    newline = chat_tok("\n", add_special_tokens=False)["input_ids"]
    for record, theirs in zip(CHAT_ROWS, trl_rows):
        pair = tokenize_pair(example_from_record(record), chat_tok)
        assert pair.prompt_ids == bos_prefix(chat_tok) + theirs["prompt_ids"]
        for ids, mask, trl_ids in ((pair.chosen_ids, pair.chosen_mask, theirs["chosen_ids"]),
                                   (pair.rejected_ids, pair.rejected_mask, theirs["rejected_ids"])):
            assert mask == [1] * len(ids)  # trl scores every completion token; so do we on single-turn responses
            assert trl_ids == ids + newline and ids[-1] == chat_tok.convert_tokens_to_ids("<|im_end|>")


def test_boundary_merge_trl_shortens_the_prompt_we_raise(tok):
    """Prompt ending in a space: trl keeps the common token prefix as the prompt, dropping the trailing ' '
    token the model would see at inference; its masks then score the merged ' was' token. We refuse."""
    row = {"prompt": "The movie ", "chosen": "was great.", "rejected": "was dull."}
    theirs = trl_tokenize([row], tok)[0]
    alone = tok(row["prompt"])["input_ids"]
    assert theirs["prompt_ids"] == alone[:-1]  # trl trains on a context that never occurs at inference
    with pytest.raises(BoundaryError):
        tokenize_pair(example_from_record(row), tok)
