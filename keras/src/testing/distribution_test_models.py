"""Small models, data and layout maps shared by the distribution tests.

Every builder is deterministic given Keras's random seed, so a run on N
processes and a run on one process start from the same weights.
"""

import numpy as np

import keras

NUM_CLASSES = 4
SEQUENCE_LENGTH = 8
VOCABULARY = 32


def mlp():
    return keras.Sequential(
        [
            keras.Input((12,)),
            keras.layers.Dense(32, activation="relu", name="up"),
            keras.layers.Dense(NUM_CLASSES, name="down"),
        ],
        name="mlp",
    )


def mlp_layouts(layout_map):
    layout_map["mlp/up/kernel"] = (None, "model")
    layout_map["mlp/up/bias"] = ("model",)
    layout_map["mlp/down/kernel"] = ("model", None)


def cnn():
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(8, 3, padding="same", name="conv_in"),
            keras.layers.BatchNormalization(name="norm"),
            keras.layers.Activation("relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(8, 3, padding="same", name="conv_out"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(NUM_CLASSES, name="head"),
        ],
        name="cnn",
    )


def cnn_layouts(layout_map):
    layout_map["cnn/conv_in/kernel"] = (None, None, None, "model")
    layout_map["cnn/conv_in/bias"] = ("model",)
    layout_map["cnn/norm/.*"] = ("model",)
    layout_map["cnn/conv_out/kernel"] = (None, None, "model", None)


def transformer(dropout=0.0):
    tokens = keras.Input((SEQUENCE_LENGTH,), dtype="int32")
    x = keras.layers.Embedding(VOCABULARY, 16, name="embedding")(tokens)
    h = keras.layers.LayerNormalization(name="attention_norm")(x)
    h = keras.layers.MultiHeadAttention(
        num_heads=2, key_dim=8, dropout=dropout, name="attention"
    )(h, h)
    x = x + h
    h = keras.layers.LayerNormalization(name="ffn_norm")(x)
    h = keras.layers.Dense(32, activation="gelu", name="ffn_up")(h)
    h = keras.layers.Dropout(dropout)(h)
    h = keras.layers.Dense(16, name="ffn_down")(h)
    x = x + h
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(NUM_CLASSES, name="head")(x)
    return keras.Model(tokens, outputs, name="transformer")


def transformer_layouts(layout_map):
    """Megatron: q/k/v and the first FFN kernel split their outputs, the
    attention output and second FFN kernel their inputs."""
    layout_map["embedding/embeddings"] = (None, "model")
    layout_map["attention/(query|key|value)/kernel"] = (None, "model", None)
    layout_map["attention/(query|key|value)/bias"] = ("model", None)
    layout_map["attention/attention_output/kernel"] = ("model", None, None)
    layout_map["ffn_up/kernel"] = (None, "model")
    layout_map["ffn_up/bias"] = ("model",)
    layout_map["ffn_down/kernel"] = ("model", None)


