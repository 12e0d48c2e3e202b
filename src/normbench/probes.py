"""Measurements taken inside training steps: per-layer gradient norms and unit saturation.

A probe rides along an ordinary training step (the first one, at
initialization, and the last one before each evaluation): forward hooks on
the activations count saturated sigmoid units and dead ReLUs, and after the
backward pass each weighted layer's gradient norm is read, from the input
side to the output side. Nothing extra is computed on the other steps.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

WEIGHTED = (nn.Linear, nn.Conv2d)
SATURATION_MARGIN = 0.05  # a sigmoid output within 5% of 0 or 1 passes back at most ~5% of the gradient


def weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear and conv layers in definition order, i.e. from the input side to the output side."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, WEIGHTED)]


class Probe:
    """Watches one training step of `model`: enter watching_activations() around its forward pass,
    read rows() after its backward pass."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.activations: list[dict] = []

    def _hook(self, name: str, module: nn.Module):
        def record(_module, _inputs, output):
            output = output.detach().float()
            if isinstance(module, nn.Sigmoid):
                quantity = "saturated_frac"
                value = ((output < SATURATION_MARGIN) | (output > 1 - SATURATION_MARGIN)).float().mean().item()
            else:  # a unit (feature or channel) is dead on this batch when it is zero for every sample and position
                quantity = "dead_frac"
                value = (output.transpose(0, 1).reshape(output.shape[1], -1) <= 0).all(dim=1).float().mean().item()
            self.activations.append({"layer": name, "quantity": quantity, "value": value})
        return record

    @contextlib.contextmanager
    def watching_activations(self) -> Iterator[None]:
        handles = [module.register_forward_hook(self._hook(name, module))
                   for name, module in self.model.named_modules() if isinstance(module, (nn.Sigmoid, nn.ReLU))]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def rows(self, step: int) -> list[dict]:
        """Tidy rows (step, layer_index, layer, quantity, value): gradient and weight norm of each weighted
        layer, then the saturated or dead fraction of each activation, each counted from the input side."""
        rows = []
        for index, (name, layer) in enumerate(weighted_layers(self.model)):
            if layer.weight.grad is not None:
                rows.append({"step": step, "layer_index": index, "layer": name, "quantity": "grad_norm",
                             "value": layer.weight.grad.float().norm().item()})
            rows.append({"step": step, "layer_index": index, "layer": name, "quantity": "weight_norm",
                         "value": layer.weight.detach().float().norm().item()})
        rows += [{"step": step, "layer_index": index, **activation} for index, activation in enumerate(self.activations)]
        return rows
