"""Every model with every norm runs forward and backward and trains every parameter."""

import copy

import pytest
import torch

from normbench.cells import make_settings
from normbench.config import Settings, SettingsError
from normbench.models import ResNet, build_model
from normbench.norms import NORM_NAMES


CASES = [(model, shape, norm) for model, shape in [("resnet20", (1, 28, 28)), ("resnet20", (3, 32, 32)), ("mlp", (1, 28, 28))]
         for norm in NORM_NAMES if not (model == "mlp" and norm in ("in", "gn+ws", "frn"))]  # these need conv maps


@pytest.mark.parametrize("model,input_shape,norm", CASES)
def test_forward_backward(model, input_shape, norm):
    torch.manual_seed(0)
    ghost_batch = 2 if norm == "ghostbn" else None
    net = build_model(Settings(model=model, norm=norm, width=8, gn_groups=4, ghost_batch=ghost_batch), input_shape, 10)
    logits = net(torch.randn(4, *input_shape))
    assert logits.shape == (4, 10)
    logits.logsumexp(1).mean().backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, f"{name} receives no gradient"


@pytest.mark.parametrize("depth,blocks", [(8, 1), (20, 3), (32, 5)])
def test_resnet_depth_counts_weighted_layers(depth, blocks):
    net = ResNet(depth, 4, 1, 10, torch.nn.BatchNorm2d)
    assert len(net.stages) == 3 * blocks
    convs_on_main_path = 1 + 2 * len(net.stages)  # stem + two per block; the head adds one linear
    assert convs_on_main_path + 1 == depth


def test_resnet_rejects_impossible_depth():
    with pytest.raises(ValueError, match="6n\\+2"):
        ResNet(21, 4, 1, 10, torch.nn.BatchNorm2d)


def test_mlp_depth_and_activation():
    net = build_model(Settings(model="mlp", depth=5, width=12, activation="sigmoid", norm="bn"), (1, 4, 4), 3)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [12] * 5 + [3]
    assert sum(isinstance(m, torch.nn.Sigmoid) for m in net.modules()) == 5


def test_frn_brings_its_own_activation_and_every_other_norm_is_followed_by_relu():
    """FRN's TLU replaces the ReLU after it: a ReLU there would cut the threshold at zero and stop its gradient."""
    frn = build_model(Settings(model="resnet20", norm="frn", width=8), (1, 28, 28), 10)
    bn = build_model(Settings(model="resnet20", norm="bn", width=8), (1, 28, 28), 10)
    assert isinstance(frn.stem[2], torch.nn.Identity) and isinstance(frn.stages[0].act1, torch.nn.Identity)
    assert isinstance(bn.stem[2], torch.nn.ReLU) and isinstance(bn.stages[0].act1, torch.nn.ReLU)
    cnn = build_model(Settings(model="cnn", norm="frn", width=8, depth=3), (1, 28, 28), 10)
    assert not any(isinstance(m, torch.nn.ReLU) for m in cnn.features)


@pytest.mark.parametrize("model", ["resnet", "cnn"])
def test_stem_stride_halves_every_map_and_leaves_the_weights_as_they_were(model):
    """Each norm layer sees maps half as high and wide with stem_stride 2, from the first one to the last; the weights
    (shapes and, from one seed, values) are those of stride 1: only the maps' size changes."""
    sizes, weights = {}, {}
    for stride in (1, 2):
        torch.manual_seed(0)
        net = build_model(Settings(model=model, depth=8, width=4, norm="bn", stem_stride=stride), (1, 28, 28), 10)
        weights[stride], sizes[stride] = copy.deepcopy(net.state_dict()), []  # before a forward moves BN's statistics
        for layer in net.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.register_forward_hook(lambda layer, inputs, output, seen=sizes[stride]:
                                            seen.append(tuple(output.shape[2:])))
        assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert sizes[1][0] == (28, 28) and sizes[2][0] == (14, 14)
    assert [((h + 1) // 2, (w + 1) // 2) for h, w in sizes[1]] == sizes[2]
    assert weights[1].keys() == weights[2].keys()
    assert all(torch.equal(weights[1][name], weights[2][name]) for name in weights[1])


@pytest.mark.parametrize("values, message", [
    ({"model": "mlp", "stem_stride": 2}, "stem_stride.*first conv of cnn and resnet models, not to 'mlp'"),
    ({"model": "vit", "width": 64, "stem_stride": 2}, "stem_stride.*not to 'vit'"),
    ({"model": "resnet", "depth": 8, "stem_stride": 4}, "stem_stride"),  # beyond the 3x3 kernel: pixels skipped
])
def test_a_stem_stride_without_a_stem_or_beyond_its_kernel_is_refused(values, message):
    with pytest.raises(SettingsError, match=message):
        make_settings(values)
