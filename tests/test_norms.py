"""Every norm against a float64 reference written from its definition, forward and backward."""

import pytest
import torch

from normbench.norms import (NORM_NAMES, BatchRenorm, ChannelRMSNorm, DynamicTanh, FilterResponseNorm, GhostBatchNorm,
                             NoisyBatchNorm, norm_factory, standardize_conv_weights)

EPS = 1e-5
GHOST_BATCH = 3
# noisybn, frn and dyt have parameters of their own and are tested on their own below; brn at its first step is BN,
# and gn+ws's norm layer is GN (its weight standardization is in the convs, tested below).
DETERMINISTIC_NORMS = [name for name in NORM_NAMES if name not in ("noisybn", "frn", "dyt")]
CONV_ONLY = ("in", "gn+ws")


def reference(name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int) -> torch.Tensor:
    """Normalize x (N, C, *) by the statistics each norm's paper defines; biased variance throughout."""
    n, c = x.shape[:2]
    if name == "none":
        return x
    if name == "rms":
        dims = tuple(range(1, x.ndim))
        y = x / torch.sqrt(x.pow(2).mean(dims, keepdim=True) + EPS)
        return y * weight.view(1, c, *[1] * (x.ndim - 2))
    if name == "ghostbn":  # BN of each virtual batch
        return torch.cat([reference("bn", chunk, weight, bias, groups) for chunk in x.split(GHOST_BATCH)])
    if name in ("bn", "syncbn", "brn"):  # syncbn is plain BatchNorm in a single process; brn at rmax 1, dmax 0
        dims = (0, *range(2, x.ndim))
        mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
        y = (x - mean) / torch.sqrt(var + EPS)
    else:
        g = {"gn": groups, "gn+ws": groups, "ln": 1, "in": c}[name]
        grouped = x.reshape(n, g, -1)
        mean, var = grouped.mean(-1, keepdim=True), grouped.var(-1, unbiased=False, keepdim=True)
        y = ((grouped - mean) / torch.sqrt(var + EPS)).reshape(x.shape)
    shape = (1, c, *[1] * (x.ndim - 2))
    return y * weight.view(shape) + bias.view(shape)


CASES = [(name, "channels", (6, 8, 5, 5)) for name in DETERMINISTIC_NORMS] + [
    (name, "features", (18, 8)) for name in DETERMINISTIC_NORMS if name not in CONV_ONLY
]


@pytest.mark.parametrize("name,layout,shape", CASES)
def test_norm_matches_float64_reference(name, layout, shape):
    torch.manual_seed(0)
    ghost_batch = GHOST_BATCH if name == "ghostbn" else None
    layer = norm_factory(name, layout, gn_groups=4, eps=EPS, ghost_batch=ghost_batch)(shape[1]).double().train()
    params = dict(layer.named_parameters())
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.randn_like(p))
    weight = params.get("weight", torch.ones(shape[1], dtype=torch.float64))
    bias = params.get("bias", torch.zeros(shape[1], dtype=torch.float64))
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 2).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    w_ref, b_ref = weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()

    out, out_ref = layer(x), reference(name, x_ref, w_ref, b_ref, groups=4)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)

    upstream = torch.randn(shape, dtype=torch.float64)
    out.backward(upstream)
    out_ref.backward(upstream)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-9)
    if "weight" in params:
        torch.testing.assert_close(params["weight"].grad, w_ref.grad, rtol=1e-9, atol=1e-9)
    if "bias" in params:
        torch.testing.assert_close(params["bias"].grad, b_ref.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("layout,shape", [("channels", (6, 8, 5, 5)), ("features", (18, 8))])
def test_float32_norms_stay_close_to_float64(layout, shape):
    """The float32 layers a model uses, against the same layer in float64, on inputs with an offset."""
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 5
    for name in DETERMINISTIC_NORMS:
        if name in CONV_ONLY and layout == "features":
            continue
        ghost_batch = GHOST_BATCH if name == "ghostbn" else None
        layer = norm_factory(name, layout, gn_groups=4, ghost_batch=ghost_batch)(shape[1])
        expected = layer.double()(x)
        torch.testing.assert_close(layer.float()(x.float()).double(), expected, rtol=1e-4, atol=1e-4)


def test_batchnorm_running_statistics_use_unbiased_variance():
    torch.manual_seed(2)
    x = torch.randn(10, 3, 4, 4, dtype=torch.float64)
    layer = norm_factory("bn", momentum=0.25)(3).double().train()
    layer(x)
    torch.testing.assert_close(layer.running_mean, 0.25 * x.mean((0, 2, 3)))
    torch.testing.assert_close(layer.running_var, 0.75 + 0.25 * x.var((0, 2, 3), unbiased=True))


def test_batch_independence_of_group_norms():
    """GN/LN/IN/RMS normalize each sample alone: a sample's output ignores the rest of the batch."""
    torch.manual_seed(3)
    x = torch.randn(4, 8, 5, 5)
    for name in ("gn", "ln", "in", "rms"):
        layer = norm_factory(name, gn_groups=4)(8)
        torch.testing.assert_close(layer(x)[:1], layer(x[:1]))
    bn = norm_factory("bn")(8).train()
    assert not torch.allclose(bn(x)[:1], bn(x[:1]))


def test_channel_rmsnorm_matches_torch_rmsnorm_with_per_channel_gain():
    torch.manual_seed(4)
    x = torch.randn(3, 4, 5, 6)
    ours = ChannelRMSNorm(4, eps=EPS)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(4))
    theirs = torch.nn.RMSNorm((4, 5, 6), eps=EPS)
    with torch.no_grad():
        theirs.weight.copy_(ours.weight.view(4, 1, 1).expand(4, 5, 6))
    torch.testing.assert_close(ours(x), theirs(x))


