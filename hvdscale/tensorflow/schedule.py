"""Keras LearningRateSchedule driven by a hvdscale.core schedule.

Keras calls the schedule with the optimizer's `iterations` (updates applied so far), the same
index the torch adapter uses, and the core schedule is constant from `total_steps` on, so a
float32 table of it reproduces the core sequence exactly, in eager mode and in graphs.
"""
import numpy as np
import keras
import tensorflow as tf


class CoreSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """lr(step) = float32(schedule(step)) for a core schedule (anything with `table()`, or a
    callable together with `total_steps`)."""

    def __init__(self, schedule=None, total_steps=None, table=None):
        if table is None:
            if hasattr(schedule, "table"):
                table = schedule.table()
            elif callable(schedule) and total_steps is not None:
                table = [schedule(t) for t in range(int(total_steps) + 1)]
            else:
                raise TypeError("CoreSchedule needs a core LRSchedule, or a callable and total_steps")
        self.table = np.asarray(table, dtype=np.float32)
        if self.table.ndim != 1 or self.table.size == 0:
            raise ValueError("the learning-rate table must be a non-empty 1-D sequence")
        self._values = tf.constant(self.table)

    def __call__(self, step):
        index = tf.clip_by_value(tf.cast(step, tf.int64), 0, self.table.size - 1)
        return tf.gather(self._values, index)

    def get_config(self):
        return {"table": self.table.tolist()}
