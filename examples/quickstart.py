"""The README's example: a Megatron-split MLP trained with ModelParallel.

    KERAS_BACKEND=torch torchrun --nproc_per_node 2 examples/quickstart.py
    KERAS_BACKEND=torch python examples/quickstart.py  # the same numbers
"""

import numpy as np
import torch.distributed as dist

import keras

devices = keras.distribution.list_devices()  # ["cpu:0", "cpu:1"]
mesh = keras.distribution.DeviceMesh(
    (1, len(devices)), ["batch", "model"], devices
)
layout_map = keras.distribution.LayoutMap(mesh)
layout_map[".*up/kernel"] = (None, "model")  # Split outputs,
layout_map[".*down/kernel"] = ("model", None)  # then inputs.
keras.distribution.set_distribution(
    keras.distribution.ModelParallel(layout_map=layout_map)
)

keras.utils.set_random_seed(0)
model = keras.Sequential(
    [
        keras.Input((16,)),
        keras.layers.Dense(64, activation="relu", name="up"),
        keras.layers.Dense(4, name="down"),
    ]
)
model.compile(optimizer="adam", loss="mse")
x = np.random.RandomState(0).rand(256, 16).astype("float32")
y = x[:, :4] * 2 - 1
history = model.fit(x, y, batch_size=64, epochs=3, verbose=0)  # Global batch.
if dist.get_rank() == 0:  # Every rank has the same global losses.
    print("losses", [round(loss, 6) for loss in history.history["loss"]])