def blocks():
    """Megatron's layers: a column-then-row `Dense` pair, attention over
    heads split between ranks, residuals between them."""
    inputs = keras.Input((SEQUENCE_LENGTH, 8))
    h = keras.layers.Dense(32, activation="gelu", name="up")(inputs)
    x = inputs + keras.layers.Dense(8, name="down")(h)
    attention = keras.layers.MultiHeadAttention(2, 4, name="attention")
    x = x + attention(x, x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(NUM_CLASSES, name="head")(x)
    return keras.Model(inputs, outputs, name="blocks")


def blocks_layouts(layout_map):
    layout_map["up/kernel"] = (None, "model")
    layout_map["up/bias"] = ("model",)
    layout_map["down/kernel"] = ("model", None)
    layout_map["attention/(query|key|value)/kernel"] = (None, "model", None)
    layout_map["attention/(query|key|value)/bias"] = ("model", None)
    layout_map["attention/attention_output/kernel"] = ("model", None, None)


def torch_blocks():
    """`blocks`' column-then-row pair as a wrapped PyTorch module, between
    Keras layers."""
    import torch  # Seeded by `keras.utils.set_random_seed`.

    module = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)
    )
    inputs = keras.Input((SEQUENCE_LENGTH, 8))
    x = keras.layers.Dense(8, name="pre")(inputs)
    x = x + keras.layers.TorchModuleWrapper(
        module, name="mlp", output_shape=(None, SEQUENCE_LENGTH, 8)
    )(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(NUM_CLASSES, name="head")(x)
    return keras.Model(inputs, outputs, name="torch_blocks")


def torch_blocks_layouts(layout_map):
    """torch's `ColwiseParallel` then `RowwiseParallel`, in PyTorch's
    spelling (a `Linear` weight is `(out, in)`)."""
    layout_map["mlp.0.weight"] = ("model", None)
    layout_map["mlp.2.weight"] = (None, "model")


def torch_embedding():
    """A wrapped PyTorch embedding table, then Keras layers."""
    import torch  # Seeded by `keras.utils.set_random_seed`.

    inputs = keras.Input((SEQUENCE_LENGTH,), dtype="int32")
    x = keras.layers.TorchModuleWrapper(
        torch.nn.Embedding(VOCABULARY, 8),
        name="table",
        output_shape=(None, SEQUENCE_LENGTH, 8),
    )(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(NUM_CLASSES, name="head")(x)
    return keras.Model(inputs, outputs, name="torch_embedding")


def torch_embedding_layouts(layout_map):
    """The table split over its vocabulary: torch's `RowwiseParallel`."""
    layout_map["table.weight"] = ("model", None)


MODELS = {
    "mlp": (mlp, mlp_layouts),
    "blocks": (blocks, blocks_layouts),
    "torch_blocks": (torch_blocks, torch_blocks_layouts),
    "torch_embedding": (torch_embedding, torch_embedding_layouts),
    "cnn": (cnn, cnn_layouts),
    "transformer": (transformer, transformer_layouts),
}


def data(model_name, samples=32):
    rng = np.random.RandomState(0)
    labels = rng.randint(0, NUM_CLASSES, size=(samples,))
    if model_name == "mlp":
        features = rng.randn(samples, 12).astype("float32")
    elif model_name == "cnn":
        features = rng.randn(samples, 8, 8, 3).astype("float32")
    elif model_name in ("blocks", "torch_blocks"):
        features = rng.randn(samples, SEQUENCE_LENGTH, 8).astype("float32")
    else:
        features = rng.randint(0, VOCABULARY, (samples, SEQUENCE_LENGTH))
    return features, labels


def optimizer(name, **options):
    if name == "sgd":
        options.setdefault("learning_rate", 0.1)
        return keras.optimizers.SGD(momentum=0.9, **options)
    options.setdefault("learning_rate", 0.01)
    if name == "adam":
        return keras.optimizers.Adam(**options)
    return keras.optimizers.AdamW(weight_decay=0.05, **options)


def distribution(name, model_name):
    """`None`; `"data"`; `"model"` on a 1 x N ("batch", "model") mesh;
    `"model_1d"` on a 1-D ("model",) mesh; `"2d"` on a 2 x N/2 mesh."""
    if name is None:
        return None
    devices = keras.distribution.list_devices()
    if name == "data":
        return keras.distribution.DataParallel(devices=devices)
    if name == "model_1d":
        mesh = keras.distribution.DeviceMesh(
            (len(devices),), ["model"], devices
        )
    else:
        shape = (1, len(devices)) if name == "model" else (2, len(devices) // 2)
        mesh = keras.distribution.DeviceMesh(shape, ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    MODELS[model_name][1](layout_map)
    return keras.distribution.ModelParallel(layout_map=layout_map)


def ids_data(samples):
    """Features whose column 0 is the sample's id, and targets."""
    ids = np.arange(samples, dtype="float32")
    x = np.stack([ids, np.sin(ids), np.cos(ids)], axis=1).astype("float32")
    y = np.stack([np.cos(ids), ids / samples], axis=1).astype("float32")
    return x, y


class IdsDataset:
    """`ids_data` as a map-style torch dataset (importable by name, so
    that DataLoader workers can unpickle it)."""

    def __init__(self, samples):
        self.x, self.y = ids_data(samples)
        self.loaded = 0  # Samples read, in this process.

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.loaded += 1
        return self.x[i], self.y[i]


class IdsPyDataset(keras.utils.PyDataset):
    """`ids_data` in batches of `batch_size`, as a `PyDataset`; an
    `infinite` one starts over after the last batch."""

    def __init__(self, samples, batch_size, infinite=False, **options):
        super().__init__(**options)
        self.x, self.y = ids_data(samples)
        self.batch_size = batch_size
        self.infinite = infinite

    @property
    def num_batches(self):
        return None if self.infinite else -(-len(self.x) // self.batch_size)

    def __getitem__(self, index):
        index %= -(-len(self.x) // self.batch_size)
        rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.x[rows], self.y[rows]
