"""Changes that, in a Keras pull request, would be edits to Keras's files.

Each module here is the companion of one existing Keras file and names it in
its docstring; each function here names the upstream function it stands for.
Upstreaming this project means moving these bodies into those files.
`distribution_graft.COMPANIONS` says which Keras module triggers which
companion, and `internals` lists every Keras internal this project relies
on, with the Keras versions it was checked against.
"""


def edit(owner, name, make_replacement):
    """Replaces `owner.<name>` with `make_replacement(upstream)`, once.

    Args:
        owner: the Keras module or class.
        name: the attribute to replace.
        make_replacement: called with the upstream attribute; returns the
            replacement, which may call it.

    The replacement keeps the upstream attribute as `.upstream`: applying an
    edit twice changes nothing, and tests can tell edited attributes apart.
    """
    upstream = getattr(owner, name)
    if getattr(upstream, "upstream", None) is not None:
        return
    replacement = make_replacement(upstream)
    replacement.upstream = upstream
    setattr(owner, name, replacement)
