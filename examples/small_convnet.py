"""An example of your own model in normbench: a small conv net that takes the cell's norm the way torchvision's
models take `norm_layer`.

Name it where a built-in model goes, e.g. `model: "examples/small_convnet.py:build"` with `width` and any `norm`
(built in or your own). normbench calls `build(settings, input_shape, num_classes, norm_layer)`: `settings` is
the cell's Settings (read what you need: width, dropout, ...), `input_shape` is (C, H, W), and
`norm_layer(num_features)` makes the cell's norm for `layout` (conv maps here, the default). A norm that brings its
own activation (FRN's TLU, `replaces_activation = True`) takes the place of the ReLU after it: `activation_after`.
"""

from torch import nn

from normbench.models import activation_after

layout = "channels"  # what this model's norms normalize: (N, C, H, W) conv maps


def build(settings, input_shape, num_classes, norm_layer):
    width = settings.width
    layers, channels = [], input_shape[0]
    for out in (width, 2 * width, 4 * width):
        norm = norm_layer(out)
        layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), norm, activation_after(norm), nn.MaxPool2d(2)]
        channels = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
