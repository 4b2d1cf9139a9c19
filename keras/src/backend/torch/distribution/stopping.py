"""Ranks that stop together.

Keras's loops stop when a callback sets `model.stop_training` (or
`stop_evaluating`, `stop_predicting`) at the end of a batch or an epoch.
A callback may set it on one rank only: a time budget, a file flag, a
condition on a rank's own state. A rank that stops alone leaves the
others waiting inside their next collective until the timeout. So under
a distribution on several processes, right after the callbacks of each
batch end and epoch end, every rank learns whether any rank stops, with
one all-reduce of one number on the control group, and all stop at the
same step, or none does.
"""

from keras.src.backend.common import global_state
from keras.src.backend.torch.distribution import process_group

# The flag each loop reads after its callbacks.
TRAINING = "stop_training"
EVALUATING = "stop_evaluating"
PREDICTING = "stop_predicting"


def agree(model, flag):
    """Sets `model.<flag>` on every rank to whether any rank set it."""
    if model is None or not process_group.is_multi_process():
        return
    if global_state.get_global_attribute("distribution") is None:
        return
    stops = process_group.any_rank(bool(getattr(model, flag, False)))
    setattr(model, flag, stops)
