"""The review of a torch upgrade: what this package needs of torch is there,
listed, and changed only where and when `torch_edits` says."""

import ast
import importlib
import inspect
import io
import os
from unittest import mock

import torch

import keras
from keras.src import testing
from keras.src.backend.torch import torch_edits
from keras.src.backend.torch.torch_edits import Scope
from keras.src.backend.torch.torch_edits import internals
from keras.src.testing.multi_process import run_on_processes

# This repository's `keras/` tree, whose modules the scan reads.
TREE_ROOT = os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "..", "..")
)


def package_sources():
    """Every module of the package (tests left out)."""
    for directory, _, files in os.walk(TREE_ROOT):
        for name in sorted(files):
            if name.endswith(".py") and not name.endswith("_test.py"):
                yield os.path.join(directory, name)


class TorchReferences(ast.NodeVisitor):
    """The torch names a module refers to, as dotted paths, and the
    keywords of its calls to them: imports, and attribute chains on names
    bound by a torch import (`dist.all_reduce`, `DTensor.from_local`)."""

    def __init__(self):
        self.aliases = {}
        self.paths = set()
        self.calls = []  # (path, keyword names)

    def visit_Import(self, node):
        for alias in node.names:
            if alias.name.split(".")[0] == "torch":
                if alias.asname:
                    self.aliases[alias.asname] = alias.name
                else:
                    self.aliases["torch"] = "torch"

    def visit_ImportFrom(self, node):
        if (node.module or "").split(".")[0] != "torch":
            return
        for alias in node.names:
            path = f"{node.module}.{alias.name}"
            self.aliases[alias.asname or alias.name] = path
            self.paths.add(path)

    def visit_Attribute(self, node):
        path = self.path_of(node)
        if path is None:
            self.generic_visit(node)
        else:
            self.paths.add(path)  # The whole chain, not its prefixes.

    def visit_Call(self, node):
        path = self.path_of(node.func)
        keywords = [k.arg for k in node.keywords if k.arg is not None]
        if path is not None and keywords:
            self.calls.append((path, keywords))
        self.generic_visit(node)

    def path_of(self, node):
        names = []
        while isinstance(node, ast.Attribute):
            names.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name) or node.id not in self.aliases:
            return None
        return ".".join([self.aliases[node.id]] + names[::-1])


def references():
    found = TorchReferences()
    for path in package_sources():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        found.aliases = {}
        # Imports first, wherever they are in the file.
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.visit(node)
        found.visit(tree)
    return found


def resolve_path(path):
    """`(object, number of leading parts that name a module)`."""
    parts = path.split(".")
    value = importlib.import_module(parts[0])
    module_parts = 1
    for index, part in enumerate(parts[1:], start=1):
        try:
            value = getattr(value, part)
        except AttributeError:
            if not inspect.ismodule(value):
                raise
            value = importlib.import_module(".".join(parts[: index + 1]))
        if inspect.ismodule(value) and module_parts == index:
            module_parts = index + 1
    return value, module_parts


def _private(part):
    return part.startswith("_") and not part.startswith("__")


def listed_entry(path, module_parts):
    """The entry of `internals` that must list `path`: the path up to its
    last private part (at least a module and one attribute), or None for
    public API."""
    parts = path.split(".")
    if parts[:2] == ["torch", "ops"]:
        return None  # Operators, named as aten names them.
    private = [i for i, part in enumerate(parts) if _private(part)]
    if not private:
        return None
    end = max(private[-1] + 1, min(module_parts + 1, len(parts)))
    return ".".join(parts[:end])


def listed():
    entries = list(internals.TORCH_USED)
    entries += [entry[:2] for entry in internals.TORCH_REPLACED]
    return {f"{module}.{attribute}" for module, attribute in entries}


def every_scope_entered():
    """Enters every scope, in a worker: its registry, and what
    `TORCH_REPLACED` expects on this device."""
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((1,), ["batch"], devices[:1])
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(device_mesh=mesh)
    )
    try:
        from keras.src.backend.torch.torch_edits import fake_tensors
        from keras.src.backend.torch.torch_edits import redistribution_watch

        with redistribution_watch.watching(lambda current, target: None):
            pass
        with fake_tensors.simulating(None):
            pass
    finally:
        keras.distribution.set_distribution(None)
    expected = {
        entry
        for entry in internals.TORCH_REPLACED
        if torch.cuda.is_available() or entry[:2] not in internals.CUDA_ONLY
    }
    return sorted(torch_edits.REGISTRY), sorted(expected)


def scoped_edits_are_undone():
    """Torch's attributes inside and after each scoped block."""
    from keras.src.backend.torch.torch_edits import fake_tensors
    from keras.src.backend.torch.torch_edits import redistribution_watch

    seen = {}
    for scope, block in (
        (
            Scope.RECORDING,
            lambda: redistribution_watch.watching(lambda c, t: None),
        ),
        (Scope.PLANNING, lambda: fake_tensors.simulating(None)),
    ):
        edits = torch_edits.changes(scope)
        before = [_current(edit) for edit in edits]
        with block():
            with block():  # Nested: undone by the outer block only.
                pass
            inside = [_current(edit) for edit in edits]
            applied = torch_edits.applied(scope)
        after = [_current(edit) for edit in edits]
        seen[scope.name] = (
            all(i is not b and i.upstream is b for i, b in zip(inside, before)),
            all(a is b for a, b in zip(after, before)),
            applied,
            torch_edits.applied(scope),
        )
    return seen


