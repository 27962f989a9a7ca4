"""LARS and LAMB for PyTorch, and the optimizer factory used by the trainer.

The update rules are the ones in hvdscale.core.optim_math (see docs/toolbox.md), computed with as
few passes over memory as stock PyTorch kernels allow, since on a CPU the step is bound by
memory traffic, not arithmetic (benchmarks/optimizer_step.py, docs/training.md):
- per-tensor norms with one `_foreach_norm`, per-tensor trust ratios as one small vector;
- on CPU the element-wise update runs in PyTorch's fused optimizer kernels, one pass each:
  LARS is `_fused_sgd_` with the trust-scaled step folded into the dampening (28 bytes moved
  per fp32 parameter, the minimum for two passes, against 52 for the multi-tensor form), LAMB
  builds its direction with `_fused_adam_` at lr = -1 (moments and direction in one pass, 56
  bytes against 108). The ratios are read on the host, which is free on a CPU.
- on other devices (a host read would stall the stream) the multi-tensor `torch._foreach_*`
  form runs, with the ratios kept on the device.
No tensor-sized temporary is allocated per step: state is updated in place and LAMB builds its
direction in a reusable scratch buffer, since fresh large allocations (page faults on CPU,
allocator work on GPU) cost as much as the arithmetic.
Parameters are excluded from weight decay and from the trust ratio by hvdscale.core's rule
(1-D by default, plus name regexes when the optimizer gets named parameters).
"""
import math
from typing import Any, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch.optim import Optimizer

from hvdscale.core.exclusions import ExclusionRule
from hvdscale.errors import ConfigError


def _check(cond, message):
    if not cond:
        raise ConfigError(message)


def _finite(value, what, low=0.0, high=None, high_open=False):
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and value >= low and (high is None or (value < high if high_open else value <= high)))
    bound = f" and {'<' if high_open else '<='} {high}" if high is not None else ""
    _check(ok, f"{what} must be a finite number >= {low}{bound}, got {value!r}")
    return float(value)


# dtypes PyTorch's fused CPU optimizer kernels (_fused_sgd_, _fused_adam_) take
_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class _Layout(NamedTuple):
    """Which of a list of parameters are excluded, on the host and on their device."""
    excluded: List[bool]
    decayed: List[int]                 # positions of the parameters not excluded
    excluded_mask: torch.Tensor        # bool, on the parameters' device
    decayed_index: torch.Tensor        # int64 positions, on the parameters' device


class _LayerwiseOptimizer(Optimizer):
    """Common parts: exclusion flags from names, state gathering, per-tensor scalars."""

    def __init__(self, params, defaults):
        _finite(defaults["lr"], "lr")
        _finite(defaults["weight_decay"], "weight_decay")
        ExclusionRule(defaults["exclude_1d"], defaults["exclude"])  # validates the regexes now
        super().__init__(params, defaults)

    def _excluded_flags(self, group, params):
        rule = ExclusionRule(group["exclude_1d"], group["exclude"])
        names = group.get("param_names")
        index = {id(p): i for i, p in enumerate(group["params"])}
        return [rule(names[index[id(p)]] if names else None, p.ndim) for p in params]

    def _layout(self, group, params) -> _Layout:
        """The exclusion layout of `params`, built once per set of parameters: a tensor made
        from host data in the step is a blocking host-to-device copy on a GPU."""
        cache = self.__dict__.setdefault("_layouts", {})
        key = (tuple(id(p) for p in params), group["exclude_1d"], tuple(group["exclude"]),
               params[0].device)
        layout = cache.get(key)
        if layout is None:
            if len(cache) > 64:        # parameter sets changed many times: start again
                cache.clear()
            excluded = self._excluded_flags(group, params)
            decayed = [i for i, e in enumerate(excluded) if not e]
            device = params[0].device
            layout = cache[key] = _Layout(
                excluded, decayed, torch.tensor(excluded, dtype=torch.bool, device=device),
                torch.tensor(decayed, dtype=torch.int64, device=device))
        return layout

    def _with_grads(self, group):
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__}: sparse gradients are not supported "
                                   f"(param group {self.param_groups.index(group)})")
            params.append(p)
            grads.append(p.grad)
        return params, grads

    @staticmethod
    def _per_tensor(values):
        """A 1-D tensor of per-tensor factors as a list of 0-d tensors for _foreach_* ops."""
        return list(values.unbind(0))

    @staticmethod
    def _fused_kernels(params):
        """PyTorch's fused CPU optimizer kernels apply (host-side per-tensor factors)."""
        return all(p.device.type == "cpu" and p.dtype in _FUSED_DTYPES for p in params)


