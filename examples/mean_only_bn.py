"""An example of your own norm in normbench: mean-only batch normalization (Salimans & Kingma 2016, used with
weight normalization), which subtracts each channel's batch mean and adds a learned bias, without dividing by
the standard deviation.

Name it anywhere a built-in norm goes, e.g. `norm: [bn, "examples/mean_only_bn.py:MeanOnlyBatchNorm"]` in a
study's grid, or `normbench train --set norm=examples/mean_only_bn.py:MeanOnlyBatchNorm ...`. normbench calls
`MeanOnlyBatchNorm(num_features, layout=layout)`, layout being "channels" (N, C, H, W), "features" (N, F) or
"tokens" (N, T, F); `layouts` lists the ones this norm supports, and the rest are refused before any job runs.
`batch_statistics = True` says it normalizes over the batch, so `ghost_batch` applies to it (each virtual batch
normalized on its own in training, as for ghostbn).
"""

import torch
from torch import nn


class MeanOnlyBatchNorm(nn.Module):
    layouts = ("channels", "features")
    batch_statistics = True

    def __init__(self, num_features: int, layout: str, momentum: float = 0.1) -> None:
        super().__init__()
        self.dims = (0, 2, 3) if layout == "channels" else (0,)
        self.momentum = momentum
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.training:
            mean = x.mean(self.dims)
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
        else:
            mean = self.running_mean
        return x - mean.view(shape) + self.bias.view(shape)
