"""Every Keras internal this project relies on, in one place.

On a Keras upgrade, this file is the review: run `internals_test.py`,
which resolves every entry below against the installed version, then read
the companion named beside each replaced entry. torch's internals are
listed in `../torch_edits/internals.py`.
"""

import importlib.metadata
import warnings

from packaging.specifiers import SpecifierSet

from keras.src.backend.torch import torch_edits
from keras.src.backend.torch.torch_edits import internals as torch_internals

KERAS_CHECKED_VERSIONS = ("3.15.1", "3.16.0.dev2026102704")

# Keras 3.16 moved the torch backend's `core`, `nn` and `numpy` modules into
# `ops/`. Entries name the Keras series they hold for ("3.15", "3.16"), or
# None for both.
CORE = {"3.15": "keras.src.backend.torch.core"}
CORE["3.16"] = "keras.src.backend.torch.ops.core"
NN = {"3.15": "keras.src.backend.torch.nn"}
NN["3.16"] = "keras.src.backend.torch.ops.nn"
NUMPY = {"3.15": "keras.src.backend.torch.numpy"}
NUMPY["3.16"] = "keras.src.backend.torch.ops.numpy"
TRAINER = "keras.src.backend.torch.trainer"
TRAINER_CLASS = {"3.15": "TorchTrainer", "3.16": "Trainer"}


def _in_both(module_by_series, attribute, companion):
    return tuple(
        (module, attribute, companion, series)
        for series, module in module_by_series.items()
    )


def _trainer(attribute, series=None):
    names = (
        TRAINER_CLASS.items()
        if series is None
        else [(series, TRAINER_CLASS[series])]
    )
    return tuple(
        (TRAINER, f"{name}.{attribute}", "torch_trainer", each)
        for each, name in names
    )


