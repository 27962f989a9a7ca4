"""LARS and LAMB update rules, once, in NumPy: the reference the torch and TF optimizers are
tested against. One function call is one update of one tensor; the state is returned, never
kept. Arithmetic follows the dtype of the inputs (float64 gives the exact reference).

LARS (You, Gitman, Ginsburg 2017, Algorithm 1), momentum buffer v (zero at start):
    d     = g + wd * w                                       (g alone when excluded)
    ratio = eta * ||w|| / (||g|| + wd * ||w|| + eps)         (1 when excluded or a norm is 0)
    v     = momentum * v + lr * ratio * d
    w     = w - v
The learning rate sits inside the momentum buffer as in the paper, so a schedule change acts
on new gradients only.

LAMB (You et al. 2019, Algorithm 2), moments m, v (zero at start), step t = 1, 2, ...:
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g^2
    m_hat = m / (1 - beta1^t),  v_hat = v / (1 - beta2^t)    (m, v when bias_correction=False)
    r = m_hat / (sqrt(v_hat) + eps)
    u = r + wd * w                                           (r alone when excluded)
    ratio = phi(||w||) / ||u||,  phi(x) = min(x, clamp_value) (identity without a clamp)
            1 when excluded or either norm is 0; min(ratio, max_trust_ratio) if that is set
    w = w - lr * ratio * u
"""
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

LARS_DEFAULTS = dict(momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=1e-8)
LAMB_DEFAULTS = dict(beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True,
                     clamp_value=None, max_trust_ratio=None)


def _norm(x):
    return np.sqrt(np.sum(np.square(x)))


def lars_trust_ratio(w_norm, g_norm, weight_decay, trust_coefficient, eps):
    if w_norm > 0 and g_norm > 0:
        return trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
    return 1.0


def lamb_trust_ratio(w_norm: float, u_norm: float, *, clamp_value: Optional[float] = None,
                     max_trust_ratio: Optional[float] = None) -> float:
    if clamp_value is not None:
        w_norm = min(w_norm, clamp_value)
    ratio = w_norm / u_norm if (w_norm > 0 and u_norm > 0) else 1.0
    if max_trust_ratio is not None:
        ratio = min(ratio, max_trust_ratio)
    return ratio


def lars_update(w: np.ndarray, g: np.ndarray, buf: Optional[np.ndarray], lr: float, *,
                momentum: float = 0.9, weight_decay: float = 0.0,
                trust_coefficient: float = 0.001, eps: float = 1e-8,
                excluded: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """One LARS update of one tensor: returns (new w, new momentum buffer)."""
    w, g = np.asarray(w), np.asarray(g)
    buf = np.zeros_like(w) if buf is None else np.asarray(buf)
    if excluded:
        d, ratio = g, 1.0
    else:
        d = g + w.dtype.type(weight_decay) * w
        ratio = lars_trust_ratio(_norm(w), _norm(g), weight_decay, trust_coefficient, eps)
    buf = w.dtype.type(momentum) * buf + w.dtype.type(lr * ratio) * d
    return w - buf, buf


def lamb_update(w: np.ndarray, g: np.ndarray, m: Optional[np.ndarray], v: Optional[np.ndarray],
                step: int, lr: float, *, beta1: float = 0.9, beta2: float = 0.999,
                eps: float = 1e-6, weight_decay: float = 0.01, bias_correction: bool = True,
                clamp_value: Optional[float] = None, max_trust_ratio: Optional[float] = None,
                excluded: bool = False) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One LAMB update of one tensor at 1-based `step`: returns (new w, new m, new v)."""
    w, g = np.asarray(w), np.asarray(g)
    t = w.dtype.type
    m = np.zeros_like(w) if m is None else np.asarray(m)
    v = np.zeros_like(w) if v is None else np.asarray(v)
    m = t(beta1) * m + t(1 - beta1) * g
    v = t(beta2) * v + t(1 - beta2) * g * g
    if bias_correction:
        m_hat, v_hat = m / t(1 - beta1 ** step), v / t(1 - beta2 ** step)
    else:
        m_hat, v_hat = m, v
    u = m_hat / (np.sqrt(v_hat) + t(eps))
    if excluded:
        ratio = 1.0
    else:
        u = u + t(weight_decay) * w
        ratio = lamb_trust_ratio(_norm(w), _norm(u), clamp_value=clamp_value,
                                 max_trust_ratio=max_trust_ratio)
    return w - t(lr * ratio) * u, m, v


def run_reference(kind: str, weights: Sequence[np.ndarray],
                  grad_fn: Callable[[int, List[np.ndarray]], Sequence[np.ndarray]],
                  lrs: Sequence[float], excluded: Sequence[bool], **hyper: Any) -> List[np.ndarray]:
    """Apply `len(lrs)` updates of `kind` ('lars' | 'lamb') to a list of tensors.

    grad_fn(step_index, weights) -> list of gradients. Returns the final weights (list)."""
    weights = [np.array(w) for w in weights]
    state = [None] * len(weights)
    for i, lr in enumerate(lrs):
        grads = grad_fn(i, weights)
        for j, (w, g) in enumerate(zip(weights, grads)):
            if kind == "lars":
                weights[j], state[j] = lars_update(w, g, state[j], lr, excluded=excluded[j], **hyper)
            elif kind == "lamb":
                m, v = state[j] or (None, None)
                weights[j], m, v = lamb_update(w, g, m, v, i + 1, lr, excluded=excluded[j], **hyper)
                state[j] = (m, v)
            else:
                raise ValueError(f"unknown optimizer {kind!r}")
    return weights
