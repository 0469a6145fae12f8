"""The loss family: hand-derived values, the DPO gradient's closed form, finite differences, errors.

Hand values share one pair, written ℓ(h) = −log σ(h) = log(1 + e^{−h}):
    log π_θ(y_w) = −1, log π_θ(y_l) = −3, log π_ref(y_w) = log π_ref(y_l) = −2,
so the chosen log-ratio is +1, the rejected one −1, and ρ = 2 (the log-ratio margin). ℓ(1) = 0.3132617 and
ℓ(−h) = ℓ(h) + h. A second pair swaps the policy's log-probs (ρ = −2).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from dpolab.experiments.bandit import TabularPolicy
from dpolab.losses import (
    LOSSES,
    SORTED_LOSSES,
    TRL_LOSS_TYPES,
    combined_loss,
    dpo_loss,
    get_loss,
    robust_dpo_loss,
    sft_loss,
)

L1 = math.log1p(math.exp(-1))  # ℓ(1) = 0.31326168751822286
POLICY_CHOSEN = torch.tensor([-1.0, -3.0], dtype=torch.float64)
POLICY_REJECTED = torch.tensor([-3.0, -1.0], dtype=torch.float64)
REF = torch.tensor([-2.0, -2.0], dtype=torch.float64)
LENGTHS_CHOSEN = torch.tensor([2, 4])
LENGTHS_REJECTED = torch.tensor([4, 2])


def _call(name, beta, **params):
    return get_loss(name)(
        POLICY_CHOSEN,
        POLICY_REJECTED,
        REF,
        REF,
        beta,
        chosen_lengths=LENGTHS_CHOSEN,
        rejected_lengths=LENGTHS_REJECTED,
        **params,
    )


def test_registry_names():
    """Every trl 1.16 loss_type under its own name, plus the kit's variants under names trl does not use."""
    assert set(TRL_LOSS_TYPES) == {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                                   "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
                                   "sigmoid_norm"}
    assert set(LOSSES) == set(TRL_LOSS_TYPES) | {"ipo_sum", "sft_per_sequence", "simpo", "reference_free",
                                                 "unlikelihood"}
    assert LOSSES["sigmoid"] is dpo_loss
    with pytest.raises(ValueError, match="unknown loss 'dpo'; known losses: aot, aot_unpaired, apo_down"):
        get_loss("dpo")


def test_sigmoid_dpo_eq7():
    """β = 0.5: h = β ρ = ±1, so the losses are ℓ(1) = 0.3132617 and ℓ(−1) = ℓ(1) + 1 = 1.3132617;
    the rewards are β × log-ratio = (0.5, −0.5) and (−0.5, 0.5)."""
    losses, chosen, rejected = _call("sigmoid", 0.5)
    assert losses.tolist() == pytest.approx([L1, L1 + 1], abs=1e-12)
    assert chosen.tolist() == [0.5, -0.5] and rejected.tolist() == [-0.5, 0.5]


def test_conservative_dpo_label_smoothing():
    """cDPO, ε = 0.1: (1 − ε) ℓ(h) + ε ℓ(−h) = ℓ(h) + ε h, i.e. 0.3132617 + 0.1 and 1.3132617 − 0.1."""
    losses, _, _ = _call("sigmoid", 0.5, label_smoothing=0.1)
    assert losses.tolist() == pytest.approx([L1 + 0.1, L1 + 1 - 0.1], abs=1e-12)


