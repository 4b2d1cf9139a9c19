"""Python scripts run as a process of a CUDA host would run them, on a host
without a GPU: `torch.cuda` reports `gpus` devices and records, in
`selected`, each `set_device` call with the name of the thread that made
it. For what happens before any tensor reaches a GPU (the device each
thread chooses, what TensorFlow is told); no CUDA tensor can be made."""

import os
import subprocess
import sys
import textwrap

PREAMBLE = """
import threading
import torch
selected = []
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: {gpus}
torch.cuda.set_device = lambda index: selected.append(
    (threading.current_thread().name, index)
)
"""


def run_script(code, gpus=2, timeout=120, **environ):
    """Runs `code` after the preamble in a fresh interpreter with the torch
    backend and `environ` (a launcher's variables, say); returns the
    completed process."""
    script = PREAMBLE.format(gpus=gpus) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script],
        env=dict(os.environ, KERAS_BACKEND="torch", **environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
