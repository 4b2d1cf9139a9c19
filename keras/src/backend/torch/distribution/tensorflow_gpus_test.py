"""TensorFlow sees no GPU in a process of a job on CUDA, however it comes
to be imported; elsewhere it is left alone."""

import importlib.util
import os
import shutil
import tempfile
import unittest

from keras.src import testing
from keras.src.testing import emulated_cuda

# A stand-in `tensorflow` package that records what it is told.
FAKE_TENSORFLOW = '''
class config:
    told = []

    @staticmethod
    def set_visible_devices(devices, device_type=None):
        config.told.append((list(devices), device_type))
'''

AFTER_KERAS = """
import keras
import tensorflow
print(tensorflow.config.told)
"""

BEFORE_KERAS = """
import tensorflow
told_before = list(tensorflow.config.told)
import keras
print(told_before, tensorflow.config.told)
"""


class TensorFlowGpusTest(testing.TestCase):
    def run_with_fake_tensorflow(self, code, **environ):
        packages = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, packages)
        os.makedirs(os.path.join(packages, "tensorflow"))
        init = os.path.join(packages, "tensorflow", "__init__.py")
        with open(init, "w") as f:
            f.write(FAKE_TENSORFLOW)
        result = emulated_cuda.run_script(code, PYTHONPATH=packages, **environ)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout.splitlines()[-1]

    def test_imported_after_keras_under_a_launcher(self):
        told = self.run_with_fake_tensorflow(AFTER_KERAS, LOCAL_RANK="1")
        self.assertEqual(told, "[([], 'GPU')]")

    def test_imported_before_keras_under_a_launcher(self):
        told = self.run_with_fake_tensorflow(BEFORE_KERAS, LOCAL_RANK="1")
        self.assertEqual(told, "[] [([], 'GPU')]")

    def test_left_alone_without_a_launcher(self):
        self.assertEqual(self.run_with_fake_tensorflow(AFTER_KERAS), "[]")

    def test_real_tensorflow_imports_without_its_gpus(self):
        if importlib.util.find_spec("tensorflow") is None:
            raise unittest.SkipTest("TensorFlow is not installed")
        # On a host without GPUs the visible devices are the CPU's either
        # way; what TensorFlow was told shows in its context's list (empty
        # until `set_visible_devices` is called: measured without a
        # launcher).
        code = """
            import keras
            import tensorflow as tf
            from tensorflow.python.eager import context
            told = context.context()._visible_device_list
            print([device.device_type for device in told])
            """
        result = emulated_cuda.run_script(code, timeout=300, LOCAL_RANK="1")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.splitlines()[-1], "['CPU']")
        self.assertNotIn("already runs", result.stderr)
