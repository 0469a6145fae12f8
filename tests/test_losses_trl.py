"""Parity of every trl 1.16 ``loss_type`` with an independent restatement of trl's formula, loss and gradient.

The restatement below works the way trl's ``DPOTrainer._compute_loss`` does — from per-token log-probs of the
concatenated batch (chosen rows first, then rejected) and a completion mask, one batch-level scalar per loss type,
then ``mean`` and the weighted sum over ``loss_type`` — but is written out from the formulas, not copied. The kit
instead sums log-probs per sequence first and calls one registered per-pair loss per name. Random float64 inputs,
responses of unequal lengths (chosen and rejected of one pair differ, and pairs differ), and the gradient is taken
with respect to the per-token policy log-probs, which is where the model's gradient enters both.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from dpolab.losses import (
    F_DIVERGENCES,
    LOSSES,
    TRL_LOSS_TYPES,
    combined_loss,
    length_desensitised_logps,
    wpo_weights,
)

B, T = 6, 9
TRL_F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


def random_batch(seed: int):
    """Per-token log-probs (2B, T) of policy and reference, a right-aligned-free completion mask, WPO's log Σ p²."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (2 * B,), generator=g)
    lengths[B] = lengths[0] % T + 1  # pair 0: chosen and rejected lengths surely differ
    start = torch.randint(0, 3, (2 * B,), generator=g)  # the completion starts after a prompt of 0–2 tokens
    position = torch.arange(T + 3)
    mask = ((position >= start[:, None]) & (position < (start + lengths)[:, None])).double()
    policy = -3 * torch.rand(2 * B, T + 3, generator=g, dtype=torch.float64) - 0.05
    reference = policy + 0.4 * torch.randn(2 * B, T + 3, generator=g, dtype=torch.float64)
    log_sum_sq = policy - 0.7 * torch.rand(2 * B, T + 3, generator=g, dtype=torch.float64)
    return policy, reference, mask, log_sum_sq


def trl_restated(policy_tokens, ref_tokens, mask, *, beta, loss_type, loss_weights=None, label_smoothing=0.0,
                 discopop_tau=0.05, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, ld_alpha=None,
                 use_weighting=False, log_sum_sq=None):
    """trl 1.16's objective on one batch, restated from its formulas (2B rows: chosen, then rejected)."""
    n = mask.sum(1)
    if ld_alpha is None:
        logps, ref_logps = (policy_tokens * mask).sum(1), (ref_tokens * mask).sum(1)
    else:
        shared = torch.minimum(n[:B], n[B:]).repeat(2)
        rank = mask.cumsum(1) * mask
        weight = mask * torch.where(rank <= shared[:, None], 1.0, ld_alpha)
        logps, ref_logps = (policy_tokens * weight).sum(1), (ref_tokens * weight).sum(1)
    pw, pl = logps[:B], logps[B:]
    rw, rl = ref_logps[:B], ref_logps[B:]
    uw, ul = pw - rw, pl - rl

    def f_prime(u):
        if f_divergence_type == "forward_kl":
            return 1 - torch.exp(-u)
        if f_divergence_type == "js_divergence":
            return math.log(2) + torch.log(torch.sigmoid(u))
        if f_divergence_type == "alpha_divergence":
            a = f_alpha_divergence_coef
            return (torch.exp((a - 1) * u) - 1) / (a - 1)
        return u

    sw, sl = f_prime(uw), f_prime(ul)
    z = beta * (sw - sl)
    eps = label_smoothing
    total = 0.0
    for name, w in zip(loss_type, loss_weights or [1.0] * len(loss_type)):
        if name == "sigmoid":
            per = -torch.log(torch.sigmoid(z))
        elif name == "hinge":
            per = torch.clamp(1 - z, min=0)
        elif name == "ipo":
            per = (sw / n[:B] - sl / n[B:] - 1 / (2 * beta)) ** 2
        elif name == "exo_pair":
            p = torch.sigmoid(z)
            per = p * (torch.log(p) - math.log(1 - eps)) + (1 - p) * (torch.log(1 - p) - math.log(eps))
        elif name == "nca_pair":
            per = (-torch.log(torch.sigmoid(beta * uw)) - 0.5 * torch.log(torch.sigmoid(-beta * uw))
                   - 0.5 * torch.log(torch.sigmoid(-beta * ul)))
        elif name == "robust":
            per = ((1 - eps) * -torch.log(torch.sigmoid(z)) - eps * -torch.log(torch.sigmoid(-z))) / (1 - 2 * eps)
        elif name == "bco_pair":
            per = -torch.log(torch.sigmoid(beta * uw)) - torch.log(torch.sigmoid(-beta * ul))
        elif name == "sppo_hard":
            per = (uw - 1 / (2 * beta)) ** 2 + (ul + 1 / (2 * beta)) ** 2
        elif name in ("aot", "aot_unpaired"):
            first, second = ((pw - pl), (rw - rl)) if name == "aot" else (uw, ul)
            d = beta * (first.sort().values - second.sort().values)
            per = -(1 - eps) * torch.log(torch.sigmoid(d)) - eps * torch.log(torch.sigmoid(-d))
        elif name == "apo_zero":
            per = 1 - torch.sigmoid(beta * uw) + torch.sigmoid(beta * ul)
        elif name == "apo_down":
            per = torch.sigmoid(beta * uw) + 1 - torch.sigmoid(beta * (uw - ul))
        elif name == "discopop":
            m = torch.sigmoid(z / discopop_tau)
            per = (1 - m) * -torch.log(torch.sigmoid(z)) + m * torch.exp(-z)
        elif name == "sft":
            tokens = mask[:B].bool()
            per = (-policy_tokens[:B][tokens].mean()).expand(B)
        elif name == "sigmoid_norm":
            per = -torch.log(torch.sigmoid(beta * (sw / n[:B] - sl / n[B:])))
        else:
            raise AssertionError(name)
        if use_weighting:
            mean_aligned = ((policy_tokens - log_sum_sq).detach() * mask).sum(1) / n
            c = torch.exp(mean_aligned)
            per = per * c[:B] * c[B:]
        total = total + per.mean() * w
    return total


