"""Several processes for one training run: ``NPROC_PER_NODE=N osstune sft ...`` relaunches itself under torchrun.

The launcher reads ms-swift's environment variables (``NPROC_PER_NODE``, ``NNODES``, ``NODE_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``; ``CUDA_VISIBLE_DEVICES`` is inherited by every worker) and runs what
``python -m torch.distributed.run ... -m osstune sft FLAGS`` runs, with the flags rebuilt from the parsed
configuration, so a ``--config`` file and aliases reach the workers already resolved. torchrun's launcher runs in
this process (no second interpreter start): its agent forwards SIGINT/SIGTERM to every worker and this process
exits with the signal's code, or with the first failed worker's code, without torchrun's tracebacks. Workers see
``LOCAL_RANK`` and never relaunch.

Rank discipline inside the workers: the process group is started before anything is written
(:func:`init_distributed`), rank 0 creates the run folder and sends its path to the others
(:func:`shared_run_dir`), and each node's local rank 0 prepares the dataset cache before the other ranks read it
(:func:`local_main_first`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import socket
import sys
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from osstune.errors import OsstuneError

T = TypeVar("T")

PROCESS_GROUP_TIMEOUT_S = 1800
"""Timeout of collective operations, as the Hugging Face Trainer's default ``ddp_timeout``."""

SHUTDOWN_TIMEOUT_S = 300
"""Seconds torchrun gives workers after forwarding SIGINT/SIGTERM before it kills them: enough to finish the step
and write a checkpoint. ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` in the environment takes precedence."""

WORKER_MARKERS = ("LOCAL_RANK", "RANK")
"""Variables torchrun sets in its workers; with either present, this process is a worker and never relaunches."""


@dataclass(frozen=True)
class LaunchPlan:
    """How torchrun is started on this node.

    Args:
        nproc_per_node: worker processes on this node (one per GPU).
        nnodes: nodes taking part.
        node_rank: this node's index, 0 to ``nnodes - 1``.
        master_addr: address of node 0, where rendezvous happens.
        master_port: its port.
    """

    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int

    @property
    def world_size(self) -> int:
        """Worker processes over all nodes."""
        return self.nproc_per_node * self.nnodes


@dataclass(frozen=True)
class RankInfo:
    """Where this process stands in a (possibly single-process) run, from torchrun's environment.

    Args:
        rank: global rank (0 without torchrun).
        local_rank: rank on this node.
        world_size: processes over all nodes (1 without torchrun).
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run folder's files (global rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether several processes train together."""
        return self.world_size > 1


def rank_info(env: Mapping[str, str] | None = None) -> RankInfo:
    """This process's rank, local rank and world size from ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``.

    Args:
        env: the environment (default ``os.environ``).
    """
    env = os.environ if env is None else env
    return RankInfo(rank=_env_int(env, "RANK", 0), local_rank=_env_int(env, "LOCAL_RANK", 0),
                    world_size=_env_int(env, "WORLD_SIZE", 1))


