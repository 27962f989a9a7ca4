"""hvdscale.torch: LARS / LAMB against the core reference and independent implementations,
the exclusion rule, the optimizer factory and the schedule adapter."""
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from hvdscale.core import LRScheduleSpec, build_lr_schedule  # noqa: E402
from hvdscale.core.optim_math import run_reference  # noqa: E402
from hvdscale.errors import ConfigError  # noqa: E402
from hvdscale.torch import LAMB, LARS, LRScheduleAdapter, build_optimizer  # noqa: E402

STEPS = 20


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3)
        self.norm = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(16, 3)


def make_net(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = Net().to(dtype)
    with torch.no_grad():  # non-trivial norm parameters
        net.norm.weight.uniform_(0.5, 1.5)
        net.norm.bias.uniform_(-0.5, 0.5)
    return net


def grads_for(net, steps=STEPS, seed=1):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(tuple(p.shape)) * (0.1 + j) for j, p in enumerate(net.parameters())]
            for _ in range(steps)]


def run_torch(opt, net, grads, scheduler=None):
    for step_grads in grads:
        for p, g in zip(net.parameters(), step_grads):
            p.grad = torch.tensor(g, dtype=p.dtype)
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return [p.detach().numpy().copy() for p in net.parameters()]


def reference(kind, net, grads, excluded, lrs, **hyper):
    weights = [p.detach().numpy().astype(np.float64) for p in net.parameters()]
    return run_reference(kind, weights, lambda i, w: grads[i], lrs, excluded, **hyper)


def assert_close(got, want, rtol):
    for g, w in zip(got, want):
        err = np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30)
        assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


CASES = [
    ("lars", LARS, dict(momentum=0.9, weight_decay=5e-4, trust_coefficient=0.02, eps=1e-8)),
    ("lamb", LAMB, dict(weight_decay=0.01, eps=1e-6)),
    ("lamb", LAMB, dict(weight_decay=0.1, eps=1e-6, bias_correction=False, clamp_value=0.5)),
    ("lamb", LAMB, dict(weight_decay=0.01, eps=1e-6, max_trust_ratio=0.2)),
]


@pytest.mark.parametrize("kind, cls, hyper", CASES)
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_matches_core_reference_for_twenty_steps(kind, cls, hyper, dtype, rtol):
    net = make_net(dtype)
    excluded = [p.ndim <= 1 for p in net.parameters()]
    grads = grads_for(net)
    lrs = [0.05 * (1 + 0.1 * i) for i in range(STEPS)]  # lr changes every step
    opt = cls(net.named_parameters(), lr=lrs[0], **hyper)
    sched = LRScheduleAdapter(opt, lambda t: lrs[min(t, STEPS - 1)])
    want = reference(kind, make_net(dtype), grads, excluded, lrs,
                     **({"beta1": 0.9, "beta2": 0.999} if kind == "lamb" else {}), **hyper)
    assert_close(run_torch(opt, net, grads, sched), want, rtol)


@pytest.mark.parametrize("kind, cls, hyper", CASES[:2])
def test_name_patterns_exclude_by_name(kind, cls, hyper):
    net = make_net()
    names = [n for n, _ in net.named_parameters()]
    excluded = [n.startswith("head.") or n == "conv.bias" for n in names]
    grads = grads_for(net)
    opt = cls(net.named_parameters(), lr=0.05, exclude_1d=False, exclude=[r"^head\.", r"conv\.bias"], **hyper)
    want = reference(kind, make_net(), grads, excluded, [0.05] * STEPS, **hyper)
    assert_close(run_torch(opt, net, grads), want, 1e-10)
    # the 1-D rule alone gives a different result: the patterns really changed the exclusion
    default = reference(kind, make_net(), grads, [p.ndim <= 1 for p in net.parameters()],
                        [0.05] * STEPS, **hyper)
    assert not np.allclose(want[2], default[2]) and not np.allclose(want[4], default[4])


def test_lamb_equals_torch_optimizer_lamb_without_bias_correction():
    torch_optimizer = pytest.importorskip("torch_optimizer")
    grads = grads_for(make_net())
    net = make_net()
    ours = run_torch(LAMB(net.parameters(), lr=0.01, weight_decay=0.05, bias_correction=False,
                          clamp_value=10.0, exclude_1d=False), net, grads)
    net = make_net()
    peer = run_torch(torch_optimizer.Lamb(net.parameters(), lr=0.01, weight_decay=0.05, eps=1e-6,
                                          clamp_value=10.0, debias=False), net, grads)
    assert_close(ours, peer, 1e-10)


