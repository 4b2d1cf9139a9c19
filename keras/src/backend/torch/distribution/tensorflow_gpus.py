"""TensorFlow kept off the GPUs of a job's processes.

Under a launcher on CUDA each process drives one GPU through torch. If
anything imports TensorFlow too (KerasHub's tokenizers, TensorBoard,
tf.data), TensorFlow's first op takes nearly all the memory of every GPU it
sees, from every rank. `keep_off_gpus` hides the GPUs from TensorFlow
before it can run an op: at once if it is imported already, else right
after its import. The process's own tensors stay on its GPU; tf.data
pipelines run on the CPU, as they do under Keras's other backends.
"""

import importlib.abc
import importlib.util
import sys
import warnings

# The graft's loader wrapper. (The graft module runs a second time under
# this name; its `install` finds its finder already in place: this module
# is only importable through it.)
from keras.src.backend.torch.distribution_graft import RunAfterLoader


def keep_off_gpus():
    """Hides the GPUs from TensorFlow now, or as soon as it is imported."""
    tensorflow = sys.modules.get("tensorflow")
    if tensorflow is not None:
        hide_gpus(tensorflow)
    elif not any(isinstance(f, _TensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _TensorFlowImport())


def hide_gpus(tensorflow):
    """`tf.config.set_visible_devices([], "GPU")`; a warning naming the
    fix when TensorFlow has already run on them."""
    try:
        tensorflow.config.set_visible_devices([], "GPU")
    except RuntimeError as error:  # TensorFlow ran ops before Keras came.
        warnings.warn(
            f"TensorFlow already runs on this process's GPUs ({error}); it "
            "may hold memory on every GPU of the host. Import keras before "
            "TensorFlow runs anything, or call "
            'tf.config.set_visible_devices([], "GPU") first thing.',
            stacklevel=2,
        )


class _TensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` as the other finders do, once, and hides the GPUs
    right after its module has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = RunAfterLoader(spec.loader, [hide_gpus])
        return spec
