"""Under horovodrun -np 2: how Horovod waits (launchers/horovod-wait.patch). Prints one JSON
line per rank:
- idle_switches_per_s, idle_cpu_per_s: voluntary context switches and CPU seconds per second
  of the process while nothing is queued (upstream Horovod's thread wakes every 1 ms cycle:
  thousands per second; under MPI an out-of-phase rank spins in the cycle's collective);
- wait_cpu_s / wait_s: CPU time of the whole process while rank 0 waits in synchronize() for
  rank 1, which joins the allreduce LATE_S later (upstream spins: about one core);
- sum: the allreduce result, which must still be right."""
import json
import resource
import time

import torch

import horovod.torch as hvd

LATE_S = 1.5

hvd.init()
hvd.allreduce(torch.ones(1), name="warm-up")

before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
cpu_before = time.process_time()
time.sleep(2.0)
after, idle = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - t0
idle_cpu = time.process_time() - cpu_before

if hvd.rank() == 1:
    time.sleep(LATE_S)
cpu0, wall0 = time.process_time(), time.monotonic()
handle = hvd.allreduce_async(torch.full((1000,), float(hvd.rank() + 1)), op=hvd.Sum, name="late")
total = hvd.synchronize(handle)
print(json.dumps({"rank": hvd.rank(),
                  "idle_switches_per_s": (after.ru_nvcsw - before.ru_nvcsw) / idle,
                  "idle_cpu_per_s": idle_cpu / idle,
                  "wait_s": time.monotonic() - wall0, "wait_cpu_s": time.process_time() - cpu0,
                  "sum": float(total[0])}), flush=True)
