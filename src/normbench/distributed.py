"""Data-parallel cells: one command starts its own workers, or joins an outer torchrun.

`normbench train` with world_size k > 1 starts k workers through torch's
elastic launcher, the machinery behind `torchrun --standalone`: a c10d
rendezvous on localhost port 0 (the OS picks a free port, so parallel cells
never collide), no restarts, and a failed worker stops the others. Under an
outer torchrun (the environment already has RANK and WORLD_SIZE, e.g. on
several nodes) the process is a worker itself.
"""

from __future__ import annotations

import datetime
import os
import signal
import uuid
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch


SHUTDOWN_TIMEOUT_S = 300  # how long stopped workers may take to reach a sync point before they are killed


class Preempted(RuntimeError):
    """The cell stopped on a signal (SIGTERM, SIGUSR1) after saving its checkpoint; rerunning it continues."""


class WorkerFailed(RuntimeError):
    """A worker of a data-parallel cell failed or timed out; the message says which and why."""


@dataclass(frozen=True)
class Worker:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(world_size: int, entrypoint: Callable, *args) -> None:
    """Run entrypoint(*args) in world_size local workers; raise WorkerFailed naming the failed rank."""
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=world_size, run_id=f"normbench-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, start_method="spawn",
        monitor_interval=0.2,
        # SIGUSR1 (SLURM's warning ahead of the time limit) too: the agent passes it on instead of dying of it,
        # and gives the workers time to reach their next sync point and checkpoint before it kills them.
        signals_to_handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )
    try:
        elastic_launch(config, entrypoint)(*args)
    except SignalException as error:  # the launcher's own stop, passed on to the workers
        name = signal.Signals(error.sigval).name
        if error.sigval in (signal.SIGTERM, signal.SIGUSR1):  # the workers' own handlers checkpoint on these
            raise Preempted(f"stopped by {name}: the workers saved the cell's state at their next sync point; run "
                            f"the cell again to continue") from None
        raise WorkerFailed(f"stopped by {name}: the workers ended without a checkpoint since the last evaluation; "
                           f"run the cell again to continue from there") from None
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        message = failure.message["message"] if isinstance(failure.message, dict) else failure.message
        raise WorkerFailed(f"worker rank {rank} of this {world_size}-process cell failed first: "
                           f"{message or f'exit code {failure.exitcode}'}") from None


def join_process_group(device_type: str, timeout_s: float) -> Worker:
    """Join the group the launcher set up (env://): NCCL on CUDA, gloo on CPU.

    The timeout bounds every collective, so a hung worker fails the cell instead of the workflow.
    """
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    worker = Worker(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size())
    if device_type == "cuda":
        torch.cuda.set_device(worker.local_rank)
    return worker


def multi_process() -> bool:
    """Whether this process is one of several workers of a cell."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over workers, in place (a no-op in a single process)."""
    if multi_process():
        dist.all_reduce(tensor)
    return tensor


def mean_over_workers(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over workers, leaving it unchanged; the tensor itself in a single process."""
    if not multi_process():
        return tensor
    return all_reduce_sum(tensor.detach().clone()) / dist.get_world_size()


def any_worker(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on any worker; every worker must ask at the same point of its loop."""
    if not multi_process():
        return flag
    return bool(all_reduce_sum(torch.tensor(float(flag), device=device)).item() > 0)