def test_all_excluded_lars_is_torch_sgd_momentum_and_lamb_is_torch_adam():
    grads = grads_for(make_net())
    net = make_net()  # a pattern that matches every name excludes everything
    ours = run_torch(LARS(net.named_parameters(), lr=0.05, momentum=0.9, weight_decay=0.3,
                          exclude=[".*"]), net, grads)
    net = make_net()
    sgd = run_torch(torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), net, grads)
    assert_close(ours, sgd, 1e-10)
    net = make_net()
    ours = run_torch(LAMB(net.named_parameters(), lr=0.01, weight_decay=0.3, exclude=[".*"]), net, grads)
    net = make_net()
    adam = run_torch(torch.optim.Adam(net.parameters(), lr=0.01, eps=1e-6), net, grads)
    assert_close(ours, adam, 1e-10)


def test_parameters_without_gradients_are_left_alone_and_state_round_trips():
    net = make_net()
    opt = LAMB(net.named_parameters(), lr=0.01)
    grads = grads_for(net, steps=6)
    frozen = net.head.weight.detach().clone()
    for step_grads in grads[:3]:
        for (name, p), g in zip(net.named_parameters(), step_grads):
            p.grad = None if name == "head.weight" else torch.tensor(g)
        opt.step()
    assert torch.equal(net.head.weight, frozen) and net.head.weight not in opt.state
    buffer = io.BytesIO()  # through bytes, as a checkpoint: a live state_dict shares its tensors
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    twin = make_net()
    twin.load_state_dict(net.state_dict())
    twin_opt = LAMB(twin.named_parameters(), lr=0.01)
    twin_opt.load_state_dict(saved)
    assert_close(run_torch(twin_opt, twin, grads[3:]), run_torch(opt, net, grads[3:]), 0.0)


@pytest.mark.parametrize("kind, cls, hyper", CASES)
def test_fused_cpu_kernels_and_multi_tensor_form_take_the_same_steps(kind, cls, hyper,
                                                                      monkeypatch):
    """On CPU the update runs in torch's fused kernels; off the CPU in the _foreach_* form.
    Both must take the same steps (and the CPU run must really use the fused kernels)."""
    kernel = "_fused_sgd_" if cls is LARS else "_fused_adam_"
    real, calls = getattr(torch, kernel), []
    monkeypatch.setattr(torch, kernel, lambda *a, **k: calls.append(1) or real(*a, **k))
    grads = grads_for(make_net())
    net = make_net()
    fused = run_torch(cls(net.named_parameters(), lr=0.05, **hyper), net, grads)
    assert calls, f"{kernel} was not used on CPU"
    monkeypatch.setattr(cls, "_fused_kernels", staticmethod(lambda params: False))
    net = make_net()
    multi = run_torch(cls(net.named_parameters(), lr=0.05, **hyper), net, grads)
    assert_close(multi, fused, 1e-12)


def test_lamb_and_lars_train_a_small_classifier():
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    for cls, lr in [(LAMB, 0.02), (LARS, 2.0)]:
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
        opt = cls(model.named_parameters(), lr=lr, weight_decay=1e-4)
        first = None
        for _ in range(60):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            first = first if first is not None else loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 0.5 * first, (cls.__name__, first, loss.item())


def test_schedule_adapter_gives_the_core_sequence():
    net = make_net()
    opt = LAMB(net.parameters(), lr=1.0)
    s = build_lr_schedule(LRScheduleSpec(warmup="linear", warmup_steps=5, decay="cosine", end_lr=0.01),
                          0.1, 0.8, steps_per_epoch=10, total_steps=30)
    sched = LRScheduleAdapter(opt, s)
    seen = []
    for _ in range(35):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradients: a no-op, but torch expects it before the scheduler's step
        sched.step()
    assert seen == [s(t) for t in range(35)]


class Section:  # a recipe section given as an object with attributes
    name, momentum, betas, eps, weight_decay = "lamb", 0.9, [0.8, 0.99], 1e-6, 0.02
    trust_coefficient, exclude_1d, exclude = 0.001, True, []


