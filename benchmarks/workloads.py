"""The benchmark models, each written twice: in plain PyTorch and in Keras.

Both versions of a model do the same arithmetic with the same shapes, so the
step times compare the frameworks, not the models. `shrink` divides the
sharded dims (hidden units, heads) by N: the per-rank share of a model-
parallel step, run on one process as its ideal, communication-free cost.
"""

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel
from torch.distributed.tensor.parallel import RowwiseParallel

import keras
from keras.src.testing import distribution_test_models

CASES = {
    # name: (kind, global batch)
    "dp_mlp": ("data", 256),
    "dp_transformer": ("data", 64),
    # The same transformer at a working size, where Keras's per-layer
    # overhead weighs less against the arithmetic.
    "dp_transformer_large": ("data", 32),
    "mp_blocks": ("model", 8),
    # The same blocks at a smaller shape, where Keras's per-layer overhead
    # and the collectives' latency weigh more against the arithmetic.
    "mp_blocks_small": ("model", 8),
    # The same PyTorch blocks inside a Keras TorchModuleWrapper, laid out
    # by a LayoutMap in PyTorch spelling (torch's parallel styles).
    "mp_torch_blocks": ("model", 8),
    # The MLP with AdamW, on one process only: Keras's step against plain
    # PyTorch's, the optimizer update being most of Keras's own overhead.
    "mlp_adamw": ("single", 256),
}
MLP_SIZES = (784, 1024, 1024, 10)
TRANSFORMER = dict(vocabulary=32, length=8, dim=16, heads=2, hidden=32)
TRANSFORMERS = {
    "dp_transformer": TRANSFORMER,
    "dp_transformer_large": dict(
        vocabulary=1000, length=128, dim=256, heads=8, hidden=1024
    ),
}
BLOCK_SHAPES = {
    "mp_blocks": dict(length=128, dim=256, heads=8),
    "mp_blocks_small": dict(length=32, dim=64, heads=4),
}
BLOCKS = BLOCK_SHAPES["mp_blocks"]  # Also the wrapped PyTorch blocks'.
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.004  # Keras AdamW's default.


def batch(case, size, seed=0):
    """Inputs and targets of one batch of `case`, as NumPy arrays."""
    rng = np.random.RandomState(seed)
    if case in ("dp_mlp", "mlp_adamw"):
        x = rng.randn(size, MLP_SIZES[0]).astype("float32")
        return x, rng.randint(0, MLP_SIZES[-1], size)
    if case in TRANSFORMERS:
        t = TRANSFORMERS[case]
        x = rng.randint(0, t["vocabulary"], (size, t["length"]))
        return x, rng.randint(0, 4, size)
    blocks = BLOCK_SHAPES.get(case, BLOCKS)
    shape = (size, blocks["length"], blocks["dim"])
    x = rng.randn(*shape).astype("float32")
    return x, rng.randn(*shape).astype("float32")


# Plain PyTorch.


class TorchMLP(nn.Sequential):
    def __init__(self):
        sizes = MLP_SIZES
        super().__init__(
            nn.Linear(sizes[0], sizes[1]),
            nn.ReLU(),
            nn.Linear(sizes[1], sizes[2]),
            nn.ReLU(),
            nn.Linear(sizes[2], sizes[3]),
        )


class TorchAttention(nn.Module):
    """Self-attention whose head count is read from the local q/k/v width,
    so a column-wise split of `query`, `key`, `value` runs local heads."""

    def __init__(self, dim, heads, head_dim):
        super().__init__()
        self.head_dim = head_dim
        self.query = nn.Linear(dim, heads * head_dim)
        self.key = nn.Linear(dim, heads * head_dim)
        self.value = nn.Linear(dim, heads * head_dim)
        self.output = nn.Linear(heads * head_dim, dim)

    def forward(self, x):
        b, t, _ = x.shape

        def heads(projection):
            return projection(x).view(b, t, -1, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query), heads(self.key), heads(self.value)
        attended = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.output(attended.transpose(1, 2).reshape(b, t, -1))


class TorchTransformer(nn.Module):
    def __init__(self, t=TRANSFORMER):
        super().__init__()
        dim = t["dim"]
        self.embedding = nn.Embedding(t["vocabulary"], dim)
        self.attention_norm = nn.LayerNorm(dim, eps=1e-3)
        self.attention = TorchAttention(dim, t["heads"], dim // t["heads"])
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-3)
        self.ffn_up = nn.Linear(dim, t["hidden"])
        self.ffn_down = nn.Linear(t["hidden"], dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, tokens):
        x = self.embedding(tokens)
        x = x + self.attention(self.attention_norm(x))
        h = nn.functional.gelu(self.ffn_up(self.ffn_norm(x)))
        x = x + self.ffn_down(h)
        return self.head(x.mean(dim=1))


class TorchMegatronMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(x)))


