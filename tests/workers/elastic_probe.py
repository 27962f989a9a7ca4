"""Worker for the elastic test in tests/test_launch_multiproc.py, run by horovodrun --elastic.

Steps until the job has grown to TARGET workers (a host slot was added to the hosts file that
launchers/hosts/discover_hosts.sh reads), then each rank writes OUT/rank<r>.json.

    python elastic_probe.py OUT TARGET
"""
import json
import os
import sys
import time

import torch
import horovod.torch as hvd

OUT, TARGET = sys.argv[1], int(sys.argv[2])


def main():
    hvd.init()
    state = hvd.elastic.TorchState(step=0, sizes=[])

    @hvd.elastic.run
    def train(state):
        while True:
            world = int(hvd.allreduce(torch.ones(1), op=hvd.Sum, name="world")[0])
            if world >= TARGET:
                return world
            if hvd.rank() == 0 and state.step == 0:
                open(os.path.join(OUT, "started"), "w").close()   # the test may now add a host
            state.sizes.append(world)
            state.step += 1
            state.commit()          # raises HostsUpdatedInterrupt once discovery sees the new host
            time.sleep(0.2)

    world = train(state)
    with open(os.path.join(OUT, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump({"rank": hvd.rank(), "size": hvd.size(), "world": world,
                   "steps_before_growing": state.step, "sizes_seen": sorted(set(state.sizes)),
                   "pid": os.getpid()}, f)


if __name__ == "__main__":
    main()
