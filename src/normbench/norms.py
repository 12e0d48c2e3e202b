"""The one norm factory: a name becomes a layer for a given feature count.

Models never name a concrete norm; they receive the callable that
`norm_factory` returns (the torchvision `norm_layer` convention) and call it
with the number of channels or features of the tensor to normalize.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from normbench.config import settings_schema

NormLayer = Callable[[int], nn.Module]

# Layouts: "channels" is (N, C, H, W) conv maps, "features" is (N, F) MLP activations.
LAYOUTS = ("channels", "features")
NORM_NAMES = tuple(settings_schema()["properties"]["norm"]["enum"])  # the one list of names


class ChannelRMSNorm(nn.Module):
    """RMSNorm of a conv map over (C, H, W) per sample with a per-channel gain.

    The conv analogue of RMSNorm (Zhang & Sennrich 2019): LayerNorm's scaling
    without its mean subtraction. torch.nn.RMSNorm would need the spatial size
    and a gain per pixel, which no conv-net norm uses.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.pow(2).mean(dim=(1, 2, 3), keepdim=True).add(self.eps).rsqrt()
        return x * rms * self.weight.view(1, -1, 1, 1)


def norm_factory(
    name: str,
    layout: str = "channels",
    *,
    gn_groups: int = 8,
    eps: float = 1e-5,
    momentum: float = 0.1,
) -> NormLayer:
    """Return a callable `num_features -> nn.Module` for the named norm.

    ln and in on conv maps are GroupNorm with 1 and C groups (Wu & He 2018's
    definitions: statistics over (C,H,W) and (H,W), a gain and bias per channel).
    """
    if name not in NORM_NAMES:
        raise ValueError(f"unknown norm {name!r}; known norms: {', '.join(NORM_NAMES)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known layouts: {', '.join(LAYOUTS)}")
    if name == "in" and layout == "features":
        raise ValueError("norm 'in' (instance norm) needs spatial maps; it is undefined for MLP features")

    def group_norm(num_features: int) -> nn.Module:
        if num_features % gn_groups:
            raise ValueError(
                f"gn_groups={gn_groups} does not divide a layer of {num_features} channels; "
                f"choose gn_groups that divides every layer width"
            )
        return nn.GroupNorm(gn_groups, num_features, eps=eps)

    channel_layers: dict[str, NormLayer] = {
        "bn": lambda c: nn.BatchNorm2d(c, eps=eps, momentum=momentum),
        "gn": group_norm,
        "ln": lambda c: nn.GroupNorm(1, c, eps=eps),
        "in": lambda c: nn.GroupNorm(c, c, eps=eps),
        "rms": lambda c: ChannelRMSNorm(c, eps=eps),
        "none": lambda c: nn.Identity(),
    }
    feature_layers: dict[str, NormLayer] = {
        "bn": lambda f: nn.BatchNorm1d(f, eps=eps, momentum=momentum),
        "gn": group_norm,
        "ln": lambda f: nn.LayerNorm(f, eps=eps),
        "rms": lambda f: nn.RMSNorm(f, eps=eps),
        "none": lambda f: nn.Identity(),
    }
    return (channel_layers if layout == "channels" else feature_layers)[name]
