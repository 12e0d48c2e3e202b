"""Measurements taken beside training: per-layer gradient norms and unit saturation on every cell, and the
mechanism probes a study turns on (activation percentiles, internal covariate shift and the loss landscape,
BN statistics at inference and BN folding).

A probe rides along an ordinary training step (the first one, at
initialization, and the last one before each evaluation): forward hooks on
the activations count saturated sigmoid units and dead ReLUs, and after the
backward pass each weighted layer's gradient norm is read, from the input
side to the output side. Nothing extra is computed on the other steps.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Iterator

import torch
from torch import nn

from normbench.models import ACTIVATIONS
from normbench.precision import exact_fp32

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


# -- mechanism probes: each runs only where a cell's `probes` setting names it ------------------------------

PERCENTILES = (15, 50, 85)  # Ioffe & Szegedy 2015, Fig. 1
PERCENTILE_UNITS = 8  # units of the last hidden layer whose input distribution is followed
STEP_MULTIPLIERS = (0.5, 1.0, 2.0, 4.0)  # Santurkar et al. 2018: step sizes along the gradient, in learning rates
PRECISE_BN_BATCHES = 200  # fvcore's default for precise BN (Wu & Johnson 2021)


def last_activation(model: nn.Module) -> tuple[str, nn.Module]:
    """The activation of the last hidden layer (the one nearest the output)."""
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, tuple(ACTIVATIONS.values()))]
    if not found:
        raise ValueError("the model has no sigmoid or ReLU to watch")
    return found[-1]


@torch.no_grad()
def percentile_rows(model: nn.Module, inputs: torch.Tensor, step: int) -> list[dict]:
    """The 15th, 50th and 85th percentiles of the inputs to the first PERCENTILE_UNITS units (or channels) of the
    last hidden activation, over `inputs` (fixed test images). BN normalizes with these images' own statistics,
    as in training: at initialization the running statistics hold nothing yet. Dropout is off."""
    network = batch_statistics(model).eval()
    name, activation = last_activation(network)
    seen: list[torch.Tensor] = []
    handle = activation.register_forward_hook(lambda _module, args, _output: seen.append(args[0].detach().float()))
    try:
        network(inputs)
    finally:
        handle.remove()
    values = seen[0].transpose(0, 1).reshape(seen[0].shape[1], -1)[:PERCENTILE_UNITS]  # unit x samples (and positions)
    quantiles = torch.quantile(values, torch.tensor(PERCENTILES, dtype=values.dtype, device=values.device) / 100, dim=1)
    return [{"step": step, "layer": name, "quantity": f"p{p}", "unit": unit, "value": quantiles[i, unit].item()}
            for i, p in enumerate(PERCENTILES) for unit in range(values.shape[0])]


def _loss_and_gradients(model: nn.Module, params: dict[str, torch.Tensor], inputs: torch.Tensor,
                        labels: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    logits = torch.func.functional_call(model, params, (inputs,))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten())
    return loss.item(), dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def _moved(params: dict[str, torch.Tensor], gradients: dict[str, torch.Tensor], step_size: float,
           names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """params after a plain gradient step of `step_size` (only those in `names`, when given)."""
    return {name: (p - step_size * gradients[name]).detach().requires_grad_()
            if names is None or name in names else p for name, p in params.items()}


def _norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def ics_rows(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, lr: float, step: int) -> list[dict]:
    """Santurkar et al. 2018's measurements on one batch, on a copy of the model (training is untouched):

    - internal covariate shift of each weighted layer: its weight gradient G, and G' after every parameter
      before it (in definition order) took a plain gradient step of size `lr` on the same batch; rows
      `ics_l2` = ||G - G'|| and `ics_cos` = cos(G, G');
    - the loss landscape along the gradient g: at steps of STEP_MULTIPLIERS x lr, the loss (`landscape_loss`),
      the gradient change ||g' - g|| (`grad_change`), and `beta`, the largest gradient change per distance
      moved (the effective beta-smoothness), and `loss_range` over those steps and the start.
    """
    probe = copy.deepcopy(model).train()
    device = next(model.parameters()).device
    # Dropout or noise drawn here leaves training's generators alone, the CUDA one included; gradients are
    # compared to float tolerance, so in IEEE float32 even where the cell allows TF32.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), exact_fp32():
        torch.manual_seed(step)
        for module in probe.modules():
            if hasattr(module, "hold"):  # noisy BN: the same noise in every pass of this probe
                module.hold(torch.Generator().manual_seed(step))
        params = {name: p.detach().requires_grad_() for name, p in probe.named_parameters()}
        loss, gradients = _loss_and_gradients(probe, params, inputs, labels)
        names = list(params)
        rows = []
        for index, (layer, _module) in enumerate(weighted_layers(probe)):
            weight = f"{layer}.weight"
            earlier = set(names[:names.index(weight)])
            if not earlier:
                continue  # the first layer has no layers before it
            _, shifted = _loss_and_gradients(probe, _moved(params, gradients, lr, earlier), inputs, labels)
            g, g_shifted = gradients[weight].flatten(), shifted[weight].flatten()
            rows += [{"step": step, "layer_index": index, "layer": layer, "quantity": "ics_l2",
                      "value": (g - g_shifted).norm().item()},
                     {"step": step, "layer_index": index, "layer": layer, "quantity": "ics_cos",
                      "value": torch.nn.functional.cosine_similarity(g, g_shifted, dim=0).item()}]
        gradient_norm, losses, betas = _norm(gradients.values()), [loss], []
        for multiplier in STEP_MULTIPLIERS:
            step_size = multiplier * lr
            moved_loss, moved = _loss_and_gradients(probe, _moved(params, gradients, step_size), inputs, labels)
            change = _norm(moved[name] - gradients[name] for name in names)
            losses.append(moved_loss)
            betas.append(change / (step_size * gradient_norm) if gradient_norm > 0 else math.nan)
            rows += [{"step": step, "quantity": "landscape_loss", "multiplier": multiplier, "value": moved_loss},
                     {"step": step, "quantity": "grad_change", "multiplier": multiplier, "value": change}]
    rows += [{"step": step, "quantity": "loss_range", "value": max(losses) - min(losses)},
             {"step": step, "quantity": "beta", "value": max(betas)}]
    return rows


def precise_bn(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> nn.Module:
    """A copy of `model` whose BN statistics are the training set's, recomputed with frozen weights over up to
    PRECISE_BN_BATCHES batches: torch.optim.swa_utils.update_bn's cumulative average (precise BN)."""
    copied = copy.deepcopy(model)
    count = min(len(inputs) // batch_size, PRECISE_BN_BATCHES)
    torch.optim.swa_utils.update_bn([inputs[i * batch_size:(i + 1) * batch_size] for i in range(count)], copied)
    return copied


def batch_statistics(model: nn.Module) -> nn.Module:
    """A copy of `model` whose BN layers normalize with each evaluated batch's own statistics, even in eval mode."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats, module.running_mean, module.running_var = False, None, None
    return copied


def fold_bn(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with each BN folded into the conv or linear before it
    (torch.fx's fuse, which calls torch.nn.utils.fusion.fuse_conv_bn_eval / fuse_linear_bn_eval)."""
    from torch.fx.experimental.optimization import fuse

    return fuse(copy.deepcopy(model).eval())


@torch.no_grad()
def fold_difference(model: nn.Module, inputs: torch.Tensor) -> float:
    """BN folding's largest output difference on `inputs`, relative to the largest output: C11's equality half, on the
    trained weights. Its speed half is a micro-benchmark (normbench.bench), timed while nothing else runs."""
    unfolded = copy.deepcopy(model).eval()
    with exact_fp32():  # TF32 rounding alone moves outputs by ~1e-3, past C11's 1e-4 bar
        reference = unfolded(inputs)
        return ((fold_bn(model)(inputs) - reference).abs().max() / reference.abs().max()).item()