def ours(policy_tokens, ref_tokens, mask, *, beta, loss_type, loss_weights=None, f_divergence_type="reverse_kl",
         f_alpha_divergence_coef=0.5, ld_alpha=None, use_weighting=False, log_sum_sq=None, **params):
    """The kit: per-sequence sums (or LD-DPO's), then :func:`combined_loss` per pair, then the mean over pairs."""
    lengths = mask.sum(1).long()
    plain = (policy_tokens * mask).sum(1)
    if ld_alpha is None:
        policy, reference = plain, (ref_tokens * mask).sum(1)
    else:
        other = torch.cat([lengths[B:], lengths[:B]])
        policy = length_desensitised_logps(policy_tokens, mask, other, ld_alpha)
        reference = length_desensitised_logps(ref_tokens, mask, other, ld_alpha)
        if "sft" in loss_type:
            params["unweighted_chosen_logps"] = plain[:B]
    pair_weights = None
    if use_weighting:
        pair_weights = wpo_weights(policy_tokens[:B], log_sum_sq[:B], mask[:B], policy_tokens[B:], log_sum_sq[B:],
                                   mask[B:])
    losses, _, _ = combined_loss(policy[:B], policy[B:], reference[:B], reference[B:], beta, loss_type=loss_type,
                                 loss_weights=loss_weights, pair_weights=pair_weights,
                                 f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
                                 chosen_lengths=lengths[:B], rejected_lengths=lengths[B:], **params)
    return losses.mean()


def assert_parity(seed, trl_kwargs, our_kwargs=None):
    policy, reference, mask, log_sum_sq = random_batch(seed)
    a = policy.clone().requires_grad_()
    b = policy.clone().requires_grad_()
    expected = trl_restated(a, reference, mask, log_sum_sq=log_sum_sq, **trl_kwargs)
    got = ours(b, reference, mask, log_sum_sq=log_sum_sq, **(our_kwargs or trl_kwargs))
    (grad_expected,) = torch.autograd.grad(expected, a)
    (grad_got,) = torch.autograd.grad(got, b)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(grad_got, grad_expected, atol=1e-12, rtol=1e-10)
    assert grad_expected.abs().max() > 1e-6  # not a trivially flat point


