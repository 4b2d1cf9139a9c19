"""KerasHub's `generate()` under `DataParallel`: each rank on its own rows.

Under `DataParallel`, `generate()` splits its prompts over the batch axis
as DTensors, and every op of the generation loop (the cache, the sampler)
then paid DTensor's dispatch: two processes generated at half the speed of
one. Every rank holds whole replicas, and a causal LM generates each row
from that row alone, so here each rank generates its own rows with plain
tensors, and the results are DTensors over the batch again, laid out as
the prompts were: they are gathered once, where the caller reads them.

One process's tokens, on every rank, need three things that a rank's rows
alone would not give:

- **The same start.** KerasHub starts the loop at the shortest prompt's
  length. A rank whose prompts are all longer than the global shortest
  (or that has no prompt at all) gets a stand-in row of that length: its
  tokens after the prompt are a stop token, so that it counts as stopped,
  and it is dropped from the results.
- **The same random numbers.** A sampler draws one number per row and
  step. On CPU, `torch.multinomial` draws each row's numbers in row order,
  whatever the other rows hold, so a rank draws from logits of the global
  batch's shape, its own rows in place, and keeps its rows' draws
  (`draw_on_rows`).
- **The same number of steps.** The sampler stops when every row has
  produced a stop token. Each rank's condition covers its own rows, so the
  ranks agree at each step whether any of them goes on (one all-reduce of
  one number on the control group, `agreed_condition`): every rank runs
  one process's steps, and no rank waits in a collective another skipped.

Used through the companion of KerasHub's `causal_lm.py`, where
`steps/local_replicas.py` runs steps on local replicas.
"""

import contextlib
import threading
from typing import NamedTuple

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Shard

from keras.src.backend.torch import distribution_lib
from keras.src.backend.torch.distribution import process_group
from keras.src.backend.torch.distribution import variables

# The inputs KerasHub's causal LMs generate from.
TOKENS, MASK = "token_ids", "padding_mask"

_local = threading.local()


class Rows(NamedTuple):
    """This rank's share of a generation's prompts.

    Attributes:
        offset: the global index of this rank's first row.
        size: how many rows this rank generates for the caller.
        global_rows: the prompts' count.
        stand_in: whether a stand-in row follows this rank's rows.
        agrees_on_steps: whether the loop's condition depends on the rows
            (there are stop tokens); without them, every rank runs the
            same steps, and the ranks need not agree at each.
    """

    offset: int
    size: int
    global_rows: int
    stand_in: bool
    agrees_on_steps: bool


def splits_rows(inputs):
    """Whether `inputs` are KerasHub's prompts as `generate()` lays them out
    under `DataParallel`: 2-D DTensors split over the batch on a 1-D mesh."""
    if not isinstance(inputs, dict) or not {TOKENS, MASK} <= set(inputs):
        return False
    return all(
        isinstance(value, DTensor)
        and value.device_mesh.ndim == 1
        and tuple(value.placements) == (Shard(0),)
        and value.ndim == 2
        for value in inputs.values()
    )


def generate_on_rows(generate_function, inputs, stop_token_ids):
    """`generate_function(inputs, stop_token_ids=...)` on this rank's rows
    of `inputs` (see `splits_rows`), with plain tensors; its outputs as
    DTensors split over the batch, as `inputs` are."""
    mesh = inputs[TOKENS].device_mesh
    whole = {name: value.full_tensor() for name, value in inputs.items()}
    lengths = whole[MASK].to(torch.int64).sum(dim=-1)
    global_rows = lengths.shape[0]
    size, offset = Shard.local_shard_size_and_offset(
        global_rows, mesh.size(), mesh.get_local_rank()
    )
    local = {name: value[offset : offset + size] for name, value in whole.items()}
    shortest = int(lengths.min())
    stand_in = size == 0 or int(lengths[offset : offset + size].min()) > shortest
    if stand_in:
        local = _with_stand_in(local, shortest, stop_token_ids)
    rows = Rows(
        offset, size, global_rows, stand_in, stop_token_ids is not None
    )
    with variables.reading_local_values(), _generating(rows):
        outputs = generate_function(local, stop_token_ids=stop_token_ids)

    def as_global(output):
        return distribution_lib.from_block(
            output[:size], mesh, [Shard(0)], global_rows
        )

    return {name: as_global(output) for name, output in outputs.items()}


def _with_stand_in(local, length, stop_token_ids):
    """`local` with one more row: a prompt of `length` tokens, followed by
    a stop token (if any) that keeps the row stopped until the last step
    (KerasHub overwrites one position a step)."""
    tokens, mask = local[TOKENS], local[MASK]
    row_tokens = tokens.new_zeros((1, tokens.shape[1]))
    if stop_token_ids:
        row_tokens[0, length:] = stop_token_ids[0]
    row_mask = mask.new_zeros((1, mask.shape[1]))
    row_mask[0, :length] = True
    stand_ins = {TOKENS: row_tokens, MASK: row_mask}
    return {
        name: torch.cat([value, stand_ins[name]]) if name in stand_ins
        # Other inputs: the first row's again (or zeros on an empty rank).
        else torch.cat([value, _any_row(value)])
        for name, value in local.items()
    }


def _any_row(value):
    if value.shape[0]:
        return value[:1]
    return value.new_zeros((1,) + tuple(value.shape[1:]))


@contextlib.contextmanager
def _generating(rows):
    _local.rows = rows
    try:
        yield
    finally:
        _local.rows = None


def generating_rows():
    """This rank's `Rows` while it generates them, else None."""
    return getattr(_local, "rows", None)


def agreed_condition(condition, rows):
    """A generation loop's condition `condition` (this rank's verdict on
    its rows), true while it is true on any rank."""
    if not rows.agrees_on_steps:
        return condition
    return process_group.any_rank(bool(condition))


def draw_on_rows(draw, logits, rows):
    """`draw(global_logits)` (a categorical draw, one row of numbers per
    row) for this rank's rows `logits`: drawn as one process draws for the
    whole batch, this rank's rows in place and the other rows uniform; the
    stand-in row draws 0."""
    width = logits.shape[1:]
    own = logits[: rows.size]
    placed = own.new_zeros((rows.global_rows,) + tuple(width))
    placed[rows.offset : rows.offset + rows.size] = own
    drawn = draw(placed)[rows.offset : rows.offset + rows.size]
    if rows.stand_in:
        drawn = torch.cat([drawn, drawn.new_zeros((1,) + drawn.shape[1:])])
    return drawn