def test_unknown_norm_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown norm 'batchnorm'; known norms: bn, syncbn, ghostbn, noisybn, brn, gn"):
        norm_factory("batchnorm")


def test_group_count_must_divide_channels():
    make = norm_factory("gn", gn_groups=3)
    with pytest.raises(ValueError, match=r"gn_groups=3 does not divide a layer of 8 channels"):
        make(8)
    assert isinstance(make(9), torch.nn.GroupNorm)


def test_instance_norm_needs_spatial_maps():
    with pytest.raises(ValueError, match="needs spatial maps"):
        norm_factory("in", "features")


def test_low_precision_error_table():
    from normbench.numerics import DTYPES, NORMS, OFFSETS, output_errors

    table = output_errors(shape=(8, 16, 6, 6))
    assert len(table) == len(NORMS) * len(DTYPES) * len(OFFSETS)
    by = table.set_index(["norm", "dtype", "mean_offset"])["max_abs_error"]
    for norm in NORMS:
        assert by[norm, "fp32", 0.0] < 1e-5
        assert by[norm, "bf16", 0.0] > 100 * by[norm, "fp32", 0.0]  # 8 mantissa bits against 24
    # x**2 = 1e6 would overflow float16 (max 65504); the fused rms_norm accumulates in float32, so it survives.
    assert by["rms", "fp16", 1000.0] < 0.01


def test_noisy_batchnorm_draws_new_noise_each_step_and_none_in_eval():
    """Noisy BN is BN times a per-channel scale plus a shift, both redrawn every training step; eval is plain BN."""
    torch.manual_seed(3)
    layer = norm_factory("noisybn", "channels")(4)
    bn = norm_factory("bn", "channels")(4)
    x = torch.randn(8, 4, 3, 3)
    first, second = layer(x), layer(x)
    assert not torch.allclose(first, second)  # new noise on the second step
    bn(x)
    plain = bn(x)  # as many training steps as the noisy layer took: the same running statistics
    # Per channel the noisy output is an affine function of BN's output: a scale and a shift, not unit/zero.
    for out in (first, second):
        flat, ref = out.transpose(0, 1).reshape(4, -1), plain.detach().transpose(0, 1).reshape(4, -1)
        scale = (flat.std(dim=1) / ref.std(dim=1))
        shift = flat.mean(dim=1) - scale * ref.mean(dim=1)
        torch.testing.assert_close(flat, scale[:, None] * ref + shift[:, None], rtol=1e-4, atol=1e-4)
        assert (scale - 1).abs().max() > 0.05 and shift.abs().max() > 0.05
    layer.eval(), bn.eval()
    torch.testing.assert_close(layer(x), bn(x))  # no noise in eval


def test_noisy_batchnorm_holds_one_draw_until_released():
    layer = NoisyBatchNorm(4)
    x = torch.randn(8, 4)
    layer.hold(torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer(x), layer(x))
    layer.release()
    assert not torch.allclose(layer(x), layer(x))


