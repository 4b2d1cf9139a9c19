"""Plain PyTorch modules in a Keras model, laid out by the same LayoutMap.

A `keras.layers.TorchModuleWrapper` under `ModelParallel` runs one of three
ways, chosen from the LayoutMap entries of its parameters (written with
PyTorch names, `encoder.0.weight`, or Keras ones, `encoder/0/weight`):

- **Parallel styles.** When every sharded parameter belongs to an
  `nn.Linear` or `nn.Embedding` whose layout a torch parallel style
  expresses (`plans.infer_parallel_style`), the module is
  parallelized with `torch.distributed.tensor.parallel` over that one mesh
  axis: column-wise then row-wise layers communicate once each way, as in
  Megatron. The styles hold their weights on the 1-D mesh of the axis;
  the Keras variables hold the same blocks on the whole mesh (the optimizer
  and the trainer see one mesh), and each call hands the module views of
  them (`torch.func.functional_call`) through which gradients reach the
  variables. The module sees this rank's rows of the batch.
- **DTensor.** When some sharded parameter has no style (a convolution, a
  weight split on both dims), every parameter becomes a DTensor laid out
  as the map says and the module runs on DTensor inputs, like Keras layers.
- **Replicated.** When no parameter is sharded, nothing changes.
"""

import contextlib

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Partial
from torch.distributed.tensor import Replicate
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import SequenceParallel
from torch.utils import _pytree

from keras.src import backend
from keras.src.backend.common.name_scope import current_path
from keras.src.backend.torch.distribution import backend_core
from keras.src.backend.torch.distribution import contraction_plan
from keras.src.backend.torch.distribution.layouts import shards
from keras.src.backend.torch.distribution.torch_modules import local_styles
from keras.src.backend.torch.distribution.torch_modules import plans
from keras.src.distribution import TensorLayout
from keras.src.distribution import distribution as current_distribution

STYLES, DTENSOR, REPLICATED = "parallel styles", "DTensor", "replicated"
STATE_ATTRIBUTE = "_torch_distribution_module"


class WrappedModuleState:
    """What a wrapper keeps, in its `__dict__` (out of Keras's attribute
    tracking): its mode, its `ParallelStyles` (styles mode) and each
    parameter's Keras variable, by PyTorch name."""

    def __init__(self, mode, styles, variables):
        self.mode, self.styles, self.variables = mode, styles, variables


def state_of(wrapper):
    """The wrapper's `WrappedModuleState`, or None before it is built."""
    return wrapper.__dict__.get(STATE_ATTRIBUTE)


def track_module_parameters(wrapper):
    """`TorchModuleWrapper._track_module_parameters`: each parameter becomes
    a Keras variable at its PyTorch path under the wrapper (parameter
    `0.weight` of wrapper `encoder` is `encoder/0/weight`; PyTorch forbids
    `.` in the keys Keras's torch layers use), laid out as the module's
    mode says."""
    with wrapper._open_name_scope():
        mode = _mode(wrapper)
        styles = None
        if mode[0] == STYLES:
            styles = ParallelStyles(wrapper, current_distribution(), *mode[1:])
        for name, param in list(wrapper.module.named_parameters()):
            *scopes, leaf = name.split(".")
            if styles is not None:
                initial = styles.initial_value(param)
            elif mode[0] == DTENSOR:
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
            wrapper._track_variable(variable)
    if mode[0] == DTENSOR:
        use_variable_values(wrapper)
    names = [name for name, _ in wrapper.module.named_parameters()]
    wrapper.__dict__[STATE_ATTRIBUTE] = WrappedModuleState(
        mode[0], styles, dict(zip(names, wrapper.variables))
    )
    wrapper.built = True


def _mode(wrapper):
    """`(mode, plan, axis)` under the current distribution's LayoutMap;
    called in the wrapper's name scope, whose path its variables take."""
    layout_map = getattr(current_distribution(), "_layout_map", None)
    if layout_map is None:
        return REPLICATED, {}, None
    return mode_of(wrapper.module, current_path(), layout_map)


