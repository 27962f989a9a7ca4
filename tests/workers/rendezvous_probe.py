"""Worker for the rendezvous tests: where can this rank reach horovodrun's Gloo rendezvous?

    python rendezvous_probe.py OUT_DIR [ADDR ...]

Before Horovod starts (the rendezvous server is up for the whole job), each rank tries a TCP
connection to HOROVOD_GLOO_RENDEZVOUS_ADDR:PORT, the address horovodrun gave it, and to the
same port at each ADDR (other addresses of the launching host). Then it joins the job and
sums its rank + 1 over all ranks (the rendezvous worked). OUT_DIR/rendezvous-rank<r>.json
holds the results.
"""
import json
import os
import socket
import sys
from pathlib import Path


def reachable(addr, port):
    try:
        socket.create_connection((addr, port), timeout=5).close()
        return True
    except OSError:
        return False


def main(out, *addresses):
    addr = os.environ["HOROVOD_GLOO_RENDEZVOUS_ADDR"]
    port = int(os.environ["HOROVOD_GLOO_RENDEZVOUS_PORT"])
    result = {"addr": addr, "port": port, "reach_given": reachable(addr, port),
              "reach": {a: reachable(a, port) for a in addresses if a},
              "netns": os.readlink("/proc/self/ns/net")}
    import torch
    import horovod.torch as hvd
    hvd.init()
    total = hvd.allreduce(torch.tensor([hvd.rank() + 1.0]), op=hvd.Sum)
    result.update(rank=hvd.rank(), size=hvd.size(), sum=float(total[0]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rendezvous-rank{hvd.rank()}.json").write_text(json.dumps(result))
    hvd.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
