"""The frozen-weights noise probe (hvdscale.study.probe.probe_noise_scale) against noise scales
known independently of it:
- least squares with Gaussian inputs and noise, where B_simple has a closed form (docs/study.md);
- softmax regression on a finite population, where the truth is the population's own
  per-example gradients, written out analytically (no autograd, no micro-batches);
and a broken estimator (the plain small-batch norm as |G|^2) that the second test must catch."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import hvdscale.study.probe as probe_module  # noqa: E402
from hvdscale.errors import ConfigError  # noqa: E402
from hvdscale.study.probe import probe_noise_scale  # noqa: E402

DIM, NOISE = 8, 1.0


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: two OpenMP threads only spin-wait on a loaded 2-core machine (docs/study.md)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _half_squared_error(outputs, targets):
    return 0.5 * ((outputs.squeeze(-1) - targets) ** 2).mean()


@pytest.fixture(scope="module")
def regression():
    """x ~ N(0, I_8), y = x.w* + N(0, 1): 2^17 examples, so the population's own noise scale
    is within ~1 % of the closed form."""
    gen = torch.Generator().manual_seed(0)
    w_star = torch.randn(DIM, generator=gen)
    x = torch.randn(1 << 17, DIM, generator=gen)
    y = x @ w_star + NOISE * torch.randn(1 << 17, generator=gen)
    return w_star, x, y


def _linear_at(w):
    model = torch.nn.Linear(DIM, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w[None])
    return model


def _closed_form(delta_sq):
    """B_simple = ((d + 1)|delta|^2 + d s^2) / |delta|^2 at w = w* + delta (docs/study.md)."""
    return ((DIM + 1) * delta_sq + DIM * NOISE ** 2) / delta_sq


def _offset(delta_sq, seed):
    direction = torch.randn(DIM, generator=torch.Generator().manual_seed(seed))
    return direction / direction.norm() * math.sqrt(delta_sq)


@pytest.mark.parametrize("delta_sq", [0.5, 0.04])        # B_simple = 25 and 209
def test_probe_recovers_the_closed_form_of_least_squares(regression, delta_sq):
    w_star, x, y = regression
    model = _linear_at(w_star + _offset(delta_sq, 1))
    res = probe_noise_scale(model, _half_squared_error, x, y, micro=32, count=64, seed=5)
    truth = _closed_form(delta_sq)
    assert res.ci_low <= truth <= res.ci_high
    assert res.ci_high / res.ci_low < 3.5            # an informative interval, not [0, inf]
    assert res.count == 64 and res.micro == 32 and res.examples == 2048
    assert res.b_simple == pytest.approx(res.trace / res.g2)
    # |G|^2 = |delta|^2 and tr(Sigma) = (d + 1)|delta|^2 + d s^2 (no intervals: loose bounds)
    assert res.g2 == pytest.approx(delta_sq, rel=0.5)
    assert res.trace == pytest.approx((DIM + 1) * delta_sq + DIM * NOISE ** 2, rel=0.3)


def test_probe_interval_covers_the_closed_form_about_95_percent(regression):
    w_star, x, y = regression
    model = _linear_at(w_star + _offset(0.04, 2))
    truth = _closed_form(0.04)
    covered = [probe_noise_scale(model, _half_squared_error, x, y, micro=16, count=64, seed=s)
               for s in range(40)]
    rate = np.mean([p.ci_low <= truth <= p.ci_high for p in covered])
    assert rate >= 0.85, rate                         # 0.94 over 300 repeats in development


# ------------------------------------------------------------ a finite softmax population
POP, FEATURES, CLASSES = 4096, 5, 3


@pytest.fixture(scope="module")
def softmax_population():
    gen = torch.Generator().manual_seed(1)
    teacher = 2.0 * torch.randn(CLASSES, FEATURES, generator=gen)
    x = torch.randn(POP, FEATURES, generator=gen).double()
    y = torch.multinomial(torch.softmax(x.float() @ teacher.T, 1), 1, generator=gen)[:, 0]
    return teacher.double(), x, y


def _population_noise_scale(weight, x, y):
    """tr(Sigma) / |G|^2 over every example: per-example gradients of the cross-entropy of a
    linear softmax model, written out: dL/dW = (p - e_y) x^T, dL/db = p - e_y (bias 0)."""
    residual = torch.softmax(x @ weight.T, 1) - torch.nn.functional.one_hot(y, CLASSES).double()
    per_example = torch.cat([(residual[:, :, None] * x[:, None, :]).reshape(len(y), -1),
                             residual], 1)
    mean = per_example.mean(0)
    return float(((per_example - mean) ** 2).sum(1).mean() / (mean @ mean))


def _softmax_model(weight):
    model = torch.nn.Linear(FEATURES, CLASSES).double()
    with torch.no_grad():
        model.weight.copy_(weight)
        model.bias.zero_()
    return model


def _biased_estimates(small_sq, b_small, big_sq, b_big):
    """The broken estimator: |G|^2 read as the plain small-batch squared norm."""
    _, trace = _unbiased(small_sq, b_small, big_sq, b_big)
    return small_sq, trace


_unbiased = probe_module.unbiased_estimates


@pytest.mark.parametrize("scale", [0.3, 0.6])            # B_simple ~ 48 and ~ 391
def test_probe_on_a_finite_population_and_a_broken_estimator_fails(softmax_population, scale,
                                                                   monkeypatch):
    teacher, x, y = softmax_population
    weight = scale * teacher
    truth = _population_noise_scale(weight, x, y)
    res = probe_noise_scale(_softmax_model(weight), torch.nn.functional.cross_entropy, x, y,
                            micro=32, count=64, seed=3)
    assert res.ci_low <= truth <= res.ci_high
    assert res.population == POP
    monkeypatch.setattr(probe_module, "unbiased_estimates", _biased_estimates)
    broken = probe_noise_scale(_softmax_model(weight), torch.nn.functional.cross_entropy, x, y,
                               micro=32, count=64, seed=3)
    assert not broken.ci_low <= truth <= broken.ci_high


def test_probe_handles_unused_parameters_and_rejects_bad_sizes(softmax_population):
    teacher, x, y = softmax_population
    model = _softmax_model(0.3 * teacher)
    model.unused = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    res = probe_noise_scale(model, torch.nn.functional.cross_entropy, x, y, micro=32, count=64,
                            seed=3)
    plain = probe_noise_scale(_softmax_model(0.3 * teacher), torch.nn.functional.cross_entropy,
                              x, y, micro=32, count=64, seed=3)
    assert res.b_simple == pytest.approx(plain.b_simple, rel=1e-9)
    assert model.weight.grad is None
    with pytest.raises(ConfigError, match="count x micro"):
        probe_noise_scale(model, torch.nn.functional.cross_entropy, x, y, micro=64, count=65)
    with pytest.raises(ConfigError, match="count >= 2"):
        probe_noise_scale(model, torch.nn.functional.cross_entropy, x, y, micro=8, count=1)


def test_micro_batches_covering_the_population_give_its_exact_gradient(softmax_population):
    # drawn without replacement, 128 x 32 = all 4096 examples: their mean gradient is G itself,
    # and the finite-population correction must leave |G|^2 exact (without it: low by tr/N)
    teacher, x, y = softmax_population
    weight = 0.6 * teacher
    residual = torch.softmax(x @ weight.T, 1) - torch.nn.functional.one_hot(y, CLASSES).double()
    per_example = torch.cat([(residual[:, :, None] * x[:, None, :]).reshape(POP, -1), residual], 1)
    mean = per_example.mean(0)
    res = probe_noise_scale(_softmax_model(weight), torch.nn.functional.cross_entropy, x, y,
                            micro=32, count=128, seed=4)
    assert res.g2 == pytest.approx(float(mean @ mean), rel=1e-9)
    assert res.trace == pytest.approx(float(((per_example - mean) ** 2).sum(1).mean()), rel=0.3)


# ------------------------------------------------- the study's own model on real images
def _per_example_noise_scale(model, x, y):
    """tr(Sigma) / |G|^2 over the population for a model of nn.Linear layers and element-wise
    activations, from per-example gradients written out: for a Linear layer with input a and
    output gradient delta (of the summed loss), dL/dW = delta a^T and dL/db = delta, so
    |g|^2 = sum over layers of |delta|^2 (|a|^2 + 1). G is the full-batch gradient."""
    inputs, outputs = {}, {}

    def keep(module, args, output):
        inputs[module], outputs[module] = args[0], output
        output.retain_grad()

    hooks = [m.register_forward_hook(keep) for m in model.modules()
             if isinstance(m, torch.nn.Linear)]
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    for h in hooks:
        h.remove()
    sq = sum((outputs[m].grad.double() ** 2).sum(1)
             * ((inputs[m].detach().double().flatten(1) ** 2).sum(1) + 1.0) for m in inputs)
    mean_sq = float(sum((p.grad.double() / len(y)).pow(2).sum() for p in model.parameters()))
    model.zero_grad(set_to_none=True)
    return (float(sq.mean()) - mean_sq) / mean_sq


FASHION = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not __import__("os").path.isdir(FASHION), reason="Fashion-MNIST missing")
def test_probe_on_the_study_mlp_against_per_example_gradients():
    from hvdscale.data.fashion_mnist import MEAN, STD, load_fashion_mnist
    from hvdscale.torch.models import build_model

    images, labels, _, _ = load_fashion_mnist(None)
    x = ((torch.from_numpy(np.asarray(images[:4096], dtype=np.float32)) / 255.0 - MEAN) / STD)
    x, y = x.unsqueeze(1), torch.from_numpy(np.asarray(labels[:4096])).long()
    torch.manual_seed(0)
    model = build_model("mlp", 10, 1, 28)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for steps in (0, 300):        # at initialisation, then after 300 SGD steps
        for _ in range(steps):
            idx = torch.randint(0, 4096, (32,), generator=gen)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        truth = _per_example_noise_scale(model, x, y)
        res = probe_noise_scale(model, torch.nn.functional.cross_entropy, x, y, micro=32,
                                count=64, seed=1)
        assert res.ci_low <= truth <= res.ci_high, (steps, truth, res)
