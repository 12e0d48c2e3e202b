"""Where a number came from: versions, device, code commit, host and time."""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
from importlib.metadata import version
from pathlib import Path

import torch

import normbench


def git_commit() -> str | None:
    """The commit of the normbench checkout, with '-dirty' when it has uncommitted changes."""
    here = Path(normbench.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version (nvidia-smi's), where there is one."""
    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return found[0] if found else None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def environment(device: torch.device) -> dict:
    """Provenance of a cell. CUDA and cuDNN versions are those torch was built with; on a CPU cell nothing used
    them, so their keys say `_build`."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    suffix = "" if device.type == "cuda" else "_build"
    return {
        "normbench": normbench.__version__,
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        f"cuda{suffix}": torch.version.cuda,
        f"cudnn{suffix}": cudnn,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "device": str(device),
        "device_name": device_name(device),
        # Which physical GPUs the cell saw (the workflow gives each cell its own) and the one it used.
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        # 1: the cell had its GPU(s) alone; k > 1: it shared them with up to k - 1 packed cells (no timing counts).
        "gpu_share": int(os.environ.get("NORMBENCH_GPU_SHARE", "1")),
        "device_uuid": str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else None,
        "driver": nvidia_driver() if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],  # what else ran on the machine as the cell started
        "git_commit": git_commit(),
        "host": socket.gethostname(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
