"""LARS and LAMB as Keras 3 optimizers (TensorFlow backend), and the optimizer factory.

The update rules are hvdscale.core.optim_math's (docs/toolbox.md); they work with
`tf.GradientTape` + `hvd.DistributedGradientTape` (apply the averaged gradients with
`optimizer.apply_gradients`) and inside `model.fit`. Which variables skip weight decay and the
trust ratio is decided once in `build()` from their shapes and paths (Keras 3 `variable.path`,
e.g. "sequential/dense/bias") with hvdscale.core's rule, so the traced update has no branches.
Weight decay is part of the update (coupled, as in the papers): the base class's decoupled
`weight_decay` stays off.
"""
import math
from typing import Any, Mapping, Optional, Sequence, Union

import keras
import tensorflow as tf

from hvdscale.core.exclusions import ExclusionRule
from hvdscale.errors import ConfigError

# a float or a Keras schedule (e.g. hvdscale.tensorflow.schedule.CoreSchedule)
LearningRate = Union[float, "keras.optimizers.schedules.LearningRateSchedule"]


def _check(cond, message):
    if not cond:
        raise ConfigError(message)


def _finite(value, what, high=None):
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and value >= 0 and (high is None or value < high))
    _check(ok, f"{what} must be a finite number >= 0{f' and < {high}' if high is not None else ''}, got {value!r}")
    return float(value)


def variable_name(variable):
    """The name the exclusion patterns see: the Keras 3 path, else the TF name."""
    return getattr(variable, "path", None) or variable.name


def _const(value, dtype):
    # tf.cast(python_float, float64) would round through float32 first
    return tf.constant(value, dtype)


def _norm(x):
    # one reduction kernel (EuclideanNorm), not a squared copy and then a sum
    return tf.math.reduce_euclidean_norm(x)


def _handle(variable):
    """The resource handle under a Keras 3 variable, for TensorFlow's fused training ops."""
    if isinstance(variable, tf.Variable):
        return variable.handle
    return variable.value.handle


# TensorFlow's fused training kernels (ResourceApplyAdam, ResourceApplyMomentum,
# ResourceApplyGradientDescent) each update a variable in one pass over memory, where the same
# update written as tensor expressions makes a new tensor per operation: on a CPU the LAMB step
# is bound by that memory traffic (benchmarks/optimizer_step.py).


class _LayerwiseOptimizer(keras.optimizers.Optimizer):
    def __init__(self, learning_rate, weight_decay, exclude_1d, exclude, name, **kwargs):
        _check(kwargs.get("weight_decay") is None, "weight_decay is given twice")
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.layerwise_weight_decay = _finite(weight_decay, "weight_decay")
        self.exclude_1d = bool(exclude_1d)
        self.exclude = tuple(exclude or ())
        self._rule = ExclusionRule(self.exclude_1d, self.exclude)
        self._excluded = {}

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._excluded = {self._var_key(v): self._rule(variable_name(v), len(v.shape)) for v in var_list}

    def is_excluded(self, variable):
        return self._excluded[self._var_key(variable)]

    def get_config(self):
        config = super().get_config()
        config.update(weight_decay=self.layerwise_weight_decay, exclude_1d=self.exclude_1d,
                      exclude=list(self.exclude))
        return config