def test_batch_renorm_relaxes_on_the_papers_schedule_and_corrects_towards_running_statistics():
    layer = BatchRenorm(4, relax_steps=800, momentum=0.5).double().train()
    schedule = {}
    for step in (0, 100, 450, 500, 800, 5000):  # plain BN until 1/8; dmax full at 5/8; rmax full at the end
        layer.num_batches_tracked.fill_(step)
        schedule[step] = tuple(float(limit) for limit in layer.limits())
    assert schedule[0] == schedule[100] == (1.0, 0.0)
    assert schedule[450] == pytest.approx((2.0, 5.0 * 350 / 400)) and schedule[500][1] == 5.0
    assert schedule[800] == schedule[5000] == (3.0, 5.0)

    torch.manual_seed(5)
    x = (torch.randn(6, 4, 3, 3, dtype=torch.float64) * 2 + 1).requires_grad_()
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.5, 1.0, 1.5, -30.0]))
        layer.running_var.copy_(torch.tensor([1.0, 9.0, 0.25, 4.0]))
        layer.weight.copy_(torch.randn(4))
        layer.bias.copy_(torch.randn(4))
    layer.num_batches_tracked.fill_(450)  # rmax 2, dmax 4.375
    mu, sigma = layer.running_mean.clone(), (layer.running_var + layer.eps).sqrt()
    mean, std = x.detach().mean((0, 2, 3)), (x.detach().var((0, 2, 3), unbiased=False) + layer.eps).sqrt()
    r, d = (std / sigma).clamp(0.5, 2.0), ((mean - mu) / sigma).clamp(-4.375, 4.375)
    assert (r != std / sigma).any() and (d != (mean - mu) / sigma).any()  # the clips bite in this case
    shape = (1, 4, 1, 1)
    x_ref = x.detach().clone().requires_grad_()
    batch_mean, batch_std = x_ref.mean((0, 2, 3)), (x_ref.var((0, 2, 3), unbiased=False) + layer.eps).sqrt()
    expected = ((x_ref - batch_mean.view(shape)) / batch_std.view(shape) * r.view(shape) + d.view(shape)) \
        * layer.weight.detach().view(shape) + layer.bias.detach().view(shape)
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    expected.backward(upstream)  # r and d are constants of the backward pass
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-9)
    assert int(layer.num_batches_tracked) == 451
    torch.testing.assert_close(layer.running_mean, 0.5 * mu + 0.5 * mean)
    layer.eval()  # inference: the running statistics, as BN
    torch.testing.assert_close(layer(x.detach()), torch.nn.functional.batch_norm(
        x.detach(), layer.running_mean, layer.running_var, layer.weight, layer.bias, eps=layer.eps))


@pytest.mark.parametrize("layout, shape", [("channels", (3, 4, 5, 5)), ("features", (3, 4)), ("tokens", (3, 7, 4))])
def test_dynamic_tanh_matches_its_definition_with_alpha_from_one_half(layout, shape):
    layer = norm_factory("dyt", layout)(4).double()
    assert isinstance(layer, DynamicTanh) and layer.alpha.item() == 0.5 and layer.alpha.numel() == 1
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 5.0))
        layer.bias.copy_(torch.arange(4.0))
    x = torch.randn(shape, dtype=torch.float64) * 4
    feature_shape = (1, 4, 1, 1) if layout == "channels" else (4,)
    expected = torch.tanh(0.5 * x) * torch.arange(1.0, 5.0).view(feature_shape) + torch.arange(4.0).view(feature_shape)
    torch.testing.assert_close(layer(x), expected.double(), rtol=1e-12, atol=1e-12)


def test_weight_standardization_gives_each_output_channel_zero_mean_and_unit_variance():
    torch.manual_seed(7)
    model = standardize_conv_weights(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 5, 1)))
    for conv in model:
        raw = conv.parametrizations.weight.original
        with torch.no_grad():
            raw.mul_(7).add_(3)  # any scale and offset of the raw weights
        weight = conv.weight.double()  # what the forward pass uses
        flat = weight.flatten(1)
        torch.testing.assert_close(flat.mean(1), torch.zeros(len(flat), dtype=torch.float64), atol=1e-6, rtol=0)
        torch.testing.assert_close(flat.var(1, unbiased=False), torch.ones(len(flat), dtype=torch.float64),
                                   atol=1e-4, rtol=0)
    assert any(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in model.parameters())


def test_batch_renorm_over_ghost_batches_is_ghost_batch_norm_before_it_relaxes():
    torch.manual_seed(8)
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64) * 2 + 1
    brn = norm_factory("brn", ghost_batch=GHOST_BATCH, brn_relax_steps=800)(4).double().train()
    ghost = norm_factory("ghostbn", ghost_batch=GHOST_BATCH)(4).double().train()
    torch.testing.assert_close(brn(x), ghost(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(brn.running_mean, ghost.running_mean)  # each virtual batch updated them in turn
    assert int(brn.num_batches_tracked) == 1  # one step of the schedule, however many virtual batches


def test_filter_response_norm_with_tlu_matches_its_definition():
    torch.manual_seed(6)
    layer = FilterResponseNorm(4).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p))
    x = (torch.randn(3, 4, 5, 5, dtype=torch.float64) * 3).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    shape = (1, 4, 1, 1)
    y = x_ref / torch.sqrt(x_ref.pow(2).mean((2, 3), keepdim=True) + 1e-6) * layer.weight.detach().view(shape) \
        + layer.bias.detach().view(shape)
    expected = torch.maximum(y, layer.tau.detach().view(shape))
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    expected.backward(upstream)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    assert layer.tau.grad.abs().sum() > 0  # the threshold learns where it bites
    torch.testing.assert_close(layer(x[:1]), layer(x)[:1])  # no batch statistics
    with pytest.raises(ValueError, match="norm 'frn' normalizes each channel over its spatial map"):
        norm_factory("frn", "features")