# Keras attributes that a companion module replaces or sets, exactly the
# changes `keras_edits.edit` and `set_attribute` record (the test compares
# both ways): (module, attribute, companion in keras_edits, series).
KERAS_REPLACED = (
    ("keras.src.backend", "distribution_lib", "backend_init", None),
    ("keras.src.backend.torch", "distribution_lib", "backend_init", None),
    *_in_both(CORE, "Variable._initialize", "torch_core"),
    *_in_both(CORE, "Variable._direct_assign", "torch_core"),
    *_in_both(CORE, "Variable.value", "torch_core"),
    *_in_both(CORE, "convert_to_numpy", "torch_core"),
    *_in_both(CORE, "slice_update", "torch_core"),
    *_in_both(CORE, "remat", "torch_core"),
    *_in_both(CORE, "while_loop", "torch_core"),
    *_in_both(CORE, "Variable._convert_to_tensor", "torch_core"),
    # Constants filled block by block; Keras 3.16's own layout there is
    # not used.
    *_in_both(CORE, "Variable._initialize_with_initializer", "torch_core"),
    *_in_both(NN, "dot_product_attention", "torch_nn"),
    *_in_both(NN, "sparse_categorical_crossentropy", "torch_nn"),
    # Keras 3.16 skips this check under torch.compile itself.
    (NN["3.15"], "_can_use_flash_attention", "torch_nn", "3.15"),
    *_in_both(NUMPY, "take", "torch_numpy"),
    *_in_both(NUMPY, "take_along_axis", "torch_numpy"),
    *_in_both(NUMPY, "matmul", "torch_numpy"),
    *_in_both(NUMPY, "einsum", "torch_numpy"),
    *_in_both(NUMPY, "argmax", "torch_numpy"),
    *_in_both(NUMPY, "argmin", "torch_numpy"),
    (
        "keras.src.backend.torch.optimizers.torch_adam",
        "Adam._parallel_update_step",
        "torch_adam",
        None,
    ),
    (
        "keras.src.backend.torch.random",
        "categorical",
        "torch_random",
        None,
    ),
    *_trainer("make_train_function"),
    *_trainer("make_test_function"),
    *_trainer("make_predict_function"),
    *_trainer("_should_torch_compile", "3.15"),
    # Keras 3.16's own distribution in its trainer, switched off: compile
    # choice, DDP wrapping (also with no distribution set), metric
    # all-reduce, per-process batches and per-process predictions.
    *_trainer("_use_torch_compile", "3.16"),
    *_trainer("_initialize_ddp", "3.16"),
    *_trainer("get_metrics_result", "3.16"),
    (TRAINER, "_distribute_data", "torch_trainer", "3.16"),
    (TRAINER, "_gather_non_batch_axes", "torch_trainer", "3.16"),
    (
        TRAINER,
        "TorchEpochIterator._get_iterator",
        "torch_trainer",
        "3.16",
    ),
    (
        "keras.src.callbacks.csv_logger",
        "CSVLogger.on_train_begin",
        "csv_logger",
        None,
    ),
    (
        "keras.src.callbacks.csv_logger",
        "CSVLogger.on_epoch_end",
        "csv_logger",
        None,
    ),
    (
        "keras.src.callbacks.csv_logger",
        "CSVLogger.on_train_end",
        "csv_logger",
        None,
    ),
    (
        "keras.src.distribution.distribution_lib",
        "TensorLayout._validate_axes",
        "distribution_api",
        None,
    ),
    (
        "keras.src.distribution.distribution_lib",
        "LayoutMap.__getitem__",
        "distribution_api",
        None,
    ),
    (
        "keras.src.distribution.distribution_lib",
        "set_distribution",
        "distribution_api",
        None,
    ),
    # Keras 3.16's per-process sharding in its data adapters, switched off.
    (
        "keras.src.distribution.distribution_lib",
        "Distribution.num_data_shards",
        "distribution_api",
        "3.16",
    ),
    (
        "keras.src.distribution.distribution_lib",
        "Distribution.data_shard_id",
        "distribution_api",
        "3.16",
    ),
    (
        "keras.src.optimizers.loss_scale_optimizer",
        "LossScaleOptimizer._common_apply",
        "loss_scale_optimizer",
        None,
    ),
    (
        "keras.src.trainers.data_adapters",
        "get_data_adapter",
        "data_adapters",
        None,
    ),
    (
        "keras.src.trainers.data_adapters.py_dataset_adapter",
        "get_pool_class",
        "py_dataset_adapter",
        None,
    ),
    ("keras.src.utils.io_utils", "print_msg", "io_utils", None),
    (
        "keras.src.utils.python_utils",
        "pythonify_logs",
        "python_utils",
        None,
    ),
    (
        "keras.src.layers.layer",
        "Layer._assert_input_compatibility",
        "layer",
        None,
    ),
    ("keras.src.layers.layer", "Layer.__call__", "layer", None),
    (
        "keras.src.callbacks.callback_list",
        "CallbackList._configure_async_dispatch",
        "callback_list",
        None,
    ),
    *(
        (
            "keras.src.callbacks.callback_list",
            f"CallbackList.{hook}",
            "callback_list",
            None,
        )
        for hook in (
            "on_train_batch_end",
            "on_epoch_end",
            "on_test_batch_end",
            "on_predict_batch_end",
        )
    ),
    (
        "keras.src.utils.summary_utils",
        "print_summary",
        "summary_utils",
        None,
    ),
    ("keras.src.saving.saving_lib", "save_model", "saving_lib", None),
    ("keras.src.saving.saving_lib", "save_weights_only", "saving_lib", None),
    ("keras.src.saving.saving_lib", "load_model", "saving_lib", None),
    ("keras.src.saving.saving_lib", "load_weights_only", "saving_lib", None),
    (
        "keras.src.saving.saving_lib",
        "H5IOStore.__getitem__",
        "saving_lib",
        None,
    ),
    (
        "keras.src.callbacks.backup_and_restore",
        "BackupAndRestore._save_model",
        "backup_and_restore",
        None,
    ),
    (
        "keras.src.callbacks.backup_and_restore",
        "BackupAndRestore.on_train_end",
        "backup_and_restore",
        None,
    ),
    (
        "keras.src.utils.torch_utils",
        "TorchModuleWrapper._track_module_parameters",
        "torch_utils",
        None,
    ),
    (
        "keras.src.utils.torch_utils",
        "TorchModuleWrapper.call",
        "torch_utils",
        None,
    ),
    (
        "keras.src.utils.torch_utils",
        "TorchModuleWrapper.save_own_variables",
        "torch_utils",
        None,
    ),
    (
        "keras.src.utils.torch_utils",
        "TorchModuleWrapper.load_own_variables",
        "torch_utils",
        None,
    ),
)