def launch_plan(env: Mapping[str, str] | None = None) -> LaunchPlan | None:
    """The torchrun launch that ``env`` asks for, or None when this process should train by itself.

    None when neither ``NPROC_PER_NODE`` > 1 nor ``NNODES`` > 1 is set, or when this process already is a torchrun
    worker (``LOCAL_RANK`` or ``RANK`` set). ``NPROC_PER_NODE`` defaults to 1 and ``NODE_RANK`` to 0. On one node
    ``MASTER_ADDR`` defaults to 127.0.0.1 and ``MASTER_PORT`` to a free port; several nodes need both set.

    Args:
        env: the environment (default ``os.environ``).

    Raises:
        OsstuneError: a value that is not a positive integer, ``NODE_RANK`` outside the nodes, several nodes
            without ``MASTER_ADDR``/``MASTER_PORT``, or more processes than ``CUDA_VISIBLE_DEVICES`` lists.
    """
    env = os.environ if env is None else env
    if any(env.get(name, "").strip() for name in WORKER_MARKERS):
        return None
    nproc = _env_int(env, "NPROC_PER_NODE", 1)
    nnodes = _env_int(env, "NNODES", 1)
    if nproc < 1 or nnodes < 1:
        raise OsstuneError(f"NPROC_PER_NODE={nproc}, NNODES={nnodes}: both must be at least 1.")
    if nproc == 1 and nnodes == 1:
        return None
    node_rank = _env_int(env, "NODE_RANK", 0)
    if not 0 <= node_rank < nnodes:
        raise OsstuneError(f"NODE_RANK={node_rank}: must be between 0 and NNODES-1 ({nnodes - 1}).")
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if visible and nproc > len(visible):
        raise OsstuneError(f"NPROC_PER_NODE={nproc} but CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} lists "
                           f"{len(visible)} device(s): use one process per GPU.")
    addr = env.get("MASTER_ADDR", "").strip()
    port_text = env.get("MASTER_PORT", "").strip()
    if nnodes > 1 and not (addr and port_text):
        raise OsstuneError(f"NNODES={nnodes}: set MASTER_ADDR and MASTER_PORT to node 0's address and a free port "
                           "there, the same on every node.")
    port = _env_int(env, "MASTER_PORT", 0) if port_text else free_port()
    if not 0 < port < 65536:
        raise OsstuneError(f"MASTER_PORT={port}: not a TCP port.")
    return LaunchPlan(nproc_per_node=nproc, nnodes=nnodes, node_rank=node_rank, master_addr=addr or "127.0.0.1",
                      master_port=port)


def torchrun_arguments(plan: LaunchPlan, flags: Sequence[str]) -> list[str]:
    """torchrun's arguments that run ``osstune sft FLAGS`` in ``plan.nproc_per_node`` workers on this node.

    Args:
        plan: the launch (see :func:`launch_plan`).
        flags: the ``osstune sft`` flags (see :func:`config_flags`).
    """
    return ["--nproc_per_node", str(plan.nproc_per_node), "--nnodes", str(plan.nnodes),
            "--node_rank", str(plan.node_rank), "--master_addr", plan.master_addr,
            "--master_port", str(plan.master_port), "-m", "osstune", "sft", *flags]


def torchrun_command(arguments: Sequence[str], python: str | None = None) -> list[str]:
    """The shell command equivalent to :func:`relaunch` with ``arguments`` (printed for the user).

    Args:
        arguments: torchrun's arguments (see :func:`torchrun_arguments`).
        python: the interpreter (default: this one).
    """
    return [python or sys.executable, "-m", "torch.distributed.run", *arguments]


def config_flags(groups: Sequence[Any]) -> list[str]:
    """Command-line flags that reproduce flag-group instances: ``--name value`` for every non-default field.

    Booleans become ``true``/``false``, None ``none``, lists one value per item, floats their exact ``repr``.

    Args:
        groups: dataclass instances whose fields are flags (see :mod:`osstune.config`).

    Raises:
        OsstuneError: a list emptied (e.g. by ``--config``) where the default is not empty, which no command line
            can say.
    """
    flags: list[str] = []
    for group in groups:
        for field in dataclasses.fields(group):
            value = getattr(group, field.name)
            factory: Callable[[], Any] = field.default_factory  # type: ignore[assignment]
            default = field.default if field.default is not dataclasses.MISSING else factory()
            if value == default:
                continue
            if isinstance(value, list):
                if not value:
                    raise OsstuneError(f"--{field.name}: an empty list cannot be passed to the worker processes; "
                                       "give at least one value.")
                flags += [f"--{field.name}", *(_flag_text(v) for v in value)]
            else:
                flags += [f"--{field.name}", _flag_text(value)]
    return flags


