"""The one norm factory: a name becomes a layer for a given feature count.

Models never name a concrete norm; they receive the callable that
`norm_factory` returns (the torchvision `norm_layer` convention) and call it
with the number of channels or features of the tensor to normalize.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from normbench.config import settings_schema
from normbench.distributed import multi_process
from normbench.plugins import PluginError, is_plugin, load_object

NormLayer = Callable[[int], nn.Module]

# Layouts: "channels" is (N, C, H, W) conv maps, "features" is (N, F) MLP activations,
# "tokens" is (N, T, F) transformer activations.
LAYOUTS = ("channels", "features", "tokens")
NORM_NAMES = tuple(settings_schema()["properties"]["norm"]["anyOf"][0]["enum"])  # the one list of built-in names


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
        # PyTorch's fused rms_norm over (C, H, W) without its per-element gain, then the per-channel gain.
        return F.rms_norm(x, x.shape[1:], eps=self.eps) * self.weight.view(1, -1, 1, 1)


class AnyRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """The base of normbench's own BatchNorms: one class for features (N, C), tokens (N, C, T) and maps (N, C, H, W)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {x.dim()}D")


class CrossProcessBatchNorm(AnyRankBatchNorm):
    """BatchNorm whose training statistics span every process of the default group.

    torch.nn.SyncBatchNorm runs only on CUDA/XPU; this is its CPU (gloo)
    counterpart with the same semantics: mean and biased variance over the
    global batch normalize, the unbiased global variance feeds the running
    estimate. Differentiable (functional) all-reduces carry the gradient through the
    statistics. Two passes (mean, then centred squares) keep the variance exact
    for inputs with a large mean. Outside a process group it is plain BatchNorm;
    on CUDA the training loop swaps it for torch.nn.SyncBatchNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and multi_process()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        local_count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        sums = funcol.all_reduce(torch.cat([x.sum(dims), local_count]), "sum", dist.group.WORLD)
        count = sums[-1]
        mean = sums[:-1] / count
        centred = x - mean.view(shape)
        var = funcol.all_reduce(centred.pow(2).sum(dims), "sum", dist.group.WORLD) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * count / (count - 1), factor)
        y = centred * (var + self.eps).rsqrt().view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


class GhostBatchNorm(AnyRankBatchNorm):
    """BatchNorm whose training statistics come from virtual batches of `ghost_batch` samples (Hoffer et al.
    2017): the noise of small-batch statistics at any real batch size. Each virtual batch updates the running
    statistics in turn (counted as a batch of its own); evaluation uses them as BN does.

    On a GPU every virtual batch is normalized as channels of its own, (n, G*C, ...), in one native BatchNorm pass
    that also returns their statistics (`one_pass`): one launch for all G of them instead of one each, and the running
    statistics' G updates in closed form. On the CPU, where a launch costs nothing, BatchNorm runs on each virtual
    batch in turn: the one pass's two transposes made a ResNet-8 step with ghost batches of 2 slower (25.5 against
    22.2 ms, channels_last, one thread)."""

    def __init__(self, num_features: int, ghost_batch: int | None, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if self.momentum is None:
            raise ValueError(f"{type(self).__name__} needs a momentum: its running statistics follow each virtual "
                             "batch in turn (no cumulative average)")
        self.ghost_batch = ghost_batch

    def _running_before_each(self, running: torch.Tensor, batches: torch.Tensor) -> torch.Tensor:
        """The running estimate before each of G updates with `batches` (G, C) in turn, and after the last: row i
        is (1-m)^i running + m sum_{j<i} (1-m)^(i-1-j) batches[j], the lerp of BN's momentum applied G times."""
        keep = 1.0 - self.momentum
        steps = torch.arange(len(batches) + 1, dtype=batches.dtype, device=batches.device)
        lag = steps[:, None] - 1 - steps[None, :-1]  # i - 1 - j: (G + 1, G)
        weights = torch.where(lag >= 0, self.momentum * keep ** lag.clamp(min=0), 0.0)  # no division: no overflow
        return keep ** steps[:, None] * running + weights @ batches

    def update_running(self, xs: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                       groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Update the running statistics with each virtual batch in turn, from the mean and inverse std that
        BatchNorm's pass over `xs` returned. Returns each virtual batch's mean and std, and the running mean and
        std as they stood before its update, all (G, C)."""
        # In float32 at least and outside autocast, which would run the matmul of _running_before_each in bf16.
        with torch.no_grad(), torch.autocast(xs.device.type, enabled=False):
            dtype = torch.promote_types(self.running_mean.dtype, torch.float32)
            mean, std = mean.to(dtype).view(groups, -1), invstd.to(dtype).reciprocal().view(groups, -1)
            count = xs.numel() / xs.shape[1]
            batch_var = (std.square() - self.eps) * count / (count - 1)
            running_mean = self._running_before_each(self.running_mean.to(dtype), mean)  # (G + 1, C)
            running_var = self._running_before_each(self.running_var.to(dtype), batch_var)
            self.running_mean.copy_(running_mean[-1])
            self.running_var.copy_(running_var[-1])
        return mean, std, running_mean[:-1], (running_var[:-1] + self.eps).sqrt()

    def normalize(self, xs: torch.Tensor, groups: int) -> torch.Tensor:
        """BN of every virtual batch of `xs` (n, G*C, ...), the affine map fused into the same pass."""
        weight, bias = (self.weight.repeat(groups), self.bias.repeat(groups)) if self.affine else (None, None)
        y, mean, invstd = torch.native_batch_norm(xs, weight, bias, None, None, True, 0.0, self.eps)
        self.update_running(xs, mean, invstd, groups)
        self.num_batches_tracked += groups
        return y

    def virtual_batch(self, x: torch.Tensor) -> int:
        """The samples of each virtual batch of `x`, which must split into them evenly, more than one value each."""
        size = self.ghost_batch or x.shape[0]
        if x.shape[0] % size or size * x[0, 0].numel() < 2:
            raise ValueError(f"{type(self).__name__}: a batch of {x.shape[0]} does not split into virtual batches of "
                             f"{size} with more than one value per channel each")
        return size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        size = self.virtual_batch(x)
        if x.device.type == "cpu":
            return torch.cat([super(GhostBatchNorm, self).forward(chunk) for chunk in x.split(size)])
        return self.one_pass(x, size)

    def one_pass(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """Every virtual batch of `size` samples normalized in one pass (`normalize`), in training."""
        groups, channels, rest = x.shape[0] // size, x.shape[1], x.shape[2:]
        xs = x.reshape(groups, -1, channels, *rest).transpose(0, 1).reshape(-1, groups * channels, *rest)
        y = self.normalize(xs, groups)
        y = y.reshape(-1, groups, channels, *rest).transpose(0, 1).reshape(x.shape)
        # The next conv reads channels_last as fast as the input came: keep it (the reshapes above made NCHW).
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y


class NoisyBatchNorm(AnyRankBatchNorm):
    """BatchNorm followed, in training only, by a random per-channel scale and shift drawn afresh every step:
    Santurkar et al. 2018's "noisy BN", which adds distribution shift (non-zero mean, non-unit variance) after
    every BN layer. Their exact distributions are not given in the text; normbench draws the shift from
    U(-SHIFT, SHIFT) and the scale from U(1 / SCALE, SCALE), from the global generator (so seeded and resumable).

    `hold()` fixes one draw until `release()`: a probe that evaluates the same step several times needs the
    same noise each time.
    """

    SHIFT, SCALE = 0.2, 1.2

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.held: tuple[torch.Tensor, torch.Tensor] | None = None

    def draw(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.rand(2, self.num_features, generator=generator).to(self.weight.device, self.weight.dtype)
        shift = (2 * u[0] - 1) * self.SHIFT
        scale = (1 / self.SCALE) + u[1] * (self.SCALE - 1 / self.SCALE)
        return shift, scale

    def hold(self, generator: torch.Generator) -> None:
        self.held = self.draw(generator)

    def release(self) -> None:
        self.held = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if not self.training:
            return y
        shift, scale = self.held or self.draw()
        shape = [1, -1] + [1] * (x.dim() - 2)
        return y * scale.view(shape) + shift.view(shape)


class BatchRenorm(GhostBatchNorm):
    """Batch Renormalization (Ioffe 2017): BN's batch statistics corrected towards the running ones,
    x_hat = (x - mu_B) / sigma_B * r + d, with r = sigma_B / sigma and d = (mu_B - mu) / sigma clipped to
    [1/rmax, rmax] and [-dmax, dmax] and treated as constants in the backward pass. The paper's schedule: plain BN
    (rmax 1, dmax 0) for the first `relax_steps` / 8 steps, then rmax rising linearly to 3 by `relax_steps` and dmax
    to 5 by 5/8 of it (5k, 40k and 25k steps in the paper). A step is one training forward pass
    (num_batches_tracked, which checkpoints keep). With `ghost_batch`, each virtual batch of that many samples is
    renormalized apart (BRN on workers of that batch), the step still counted once."""

    RMAX, DMAX = 3.0, 5.0

    def __init__(self, num_features: int, relax_steps: int = 40_000, ghost_batch: int | None = None,
                 **kwargs) -> None:
        super().__init__(num_features, ghost_batch, **kwargs)
        self.relax_steps = relax_steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """On every device in one pass: r and d of each virtual batch depend on the ones before it."""
        return self.one_pass(x, self.virtual_batch(x)) if self.training else super(GhostBatchNorm, self).forward(x)

    def limits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rmax, dmax) at this layer's current step, as tensors on its device: reading the step to the host would
        wait for the GPU in every layer of every step."""
        step, start = self.num_batches_tracked.float(), self.relax_steps / 8
        ramp = lambda end: ((step - start) / (end - start)).clamp(0.0, 1.0)  # noqa: E731
        return 1.0 + (self.RMAX - 1.0) * ramp(self.relax_steps), self.DMAX * ramp(self.relax_steps * 5 / 8)

    def normalize(self, xs: torch.Tensor, groups: int) -> torch.Tensor:
        """BN's x_hat of each virtual batch, then r and d against the running statistics as they stood before it:
        BRN differentiates through mu_B and sigma_B as BN does, and treats r and d as constants, a scale and shift
        of BN's output."""
        rmax, dmax = self.limits()
        x_hat, mean, invstd = torch.native_batch_norm(xs, None, None, None, None, True, 0.0, self.eps)
        mean, std, running_mean, running_std = self.update_running(xs, mean, invstd, groups)
        r = (std / running_std).clamp(1 / rmax, rmax)
        d = ((mean - running_mean) / running_std).clamp(-dmax, dmax)
        self.num_batches_tracked += 1
        shape = [1, -1] + [1] * (xs.dim() - 2)
        scale, shift = r * self.weight, d * self.weight + self.bias
        return torch.addcmul(shift.view(shape), x_hat, scale.view(shape)).to(xs.dtype)


class FilterResponseNorm(nn.Module):
    """Filter Response Normalization with a Thresholded Linear Unit (Singh & Krishnan 2020), for conv maps:
    x / sqrt(mean over H, W of x^2 + eps), a per-channel gain and bias, then max(y, tau). No mean is subtracted
    and no batch statistic used; the learned threshold tau makes up for the missing centring. The TLU is the
    activation: models put no ReLU right after this layer (`replaces_activation`)."""

    replaces_activation = True

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.tau = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        nu2 = x.pow(2).mean(dim=(2, 3), keepdim=True)
        y = x * torch.rsqrt(nu2 + self.eps) * self.weight.view(shape) + self.bias.view(shape)
        return torch.maximum(y, self.tau.view(shape))


class DynamicTanh(nn.Module):
    """Dynamic Tanh (Zhu et al. 2025), a drop-in for a norm layer without statistics: gamma * tanh(alpha * x) +
    beta, alpha one learnable scalar (0.5 at start, as in the paper), gamma and beta per channel or feature."""

    def __init__(self, num_features: int, channels_first: bool, alpha: float = 0.5) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(alpha))
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.channels_first = channels_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2) if self.channels_first else [-1]
        return torch.tanh(self.alpha * x) * self.weight.view(shape) + self.bias.view(shape)


