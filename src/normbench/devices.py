"""A GPU of its own for each cell that the workflow runs beside others on one machine.

Nothing else would pick a device: every job would take `cuda:0`. So the
workflow names the machine's GPUs (NORMBENCH_GPUS, e.g. "0,1,2,3", as the
planning process saw them) and a folder of lock files (NORMBENCH_GPU_LOCKS).
Before CUDA starts, a train job takes an exclusive `flock` on one file per GPU
it needs (one per data-parallel worker) and makes those the only visible ones
(CUDA_VISIBLE_DEVICES). The kernel drops a lock when its holder exits, however
it exits, so a failed or killed job frees its GPUs. Snakemake's `gpu` resource
keeps the GPUs in use within the profile's count, so a claim waits only where
another program holds a lock. By hand or under SLURM (which sets
CUDA_VISIBLE_DEVICES per job) the variables are unset and nothing is claimed.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from normbench.config import SettingsError

GPUS_ENV = "NORMBENCH_GPUS"
LOCKS_ENV = "NORMBENCH_GPU_LOCKS"
_held: list[int] = []  # the lock files' descriptors, open for the life of the process


def claim_gpus(count: int, gpus: list[str], lock_dir: Path, wait_s: float = 600.0, poll_s: float = 0.2) -> list[str]:
    """Lock `count` distinct GPUs among `gpus` for this process's life and return them. A partial claim is let go
    before waiting again, so two multi-GPU cells never hold half of what each needs."""
    if count > len(gpus):
        raise SettingsError(f"setting 'world_size': {count} workers need as many GPUs; this machine has "
                            f"{len(gpus)} ({', '.join(gpus) or 'none'})")
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        taken: list[tuple[str, int]] = []
        for gpu in gpus:
            fd = os.open(lock_dir / f"gpu{gpu}.lock", os.O_CREAT | os.O_RDWR, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            taken.append((gpu, fd))
            if len(taken) == count:
                _held.extend(fd for _, fd in taken)
                return [gpu for gpu, _ in taken]
        for _, fd in taken:
            os.close(fd)
        if time.monotonic() > deadline:
            raise SettingsError(f"no {count} free GPU(s) among {', '.join(gpus)} after {wait_s:g} s (locks in "
                                f"{lock_dir}); is another workflow using them?")
        time.sleep(poll_s)


def assign_gpus(world_size: int, device_setting: str) -> list[str] | None:
    """Under the workflow on a GPU machine, claim the cell's GPUs and make them the only visible ones, before
    anything starts CUDA; the claimed indices, or None where nothing was claimed (a CPU cell, by hand, SLURM)."""
    gpus, locks = os.environ.get(GPUS_ENV), os.environ.get(LOCKS_ENV)
    if device_setting == "cpu" or not gpus or not locks:
        return None
    claimed = claim_gpus(world_size, gpus.split(","), Path(locks))
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(claimed)
    return claimed
