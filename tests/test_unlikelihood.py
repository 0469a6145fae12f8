"""The Unlikelihood baseline: its loss by hand, its gradient by finite differences, and a short run."""

import math

import pytest
import torch

from dpolab.baselines.unlikelihood import response_token_logps, unlikelihood_loss, unlikelihood_train


def test_loss_by_hand():
    """Chosen tokens with p = 0.5, 0.25 (third masked): NLL = (log 2 + log 4)/2 = 1.5 log 2.
    Rejected tokens with p = 0.5, 0.75: −log(1 − p) = log 2, log 4, mean 1.5 log 2; with α = 2 the total is
    1.5 log 2 + 3 log 2 = 4.5 log 2."""
    chosen = torch.log(torch.tensor([[0.5, 0.25, 0.9]]))
    rejected = torch.log(torch.tensor([[0.5, 0.75]]))
    loss = unlikelihood_loss(chosen, torch.tensor([[1, 1, 0]]), rejected, torch.tensor([[1, 1]]), alpha=2.0)
    assert loss.item() == pytest.approx(4.5 * math.log(2), rel=1e-6)


def test_loss_gradient_matches_finite_differences():
    """d/dℓ of −log(1 − e^ℓ) is e^ℓ/(1 − e^ℓ) = p/(1 − p); checked by central differences in float64."""
    torch.manual_seed(0)
    chosen = torch.randn(2, 3, dtype=torch.float64).clamp(max=-0.1)
    rejected = (torch.randn(2, 4, dtype=torch.float64) - 1.0).clamp(max=-0.1).requires_grad_()
    masks = torch.ones(2, 3), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    loss = unlikelihood_loss(chosen, masks[0], rejected, masks[1]).sum()
    (grad,) = torch.autograd.grad(loss, rejected)
    p = rejected.detach().exp()
    expected = p / (1 - p) / masks[1].sum(-1, keepdim=True) * masks[1]
    torch.testing.assert_close(grad, expected)


def test_certain_rejected_token_stays_finite():
    """A rejected token with probability 1 would give −log 0; log p is capped just below 0."""
    loss = unlikelihood_loss(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1), torch.ones(1, 1))
    assert torch.isfinite(loss).all()


def test_training_lowers_the_rejected_and_raises_the_chosen():
    """Eight steps at lr 1e-2 on one pair repeated: the chosen response's mean log-prob rises and the rejected
    one's falls (both terms of the loss act), on a tiny random GPT-2."""
    from dpolab.data.tokenize import TokenizedPair
    from dpolab.models.tiny import tiny_causal_lm

    model, tokenizer = tiny_causal_lm("gpt2", seed=0)
    pair = TokenizedPair([5, 6, 7], [8, 9, 10], [11, 12], [1, 1, 1], [1, 1])
    pad = tokenizer.pad_token_id or 0

    def mean_logps():
        with torch.no_grad():
            c, cm = response_token_logps(model, [pair.prompt_ids], [pair.chosen_ids], pad)
            r, rm = response_token_logps(model, [pair.prompt_ids], [pair.rejected_ids], pad)
        return float(c[cm].mean()), float(r[rm].mean())

    before = mean_logps()
    history = unlikelihood_train(model, [pair] * 4, pad, steps=8, batch_size=4, lr=1e-2, progress=False)
    after = mean_logps()
    assert len(history) == 8 and after[0] > before[0] and after[1] < before[1]
