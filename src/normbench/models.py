"""Models with a pluggable norm: CIFAR-style ResNets and an MLP.

Every model takes a `norm_layer` (see norms.norm_factory) and never names a
concrete norm, so one model definition serves every cell of a grid.
"""

from __future__ import annotations

import torch
from torch import nn

from normbench.norms import NormLayer, norm_factory, standardize_conv_weights
from normbench.plugins import PluginError, is_plugin, load_module, load_object

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}


def activation_after(norm: nn.Module, activation: type[nn.Module] = nn.ReLU) -> nn.Module:
    """The activation that follows `norm`: none where the norm brings its own (FRN's TLU replaces the ReLU after
    it, Singh & Krishnan 2020; a ReLU after it would cut the TLU's threshold at zero and stop its gradient)."""
    return nn.Identity() if getattr(norm, "replaces_activation", False) else activation()


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; a 1x1 conv + norm projects when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = norm_layer(out_channels)
        self.act1 = activation_after(self.norm1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)  # after the residual sum
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), norm_layer(out_channels)
            )

    def forward(self, x):
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016, §4.2): depth 6n+2, three stages of n blocks at width w, 2w, 4w, after a stem
    conv of stride `stem_stride` (2 halves every map, as the ImageNet ResNets' first conv does)."""

    def __init__(self, depth: int, width: int, in_channels: int, num_classes: int, norm_layer: NormLayer,
                 dropout: float = 0.0, stem_stride: int = 1) -> None:
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, ...), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        stem_norm = norm_layer(width)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, stem_stride, 1, bias=False), stem_norm,
                                  activation_after(stem_norm))
        layers, channels = [], width
        for stage, stage_width in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(channels, stage_width, stride, norm_layer))
                channels = stage_width
        self.stages = nn.Sequential(*layers)
        self.head = classifier(channels, num_classes, dropout)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


def classifier(channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Global average pooling, then (dropout and) one linear layer: a conv net's head."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), *([nn.Dropout(dropout)] if dropout else []),
                         nn.Linear(channels, num_classes))


