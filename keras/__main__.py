"""This package's command line: `python -m keras_torch_distribution COMMAND`.

Installed, this file is `keras_torch_distribution/__main__.py` (the
repository's `keras/` tree is installed under that name; see `setup.py`).
It is not laid over Keras: `python -m keras` stays as Keras has it
(`distribution_graft.overlay_packages`).

Commands:

    describe FILE.py:FUNCTION [--processes N] [--batch B] [--sequence S]
             [--device-memory 80GB] [--json]
        Plans how a distribution lays out a model, and a training step's
        memory and collectives, on as many simulated processes as asked
        (`keras.src.backend.torch.distribution.diagnostics.describe`, whose
        module path runs the same command).

The torch backend is selected unless `KERAS_BACKEND` says otherwise.
"""

import os
import sys

PROGRAM = "python -m keras_torch_distribution"
COMMANDS = ("describe",)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: {PROGRAM} {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        print(__doc__.split("Commands:")[1].rstrip(), file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    os.environ.setdefault("KERAS_BACKEND", "torch")
    # Imported by Keras's names, as everything but the graft is.
    from keras.src.backend.torch.distribution.diagnostics import describe

    return describe.main(rest, prog=f"{PROGRAM} {command}")


if __name__ == "__main__":
    sys.exit(main())
