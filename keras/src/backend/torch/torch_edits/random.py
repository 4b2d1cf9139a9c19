"""Companion of `torch/distributed/tensor/_random.py`.

Upstream, DTensor's random-number tracker would be made with the first
CUDA mesh of a distribution, after `keras.distribution.initialize` has
agreed on a seed, rather than by DTensor's first random op, which
broadcasts rank 0's generator state in the middle of a step. Every rank
seeds alike, so the tracker skips that broadcast.

Scope: `Scope.DISTRIBUTION`, on CUDA meshes only (DTensor's tracker
serves devices with a generator state per device). A mesh made without
a distribution set (`keras.distribution.distribute_tensor` on its own)
leaves torch's tracker as torch makes it.
"""

from torch.distributed.tensor import _random as dtensor_random

from keras.src.backend.torch import torch_edits
from keras.src.backend.torch.torch_edits import Scope

MODULE = "torch.distributed.tensor._random"


def make_tracker(mesh):
    """Makes DTensor's tracker for `mesh`, a CUDA mesh, if none exists yet
    and a distribution was set."""
    if not torch_edits.applied(Scope.DISTRIBUTION):
        return
    if dtensor_random._rng_tracker is not None:
        return
    tracker = dtensor_random.OffsetBasedRNGTracker(mesh, run_state_sync=False)
    torch_edits.set_attribute(
        MODULE, "_rng_tracker", tracker, __name__, Scope.DISTRIBUTION
    )


# Made with a mesh (`make_tracker`), not replaced when the scope starts.
CHANGES = ()
