"""Tests that launch Keras scripts as users do."""

import os
import subprocess
import sys


def torchrun(script, *arguments, processes=2, **environ):
    """Runs `script` under `torchrun --standalone` as `processes` local
    processes of one thread each, with `environ` added to this one's;
    returns the finished process (its output captured as text)."""
    env = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS="1")
    env.update(environ)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        + [f"--nproc_per_node={processes}", script, *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