# Keras 3.16 enters its own DTensor promotion (`KerasDTensorPromotionMode`,
# a `TorchDispatchMode`) from `set_distribution` only when the backend's
# `distribution_lib` has these; ours has neither, so it stays off.
KERAS_PROMOTION_HOOKS = (
    "activate_dtensor_promotion",
    "deactivate_dtensor_promotion",
)
# What Keras 3.16 imports from the backend's `distribution_lib` by name.
KERAS_IMPORTS_FROM_DISTRIBUTION_LIB = (
    "_to_backend_mesh",
    "distribute_data_input",
)

KERAS_USED = (
    # The reference that keras.distribution's functions call through.
    ("keras.src.distribution.distribution_lib", "distribution_lib"),
    ("keras.src.backend.common.global_state", "get_global_attribute"),
    ("keras.src.backend.config", "backend"),
    # The torch backend's conversions, called by `variables`.
    (CORE["3.15"], "convert_to_tensor", "3.15"),
    (CORE["3.16"], "convert_to_tensor", "3.16"),
    (CORE["3.15"], "to_torch_dtype", "3.15"),
    (CORE["3.16"], "to_torch_dtype", "3.16"),
    (CORE["3.15"], "get_device", "3.15"),
    (CORE["3.16"], "get_device", "3.16"),
    # Called by the train/test/predict functions that the trainer wraps.
    (TRAINER, "TorchTrainer.train_step", "3.15"),
    (TRAINER, "Trainer.train_step", "3.16"),
    # 3.16's train_step takes gradients by `torch.autograd.grad` unless
    # the model runs eagerly (see `steps/route.py`); its base trainer's
    # metrics results are those of 3.15.
    ("keras.src.trainers.trainer", "Trainer.run_eagerly", "3.15"),
    ("keras.src.trainers.trainer", "BaseTrainer.run_eagerly", "3.16"),
    (
        "keras.src.trainers.trainer",
        "BaseTrainer.get_metrics_result",
        "3.16",
    ),
    (
        "keras.src.backend.common.variables",
        "Variable._initialize_with_initializer",
    ),
    # Constant initializers, told apart, and a `Constant`'s `value`
    # (`variables.constant_of`; `variables_test` reads it).
    ("keras.src.initializers.constant_initializers", "Zeros"),
    ("keras.src.initializers.constant_initializers", "Ones"),
    ("keras.src.initializers.constant_initializers", "Constant"),
    # Local replicas: a model's `call` looked up on the instance (replaced
    # there during a step), its state, and its outputs' masks.
    ("keras.src.ops.operation", "Operation.__call__"),
    ("keras.src.layers.layer", "Layer.metrics_variables"),
    ("keras.src.backend.common.variables", "Variable._maybe_autocast"),
    ("keras.src.backend.common.masking", "get_keras_mask"),
    ("keras.src.backend.common.masking", "set_keras_mask"),
    ("keras.src.layers.layer", "Layer._open_name_scope"),
    # The path a wrapped module's variables take; layers in a model.
    ("keras.src.backend.common.name_scope", "current_path"),
    ("keras.src.layers.layer", "Layer._flatten_layers"),
    ("keras.src.layers.layer", "Layer._track_variable"),
    # Layer calls that keep DTensors (`steps/direct_calls.py`).
    ("keras.src.backend.common.symbolic_scope", "in_symbolic_scope"),
    ("keras.src.backend.common.stateless_scope", "in_stateless_scope"),
    ("keras.src.trainers.data_adapters.array_data_adapter", "ArrayDataAdapter"),
    (
        "keras.src.trainers.data_adapters.array_data_adapter",
        "can_convert_arrays",
    ),
    # Rebuilt with rank 0's order when the adapter's `_shuffle` is set.
    (
        "keras.src.trainers.data_adapters.array_data_adapter",
        "ArrayDataAdapter.get_torch_dataloader",
    ),
    (
        "keras.src.distribution.distribution_lib",
        "Distribution.auto_shard_dataset",
    ),
    ("keras.src.utils.rng_utils", "get_random_seed"),
    ("keras.src.utils.rng_utils", "set_random_seed"),
    ("keras.src.testing", "TestCase"),
    # Datasets split across processes: an adapter's batches are replaced
    # per instance (tf.data, and every input with auto_shard_dataset=False).
    ("keras.src.trainers.data_adapters", "is_tf_dataset"),
    ("keras.src.trainers.data_adapters", "is_torch_dataloader"),
    (
        "keras.src.trainers.data_adapters.tf_dataset_adapter",
        "TFDatasetAdapter.get_tf_dataset",
    ),
    (
        "keras.src.trainers.data_adapters.data_adapter",
        "DataAdapter.get_torch_dataloader",
    ),
    (
        "keras.src.trainers.data_adapters.data_adapter",
        "DataAdapter.num_batches",
    ),
    # A simulated step builds what `fit` builds before its first step;
    # a model built for planning draws no random numbers.
    ("keras.src.trainers.trainer", "Trainer._symbolic_build", "3.15"),
    ("keras.src.trainers.trainer", "BaseTrainer._symbolic_build", "3.16"),
    ("keras.src.backend.torch.random", "torch_seed_generator"),
    # The Adam update reads the optimizer's slots by variable index.
    (
        "keras.src.optimizers.base_optimizer",
        "BaseOptimizer._get_variable_index",
    ),
    # A loss on each rank's rows (`steps/row_loss.py`): the step methods it
    # replaces on a model instance or calls, defined in these modules, and
    # the loss wrapper whose function it reads. The functions it names in
    # `row_loss.PER_SAMPLE` are checked by `internals_test`.
    *(
        ("keras.src.trainers.trainer", f"{cls}.{method}", series)
        for series, cls in (("3.15", "Trainer"), ("3.16", "BaseTrainer"))
        for method in ("_compute_loss", "compute_loss", "compute_metrics")
    ),
    ("keras.src.losses.losses", "LossFunctionWrapper"),
    # A recomputation's autocast scope (`distribution/recompute.py`).
    ("keras.src.backend.common.variables", "AutocastScope"),
    ("keras.src.backend.common.variables", "get_autocast_scope"),
    # Dynamic loss scaling's steps (`optimizers/loss_scaling.py`).
    (
        "keras.src.optimizers.loss_scale_optimizer",
        "LossScaleOptimizer._stateful_handle_non_finite_grads",
    ),
    (
        "keras.src.optimizers.loss_scale_optimizer",
        "LossScaleOptimizer._overwrite_variable_with_gradient",
    ),
)

