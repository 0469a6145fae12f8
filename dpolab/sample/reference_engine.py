"""The slow reference sampling engine: ``model.generate`` runs the loop, the token choice is made here.

``model.generate`` does the decoding (KV cache, left padding, stopping at EOS), but every token is chosen by
:class:`RecordingSampler`, a logits processor that sees the model's raw next-token logits, applies temperature,
top-k and top-p itself (:func:`dpolab.sample.warp.warp_logits`), draws the token from the row's own random stream,
and records the drawn token's log-probs under the raw and the warped distribution; ``generate`` then only takes
the one token left standing. The fast engine (:mod:`dpolab.sample.decode`) must give the same completions.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from dpolab.sample.warp import row_generator, warp_logits


class RecordingSampler(LogitsProcessor):
    """Draws each row's next token (inverse CDF, one uniform per row and step) and records its log-probs.

    Returns scores that are ``-inf`` except at the drawn token, so greedy ``generate`` takes it.
    """

    def __init__(self, generators: list[torch.Generator], temperature: float, top_k: int | None, top_p: float):
        self.generators, self.temperature, self.top_k, self.top_p = generators, temperature, top_k, top_p
        self.tokens, self.model_logps, self.sampling_logps = [], [], []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        model_logp = torch.log_softmax(scores.float(), dim=-1)
        untruncated = self.top_k is None or self.top_k >= scores.shape[-1]
        plain = self.temperature == 1.0 and untruncated and self.top_p == 1.0
        sampling_logp = model_logp if plain else torch.log_softmax(
            warp_logits(scores, self.temperature, self.top_k, self.top_p), dim=-1)
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators]).to(scores.device)
        cdf = sampling_logp.double().exp().cumsum(dim=-1)
        # right=True picks the first token whose cdf exceeds u·total: never a token of probability 0
        tokens = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
        tokens = tokens.clamp_max(scores.shape[-1] - 1)
        self.tokens.append(tokens)
        self.model_logps.append(model_logp.gather(-1, tokens[:, None]).squeeze(-1))
        self.sampling_logps.append(sampling_logp.gather(-1, tokens[:, None]).squeeze(-1))
        return torch.full_like(scores, float("-inf")).scatter(-1, tokens[:, None], 0.0)


def generate_batch(model, prompt_ids, batch, seed, max_new_tokens, eos_ids, pad_id, warping, token_ids, model_logps,
                   sampling_logps, finished) -> None:
    """Sample the rows ``batch`` ((prompt, sample) indices) with ``model.generate``, left-padded, and fill the
    result tables at those rows (see :func:`collect`). ``warping`` is (temperature, top_k, top_p)."""
    width = max(len(prompt_ids[p]) for p, _ in batch)
    input_ids = torch.tensor([[pad_id] * (width - len(prompt_ids[p])) + prompt_ids[p] for p, _ in batch])
    attention_mask = torch.tensor([[0] * (width - len(prompt_ids[p])) + [1] * len(prompt_ids[p]) for p, _ in batch])
    sampler = RecordingSampler([row_generator(seed, p, i) for p, i in batch], *warping)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                             do_sample=False, max_new_tokens=max_new_tokens,
                             logits_processor=LogitsProcessorList([sampler]))
    collect(out[:, width:].cpu(), sampler, batch, eos_ids, token_ids, model_logps, sampling_logps, finished)


def collect(generated, sampler, batch, eos_ids, token_ids, model_logps, sampling_logps, finished) -> None:
    """Cut each generated row at its first EOS (kept) and sum the recorded log-probs over its tokens."""
    steps = generated.shape[1]
    drawn = torch.stack(sampler.tokens[:steps], dim=1).cpu()
    step_model = torch.stack(sampler.model_logps[:steps], dim=1).cpu()
    step_sampling = torch.stack(sampler.sampling_logps[:steps], dim=1).cpu()
    is_eos = torch.isin(generated, torch.tensor(eos_ids))
    for r, (p, i) in enumerate(batch):
        hits = is_eos[r].nonzero()
        length = int(hits[0]) + 1 if len(hits) else steps
        ids = generated[r, :length]
        if not torch.equal(ids, drawn[r, :length]):  # would mean generate() altered the token we drew
            raise RuntimeError("generate() did not keep the sampled tokens; a logits processor runs after ours")
        token_ids[p][i] = ids.tolist()
        model_logps[p, i] = step_model[r, :length].sum()
        sampling_logps[p, i] = step_sampling[r, :length].sum()
        finished[p, i] = bool(len(hits))
