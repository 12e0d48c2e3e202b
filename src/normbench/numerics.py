"""How far each norm layer's output drifts from float64 when computed in a lower precision.

Inputs are realistic conv activations (unit spread) shifted by a mean offset:
a large offset is where a one-pass variance (E[x^2] - E[x]^2) loses its digits
to cancellation, so this table shows which layer implementations survive it
in each dtype. Every layer is the one the models use, run in the dtype under
test; the truth is the same layer in float64 on the same (already rounded)
input, so the error is the layer's own arithmetic, not the input's rounding.
"""

from __future__ import annotations

import pandas as pd
import torch

from normbench.norms import norm_factory
from normbench.provenance import device_name

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NORMS = ("bn", "gn", "ln", "in", "rms", "brn", "frn", "dyt")  # gn+ws's layer is gn; its standardization is in the convs
OFFSETS = (0.0, 10.0, 100.0, 1000.0)


def output_errors(shape: tuple[int, int, int, int] = (32, 32, 16, 16), seed: int = 0,
                  device: torch.device = torch.device("cpu")) -> pd.DataFrame:
    """One row per norm x dtype x mean offset: max and mean absolute output error against float64, on `device`
    (the kernels differ between the CPU and CUDA, and so may their errors)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator, dtype=torch.float64).to(device)
    rows = []
    for offset in OFFSETS:
        for norm in NORMS:
            for name, dtype in DTYPES.items():
                x = (base + offset).to(dtype)
                layer = norm_factory(norm, gn_groups=8)(shape[1]).to(device).train()
                with torch.no_grad():
                    truth = layer.double()(x.double())
                    error = (layer.to(dtype)(x).double() - truth).abs()
                rows.append({"norm": norm, "dtype": name, "mean_offset": offset, "device": device_name(device),
                             "max_abs_error": error.max().item(), "mean_abs_error": error.mean().item(),
                             "finite": bool(torch.isfinite(error).all())})
    return pd.DataFrame(rows)
