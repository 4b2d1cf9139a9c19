"""Changes that, in a Keras pull request, would be edits to Keras's files.

Each module here is the companion of one existing Keras file and names it in
its docstring; each function here names the upstream function it stands for
and calls into `keras/src/backend/torch/distribution/`, where the work is
done. Upstreaming this project means moving these bodies into those files.
`distribution_graft.COMPANIONS` says which Keras module triggers which
companion, and `internals` lists every Keras internal this project relies
on, with the Keras versions it was checked against.

Every change goes through `edit` (or `set_attribute`), which records it in
`REGISTRY`; `internals_test` checks the registry against `internals`.
"""

# (module, attribute path, companion) of every change applied so far.
REGISTRY = set()


def edit(owner, name, make_replacement):
    """Replaces `owner.<name>` with `make_replacement(upstream)`, once.

    Args:
        owner: the Keras module or class.
        name: the attribute to replace.
        make_replacement: called with the upstream attribute; returns the
            replacement, which may call it. Defined in the companion.

    The replacement keeps the upstream attribute as `.upstream`: applying an
    edit twice changes nothing, and tests can tell edited attributes apart.
    """
    _record(owner, name, make_replacement.__module__)
    upstream = getattr(owner, name)
    if getattr(upstream, "upstream", None) is not None:
        return
    replacement = make_replacement(upstream)
    replacement.upstream = upstream
    setattr(owner, name, replacement)


class _EditedProperty(property):
    """A property that can carry `edit`'s `.upstream` attribute."""


def edit_property(owner, name, make_getter):
    """Replaces property `owner.<name>` with a read-only one whose getter is
    `make_getter(upstream property)`, once, as `edit` does."""

    def make_replacement(upstream):
        return _EditedProperty(make_getter(upstream))

    make_replacement.__module__ = make_getter.__module__
    edit(owner, name, make_replacement)


def set_attribute(owner, name, value, companion):
    """Sets `owner.<name>` to `value` (a new attribute, or one Keras sets to
    a placeholder, as `distribution_lib = None`), recorded like an edit."""
    _record(owner, name, companion)
    setattr(owner, name, value)


def _record(owner, name, companion):
    if isinstance(owner, type):
        module, path = owner.__module__, f"{owner.__qualname__}.{name}"
    else:
        module, path = owner.__name__, name
    REGISTRY.add((module, path, companion.rpartition(".")[2]))