class LARS(_LayerwiseOptimizer):
    """Layer-wise Adaptive Rate Scaling (You, Gitman, Ginsburg 2017) on SGD with momentum.

        ratio = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps)  (1 if excluded
                or a norm is 0);  v = momentum * v + lr * ratio * (g + weight_decay * w);  w -= v
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.1, *, momentum: float = 0.9,
                 weight_decay: float = 0.0, trust_coefficient: float = 0.001, eps: float = 1e-8,
                 exclude_1d: bool = True, exclude: Sequence[str] = ()):
        _finite(momentum, "momentum", high=1.0, high_open=True)
        _finite(trust_coefficient, "trust_coefficient")
        _finite(eps, "eps")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps,
                                      exclude_1d=exclude_1d, exclude=tuple(exclude or ())))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads = self._with_grads(group)
            if not params:
                continue
            layout = self._layout(group, params)
            excluded = layout.excluded
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
            lr, wd, eta, eps = group["lr"], group["weight_decay"], group["trust_coefficient"], group["eps"]
            w_norm = torch.stack(torch._foreach_norm(params))
            g_norm = torch.stack(torch._foreach_norm(grads))
            trusted = ~layout.excluded_mask & (w_norm > 0) & (g_norm > 0)
            ratio = torch.where(trusted, eta * w_norm / (g_norm + wd * w_norm + eps),
                                torch.ones_like(w_norm))
            coef = lr * ratio
            if group["momentum"] != 0 and self._fused_kernels(params):
                self._fused_update(params, grads, bufs, coef.tolist(), excluded,
                                   group["momentum"], wd)
                continue
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_addcmul_(bufs, grads, self._per_tensor(coef))
            decayed = layout.decayed
            if wd != 0 and decayed:
                torch._foreach_addcmul_([bufs[i] for i in decayed], [params[i] for i in decayed],
                                        self._per_tensor(coef[layout.decayed_index] * wd))
            torch._foreach_sub_(params, bufs)
        return loss

    @staticmethod
    def _fused_update(params, grads, bufs, coefs, excluded, momentum, wd):
        # One pass per tensor: SGD's fused kernel computes buf = momentum * buf +
        # (1 - dampening) * (g + wd * w); w -= lr * buf. With dampening = 1 - lr * ratio
        # (formed in double, so no precision is lost) and lr = 1 that is the LARS update.
        for p, g, buf, c, skip in zip(params, grads, bufs, coefs, excluded):
            torch._fused_sgd_([p], [g], [buf], weight_decay=0.0 if skip else wd,
                              momentum=momentum, lr=1.0, dampening=1.0 - c, nesterov=False,
                              maximize=False, is_first_step=False)


class LAMB(_LayerwiseOptimizer):
    """Layer-wise Adaptive Moments for Batch training (You et al. 2019), AdamW-based.

        r = m_hat / (sqrt(v_hat) + eps);  u = r + weight_decay * w  (r if excluded)
        ratio = min(||w||, clamp_value) / ||u||  (1 if excluded or a norm is 0; at most
                max_trust_ratio if set);  w -= lr * ratio * u
    The direction u is built in a persistent scratch buffer (one tensor per parameter, reused
    every step) so that no tensor-sized memory is allocated per step.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, *,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, bias_correction: bool = True,
                 clamp_value: Optional[float] = None, max_trust_ratio: Optional[float] = None,
                 exclude_1d: bool = True, exclude: Sequence[str] = ()):
        _check(isinstance(betas, (tuple, list)) and len(betas) == 2, f"betas must be a pair, got {betas!r}")
        for i, b in enumerate(betas):
            _finite(b, f"betas[{i}]", high=1.0, high_open=True)
        _finite(eps, "eps")
        if clamp_value is not None:
            _finite(clamp_value, "clamp_value")
        if max_trust_ratio is not None:
            _finite(max_trust_ratio, "max_trust_ratio")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      bias_correction=bool(bias_correction), clamp_value=clamp_value,
                                      max_trust_ratio=max_trust_ratio, exclude_1d=exclude_1d,
                                      exclude=tuple(exclude or ())))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads = self._with_grads(group)
            if not params:
                continue
            by_step = {}
            for i, p in enumerate(params):
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                by_step.setdefault(state["step"], []).append(i)
            # normally one bucket; parameters that missed steps keep their own bias correction
            for step, idx in by_step.items():
                subset = params if len(idx) == len(params) else [params[i] for i in idx]
                self._update(group, step, subset, [grads[i] for i in idx],
                             self._layout(group, subset))
        return loss

    def _scratch_for(self, params):
        """Reusable direction buffers: not part of the optimizer state (never checkpointed)."""
        scratch = self.__dict__.setdefault("_scratch", {})
        out = []
        for p in params:
            buf = scratch.get(p)
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                buf = scratch[p] = torch.empty_like(p, memory_format=torch.preserve_format)
            out.append(buf)
        return out

    def _update(self, group, step, params, grads, layout):
        if self._fused_kernels(params):
            return self._fused_update(group, step, params, grads, layout.excluded)
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        if group["bias_correction"]:
            bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        else:
            bc1 = bc2 = 1.0
        # r = (m / bc1) / (sqrt(v / bc2) + eps) = d / c with d = m / (sqrt(v) + eps * sqrt(bc2))
        # and c = bc1 / sqrt(bc2). Build c * u = d + (wd * c) * w in U: one pass fewer, and
        # ||u|| = ||U|| / c, w -= (lr * ratio / c) * U.
        c = bc1 / math.sqrt(bc2)
        M = [self.state[p]["exp_avg"] for p in params]
        V = [self.state[p]["exp_avg_sq"] for p in params]
        U = self._scratch_for(params)
        torch._foreach_lerp_(M, grads, 1 - beta1)
        torch._foreach_mul_(V, beta2)
        torch._foreach_addcmul_(V, grads, grads, value=1 - beta2)
        torch._foreach_copy_(U, V)
        torch._foreach_sqrt_(U)
        torch._foreach_add_(U, eps * math.sqrt(bc2))
        torch._foreach_reciprocal_(U)
        torch._foreach_mul_(U, M)
        decayed = layout.decayed
        if wd != 0 and decayed:
            torch._foreach_add_([U[i] for i in decayed], [params[i] for i in decayed], alpha=wd * c)

        device, dtype = params[0].device, params[0].dtype
        ratio_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        ratio = torch.ones(len(params), device=device, dtype=ratio_dtype)
        if decayed:
            w_norm = torch.stack(torch._foreach_norm([params[i] for i in decayed])).to(ratio_dtype)
            u_norm = torch.stack(torch._foreach_norm([U[i] for i in decayed])).to(ratio_dtype) / c
            if group["clamp_value"] is not None:
                w_norm = w_norm.clamp(max=group["clamp_value"])
            trusted = (w_norm > 0) & (u_norm > 0)
            r = torch.where(trusted, w_norm / torch.where(trusted, u_norm, 1.0), 1.0)
            if group["max_trust_ratio"] is not None:
                r = r.clamp(max=group["max_trust_ratio"])
            ratio.index_copy_(0, layout.decayed_index, r)
        scale = (ratio * (-lr / c)).to(dtype)
        torch._foreach_addcmul_(params, U, self._per_tensor(scale))

    def _fused_update(self, group, step, params, grads, excluded):
        """CPU: u = r + wd * w built by Adam's fused kernel (three passes in all: wd * w,
        moments + direction, norms; then the update)."""
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        M = [self.state[p]["exp_avg"] for p in params]
        V = [self.state[p]["exp_avg_sq"] for p in params]
        U = self._scratch_for(params)
        for p, u, skip in zip(params, U, excluded):
            if skip or wd == 0:
                u.zero_()
            else:
                torch.mul(p, wd, out=u)
        # Adam's kernel updates m and v and subtracts lr * m_hat / (sqrt(v_hat) + eps) from
        # its "parameter": with lr = -1 and U as the parameter it adds r to U in the same pass.
        # Without bias correction the step is infinite, so beta ** step = 0.
        step_t = torch.tensor(float(step) if group["bias_correction"] else math.inf)
        torch._fused_adam_(U, grads, M, V, [], [step_t] * len(params), lr=-1.0, beta1=beta1,
                           beta2=beta2, weight_decay=0.0, eps=eps, amsgrad=False,
                           maximize=False)
        ratio = [1.0] * len(params)
        decayed = [i for i, e in enumerate(excluded) if not e]
        if decayed:
            w_norm = torch.stack(torch._foreach_norm([params[i] for i in decayed])).double()
            u_norm = torch.stack(torch._foreach_norm([U[i] for i in decayed])).double()
            if group["clamp_value"] is not None:
                w_norm = w_norm.clamp(max=group["clamp_value"])
            trusted = (w_norm > 0) & (u_norm > 0)
            r = torch.where(trusted, w_norm / torch.where(trusted, u_norm, 1.0), 1.0)
            if group["max_trust_ratio"] is not None:
                r = r.clamp(max=group["max_trust_ratio"])
            for i, value in zip(decayed, r.tolist()):
                ratio[i] = value
        for p, u, value in zip(params, U, ratio):
            p.add_(u, alpha=-lr * value)


