"""Worker for tests/test_launch_multiproc.py: started by the command `hvdscale launch` builds.

Writes OUT/rank<r>.json with what the launcher gave this process (rank, world size, the
thread count, a forwarded variable) and, with --horovod, the result of a Horovod allreduce.

    python launch_probe.py OUT [--horovod]
"""
import json
import os
import sys


def main():
    out, with_horovod = sys.argv[1], "--horovod" in sys.argv
    seen = {"omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "probe": os.environ.get("HOROVOD_HVDSCALE_PROBE"),
            "pid": os.getpid()}
    if with_horovod:
        import torch
        import horovod.torch as hvd

        hvd.init()
        rank, size = hvd.rank(), hvd.size()
        total = hvd.allreduce(torch.tensor([float(rank + 1)]), op=hvd.Sum, name="probe")
        seen.update(allreduce_sum=float(total[0]), torch_threads=torch.get_num_threads())
        hvd.shutdown()
    else:
        rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("HOROVOD_RANK", "-1")))
        size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("HOROVOD_SIZE", "-1")))
    seen.update(rank=rank, size=size)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main()
