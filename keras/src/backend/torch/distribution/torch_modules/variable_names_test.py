import torch

import keras
from keras.src import testing


class TorchModuleWrapperTest(testing.TestCase):
    def test_variables_are_named_after_parameters(self):
        module = torch.nn.Sequential(
            torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)
        )
        wrapper = keras.layers.TorchModuleWrapper(module, name="encoder")
        self.assertEqual(
            [v.path for v in wrapper.variables],
            [
                "encoder/0/weight",
                "encoder/0/bias",
                "encoder/2/weight",
                "encoder/2/bias",
            ],
        )
        # Each variable still wraps the module's own parameter.
        for variable, parameter in zip(wrapper.variables, module.parameters()):
            self.assertIs(variable.value, parameter)

    def test_frozen_parameters_stay_frozen(self):
        module = torch.nn.Linear(3, 4)
        module.bias.requires_grad_(False)
        wrapper = keras.layers.TorchModuleWrapper(module, name="frozen")
        self.assertEqual(
            [(v.name, v.trainable) for v in wrapper.variables],
            [("weight", True), ("bias", False)],
        )
