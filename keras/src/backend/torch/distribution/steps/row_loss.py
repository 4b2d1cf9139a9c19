"""A training step's loss on this rank's rows, where nothing needs more.

On local replicas the model's outputs are all-gathered before the loss, so
that Keras's loss and metrics run on the global batch. That gather is a
collective DDP does not have, and a point where each rank waits for the
other before backward can start.

A model compiled without metrics needs the global outputs only for its
loss, and most compiled losses do not need them there either: Keras's
per-sample losses (cross-entropies, squared errors, ...) averaged by the
"sum_over_batch_size" reduction add a term per row and divide by the
number of rows. The global loss is then the sum over ranks of each rank's
loss over its own rows times its share of the rows, `n / N`, and so is its
gradient. For such a model a training step:

- gathers nothing: the model's outputs stay on this rank's rows;
- computes Keras's own loss on this rank's rows of the outputs, targets
  and sample weights, times `n / N`, and runs backward from it: the
  gradient buckets sum the ranks' terms as they did the gathered loss's;
- sends that value in the last gradient bucket (`GradientBuckets.carry`),
  so the global loss costs no collective of its own, and hands the sum to
  Keras's loss tracker once backward has ended (its update is held until
  then). The logged loss is the global batch's, as before, up to the
  rounding of a sum taken in another order.

Anything else keeps the gathered route: compiled metrics, a model whose
`train_step`, `compute_loss`, `_compute_loss` or `compute_metrics` is not
Keras's, several outputs or losses, a loss outside `PER_SAMPLE` or with
another reduction, an axis or an ignored class, outputs with a Keras mask
(the mask rescales the weights by a count over the batch), and a rank
with no rows. Every rank decides alike: each condition depends on the
model and on global shapes. Targets or weights that are not one array of
the batch's rows are gathered for at the loss, on every rank alike.
"""

import torch

from keras.src.backend.common.masking import get_keras_mask
from keras.src.losses.losses import LossFunctionWrapper

# Keras's losses (`keras.src.losses.losses`) that reduce each row of the
# outputs to its own terms (over the last dim at most).
PER_SAMPLE = frozenset(
    (
        "binary_crossentropy",
        "binary_focal_crossentropy",
        "categorical_crossentropy",
        "categorical_focal_crossentropy",
        "categorical_hinge",
        "cosine_similarity",
        "hinge",
        "huber",
        "kl_divergence",
        "log_cosh",
        "mean_absolute_error",
        "mean_absolute_percentage_error",
        "mean_squared_error",
        "mean_squared_logarithmic_error",
        "poisson",
        "sparse_categorical_crossentropy",
        "squared_hinge",
    )
)
LOSSES_MODULE = "keras.src.losses.losses"
# The step methods a model must have from Keras for its loss to run on
# rows, and where Keras defines them (3.15 and 3.16).
KERAS_STEP_METHODS = (
    "train_step",
    "compute_loss",
    "_compute_loss",
    "compute_metrics",
)
KERAS_TRAINER_MODULES = frozenset(
    ("keras.src.trainers.trainer", "keras.src.backend.torch.trainer")
)


def separable(model):
    """Whether `model`'s training step needs nothing but Keras's compiled
    loss of one output, with a per-sample loss averaged over the batch."""
    cls = type(model)
    if not all(
        getattr(getattr(cls, name), "__module__", None) in KERAS_TRAINER_MODULES
        for name in KERAS_STEP_METHODS
    ):
        return False
    if getattr(model, "_compile_metrics", None) is not None:
        return False
    compile_loss = getattr(model, "_compile_loss", None)
    flat = getattr(compile_loss, "_flat_losses", None)
    if not flat or len(flat) != 1:
        return False
    _, loss, _, _ = flat[0]
    return _per_sample(loss)


def _per_sample(loss):
    if not isinstance(loss, LossFunctionWrapper):
        return False
    if loss.reduction != "sum_over_batch_size":
        return False
    fn = loss.fn
    kwargs = loss._fn_kwargs
    return (
        getattr(fn, "__module__", None) == LOSSES_MODULE
        and getattr(fn, "__name__", None) in PER_SAMPLE
        and kwargs.get("axis", -1) == -1
        and kwargs.get("ignore_class") is None
    )


def accepts(output, rows):
    """Whether an output of the forward pass may be left on this rank's
    rows: one tensor of two dims or more (a loss over the last dim of a
    1-D output would mix rows), unmasked, and every rank with rows."""
    return (
        isinstance(output, torch.Tensor)
        and output.ndim >= 2
        and get_keras_mask(output) is None
        and all(size > 0 for size, _ in rows)
    )


