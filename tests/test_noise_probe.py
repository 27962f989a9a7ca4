"""The frozen-weights noise probe: its estimator on gradients with a known covariance, and on a
real model against per-example gradients computed one by one; the trust-ratio-aware noise
scale against its formula (docs/study.md)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hvdscale.study.probe import combine_seeds, layer_moments, probe  # noqa: E402


def test_layer_moments_are_unbiased_on_a_known_covariance():
    rng = np.random.default_rng(0)
    d, micro, n = 50, 32, 64
    G = rng.normal(size=d) * 0.3                      # |G|^2 ~ 4.5
    sigma = 2.0                                        # per-example covariance sigma^2 I
    traces, g2s = [], []
    for _ in range(200):
        g = G + rng.normal(size=(n, d)) * sigma / np.sqrt(micro)
        tr, g2 = layer_moments(g @ g.T, micro)
        traces.append(tr[0])
        g2s.append(g2[0])
    assert np.mean(traces) == pytest.approx(sigma ** 2 * d, rel=0.03)
    assert np.mean(g2s) == pytest.approx(float(G @ G), rel=0.05)


def _tiny(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    x = torch.randn(512, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return model, x, y


def test_probe_matches_per_example_gradients():
    model, x, y = _tiny()
    grads = []
    for i in range(len(y)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double())
    g = torch.stack(grads)
    mean = g.mean(0)
    exact = float(((g - mean) ** 2).sum(1).mean() / (mean @ mean))
    res = probe(model, x, y, micro=8, count=64, replicates=300, seed=1)
    # all 512 examples in 64 micro-batches of 8: the estimate is close to the exact value
    assert res.b_simple == pytest.approx(exact, rel=0.35)
    lo, hi = np.percentile(res.boot_simple, [2.5, 97.5])
    assert lo < res.b_simple < hi and lo < exact * 1.3 and hi > exact / 1.3
    assert res.b_layerwise is None


def test_layerwise_noise_scale_follows_its_formula():
    model, x, y = _tiny()
    cfg = {"trust_coefficient": 0.01, "weight_decay": 0.0, "exclude_1d": True}
    res = probe(model, x, y, micro=8, count=32, replicates=50, seed=2, optimizer="lars",
                optimizer_cfg=cfg)
    num = den = 0.0
    for name, layer in res.per_layer.items():
        c = layer["trust"]
        if name.endswith("bias"):
            assert c == 1.0              # excluded tensors keep the plain learning rate
        else:
            w = dict(model.named_parameters())[name].detach().norm().item()
            assert c == pytest.approx(0.01 * w / np.sqrt(layer["g2_pre"]), rel=1e-6)
        num += c ** 2 * layer["trace_pre"]
        den += c ** 2 * layer["g2_pre"]
    assert res.b_layerwise == pytest.approx(num / den, rel=1e-9)
    # LARS has no element-wise preconditioner: the per-layer moments are the raw ones
    for layer in res.per_layer.values():
        assert layer["trace_pre"] == pytest.approx(layer["trace"])


def test_combined_interval_over_seeds():
    model, x, y = _tiny()
    results = [probe(model, x, y, micro=8, count=32, replicates=100, seed=s) for s in range(3)]
    ci = combine_seeds(results)
    assert ci.ci_low <= ci.estimate <= ci.ci_high
    logs = [np.log(r.b_simple) for r in results]
    assert ci.estimate == pytest.approx(np.exp(np.mean(logs)))
