"""One study run in this process: the data held in memory as torch tensors, the model and the
optimizer from hvdscale's own factories (hvdscale.torch.models.build_model,
hvdscale.torch.optim.build_optimizer), and a lean loop that stops at the target.

Why not one `hvdscale train` per run: the study asks how the *global* batch changes the steps
to a target. One process whose batch is the global batch makes the same updates as K Horovod
workers averaging K shares of it (tests/test_hvd_optimizers.py checks that equality for
SGD/LARS/LAMB), and on a 2-core machine it avoids the per-run start-up, the data pipeline and
the per-step bookkeeping that would otherwise dominate runs of a few seconds.

A run records
- the held-out accuracy every `eval_every` steps on a fixed subset of the test set, and the
  step where it first crosses the target, interpolated linearly between two evaluations;
- `diverged` when the training loss turns non-finite or exceeds `DIVERGED_LOSS` (a
  10-class model that has learnt nothing has loss ln 10 = 2.3);
- the accuracy on the whole test set after a fixed number of epochs (the accuracy budget);
- optionally snapshots of the weights and optimizer state every few steps, on both sides of
  the target (for the frozen-weights noise probe over a window), and an online noise-scale
  trace.
"""
import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from hvdscale.core.metrics import interpolated_crossing as crossing
from hvdscale.core.noise_scale import NoiseScaleEstimator

DIVERGED_LOSS = 10.0
CHANCE = 0.1
STUCK_ACCURACY = 0.15


@dataclass
class Data:
    x_train: torch.Tensor      # float32 [N, 1, 28, 28], normalised
    y_train: torch.Tensor      # int64 [N]
    x_eval: torch.Tensor       # the fixed held-out subset used for steps-to-target
    y_eval: torch.Tensor
    x_test: torch.Tensor       # the whole test set, for the accuracy at the epoch budget
    y_test: torch.Tensor

    @property
    def n_train(self):
        return int(self.y_train.shape[0])


def load_data(root=None, eval_examples=5000, train_limit=None):
    """Fashion-MNIST in memory. The held-out subset is the first `eval_examples` images of a
    fixed permutation (seed 0) of the test set, the same for every run."""
    from hvdscale.data.fashion_mnist import MEAN, STD, load_fashion_mnist

    x_train, y_train, x_test, y_test = load_fashion_mnist(root)
    if train_limit:
        x_train, y_train = x_train[:train_limit], y_train[:train_limit]

    def prep(x):
        return ((torch.from_numpy(np.asarray(x, dtype=np.float32)) / 255.0 - MEAN) / STD) \
            .unsqueeze(1).contiguous()

    xt, yt = prep(x_test), torch.from_numpy(np.asarray(y_test))
    pick = torch.randperm(len(yt), generator=torch.Generator().manual_seed(0))[:eval_examples]
    return Data(prep(x_train), torch.from_numpy(np.asarray(y_train)), xt[pick], yt[pick], xt, yt)


@dataclass
class RunConfig:
    optimizer: str               # sgd | lars | lamb | adamw
    optimizer_cfg: object        # the recipe's optimizer section (momentum, betas, ...)
    model: str
    batch_size: int
    lr: float                    # peak lr after warm-up, constant afterwards
    seed: int
    max_steps: int               # budget in steps (>= 3x the expected need)
    eval_every: int
    target: float
    warmup_steps: int = 0
    stop_at_target: bool = True
    accuracy_epochs: float = None  # also train this many epochs and record test accuracy
    decay_fraction: float = 0.5    # ... with the lr decaying linearly to 0 after this fraction
    keep_target_state: bool = False
    noise_every: int = 0         # online noise-scale reading every N steps (0 = off)
    noise_ema: float = 0.95
    snapshot_every: int = 0      # keep weights + optimizer state every N steps (0 = never)
    continue_after_target: float = 0.0   # train on this fraction of the steps to target after
    #                                      reaching it (snapshots on both sides of the target)


@dataclass
class RunResult:
    status: str                          # reached | censored | diverged
    steps_to_target: float = None        # interpolated between evaluations
    steps_run: int = 0
    evals: list = field(default_factory=list)       # (step, held-out accuracy, train loss)
    accuracy_at_budget: float = None
    wall_s: float = 0.0
    target_state: dict = None            # {"step", "model", "optimizer"} at the first eval >= target
    online_noise: list = field(default_factory=list)  # (step, b_simple) online EMA trace
    diverged_at: int = None
    snapshots: list = field(default_factory=list)   # [{"step", "model", "optimizer"}]

    @property
    def reached(self):
        return self.status == "reached"


def lr_at(step, peak, warmup_steps):
    """Linear warm-up from ~0 to `peak` over `warmup_steps` steps, constant afterwards (so that
    the steps to target do not depend on the length of the budget)."""
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak


@torch.no_grad()
def accuracy(model, x, y, chunk=5000):
    model.eval()
    correct = 0
    for i in range(0, len(y), chunk):
        correct += int((model(x[i:i + chunk]).argmax(1) == y[i:i + chunk]).sum())
    model.train()
    return correct / len(y)


def build(cfg: RunConfig):
    from hvdscale.torch.models import build_model
    from hvdscale.torch.optim import build_optimizer

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, 10, 1, 28)
    opt = build_optimizer(cfg.optimizer, model, cfg.lr, cfg.optimizer_cfg)
    return model, opt