def test_conservative_dpo_optimum_is_finite():
    """d/dh [ℓ(h) + ε h] = −σ(−h) + ε = 0 at h = log((1 − ε)/ε) = log 9 for ε = 0.1."""
    h = torch.tensor([math.log(9)], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    loss, _, _ = dpo_loss(h, zero, zero, zero, beta=1.0, label_smoothing=0.1)
    (grad,) = torch.autograd.grad(loss.sum(), h)
    assert grad.item() == pytest.approx(0.0, abs=1e-12)


def test_robust_dpo():
    """rDPO, ε = 0.1: [(1 − ε) ℓ(h) − ε ℓ(−h)] / (1 − 2ε) = [0.8 ℓ(h) − 0.1 h] / 0.8 = ℓ(h) − h/8:
    0.3132617 − 0.125 = 0.1882617 and 1.3132617 + 0.125 = 1.4382617."""
    losses, chosen, _ = _call("robust", 0.5, label_smoothing=0.1)
    assert losses.tolist() == pytest.approx([L1 - 0.125, L1 + 1 + 0.125], abs=1e-12)
    assert chosen.tolist() == [0.5, -0.5]


def test_robust_dpo_is_unbiased_under_label_flips():
    """E over a label flipped with prob. ε of the robust loss is the clean sigmoid loss ℓ(h), for any h."""
    h = torch.linspace(-4, 4, 9, dtype=torch.float64)
    zero = torch.zeros_like(h)
    kept, _, _ = robust_dpo_loss(h, zero, zero, zero, beta=1.0, label_smoothing=0.2)
    flipped, _, _ = robust_dpo_loss(zero, h, zero, zero, beta=1.0, label_smoothing=0.2)
    torch.testing.assert_close(0.8 * kept + 0.2 * flipped, -F.logsigmoid(h), atol=1e-12, rtol=0)


def test_ipo_summed():
    """ipo_sum: (ρ − 1/(2β))². β = 0.5: (2 − 1)² = 1 and (−2 − 1)² = 9; β = 0.25 puts the first at its optimum, 0."""
    assert _call("ipo_sum", 0.5)[0].tolist() == pytest.approx([1.0, 9.0], abs=1e-12)
    assert _call("ipo_sum", 0.25)[0].tolist() == pytest.approx([0.0, 16.0], abs=1e-12)


def test_ipo_per_token_as_trl():
    """trl's ipo, per-token log-ratios: pair 1: 1/2 − (−1)/4 = 0.75, (0.75 − 1)² = 0.0625 at β = 0.5;
    pair 2: −1/4 − 1/2 = −0.75, (−1.75)² = 3.0625. Rewards stay β × summed log-ratio."""
    losses, chosen, _ = _call("ipo", 0.5)
    assert losses.tolist() == pytest.approx([0.0625, 3.0625], abs=1e-12)
    assert chosen.tolist() == [0.5, -0.5]


def test_hinge_slic():
    """max(0, 1 − β ρ): β = 0.5 gives max(0, 0) = 0 and max(0, 2) = 2; β = 0.25 gives 0.5 and 1.5."""
    assert _call("hinge", 0.5)[0].tolist() == pytest.approx([0.0, 2.0], abs=1e-12)
    assert _call("hinge", 0.25)[0].tolist() == pytest.approx([0.5, 1.5], abs=1e-12)


def test_simpo_length_normalised_with_margin():
    """β = 2, γ = 0.5: pair 1 r̃_w = 2(−1)/2 = −1, r̃_l = 2(−3)/4 = −1.5, −log σ(0.5 − 0.5) = log 2;
    pair 2 r̃_w = 2(−3)/4 = −1.5, r̃_l = 2(−1)/2 = −1, −log σ(−0.5 − 0.5) = ℓ(−1) = 1.3132617.
    The reference log-probs play no part (None works)."""
    losses, chosen, rejected = _call("simpo", 2.0, gamma=0.5)
    assert losses.tolist() == pytest.approx([math.log(2), L1 + 1], abs=1e-12)
    assert chosen.tolist() == [-1.0, -1.5] and rejected.tolist() == [-1.5, -1.0]
    no_ref, _, _ = LOSSES["simpo"](
        POLICY_CHOSEN,
        POLICY_REJECTED,
        None,
        None,
        beta=2.0,
        gamma=0.5,
        chosen_lengths=LENGTHS_CHOSEN,
        rejected_lengths=LENGTHS_REJECTED,
    )
    assert torch.equal(no_ref, losses)


def test_reference_free():
    """β = 0.5: ℓ(0.5 (−1 − (−3))) = ℓ(1), and ℓ(−1) for the swapped pair; rewards β log π_θ."""
    losses, chosen, rejected = _call("reference_free", 0.5)
    assert losses.tolist() == pytest.approx([L1, L1 + 1], abs=1e-12)
    assert chosen.tolist() == [-0.5, -1.5] and rejected.tolist() == [-1.5, -0.5]


def test_sft_and_weighted_mix():
    """Per-sequence SFT: −log π(y_w)/|y_w| = 1/2 and 3/4. trl's per-token sft: −log π(y_w)/n̄ with n̄ = (2 + 4)/2 = 3,
    i.e. 1/3 and 1 (mean 2/3 = 4 nats / 6 tokens). sigmoid + 0.1 sft_per_sequence = (ℓ(1) + 0.05, ℓ(−1) + 0.075);
    adding 2 × hinge(β = 0.5) adds (0, 4). Rewards come from the first loss in the list (β × log-ratio here)."""
    assert sft_loss(POLICY_CHOSEN, LENGTHS_CHOSEN).tolist() == [0.5, 0.75]
    assert _call("sft_per_sequence", 0.5)[0].tolist() == [0.5, 0.75]
    assert _call("sft", 0.5)[0].tolist() == pytest.approx([1 / 3, 1.0], abs=1e-12)
    mixed, chosen, _ = combined_loss(
        POLICY_CHOSEN,
        POLICY_REJECTED,
        REF,
        REF,
        0.5,
        loss_type=["sft_per_sequence", "sigmoid", "hinge"],
        loss_weights=[0.1, 1.0, 2.0],
        chosen_lengths=LENGTHS_CHOSEN,
        rejected_lengths=LENGTHS_REJECTED,
    )
    assert mixed.tolist() == pytest.approx([L1 + 0.05, L1 + 1 + 0.075 + 4.0], abs=1e-12)
    assert chosen.tolist() == [0.5, -0.5]
    simpo, chosen, _ = combined_loss(
        POLICY_CHOSEN,
        POLICY_REJECTED,
        None,
        None,
        2.0,
        loss_type=["simpo"],
        gamma=0.5,
        chosen_lengths=LENGTHS_CHOSEN,
        rejected_lengths=LENGTHS_REJECTED,
    )
    assert simpo.tolist() == pytest.approx([math.log(2), L1 + 1], abs=1e-12) and chosen.tolist() == [-1.0, -1.5]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_detaches_rewards_and_passes_gradcheck(name):
    """Shapes (B,), rewards without grad, and autograd equal to finite differences for each registered loss."""
    generator = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(5, generator=generator, dtype=torch.float64) - 3 for _ in range(4))
    inputs = tuple(x.requires_grad_() for x in inputs)
    kwargs = {"chosen_lengths": torch.tensor([1, 2, 3, 4, 5]), "rejected_lengths": torch.tensor([5, 1, 2, 2, 7])}
    if name == "unlikelihood":
        kwargs |= {"rejected_token_logps": -torch.rand(5, 3, generator=generator, dtype=torch.float64) - 0.1,
                   "rejected_token_mask": torch.tensor([[1, 1, 0]] * 5)}
    losses, chosen, rejected = LOSSES[name](*inputs, 0.3, **kwargs)
    assert losses.shape == chosen.shape == rejected.shape == (5,)
    assert not chosen.requires_grad and not rejected.requires_grad
    # the sorted losses spread the batch's terms over the pairs: only their sum is a function of the inputs
    reduce = (lambda losses: losses.sum()) if name in SORTED_LOSSES else (lambda losses: losses)
    assert torch.autograd.gradcheck(lambda *x: reduce(LOSSES[name](*x, 0.3, **kwargs)[0]), inputs)


