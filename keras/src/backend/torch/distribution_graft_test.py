"""The graft wires this project into an installed Keras at import time.

Subprocess tests start a fresh interpreter, as a user's script does. Some
run against a small stand-in `keras` package written here, to see the graft
on a Keras that differs from the installed one (another backend, a Keras
that ships its own torch module, an untested version).
"""

import os
import subprocess
import sys
import textwrap

import keras
from keras.src import testing
from keras.src.backend.torch import distribution_graft

OUR_TORCH_DIR = os.path.dirname(os.path.abspath(__file__))

STAND_IN_KERAS = {
    "keras/__init__.py": "",
    "keras/src/__init__.py": "",
    "keras/src/backend/config.py": """
        import os

        def backend():
            return os.environ["KERAS_BACKEND"]
    """,
    "keras/src/backend/__init__.py": """
        from keras.src.backend.config import backend

        if backend() == "torch":
            from keras.src.backend import torch
        distribution_lib = None
    """,
    "keras/src/backend/torch/__init__.py": "",
}


def run_python(code, backend="torch", pythonpath=None, mode=None):
    env = dict(os.environ, KERAS_BACKEND=backend)
    env.pop("PYTHONPATH", None)
    env.pop(distribution_graft.MODE_ENV, None)
    if mode is not None:
        env[distribution_graft.MODE_ENV] = mode
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        cwd="/",
        timeout=120,
    )


class InstalledKerasTest(testing.TestCase):
    def test_plain_import_keras_is_enough(self):
        result = run_python(
            "import keras; print(keras.distribution.list_devices())"
        )
        self.assertEqual(result.stdout, "['cpu:0']\n", result.stderr)

    def test_every_reference_is_this_module(self):
        result = run_python(
            """
            import keras
            from keras.src import backend
            from keras.src.backend import torch as torch_backend
            from keras.src.backend.torch import distribution_lib
            from keras.src.distribution import distribution_lib as api
            print(backend.distribution_lib is distribution_lib,
                  api.distribution_lib is distribution_lib,
                  torch_backend.distribution_lib is distribution_lib,
                  distribution_lib.__file__)
            """
        )
        expected = f"True True True {OUR_TORCH_DIR}/distribution_lib.py\n"
        self.assertEqual(result.stdout, expected, result.stderr)

    def test_overlay_comes_after_keras_own_files(self):
        locations = list(keras.src.backend.torch.__path__)
        self.assertEqual(locations[-1], OUR_TORCH_DIR)
        self.assertTrue(
            locations[0].startswith(os.path.dirname(keras.__file__))
        )

    def test_overlay_packages_are_keras_packages(self):
        packages = distribution_graft.overlay_packages()
        self.assertIn("keras.src.backend.torch", packages)
        self.assertIn("keras.src.testing", packages)
        # Our own packages (with an __init__.py) are found through Keras's.
        self.assertNotIn("keras.src.backend.torch.keras_edits", packages)
        # The root holds only the command line (`python -m
        # keras_torch_distribution`): `keras` itself gets nothing of ours.
        self.assertNotIn("keras", packages)


class StandInKerasTest(testing.TestCase):
    def write_stand_in(self, extra_files=()):
        root = self.get_temp_dir()
        for path, text in {**STAND_IN_KERAS, **dict(extra_files)}.items():
            os.makedirs(
                os.path.join(root, os.path.dirname(path)), exist_ok=True
            )
            with open(os.path.join(root, path), "w") as f:
                f.write(textwrap.dedent(text))
        return root

    def test_other_backends_are_left_alone(self):
        root = self.write_stand_in()
        result = run_python(
            """
            import keras.src.backend as backend
            import keras.src.backend.torch as torch_backend
            print(backend.distribution_lib, torch_backend.__path__)
            """,
            backend="numpy",
            pythonpath=root,
        )
        expected = f"None ['{root}/keras/src/backend/torch']\n"
        self.assertEqual(result.stdout, expected, result.stderr)

    def test_wires_a_torch_keras(self):
        root = self.write_stand_in()
        result = run_python(
            """
            import keras.src.backend as backend
            print(backend.distribution_lib.__file__)
            """,
            pythonpath=root,
        )
        self.assertEqual(
            result.stdout,
            f"{OUR_TORCH_DIR}/distribution_lib.py\n",
            result.stderr,
        )

    def keras_with_own_torch_module(self):
        return self.write_stand_in(
            {"keras/src/backend/torch/distribution_lib.py": "OWN = True\n"}
        )

    def test_replaces_keras_own_torch_module(self):
        result = run_python(
            """
            import keras.src.backend as backend
            from keras.src.backend.torch import distribution_lib
            print(backend.distribution_lib is distribution_lib,
                  distribution_lib.__file__, hasattr(distribution_lib, "OWN"))
            """,
            pythonpath=self.keras_with_own_torch_module(),
        )
        self.assertEqual(
            result.stdout,
            f"True {OUR_TORCH_DIR}/distribution_lib.py False\n",
            result.stderr,
        )
        line = "replaces the torch distribution that Keras ships"
        self.assertEqual(result.stderr.count(line), 1, result.stderr)
        self.assertIn("KERAS_TORCH_DISTRIBUTION=builtin", result.stderr)

    def test_builtin_steps_aside_for_keras_own_torch_module(self):
        result = run_python(
            """
            import keras.src.backend as backend
            import keras.src.backend.torch as torch_backend
            from keras.src.backend.torch import distribution_lib
            print(backend.distribution_lib, distribution_lib.OWN,
                  len(torch_backend.__path__))
            """,
            pythonpath=self.keras_with_own_torch_module(),
            mode="builtin",
        )
        self.assertEqual(result.stdout, "None True 1\n", result.stderr)
        self.assertEqual(result.stderr.count("steps aside"), 1, result.stderr)

    def test_builtin_leaves_any_keras_as_installed(self):
        result = run_python(
            """
            import keras.src.backend as backend
            import keras.src.backend.torch as torch_backend
            print(backend.distribution_lib, len(torch_backend.__path__))
            """,
            pythonpath=self.write_stand_in(),
            mode="builtin",
        )
        self.assertEqual(result.stdout, "None 1\n", result.stderr)
        self.assertEqual(result.stderr, "")

    def test_unknown_mode_is_an_error_that_names_the_choices(self):
        result = run_python(
            "import keras.src.backend",
            pythonpath=self.write_stand_in(),
            mode="mine",
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(
            "KERAS_TORCH_DISTRIBUTION='mine': use 'builtin'", result.stderr
        )

    def test_warns_once_on_untested_keras(self):
        metadata = "Metadata-Version: 2.1\nName: keras\nVersion: 3.99.0\n"
        root = self.write_stand_in(
            {"keras-3.99.0.dist-info/METADATA": metadata}
        )
        result = run_python(
            """
            import importlib
            import keras.src.backend as backend
            importlib.reload(backend)
            """,
            pythonpath=root,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        warning = (
            r"supports keras(<3.17,>=3.15.1|>=3.15.1,<3.17) but keras 3.99.0"
        )
        self.assertRegex(result.stderr, warning)
        self.assertEqual(result.stderr.count("but keras 3.99.0"), 1)
