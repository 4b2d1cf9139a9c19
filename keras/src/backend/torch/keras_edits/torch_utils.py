"""Companion of `keras/src/utils/torch_utils.py`.

Keras 3.15 wraps each parameter of a `TorchModuleWrapper` in a variable named
`variable`, `variable_1`, ... outside any name scope, so no LayoutMap key can
select one. Upstream, `_track_module_parameters` gives each variable the
path of its PyTorch parameter under the wrapper: parameter `0.weight` of
wrapper `encoder` becomes `encoder/0/weight`, which PyTorch spells
`encoder.0.weight`. (Keras's torch layers key their parameters by variable
path and PyTorch forbids `.` in such keys, so `/` separates the levels.)

Under `ModelParallel`, the LayoutMap also lays the module out, through
torch's parallel styles where it can (see `torch_module_parallel`): the
variables are made accordingly, and `call` runs the module that way.
"""

import contextlib

from keras.src.backend.torch.keras_edits import edit


def _track_module_parameters(self):
    """Stands for `TorchModuleWrapper._track_module_parameters`."""
    from keras.src import backend
    from keras.src.backend.torch import torch_module_parallel as tmp

    with self._open_name_scope():
        mode, styles = _mode(self), None
        if mode[0] == tmp.STYLES:
            styles = tmp.ParallelStyles(self, _distribution(), *mode[1:])
        for name, param in list(self.module.named_parameters()):
            *scopes, leaf = name.split(".")
            if styles is not None:
                initial = styles.initial_value(param)
            elif mode[0] == tmp.DTENSOR:
                initial = param.detach()  # Laid out as the map says.
            else:
                initial = param  # The variable wraps the parameter itself.
            with contextlib.ExitStack() as stack:
                for scope in scopes:
                    stack.enter_context(backend.name_scope(scope))
                variable = backend.Variable(
                    initializer=initial,
                    trainable=param.requires_grad,
                    name=leaf,
                )
            if styles is not None:
                styles.track(name, variable, param)
            self._track_variable(variable)
    if mode[0] == tmp.DTENSOR:
        tmp.use_variable_values(self)
    names = [name for name, _ in self.module.named_parameters()]
    # In `__dict__`: kept out of Keras's attribute tracking.
    self.__dict__["_parameter_variables"] = dict(zip(names, self.variables))
    self.__dict__["_parallel_styles"] = styles
    self.__dict__["_parallel_mode"] = mode[0]
    self.built = True


def _distribution():
    from keras.src.distribution import distribution

    return distribution()


def _mode(wrapper):
    """`(mode, plan, axis)` under the current distribution's LayoutMap;
    called in the wrapper's name scope, whose path its variables take."""
    from keras.src.backend.common.name_scope import current_path
    from keras.src.backend.torch import torch_module_parallel as tmp

    layout_map = getattr(_distribution(), "_layout_map", None)
    if layout_map is None:
        return tmp.REPLICATED, {}, None
    return tmp.mode_of(wrapper.module, current_path(), layout_map)


def _call(upstream):
    def call(self, *args, training=None, **kwargs):
        """Stands for `TorchModuleWrapper.call`: a module parallelized with
        torch's styles runs on this rank's block of the inputs."""
        styles = self.__dict__.get("_parallel_styles")
        if styles is None:
            return upstream(self, *args, training=training, **kwargs)
        self.train(training is not False)
        return styles.call(self.module, args, kwargs)

    return call


def _save_own_variables(upstream):
    def save_own_variables(self, store):
        """Stands for `TorchModuleWrapper.save_own_variables`: the same keys
        and values, each parameter given as its Keras variable (laid out
        like it; the same object in every pass of a save across processes)
        and each buffer as the module's own tensor."""
        variables = self.__dict__.get("_parameter_variables", {})
        for key, value in self.module.state_dict(keep_vars=True).items():
            store[key] = variables.get(key, value)

    return save_own_variables


def _load_own_variables(upstream):
    def load_own_variables(self, store):
        """Stands for `TorchModuleWrapper.load_own_variables`: parameters
        are assigned to their variables, each onto its layout; buffers load
        as upstream; a missing or unexpected key raises, as upstream."""
        from keras.src.backend.torch.core import convert_to_tensor

        variables = self.__dict__.get("_parameter_variables", {})
        buffers = {}
        for key in store.keys():
            key = key.decode() if isinstance(key, bytes) else key
            if key in variables:
                variables[key].assign(store[key])
            else:
                buffers[key] = convert_to_tensor(store[key])
        result = self.module.load_state_dict(buffers, strict=False)
        missing = [k for k in result.missing_keys if k not in variables]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"Loading {self.name}: the module has no state "
                f"{result.unexpected_keys}; the file has no {missing}."
            )

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