class RowLoss:
    """One training step's loss on this rank's rows, for `model`.

    During the step the model's `_compute_loss`, `compute_metrics` and loss
    tracker are this object's (`overrides`, applied by `LocalReplicas`
    with `overrides.overriding`). `LocalReplicas` hands over the forward
    pass's local output (`hold`); without one the step runs as Keras's.

    Args:
        model: the model, whose step is `separable`.
        buckets: the `GradientBuckets` that sum the step's gradients.
    """

    def __init__(self, model, buckets):
        self.model = model
        self.buckets = buckets
        self.local = None  # This rank's output, as the step has it.
        self.rows = None  # (size, offset, global rows)
        self.gather = None  # Gives the global output, differentiable.
        self.tracker = _LossTrackerStandIn(model._loss_tracker)

    def overrides(self):
        """The model's attributes during the step."""
        return {
            "_compute_loss": self._compute_loss,
            "compute_metrics": self._compute_metrics,
            "_loss_tracker": self.tracker,
        }

    def hold(self, local, rows, gather):
        """Leaves `local` on this rank's rows, `rows` being (size, offset,
        global rows); `gather(local)` would give the global output."""
        self.local, self.rows, self.gather = local, rows, gather

    def _holds(self, y_pred):
        """Whether `y_pred` is the held output: the same tensor, or a view
        of it as a whole (as module backward hooks make). Told by identity
        first: Dynamo before torch 2.13 cannot compare `data_ptr()`s, and
        breaks the compiled step's graph there; two views of one base are
        compared by address."""
        local = self.local
        if local is None or not isinstance(y_pred, torch.Tensor):
            return False
        if y_pred is local:
            return True
        base = y_pred._base
        if base is None:
            return False
        whole = y_pred.shape == local.shape and y_pred.stride() == local.stride()
        if base is local:
            return whole
        return (
            whole
            and base is local._base
            and y_pred.data_ptr() == local.data_ptr()
        )

    def _keras_loss(self, x, y, y_pred, sample_weight, training):
        return type(self.model)._compute_loss(
            self.model,
            x=x,
            y=y,
            y_pred=y_pred,
            sample_weight=sample_weight,
            training=training,
        )

    def _compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        if not self._holds(y_pred):
            return self._keras_loss(x, y, y_pred, sample_weight, training)
        size, offset, global_rows = self.rows
        if not _rows_of(y, global_rows) or not (
            sample_weight is None or _rows_of(sample_weight, global_rows)
        ):
            # Keras's loss on the global output, as on the gathered route.
            y_pred = self.gather(y_pred)
            self.local = None
            return self._keras_loss(x, y, y_pred, sample_weight, training)

        def own(value):
            return None if value is None else value[offset : offset + size]

        loss = self._keras_loss(x, own(y), y_pred, own(sample_weight), training)
        loss = loss * (size / global_rows)
        self.buckets.carry(loss)
        self.tracker.hold_next_update()
        return loss

    def _compute_metrics(self, x, y, y_pred, sample_weight=None):
        self.tracker.release(self.buckets.carried)
        return type(self.model).compute_metrics(
            self.model, x, y, y_pred, sample_weight=sample_weight
        )


def _rows_of(value, global_rows):
    """Whether `value` is one array (a tensor or NumPy's) of the batch's
    rows."""
    shape = getattr(value, "shape", None)
    return shape is not None and len(shape) > 0 and shape[0] == global_rows


class _LossTrackerStandIn:
    """Keras's loss tracker during a step whose loss runs on rows: the
    update Keras's `train_step` makes right after the loss, with this
    rank's share of it, is held until backward has summed the shares
    (`release`); everything else is the tracker's own."""

    def __init__(self, tracker):
        self.tracker = tracker
        self.holding = False
        self.held = None  # The held update's keyword arguments.

    def hold_next_update(self):
        self.holding = True

    def update_state(self, values, sample_weight=None):
        if self.holding:
            self.holding = False
            self.held = {"sample_weight": sample_weight}
            return
        self.tracker.update_state(values, sample_weight=sample_weight)

    def release(self, summed):
        """Applies the held update with `summed()`, the global loss."""
        if self.held is not None:
            held, self.held = self.held, None
            self.tracker.update_state(summed(), **held)

    def __getattr__(self, name):
        return getattr(self.tracker, name)