def call(wrapper, args, kwargs, training, upstream):
    """`TorchModuleWrapper.call`: a module parallelized with torch's styles
    runs on this rank's block of the inputs."""
    state = state_of(wrapper)
    if state is None or state.styles is None:
        return upstream(wrapper, *args, training=training, **kwargs)
    wrapper.train(training is not False)
    return state.styles.call(wrapper.module, args, kwargs)


def save_own_variables(wrapper, store):
    """`TorchModuleWrapper.save_own_variables`: the same keys and values,
    each parameter given as its Keras variable (laid out like it; the same
    object in every pass of a save across processes) and each buffer as
    the module's own tensor."""
    variables = _variables(wrapper)
    for key, value in wrapper.module.state_dict(keep_vars=True).items():
        store[key] = variables.get(key, value)


def load_own_variables(wrapper, store):
    """`TorchModuleWrapper.load_own_variables`: parameters are assigned to
    their variables, each onto its layout; buffers load as upstream; a
    missing or unexpected key raises, as upstream."""
    variables = _variables(wrapper)
    buffers = {}
    for key in store.keys():
        key = key.decode() if isinstance(key, bytes) else key
        if key in variables:
            variables[key].assign(store[key])
        else:
            buffers[key] = backend_core.convert_to_tensor(store[key])
    result = wrapper.module.load_state_dict(buffers, strict=False)
    missing = [k for k in result.missing_keys if k not in variables]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"Loading {wrapper.name}: the module has no state "
            f"{result.unexpected_keys}; the file has no {missing}."
        )


def _variables(wrapper):
    state = state_of(wrapper)
    return {} if state is None else state.variables


def mode_of(module, module_path, layout_map):
    """How a wrapped `module` at Keras path `module_path` runs under
    `layout_map` (see the module docstring): `(mode, plan, axis)`, with the
    parallel plan and its mesh axis."""
    plan, axis = plans.parallel_plan(module, layout_map, module_path)
    styled = {
        _joined(name, leaf)
        for name in plan
        for leaf, _ in module.get_submodule(name).named_parameters()
    }
    sharded = [
        name
        for name, _ in module.named_parameters()
        if shards(layout_map[plans.submodule_path(module_path, name)])
    ]
    if not sharded:
        return REPLICATED, plan, axis
    if plan and all(name in styled for name in sharded):
        return STYLES, plan, axis
    return DTENSOR, plan, axis


def _joined(module_name, parameter_name):
    return f"{module_name}.{parameter_name}" if module_name else parameter_name


