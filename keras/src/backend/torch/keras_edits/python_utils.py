"""Companion of `keras/src/utils/python_utils.py`.

`pythonify_logs` turns a step's logs into Python numbers for the
callbacks, converting each tensor on its own: on a GPU, one wait for the
device per loss and metric, every step. Upstream, under a distribution,
the scalar tensors among the logs are read with one copy first
(`distribution/host_reads.py`): one wait per step, the same numbers.
"""

from keras.src.backend.common import global_state
from keras.src.backend.torch.distribution import host_reads
from keras.src.backend.torch.keras_edits import edit


def _scalars_read_once(upstream):
    def pythonify_logs(logs):
        """Stands for `pythonify_logs`."""
        distribution = global_state.get_global_attribute("distribution")
        if logs and distribution is not None:
            logs = host_reads.read_scalars_once(logs)
        return upstream(logs)

    return pythonify_logs


def apply(python_utils_module):
    edit(python_utils_module, "pythonify_logs", _scalars_read_once)