# Checkpoints: the walk over what a save writes (the order and names of a
# `.weights.h5` file), the store class it checks for, and the HDF5 read.
KERAS_SAVING_USED = (
    ("keras.src.saving.saving_lib", "_save_state"),
    ("keras.src.saving.saving_lib", "H5IOStore"),
    ("keras.src.saving.saving_lib", "safe_get_h5_dataset"),
    ("keras.src.utils.file_utils", "is_remote_path"),
    ("keras.src.utils.file_utils", "exists"),
    ("keras.src.utils.file_utils", "makedirs"),
    ("keras.src.utils.file_utils", "copy"),
    ("keras.src.utils.file_utils", "File"),
)
# Instance attributes read; the test checks them on fresh instances.
# A LayoutMap's keys and layouts, and a ModelParallel's LayoutMap (the
# layout report, `describe`):
LAYOUT_MAP_ATTRIBUTES = ("_layout_map",)
MODEL_PARALLEL_ATTRIBUTES = ("_layout_map",)
# Set by `Adam.build` (`_velocity_hats` with amsgrad); read by
# `optimizers/in_place_adam.py`.
ADAM_ATTRIBUTES = (
    "_momentums",
    "_velocities",
    "_velocity_hats",
    "iterations",
    "beta_1",
    "beta_2",
    "epsilon",
    "amsgrad",
)
# Set by `LossScaleOptimizer.__init__` and `build`; read by
# `optimizers/loss_scaling.py`.
LOSS_SCALE_OPTIMIZER_ATTRIBUTES = (
    "inner_optimizer",
    "dynamic_scale",
    "step_counter",
    "dynamic_growth_steps",
    "_trainable_variables",
)
# Read by `steps/row_loss.py`: a compiled model's loss, metrics and loss
# tracker (the tracker is replaced on the instance during a step), the
# built compiled loss's flat losses, and a loss wrapper's function.
TRAINER_ATTRIBUTES = ("_compile_loss", "_compile_metrics", "_loss_tracker")
COMPILE_LOSS_ATTRIBUTES = ("_flat_losses",)
LOSS_WRAPPER_ATTRIBUTES = ("fn", "_fn_kwargs", "reduction")
# What a torch parallel style takes and gives (a wrapped module's inputs
# and outputs are laid out to match; `torch_modules/local_styles.py` tells
# the default styles apart by them):
PARALLEL_STYLE_ATTRIBUTES = (
    "input_layouts",
    "output_layouts",
    "use_local_output",
)
# A module's forward hooks, where `parallelize_module` registers a style's:
# wrapped to step aside in steps on local shards (`local_styles.py`).
TORCH_MODULE_ATTRIBUTES = ("_forward_pre_hooks", "_forward_hooks")
# The open group of a weights store (partial reads):
H5_IO_STORE_ATTRIBUTES = ("_h5_entry_group",)
# What BackupAndRestore writes where (rank 0 writes it):
BACKUP_AND_RESTORE_ATTRIBUTES = (
    "backup_dir",
    "double_checkpoint",
    "_weights_path",
    "_prev_weights_path",
    "_training_metadata_path",
    "_prev_training_metadata_path",
    "_current_epoch",
    "_last_batch_seen",
)

