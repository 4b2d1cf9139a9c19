import importlib
import importlib.metadata
import importlib.util

import numpy as np

import keras
from keras.src import testing
from keras.src.losses import losses
from keras.src.backend.torch import distribution_graft
from keras.src.backend.torch import keras_edits
from keras.src.backend.torch.distribution.steps import row_loss
from keras.src.backend.torch.keras_edits import internals


class InternalsTest(testing.TestCase):
    def test_installed_keras_was_checked(self):
        # A new Keras fails here until this file has been reviewed (torch:
        # `torch_edits/internals_test.py`).
        self.assertIn(
            internals.installed_keras_version(),
            internals.KERAS_CHECKED_VERSIONS,
        )

    def test_every_internal_resolves(self):
        entries = internals.with_series(
            internals.KERAS_USED + internals.KERAS_SAVING_USED
        )
        entries = internals.for_installed_keras(entries)
        replaced = internals.for_installed_keras(internals.KERAS_REPLACED)
        entries += [entry[:2] for entry in replaced]
        for module_name, attribute in entries:
            internals.resolve(module_name, attribute)

    def test_instance_attributes_exist(self):
        from keras.src.saving.saving_lib import H5IOStore

        directory = self.get_temp_dir()
        callback = keras.callbacks.BackupAndRestore(directory)
        callback.set_model(keras.Sequential([keras.layers.Dense(1)]))
        callback.on_epoch_begin(0)
        for attribute in internals.BACKUP_AND_RESTORE_ATTRIBUTES:
            self.assertTrue(hasattr(callback, attribute), attribute)
        store = H5IOStore(f"{directory}/w.weights.h5", mode="w")
        for attribute in internals.H5_IO_STORE_ATTRIBUTES:
            self.assertTrue(hasattr(store, attribute), attribute)
        store.close()
        devices = keras.distribution.list_devices()
        mesh = keras.distribution.DeviceMesh((1,), ["model"], devices[:1])
        layout_map = keras.distribution.LayoutMap(mesh)
        for attribute in internals.LAYOUT_MAP_ATTRIBUTES:
            self.assertTrue(hasattr(layout_map, attribute), attribute)
        distribution = keras.distribution.ModelParallel(layout_map=layout_map)
        for attribute in internals.MODEL_PARALLEL_ATTRIBUTES:
            self.assertTrue(hasattr(distribution, attribute), attribute)
        optimizer = keras.optimizers.Adam(amsgrad=True)
        optimizer.build([keras.Variable([1.0])])
        for attribute in internals.ADAM_ATTRIBUTES:
            self.assertTrue(hasattr(optimizer, attribute), attribute)
        scaled = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD())
        scaled.build([keras.Variable([1.0])])
        for attribute in internals.LOSS_SCALE_OPTIMIZER_ATTRIBUTES:
            self.assertTrue(hasattr(scaled, attribute), attribute)
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(loss="mse")
        model.compute_loss(y=np.zeros((1, 1)), y_pred=np.zeros((1, 1)))
        for attribute in internals.TRAINER_ATTRIBUTES:
            self.assertTrue(hasattr(model, attribute), attribute)
        for attribute in internals.COMPILE_LOSS_ATTRIBUTES:
            self.assertTrue(hasattr(model._compile_loss, attribute), attribute)
        ((_, loss, _, _),) = model._compile_loss._flat_losses
        for attribute in internals.LOSS_WRAPPER_ATTRIBUTES:
            self.assertTrue(hasattr(loss, attribute), attribute)
        self.assertEqual(loss.fn.__module__, row_loss.LOSSES_MODULE)
        for name in row_loss.PER_SAMPLE:
            function = getattr(losses, name)
            self.assertEqual(function.__module__, row_loss.LOSSES_MODULE)
        for method in row_loss.KERAS_STEP_METHODS:
            module = getattr(type(model), method).__module__
            self.assertIn(module, row_loss.KERAS_TRAINER_MODULES)
        from torch.distributed.tensor.parallel import ColwiseParallel
        from torch.distributed.tensor.parallel import RowwiseParallel

        for style in (ColwiseParallel(), RowwiseParallel()):
            for attribute in internals.PARALLEL_STYLE_ATTRIBUTES:
                self.assertTrue(hasattr(style, attribute), attribute)
        import torch

        linear = torch.nn.Linear(2, 2)
        for attribute in internals.TORCH_MODULE_ATTRIBUTES:
            self.assertIsInstance(getattr(linear, attribute), dict, attribute)

    def test_every_tensorflow_internal_resolves(self):
        if importlib.util.find_spec("tensorflow") is None:
            self.skipTest("TensorFlow is not installed")
        for module_name, attribute in internals.TENSORFLOW_USED:
            internals.resolve(module_name, attribute)

    def test_replaced_internals_are_ours(self):
        from keras.src.backend.torch import distribution_lib

        replaced = internals.for_installed_keras(internals.KERAS_REPLACED)
        for module_name, attribute, _ in replaced:
            value = internals.resolve(module_name, attribute)
            if attribute == "distribution_lib":
                self.assertIs(value, distribution_lib)
            else:
                # `keras_edits.edit` keeps what it replaced.
                self.assertIsNotNone(
                    getattr(value, "upstream", None), attribute
                )

    def test_registry_is_internals_both_ways(self):
        # Importing each Keras module with a companion applies it; modules
        # of the other Keras series do not exist.
        # KerasHub's, where it is installed.
        expected = internals.for_installed_keras(internals.KERAS_REPLACED)
        for keras_module in distribution_graft.COMPANIONS:
            try:
                importlib.import_module(keras_module)
            except ModuleNotFoundError:
                continue
        if importlib.util.find_spec("keras_hub") is not None:
            expected += internals.for_installed_keras(
                internals.KERAS_HUB_REPLACED
            )
        self.assertEqual(sorted(keras_edits.REGISTRY), sorted(expected))

    def test_distribution_lib_keeps_what_keras_3_16_imports(self):
        from keras.src.backend.torch import distribution_lib

        for name in internals.KERAS_IMPORTS_FROM_DISTRIBUTION_LIB:
            self.assertTrue(hasattr(distribution_lib, name), name)
        # Keras 3.16 enters its own DTensor promotion only through these.
        for name in internals.KERAS_PROMOTION_HOOKS:
            self.assertFalse(hasattr(distribution_lib, name), name)

    def test_supported_range_is_setup_py_range(self):
        self.assertTrue(
            internals.is_supported_keras(
                "3.15.1", internals.supported_keras_range()
            )
        )
        self.assertTrue(
            internals.is_supported_keras(
                "3.16.0.dev2026102704", internals.supported_keras_range()
            )
        )
        self.assertFalse(
            internals.is_supported_keras(
                "3.17.0", internals.supported_keras_range()
            )
        )
        self.assertFalse(
            internals.is_supported_keras(
                "3.14.0", internals.supported_keras_range()
            )
        )
