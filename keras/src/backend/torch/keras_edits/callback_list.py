"""Companion of `keras/src/callbacks/callback_list.py`.

Keras's torch backend hands batch-end callbacks to a thread pool. Their
logs are converted with `convert_to_numpy`, which gathers DTensors: a
collective. Run on another thread, it interleaves with the training
thread's collectives in a different order on each rank, and the job
deadlocks. Upstream, callbacks run in the training thread whenever a
distribution is set.

Upstream, after the callbacks of each batch end and epoch end, every
rank also learns whether any rank's callbacks stopped the loop, so that
all stop at the same step (`distribution/stopping.py`).
"""

from keras.src.backend.common import global_state
from keras.src.backend.torch.distribution import stopping
from keras.src.backend.torch.keras_edits import edit

# The batch- and epoch-end hooks after which a loop reads its stop flag.
STOP_FLAG_AFTER = {
    "on_train_batch_end": stopping.TRAINING,
    "on_epoch_end": stopping.TRAINING,
    "on_test_batch_end": stopping.EVALUATING,
    "on_predict_batch_end": stopping.PREDICTING,
}


def _configure_async_dispatch(upstream):
    def configure_async_dispatch(self, callbacks):
        """Stands for `CallbackList._configure_async_dispatch`."""
        upstream(self, callbacks)
        if global_state.get_global_attribute("distribution") is not None:
            self._async_train = False
            self._async_test = False
            self._async_predict = False

    return configure_async_dispatch


def _stopping_together(flag):
    def make_replacement(upstream):
        def hook(self, *args, **kwargs):
            """Stands for the `CallbackList` hook it replaces."""
            upstream(self, *args, **kwargs)
            stopping.agree(self.model, flag)

        return hook

    make_replacement.__module__ = __name__
    return make_replacement


def apply(callback_list_module):
    callback_list = callback_list_module.CallbackList
    edit(callback_list, "_configure_async_dispatch", _configure_async_dispatch)
    for name, flag in STOP_FLAG_AFTER.items():
        edit(callback_list, name, _stopping_together(flag))