def _getter(cfg):
    """`get(key)` over the recipe's optimizer section: a dict, an object, or None."""
    if cfg is None:
        return lambda key: None
    if isinstance(cfg, Mapping):
        return cfg.get
    return lambda key: getattr(cfg, key, None)


def _named_parameters(model):
    if hasattr(model, "named_parameters"):
        named = list(model.named_parameters())
    else:
        items = list(model)
        named = [item if isinstance(item, tuple) else (None, item) for item in items]
    return [(n, p) for n, p in named if p.requires_grad]


class SGDW(torch.optim.SGD):
    """SGD with momentum and decoupled weight decay: each step first shrinks the decayed
    parameters by (1 - lr * weight_decay), then takes torch's SGD step without L2 -- Keras's
    SGD(weight_decay=...) rule (Loshchilov & Hutter 2019). A group's `weight_decay` is the
    decoupled rate (torch.optim.SGD itself only ever sees 0)."""

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0):
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay)

    def add_param_group(self, param_group):
        # every group (also those torch's __init__ adds) moves its rate to the decoupled key
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["decoupled_weight_decay"], group["weight_decay"] = group["weight_decay"], 0.0

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            rate = group["decoupled_weight_decay"] * group["lr"]
            params = [p for p in group["params"] if p.grad is not None]
            if rate and params:
                torch._foreach_mul_(params, 1.0 - rate)
        return super().step(closure)


