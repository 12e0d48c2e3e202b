"""Numeric precision of a cell: fp32, autocast bf16/fp16, or pure bf16.

`bf16` and `fp16` keep float32 weights and run eligible ops in the low dtype
under torch.autocast (on CPU as on CUDA); fp16 adds a GradScaler, since its
narrow exponent range underflows small gradients. `bf16-pure` stores weights,
activations and norm statistics in bfloat16 with no float32 master copy: the
setting where a norm's own arithmetic precision shows.
"""

from __future__ import annotations

import contextlib

import torch

LOW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")

    @property
    def storage_dtype(self) -> torch.dtype:
        """The dtype of weights and inputs."""
        return torch.bfloat16 if self.name == "bf16-pure" else torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name in LOW_DTYPES:
            return torch.autocast(self.device.type, dtype=LOW_DTYPES[self.name])
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()  # scale() is the identity when the scaler is off

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients to their true scale before reading them (step() then does not unscale twice)."""
        self.scaler.unscale_(optimizer)  # a no-op when the scaler is off

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """The optimizer step; False when GradScaler skipped it for inf/NaN gradients.

        A disabled scaler steps plainly and keeps its scale at 1, so this is never False then."""
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale  # the scaler backs off exactly when it skipped

    def tf32(self) -> dict | None:
        """Whether float32 matmuls and convolutions may use TF32 (CUDA only): it changes fp32 numbers."""
        if self.device.type != "cuda":
            return None
        return {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
