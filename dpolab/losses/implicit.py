"""The implicit reward of DPO, r̂(x, y) = β (log π_θ(y|x) − log π_ref(y|x)) (paper eq. 5 up to β log Z(x)).

Torch only: the losses use it for their reward metrics, and :mod:`dpolab.rewards` (which also runs models to
score responses) re-exports it.
"""

from __future__ import annotations

from torch import Tensor


def implicit_rewards(policy_logps: Tensor, ref_logps: Tensor | None, beta: float) -> Tensor:
    """r̂ = β (log π_θ(y|x) − log π_ref(y|x)) (paper eq. 5 up to β log Z(x)), detached.

    ``ref_logps=None`` means no reference (a reference-free loss; a uniform π_ref whose terms cancel between
    responses of equal length): r̂ = β log π_θ(y|x).

    Shape: any, the same for both -> the same (a bandit's (X, K) table as well as (N,) responses).
    """
    if ref_logps is None:
        return beta * policy_logps.detach()
    if policy_logps.shape != ref_logps.shape:
        raise ValueError(f"policy_logps {tuple(policy_logps.shape)} and ref_logps {tuple(ref_logps.shape)} differ")
    return beta * (policy_logps.detach() - ref_logps.detach())
