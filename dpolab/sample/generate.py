"""Sampling N completions per prompt, with the log-probs that the KL estimate needs.

Two engines give the same completions: ``"fast"`` (the default), the decoding loop of :mod:`dpolab.sample.decode`,
and ``"generate"``, the slow reference of :mod:`dpolab.sample.reference_engine` built on ``model.generate``. Both
draw each token themselves from the warped distribution (:func:`dpolab.sample.warp.warp_logits`) and record two
log-probs of it, so each completion comes with

- ``model_logps``: log π(y|x) summed over its tokens under the raw model (temperature 1, no top-k or
  top-p), which is what the sample-based KL(π‖π_ref) estimate needs, and
- ``sampling_logps``: log q(y|x) under the distribution actually sampled from (temperature, top-k,
  top-p applied), for importance weights or a sampler's own entropy.

Each row draws from a generator seeded by ``(seed, prompt index, sample index)``
(:func:`dpolab.sample.warp.row_generator`), so a completion does not depend on the batch size, the order of the
prompts, or the global torch RNG. The model's own ``generation_config`` sampling settings are ignored: the
arguments of :func:`sample` are the whole sampling recipe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from transformers import GenerationConfig

from dpolab.sample.decode import decode_rows
from dpolab.sample.reference_engine import generate_batch
from dpolab.sample.warp import row_generator, warp_logits


@dataclass
class Samples:
    """``N`` sampled completions for each of ``P`` prompts.

    Attributes:
        prompts: the prompts as given (texts, or message lists when sampled with ``chat=True``).
        prompt_ids: the token ids each prompt was rendered to (chat template and generation prompt included).
        texts: decoded completions, ``texts[p][i]``, without EOS, padding or other special tokens.
        token_ids: completion token ids ``token_ids[p][i]``; the last one is EOS when the model stopped itself.
        model_logps: summed log-probs of each completion under the raw model (temperature 1, no truncation),
            the quantity a KL(π‖π_ref) estimate needs. Shape: (P, N).
        sampling_logps: summed log-probs under the distribution actually sampled from (temperature, top-k and
            top-p applied); equal to ``model_logps`` when sampling at temperature 1 without truncation. Shape: (P, N).
        finished: True where the completion ended with EOS, False where ``max_new_tokens`` cut it. Shape: (P, N).
        settings: the sampling arguments, for the metadata of datasets built from these samples.
    """

    prompts: list
    prompt_ids: list[list[int]]
    texts: list[list[str]]
    token_ids: list[list[list[int]]]
    model_logps: torch.Tensor
    sampling_logps: torch.Tensor
    finished: torch.Tensor
    settings: dict = field(default_factory=dict)

    @property
    def lengths(self) -> torch.Tensor:
        """Number of completion tokens (EOS included). Shape: (P, N)."""
        return torch.tensor([[len(ids) for ids in row] for row in self.token_ids], dtype=torch.long)


def check_sampling_request(
    prompts,
    n: int,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    batch_size: int = 16,
    chat: bool = False,
) -> list:
    """Validate a sampling request before any model is loaded; return the prompts as a list.

    Raises:
        ValueError: naming the argument, or the prompt (by index) and what is wrong with it.
    """
    if isinstance(prompts, str):
        raise ValueError("prompts must be a sequence of prompts, got a single string; wrap it in a list")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("the prompt set is empty (0 prompts): nothing to sample")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (completions per prompt) must be an integer >= 1, got {n!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens (generation length) must be an integer >= 1, got {max_new_tokens!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None (no truncation) or an integer >= 1, got {top_k!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    for i, prompt in enumerate(prompts):
        if chat:
            _check_conversation(prompt, i)
        elif not isinstance(prompt, str):
            hint = " (a message list: pass chat=True)" if isinstance(prompt, list | tuple) else ""
            raise ValueError(f"prompt {i}: expected a text, got {type(prompt).__name__}{hint}")
        elif not prompt.strip():
            raise ValueError(f"prompt {i}: empty text")
    return prompts


def _check_conversation(messages, i: int) -> None:
    if not isinstance(messages, list | tuple) or not messages:
        raise ValueError(f"prompt {i}: expected a non-empty list of messages (chat=True), got {messages!r:.80}")
    for t, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise ValueError(f"prompt {i}, turn {t}: expected a dict with 'role' and 'content', got {message!r:.80}")
    if messages[-1]["role"] == "assistant":
        raise ValueError(f"prompt {i}, turn {len(messages) - 1}: the conversation ends with an assistant turn; "
                         "sample() adds the generation prompt for a new assistant turn")


def eos_ids_of(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's ``generation_config`` EOS ids."""
    ids = []
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        for i in source if isinstance(source, list | tuple) else [source]:
            if i is not None and i not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation_config defines an EOS token")
    return ids


