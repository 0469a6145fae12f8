"""Tiny randomly initialised causal LMs with small trained tokenizers, for fast tests (no download).

Two shapes, matching the field's two tokenizer conventions:

- ``"gpt2"``: byte-level BPE, no BOS added by the tokenizer, ``<|endoftext|>`` as EOS (and as BOS,
  as GPT-2 does); a GPT-2 model. Byte-level BPE merges a prompt's trailing space with the next word,
  which is exactly the prompt/response boundary hazard the tokenization layer must catch.
- ``"llama"``: byte-level BPE whose post-processor prepends ``<s>``, ``</s>`` as EOS, a ChatML-style
  chat template; a Llama model.

The tokenizer is trained on a fixed built-in corpus, so it is identical on every machine.
"""

from __future__ import annotations

from functools import lru_cache

import torch

_CORPUS = [
    "The movie was a delight from start to finish, warm and funny and wise.",
    "A dull, plodding film that never finds its rhythm or its reason to exist.",
    "The acting is superb, the script sharp, and the ending earns every tear.",
    "It is a mess: too long, too loud, and too pleased with itself.",
    "Hello! How are you today? I am fine, thank you. What is your name?",
    "My name is Ada and my favourite colour is green. I live in a small town by the sea.",
    "The assistant answered the question clearly and politely.",
    "user assistant system Human: Assistant: good bad great terrible wonderful awful",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 100 and 2023 appear in text too.",
    "Direct preference optimization trains a policy from pairs of chosen and rejected responses.",
]

GPT2_SPECIAL = ["<|endoftext|>"]
LLAMA_SPECIAL = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@lru_cache(maxsize=4)
def _trained_tokenizer_json(kind: str, vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    special = GPT2_SPECIAL if kind == "gpt2" else LLAMA_SPECIAL
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if kind == "llama":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def tiny_tokenizer(kind: str = "gpt2", vocab_size: int = 512):
    """A small deterministic ``PreTrainedTokenizerFast`` of the given shape (``"gpt2"`` or ``"llama"``)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if kind not in ("gpt2", "llama"):
        raise ValueError(f"tiny tokenizer kind must be 'gpt2' or 'llama', got {kind!r}")
    backend = Tokenizer.from_str(_trained_tokenizer_json(kind, vocab_size))
    if kind == "gpt2":
        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token=None,
        )
        tok.pad_token = tok.eos_token
    else:
        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token=None,
        )
        tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_causal_lm(
    kind: str = "gpt2",
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 256,
    dropout: float = 0.0,
    seed: int = 0,
):
    """Return ``(model, tokenizer)``: a randomly initialised tiny causal LM and its matching tiny tokenizer.

    The model's vocabulary equals the tokenizer's size; initialisation is deterministic given ``seed``.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer(kind, vocab_size)
    n_vocab = len(tokenizer)
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = GPT2Config(
            vocab_size=n_vocab, n_positions=max_positions, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(
            vocab_size=n_vocab, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
            max_position_embeddings=max_positions, attention_dropout=dropout,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
