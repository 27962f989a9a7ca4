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

import keras
import tensorflow as tf

from hvdscale.core.exclusions import ExclusionRule
from hvdscale.errors import ConfigError


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
    return tf.sqrt(tf.reduce_sum(tf.square(x)))


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

    def __init__(self, learning_rate=0.1, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001,
                 epsilon=1e-8, exclude_1d=True, exclude=(), name="lars", **kwargs):
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
        self.assign(buf, _const(self.momentum, dtype) * buf + step)
        self.assign_sub(variable, buf)

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

    def __init__(self, learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-6, weight_decay=0.01,
                 bias_correction=True, clamp_value=None, max_trust_ratio=None, exclude_1d=True,
                 exclude=(), name="lamb", **kwargs):
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

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr = tf.cast(learning_rate, dtype)
        g = tf.cast(tf.convert_to_tensor(gradient), dtype)
        w = tf.convert_to_tensor(variable)
        i = self._get_variable_index(variable)
        b1, b2 = _const(self.beta_1, dtype), _const(self.beta_2, dtype)
        m = b1 * self._m[i] + (1 - b1) * g
        v = b2 * self._v[i] + (1 - b2) * g * g
        self.assign(self._m[i], m)
        self.assign(self._v[i], v)
        eps = _const(self.epsilon, dtype)
        if self.bias_correction:
            # (m / bc1) / (sqrt(v / bc2) + eps) = d / c with d = m / (sqrt(v) + eps * sqrt(bc2)),
            # c = bc1 / sqrt(bc2): scalars instead of two tensor-sized divisions
            t = tf.cast(self.iterations + 1, dtype)
            bc1, sqrt_bc2 = 1 - tf.pow(b1, t), tf.sqrt(1 - tf.pow(b2, t))
            c, eps = bc1 / sqrt_bc2, eps * sqrt_bc2
        else:
            c = tf.ones([], dtype)
        d = m / (tf.sqrt(v) + eps)  # c * r
        if self.is_excluded(variable):
            self.assign_sub(variable, (lr / c) * d)
            return
        d = d + (_const(self.layerwise_weight_decay, dtype) * c) * w  # c * u
        w_norm, u_norm = _norm(w), _norm(d) / c
        if self.clamp_value is not None:
            w_norm = tf.minimum(w_norm, _const(self.clamp_value, dtype))
        trusted = tf.logical_and(w_norm > 0, u_norm > 0)
        ratio = tf.where(trusted, w_norm / tf.where(trusted, u_norm, tf.ones_like(u_norm)), tf.ones_like(w_norm))
        if self.max_trust_ratio is not None:
            ratio = tf.minimum(ratio, _const(self.max_trust_ratio, dtype))
        self.assign_sub(variable, (lr * ratio / c) * d)

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

    def build(self, var_list):
        if not self.built:
            self.exclude_from_weight_decay(
                var_list=[v for v in var_list if self._rule(variable_name(v), len(v.shape))])
        super().build(var_list)


class SGD(_ExcludingMixin, keras.optimizers.SGD):
    def __init__(self, *args, exclude_1d=True, exclude=(), **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_exclusion(exclude_1d, exclude)


class AdamW(_ExcludingMixin, keras.optimizers.AdamW):
    def __init__(self, *args, exclude_1d=True, exclude=(), **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_exclusion(exclude_1d, exclude)


def _getter(cfg):
    if cfg is None:
        return lambda key, default: default
    if isinstance(cfg, dict):
        return lambda key, default: default if cfg.get(key) is None else cfg.get(key)
    return lambda key, default: default if getattr(cfg, key, None) is None else getattr(cfg, key)


OPTIMIZERS = ("sgd", "lars", "lamb", "adamw")


def build_optimizer(name, learning_rate, cfg_optimizer=None):
    """The Keras optimizer `name` (sgd | lars | lamb | adamw); `learning_rate` is a float or a
    keras LearningRateSchedule (e.g. hvdscale.tensorflow.schedule.CoreSchedule). The recipe's
    optimizer section (dict or object) gives momentum, betas, eps, weight_decay,
    trust_coefficient, exclude_1d, exclude, and optionally nesterov, bias_correction,
    clamp_value, max_trust_ratio. sgd/adamw use Keras's decoupled weight decay."""
    get = _getter(cfg_optimizer)
    name = str(name).lower()
    exclude_1d, exclude = bool(get("exclude_1d", True)), tuple(get("exclude", ()))
    ExclusionRule(exclude_1d, exclude)  # bad regexes fail here, before any training
    if name == "sgd":
        wd = _finite(get("weight_decay", 0.0), "weight_decay")
        return SGD(learning_rate=learning_rate, momentum=_finite(get("momentum", 0.9), "momentum", high=1.0),
                   nesterov=bool(get("nesterov", False)), weight_decay=wd or None,
                   exclude_1d=exclude_1d, exclude=exclude)
    if name == "adamw":
        b1, b2 = get("betas", (0.9, 0.999))
        return AdamW(learning_rate=learning_rate, beta_1=_finite(b1, "betas[0]", 1.0),
                     beta_2=_finite(b2, "betas[1]", 1.0), epsilon=_finite(get("eps", 1e-7), "eps"),
                     weight_decay=_finite(get("weight_decay", 0.004), "weight_decay"),
                     exclude_1d=exclude_1d, exclude=exclude)
    if name == "lars":
        return LARS(learning_rate=learning_rate, momentum=get("momentum", 0.9),
                    weight_decay=get("weight_decay", 0.0), trust_coefficient=get("trust_coefficient", 0.001),
                    epsilon=get("eps", 1e-8), exclude_1d=exclude_1d, exclude=exclude)
    if name == "lamb":
        betas = get("betas", (0.9, 0.999))
        _check(len(betas) == 2, f"betas must be a pair, got {betas!r}")
        return LAMB(learning_rate=learning_rate, beta_1=betas[0], beta_2=betas[1], epsilon=get("eps", 1e-6),
                    weight_decay=get("weight_decay", 0.01), bias_correction=get("bias_correction", True),
                    clamp_value=get("clamp_value", None), max_trust_ratio=get("max_trust_ratio", None),
                    exclude_1d=exclude_1d, exclude=exclude)
    raise ConfigError(f"unknown optimizer {name!r} (choose from {', '.join(OPTIMIZERS)})")