def render_prompt(tokenizer, prompt, chat: bool) -> list[int]:
    """Token ids the model is conditioned on: the text's ids, or the chat template plus generation prompt."""
    if not chat:
        return tokenizer(prompt).input_ids
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat=True needs a tokenizer with a chat template; this tokenizer has none")
    text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def sample(
    model,
    tokenizer,
    prompts: Sequence,
    n: int,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    chat: bool = False,
    progress: bool = True,
    engine: str = "fast",
) -> Samples:
    """Sample ``n`` completions of every prompt with the KV cache, recording their log-probs.

    Args:
        model: a causal LM (any ``transformers`` model with ``generate``).
        tokenizer: its tokenizer.
        prompts: texts to continue, or (``chat=True``) message lists answered by a new assistant turn.
        n: completions per prompt.
        max_new_tokens: the most tokens per completion; sampling stops earlier at EOS.
        temperature: softmax temperature (> 0).
        top_p: nucleus mass in (0, 1]; 1 keeps every token.
        top_k: keep the ``top_k`` most likely tokens; None (or ``len(tokenizer)``, the same here: the
            transformers warpers, slow without a top-k, are not used) keeps all.
        seed: completions are a function of (seed, prompt index, sample index, model, prompt).
        batch_size: rows (prompt × sample) decoded together; bounds memory, not the result. None: 128 for the
            fast engine, 16 for ``"generate"``.
        chat: render prompts with the tokenizer's chat template and generation prompt.
        progress: show a progress bar over completions.
        engine: ``"fast"``, the decoding loop of :mod:`dpolab.sample.decode`, or ``"generate"``, the slow reference
            built on ``model.generate``; both give the same completions and log-probs.

    Returns:
        :class:`Samples`, ``texts[p][i]`` for prompt ``p`` and sample ``i``.
    """
    from tqdm.auto import tqdm

    if engine not in ("fast", "generate"):
        raise ValueError(f"engine must be 'fast' or 'generate', got {engine!r}")
    if batch_size is None:
        batch_size = 128 if engine == "fast" else 16
    prompts = check_sampling_request(prompts, n, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                     batch_size=batch_size, chat=chat)
    prompt_ids = [render_prompt(tokenizer, p, chat) for p in prompts]
    eos_ids = eos_ids_of(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    # rows sorted by prompt length so a batch carries little padding; row seeds make the order irrelevant
    rows = sorted(((p, i) for p in range(len(prompts)) for i in range(n)), key=lambda r: len(prompt_ids[r[0]]))
    token_ids = [[[] for _ in range(n)] for _ in prompts]
    model_logps, sampling_logps = torch.zeros(len(prompts), n), torch.zeros(len(prompts), n)
    finished = torch.zeros(len(prompts), n, dtype=torch.bool)

    untruncated = top_k is None or top_k >= model.config.get_text_config().vocab_size  # as RecordingSampler
    plain = temperature == 1.0 and untruncated and top_p == 1.0
    warp = None if plain else partial(warp_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    was_training, saved_config = model.training, model.generation_config
    # a clean config: processors from the model's own config (repetition penalty, ...) would distort the logps
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=pad_id,
                                               bos_token_id=getattr(saved_config, "bos_token_id", None))
    model.eval()
    try:
        with tqdm(total=len(rows), desc="sampling", unit="completion", disable=not progress) as bar:
            for start in range(0, len(rows), batch_size):
                batch = rows[start:start + batch_size]
                if engine == "fast":
                    _decode_batch(model, prompt_ids, batch, seed, max_new_tokens, eos_ids, pad_id, warp, token_ids,
                                  model_logps, sampling_logps, finished)
                    bar.update(len(batch))
                    continue
                generate_batch(model, prompt_ids, batch, seed, max_new_tokens, eos_ids, pad_id,
                               (temperature, top_k, top_p), token_ids, model_logps, sampling_logps, finished)
                bar.update(len(batch))
    finally:
        model.generation_config = saved_config
        model.train(was_training)

    texts = [[tokenizer.decode(ids[:-1] if done else ids, skip_special_tokens=True)
              for ids, done in zip(row, row_done)] for row, row_done in zip(token_ids, finished.tolist())]
    settings = {"n": n, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                "top_k": top_k, "seed": seed, "chat": chat}
    return Samples(prompts, prompt_ids, texts, token_ids, model_logps, sampling_logps, finished, settings)


def _decode_batch(model, prompt_ids, batch, seed, max_new_tokens, eos_ids, pad_id, warp, token_ids, model_logps,
                  sampling_logps, finished) -> None:
    """The fast engine on one batch of rows; fills the result tables like
    :func:`dpolab.sample.reference_engine.generate_batch`."""
    done = decode_rows(model, [prompt_ids[p] for p, _ in batch], [row_generator(seed, p, i) for p, i in batch],
                       max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, warp=warp)
    for r, (p, i) in enumerate(batch):
        token_ids[p][i] = done.tokens[r, :done.lengths[r]].tolist()
        model_logps[p, i], sampling_logps[p, i], finished[p, i] = (done.model_logps[r], done.sampling_logps[r],
                                                                   done.finished[r])