class _Standardized(nn.Module):
    """The parametrization of Weight Standardization: each output channel's weights with zero mean and unit
    variance (over in-channels x kernel), computed afresh from the raw weights at every use."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, weight.dim()))
        mean = weight.mean(dims, keepdim=True)
        var = weight.var(dims, unbiased=False, keepdim=True)
        return (weight - mean) / (var + self.eps).sqrt()


def standardize_conv_weights(model: nn.Module) -> nn.Module:
    """Weight Standardization (Qiao et al. 2019) of every conv in `model`, through torch's parametrizations: the
    optimizer updates the raw weights, every forward pass sees them standardized."""
    from torch.nn.utils import parametrize

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            parametrize.register_parametrization(module, "weight", _Standardized())
    return model


class FeaturesFirst(nn.Module):
    """Apply a channels-first norm (BatchNorm1d) to (N, T, F) tokens: BN then
    normalizes each feature over batch x tokens, as BN in a transformer does (Shen et al. 2020)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class GhostBatches(nn.Module):
    """A user's batch-statistics norm applied, in training, to each virtual batch of `ghost_batch` samples in turn
    (as GhostBatchNorm does for BN); evaluation passes the whole batch."""

    def __init__(self, norm: nn.Module, ghost_batch: int) -> None:
        super().__init__()
        self.norm, self.ghost_batch = norm, ghost_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.norm(x)
        return torch.cat([self.norm(chunk) for chunk in x.split(self.ghost_batch)])


