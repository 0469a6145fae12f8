"""The Bradley–Terry reward-model loss of the RLHF pipeline that DPO replaces (paper §3, Eq. 2).

Under the Bradley–Terry model p(y_w ≻ y_l | x) = σ(r(x, y_w) − r(x, y_l)), so the negative log-likelihood of the
preference pairs is

    L_R(r) = −E_{(x, y_w, y_l)} [ log σ(r(x, y_w) − r(x, y_l) − m) ]                  (paper Eq. 2, m = 0)

with an optional per-pair margin m (Llama 2's margin loss; trl's ``margin`` column) and trl ``RewardTrainer``'s
``center_rewards_coefficient`` c, which adds c · (r(x, y_w) + r(x, y_l))² to keep the rewards centred at zero
(Eisenstein et al., 2023). This module needs torch alone; it is not a member of :data:`dpolab.losses.LOSSES`, whose
losses read log-probs of a policy and a reference, not a scalar reward head.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def reward_model_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | float | None = None,
                      center_rewards_coefficient: float | None = None) -> Tensor:
    """Per-pair Bradley–Terry loss −log σ(r_w − r_l − m) + c·(r_w + r_l)². Shape: (B,) inputs -> (B,).

    The mean over a batch is trl ``RewardTrainer``'s loss (its centring term is ``c · mean((r_w + r_l)²)``, which is
    the mean of the per-pair terms here). Gradient: ∂L/∂r_w = −σ(−(r_w − r_l − m)) + 2c(r_w + r_l), and
    ∂L/∂r_l = σ(−(r_w − r_l − m)) + 2c(r_w + r_l).
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"chosen_rewards {tuple(chosen_rewards.shape)} and rejected_rewards "
                         f"{tuple(rejected_rewards.shape)} must have the same shape")
    margins = chosen_rewards - rejected_rewards
    if margin is not None:
        margins = margins - margin
    losses = -F.logsigmoid(margins)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return losses
