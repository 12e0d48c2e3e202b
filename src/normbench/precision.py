"""Numeric precision of a cell: fp32, autocast bf16/fp16, or pure bf16.

`bf16` and `fp16` keep float32 weights and run eligible ops in the low dtype
under torch.autocast (on CPU as on CUDA); fp16 adds a GradScaler, since its
narrow exponent range underflows small gradients. `bf16-pure` stores weights,
activations and norm statistics in bfloat16 with no float32 master copy: the
setting where a norm's own arithmetic precision shows.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

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

    def step(self, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """The optimizer step. With fp16, a device flag that is True when GradScaler skipped the step for inf/NaN
        gradients (the scaler backs off exactly then), left on the device for the loop to read at its next sync
        point; None without a scaler, which never skips."""
        if not self.scaler.is_enabled():
            optimizer.step()
            return None
        scale = self.scaler._get_scale_async().clone()  # get_scale() would read it to the host: a sync per step
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler._get_scale_async() < scale


# fp32_precision of cuBLAS matmuls and cuDNN convolutions: "ieee" is true float32, "tf32" lets tensor cores round
# inputs to 10 mantissa bits (PyTorch's default for cuDNN convs), which moves fp32 results by about 1e-3.
def _fp32_backends() -> tuple:
    return torch.backends.cuda.matmul, torch.backends.cudnn.conv


@contextlib.contextmanager
def fp32_mode(tf32: bool = False, deterministic: bool = False) -> Iterator[None]:
    """Float32 arithmetic and determinism for the block, restored after it (a cell, or a probe inside one).

    `tf32` False keeps fp32 matmuls and convolutions in IEEE float32 on CUDA. `deterministic` asks every kernel
    for a deterministic algorithm (an error names any op that has none) and turns cuDNN's autotuner off, so a
    rerun on the same GPU is bit-identical."""
    backends = _fp32_backends()
    saved = ([b.fp32_precision for b in backends], (torch.are_deterministic_algorithms_enabled(),
                                                    torch.is_deterministic_algorithms_warn_only_enabled()),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    try:
        for backend in backends:
            backend.fp32_precision = "tf32" if tf32 else "ieee"
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for determinism
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        yield
    finally:
        for backend, value in zip(backends, saved[0]):
            backend.fp32_precision = value
        torch.use_deterministic_algorithms(saved[1][0], warn_only=saved[1][1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def exact_fp32() -> contextlib.AbstractContextManager:
    """IEEE float32 whatever the cell allows: probes that compare outputs or gradients to float tolerance
    (BN folding, ICS) must not see TF32 rounding. Determinism is left as the cell set it."""
    return fp32_mode(tf32=False, deterministic=torch.are_deterministic_algorithms_enabled())


def numerics_record(device: torch.device) -> dict:
    """What decides a cell's float arithmetic beyond its precision, for env.json and the report's provenance
    (TF32 exists on CUDA only)."""
    tf32 = {name: backend.fp32_precision == "tf32" for name, backend in zip(("matmul", "cudnn_conv"), _fp32_backends())}
    return {"tf32": tf32 if device.type == "cuda" else None,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "cudnn_deterministic": torch.backends.cudnn.deterministic}
