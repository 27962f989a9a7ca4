"""One optimizer step on the ResNet-50 parameter set (25.6M parameters in 161 tensors), CPU.

Ours (hvdscale.torch / hvdscale.tensorflow LARS and LAMB) against the peers that import here, in
the same run: torch-optimizer's Lamb and LARS, timm's Lamb/Lars if installed, a plain
per-parameter loop (the textbook implementation), and Keras's own Lamb for TF. Each step is
timed after warm-up; the table gives the median (and min) wall time and peer / ours.

    python benchmarks/optimizer_step.py [--steps 7] [--threads 2] [--skip-tf]

The last line printed is one JSON object with the headline figures.
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def resnet50_shapes(num_classes=1000):
    """torchvision's ResNet-50 parameter shapes: stem, 16 bottlenecks (3-4-6-3), fc."""
    shapes = [("conv1.weight", (64, 3, 7, 7)), ("bn1.weight", (64,)), ("bn1.bias", (64,))]
    inplanes = 64
    for li, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            p = f"layer{li}.{b}."
            shapes += [(p + "conv1.weight", (width, inplanes, 1, 1)), (p + "bn1.weight", (width,)),
                       (p + "bn1.bias", (width,)), (p + "conv2.weight", (width, width, 3, 3)),
                       (p + "bn2.weight", (width,)), (p + "bn2.bias", (width,)),
                       (p + "conv3.weight", (4 * width, width, 1, 1)), (p + "bn3.weight", (4 * width,)),
                       (p + "bn3.bias", (4 * width,))]
            if b == 0:
                shapes += [(p + "downsample.0.weight", (4 * width, inplanes, 1, 1)),
                           (p + "downsample.1.weight", (4 * width,)), (p + "downsample.1.bias", (4 * width,))]
            inplanes = 4 * width
    return shapes + [("fc.weight", (num_classes, 2048)), ("fc.bias", (num_classes,))]


def _optional(module):
    """A peer library, or None (with the reason printed) where it does not import here."""
    import importlib
    try:
        return importlib.import_module(module)
    except Exception as err:  # e.g. timm importing a torchvision built for another torch
        print(f"peer {module} not usable here: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
        return None


def timed(step, steps, warmup=2):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), 1e3 * min(times)


def torch_rows(shapes, steps, threads):
    import torch
    torch.set_num_threads(threads)
    from hvdscale.torch import LAMB, LARS

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(s).astype(np.float32) * 0.05 for _, s in shapes]
    grads = [rng.standard_normal(s).astype(np.float32) * 1e-3 for _, s in shapes]

    def params():
        ps = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in weights]
        for p, g in zip(ps, grads):
            p.grad = torch.from_numpy(g)
        return ps

    class LoopLamb(torch.optim.Optimizer):
        """Textbook LAMB, one parameter at a time, fresh temporaries (as most repos write it)."""

        def __init__(self, ps, lr, wd=0.01, b1=0.9, b2=0.999, eps=1e-6):
            super().__init__(ps, dict(lr=lr, wd=wd, b1=b1, b2=b2, eps=eps))

        @torch.no_grad()
        def step(self):
            for g in self.param_groups:
                for p in g["params"]:
                    st = self.state[p]
                    if not st:
                        st.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                    st["t"] += 1
                    st["m"].mul_(g["b1"]).add_(p.grad, alpha=1 - g["b1"])
                    st["v"].mul_(g["b2"]).addcmul_(p.grad, p.grad, value=1 - g["b2"])
                    m_hat = st["m"] / (1 - g["b1"] ** st["t"])
                    v_hat = st["v"] / (1 - g["b2"] ** st["t"])
                    u = m_hat / (v_hat.sqrt() + g["eps"])
                    if p.ndim > 1:
                        u = u + g["wd"] * p
                        wn, un = p.norm(), u.norm()
                        ratio = (wn / un).item() if wn > 0 and un > 0 else 1.0
                    else:
                        ratio = 1.0
                    p.add_(u, alpha=-g["lr"] * ratio)

    class LoopLars(torch.optim.Optimizer):
        def __init__(self, ps, lr, momentum=0.9, wd=1e-4, eta=0.001, eps=1e-8):
            super().__init__(ps, dict(lr=lr, momentum=momentum, wd=wd, eta=eta, eps=eps))

        @torch.no_grad()
        def step(self):
            for g in self.param_groups:
                for p in g["params"]:
                    st = self.state[p]
                    if not st:
                        st["buf"] = torch.zeros_like(p)
                    if p.ndim > 1:
                        wn, gn = p.norm(), p.grad.norm()
                        ratio = g["eta"] * wn / (gn + g["wd"] * wn + g["eps"]) if wn > 0 and gn > 0 else 1.0
                        d = (p.grad + g["wd"] * p) * (g["lr"] * ratio)
                    else:
                        d = p.grad * g["lr"]
                    st["buf"].mul_(g["momentum"]).add_(d)
                    p.sub_(st["buf"])

    torch_optimizer, timm_optim = _optional("torch_optimizer"), _optional("timm.optim")
    rows = [("LAMB", "hvdscale (ours)", lambda: LAMB(params(), lr=1e-3, weight_decay=0.01))]
    if torch_optimizer:
        rows.append(("LAMB", "torch-optimizer Lamb", lambda: torch_optimizer.Lamb(params(), lr=1e-3, weight_decay=0.01)))
    if timm_optim:
        rows.append(("LAMB", "timm Lamb", lambda: timm_optim.Lamb(params(), lr=1e-3, weight_decay=0.01)))
    rows.append(("LAMB", "per-parameter loop", lambda: LoopLamb(params(), lr=1e-3)))
    rows.append(("LARS", "hvdscale (ours)", lambda: LARS(params(), lr=0.1, weight_decay=1e-4)))
    if torch_optimizer:  # weight_decay > 0: otherwise torch-optimizer skips the trust ratio
        rows.append(("LARS", "torch-optimizer LARS",
                     lambda: torch_optimizer.LARS(params(), lr=0.1, weight_decay=1e-4, trust_coefficient=0.001)))
    if timm_optim:
        rows.append(("LARS", "timm Lars", lambda: timm_optim.Lars(params(), lr=0.1, weight_decay=1e-4)))
    rows.append(("LARS", "per-parameter loop", lambda: LoopLars(params(), lr=0.1)))
    out = []
    for opt_name, impl, make in rows:
        opt = make()
        med, low = timed(opt.step, steps)
        out.append(dict(optimizer=opt_name, backend="torch", impl=impl, median_ms=med, min_ms=low))
        del opt
    return out