class ParallelStyles:
    """A wrapped module parallelized with torch's styles (see the module
    docstring), and the Keras variables that hold its parameters.

    Args:
        wrapper: the `TorchModuleWrapper`, its variables not yet made.
        distribution: the `ModelParallel` distribution.
        plan: `{submodule name: style}`.
        axis: the mesh axis the styles shard over.
    """

    def __init__(self, wrapper, distribution, plan, axis):
        self.keras_mesh = distribution.device_mesh
        self.mesh = self.keras_mesh.backend_mesh
        self.axis = axis
        self.batch_axis = distribution.batch_dim_name
        self.plan = plan
        self.styles = list(plan.values())
        # A column-wise last layer leaves each rank a block of its output
        # features: the global count is the layer's.
        last = wrapper.module.get_submodule(list(plan)[-1])
        self.output_features = None
        if isinstance(last, torch.nn.Linear):
            self.output_features = last.weight.shape[0]
        elif isinstance(last, torch.nn.Embedding):
            self.output_features = last.weight.shape[1]
        # Slicing a torch DeviceMesh costs about half a millisecond: the
        # styles' 1-D mesh is sliced once, not per parameter per step.
        self.axis_mesh = self.mesh[axis]
        hooks_before = local_styles.hook_keys(wrapper.module, plan)
        plans.apply_parallel_plan(wrapper.module, self.axis_mesh, plan)
        # The plan on plain blocks, for steps on local shards (None where
        # some style has no local form).
        self.local = local_styles.LocalStyles.of(
            wrapper.module, plan, self.axis_mesh, hooks_before
        )
        # Parameter name -> (Keras variable, its placement on the 1-D mesh
        # where a style made it a DTensor, else None).
        self.variables = {}

    def initial_value(self, parameter):
        """The Keras variable's value for a module parameter: its block (a
        DTensor of the styles' 1-D mesh, or a whole plain tensor), as a
        DTensor of the whole mesh sharing its storage."""
        if isinstance(parameter, DTensor):
            local, placement = parameter.to_local(), parameter.placements[0]
        else:
            local, placement = parameter.detach(), Replicate()
        value = DTensor.from_local(
            local.detach(),
            self.mesh,
            self._on_axis(placement),
            run_check=False,
            shape=parameter.shape,
            stride=parameter.stride(),
        )
        return torch.nn.Parameter(value, requires_grad=parameter.requires_grad)

    def track(self, name, variable, parameter):
        """Keeps `variable` for parameter `name` (`parameter`, as the styles
        left it); gives it the layout its optimizer slots follow."""
        axes = [None] * len(variable.shape)
        for mesh_dim, placement in enumerate(variable.value.placements):
            if isinstance(placement, Shard):
                axes[placement.dim] = self.keras_mesh.axis_names[mesh_dim]
        variable._layout = TensorLayout(axes, self.keras_mesh)
        placement = None
        if isinstance(parameter, DTensor):
            placement = parameter.placements[0]
        self.variables[name] = (variable, placement)

    def call(self, module, args, kwargs):
        """Runs `module` on this rank's rows of the inputs, with views of
        the variables; returns outputs on the whole mesh. In a step on
        local shards, inputs, variables and outputs are plain blocks."""
        values = {name: v.value for name, (v, _) in self.variables.items()}
        if not any(isinstance(v, DTensor) for v in values.values()):
            return self.local.call(module, values, args, kwargs)
        contraction_plan.styled_mesh(self.axis_mesh, self.local is not None)
        rows = []
        args, kwargs = _pytree.tree_map(
            lambda x: self._local_input(x, rows), (args, kwargs)
        )
        batch_dim = self.mesh.mesh_dim_names.index(self.batch_axis)
        batch_split = any(isinstance(p[batch_dim], Shard) for _, p in rows)
        views = {
            name: self._view(variable, placement, batch_split)
            for name, (variable, placement) in self.variables.items()
        }
        outputs = torch.func.functional_call(module, views, args, kwargs)
        return _pytree.tree_map(lambda y: self._global_output(y, rows), outputs)

    def _on_axis(self, placement):
        placements = [Replicate()] * self.mesh.ndim
        placements[self.mesh.mesh_dim_names.index(self.axis)] = placement
        return tuple(placements)

    def _view(self, variable, placement, batch_split):
        """What the module computes with: the variable's block, as a DTensor
        of the 1-D mesh where a style made the parameter one (`placement`),
        plain otherwise. When the batch is split (`batch_split`), its
        gradient is a partial sum over the batch axis, the module seeing
        part of the batch; the trainer reduces it with the others."""
        value = variable.value
        if placement is not None:
            styled = self._on_axis(placement)
            if value.placements != styled:
                # Read gathered over the batch axis, which is the styles'
                # axis too (a 1-D mesh): the style takes its block of it.
                value = value.redistribute(self.mesh, styled)
        names = self.mesh.mesh_dim_names
        grad_placements = [
            Partial() if batch_split and names[i] == self.batch_axis else p
            for i, p in enumerate(value.placements)
        ]
        local = value.to_local(grad_placements=grad_placements)
        if placement is None:
            return local
        return DTensor.from_local(
            local,
            self.axis_mesh,
            (placement,),
            run_check=False,
            shape=value.shape,
            stride=value.stride(),
        )

    def _local_input(self, x, rows):
        """This rank's block of input `x`: its batch rows, laid out along
        the style axis as the first style takes its input."""
        if not isinstance(x, torch.Tensor):
            return x
        if not isinstance(x, DTensor):  # The whole value, on every rank.
            replicated = [Replicate()] * self.mesh.ndim
            x = DTensor.from_local(x, self.mesh, replicated, run_check=False)
        wanted = _normalized(_input_placement(self.styles[0]), x.ndim)
        names = self.mesh.mesh_dim_names
        placements = [
            x.placements[i] if names[i] == self.batch_axis else Replicate()
            for i in range(self.mesh.ndim)
        ]
        placements[names.index(self.axis)] = wanted
        if tuple(placements) != tuple(x.placements):
            x = x.redistribute(self.mesh, placements)
        rows.append((x.shape, x.placements))
        return x.to_local()

    def _global_output(self, y, rows):
        """The DTensor of which `y` is this rank's block: rows as the input
        had them, features as the last style leaves them."""
        if not isinstance(y, torch.Tensor) or isinstance(y, DTensor):
            return y
        names = self.mesh.mesh_dim_names
        shape, batch_placement = list(y.shape), Replicate()
        if rows:
            input_shape, input_placements = rows[0]
            shape[0] = input_shape[0]
            batch_placement = input_placements[names.index(self.batch_axis)]
        placements = [
            batch_placement if name == self.batch_axis else Replicate()
            for name in names
        ]
        placement = _normalized(_output_placement(self.styles[-1]), y.ndim)
        placements[names.index(self.axis)] = placement
        if isinstance(placement, Shard) and placement.dim == y.ndim - 1:
            shape[-1] = self.output_features
        elif isinstance(placement, Shard):  # A sequence, as it came in.
            shape[placement.dim] = input_shape[placement.dim]
        return DTensor.from_local(
            y,
            self.mesh,
            placements,
            run_check=False,
            shape=tuple(shape),
            stride=torch.empty(shape, device="meta").stride(),
        )


