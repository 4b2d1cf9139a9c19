"""Companion of `keras/src/utils/torch_utils.py`.

Keras 3.15 wraps each parameter of a `TorchModuleWrapper` in a variable named
`variable`, `variable_1`, ... outside any name scope, so no LayoutMap key can
select one. Upstream, `_track_module_parameters` gives each variable the
path of its PyTorch parameter under the wrapper (`encoder/0/weight`, which
PyTorch spells `encoder.0.weight`); under `ModelParallel` the LayoutMap also
lays the module out, through torch's parallel styles where it can, and
`call` runs it that way (see `distribution/torch_modules/wrapped_modules.py`).
"""

from keras.src.backend.torch.distribution.torch_modules import wrapped_modules
from keras.src.backend.torch.keras_edits import edit


def _track_module_parameters(self):
    """Stands for `TorchModuleWrapper._track_module_parameters`."""
    wrapped_modules.track_module_parameters(self)


def _call(upstream):
    def call(self, *args, training=None, **kwargs):
        """Stands for `TorchModuleWrapper.call`."""
        return wrapped_modules.call(self, args, kwargs, training, upstream)

    return call


def _save_own_variables(upstream):
    def save_own_variables(self, store):
        """Stands for `TorchModuleWrapper.save_own_variables`."""
        wrapped_modules.save_own_variables(self, store)

    return save_own_variables


def _load_own_variables(upstream):
    def load_own_variables(self, store):
        """Stands for `TorchModuleWrapper.load_own_variables`."""
        wrapped_modules.load_own_variables(self, store)

    return load_own_variables


def apply(torch_utils_module):
    wrapper = torch_utils_module.TorchModuleWrapper
    edit(
        wrapper,
        "_track_module_parameters",
        lambda upstream: _track_module_parameters,
    )
    edit(wrapper, "call", _call)
    edit(wrapper, "save_own_variables", _save_own_variables)
    edit(wrapper, "load_own_variables", _load_own_variables)
