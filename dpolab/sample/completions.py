"""Teacher-forced log-probs of sampled completions: log π(y|x) of every completion of a :class:`Samples`
under any model (the reference of a KL estimate, the policy of an RL step).

:func:`completion_logprobs` gives the sums log π(y|x) = Σ_t log π(y_t | x, y_<t), :func:`completion_token_logprobs`
the terms. Both read the token ids the sampler drew, so no text is re-tokenized. (A judge's score of the
*texts* is :func:`dpolab.sample.judges.score_completions`.)
"""

from __future__ import annotations

import torch

from dpolab.data.batch import SequenceBatch, collate_sequences, to_device
from dpolab.data.device import module_device
from dpolab.logprobs import sequence_forward, shift_labels, token_logprobs
from dpolab.sample.generate import Samples


def completion_batch(samples: Samples, pad_token_id: int) -> SequenceBatch:
    """All completions of ``samples`` as one :class:`dpolab.data.batch.SequenceBatch`, prompt by prompt."""
    prompt_ids, response_ids = [], []
    for p, rows in enumerate(samples.token_ids):
        for ids in rows:
            prompt_ids.append(samples.prompt_ids[p])
            response_ids.append(ids if ids else [pad_token_id])  # an empty completion still scores one token
    return collate_sequences(prompt_ids, response_ids, None, pad_token_id)


def completion_logprobs(model, samples: Samples, pad_token_id: int, batch_size: int = 32) -> torch.Tensor:
    """log π(y|x) summed over each completion's tokens under ``model``, without grad, on the CPU (the model may be
    on a GPU: each chunk of rows goes to its device). Shape: (P, N)."""
    batch = completion_batch(samples, pad_token_id)
    device = module_device(model)
    out = []
    with torch.no_grad():
        for start in range(0, batch.input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            sub = type(batch)(batch.input_ids[rows], batch.attention_mask[rows], batch.labels[rows])
            out.append(sequence_forward(model, to_device(sub, device))[0].cpu())
    return torch.cat(out).view(len(samples.token_ids), -1)


def completion_token_logprobs(model, samples: Samples, pad_token_id: int, batch_size: int = 32) -> torch.Tensor:
    """log π(y_t | x, y_<t) of every completion token under ``model``, without grad, laid out as
    :func:`dpolab.baselines.ppo.policy_and_values` lays them out: row i of :func:`completion_batch`, position t
    scoring the label at t+1, 0 off the response. A row sums to :func:`completion_logprobs`'s entry. On the CPU.
    Shape: (P·N, T)."""
    batch = completion_batch(samples, pad_token_id)
    targets = shift_labels(batch.labels)
    device = module_device(model)
    out = []
    with torch.no_grad():
        for start in range(0, batch.input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            logits = model(input_ids=batch.input_ids[rows].to(device),
                           attention_mask=batch.attention_mask[rows].to(device), use_cache=False).logits
            out.append(token_logprobs(logits, targets[rows].to(device)).cpu())
    return torch.cat(out)