class MLP(nn.Module):
    """`depth` hidden layers of `width` units: Linear -> norm -> activation (the BN paper's order), then
    dropout when asked."""

    def __init__(self, depth: int, width: int, in_features: int, num_classes: int,
                 norm_layer: NormLayer, activation: str, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        features = in_features
        for _ in range(depth):
            layers += [nn.Linear(features, width), norm_layer(width), ACTIVATIONS[activation]()]
            layers += [nn.Dropout(dropout)] if dropout else []
            features = width
        layers.append(nn.Linear(features, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class PlainCNN(nn.Module):
    """`depth` conv -> norm -> activation layers with no skip connections (He et al. 2016's "plain" nets):
    three stages at width w, 2w, 4w, the first conv of stages 2 and 3 with stride 2, the very first with
    `stem_stride`."""

    def __init__(self, depth: int, width: int, in_channels: int, num_classes: int,
                 norm_layer: NormLayer, activation: str, dropout: float = 0.0, stem_stride: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for index in range(depth):
            stage = min(2, index * 3 // depth)
            stride = stem_stride if index == 0 else 2 if index * 3 // depth != (index - 1) * 3 // depth else 1
            out_channels = width * 2 ** stage
            norm = norm_layer(out_channels)
            layers += [nn.Conv2d(channels, out_channels, 3, stride, 1, bias=False), norm,
                       activation_after(norm, ACTIVATIONS[activation])]
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.head = classifier(channels, num_classes, dropout)

    def forward(self, x):
        return self.head(self.features(x))


def initialize(model: nn.Module, scheme: str) -> None:
    """Re-draw every conv/linear weight by `scheme` (biases to zero); "default" keeps the model's own init."""
    if scheme == "default":
        return
    draw = {
        "normal-0.01": lambda w: nn.init.normal_(w, 0.0, 0.01),
        "normal-0.1": lambda w: nn.init.normal_(w, 0.0, 0.1),
        "normal-1": lambda w: nn.init.normal_(w, 0.0, 1.0),
        "xavier": nn.init.xavier_normal_,  # Glorot & Bengio 2010: variance 2 / (fan_in + fan_out)
        "kaiming": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),  # He et al. 2015: 2 / fan_in
    }[scheme]
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            draw(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


RESNET_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet56": 56}


def make_norm_layer(settings, layout: str) -> NormLayer:
    return norm_factory(settings.norm, layout, gn_groups=settings.gn_groups, eps=settings.norm_eps,
                        momentum=settings.bn_momentum, ghost_batch=settings.ghost_batch,
                        brn_relax_steps=settings.brn_relax_steps)


def plugin_model(settings, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A user's model: `build(settings, input_shape, num_classes, norm_layer)`, handed the cell's norm factory for
    its `layout` (an attribute of `build` or of its module; default channels), as torchvision's models take
    `norm_layer`."""
    build = load_object(settings.model)
    layout = getattr(build, "layout", getattr(load_module(settings.model), "layout", "channels"))
    cell_norm, made = make_norm_layer(settings, layout), []  # and the norms the model asked for

    def norm_layer(num_features: int) -> nn.Module:
        made.append(cell_norm(num_features))
        return made[-1]

    try:
        model = build(settings, input_shape, num_classes, norm_layer)
    except PluginError:
        raise
    except Exception as error:  # noqa: BLE001  the user's code: say what call failed
        raise PluginError(f"model {settings.model!r}: calling it with input shape {input_shape} and {num_classes} "
                          f"classes raised {type(error).__name__}: {error}") from None
    if not isinstance(model, nn.Module):
        raise PluginError(f"model {settings.model!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if not made and settings.norm != "none":
        raise PluginError(f"model {settings.model!r} never called norm_layer, so its cells would train the same "
                          f"model whatever their norm ({settings.norm!r} here); make its norms with norm_layer")
    initialize(model, settings.init)
    return standardize_conv_weights(model) if settings.norm == "gn+ws" else model


def build_model(settings, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the model a cell's settings name, for inputs of shape (C, H, W), or (context,) token ids
    for the language model, whose `num_classes` is the vocabulary size."""
    if is_plugin(settings.model):
        return plugin_model(settings, input_shape, num_classes)
    layout = {"mlp": "features", "vit": "tokens", "gpt": "tokens"}.get(settings.model, "channels")
    norm_layer = make_norm_layer(settings, layout)
    if settings.model == "mlp":
        channels, height, width = input_shape
        model = MLP(settings.depth or 3, settings.width, channels * height * width, num_classes,
                    norm_layer, settings.activation, settings.dropout)
    elif settings.model == "vit":
        channels, height, width = input_shape
        if height % settings.patch_size or width % settings.patch_size:
            raise ValueError(f"patch_size={settings.patch_size} does not tile {height}x{width} images")
        tokens = (height // settings.patch_size) * (width // settings.patch_size)
        model = Transformer(PatchEmbedding(channels, settings.width, settings.patch_size), tokens, settings.width,
                            settings.depth or 4, settings.heads, False, norm_layer, settings.norm_placement,
                            nn.Linear(settings.width, num_classes), pool=True)
    elif settings.model == "gpt":
        model = Transformer(nn.Embedding(num_classes, settings.width), input_shape[0], settings.width,
                            settings.depth or 4, settings.heads, True, norm_layer, settings.norm_placement,
                            nn.Linear(settings.width, num_classes), pool=False)
    elif settings.model == "cnn":
        model = PlainCNN(settings.depth or 9, settings.width, input_shape[0], num_classes, norm_layer,
                         settings.activation, settings.dropout, settings.stem_stride)
    else:
        depth = RESNET_DEPTHS.get(settings.model) or settings.depth
        if depth is None:
            raise ValueError("model 'resnet' needs depth=6n+2 (e.g. depth=44); or name resnet20/32/56")
        model = ResNet(depth, settings.width, input_shape[0], num_classes, norm_layer, settings.dropout,
                       settings.stem_stride)
    initialize(model, settings.init)
    return standardize_conv_weights(model) if settings.norm == "gn+ws" else model


class SelfAttention(nn.Module):
    """Multi-head self-attention; `causal` masks every later token (a decoder's attention)."""

    def __init__(self, width: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        n, t, c = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class Block(nn.Module):
    """A transformer block with the norm before each sublayer (pre) or after each residual sum (post).

    Post is the original Transformer's placement; pre keeps an identity path from
    input to output, which is why it trains without warm-up (Xiong et al. 2020).
    """

    def __init__(self, width: int, heads: int, causal: bool, norm_layer: NormLayer, placement: str) -> None:
        super().__init__()
        self.pre = placement == "pre"
        self.norm1, self.norm2 = norm_layer(width), norm_layer(width)
        self.attention = SelfAttention(width, heads, causal)
        self.feed_forward = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        if self.pre:
            x = x + self.attention(self.norm1(x))
            return x + self.feed_forward(self.norm2(x))
        x = self.norm1(x + self.attention(x))
        return self.norm2(x + self.feed_forward(x))


class Transformer(nn.Module):
    """Blocks over token embeddings with learned positions; pre-norm stacks end with one more norm."""

    def __init__(self, embed: nn.Module, tokens: int, width: int, depth: int, heads: int, causal: bool,
                 norm_layer: NormLayer, placement: str, head: nn.Module, pool: bool) -> None:
        super().__init__()
        self.embed, self.pool, self.head = embed, pool, head
        self.position = nn.Parameter(torch.zeros(1, tokens, width))
        nn.init.normal_(self.position, std=0.02)
        self.blocks = nn.Sequential(*[Block(width, heads, causal, norm_layer, placement) for _ in range(depth)])
        self.final_norm = norm_layer(width) if placement == "pre" else nn.Identity()

    def forward(self, x):
        x = self.embed(x)
        x = self.final_norm(self.blocks(x + self.position[:, :x.shape[1]]))
        return self.head(x.mean(dim=1) if self.pool else x)


class PatchEmbedding(nn.Module):
    """Non-overlapping patch x patch squares, each projected to one token (ViT, Dosovitskiy et al. 2021)."""

    def __init__(self, in_channels: int, width: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)
