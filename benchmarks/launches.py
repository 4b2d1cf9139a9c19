"""Runs a benchmark script on one process or under torchrun, and reads
the JSON values it prints after a tag."""

import json
import os
import subprocess
import sys


def run_script(script, args=(), processes=1, what="measurement", env=None):
    """Runs `script` with `args`, on `processes` processes under torchrun
    when more than one, each with one thread; returns its standard output.
    `env` sets environment variables, or unsets those it maps to None.
    Exits, naming `what`, when it fails."""
    command = [sys.executable]
    if processes > 1:
        command += ["-m", "torch.distributed.run"]
        command += ["--nproc_per_node", str(processes)]
    command += [script, *args]
    environ = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS="1")
    for name, value in (env or {}).items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    completed = subprocess.run(
        command, env=environ, capture_output=True, text=True
    )
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout + completed.stderr)
        raise SystemExit(f"{what} failed")
    return completed.stdout


def tagged(stdout, tag):
    """The JSON values of the lines of `stdout` that start with `tag`."""
    prefix = tag + " "
    return [
        json.loads(line[len(prefix) :])
        for line in stdout.splitlines()
        if line.startswith(prefix)
    ]
