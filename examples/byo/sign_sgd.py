"""A new optimizer for hvdscale in one module: sign SGD with momentum (signum, Bernstein et al.
2018), registered for both frameworks. docs/extending.md walks through it.

    plugins: [sign_sgd]                      # in the recipe; this file's directory on PYTHONPATH
    optimizer: {name: signsgd, base_lr: 0.001, momentum: 0.9}

    v = momentum * v + (1 - momentum) * g;   w -= lr * sign(v)

The builders receive each framework's own keywords (torch `lr`, Keras `learning_rate`), with
every option already checked and defaulted from the registration below. Frameworks are
imported inside the builders, so that importing this module (to validate a recipe) is cheap.
"""
from hvdscale.registry import OptimizerInfo, register_optimizer


def build_torch(named_params, *, lr, momentum, weight_decay, exclude_1d, exclude):
    import torch

    class SignSGD(torch.optim.Optimizer):
        # every argument has a default: hvd.DistributedOptimizer re-creates the class
        # from its param groups alone
        def __init__(self, params, lr=1e-3, momentum=0.9, weight_decay=0.0):
            super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    g = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] \
                        else p.grad
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.mul_(group["momentum"]).add_(g, alpha=1 - group["momentum"])
                    p.add_(buf.sign(), alpha=-group["lr"])

    return SignSGD([p for _, p in named_params], lr=lr, momentum=momentum,
                   weight_decay=weight_decay)


def build_keras(*, learning_rate, momentum, weight_decay, exclude_1d, exclude):
    import keras
    from keras import ops

    class SignSGD(keras.optimizers.Optimizer):
        def __init__(self, learning_rate=1e-3, momentum=0.9, l2=0.0, **kwargs):
            super().__init__(learning_rate=learning_rate, name="signsgd", **kwargs)
            self.momentum, self.l2 = momentum, l2

        def build(self, variables):
            if self.built:
                return
            super().build(variables)
            self._buffers = [self.add_variable_from_reference(v, "momentum") for v in variables]

        def update_step(self, gradient, variable, learning_rate):
            lr = ops.cast(learning_rate, variable.dtype)
            g = ops.add(gradient, ops.multiply(self.l2, variable)) if self.l2 else gradient
            buf = self._buffers[self._get_variable_index(variable)]
            self.assign(buf, ops.add(ops.multiply(self.momentum, buf),
                                     ops.multiply(1 - self.momentum, g)))
            self.assign_sub(variable, ops.multiply(lr, ops.sign(buf)))

    return SignSGD(learning_rate=learning_rate, momentum=momentum, l2=weight_decay)


register_optimizer(OptimizerInfo(
    name="signsgd",
    description="sign SGD with momentum (signum, Bernstein et al. 2018)",
    defaults={"momentum": 0.9, "weight_decay": 0.0},
    builders={"torch": build_torch, "tensorflow": build_keras}))
