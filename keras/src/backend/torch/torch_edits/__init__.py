"""Changes to torch's own code, in one place, each with a scope.

Where `keras_edits` holds the edits a Keras pull request would make,
this package holds those a PyTorch pull request would make: DTensor
strategies Keras's layers need, a fallback for ops without one, a few
hooks. Each companion module here changes one part of DTensor and names
the torch file it stands beside; `internals.py` lists every torch name
that is not public API which this project uses or replaces, with the
torch versions it was checked against, and picks between spellings of
one API by feature detection.

Every change is an `Edit` (an attribute of torch's replaced, the
replacement keeping what it replaced as `.upstream`) or a `Strategy` (a
sharding strategy registered for an op), and has a `Scope`:

- `Scope.DISTRIBUTION`: from the first `keras.distribution.set_distribution`
  (or `Distribution.scope()`) of the process to its end. A process that
  never sets a distribution runs torch as installed, whatever Keras code
  it runs.
- `Scope.RECORDING`: while a step records its contraction plan
  (`distribution/contraction_plan.py`), and then only in that thread's
  view: the hooks do nothing for other threads.
- `Scope.PLANNING`: while `describe` simulates a step on fake tensors
  (`distribution/diagnostics/step_plan.py`).

`REGISTRY` records each change made, and `internals_test` checks it
against `internals.TORCH_REPLACED` both ways. Before the first change of
the distribution scope, the installed torch is checked once
(`internals.check_torch`): a torch that lacks an internal, a keyword or
a public function this package relies on fails there, naming it, rather
than deep in a step.
"""

import contextlib
import enum
import importlib
import threading
from typing import Callable
from typing import NamedTuple


class Scope(enum.Enum):
    """When a change to torch is in place."""

    DISTRIBUTION = "from the first distribution set to the end of the process"
    RECORDING = "while a step records its contraction plan"
    PLANNING = "while describe() simulates a step on fake tensors"


class Edit(NamedTuple):
    """An attribute of torch's, replaced.

    `owner` is the attribute path of the object that holds the attribute,
    from `module` ("" for the module itself). `make_replacement(upstream)`
    returns the replacement, which may call `upstream`.
    """

    module: str
    owner: str
    name: str
    make_replacement: Callable
    scope: Scope


class Strategy(NamedTuple):
    """A DTensor sharding strategy registered for the ops `ops` (names as
    `torch.ops.aten` spells them) by `register()`."""

    ops: tuple
    register: Callable
    scope: Scope


# The companion modules, each with `CHANGES`: a tuple of `Edit` and
# `Strategy`.
COMPANIONS = (
    "keras.src.backend.torch.torch_edits.sharding_fallback",
    "keras.src.backend.torch.torch_edits.op_strategies",
    "keras.src.backend.torch.torch_edits.redistribute_costs",
    "keras.src.backend.torch.torch_edits.redistribution_watch",
    "keras.src.backend.torch.torch_edits.fake_tensors",
    "keras.src.backend.torch.torch_edits.random",
)

# (module, attribute path, companion, scope name) of every change made so
# far; a strategy's attribute path is `"strategy:" + op name`.
REGISTRY = set()

_lock = threading.RLock()
# id(Edit) -> [owner, name, raw upstream attribute or None where the
# owner had none of its own (a method of the owner's class), depth]
_in_place = {}
_scopes_applied = set()


def changes(scope):
    """Every change of `scope`, from every companion, in order."""
    found = []
    for name in COMPANIONS:
        companion = importlib.import_module(name)
        found += [c for c in companion.CHANGES if c.scope is scope]
    return found


def applied(scope):
    """Whether the changes of `scope` are in place (for the distribution
    scope: whether a distribution was ever set)."""
    return scope in _scopes_applied


def apply_distribution_scope():
    """Puts the changes of `Scope.DISTRIBUTION` in place, once per process,
    after checking the installed torch (see `internals.check_torch`)."""
    with _lock:
        if applied(Scope.DISTRIBUTION):
            return
        from keras.src.backend.torch.torch_edits import internals

        internals.check_torch()
        for change in changes(Scope.DISTRIBUTION):
            _make(change)
        _scopes_applied.add(Scope.DISTRIBUTION)


@contextlib.contextmanager
def scoped(scope):
    """Inside, the changes of `scope` are in place; they are undone when
    the outermost block of any thread ends."""
    if scope is Scope.DISTRIBUTION:
        raise ValueError(
            "The distribution scope lasts to the end of the process: use "
            "apply_distribution_scope()."
        )
    edits = changes(scope)
    if any(isinstance(edit, Strategy) for edit in edits):
        raise ValueError(f"Strategies stay registered: not in {scope}.")
    with _lock:
        for edit in edits:
            _make(edit)
        _scopes_applied.add(scope)
    try:
        yield
    finally:
        with _lock:
            for edit in reversed(edits):
                _undo(edit)
            if not any(_in_place.get(id(e)) for e in edits):
                _scopes_applied.discard(scope)


def set_attribute(module, name, value, companion, scope):
    """Sets `module.<name>` to `value` (an attribute torch leaves None until
    needed), recorded like an edit; for the distribution scope only."""
    if scope is not Scope.DISTRIBUTION or not applied(scope):
        raise RuntimeError(f"{module}.{name} is set inside {scope} only.")
    setattr(resolve(module, ""), name, value)
    REGISTRY.add((module, name, companion.rpartition(".")[2], scope.name))


def _make(change):
    companion = _companion_of(change)
    if isinstance(change, Strategy):
        # Registered for good: strategies belong to the distribution scope.
        change.register()
        for op in change.ops:
            REGISTRY.add(
                ("torch.ops.aten", f"strategy:{op}", companion, change.scope.name)
            )
        return
    record = _in_place.get(id(change))
    if record is not None:
        record[3] += 1
        return
    owner = resolve(change.module, change.owner)
    raw = _own_attribute(owner, change.name)
    upstream = getattr(owner, change.name)
    replacement = change.make_replacement(upstream)
    replacement.upstream = upstream
    if isinstance(raw, staticmethod):
        replacement = staticmethod(replacement)
    setattr(owner, change.name, replacement)
    _in_place[id(change)] = [owner, change.name, raw, 1]
    path = f"{change.owner}.{change.name}" if change.owner else change.name
    REGISTRY.add((change.module, path, companion, change.scope.name))


def _undo(edit):
    record = _in_place.get(id(edit))
    if record is None:
        return
    record[3] -= 1
    if record[3] == 0:
        owner, name, raw, _ = _in_place.pop(id(edit))
        if raw is None:
            delattr(owner, name)
        else:
            setattr(owner, name, raw)


def _own_attribute(owner, name):
    """The attribute as the owner stores it (a staticmethod stays one),
    or None where it comes from the owner's class."""
    return vars(owner).get(name)


def _companion_of(change):
    function = (
        change.register
        if isinstance(change, Strategy)
        else change.make_replacement
    )
    return function.__module__.rpartition(".")[2]


def resolve(module_name, attribute):
    """`module_name.attribute`, following dots in `attribute` ("" gives the
    module)."""
    value = importlib.import_module(module_name)
    for part in filter(None, attribute.split(".")):
        value = getattr(value, part)
    return value