class LARS(_LayerwiseOptimizer):
    """Layer-wise Adaptive Rate Scaling (You, Gitman, Ginsburg 2017) on SGD with momentum.

        ratio = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + epsilon)  (1 if
                excluded or a norm is 0);  v = momentum * v + lr * ratio * (g + wd * w);  w -= v
    """

    def __init__(self, learning_rate: LearningRate = 0.1, *, momentum: float = 0.9,
                 weight_decay: float = 0.0, trust_coefficient: float = 0.001,
                 epsilon: float = 1e-8, exclude_1d: bool = True, exclude: Sequence[str] = (),
                 name: str = "lars", **kwargs: Any):
        super().__init__(learning_rate, weight_decay, exclude_1d, exclude, name, **kwargs)
        self.momentum = _finite(momentum, "momentum", high=1.0)
        self.trust_coefficient = _finite(trust_coefficient, "trust_coefficient")
        self.epsilon = _finite(epsilon, "epsilon")

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._momentums = [self.add_variable_from_reference(v, "momentum") for v in var_list]

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr = tf.cast(learning_rate, dtype)
        g = tf.cast(tf.convert_to_tensor(gradient), dtype)
        w = tf.convert_to_tensor(variable)
        buf = self._momentums[self._get_variable_index(variable)]
        if self.is_excluded(variable):
            step = lr * g
        else:
            wd = _const(self.layerwise_weight_decay, dtype)
            w_norm, g_norm = _norm(w), _norm(g)
            trusted = tf.logical_and(w_norm > 0, g_norm > 0)
            ratio = tf.where(trusted, _const(self.trust_coefficient, dtype) * w_norm
                             / (g_norm + wd * w_norm + _const(self.epsilon, dtype)), tf.ones_like(w_norm))
            step = (lr * ratio) * (g + wd * w)
        # buf = momentum * buf + step; w -= buf, in one pass
        tf.raw_ops.ResourceApplyMomentum(var=_handle(variable), accum=_handle(buf),
                                         lr=tf.ones([], dtype), grad=step,
                                         momentum=_const(self.momentum, dtype),
                                         use_locking=False, use_nesterov=False)

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, trust_coefficient=self.trust_coefficient, epsilon=self.epsilon)
        return config


class LAMB(_LayerwiseOptimizer):
    """Layer-wise Adaptive Moments for Batch training (You et al. 2019), AdamW-based.

        r = m_hat / (sqrt(v_hat) + epsilon);  u = r + weight_decay * w  (r if excluded)
        ratio = min(||w||, clamp_value) / ||u||  (1 if excluded or a norm is 0; at most
                max_trust_ratio if set);  w -= lr * ratio * u
    """

    def __init__(self, learning_rate: LearningRate = 1e-3, *, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-6, weight_decay: float = 0.01,
                 bias_correction: bool = True, clamp_value: Optional[float] = None,
                 max_trust_ratio: Optional[float] = None, exclude_1d: bool = True,
                 exclude: Sequence[str] = (), name: str = "lamb", **kwargs: Any):
        super().__init__(learning_rate, weight_decay, exclude_1d, exclude, name, **kwargs)
        self.beta_1 = _finite(beta_1, "beta_1", high=1.0)
        self.beta_2 = _finite(beta_2, "beta_2", high=1.0)
        self.epsilon = _finite(epsilon, "epsilon")
        self.bias_correction = bool(bias_correction)
        self.clamp_value = None if clamp_value is None else _finite(clamp_value, "clamp_value")
        self.max_trust_ratio = None if max_trust_ratio is None else _finite(max_trust_ratio, "max_trust_ratio")

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._m = [self.add_variable_from_reference(v, "m") for v in var_list]
        self._v = [self.add_variable_from_reference(v, "v") for v in var_list]
        # scratch for the direction u of trusted variables: not optimizer state (never saved
        # or broadcast), reused every step
        with tf.init_scope():
            self._u = [None if self.is_excluded(v) else
                       tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False,
                                   name=f"lamb_u_{i}")
                       for i, v in enumerate(var_list)]

    def update_step(self, gradient, variable, learning_rate):
        """Three fused passes: Adam's kernel updates m and v and adds the direction r to
        u = wd * w (lr = -1 turns its subtraction into an addition; its epsilon sits outside
        the bias-corrected sqrt, hence eps * sqrt(bc2)), the norms, then w -= lr * ratio * u
        by the gradient-descent kernel. An excluded variable is plain Adam: one pass."""
        dtype = variable.dtype
        lr = tf.cast(learning_rate, dtype)
        g = tf.cast(tf.convert_to_tensor(gradient), dtype)
        i = self._get_variable_index(variable)
        b1, b2 = _const(self.beta_1, dtype), _const(self.beta_2, dtype)
        if self.bias_correction:
            t = tf.cast(self.iterations + 1, dtype)
            b1_power, b2_power = tf.pow(b1, t), tf.pow(b2, t)
        else:
            b1_power = b2_power = tf.zeros([], dtype)
        eps = _const(self.epsilon, dtype) * tf.sqrt(1 - b2_power)
        u = self._u[i]
        if u is None:      # excluded: w -= lr * r
            tf.raw_ops.ResourceApplyAdam(
                var=_handle(variable), m=_handle(self._m[i]), v=_handle(self._v[i]),
                beta1_power=b1_power, beta2_power=b2_power, lr=lr, beta1=b1, beta2=b2,
                epsilon=eps, grad=g, use_locking=False, use_nesterov=False)
            return
        w = tf.convert_to_tensor(variable)
        u.assign(_const(self.layerwise_weight_decay, dtype) * w)
        tf.raw_ops.ResourceApplyAdam(
            var=u.handle, m=_handle(self._m[i]), v=_handle(self._v[i]), beta1_power=b1_power,
            beta2_power=b2_power, lr=-tf.ones([], dtype), beta1=b1, beta2=b2, epsilon=eps,
            grad=g, use_locking=False, use_nesterov=False)
        direction = u.read_value()
        w_norm, u_norm = _norm(w), _norm(direction)
        if self.clamp_value is not None:
            w_norm = tf.minimum(w_norm, _const(self.clamp_value, dtype))
        trusted = tf.logical_and(w_norm > 0, u_norm > 0)
        ratio = tf.where(trusted, w_norm / tf.where(trusted, u_norm, tf.ones_like(u_norm)),
                         tf.ones_like(w_norm))
        if self.max_trust_ratio is not None:
            ratio = tf.minimum(ratio, _const(self.max_trust_ratio, dtype))
        tf.raw_ops.ResourceApplyGradientDescent(var=_handle(variable), alpha=lr * ratio,
                                                delta=direction, use_locking=False)

    def get_config(self):
        config = super().get_config()
        config.update(beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon,
                      bias_correction=self.bias_correction, clamp_value=self.clamp_value,
                      max_trust_ratio=self.max_trust_ratio)
        return config