def _current(edit):
    owner = torch_edits.resolve(edit.module, edit.owner)
    return vars(owner)[edit.name]


class TorchInternalsTest(testing.TestCase):
    def test_installed_torch_was_checked(self):
        # A new torch fails here until this file has been reviewed.
        self.assertIn(
            internals.installed_torch_version(),
            internals.TORCH_CHECKED_VERSIONS,
        )
        self.assertTrue(
            internals.is_supported_torch(internals.installed_torch_version())
        )

    def test_every_listed_internal_and_keyword_resolves(self):
        self.assertEqual(internals.missing_internals(), [])

    def test_feature_detection_picks_a_spelling_torch_has(self):
        from torch.distributed import distributed_c10d

        keyword = internals.strategy_filter_keyword()
        self.assertIn(keyword, internals.STRATEGY_FILTER_KEYWORDS)
        function = torch_edits.resolve(
            "torch.distributed.tensor._ops.utils",
            "expand_to_full_mesh_op_strategy",
        )
        self.assertIn(keyword, inspect.signature(function).parameters)
        gather = internals.all_gather_into_one()
        self.assertIs(gather, getattr(torch.distributed, gather.__name__))
        timeout = internals.set_group_timeout()
        self.assertIs(timeout, getattr(distributed_c10d, timeout.__name__))

    def test_every_torch_name_in_the_source_resolves(self):
        missing = []
        for path in sorted(references().paths):
            try:
                resolve_path(path)
            except (ImportError, AttributeError):
                missing.append(path)
        self.assertEqual(missing, [])

    def test_every_private_torch_name_in_the_source_is_listed(self):
        unlisted = set()
        for path in references().paths:
            value, module_parts = resolve_path(path)
            if inspect.ismodule(value):
                continue  # An import; what is read from it counts.
            entry = listed_entry(path, module_parts)
            if entry is not None and entry not in listed():
                unlisted.add(entry)
        self.assertEqual(sorted(unlisted), [])

    def test_every_keyword_passed_to_torch_is_accepted(self):
        refused = []
        for path, keywords in references().calls:
            function, _ = resolve_path(path)
            try:
                parameters = inspect.signature(function).parameters
            except (TypeError, ValueError):
                continue  # A builtin without a signature.
            if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
                continue
            refused += [
                f"{path}({k}=)" for k in keywords if k not in parameters
            ]
        self.assertEqual(refused, [])

    def test_registry_is_the_replaced_list_both_ways(self):
        (result,) = run_on_processes(1, every_scope_entered)
        registry, expected = result
        self.assertEqual(registry, expected)

    def test_scoped_edits_are_in_place_inside_and_undone_after(self):
        (seen,) = run_on_processes(1, scoped_edits_are_undone)
        for scope, (inside, restored, applied, after) in seen.items():
            self.assertTrue(inside, scope)
            self.assertTrue(restored, scope)
            self.assertTrue(applied, scope)
            self.assertFalse(after, scope)

    def test_supported_range(self):
        self.assertEqual(
            internals.supported_torch_range(), internals.SUPPORTED_RANGE
        )
        for version in internals.TORCH_CHECKED_VERSIONS + ("2.15.0",):
            self.assertTrue(internals.is_supported_torch(version), version)
        for version in ("2.11.0", "2.12.0"):
            self.assertFalse(internals.is_supported_torch(version), version)

    def test_unsupported_torch_is_refused_naming_the_range(self):
        with mock.patch.object(
            internals, "installed_torch_version", return_value="2.11.0"
        ), mock.patch.object(internals, "_checked", []):
            with self.assertRaisesRegex(
                internals.UnsupportedTorchError,
                r"torch 2\.11\.0 is installed\. .*supports torch>=2\.12\.1"
                r".*pip install 'torch>=2\.12\.1'.*KERAS_TORCH_DISTRIBUTION"
                r"=builtin",
            ):
                internals.check_torch()

    def test_a_missing_internal_is_refused_naming_it(self):
        used = internals.TORCH_USED + (("torch.distributed", "_gone"),)
        with mock.patch.object(
            internals, "TORCH_USED", used
        ), mock.patch.object(internals, "_checked", []):
            with self.assertRaisesRegex(
                internals.UnsupportedTorchError,
                r"lacks what keras-torch-distribution uses: "
                r"torch\.distributed\._gone\. .*supports torch",
            ):
                internals.check_torch()

    def test_an_untested_torch_says_so_in_one_line(self):
        for version, words in (
            ("2.15.0", "is untested"),
            ("2.11.0", "is not supported (torch>=2.12.1)"),
        ):
            stream = io.StringIO()
            with mock.patch.object(
                internals, "installed_torch_version", return_value=version
            ), mock.patch.object(internals, "_said", []):
                internals.say_if_untested_torch(stream)
                internals.say_if_untested_torch(stream)  # Once only.
            lines = stream.getvalue().splitlines()
            self.assertLen(lines, 1)
            self.assertIn(f"torch {version} {words}", lines[0])
        stream = io.StringIO()
        with mock.patch.object(internals, "_said", []):
            internals.say_if_untested_torch(stream)
        self.assertEqual(stream.getvalue(), "")  # A tested torch.