BATCH_STATISTICS = ("bn", "syncbn", "ghostbn", "brn", "noisybn")  # the built-in norms that train on batch statistics


def uses_batch_statistics(name: str) -> bool:
    """A built-in norm of BATCH_STATISTICS, or a plugin that declares `batch_statistics = True`."""
    if not is_plugin(name):
        return name in BATCH_STATISTICS
    try:
        return bool(getattr(load_object(name), "batch_statistics", False))
    except PluginError:
        return False  # the trial build names what is wrong with it


def plugin_norm(reference: str, layout: str, ghost_batch: int | None = None) -> NormLayer:
    """A user's norm through the same door as the built-ins: called as `obj(num_features, layout=layout)`. An
    object may declare `layouts`, the ones it supports (anything else is refused here, at plan time), and
    `batch_statistics = True` if it normalizes over the batch, so that `ghost_batch` applies to it."""
    norm = load_object(reference)
    supported = getattr(norm, "layouts", LAYOUTS)
    supported = (supported,) if isinstance(supported, str) else tuple(supported)  # ("channels") is a string
    if layout not in supported:
        raise PluginError(f"norm {reference!r} supports the layouts {', '.join(supported)}, not {layout} "
                          f"(its `layouts`)")
    if ghost_batch is not None and not uses_batch_statistics(reference):
        raise PluginError(f"norm {reference!r} declares no batch statistics, so ghost_batch does not apply to it; "
                          f"set `batch_statistics = True` on it if it normalizes over the batch")

    def make(num_features: int) -> nn.Module:
        try:
            module = norm(num_features, layout=layout)
        except Exception as error:  # noqa: BLE001  the user's code: say what call failed
            raise PluginError(f"norm {reference!r}: calling it with ({num_features}, layout={layout!r}) raised "
                              f"{type(error).__name__}: {error}") from None
        if not isinstance(module, nn.Module):
            raise PluginError(f"norm {reference!r} returned a {type(module).__name__}, not a torch.nn.Module")
        return module if ghost_batch is None else GhostBatches(module, ghost_batch)

    return make