def train(cfg: RunConfig, data: Data) -> RunResult:
    start = time.perf_counter()
    model, opt = build(cfg)
    gen = torch.Generator().manual_seed(10_000 + cfg.seed)
    n, B = data.n_train, cfg.batch_size
    per_epoch = n // B
    acc_steps = int(round(cfg.accuracy_epochs * per_epoch)) if cfg.accuracy_epochs else 0
    last_step = max(cfg.max_steps, acc_steps)
    result = RunResult(status="censored")
    online = NoiseScaleEstimator(cfg.noise_ema) if cfg.noise_every else None
    prev = (0, accuracy(model, data.x_eval, data.y_eval))
    result.evals.append((0, prev[1], None))
    perm = None
    loss_sum, loss_n = 0.0, 0
    decay_start = int(round(cfg.decay_fraction * acc_steps)) if acc_steps else None
    fork = None
    for step in range(last_step):
        if step == decay_start and acc_steps:
            fork = (step, _state(step, model, opt), gen.get_state(), perm)
        if step % per_epoch == 0:
            perm = torch.randperm(n, generator=gen)
        idx = perm[(step % per_epoch) * B:(step % per_epoch + 1) * B]
        x, y = data.x_train[idx], data.y_train[idx]
        lr = lr_at(step, cfg.lr, cfg.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        if online is not None and step % cfg.noise_every == 0 and B >= 4:
            loss = _step_with_noise_reading(model, x, y, online)
            reading = online.reading()
            if reading.b_simple is not None:
                result.online_noise.append((step + 1, reading.b_simple))
        else:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value) or value > DIVERGED_LOSS:
            result.diverged_at, result.steps_run = step + 1, step + 1
            if result.steps_to_target is None:
                result.status = "diverged"
            break
        opt.step()
        loss_sum, loss_n = loss_sum + value, loss_n + 1
        done = step + 1
        if cfg.snapshot_every and done % cfg.snapshot_every == 0 and done <= cfg.max_steps:
            result.snapshots.append(_state(done, model, opt))
        if acc_steps and done == acc_steps and decay_start == acc_steps:
            result.accuracy_at_budget = accuracy(model, data.x_test, data.y_test)
        searching = result.steps_to_target is None and done <= cfg.max_steps
        if searching and (done % cfg.eval_every == 0 or done == min(last_step, cfg.max_steps)):
            cur = (done, accuracy(model, data.x_eval, data.y_eval))
            result.evals.append((done, cur[1], loss_sum / max(loss_n, 1)))
            loss_sum, loss_n = 0.0, 0
            if cur[1] <= STUCK_ACCURACY and done >= cfg.warmup_steps + 0.1 * cfg.max_steps:
                result.status, result.diverged_at = "diverged", done   # back at chance: lost
                break
            if cur[1] >= cfg.target:
                result.status = "reached"
                result.steps_to_target = crossing(prev, cur, cfg.target)
                if cfg.keep_target_state:
                    result.target_state = _state(done, model, opt)
            prev = cur
        result.steps_run = done
        finished_target = done >= cfg.max_steps or (
            result.steps_to_target is not None
            and done >= result.steps_to_target * (1 + cfg.continue_after_target))
        if finished_target and cfg.stop_at_target and (fork is not None or not acc_steps):
            break
    if acc_steps and result.accuracy_at_budget is None and fork is not None:
        result.accuracy_at_budget = _decayed_tail(cfg, data, fork, acc_steps, per_epoch)
    if acc_steps and result.accuracy_at_budget is None:
        result.accuracy_at_budget = CHANCE    # diverged before the tail began
    result.wall_s = time.perf_counter() - start
    return result


def _decayed_tail(cfg, data, fork, acc_steps, per_epoch):
    """The accuracy run's tail: from the fork (`decay_fraction` of the accuracy budget) the lr
    falls linearly to 0 at the budget's end; same seed and data order as the constant-lr run
    it branched from. Returns the whole test set's accuracy, or CHANCE if it diverged."""
    step0, state, gen_state, perm = fork
    model, opt = build(cfg)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    gen = torch.Generator()
    gen.set_state(gen_state)
    n, B = data.n_train, cfg.batch_size
    span = acc_steps - step0
    for step in range(step0, acc_steps):
        if step % per_epoch == 0:
            perm = torch.randperm(n, generator=gen)
        idx = perm[(step % per_epoch) * B:(step % per_epoch + 1) * B]
        lr = lr_at(step, cfg.lr, cfg.warmup_steps) * (acc_steps - step) / span
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value) or value > DIVERGED_LOSS:
            return CHANCE
        opt.step()
    return accuracy(model, data.x_test, data.y_test)


def _state(step, model, opt):
    return {"step": step, "model": copy.deepcopy(model.state_dict()),
            "optimizer": copy.deepcopy(opt.state_dict())}


def _step_with_noise_reading(model, x, y, estimator):
    """The step's gradient as two half-batch backward passes (the same mean gradient), reading
    |G_half|^2 and |G_full|^2 for the online estimator (the trainers' method, one process)."""
    half = len(y) // 2
    params = [p for p in model.parameters()]
    loss_a = F.cross_entropy(model(x[:half]), y[:half])
    (loss_a * 0.5).backward()
    g_a = [p.grad.detach().clone() * 2.0 for p in params]
    loss_b = F.cross_entropy(model(x[half:2 * half]), y[half:2 * half])
    (loss_b * 0.5).backward()
    with torch.no_grad():
        full = sum(float((p.grad ** 2).sum()) for p in params)
        g_b_sq = sum(float(((2.0 * p.grad - a) ** 2).sum()) for p, a in zip(params, g_a))
        g_a_sq = sum(float((a ** 2).sum()) for a in g_a)
    estimator.update((g_a_sq + g_b_sq) / 2.0, half, full, 2 * half)
    return (loss_a + loss_b) / 2.0