def tf_rows(shapes, steps, threads):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    from hvdscale.tensorflow import LAMB, LARS

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(s).astype(np.float32) * 0.05 for _, s in shapes]
    grads = [tf.constant(rng.standard_normal(s).astype(np.float32) * 1e-3) for _, s in shapes]
    # Keras kernels are HWIO / (in, out); the element count per tensor is what matters here
    rows = [("LAMB", "tensorflow", "hvdscale (ours)", lambda: LAMB(learning_rate=1e-3, weight_decay=0.01))]
    if hasattr(keras.optimizers, "Lamb"):
        rows.append(("LAMB", "tensorflow", "keras.optimizers.Lamb", lambda: keras.optimizers.Lamb(learning_rate=1e-3)))
    rows.append(("LARS", "tensorflow", "hvdscale (ours)", lambda: LARS(learning_rate=0.1, weight_decay=1e-4)))
    out = []
    for opt_name, backend, impl, make in rows:
        variables = [keras.Variable(w, name=n.replace(".", "_")) for (n, _), w in zip(shapes, weights)]
        opt = make()

        @tf.function
        def step():
            opt.apply_gradients(zip(grads, variables))

        med, low = timed(step, steps)
        out.append(dict(optimizer=opt_name, backend=backend, impl=impl, median_ms=med, min_ms=low))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=7, help="timed steps per optimizer (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-tf", action="store_true")
    args = ap.parse_args(argv)
    shapes = resnet50_shapes()
    n_params = sum(math.prod(s) for _, s in shapes)
    print(f"ResNet-50 parameter set: {n_params / 1e6:.2f}M parameters in {len(shapes)} tensors; "
          f"{args.threads} threads; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"median of {args.steps} steps after 2 warm-up steps")
    rows = torch_rows(shapes, args.steps, args.threads)
    if not args.skip_tf:
        rows += tf_rows(shapes, args.steps, args.threads)
    ours = {(r["optimizer"], r["backend"]): r["median_ms"] for r in rows if r["impl"] == "hvdscale (ours)"}
    print(f"{'optimizer':9s} {'backend':10s} {'implementation':24s} {'median ms':>10s} {'min ms':>8s} {'peer/ours':>9s}")
    for r in rows:
        r["peer_over_ours"] = r["median_ms"] / ours[(r["optimizer"], r["backend"])]
        print(f"{r['optimizer']:9s} {r['backend']:10s} {r['impl']:24s} {r['median_ms']:10.1f} {r['min_ms']:8.1f} "
              f"{r['peer_over_ours']:9.2f}")
    summary = {"params": n_params, "tensors": len(shapes), "threads": args.threads}
    for r in rows:
        key = f"{r['backend']}_{r['optimizer']}_{r['impl'].split(' ')[0].lower().replace('.', '_')}"
        summary[key + "_ms"] = round(r["median_ms"], 2)
        if r["impl"] != "hvdscale (ours)":
            summary[key + "_over_ours"] = round(r["peer_over_ours"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
