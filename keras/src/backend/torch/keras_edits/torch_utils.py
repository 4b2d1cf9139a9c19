"""Companion of `keras/src/utils/torch_utils.py`.

Keras 3.15 wraps each parameter of a `TorchModuleWrapper` in a variable named
`variable`, `variable_1`, ... outside any name scope, so no LayoutMap key can
select one. Upstream, `_track_module_parameters` gives each variable the
path of its PyTorch parameter under the wrapper: parameter `0.weight` of
wrapper `encoder` becomes `encoder/0/weight`, which PyTorch spells
`encoder.0.weight`. (Keras's torch layers key their parameters by variable
path and PyTorch forbids `.` in such keys, so `/` separates the levels.)
"""

import contextlib

from keras.src.backend.torch.keras_edits import edit


def _track_module_parameters(self):
    """Stands for `TorchModuleWrapper._track_module_parameters`."""
    from keras.src import backend

    with self._open_name_scope():
        for name, param in self.module.named_parameters():
            *scopes, leaf = name.split(".")
            with contextlib.ExitStack() as stack:
                for scope in scopes:
                    stack.enter_context(backend.name_scope(scope))
                # The variable wraps the module's own parameter object.
                variable = backend.Variable(
                    initializer=param, trainable=param.requires_grad, name=leaf
                )
            self._track_variable(variable)
    self.built = True


def apply(torch_utils_module):
    edit(
        torch_utils_module.TorchModuleWrapper,
        "_track_module_parameters",
        lambda upstream: _track_module_parameters,
    )
