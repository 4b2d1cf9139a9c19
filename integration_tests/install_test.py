"""A regular (non-editable) install into a fresh virtual environment wires
`keras.distribution` on torch, and uninstalling leaves Keras as it was."""

import glob
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from keras.src import testing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PURELIB = "import sysconfig; print(sysconfig.get_path('purelib'))"
LIST_DEVICES = "import keras; print(keras.distribution.list_devices())"
WHICH_MODULE = (
    "import keras; from keras.src.backend.torch import distribution_lib;"
    " print(distribution_lib.__file__)"
)


def run(command, **kwargs):
    return subprocess.run(
        command, capture_output=True, text=True, timeout=600, **kwargs
    )


def snapshot(site_packages):
    """Every file of the `keras` package with its hash, and the top level."""
    files = {}
    keras_dir = os.path.join(site_packages, "keras")
    for path in glob.glob(f"{keras_dir}/**/*", recursive=True):
        if os.path.isfile(path) and "__pycache__" not in path:
            with open(path, "rb") as f:
                files[path] = hashlib.sha256(f.read()).hexdigest()
    return files, sorted(os.listdir(site_packages))


def tracked_copy(work):
    """A copy of the tracked files, not the working directory's others."""
    source = os.path.join(work, "source")
    files = run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO)
    for name in files.stdout.split():
        os.makedirs(os.path.dirname(os.path.join(source, name)), exist_ok=True)
        shutil.copy(os.path.join(REPO, name), os.path.join(source, name))
    return source


class InstallTest(testing.TestCase):
    def test_installing_keeps_the_installed_torch(self):
        # pip resolves the package's requirements against this environment
        # alone (no index): any torch in the supported range stays as it is
        # (CI runs this with torch 2.14.1; by hand with 2.12.1 and 2.13.0).
        work = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, work)
        report = os.path.join(work, "report.json")
        result = run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index"]
            + ["--no-build-isolation", "--report", report, tracked_copy(work)]
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        with open(report) as f:
            installs = json.load(f)["install"]
        names = [item["metadata"]["name"] for item in installs]
        self.assertEqual(names, ["keras-torch-distribution"])

    def test_install_and_uninstall(self):
        work = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, work)
        source = tracked_copy(work)

        venv = os.path.join(work, "venv")
        run([sys.executable, "-m", "venv", venv]).check_returncode()
        python = os.path.join(venv, "bin", "python")
        site_packages = run([python, "-c", PURELIB]).stdout.strip()
        # torch and the package's other requirements come from this
        # environment, after the venv's own packages (installing torch
        # again would take a minute); Keras is installed in the venv, next
        # to which the package is installed, then removed. Asking for this
        # torch installs what it needs in the venv (a newer setuptools).
        with open(os.path.join(site_packages, "requirements.pth"), "w") as f:
            f.write(sysconfig.get_path("purelib") + "\n")
        pip = [python, "-m", "pip", "install", "-q"]
        result = run(pip + ["--ignore-installed", "--no-deps", "keras==3.15.1"])
        self.assertEqual(result.returncode, 0, result.stderr)
        result = run(pip + [f"torch=={importlib.metadata.version('torch')}"])
        self.assertEqual(result.returncode, 0, result.stderr)
        env = dict(os.environ, KERAS_BACKEND="torch")
        plain_keras = snapshot(site_packages)
        plain = run([python, "-c", LIST_DEVICES], env=env, cwd=work)
        self.assertIn("'NoneType' object has no attribute", plain.stderr)

        result = run(pip + [source])
        self.assertEqual(result.returncode, 0, result.stderr)
        wired = run([python, "-c", LIST_DEVICES], env=env, cwd=work)
        self.assertEqual(wired.stdout, "['cpu:0']\n", wired.stderr)
        module = run([python, "-c", WHICH_MODULE], env=env, cwd=work)
        self.assertTrue(
            module.stdout.startswith(
                os.path.join(site_packages, "keras_torch_distribution", "")
            ),
            module.stdout + module.stderr,
        )
        self.assertEqual(snapshot(site_packages)[0], plain_keras[0])
        # The package's command line; Keras's own `-m keras` is as it was.
        command = run([python, "-m", "keras_torch_distribution"], cwd=work)
        self.assertEqual(command.returncode, 2, command.stderr)
        self.assertIn(
            "usage: python -m keras_torch_distribution {describe}",
            command.stderr,
        )
        as_keras = run([python, "-m", "keras"], env=env, cwd=work)
        self.assertIn("cannot be directly executed", as_keras.stderr)

        result = run(
            [python, "-m", "pip", "uninstall", "-y", "keras-torch-distribution"]
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(snapshot(site_packages), plain_keras)
        unwired = run([python, "-c", LIST_DEVICES], env=env, cwd=work)
        self.assertEqual(unwired.stderr, plain.stderr)