class _ExcludingMixin:
    """Keras's own SGD / AdamW with hvdscale's exclusion rule applied to their (decoupled)
    weight decay, decided when the variables are first seen."""

    def _setup_exclusion(self, exclude_1d, exclude):
        self._rule = ExclusionRule(exclude_1d, exclude)

    def get_config(self):
        # the rule travels with the optimizer (save/load, from_config copies)
        config = super().get_config()
        config.update(exclude_1d=self._rule.exclude_1d, exclude=list(self._rule.patterns))
        return config

    def build(self, var_list):
        if not self.built:
            self.exclude_from_weight_decay(
                var_list=[v for v in var_list if self._rule(variable_name(v), len(v.shape))])
        super().build(var_list)


class SGD(_ExcludingMixin, keras.optimizers.SGD):
    """Keras's SGD, its update in TensorFlow's fused kernel: ResourceApplyKerasMomentum is
    Keras's own rule (m = momentum * m - lr * g; w += m, or the Nesterov form) as one op per
    variable, where Keras writes it as five (two multiplies, a subtract, two assigns).
    `weight_decay` is Keras's decoupled decay (recipe `sgdw`); `l2` adds l2 * w to the
    gradient of every decayed variable, torch.optim.SGD's weight_decay (recipe `sgd`)."""

    def __init__(self, *args, exclude_1d=True, exclude=(), l2=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_exclusion(exclude_1d, exclude)
        self.l2 = float(l2)

    def get_config(self):
        config = super().get_config()
        config["l2"] = self.l2
        return config

    def update_step(self, gradient, variable, learning_rate):
        if self.l2 and isinstance(gradient, tf.Tensor) and self._use_weight_decay(variable):
            gradient = gradient + tf.cast(self.l2, gradient.dtype) * tf.cast(variable,
                                                                             gradient.dtype)
        if self.momentum == 0 or not isinstance(gradient, tf.Tensor):
            # plain SGD is one op already; sparse (IndexedSlices) gradients take Keras's path
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=_handle(variable), accum=_handle(self.momentums[self._get_variable_index(variable)]),
            lr=tf.cast(learning_rate, dtype), grad=tf.cast(gradient, dtype),
            momentum=tf.cast(self.momentum, dtype), use_locking=False, use_nesterov=self.nesterov)