def own_params(name, eps):
    """The kit's parameter names for trl's config values: trl's global label_smoothing goes to the losses that
    read it (trl's sigmoid ignores it, so it is not passed there), discopop_tau to discopop."""
    return {"label_smoothing": eps} if name in ("robust", "exo_pair", "aot", "aot_unpaired") else {}


@pytest.mark.parametrize("name", TRL_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_each_trl_loss_type(name, beta):
    eps = 0.1
    assert name in LOSSES
    assert_parity(hash((name, beta)) % 1000, {"beta": beta, "loss_type": [name], "label_smoothing": eps},
                  {"beta": beta, "loss_type": [name], **own_params(name, eps)})


@pytest.mark.parametrize("f_divergence_type", F_DIVERGENCES)
@pytest.mark.parametrize("name", TRL_F_DIVERGENCE_LOSSES)
def test_f_divergences(name, f_divergence_type):
    kwargs = {"beta": 0.3, "loss_type": [name], "f_divergence_type": f_divergence_type,
              "f_alpha_divergence_coef": 0.3}
    assert_parity(7, {**kwargs, "label_smoothing": 0.05}, {**kwargs, **own_params(name, 0.05)})


def test_alpha_divergence_at_one_is_reverse_kl_and_other_losses_refuse_f_divergences():
    policy, reference, mask, _ = random_batch(3)
    common = {"beta": 0.2, "loss_type": ["sigmoid"]}
    at_one = ours(policy, reference, mask, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0,
                  **common)
    assert at_one.item() == ours(policy, reference, mask, **common).item()
    with pytest.raises(ValueError, match="only for losses of the reward margin"):
        ours(policy, reference, mask, beta=0.2, loss_type=["bco_pair"], f_divergence_type="js_divergence")


def test_mpo_combination():
    """MPO (Wang et al. 2024, arXiv 2411.10442): sigmoid, bco_pair and sft with weights 0.8, 0.2, 1.0."""
    kwargs = {"beta": 0.1, "loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}
    assert_parity(11, kwargs)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("names", [["sigmoid"], ["ipo"], ["sigmoid", "sft"], ["nca_pair"]])
def test_ld_alpha(names, ld_alpha):
    assert_parity(13, {"beta": 0.2, "loss_type": names, "ld_alpha": ld_alpha})


@pytest.mark.parametrize("names", [["sigmoid"], ["ipo"], ["sigmoid", "bco_pair", "sft"], ["apo_zero"]])
def test_wpo_weighting(names):
    assert_parity(17, {"beta": 0.2, "loss_type": names, "use_weighting": True})


def test_wpo_and_ld_alpha_together():
    assert_parity(19, {"beta": 0.5, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.3], "use_weighting": True,
                       "ld_alpha": 0.4})


def test_ld_alpha_hand_value():
    """Chosen of 3 tokens (−1, −2, −3), rejected of 1: l_p = 1, so α = 0.5 gives −1 + 0.5(−2 − 3) = −3.5 for the
    chosen side and the plain −4 for the rejected side of 1 token (all of it shared)."""
    tokens = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    got = length_desensitised_logps(tokens, mask, torch.tensor([1, 3]), 0.5)
    assert got.tolist() == [-3.5, -4.0]


def test_wpo_hand_value():
    """One token each: chosen log p = −1 with log Σp² = −1.5, rejected −2 with −2.5: w = e^{0.5} e^{0.5} = e."""
    one = torch.ones(1, 1)
    weight = wpo_weights(torch.tensor([[-1.0]]), torch.tensor([[-1.5]]), one, torch.tensor([[-2.0]]),
                         torch.tensor([[-2.5]]), one)
    assert weight.item() == pytest.approx(math.e, rel=1e-7)


def test_combination_errors():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_weights has 1 entries for 2 losses"):
        combined_loss(x, x, x, x, loss_type=["sigmoid", "sft"], loss_weights=[1.0], chosen_lengths=x + 1,
                      rejected_lengths=x + 1)
    with pytest.raises(ValueError, match=r"no loss in \['hinge'\] takes the parameter\(s\) \['gamma'\]"):
        combined_loss(x, x, x, x, loss_type=["hinge"], gamma=0.5)
    with pytest.raises(ValueError, match="loss_type is empty"):
        combined_loss(x, x, x, x, loss_type=[])


def hand_pair():
    """Log-ratios +1 (chosen) and −1 (rejected), β = 0.5: r̂_w = 0.5, r̂_l = −0.5, h = βΔ = 1, ℓ(h) = log(1 + e^{−h})."""
    pc, pr, ref = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0])
    return pc, pr, ref


