"""Framework-neutral math for hvdscale: plain Python and NumPy, never torch or TensorFlow."""
from hvdscale.core.exclusions import ExclusionRule, excluded_names
from hvdscale.core.scaling import SCALING_RULES, global_batch, scale_lr
from hvdscale.core.schedules import DECAYS, WARMUPS, LRSchedule, LRScheduleSpec, build_lr_schedule

__all__ = ["global_batch", "scale_lr", "SCALING_RULES", "LRScheduleSpec", "LRSchedule",
           "build_lr_schedule", "WARMUPS", "DECAYS", "ExclusionRule", "excluded_names"]
