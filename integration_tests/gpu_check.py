"""Checks run on a machine with one NVIDIA GPU (not part of the test suite:
CI has no GPU). Each prints `CHECK <name>: ok|FAILED <why>`.

    torchrun --nproc_per_node 1 integration_tests/gpu_check.py
    torchrun --nproc_per_node 2 integration_tests/gpu_check.py  # 1 GPU

With one GPU, NCCL cannot run two ranks (it refuses two ranks on one
device), so what runs is a one-process group on the GPU, started as on a
multi-GPU job (`"cpu:gloo,cuda:nccl"`, `device_id`), and, with two
processes, the error for more processes than GPUs.
"""

import os
import tempfile
import traceback

import numpy as np


def check(name, body):
    try:
        body()
        print(f"CHECK {name}: ok", flush=True)
    except Exception as error:
        traceback.print_exc()
        print(f"CHECK {name}: FAILED {type(error).__name__}: {error}")


def main():
    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        try:
            import keras  # noqa: F401
        except ValueError as error:  # Raised at import, as it should.
            print(f"CHECK too many processes: ok ({error})", flush=True)
            return
        print("CHECK too many processes: FAILED no error at import")
        return

    import torch.distributed as dist

    import keras

    def device_chosen_at_import():
        assert torch.cuda.current_device() == local_rank
        assert keras.distribution.list_devices() == ["gpu:0"], (
            keras.distribution.list_devices()
        )

    def backends():
        keras.distribution.initialize()
        assert "nccl" in dist.get_backend(), dist.get_backend()
        assert "gloo" in dist.get_backend(), dist.get_backend()

    def model():
        keras.utils.set_random_seed(3)
        return keras.Sequential(
            [
                keras.Input((16,)),
                keras.layers.Dense(32, activation="relu", name="up"),
                keras.layers.Dropout(0.0),
                keras.layers.Dense(4, name="down"),
            ]
        )

    x = np.random.RandomState(0).rand(64, 16).astype("float32")
    y = x[:, :4]

    def fit(distribution):
        keras.distribution.set_distribution(distribution)
        m = model()
        m.compile(optimizer="adam", loss="mse")
        history = m.fit(x, y, batch_size=16, epochs=2, shuffle=True, verbose=0)
        keras.distribution.set_distribution(None)
        return history.history["loss"], m

    def data_parallel_on_the_gpu():
        expected, _ = fit(None)
        losses, m = fit(keras.distribution.DataParallel())
        assert m.layers[0].kernel.value.device.type == "cuda"
        np.testing.assert_allclose(losses, expected, rtol=1e-5)

    def model_parallel_on_the_gpu():
        mesh = keras.distribution.DeviceMesh((1, 1), ["batch", "model"])
        layout_map = keras.distribution.LayoutMap(mesh)
        layout_map[".*up/kernel"] = (None, "model")
        layout_map[".*down/kernel"] = ("model", None)
        expected, _ = fit(None)
        losses, m = fit(keras.distribution.ModelParallel(layout_map=layout_map))
        np.testing.assert_allclose(losses, expected, rtol=1e-5)
        from torch.distributed.tensor import _random

        assert _random._rng_tracker is not None  # Made with the mesh.

    def weights_split_over_the_batch_axis():
        # FSDP's layout: gathered over the batch axis where read (a
        # relabel on one rank), losses unchanged.
        mesh = keras.distribution.DeviceMesh((1, 1), ["batch", "model"])
        layout_map = keras.distribution.LayoutMap(mesh)
        layout_map[".*(up|down)/kernel"] = ("batch", None)
        expected, _ = fit(None)
        losses, m = fit(keras.distribution.ModelParallel(layout_map=layout_map))
        np.testing.assert_allclose(losses, expected, rtol=1e-5)

    def in_place_adam():
        # The accelerator's path of the in-place update (its step size
        # stays on the device), bit for bit Keras's own update.
        from keras.src.backend.torch.optimizers import in_place_adam_test

        def train(optimizer_class, **options):
            rng = np.random.RandomState(0)
            shapes = ((7, 5), (5,), (3, 4, 2))
            variables = [keras.Variable(rng.randn(*s)) for s in shapes]
            optimizer = optimizer_class(**options)
            for _ in range(6):
                grads = [
                    torch.tensor(rng.randn(*s), dtype=torch.float32).cuda()
                    for s in shapes
                ]
                optimizer.apply(grads, variables)
            return [v.value.detach().cpu() for v in variables]

        for optimizer_class in (keras.optimizers.Adam, keras.optimizers.AdamW):
            for options in ({}, {"amsgrad": True}):
                ours = train(optimizer_class, **options)
                upstream = in_place_adam_test.upstream_class(optimizer_class)
                keras_own = train(upstream, **options)
                for a, b in zip(ours, keras_own):
                    assert a.device.type == "cpu"
                    assert torch.equal(a, b), (optimizer_class, options)
        assert keras.Variable(np.ones(2)).value.device.type == "cuda"

    def empty_block_attention():
        shape = (0, 8, 2, 64)  # An empty block: (batch, length, heads, dim)
        q = torch.randn(shape, device="cuda", dtype=torch.float16)
        flash = [torch.nn.attention.SDPBackend.FLASH_ATTENTION]
        try:
            with torch.nn.attention.sdpa_kernel(flash):
                torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2)
                )
            print("  (flash attention took an empty batch here)")
        except RuntimeError as error:
            print(f"  (flash attention refuses an empty batch: {error})")
        out = keras.ops.dot_product_attention(q, q, q)
        assert tuple(out.shape) == shape, out.shape

    def sharded_checkpoint():
        from keras.src.backend.torch.distribution import load_sharded
        from keras.src.backend.torch.distribution import save_sharded

        keras.distribution.set_distribution(keras.distribution.DataParallel())
        m = model()
        m.compile(optimizer="adam", loss="mse")
        m.fit(x, y, batch_size=16, epochs=1, verbose=0)
        path = os.path.join(tempfile.mkdtemp(), "ckpt")
        save_sharded(m, path)
        fresh = model()
        fresh.compile(optimizer="adam", loss="mse")
        load_sharded(fresh, path)
        for a, b in zip(m.get_weights(), fresh.get_weights()):
            np.testing.assert_array_equal(a, b)
        keras.distribution.set_distribution(None)

    check("device chosen at import", device_chosen_at_import)
    check("cpu:gloo,cuda:nccl group", backends)
    check("DataParallel on the GPU", data_parallel_on_the_gpu)
    check("ModelParallel on the GPU", model_parallel_on_the_gpu)
    check("weights split over the batch axis", weights_split_over_the_batch_axis)
    check("in-place Adam on the GPU", in_place_adam)
    check("attention on an empty block", empty_block_attention)
    check("sharded checkpoint on the GPU", sharded_checkpoint)


if __name__ == "__main__":
    main()
