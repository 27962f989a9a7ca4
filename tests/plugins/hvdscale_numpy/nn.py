"""The fake backend's model and optimizer: a one-hidden-layer MLP with analytic gradients and
PyTorch-style momentum SGD (coupled L2 weight decay, as hvdscale.core.optimizers documents for
`sgd`), in float32 NumPy."""
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from hvdscale.core.exclusions import ExclusionRule
from hvdscale.errors import ConfigError

Params = Dict[str, np.ndarray]


class MLP:
    """flatten -> `hidden` ReLU units -> `classes` logits (the zoo's `mlp`)."""

    def __init__(self, inputs: int, hidden: int, classes: int, seed: int):
        rng = np.random.default_rng(seed)
        # He initialisation for the ReLU layer, Glorot-like for the classifier
        self.params: Params = {
            "hidden.weight": (rng.standard_normal((inputs, hidden)) * np.sqrt(2.0 / inputs)
                              ).astype(np.float32),
            "hidden.bias": np.zeros(hidden, np.float32),
            "out.weight": (rng.standard_normal((hidden, classes)) * np.sqrt(1.0 / hidden)
                           ).astype(np.float32),
            "out.bias": np.zeros(classes, np.float32),
        }

    def forward(self, x: np.ndarray) -> Tuple[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        """Logits [N, classes] and what backward() needs."""
        p = self.params
        flat = x.reshape(x.shape[0], -1)
        hidden = np.maximum(flat @ p["hidden.weight"] + p["hidden.bias"], 0.0)
        return hidden @ p["out.weight"] + p["out.bias"], (flat, hidden)

    def backward(self, cache: Tuple[np.ndarray, np.ndarray], dlogits: np.ndarray) -> Params:
        """Gradients of sum(dlogits * logits) with respect to every parameter."""
        flat, hidden = cache
        p = self.params
        dhidden = (dlogits @ p["out.weight"].T) * (hidden > 0)
        return {"hidden.weight": flat.T @ dhidden, "hidden.bias": dhidden.sum(0),
                "out.weight": hidden.T @ dlogits, "out.bias": dlogits.sum(0)}


def cross_entropy(logits: np.ndarray, labels: np.ndarray,
                  smoothing: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
    """Per-example softmax cross-entropy (label smoothing as torch's F.cross_entropy) and its
    gradient with respect to the logits (per example, not divided by N)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    classes = logits.shape[1]
    target = np.full(logits.shape, smoothing / classes, dtype=logits.dtype)
    target[np.arange(len(labels)), labels] += 1.0 - smoothing
    return -(target * log_p).sum(axis=1), np.exp(log_p) - target


class SGD:
    """p <- p - lr * d with buf <- momentum * buf + (g + wd * p) and d = buf (or, Nesterov,
    g + wd * p + momentum * buf), as torch.optim.SGD with dampening 0. Parameters the exclusion
    rule names (1-D by default) get no weight decay."""

    def __init__(self, named: List[Tuple[str, np.ndarray]], *, lr: float, momentum: float,
                 nesterov: bool, weight_decay: float, exclude_1d: bool,
                 exclude: Sequence[str]):
        rule = ExclusionRule(exclude_1d, exclude)
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.decay = {name: 0.0 if rule(name, p.ndim) else weight_decay for name, p in named}
        self.buffers: Params = {name: np.zeros_like(p) for name, p in named}

    def step(self, params: Params, grads: Params, lr: float) -> None:
        for name, p in params.items():
            g = grads[name] + self.decay[name] * p if self.decay[name] else grads[name]
            buf = self.buffers[name]
            buf *= self.momentum
            buf += g
            p -= np.float32(lr) * (g + self.momentum * buf if self.nesterov else buf)


def build_mlp(cfg: Any) -> MLP:
    d = cfg.data
    return MLP(d.image_size * d.image_size * cfg.in_channels, 128, d.num_classes,
               cfg.train.seed)


def build_sgd(named: List[Tuple[str, np.ndarray]], *, lr: float, momentum: float,
              nesterov: bool, weight_decay: float, exclude_1d: bool,
              exclude: Sequence[str]) -> SGD:
    return SGD(named, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
               exclude_1d=exclude_1d, exclude=exclude)


def check_model(model: Any, cfg: Any, where: str) -> Any:
    """A user's factory model (model.name "pkg.mod:factory") must look like MLP: float32
    `params`, forward(x) -> (logits [N, num_classes], cache) and backward(cache, dlogits)."""
    for attr in ("params", "forward", "backward"):
        if not hasattr(model, attr):
            raise ConfigError(f"{where}: the factory returned a {type(model).__name__} without "
                              f"`{attr}` (the numpy backend wants an MLP-like model)")
    d = cfg.data
    x = np.zeros((2, d.image_size, d.image_size, cfg.in_channels), np.float32)
    logits, _ = model.forward(x)
    if np.shape(logits) != (2, d.num_classes):
        raise ConfigError(f"{where}: logits of shape {np.shape(logits)} for a batch of 2, "
                          f"expected (2, {d.num_classes})")
    return model