# KerasHub attributes that a companion replaces (KerasHub is optional;
# checked against keras-hub 0.32.0 and keras-hub-nightly
# 0.33.0.dev202610250352), as in `KERAS_REPLACED`, for every series.
KERAS_HUB_REPLACED = (
    (
        "keras_hub.src.models.causal_lm",
        "CausalLM.make_generate_function",
        "keras_hub_causal_lm",
        None,
    ),
)

# TensorFlow (optional: tf.data input), checked against 2.20.0.
TENSORFLOW_USED = (
    # Keras's own test for a batched dataset.
    (
        "tensorflow.python.data.experimental.ops.distribute",
        "compute_batch_size",
    ),
)

# The names the `keras` package is published under.
KERAS_DISTRIBUTIONS = ("keras", "keras-nightly")


def installed_keras_version():
    for name in KERAS_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def keras_series(version=None):
    """`"3.15"` or `"3.16"`: the series of the installed Keras."""
    version = version or installed_keras_version()
    return ".".join(version.split(".")[:2])


def for_installed_keras(entries):
    """The entries that hold for the installed Keras: those of its series,
    and those of every series; the series element dropped."""
    series = keras_series()
    selected = []
    for entry in entries:
        *fields, entry_series = entry
        if entry_series is None or entry_series == series:
            selected.append(tuple(fields))
    return selected


def with_series(entries):
    """`(module, attribute)` entries given a series of None (every series),
    as `for_installed_keras` takes them; three-element ones keep theirs."""
    return [e if len(e) == 3 else e + (None,) for e in entries]


def resolve(module_name, attribute):
    """Returns `module_name.attribute`, following dots in `attribute`."""
    return torch_edits.resolve(module_name, attribute)


def supported_keras_range():
    """The Keras version range this project was installed with, or None."""
    return torch_internals.declared_range("keras")


def is_supported_keras(version, supported_range):
    return SpecifierSet(supported_range).contains(version, prereleases=True)


_warned_untested_keras = []


def warn_if_untested_keras():
    """Warns once when the installed Keras is outside the supported range."""
    supported_range = supported_keras_range()
    version = installed_keras_version()
    if _warned_untested_keras or not supported_range or version is None:
        return
    if not is_supported_keras(version, supported_range):
        _warned_untested_keras.append(version)
        warnings.warn(
            f"keras-torch-distribution supports keras{supported_range} but "
            f"keras {version} is installed. It may work; if it does not, "
            f"install a Keras in {supported_range}.",
            stacklevel=2,
        )