@pytest.mark.parametrize("momentum, virtual_batches", [(0.1, 4), (0.9, 64)])
def test_batch_renorm_over_virtual_batches_equals_one_virtual_batch_after_another(momentum, virtual_batches):
    """The one-pass form against its definition: each virtual batch renormalized against the running statistics
    as the ones before it left them, after the schedule relaxed (r and d clipped), with many virtual batches."""
    torch.manual_seed(9)
    x = torch.randn(2 * virtual_batches, 3, 2, 2, dtype=torch.float64) * 2 + 1
    layer = BatchRenorm(3, relax_steps=8, ghost_batch=2, momentum=momentum).double().train()
    one_at_a_time = BatchRenorm(3, relax_steps=8, momentum=momentum).double().train()
    for brn in (layer, one_at_a_time):
        brn.num_batches_tracked.fill_(7)  # relaxed: rmax about 2.7, dmax 5
        with torch.no_grad():
            brn.running_mean.copy_(torch.tensor([3.0, -1.0, 0.2]))
            brn.running_var.copy_(torch.tensor([0.5, 4.0, 1.0]))
    expected = []
    for chunk in x.split(2):
        one_at_a_time.num_batches_tracked.fill_(7)
        expected.append(one_at_a_time(chunk))
    torch.testing.assert_close(layer(x), torch.cat(expected), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(layer.running_mean, one_at_a_time.running_mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(layer.running_var, one_at_a_time.running_var, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(layer.running_var).all() and int(layer.num_batches_tracked) == 8


@pytest.mark.parametrize("one_pass", [False, True])
@pytest.mark.parametrize("shape, channels_last", [((16, 3, 4, 4), False), ((16, 3, 4, 4), True), ((16, 5), False)])
def test_ghost_batch_norm_is_torch_batch_norm_on_one_virtual_batch_after_another(shape, channels_last, device,
                                                                                  one_pass):
    """Both forms (the GPU's one pass, which the CPU runs here on request) against PyTorch's own BatchNorm run on
    each virtual batch in turn: outputs, gradients, running statistics, the batch count and the memory format."""
    torch.manual_seed(10)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_ref = x.detach().clone().requires_grad_()
    x.requires_grad_()
    layer = GhostBatchNorm(shape[1], ghost_batch=4, momentum=0.3).double().to(device).train()
    truth = (torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d)(shape[1], momentum=0.3).double()
    truth = truth.to(device)
    with torch.no_grad():
        for module in (layer, truth):
            module.weight.copy_(torch.linspace(0.5, 2.0, shape[1]))
            module.bias.copy_(torch.linspace(-1.0, 1.0, shape[1]))
    out = layer.one_pass(x, 4) if one_pass else layer(x)
    expected = torch.cat([truth(chunk) for chunk in x_ref.split(4)])
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    upstream = torch.randn_like(out)
    out.backward(upstream)
    expected.backward(upstream)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.weight.grad, truth.weight.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.bias.grad, truth.bias.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.running_mean, truth.running_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.running_var, truth.running_var, rtol=1e-10, atol=1e-12)
    assert int(layer.num_batches_tracked) == int(truth.num_batches_tracked) == 4


@pytest.mark.parametrize("one_pass", [False, True])
def test_ghost_batch_norm_under_autocast_keeps_its_input_dtype_and_float32_statistics(device, one_pass):
    """Autocast would run the one pass's running-statistics matmul in bf16 (an error of 1e-2): they stay float32."""
    torch.manual_seed(11)
    x = (torch.randn(32, 3, 4, 4) * 2 + 3).bfloat16().to(device)
    layer, truth = (GhostBatchNorm(3, ghost_batch=2).to(device).train(),
                    torch.nn.BatchNorm2d(3).to(device).train())
    with torch.autocast(device, dtype=torch.bfloat16):
        assert (layer.one_pass(x, 2) if one_pass else layer(x)).dtype == torch.bfloat16
    for chunk in x.float().split(2):
        truth(chunk)
    torch.testing.assert_close(layer.running_mean, truth.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.running_var, truth.running_var, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, ghost_batch", [((10, 3), 4), ((2, 3), 4), ((8, 3), 1)])
def test_ghost_batch_norm_refuses_a_batch_it_cannot_split(shape, ghost_batch):
    with pytest.raises(ValueError, match="does not split into virtual batches"):
        GhostBatchNorm(3, ghost_batch=ghost_batch).train()(torch.randn(shape))
    with pytest.raises(ValueError, match="needs a momentum"):
        GhostBatchNorm(3, ghost_batch=2, momentum=None)
