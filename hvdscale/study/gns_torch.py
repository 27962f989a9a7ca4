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

        loss_scale: one factor for every pass, or a list with one per pass.
        Each parameter's hook fires once per backward pass that reaches it, so the k-th value
        of every parameter belongs to pass k. A parameter no pass reached adds nothing.
        """
        self.disarm()
        passes = max((len(values) for values in self._per_param), default=0)
        scales = list(loss_scale) if isinstance(loss_scale, (list, tuple)) else \
            [loss_scale] * passes
        if len(scales) != passes:
            raise ValueError(f"{len(scales)} loss scales for {passes} backward passes")
        sums = [torch.stack([values[k].double() for values in self._per_param
                             if len(values) > k]).sum() for k in range(passes)]
        read = torch.stack(sums).tolist() if sums else []       # one host read for all passes
        totals = [total / (scales[k] * scales[k]) for k, total in enumerate(read)]
        self._per_param = []
        return totals


def grad_sq_norm(parameters):
    """|g|^2 over the parameters' current .grad (call after the allreduce has completed,
    e.g. after optimizer.synchronize() or step(), before zero_grad())."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    # one norm per tensor on the gradients' device, one host read
    norms = torch.stack([n.double() for n in torch._foreach_norm(grads)])
    return float((norms ** 2).sum())



class TorchNoiseScale:
    """What a torch trainer holds to log the online noise scale (noise_scale.every > 0).

    In the trainer's step:
        pieces = noise.micro_batches(accumulation)   # arms the probe on due steps; 2x on 1 worker
        ... the usual backward passes over `pieces` micro-batches ...
        optimizer.synchronize(); scaler.unscale_(optimizer)    # averaged, unscaled gradients
        if noise.due: noise.measure(loss_scales)     # then the trainer steps as usual
    (or `noise.step(optimizer, loss_scales)` instead of optimizer.step(), which synchronizes
    itself). `noise.last` then holds {'b_simple', 'gns_g2', 'gns_trace', 'gns_samples'}.
    Only due steps read the device from the host (the norms); other steps cost nothing.
    """

    def __init__(self, noise_cfg, batch_cfg, comm, model):
        from hvdscale.study.gns import from_config
        self.online = from_config(noise_cfg, batch_cfg, comm)
        if self.online is None:
            raise ValueError("TorchNoiseScale needs noise_scale.every > 0")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.probe = LocalGradientProbe(self.params)

    @property
    def last(self):
        return self.online.last

    def micro_batches(self, accumulation):
        """How many micro-batches this step uses (arms the probe when the estimate is due)."""
        pieces = self.online.begin_step(accumulation)
        if self.online.due_now:
            self.probe.arm()
        return pieces

    @property
    def due(self):
        return self.online.due_now

    def measure(self, loss_scales):
        """Record the estimate from the gradients in .grad now, which the caller has
        averaged over workers and unscaled (after optimizer.synchronize(), before step())."""
        if not self.online.due_now:
            return None
        big = grad_sq_norm(self.params)
        return self.online.record(self.probe.collect(loss_scales), big)

    def step(self, optimizer, loss_scales, synchronized=False):
        """optimizer.step(), reading |G_big|^2 between the allreduce and the update
        (synchronized: the caller has already averaged the gradients)."""
        if not self.online.due_now:
            optimizer.step()
            return None
        if hasattr(optimizer, "skip_synchronize"):      # Horovod's DistributedOptimizer
            if not synchronized:
                optimizer.synchronize()
            big = grad_sq_norm(self.params)
            with optimizer.skip_synchronize():
                optimizer.step()
        else:
            big = grad_sq_norm(self.params)            # before step(): an optimizer may edit .grad
            optimizer.step()
        small = self.probe.collect(loss_scales)
        return self.online.record(small, big)

    def state_dict(self):
        return self.online.state_dict()

    def load_state_dict(self, state):
        self.online.load_state_dict(state)
