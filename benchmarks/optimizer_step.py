"""One optimizer step on the ResNet-50 parameter set (25.6M parameters in 161 tensors), CPU.

Ours (hvdscale.torch / hvdscale.tensorflow LARS and LAMB) against the peers that import here, in
the same run: torch-optimizer's Lamb and LARS, timm's Lamb/Lars if installed, a plain
per-parameter loop (the textbook implementation), and Keras's own Lamb for TF.

On a CPU these steps are bound by memory traffic, so each implementation is also given the
bytes it moves per fp32 parameter (reads + writes, counted from its code, see BYTES) and its
achieved bandwidth as a fraction of a plain copy of the parameter set timed in the same rounds
(`bandwidth_fraction` = (bytes moved / step time) / (copy bytes / copy time)).

Noise: all implementations of a backend are built first, then timed in interleaved rounds
(each round times one step of each, and one copy), so drifting load from other jobs hits them
alike; the table gives the median, min and max over the rounds and peer / ours of the medians.

    python benchmarks/optimizer_step.py [--steps 9] [--threads 2] [--skip-tf]

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


# Bytes read + written per fp32 parameter by one step, counted from each implementation's
# code (4 bytes per element per tensor read or written; a new temporary is written once and
# read once). Norms read their tensor once. The minimum for LAMB is 40 (one pass reading g, m,
# v, w and writing m, v while the norms accumulate, one pass re-reading m, v, w to write w);
# for LARS 28 (the norms of w and g, then one pass reading w, g, buf and writing buf, w).
BYTES = {
    ("torch", "LAMB", "hvdscale (ours)"): 56,       # u=wd*w 8, fused Adam 28, norms 8, w+=a*u 12
    ("torch", "LAMB", "torch-optimizer Lamb"): 100,
    ("torch", "LAMB", "timm Lamb"): None,
    ("torch", "LAMB", "per-parameter loop"): 132,
    ("torch", "LARS", "hvdscale (ours)"): 28,       # norms 8, fused SGD pass 20
    ("torch", "LARS", "torch-optimizer LARS"): 60,
    ("torch", "LARS", "timm Lars"): None,
    ("torch", "LARS", "per-parameter loop"): 68,
    ("tensorflow", "LAMB", "hvdscale (ours)"): 64,  # wd*w 8, assign 8, ApplyAdam 28, norms 8,
                                                    # ApplyGradientDescent 12
    ("tensorflow", "LAMB", "keras.optimizers.Lamb"): 160,
    ("tensorflow", "LARS", "hvdscale (ours)"): 56,  # norms 8, step 28, ApplyMomentum 20
}
# A copy reads and writes each parameter once (8 bytes). On x86 its stores also read the
# destination line first (read-for-ownership), which an in-place update (m.mul_(), w -= ...)
# does not pay, so a kernel of in-place passes can exceed a fraction of 1.
COPY_BYTES = 8


def interleaved(steps_by_name, rounds, warmup=2):
    """Time one call of each step function per round, `rounds` rounds after `warmup` calls
    each; {name: [ms, ...]}."""
    for step in steps_by_name.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps_by_name}
    for _ in range(rounds):
        for name, step in steps_by_name.items():
            t0 = time.perf_counter()
            step()
            times[name].append(1e3 * (time.perf_counter() - t0))
    return times


def torch_copy(shapes):
    """A copy of the whole parameter set (161 tensors), the bandwidth reference."""
    import torch
    src = [torch.randn(s) for _, s in shapes]
    dst = [torch.empty(s) for _, s in shapes]
    return lambda: torch._foreach_copy_(dst, src)


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
    steps_by_name = {(opt_name, impl): make().step for opt_name, impl, make in rows}
    steps_by_name["copy"] = torch_copy(shapes)
    times = interleaved(steps_by_name, steps)
    return [row("torch", opt_name, impl, times[(opt_name, impl)], times["copy"])
            for opt_name, impl, _ in rows]


def row(backend, opt_name, impl, times, copy_times):
    bytes_per_param = BYTES.get((backend, opt_name, impl))
    med, copy_med = statistics.median(times), statistics.median(copy_times)
    return dict(optimizer=opt_name, backend=backend, impl=impl, median_ms=med, min_ms=min(times),
                max_ms=max(times), bytes_per_param=bytes_per_param, copy_ms=copy_med,
                bandwidth_fraction=(bytes_per_param / COPY_BYTES) * copy_med / med
                if bytes_per_param else None)


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
    def compiled(opt, variables):
        opt.build(variables)

        @tf.function
        def step():
            opt.apply_gradients(zip(grads, variables))
        return step

    steps_by_name = {}
    for opt_name, backend, impl, make in rows:
        variables = [keras.Variable(w, name=n.replace(".", "_")) for (n, _), w in zip(shapes, weights)]
        steps_by_name[(opt_name, impl)] = compiled(make(), variables)
    steps_by_name["copy"] = torch_copy(shapes)
    times = interleaved(steps_by_name, steps)
    return [row(backend, opt_name, impl, times[(opt_name, impl)], times["copy"])
            for opt_name, backend, impl, _ in rows]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=9,
                    help="interleaved timed rounds (median, min and max reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-tf", action="store_true")
    args = ap.parse_args(argv)
    shapes = resnet50_shapes()
    n_params = sum(math.prod(s) for _, s in shapes)
    load_start = os.getloadavg()
    print(f"ResNet-50 parameter set: {n_params / 1e6:.2f}M parameters in {len(shapes)} tensors; "
          f"{args.threads} threads; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"{args.steps} interleaved rounds after 2 warm-up steps")
    rows = torch_rows(shapes, args.steps, args.threads)
    if not args.skip_tf:
        rows += tf_rows(shapes, args.steps, args.threads)
    load_end = os.getloadavg()
    ours = {(r["optimizer"], r["backend"]): r["median_ms"] for r in rows if r["impl"] == "hvdscale (ours)"}
    print(f"{'optimizer':9s} {'backend':10s} {'implementation':24s} {'median ms':>10s} {'min ms':>8s} "
          f"{'max ms':>8s} {'peer/ours':>9s} {'B/param':>7s} {'bw frac':>7s}")
    for r in rows:
        r["peer_over_ours"] = r["median_ms"] / ours[(r["optimizer"], r["backend"])]
        frac = f"{r['bandwidth_fraction']:7.2f}" if r["bandwidth_fraction"] else f"{'-':>7s}"
        print(f"{r['optimizer']:9s} {r['backend']:10s} {r['impl']:24s} {r['median_ms']:10.1f} {r['min_ms']:8.1f} "
              f"{r['max_ms']:8.1f} {r['peer_over_ours']:9.2f} {r['bytes_per_param'] or '-':>7} {frac}")
    copy_ms = statistics.median(r["copy_ms"] for r in rows)
    print(f"copy of the parameter set ({COPY_BYTES * n_params / 1e6:.0f} MB moved): {copy_ms:.1f} ms "
          f"= {COPY_BYTES * n_params / copy_ms / 1e6:.1f} GB/s; load average {load_start} -> {load_end}")
    summary = {"params": n_params, "tensors": len(shapes), "threads": args.threads,
               "rounds": args.steps, "copy_ms": round(copy_ms, 2),
               "load_start": [round(x, 2) for x in load_start],
               "load_end": [round(x, 2) for x in load_end]}
    for r in rows:
        key = f"{r['backend']}_{r['optimizer']}_{r['impl'].split(' ')[0].lower().replace('.', '_')}"
        summary[key + "_ms"] = round(r["median_ms"], 2)
        summary[key + "_spread"] = round((r["max_ms"] - r["min_ms"]) / r["median_ms"], 3)
        if r["bandwidth_fraction"] is not None:
            summary[key + "_bandwidth_fraction"] = round(r["bandwidth_fraction"], 3)
        if r["impl"] != "hvdscale (ours)":
            summary[key + "_over_ours"] = round(r["peer_over_ours"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
