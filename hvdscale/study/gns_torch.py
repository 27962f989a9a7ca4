"""PyTorch side of the online gradient noise scale: squared norms of local micro-batch
gradients and of the averaged gradient.

Horovod's DistributedOptimizer allreduces `p.grad` in place, asynchronously, from a hook that
runs after the gradient is accumulated. Reading `p.grad` after backward() would therefore race
with the allreduce. `LocalGradientProbe` instead registers tensor hooks, which run on each
parameter's incoming gradient *before* accumulation, so they see this worker's own micro-batch
gradient whatever the optimizer wrapper does later. Hooks exist only while armed (due steps).
"""
import torch


class LocalGradientProbe:
    """Squared norm of each backward pass's gradient on this worker.

    Usage on a due step:
        probe.arm()
        for micro-batch: loss.backward()          # the hooks record each pass
        norms = probe.collect(loss_scale)         # one float per backward pass; disarms
    loss_scale: the factor the trainer multiplied each micro-batch's mean loss by before
    backward (1/accumulation when it averages micro-batches that way), divided back out so the
    norms are those of mean-over-examples gradients.
    """

    def __init__(self, parameters):
        self.params = [p for p in parameters if p.requires_grad]
        self._handles = []
        self._per_param = []

    def arm(self):
        self.disarm()
        self._per_param = [[] for _ in self.params]
        for index, param in enumerate(self.params):
            self._handles.append(param.register_hook(self._recorder(index)))

    def _recorder(self, index):
        sink = self._per_param[index]

        def record(grad):
            # computed now, before the gradient reaches .grad (and Horovod's in-place allreduce)
            sink.append(torch.sum(grad.detach().float() ** 2))
            return None
        return record

    def disarm(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def armed(self):
        return bool(self._handles)

    def collect(self, loss_scale=1.0):
        """Per-pass squared norms (floats), in pass order; disarms the probe.

        Each parameter's hook fires once per backward pass that reaches it, so the k-th value
        of every parameter belongs to pass k. A parameter no pass reached adds nothing.
        """
        self.disarm()
        passes = max((len(values) for values in self._per_param), default=0)
        totals = []
        for k in range(passes):
            total = sum(float(values[k]) for values in self._per_param if len(values) > k)
            totals.append(total / (loss_scale * loss_scale))
        self._per_param = []
        return totals


def grad_sq_norm(parameters):
    """|g|^2 over the parameters' current .grad (call after the allreduce has completed,
    e.g. after optimizer.synchronize() or step(), before zero_grad())."""
    total = torch.zeros((), dtype=torch.float64)
    for param in parameters:
        if param.grad is not None:
            total += torch.sum(param.grad.detach().double() ** 2)
    return float(total)
