"""A run in which one rank fails mid-run while the others wait for it.

Usage (with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set):
    python failing_rank.py <failing rank> raise|freeze [backend]

With a backend (`"cpu:gloo,cuda:gloo"`, say), the script starts the
process group itself before Keras, as a user of NCCL would.
"""

import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

if len(sys.argv) > 3:
    dist.init_process_group(backend=sys.argv[3])

import keras  # noqa: E402

keras.distribution.initialize()
failing_rank, how = int(sys.argv[1]), sys.argv[2]
for _ in range(3):
    dist.all_reduce(torch.ones(1))
print(f"rank {dist.get_rank()} ready", flush=True)
if dist.get_rank() == failing_rank:
    if how == "freeze":
        os.kill(os.getpid(), signal.SIGSTOP)
    # A live non-daemon thread keeps this process and its sockets open, as a
    # stuck loader thread would: the others cannot rely on a closed socket.
    threading.Thread(target=time.sleep, args=(120,)).start()
    raise RuntimeError("failing on purpose")
dist.all_reduce(torch.ones(1))  # Waits for the failing rank.
print("unreachable", flush=True)
