"""Frozen-weights gradient noise probe (McCandlish et al. 2018, App. A, done offline).

At fixed weights w, n micro-batches of b examples each (drawn without replacement) give
gradients g_1..g_n. Per parameter tensor l, with G the true gradient and Sigma the per-example
covariance:
    tr(Sigma_l) ~ b * sum_i |g_il - gbar_l|^2 / (n - 1)
    |G_l|^2     ~ |gbar_l|^2 - tr(Sigma_l) / (n b)            (unbiased)
    B_simple    = sum_l tr(Sigma_l) / sum_l |G_l|^2
Everything is a function of the per-layer Gram matrices K_l[i, j] = g_il . g_jl, so a bootstrap
over micro-batches (resampling counts c with sum n: gbar = c.g/n) costs a few small matrix
products per replicate.

Layer-wise optimizers. LARS and LAMB do not step along the gradient: the update of layer l is
lr * c_l * P_l g_l, with P_l an element-wise preconditioner (1 for LARS; 1/(sqrt(v_hat)+eps)
from LAMB's second moment) and c_l the trust ratio (LARS: eta ||w_l|| / (||P_l G_l|| + wd ||w_l||),
LAMB: ||w_l|| / ||P_l G_l||; 1 for excluded tensors). The noise scale of that update is
    B_layerwise = sum_l c_l^2 tr(Sigma~_l) / sum_l c_l^2 |G~_l|^2,
with Sigma~_l, G~_l the covariance and mean of P_l g_l, and the trust ratios taken at the
true (mean) gradient. For trusted layers c_l^2 |G~_l|^2 ~ eta^2 ||w_l||^2, so B_layerwise is
roughly a ||w_l||^2-weighted mean of the per-layer noise scales tr(Sigma~_l)/|G~_l|^2: the
layer with the largest weights, not the one with the largest gradient, dominates it.
Momentum (and the trust ratio's own noise) are left out, as in the SGD case.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hvdscale.core.exclusions import ExclusionRule


@dataclass
class Interval:
    estimate: float
    ci_low: float
    ci_high: float

    def as_dict(self):
        return {"estimate": self.estimate, "ci_low": self.ci_low, "ci_high": self.ci_high}


def micro_batch_gradients(model, x, y, micro, count, generator):
    """{name: [count, numel] float64 array}: the gradients of `count` micro-batches of `micro`
    examples drawn without replacement from (x, y), at the model's current weights."""
    idx = torch.randperm(len(y), generator=generator)[:micro * count]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = {n: np.empty((count, p.numel())) for n, p in named}
    model.train()
    for i in range(count):
        part = idx[i * micro:(i + 1) * micro]
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[part]), y[part]).backward()
        for n, p in named:
            grads[n][i] = p.grad.detach().reshape(-1).double().numpy()
    model.zero_grad(set_to_none=True)
    return grads


def layer_moments(gram, micro, counts=None):
    """(tr(Sigma), |G|^2) of one layer from its Gram matrix; `counts` [R, n] resamples
    micro-batches (bootstrap), None uses each once. Returns arrays [R] (or scalars)."""
    n = gram.shape[0]
    if counts is None:
        counts = np.ones((1, n))
    counts = np.asarray(counts, dtype=float)
    mean_sq = np.einsum("ri,ij,rj->r", counts, gram, counts) / n ** 2          # |gbar|^2
    spread = (counts @ np.diag(gram)) - n * mean_sq                           # sum |g_i - gbar|^2
    trace = micro * spread / (n - 1)
    g2 = mean_sq - trace / (n * micro)
    return trace, g2


@dataclass
class ProbeResult:
    b_simple: float
    b_layerwise: float                 # trust-ratio-aware, None for plain SGD
    per_layer: dict                    # name -> {"b_simple", "trace", "g2", "trust"}
    boot_simple: np.ndarray            # bootstrap replicates
    boot_layerwise: np.ndarray