def relaunch(arguments: Sequence[str]) -> int:
    """Run torchrun's launcher in this process and return the exit code of the whole run.

    torchrun starts each worker in its own session; a SIGINT/SIGTERM sent to this process (or Ctrl-C) reaches the
    workers once, through torchrun's agent, and each saves a checkpoint at the end of the step and stops. The agent
    waits ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds (set to :data:`SHUTDOWN_TIMEOUT_S` when unset) before it kills
    workers that are still running.

    Args:
        arguments: torchrun's arguments (see :func:`torchrun_arguments`).

    Returns:
        0 when every worker succeeded; 130 or 143 when stopped by SIGINT or SIGTERM; else the exit code of the first
        worker that failed (128 + N when it was killed by signal N).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    try:
        run(parse_args(list(arguments)))
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        print(f"worker rank {rank} failed with exit code {code}; its error is printed above.", file=sys.stderr)
        return code
    return 0


def single_process_rendezvous(env: MutableMapping[str, str] | None = None) -> bool:
    """Give a lone process the rendezvous variables a launcher would set (``RANK=0``, ``LOCAL_RANK=0``,
    ``WORLD_SIZE=1``, ``MASTER_ADDR=127.0.0.1`` and a free ``MASTER_PORT``), unless a launcher already did.

    DeepSpeed starts a process group even for one process; without these variables it probes for MPI instead.

    Args:
        env: the environment to complete (``os.environ`` when None).

    Returns:
        Whether the variables were set.
    """
    env = os.environ if env is None else env
    if any(marker in env for marker in WORKER_MARKERS):
        return False
    env.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
                "MASTER_PORT": env.get("MASTER_PORT", str(free_port()))})
    return True


def free_port() -> int:
    """A TCP port that is free on this machine right now (for a single-node rendezvous)."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_distributed(info: RankInfo) -> None:
    """Start the process group of a torchrun worker (NCCL on GPUs, gloo on CPU) before anything is written.

    The Hugging Face Trainer later finds it started and keeps it. Does nothing in a single process or when the group
    already exists.

    Args:
        info: this process's rank (see :func:`rank_info`).
    """
    import torch
    import torch.distributed as dist

    if not info.distributed or dist.is_initialized():
        return
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available(), timeout=_dt.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))


def barrier(info: RankInfo) -> None:
    """Wait until every process arrives here (nothing in a single process).

    Args:
        info: this process's rank.
    """
    if info.distributed:
        import torch.distributed as dist

        dist.barrier()


def broadcast_from_main(info: RankInfo, make: Callable[[], T]) -> T:
    """Run ``make`` on rank 0 only and give its (picklable) result to every rank.

    Args:
        info: this process's rank.
        make: what rank 0 computes, e.g. creating the run folder.
    """
    if not info.distributed:
        return make()
    import torch.distributed as dist

    box: list[Any] = [make() if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shared_run_dir(info: RankInfo, output_dir: Path) -> Path:
    """The run folder ``v{N}-{timestamp}``: created by rank 0, the same path on every rank.

    Several nodes need ``output_dir`` on a filesystem they share: checkpoints are written by rank 0 and read by all
    ranks on resume.

    Args:
        info: this process's rank.
        output_dir: ``--output_dir``.
    """
    from osstune.train.run_dir import new_run_dir

    return Path(broadcast_from_main(info, lambda: str(new_run_dir(output_dir))))


@contextmanager
def local_main_first(info: RankInfo) -> Iterator[bool]:
    """Run the body on each node's local rank 0 first, then on the node's other ranks (e.g. to fill a cache once).

    Args:
        info: this process's rank.

    Yields:
        Whether this process is its node's local rank 0.
    """
    first = info.local_rank == 0
    if not first:
        barrier(info)
    yield first
    if first:
        barrier(info)


def _flag_text(value: Any) -> str:
    """One flag value as the parser reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return repr(value) if isinstance(value, float) else str(value)


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    """An integer environment variable, ``default`` when unset or empty.

    Raises:
        OsstuneError: the value is not an integer.
    """
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise OsstuneError(f"{name}={text}: expected an integer.") from None
