"""PyTorch LR scheduler driven by a hvdscale.core schedule (step -> lr), so torch follows
exactly the core's sequence: after k calls of `scheduler.step()` every param group has lr
`schedule(k)` (call it once per optimizer update, after `optimizer.step()`)."""
from torch.optim.lr_scheduler import LRScheduler


class LRScheduleAdapter(LRScheduler):
    """Set each param group's lr to `schedule(step)`; `lr_multipliers` (one per group,
    default 1) allow fixed per-group ratios."""

    def __init__(self, optimizer, schedule, last_epoch=-1, lr_multipliers=None):
        if not callable(schedule):
            raise TypeError(f"schedule must be callable step -> lr, got {type(schedule).__name__}")
        self.schedule = schedule
        n = len(optimizer.param_groups)
        self.lr_multipliers = [1.0] * n if lr_multipliers is None else [float(m) for m in lr_multipliers]
        if len(self.lr_multipliers) != n:
            raise ValueError(f"{len(self.lr_multipliers)} lr multipliers for {n} param groups")
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        lr = float(self.schedule(max(self.last_epoch, 0)))
        return [lr * m if m != 1.0 else lr for m in self.lr_multipliers]

    def _get_closed_form_lr(self):
        return self.get_lr()
