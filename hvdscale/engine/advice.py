"""Warnings in the run's header about settings known to be slow on this machine (bf16
emulated on a CPU without native support, more threads than cores), one line each, rank 0."""
from hvdscale.engine.callbacks import Callback
from hvdscale.hardware import cpu_count, slow_settings


class SlowSettingsCallback(Callback):
    def on_run_begin(self, engine):
        if not engine.comm.is_root:
            return
        cfg, cores = engine.cfg, cpu_count()
        local = max(1, engine.comm.local_size)
        threads = cfg.train.threads or max(1, cores // local)  # what start_workers chose
        for text in slow_settings(precision=cfg.train.precision,
                                  device=engine.backend.device_description,
                                  workers_here=local, threads=threads, cores=cores):
            engine.echo(f"warning: {text}")
