"""The online noise scale under a real `horovodrun -np 2`: the probe must see each rank's own
micro-batch gradients although Horovod allreduces .grad in place, and the one scalar allreduce
must average them; the logged estimate equals the one computed from all ranks' data here."""
import json
import sys

import pytest

from conftest import WORKERS, horovodrun

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.multiproc


def _sq(grads):
    return float(sum((g.double() ** 2).sum() for g in grads))


def test_two_ranks_log_the_estimate_of_the_pooled_micro_batches(tmp_path):
    horovodrun(2, sys.executable, WORKERS / "gns_hvd_torch.py", tmp_path, timeout=120)
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(entry["size"] == 2 and entry["pieces"] == 2 for entry in logs)
    assert logs[0]["log"] == logs[1]["log"]           # every rank logs the same reading

    sys.path.insert(0, str(WORKERS))
    from gns_hvd_torch import model_and_data

    from hvdscale.core.noise_scale import unbiased_estimates
    micro = []
    for rank in range(2):
        model, x, y = model_and_data(rank)
        params = list(model.parameters())
        for xb, yb in zip(x.chunk(2), y.chunk(2)):
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            micro.append(torch.autograd.grad(loss, params))
    small = sum(_sq(g) for g in micro) / len(micro)
    mean = [sum(parts) / len(micro) for parts in zip(*micro)]
    g2, trace = unbiased_estimates(small, 8, _sq(mean), 32)
    assert (logs[0]["b_small"], logs[0]["b_big"]) == (8, 32)
    got = logs[0]["log"]
    assert got["gns_g2"] == pytest.approx(g2, rel=1e-4)
    assert got["gns_trace"] == pytest.approx(trace, rel=1e-4)
    assert g2 > 0 and got["b_simple"] == pytest.approx(trace / g2, rel=1e-4)