def norm_factory(
    name: str,
    layout: str = "channels",
    *,
    gn_groups: int = 8,
    eps: float = 1e-5,
    momentum: float = 0.1,
    ghost_batch: int | None = None,
    brn_relax_steps: int = 40_000,
) -> NormLayer:
    """Return a callable `num_features -> nn.Module` for the named norm.

    ln and in on conv maps are GroupNorm with 1 and C groups (Wu & He 2018's
    definitions: statistics over (C,H,W) and (H,W), a gain and bias per channel).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known layouts: {', '.join(LAYOUTS)}")
    if is_plugin(name):
        return plugin_norm(name, layout, ghost_batch)
    if name not in NORM_NAMES:
        raise ValueError(f"unknown norm {name!r}; known norms: {', '.join(NORM_NAMES)}, or your own as "
                         f"path/to/file.py:Name")
    if name == "in" and layout != "channels":
        raise ValueError(f"norm 'in' (instance norm) needs spatial maps; it is undefined for {layout}")
    if name in ("gn", "gn+ws") and layout == "tokens":
        raise ValueError(f"norm {name!r} on tokens would pool statistics over positions (a decoder would see the "
                         "future even at inference); use ln, rms or bn")
    if name == "frn" and layout != "channels":
        raise ValueError(f"norm 'frn' normalizes each channel over its spatial map; it is undefined for {layout} "
                         "(over one value it would keep only the sign)")
    if name == "gn+ws" and layout != "channels":
        raise ValueError("norm 'gn+ws' standardizes conv weights; use it with conv models (resnet, cnn)")

    def group_norm(num_features: int) -> nn.Module:
        if num_features % gn_groups:
            raise ValueError(
                f"gn_groups={gn_groups} does not divide a layer of {num_features} channels; "
                f"choose gn_groups that divides every layer width"
            )
        return nn.GroupNorm(gn_groups, num_features, eps=eps)

    # normbench's own BatchNorms take any rank: the same layer for conv maps and for features.
    any_rank_layers: dict[str, NormLayer] = {
        "syncbn": lambda c: CrossProcessBatchNorm(c, eps=eps, momentum=momentum),
        "ghostbn": lambda c: GhostBatchNorm(c, ghost_batch, eps=eps, momentum=momentum),
        "noisybn": lambda c: NoisyBatchNorm(c, eps=eps, momentum=momentum),
        "brn": lambda c: BatchRenorm(c, brn_relax_steps, ghost_batch, eps=eps, momentum=momentum),
        "gn": group_norm,
        "none": lambda c: nn.Identity(),
    }
    channel_layers: dict[str, NormLayer] = {
        **any_rank_layers,
        "bn": lambda c: nn.BatchNorm2d(c, eps=eps, momentum=momentum),
        "ln": lambda c: nn.GroupNorm(1, c, eps=eps),
        "in": lambda c: nn.GroupNorm(c, c, eps=eps),
        "rms": lambda c: ChannelRMSNorm(c, eps=eps),
        "gn+ws": group_norm,  # with standardize_conv_weights on the model's convs
        "frn": lambda c: FilterResponseNorm(c),
        "dyt": lambda c: DynamicTanh(c, channels_first=True),
    }
    feature_layers: dict[str, NormLayer] = {
        **any_rank_layers,
        "bn": lambda f: nn.BatchNorm1d(f, eps=eps, momentum=momentum),
        "ln": lambda f: nn.LayerNorm(f, eps=eps),
        "rms": lambda f: nn.RMSNorm(f, eps=eps),
        "dyt": lambda f: DynamicTanh(f, channels_first=False),
    }
    if name == "ghostbn" and ghost_batch is None:
        raise ValueError("norm 'ghostbn' needs ghost_batch (the samples of each virtual batch)")
    if layout == "tokens" and name in ("ghostbn", "noisybn"):
        raise ValueError(f"norm {name!r} is for conv maps and MLP features; use bn on tokens")
    if layout == "tokens" and name in ("bn", "syncbn", "brn"):
        return lambda f: FeaturesFirst(feature_layers[name](f))
    return (channel_layers if layout == "channels" else feature_layers)[name]