def test_build_optimizer_for_every_name():
    net = make_net()
    sgd = build_optimizer("sgd", net, 0.1, {"momentum": 0.8, "weight_decay": 1e-4})
    decays = {id(p): g["weight_decay"] for g in sgd.param_groups for p in g["params"]}
    assert decays[id(net.conv.weight)] == 1e-4 and decays[id(net.norm.weight)] == 0.0
    assert decays[id(net.head.bias)] == 0.0 and sgd.param_groups[0]["momentum"] == 0.8
    adamw = build_optimizer("adamw", net, 0.1, {"betas": [0.8, 0.9], "weight_decay": 0.05})
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.8, 0.9)
    lars = build_optimizer("LARS", net, 0.1, {"trust_coefficient": 0.02, "exclude": ["head"]})
    assert isinstance(lars, LARS) and lars.param_groups[0]["trust_coefficient"] == 0.02
    assert lars.param_groups[0]["exclude"] == ("head",)
    lamb = build_optimizer("lamb", net, 0.3, Section())
    g = lamb.param_groups[0]
    assert isinstance(lamb, LAMB) and g["lr"] == 0.3 and g["betas"] == (0.8, 0.99) and g["weight_decay"] == 0.02


@pytest.mark.parametrize("call, needle", [
    (lambda n: build_optimizer("adagrad", n, 0.1, {}), "optimizer.name: 'adagrad' is not one of sgd, sgdw, lars, lamb, adamw"),
    (lambda n: build_optimizer("lamb", n, 0.1, {"exclude": ["(bad"]}), "bad exclude pattern"),
    (lambda n: build_optimizer("lamb", n.parameters(), 0.1, {"exclude": ["head"]}), "need parameter names"),
    (lambda n: LAMB(n.parameters(), lr=-1.0), "lr must be"),
    (lambda n: LAMB(n.parameters(), betas=(0.9, 1.0)), r"betas\[1\]"),
    (lambda n: LARS(n.parameters(), lr=0.1, momentum=1.5), "momentum"),
    (lambda n: LARS(n.parameters(), lr=0.1, trust_coefficient=float("nan")), "trust_coefficient"),
])
def test_bad_settings_are_config_errors(call, needle):
    with pytest.raises(ConfigError, match=needle):
        call(make_net())


def test_sparse_gradients_are_refused_naming_the_optimizer():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    for cls in (LARS, LAMB):
        with pytest.raises(RuntimeError, match=rf"^{cls.__name__}: sparse gradients are not "
                                               r"supported \(param group 0\)"):
            cls(emb.parameters(), lr=0.1).step()


class HostTensors:
    """Counts tensors made from Python data (torch.tensor(list), x[list], ...): each is a
    blocking host-to-device copy when the step runs on a GPU (an error under
    torch.cuda.set_sync_debug_mode("error")). On the CPU torch shows them as aten.lift_fresh."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        calls = self.calls = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten.lift_fresh.default:
                    calls.append(tuple(args[0].shape))
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


@pytest.mark.parametrize("kind, cls, hyper", CASES)
def test_device_step_makes_no_tensor_from_host_data(kind, cls, hyper, monkeypatch):
    """The off-CPU (_foreach_*) form of the step, which a GPU runs, builds its per-group
    exclusion masks and indices once, on the device: no step after the first makes a tensor
    from Python data."""
    monkeypatch.setattr(cls, "_fused_kernels", staticmethod(lambda params: False))
    net = make_net(torch.float32)
    grads = grads_for(net, steps=4)
    opt = cls(net.named_parameters(), lr=0.05, **hyper)
    run_torch(opt, net, grads[:1])                     # the first step may build its masks
    counter = HostTensors()
    for step_grads in grads[1:]:
        for p, g in zip(net.parameters(), step_grads):
            p.grad = torch.tensor(g, dtype=p.dtype)
        with counter.mode:
            opt.step()
    assert counter.calls == [], f"{len(counter.calls)} tensors made from host data in 3 steps"
    # the proxy sees what it must: a tensor from a list, and indexing with a list
    with counter.mode:
        torch.tensor([True, False])
        torch.zeros(3)[[0, 2]]
    assert len(counter.calls) == 2
