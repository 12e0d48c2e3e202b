"""A GPU of its own for each cell that the workflow runs beside others on one machine, or a share of one.

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

Packing (a study's `resources: gpu_share: k`): a cell whose measurements read no
time may share a GPU with up to k - 1 others. It holds the GPU's lock shared
(so no exclusive cell takes that GPU meanwhile) and one of k slot locks of it
(so no more than k cells share it); an exclusive cell waits for every sharer to
leave. Its env.json says it shared a device, and the report times no step of it.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from normbench.config import SettingsError

GPUS_ENV = "NORMBENCH_GPUS"
LOCKS_ENV = "NORMBENCH_GPU_LOCKS"
SHARE_ENV = "NORMBENCH_GPU_SHARE"  # set for the cell's process: env.json records it (provenance.environment)
WAIT_ENV = "NORMBENCH_GPU_WAIT_S"  # how long a claim waits: the workflow's longest cell, else 600 s
_held: list[int] = []  # the lock files' descriptors, open for the life of the process


def _try_lock(path: Path, mode: int) -> int | None:
    """An open descriptor holding `mode` (LOCK_EX or LOCK_SH) on `path`, or None if another process prevents it."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _take(gpu: str, lock_dir: Path, slot: int | None) -> list[int] | None:
    """The locks that give this process `gpu` alone (slot None), or its `slot` beside other sharers."""
    if slot is None:
        fd = _try_lock(lock_dir / f"gpu{gpu}.lock", fcntl.LOCK_EX)
        return None if fd is None else [fd]
    shared = _try_lock(lock_dir / f"gpu{gpu}.lock", fcntl.LOCK_SH)
    if shared is None:
        return None
    fd = _try_lock(lock_dir / f"gpu{gpu}.slot{slot}.lock", fcntl.LOCK_EX)
    if fd is None:
        os.close(shared)
        return None
    return [shared, fd]


def claim_gpus(count: int, gpus: list[str], lock_dir: Path, wait_s: float = 600.0, poll_s: float = 0.2,
               share: int = 1) -> list[str]:
    """Lock `count` distinct GPUs among `gpus` for this process's life and return them: each alone, or with
    `share` > 1 as one of at most `share` cells on it (the first slot of every GPU before any second one, so that
    packed cells spread over the GPUs). A partial claim is let go before waiting again, so two multi-GPU cells
    never hold half of what each needs."""
    if count > len(gpus):
        raise SettingsError(f"setting 'world_size': {count} workers need as many GPUs; this machine has "
                            f"{len(gpus)} ({', '.join(gpus) or 'none'})")
    lock_dir.mkdir(parents=True, exist_ok=True)
    places = [(gpu, None) for gpu in gpus] if share == 1 else [(gpu, slot) for slot in range(share) for gpu in gpus]
    deadline = time.monotonic() + wait_s
    while True:
        taken: dict[str, list[int]] = {}
        for gpu, slot in places:
            if gpu in taken:
                continue
            fds = _take(gpu, lock_dir, slot)
            if fds is None:
                continue
            taken[gpu] = fds
            if len(taken) == count:
                _held.extend(fd for fds in taken.values() for fd in fds)
                return list(taken)
        for fds in taken.values():
            for fd in fds:
                os.close(fd)
        if time.monotonic() > deadline:
            how = "free" if share == 1 else f"shareable (by {share})"
            raise SettingsError(f"no {count} {how} GPU(s) among {', '.join(gpus)} after {wait_s:g} s (locks in "
                                f"{lock_dir}); is another workflow using them?")
        time.sleep(poll_s)


def assign_gpus(world_size: int, device_setting: str, share: int = 1) -> list[str] | None:
    """Under the workflow on a GPU machine, claim the cell's GPUs (alone, or shared by up to `share` cells) and
    make them the only visible ones, before anything starts CUDA; the claimed indices, or None where nothing was
    claimed (a CPU cell, by hand, SLURM)."""
    gpus, locks = os.environ.get(GPUS_ENV), os.environ.get(LOCKS_ENV)
    if device_setting == "cpu" or not gpus or not locks:
        return None
    claimed = claim_gpus(world_size, gpus.split(","), Path(locks), float(os.environ.get(WAIT_ENV, 600)), share=share)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(claimed)
    os.environ[SHARE_ENV] = str(share)
    return claimed
