"""A penalised, weighted logistic regression solved by damped Newton steps, batched over many weightings (the
Bradley–Terry fit of :mod:`dpolab.evaluate.rank` and its bootstrap resamples in one call)."""

from __future__ import annotations

import numpy as np
from scipy.special import expit


def fit_logistic(X: np.ndarray, y: np.ndarray, weights: np.ndarray, penalty: np.ndarray | None = None, *,
                 max_iter: int = 100, tol: float = 1e-10) -> np.ndarray:
    """Maximise a penalised weighted logistic log-likelihood by damped Newton steps, for many weightings at once.

    Maximises, separately for every row ``w`` of ``weights`` (e.g. one bootstrap resample per row),

        Σ_r w_r [y_r log σ(x_r·θ) + (1 − y_r) log σ(−x_r·θ)] − ½ θᵀ Q θ,

    a concave objective; soft targets (a tie is y = ½) are allowed. Each Newton step is shortened by
    backtracking until it increases the objective enough (Armijo), so the iteration cannot diverge.

    Args:
        X: design matrix. Shape: (R, p).
        y: targets in [0, 1]. Shape: (R,).
        weights: non-negative row weights, one set per fit. Shape: (B, R).
        penalty: Q, symmetric positive semi-definite (a ridge is ``l2 * I``). Shape: (p, p). Default 0.
        max_iter: most Newton steps.
        tol: stop when no coordinate moves more than this.

    Returns:
        The maximisers θ. Shape: (B, p).
    """
    X, y, weights = np.asarray(X, float), np.asarray(y, float), np.atleast_2d(np.asarray(weights, float))
    p = X.shape[1]
    block = max(1, 4_000_000 // (X.size + 1))  # fits at a time: bounds the (fits × rows) temporaries
    if len(weights) > block:
        return np.concatenate([fit_logistic(X, y, weights[start:start + block], penalty, max_iter=max_iter, tol=tol)
                               for start in range(0, len(weights), block)])
    Q = np.zeros((p, p)) if penalty is None else np.asarray(penalty, float)

    def objective(theta):  # theta (..., B, p) -> (..., B)
        z = theta @ X.T
        loglik = -(y * np.logaddexp(0.0, -z) + (1.0 - y) * np.logaddexp(0.0, z))
        return (weights * loglik).sum(-1) - 0.5 * np.einsum("...i,ij,...j->...", theta, Q, theta)

    outer = (X[:, :, None] * X[:, None, :]).reshape(len(X), p * p)  # x_r x_rᵀ, flattened: one matmul per Hessian
    theta = np.zeros((weights.shape[0], p))
    for _ in range(max_iter):
        s = expit(theta @ X.T)  # (B, R)
        grad = (weights * (y - s)) @ X - theta @ Q
        neg_hess = ((weights * s * (1.0 - s)) @ outer).reshape(-1, p, p) + Q  # Σ_r w_r s_r(1 − s_r) x_r x_rᵀ
        try:
            direction = np.linalg.solve(neg_hess, grad[..., None])[..., 0]
        except np.linalg.LinAlgError:  # a resample whose design leaves a direction unpenalised and unseen
            direction = (np.linalg.pinv(neg_hess) @ grad[..., None])[..., 0]
        # backtracking (Armijo): halve the step of each fit whose objective did not rise enough; a fit whose
        # predicted rise (half the Newton decrement, `slope`) is below rounding is at its optimum: full step
        slope, base, step = (grad * direction).sum(-1), objective(theta), np.ones(len(theta))
        for _ in range(40):
            gain = objective(theta + step[:, None] * direction) - base
            ok = (gain >= 1e-4 * step * slope) | (slope < 1e-12 * np.maximum(1.0, np.abs(base)))
            if ok.all():
                break
            step = np.where(ok, step, step / 2)
        step = np.where(ok, step, 0.0)  # no ascent left at machine precision: that fit has converged
        theta = theta + step[:, None] * direction
        if np.max(np.abs(step[:, None] * direction), initial=0.0) < tol:
            break
    return theta
