"""The torch `nn` companion on one process: attention traces whole under
torch.compile, and an explicit request for flash attention is still
checked."""

import numpy as np
import torch

from keras.src import ops
from keras.src import testing


def _attention_inputs():
    rng = np.random.RandomState(0)
    # (batch, sequence, heads, head dim), as Keras's attention takes them.
    return [
        torch.from_numpy(rng.randn(2, 6, 2, 4).astype("float32"))
        for _ in range(3)
    ]


class TorchNnTest(testing.TestCase):
    def test_attention_traces_as_one_graph(self):
        query, key, value = _attention_inputs()
        traced = torch.compile(
            ops.dot_product_attention, fullgraph=True, backend="eager"
        )
        # fullgraph=True raises at a graph break.
        self.assertAllClose(
            traced(query, key, value),
            ops.dot_product_attention(query, key, value),
        )

    def test_asking_for_flash_attention_is_still_checked(self):
        query, key, value = _attention_inputs()
        # Flash attention is a CUDA kernel: refused for CPU tensors.
        with self.assertRaisesRegex(RuntimeError, "Flash attention"):
            ops.dot_product_attention(query, key, value, flash_attention=True)