class TorchBlocks(nn.Module):
    """Two Megatron MLP blocks and one attention block, residual each."""

    def __init__(self, shrink=1, blocks=BLOCKS):
        super().__init__()
        dim, heads = blocks["dim"], blocks["heads"]
        self.mlp_0 = TorchMegatronMLP(dim, 4 * dim // shrink)
        self.mlp_1 = TorchMegatronMLP(dim, 4 * dim // shrink)
        self.attention = TorchAttention(dim, heads // shrink, dim // heads)

    def forward(self, x):
        x = self.mlp_1(self.mlp_0(x))
        return x + self.attention(x)


def torch_model(case, shrink=1):
    torch.manual_seed(0)
    if case in ("dp_mlp", "mlp_adamw"):
        return TorchMLP()
    if case in TRANSFORMERS:
        return TorchTransformer(TRANSFORMERS[case])
    return TorchBlocks(shrink, BLOCK_SHAPES[case])


def torch_optimizer(case, parameters):
    if case == "mlp_adamw":
        return torch.optim.AdamW(
            parameters, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY
        )
    return torch.optim.Adam(parameters, lr=LEARNING_RATE)


def torch_loss(case):
    if CASES[case][0] == "model":
        return nn.MSELoss()
    return nn.CrossEntropyLoss()


def tensor_parallel_plan():
    """The hand-written Megatron plan for `TorchBlocks`."""
    plan = {}
    for block in ("mlp_0", "mlp_1"):
        plan[f"{block}.up"] = ColwiseParallel()
        plan[f"{block}.down"] = RowwiseParallel()
    for projection in ("query", "key", "value"):
        plan[f"attention.{projection}"] = ColwiseParallel()
    plan["attention.output"] = RowwiseParallel()
    return plan


# Keras.


def keras_mlp():
    sizes = MLP_SIZES
    return keras.Sequential(
        [
            keras.Input((sizes[0],)),
            keras.layers.Dense(sizes[1], activation="relu"),
            keras.layers.Dense(sizes[2], activation="relu"),
            keras.layers.Dense(sizes[3]),
        ],
        name="mlp",
    )


def keras_transformer(case):
    """The tests' small transformer, or `TorchTransformer`'s layers at the
    case's size."""
    if case == "dp_transformer":
        return distribution_test_models.transformer()
    t = TRANSFORMERS[case]
    tokens = keras.Input((t["length"],), dtype="int32")
    x = keras.layers.Embedding(t["vocabulary"], t["dim"])(tokens)
    h = keras.layers.LayerNormalization()(x)
    h = keras.layers.MultiHeadAttention(t["heads"], t["dim"] // t["heads"])(
        h, h
    )
    x = x + h
    h = keras.layers.LayerNormalization()(x)
    h = keras.layers.Dense(t["hidden"], activation="gelu")(h)
    x = x + keras.layers.Dense(t["dim"])(h)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(tokens, keras.layers.Dense(4)(x))


def keras_blocks(shrink=1, blocks=BLOCKS):
    dim, heads = blocks["dim"], blocks["heads"]
    inputs = keras.Input((blocks["length"], dim))
    x = inputs
    for block in ("mlp_0", "mlp_1"):
        h = keras.layers.Dense(
            4 * dim // shrink, activation="gelu", name=f"{block}_up"
        )(x)
        x = x + keras.layers.Dense(dim, name=f"{block}_down")(h)
    attention = keras.layers.MultiHeadAttention(
        heads // shrink, dim // heads, name="attention"
    )
    x = x + attention(x, x)
    return keras.Model(inputs, x, name="blocks")


def keras_blocks_layouts(layout_map):
    """The same Megatron plan, as a Keras LayoutMap."""
    for block in ("mlp_0", "mlp_1"):
        layout_map[f"{block}_up/kernel"] = (None, "model")
        layout_map[f"{block}_up/bias"] = ("model",)
        layout_map[f"{block}_down/kernel"] = ("model", None)
    layout_map["attention/(query|key|value)/kernel"] = (None, "model", None)
    layout_map["attention/(query|key|value)/bias"] = ("model", None)
    layout_map["attention/attention_output/kernel"] = ("model", None, None)


def keras_torch_blocks(shrink=1):
    torch.manual_seed(0)  # The torch side's weights.
    shape = (BLOCKS["length"], BLOCKS["dim"])
    inputs = keras.Input(shape)
    wrapper = keras.layers.TorchModuleWrapper(
        TorchBlocks(shrink), name="blocks", output_shape=(None,) + shape
    )
    return keras.Model(inputs, wrapper(inputs), name="torch_blocks")


def keras_torch_blocks_layouts(layout_map):
    """`tensor_parallel_plan`, as LayoutMap entries on PyTorch weights
    (`(out, in)`: column-wise is `("model", None)`)."""
    for block in ("mlp_0", "mlp_1"):
        layout_map[f"blocks.{block}.up.weight"] = ("model", None)
        layout_map[f"blocks.{block}.down.weight"] = (None, "model")
    layout_map["blocks.attention.(query|key|value).weight"] = ("model", None)
    layout_map["blocks.attention.output.weight"] = (None, "model")


def keras_model(case, shrink=1):
    keras.utils.set_random_seed(0)
    if case == "mp_torch_blocks":
        model = keras_torch_blocks(shrink)
        loss = "mse"
    elif case in ("dp_mlp", "mlp_adamw"):
        model = keras_mlp()
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    elif case in TRANSFORMERS:
        model = keras_transformer(case)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        model = keras_blocks(shrink, BLOCK_SHAPES[case])
        loss = "mse"
    optimizer = keras.optimizers.Adam(LEARNING_RATE)
    if case == "mlp_adamw":
        optimizer = keras.optimizers.AdamW(
            LEARNING_RATE, weight_decay=WEIGHT_DECAY
        )
    model.compile(
        optimizer=optimizer,
        loss=loss,
        jit_compile=False,
    )
    return model


def keras_distribution(case):
    if CASES[case][0] == "data":
        return keras.distribution.DataParallel()
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh(
        (1, len(devices)), ["batch", "model"], devices
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    if case == "mp_torch_blocks":
        keras_torch_blocks_layouts(layout_map)
    else:
        keras_blocks_layouts(layout_map)
    return keras.distribution.ModelParallel(layout_map=layout_map)
