"""Companion of `keras/src/callbacks/callback_list.py`.

Keras's torch backend hands batch-end callbacks to a thread pool. Their
logs are converted with `convert_to_numpy`, which gathers DTensors: a
collective. Run on another thread, it interleaves with the training
thread's collectives in a different order on each rank, and the job
deadlocks. Upstream, callbacks run in the training thread whenever a
distribution is set.
"""

from keras.src.backend.common import global_state
from keras.src.backend.torch.keras_edits import edit


def _configure_async_dispatch(upstream):
    def configure_async_dispatch(self, callbacks):
        """Stands for `CallbackList._configure_async_dispatch`."""
        upstream(self, callbacks)
        if global_state.get_global_attribute("distribution") is not None:
            self._async_train = False
            self._async_test = False
            self._async_predict = False

    return configure_async_dispatch


def apply(callback_list_module):
    edit(
        callback_list_module.CallbackList,
        "_configure_async_dispatch",
        _configure_async_dispatch,
    )