class AdamW(_ExcludingMixin, keras.optimizers.AdamW):
    def __init__(self, *args, exclude_1d=True, exclude=(), **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_exclusion(exclude_1d, exclude)


def _getter(cfg):
    """`get(key)` over the recipe's optimizer section: a dict, an object, or None."""
    if cfg is None:
        return lambda key: None
    if isinstance(cfg, Mapping):
        return cfg.get
    return lambda key: getattr(cfg, key, None)


# --------------------------------------------------------------------------- the builders
# One per registry entry (hvdscale/registry.py), called with Keras's own keywords; the values
# are already resolved and checked against hvdscale.core.optimizers. sgd adds L2 to the
# gradient (as torch does); sgdw and adamw use Keras's decoupled weight decay.



def build_sgd(*, learning_rate: LearningRate, momentum: float, nesterov: bool,
              weight_decay: float, exclude_1d: bool, exclude: Sequence[str]) -> "SGD":
    """L2 added to the gradient, as torch.optim.SGD does (the recipe's `sgd` is one rule)."""
    return SGD(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov,
               l2=weight_decay, exclude_1d=exclude_1d, exclude=exclude)


def build_sgdw(*, learning_rate: LearningRate, momentum: float, nesterov: bool,
               weight_decay: float, exclude_1d: bool, exclude: Sequence[str]) -> "SGD":
    """Keras's decoupled weight decay."""
    return SGD(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov,
               weight_decay=weight_decay or None, exclude_1d=exclude_1d, exclude=exclude)


def build_adamw(*, learning_rate: LearningRate, beta_1: float, beta_2: float, epsilon: float,
                weight_decay: float, exclude_1d: bool, exclude: Sequence[str]) -> "AdamW":
    return AdamW(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                 weight_decay=weight_decay, exclude_1d=exclude_1d, exclude=exclude)


def build_lars(*, learning_rate: LearningRate, momentum: float, weight_decay: float,
               trust_coefficient: float, epsilon: float, exclude_1d: bool,
               exclude: Sequence[str]) -> LARS:
    return LARS(learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay,
                trust_coefficient=trust_coefficient, epsilon=epsilon, exclude_1d=exclude_1d,
                exclude=exclude)


def build_lamb(*, learning_rate: LearningRate, beta_1: float, beta_2: float, epsilon: float,
               weight_decay: float, bias_correction: bool, clamp_value: Optional[float],
               max_trust_ratio: Optional[float], exclude_1d: bool,
               exclude: Sequence[str]) -> LAMB:
    return LAMB(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                weight_decay=weight_decay, bias_correction=bias_correction,
                clamp_value=clamp_value, max_trust_ratio=max_trust_ratio,
                exclude_1d=exclude_1d, exclude=exclude)


def build_optimizer(name: str, learning_rate: LearningRate,
                    cfg_optimizer: Any = None) -> "keras.optimizers.Optimizer":
    """The registered optimizer `name` (hvdscale.registry.OPTIMIZERS: sgd, sgdw, lars, lamb, adamw,
    or one you registered) as a Keras optimizer; `learning_rate` is a float or a keras
    LearningRateSchedule (e.g. hvdscale.tensorflow.schedule.CoreSchedule). Options come from
    `cfg_optimizer` (the recipe's optimizer section, a dict or an object, recipe keys); unset
    ones take hvdscale.core.optimizers' defaults, and each is passed to the builder under
    Keras's own keyword (epsilon, beta_1/beta_2, ...)."""
    from hvdscale.registry import BACKENDS, OPTIMIZERS

    info = OPTIMIZERS.get(str(name).lower())
    get = _getter(cfg_optimizer)
    exclude_1d = bool(True if get("exclude_1d") is None else get("exclude_1d"))
    exclude = tuple(get("exclude") or ())
    ExclusionRule(exclude_1d, exclude)  # bad regexes fail here, before any training
    options = BACKENDS.get("tensorflow").native_kwargs(info.resolve_options(get))
    return info.builder("tensorflow")(learning_rate=learning_rate, exclude_1d=exclude_1d,
                                      exclude=exclude, **options)
