"""Timing on the device's own clock, shared by the training loop, the probes and the micro-benchmarks."""

from __future__ import annotations

import time

import torch


class DeviceClock:
    """Marks in the device's timeline: CUDA events on a GPU (recorded in the stream, read later without a sync per
    step), perf_counter on the CPU, whose kernels run in order on the host."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000  # milliseconds


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