def _dpo_closed_form(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """Paper §4: ∂L/∂log π(y_w) = −β σ(r̂(y_l) − r̂(y_w)) = −∂L/∂log π(y_l), with r̂ = β log π/π_ref."""
    weight = beta * torch.sigmoid(beta * (policy_rejected - ref_rejected) - beta * (policy_chosen - ref_chosen))
    return -weight, weight


def test_dpo_gradient_wrt_logps_closed_form_autograd_and_finite_differences():
    generator = torch.Generator().manual_seed(1)
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = (
        torch.randn(6, generator=generator, dtype=torch.float64) * 3 - 10 for _ in range(4)
    )
    beta = 0.7
    expected_chosen, expected_rejected = _dpo_closed_form(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta
    )
    pc, pr = policy_chosen.clone().requires_grad_(), policy_rejected.clone().requires_grad_()
    grad_chosen, grad_rejected = torch.autograd.grad(
        dpo_loss(pc, pr, ref_chosen, ref_rejected, beta)[0].sum(), (pc, pr)
    )
    torch.testing.assert_close(grad_chosen, expected_chosen, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_rejected, expected_rejected, atol=1e-12, rtol=0)
    step = 1e-6
    for which, expected in ((0, expected_chosen), (1, expected_rejected)):
        bump = torch.eye(6, dtype=torch.float64) * step
        for i in range(6):
            args = [policy_chosen, policy_rejected]
            up, down = list(args), list(args)
            up[which], down[which] = args[which] + bump[i], args[which] - bump[i]
            numeric = (
                dpo_loss(*up, ref_chosen, ref_rejected, beta)[0].sum()
                - dpo_loss(*down, ref_chosen, ref_rejected, beta)[0].sum()
            ) / (2 * step)
            assert numeric.item() == pytest.approx(expected[i].item(), abs=1e-8)


def test_dpo_gradient_through_a_policy_closed_form_autograd_and_finite_differences():
    """With a tabular softmax policy, ∇_θ log π(y|x) = e_y − π(·|x) on row x, and the paper's gradient
    −β σ(r̂(y_l) − r̂(y_w)) (∇ log π(y_w) − ∇ log π(y_l)) must equal autograd and central differences."""
    generator = torch.Generator().manual_seed(2)
    ref_logprobs = torch.log_softmax(torch.randn(2, 5, generator=generator, dtype=torch.float64), -1)
    policy = TabularPolicy(torch.randn(2, 5, generator=generator, dtype=torch.float64))
    prompt, chosen, rejected, beta = torch.tensor([0, 1, 1]), torch.tensor([3, 0, 2]), torch.tensor([1, 4, 0]), 0.4

    def loss_of(logits):
        logprobs = torch.log_softmax(logits, -1)
        return dpo_loss(
            logprobs[prompt, chosen],
            logprobs[prompt, rejected],
            ref_logprobs[prompt, chosen],
            ref_logprobs[prompt, rejected],
            beta,
        )[0].sum()

    (autograd,) = torch.autograd.grad(loss_of(policy.logits), policy.logits)
    logprobs = policy.log_probs().detach()
    probs = logprobs.exp()
    weight, _ = _dpo_closed_form(
        logprobs[prompt, chosen],
        logprobs[prompt, rejected],
        ref_logprobs[prompt, chosen],
        ref_logprobs[prompt, rejected],
        beta,
    )
    closed = torch.zeros_like(probs)
    for k in range(3):
        grad_log_chosen = F.one_hot(chosen[k], 5).double() - probs[prompt[k]]
        grad_log_rejected = F.one_hot(rejected[k], 5).double() - probs[prompt[k]]
        closed[prompt[k]] += weight[k] * (grad_log_chosen - grad_log_rejected)
    torch.testing.assert_close(autograd, closed, atol=1e-12, rtol=0)
    step, numeric = 1e-6, torch.zeros_like(closed)
    base = policy.logits.detach()
    for index in range(base.numel()):
        bump = torch.zeros(base.numel(), dtype=torch.float64)
        bump[index] = step
        bump = bump.view_as(base)
        numeric.view(-1)[index] = (loss_of(base + bump) - loss_of(base - bump)) / (2 * step)
    torch.testing.assert_close(numeric, closed, atol=1e-8, rtol=0)


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        _call("sigmoid", 0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="flip rate"):
        _call("robust", 0.1, label_smoothing=0.6)
    with pytest.raises(ValueError, match="'ipo' normalises by length"):
        LOSSES["ipo"](POLICY_CHOSEN, POLICY_REJECTED, REF, REF, 0.1)
    with pytest.raises(ValueError, match="ref_rejected_logps has shape"):
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF, REF[:1])
    with pytest.raises(ValueError, match="ref_chosen_logps is None"):
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, None, REF)


def test_registry_marks_the_losses_without_a_reference():
    """The five losses that read no reference log-probs are registered as such (and accept None for them)."""
    from dpolab.losses import LOSS_SPECS, needs_reference

    free = {name for name in LOSSES if not needs_reference(name)}
    assert free == {"sft", "sft_per_sequence", "unlikelihood", "simpo", "reference_free"}
    assert all(LOSS_SPECS[name].fn is LOSSES[name] for name in LOSSES)
    for name in free:
        kwargs = {"rejected_token_logps": torch.full((2, 1), -1.0, dtype=torch.float64),
                  "rejected_token_mask": torch.ones(2, 1)} if name == "unlikelihood" else {}
        losses, _, _ = get_loss(name)(POLICY_CHOSEN, POLICY_REJECTED, None, None, 0.5, chosen_lengths=LENGTHS_CHOSEN,
                                      rejected_lengths=LENGTHS_REJECTED, **kwargs)
        assert torch.isfinite(losses).all()
    with pytest.raises(ValueError, match="unknown loss 'dpo'"):
        needs_reference("dpo")