def split_for_weight_decay(named_params: Sequence[Tuple[Optional[str], torch.Tensor]],
                           weight_decay: float, exclude_1d: bool = True,
                           exclude: Sequence[str] = ()) -> List[dict]:
    """Two torch param groups: decayed parameters and excluded ones (weight_decay 0)."""
    rule = ExclusionRule(exclude_1d, exclude)
    decay, skip = [], []
    for name, p in named_params:
        (skip if rule(name, p.ndim) else decay).append((name, p))
    groups = [{"params": [p for _, p in decay], "param_names": [n for n, _ in decay],
               "weight_decay": weight_decay},
              {"params": [p for _, p in skip], "param_names": [n for n, _ in skip], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# --------------------------------------------------------------------------- the builders
# One per registry entry (hvdscale/registry.py), called with torch's own keywords; the values
# are already resolved and checked against hvdscale.core.optimizers.

NamedParams = List[Tuple[Optional[str], torch.Tensor]]


def _names_or_tensors(named: NamedParams):
    return named if all(n is not None for n, _ in named) else [p for _, p in named]


def build_sgd(named: NamedParams, *, lr: float, momentum: float, nesterov: bool,
              weight_decay: float, exclude_1d: bool, exclude: Sequence[str]) -> torch.optim.SGD:
    return torch.optim.SGD(split_for_weight_decay(named, weight_decay, exclude_1d, exclude),
                           lr=lr, momentum=momentum, nesterov=nesterov)


def build_sgdw(named: NamedParams, *, lr: float, momentum: float, nesterov: bool,
               weight_decay: float, exclude_1d: bool, exclude: Sequence[str]) -> "SGDW":
    return SGDW(split_for_weight_decay(named, weight_decay, exclude_1d, exclude),
                lr=lr, momentum=momentum, nesterov=nesterov)


def build_adamw(named: NamedParams, *, lr: float, betas: Tuple[float, float], eps: float,
                weight_decay: float, exclude_1d: bool, exclude: Sequence[str]) -> torch.optim.AdamW:
    return torch.optim.AdamW(split_for_weight_decay(named, weight_decay, exclude_1d, exclude),
                             lr=lr, betas=tuple(betas), eps=eps)


def build_lars(named: NamedParams, *, lr: float, momentum: float, weight_decay: float,
               trust_coefficient: float, eps: float, exclude_1d: bool,
               exclude: Sequence[str]) -> LARS:
    return LARS(_names_or_tensors(named), lr=lr, momentum=momentum, weight_decay=weight_decay,
                trust_coefficient=trust_coefficient, eps=eps, exclude_1d=exclude_1d,
                exclude=exclude)


def build_lamb(named: NamedParams, *, lr: float, betas: Tuple[float, float], eps: float,
               weight_decay: float, bias_correction: bool, clamp_value: Optional[float],
               max_trust_ratio: Optional[float], exclude_1d: bool,
               exclude: Sequence[str]) -> LAMB:
    return LAMB(_names_or_tensors(named), lr=lr, betas=tuple(betas), eps=eps,
                weight_decay=weight_decay, bias_correction=bias_correction,
                clamp_value=clamp_value, max_trust_ratio=max_trust_ratio,
                exclude_1d=exclude_1d, exclude=exclude)


def build_optimizer(name: str, model: Any, lr: float, cfg_optimizer: Any = None) -> Optimizer:
    """The registered optimizer `name` (hvdscale.registry.OPTIMIZERS: sgd, sgdw, lars, lamb, adamw,
    or one you registered) for `model` (a module, named_parameters() or parameters()) at
    learning rate `lr`. Options come from `cfg_optimizer` (the recipe's optimizer section, a
    dict or an object, recipe keys); unset ones take hvdscale.core.optimizers' defaults, and
    each is passed to the builder under torch's own keyword (eps, betas, ...)."""
    from hvdscale.registry import BACKENDS, OPTIMIZERS

    info = OPTIMIZERS.get(str(name).lower())
    get = _getter(cfg_optimizer)
    named = _named_parameters(model)
    _check(bool(named), "the model has no trainable parameters")
    exclude_1d = bool(True if get("exclude_1d") is None else get("exclude_1d"))
    exclude = tuple(get("exclude") or ())
    ExclusionRule(exclude_1d, exclude)  # bad regexes fail here, before any training
    if exclude and any(n is None for n, _ in named):
        raise ConfigError("optimizer.exclude: patterns need parameter names: pass the model "
                          "or named_parameters()")
    options = BACKENDS.get("torch").native_kwargs(info.resolve_options(get))
    return info.builder("torch")(named, lr=_finite(lr, "optimizer.base_lr"),
                                 exclude_1d=exclude_1d, exclude=exclude, **options)