def notes(wrapper):
    """`{id(variable): how it is laid out}` for a wrapper's variables, for
    `describe`: the parallel style of its submodule, or plain DTensor."""
    state = state_of(wrapper)
    if state is None:
        return {}
    if state.mode == DTENSOR:
        return {id(v): "DTensor, no parallel style" for v in wrapper.variables}
    styles = state.styles
    if styles is None:
        return {}
    found = {}
    for name, (variable, _) in styles.variables.items():
        owner = name.rpartition(".")[0]
        style = styles.plan.get(owner)
        found[id(variable)] = type(style).__name__ if style else "replicated"
    return found


def _input_placement(style):
    """How a style takes its input along its mesh axis."""
    if isinstance(style, SequenceParallel):
        return style.sequence_sharding[0]
    return style.input_layouts[0]


def _output_placement(style):
    """How a style leaves its output along its mesh axis."""
    if isinstance(style, SequenceParallel):
        return style.sequence_sharding[0]
    return style.output_layouts[0]


def _normalized(placement, ndim):
    """`Shard(-1)` as `Shard(ndim - 1)`; other placements as they are."""
    if isinstance(placement, Shard) and placement.dim < 0:
        return Shard(placement.dim + ndim)
    return placement


def use_variable_values(wrapper):
    """DTensor mode: the module computes with its variables' values (laid
    out DTensors) in place of its own parameters."""
    for variable, (name, _) in zip(
        wrapper.variables, list(wrapper.module.named_parameters())
    ):
        owner, _, leaf = name.rpartition(".")
        submodule = wrapper.module.get_submodule(owner)
        submodule.register_parameter(leaf, variable.value)