def call(name, **params):
    pc, pr, ref = hand_pair()
    return LOSSES[name](pc.double(), pr.double(), ref.double(), ref.double(), 0.5,
                        chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([4]), **params)[0].item()


def softplus(x):
    return math.log1p(math.exp(x))


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_hand_values_of_the_new_trl_losses():
    """Worked by hand on the pair of :func:`hand_pair` (|y_w| = 2, |y_l| = 4):

    - nca_pair: −log σ(0.5) − ½ log σ(−0.5) − ½ log σ(0.5) = 1.5 ℓ(0.5) + 0.5 ℓ(−0.5), with ℓ(x) = log(1 + e^{−x});
    - bco_pair: −log σ(0.5) − log σ(0.5) = 2 ℓ(0.5);
    - sppo_hard: (1 − 1)² + (−1 + 1)² = 0 (β = 0.5 puts both at their targets ±1);
    - apo_zero: 1 − σ(0.5) + σ(−0.5) = 2(1 − σ(0.5)); apo_down: σ(0.5) + 1 − σ(1);
    - exo_pair, ε = 0.1: σ(1)(log σ(1) − log 0.9) + σ(−1)(log σ(−1) − log 0.1);
    - discopop, τ = 0.05: m = σ(20), (1 − m) ℓ(1) + m e^{−1};
    - sigmoid_norm: Δ̄ = 1/2 + 1/4 = 0.75, ℓ(0.375);
    - aot, one pair: u = −1 − (−3) = 2, v = 0, ℓ(0.5 · 2) = ℓ(1); aot_unpaired: ℓ(0.5 (1 − (−1))) = ℓ(1);
    - sft: −(−1)/2 = 0.5 (one pair: the per-token mean over its 2 tokens).
    """
    def ell(x):
        return softplus(-x)

    assert call("nca_pair") == pytest.approx(1.5 * ell(0.5) + 0.5 * ell(-0.5), abs=1e-6)
    assert call("bco_pair") == pytest.approx(2 * ell(0.5), abs=1e-6)
    assert call("sppo_hard") == pytest.approx(0.0, abs=1e-12)
    assert call("apo_zero") == pytest.approx(2 * (1 - sig(0.5)), abs=1e-6)
    assert call("apo_down") == pytest.approx(sig(0.5) + 1 - sig(1.0), abs=1e-6)
    assert call("exo_pair", label_smoothing=0.1) == pytest.approx(
        sig(1) * (math.log(sig(1)) - math.log(0.9)) + sig(-1) * (math.log(sig(-1)) - math.log(0.1)), abs=1e-6)
    m = sig(20.0)
    assert call("discopop") == pytest.approx((1 - m) * ell(1.0) + m * math.exp(-1.0), abs=1e-6)
    assert call("sigmoid_norm") == pytest.approx(ell(0.375), abs=1e-6)
    assert call("aot") == pytest.approx(ell(1.0), abs=1e-6)
    assert call("aot_unpaired") == pytest.approx(ell(1.0), abs=1e-6)
    assert call("sft") == pytest.approx(0.5, abs=1e-12)


def test_f_divergence_hand_values():
    """Log-ratios u_w = log 2, u_l = 0 (t = 2 and 1), β = 1, sigmoid: forward KL f'(t) = 1 − 1/t gives Δ = 0.5;
    JS f'(t) = log(2t/(1+t)) gives Δ = log(4/3) − 0; α = 0.5: (t^{−0.5} − 1)/(−0.5) gives Δ = 2 − √2."""
    u = torch.tensor([math.log(2)], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    for kind, delta in (("forward_kl", 0.5), ("js_divergence", math.log(4 / 3)), ("alpha_divergence", 2 - 2 ** 0.5)):
        got = LOSSES["sigmoid"](u, zero, zero, zero, 1.0, f_divergence_type=kind, f_alpha_divergence_coef=0.5)[0]
        assert got.item() == pytest.approx(-math.log(sig(delta)), abs=1e-12), kind
    assert F.logsigmoid(torch.zeros(1)).item() == pytest.approx(-math.log(2))