def probe(model, x, y, *, micro=32, count=64, replicates=400, seed=0, optimizer=None,
          optimizer_cfg=None, optimizer_state=None):
    """B_simple at the model's weights (and the layer-wise noise scale for lars/lamb).

    optimizer_state: the torch optimizer's state_dict at these weights (LAMB needs its second
    moment v for the preconditioner)."""
    gen = torch.Generator().manual_seed(seed)
    grads = micro_batch_gradients(model, x, y, micro, count, gen)
    names = list(grads)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(count, [1.0 / count] * count, size=replicates)
    params = dict(model.named_parameters())
    scale = _preconditioner(optimizer, optimizer_cfg, optimizer_state, model, names)
    per_layer, traces, g2s, ptraces, pg2s, trusts = {}, [], [], [], [], []
    for name in names:
        g = grads[name]
        gram = g @ g.T
        tr0, g20 = layer_moments(gram, micro)
        trb, g2b = layer_moments(gram, micro, counts)
        traces.append(np.concatenate([tr0, trb]))
        g2s.append(np.concatenate([g20, g2b]))
        entry = {"trace": float(tr0[0]), "g2": float(g20[0]),
                 "b_simple": float(tr0[0] / g20[0]) if g20[0] > 0 else None,
                 "weight_norm": float(params[name].detach().norm())}
        if scale is not None:
            gp = g * scale[name][None, :]
            gram_p = gp @ gp.T
            ptr0, pg20 = layer_moments(gram_p, micro)
            ptrb, pg2b = layer_moments(gram_p, micro, counts)
            ptr, pg2 = np.concatenate([ptr0, ptrb]), np.concatenate([pg20, pg2b])
            trust = _trust(optimizer, optimizer_cfg, name, params[name], pg2)
            ptraces.append(trust ** 2 * ptr)
            pg2s.append(trust ** 2 * pg2)
            trusts.append(trust)
            entry.update({"trace_pre": float(ptr0[0]), "g2_pre": float(pg20[0]),
                          "b_pre": float(ptr0[0] / pg20[0]) if pg20[0] > 0 else None,
                          "trust": float(trust[0])})
        per_layer[name] = entry
    b = _ratio(np.sum(traces, axis=0), np.sum(g2s, axis=0))
    bl = _ratio(np.sum(ptraces, axis=0), np.sum(pg2s, axis=0)) if scale is not None else None
    return ProbeResult(float(b[0]), None if bl is None else float(bl[0]), per_layer,
                       b[1:], None if bl is None else bl[1:])


def _ratio(trace, g2):
    return np.where(g2 > 0, trace / np.where(g2 > 0, g2, 1.0), np.inf)


def _get(cfg, key, default):
    value = cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)
    return default if value is None else value


def _preconditioner(optimizer, cfg, state, model, names):
    """name -> element-wise factor of the update's preconditioner (None: plain gradient)."""
    if optimizer not in ("lars", "lamb"):
        return None
    params = dict(model.named_parameters())
    ones = {n: np.ones(params[n].numel()) for n in names}
    if optimizer == "lars" or state is None:
        return ones
    from hvdscale.torch.optim import build_optimizer

    # the optimizer's own state at these weights, mapped back to parameter names
    opt = build_optimizer(optimizer, model, 1.0, cfg)
    opt.load_state_dict(state)
    eps = float(_get(cfg, "eps", 1e-6))
    beta2 = float(_get(cfg, "betas", (0.9, 0.999))[1])
    out = dict(ones)
    for name in names:
        entry = opt.state.get(params[name])
        if not entry or "exp_avg_sq" not in entry:
            continue
        step = float(entry.get("step", 1) or 1)
        v_hat = entry["exp_avg_sq"].double() / (1 - beta2 ** step)
        out[name] = (1.0 / (v_hat.sqrt() + eps)).reshape(-1).numpy()
    return out


def _trust(optimizer, cfg, name, weight, g2_pre):
    """The trust ratio c_l at the true gradient (1 for excluded tensors), per replicate."""
    rule = ExclusionRule(_get(cfg, "exclude_1d", True), _get(cfg, "exclude", ()))
    if rule(name, weight.ndim):
        return np.ones_like(g2_pre)
    w = float(weight.detach().norm())
    gnorm = np.sqrt(np.maximum(g2_pre, 1e-30))
    if optimizer == "lars":
        eta = float(_get(cfg, "trust_coefficient", 0.001))
        wd = float(_get(cfg, "weight_decay", 0.0))
        return eta * w / (gnorm + wd * w + 1e-12)
    return w / gnorm


def combine_seeds(results, layerwise=False, level=0.95, seed=0):
    """Geometric mean over seeds of the probes' estimates, with a percentile interval from a
    two-level bootstrap (seeds resampled, then each seed's own micro-batch replicate)."""
    if not results:
        return None
    pick = (lambda r: (r.b_layerwise, r.boot_layerwise)) if layerwise else \
        (lambda r: (r.b_simple, r.boot_simple))
    points = [pick(r) for r in results]
    if any(p[0] is None for p in points):
        return None
    est = math.exp(float(np.mean([math.log(max(p[0], 1e-12)) for p in points])))
    rng = np.random.default_rng(seed)
    reps = min(len(p[1]) for p in points)
    logs = np.log(np.clip(np.stack([p[1][:reps] for p in points]), 1e-12, None))   # [S, R]
    which = rng.integers(0, len(points), size=(reps, len(points)))
    boot = np.exp(np.mean(logs[which, np.arange(reps)[:, None]], axis=1))
    boot = boot[np.isfinite(boot)]
    lo, hi = np.percentile(boot, [50 * (1 - level), 50 * (1 + level)]) if len(boot) else (None, None)
    return Interval(est, float(lo), float(hi))
