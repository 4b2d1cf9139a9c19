"""The launcher that started this process, and what its environment says.

One process drives one device, and the cluster's own launcher starts the
processes; this package never launches any. Each launcher describes the
job in variables of its own:

| launcher | rank | world size | local rank | coordinator |
| --- | --- | --- | --- | --- |
| `torchrun` | `RANK` | `WORLD_SIZE` | `LOCAL_RANK` | `MASTER_ADDR:MASTER_PORT` |
| Slurm's `srun` | `SLURM_PROCID` | `SLURM_STEP_NUM_TASKS` | `SLURM_LOCALID` | the step's first node, `MASTER_PORT` or a port derived from `SLURM_JOB_ID` |
| Open MPI's `mpirun` | `OMPI_COMM_WORLD_RANK` | `OMPI_COMM_WORLD_SIZE` | `OMPI_COMM_WORLD_LOCAL_RANK` | `MASTER_ADDR:MASTER_PORT` (required) |

`detect(environ)` reads them, in that order: torchrun run under `srun`
(one agent per node) is torchrun's job. A Slurm batch script that runs
Python without `srun` is not a launch (Slurm sets `SLURM_PROCID` there
too, but no `SLURM_STEP_NUM_TASKS`).
"""

import re
from typing import NamedTuple
from typing import Optional

# torchrun's default port, and the one Open MPI jobs use without
# MASTER_PORT.
DEFAULT_PORT = 29500
# Ports derived from a Slurm job id: every rank of a job derives the same;
# jobs sharing a node likely differ.
SLURM_PORTS = (20000, 40000)


class Launch(NamedTuple):
    """What a launcher's environment says of this process."""

    launcher: str  # "torchrun", "srun" or "mpirun"
    world_size: int
    rank: int
    local_rank: Optional[int]
    # "host:port" of the coordinator (rank 0); None for torchrun, whose
    # group starts from the environment itself (`env://`).
    coordinator: Optional[str]
    # The variables the launcher sets for the rank and the world size.
    rank_variable: str
    size_variable: str


class Torchrun:

    @staticmethod
    def present(environ):
        return "RANK" in environ and "WORLD_SIZE" in environ

    @staticmethod
    def read(environ):
        local_rank = environ.get("LOCAL_RANK")
        return Launch(
            "torchrun",
            int(environ["WORLD_SIZE"]),
            int(environ["RANK"]),
            None if local_rank is None else int(local_rank),
            None,
            "RANK",
            "WORLD_SIZE",
        )


class Slurm:

    @staticmethod
    def present(environ):
        return "SLURM_PROCID" in environ and "SLURM_STEP_NUM_TASKS" in environ

    @staticmethod
    def read(environ):
        nodes = environ.get("SLURM_STEP_NODELIST") or environ.get(
            "SLURM_JOB_NODELIST"
        )
        if not nodes:
            raise ValueError(
                "srun set SLURM_PROCID but neither SLURM_STEP_NODELIST nor "
                "SLURM_JOB_NODELIST: the coordinator (the step's first node) "
                "is unknown. Set MASTER_ADDR and MASTER_PORT, or pass "
                "job_addresses='host:port' to keras.distribution.initialize()."
            )
        port = environ.get("MASTER_PORT") or slurm_port(environ["SLURM_JOB_ID"])
        local_rank = environ.get("SLURM_LOCALID")
        return Launch(
            "srun",
            int(environ["SLURM_STEP_NUM_TASKS"]),
            int(environ["SLURM_PROCID"]),
            None if local_rank is None else int(local_rank),
            f"{first_host(nodes)}:{port}",
            "SLURM_PROCID",
            "SLURM_STEP_NUM_TASKS",
        )


class OpenMpi:

    @staticmethod
    def present(environ):
        return "OMPI_COMM_WORLD_RANK" in environ

    @staticmethod
    def read(environ):
        if "MASTER_ADDR" not in environ:
            raise ValueError(
                "Open MPI's mpirun started this process "
                "(OMPI_COMM_WORLD_RANK is set) but MASTER_ADDR is not: the "
                "processes cannot find their coordinator. Set MASTER_ADDR to "
                "the host of rank 0 (and MASTER_PORT to a free port; "
                f"default {DEFAULT_PORT}), e.g. `mpirun -x MASTER_ADDR=host0 "
                "-x MASTER_PORT=29500 ...`."
            )
        port = environ.get("MASTER_PORT") or DEFAULT_PORT
        local_rank = environ.get("OMPI_COMM_WORLD_LOCAL_RANK")
        return Launch(
            "mpirun",
            int(environ["OMPI_COMM_WORLD_SIZE"]),
            int(environ["OMPI_COMM_WORLD_RANK"]),
            None if local_rank is None else int(local_rank),
            f"{environ['MASTER_ADDR']}:{port}",
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
        )


LAUNCHERS = (Torchrun, Slurm, OpenMpi)


def detect(environ):
    """The `Launch` of the first launcher whose variables are set, or None.

    Raises:
        ValueError: a launcher's variables are set but do not tell where
            the coordinator is.
    """
    for launcher in LAUNCHERS:
        if launcher.present(environ):
            return launcher.read(environ)
    return None


def slurm_port(job_id):
    """The coordinator's port of Slurm job `job_id`."""
    low, high = SLURM_PORTS
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return low + int(digits) % (high - low)


def first_host(nodelist):
    """The first host of a Slurm node list (`node[01-04,07],gpu3`)."""
    return expand_hostlist(nodelist)[0]


def expand_hostlist(nodelist):
    """Every host of a Slurm node list, in order: `node[01-03,07]` gives
    `node01, node02, node03, node07`; several bracketed ranges in one
    name multiply."""
    hosts = []
    for item in _split_top_level(nodelist.strip()):
        hosts += _expand_item(item)
    if not hosts:
        raise ValueError(f"Empty Slurm node list: {nodelist!r}.")
    return hosts


def _split_top_level(text):
    """`text` split at the commas outside brackets."""
    items, depth, start = [], 0, 0
    for index, character in enumerate(text):
        if character == "[":
            depth += 1
        elif character == "]":
            depth -= 1
        elif character == "," and depth == 0:
            items.append(text[start:index])
            start = index + 1
    items.append(text[start:])
    return [item for item in items if item]


def _expand_item(item):
    match = re.search(r"\[([^\]]*)\]", item)
    if match is None:
        return [item]
    prefix, suffix = item[: match.start()], item[match.end() :]
    names = []
    for part in match.group(1).split(","):
        low, _, high = part.partition("-")
        if not high:
            names.append(low)
            continue
        width = len(low)
        names += [
            str(number).zfill(width) for number in range(int(low), int(high) + 1)
        ]
    return [
        prefix + name + rest for name in names for rest in _expand_item(suffix)
    ]
