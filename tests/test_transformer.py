"""Transformers: every norm x placement runs, the decoder is causal, the language model learns a tiny text."""

import math

import pytest
import torch

from normbench.cells import make_settings
from normbench.config import Settings
from normbench.models import build_model
from normbench.norms import norm_factory
from normbench.train import train

TOKEN_NORMS = ["ln", "rms", "bn", "syncbn", "none"]


@pytest.mark.parametrize("placement", ["pre", "post"])
@pytest.mark.parametrize("norm", TOKEN_NORMS)
@pytest.mark.parametrize("model,input_shape,outputs", [("vit", (1, 28, 28), 10), ("gpt", (16,), 30)])
def test_forward_backward(model, input_shape, outputs, norm, placement):
    torch.manual_seed(0)
    settings = Settings(model=model, norm=norm, norm_placement=placement, width=32, heads=4, depth=2, gn_groups=4)
    net = build_model(settings, input_shape, outputs)
    inputs = torch.randn(3, *input_shape) if model == "vit" else torch.randint(0, outputs, (3, *input_shape))
    logits = net(inputs)
    assert logits.shape == ((3, outputs) if model == "vit" else (3, 16, outputs))
    logits.logsumexp(-1).mean().backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_token_batchnorm_normalizes_each_feature_over_batch_and_tokens():
    x = torch.randn(4, 7, 6, dtype=torch.float64) * 3 + 1
    y = norm_factory("bn", "tokens")(6).double()(x)
    torch.testing.assert_close(y.mean(dim=(0, 1)), torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(y.var(dim=(0, 1), unbiased=False), torch.ones(6, dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.mark.parametrize("norm", TOKEN_NORMS)
def test_a_later_token_never_changes_an_earlier_output(norm):
    torch.manual_seed(0)
    net = build_model(Settings(model="gpt", norm=norm, width=32, heads=4, depth=2, gn_groups=4), (12,), 20)
    tokens = torch.randint(0, 20, (4, 12))
    changed = tokens.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 20
    net.eval()  # BatchNorm uses its running statistics, as in generation
    with torch.no_grad():
        torch.testing.assert_close(net(tokens)[:, :8], net(changed)[:, :8])
        assert not torch.allclose(net(tokens)[:, 8:], net(changed)[:, 8:])
    net.train()
    with torch.no_grad():
        same_prefix = torch.allclose(net(tokens)[:, :8], net(changed)[:, :8])
    # In training, batch statistics over tokens see the future: BN leaks it; per-token norms cannot.
    assert same_prefix == (norm in ("ln", "rms", "none"))


def test_language_model_learns_a_repetitive_text(tmp_path):
    text_path = tmp_path / "text.txt"
    text_path.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    settings = make_settings({"dataset": "text", "text_path": str(text_path), "model": "gpt", "norm": "ln",
                              "width": 32, "heads": 4, "depth": 2, "context": 32, "batch_size": 16, "epochs": 3,
                              "optimizer": "adamw", "lr": 0.003, "weight_decay": 0.0, "warmup_steps": 10, "device": "cpu"})
    summary = train(settings, tmp_path / "cell")
    uniform = math.log(len(set(text_path.read_text())))
    assert summary["final_test_loss"] < 0.4 * uniform


def test_group_norm_is_refused_on_tokens():
    with pytest.raises(ValueError, match="'gn' on tokens"):
        norm_factory("gn", "tokens")


def test_text_settings_are_checked(tmp_path):
    from normbench.config import SettingsError

    with pytest.raises(SettingsError, match="text_path"):
        make_settings({"dataset": "text", "model": "gpt", "text_path": str(tmp_path / "missing.txt")})
    with pytest.raises(SettingsError, match="goes with model gpt"):
        make_settings({"model": "gpt"})
    with pytest.raises(SettingsError, match="heads"):
        make_settings({"model": "vit", "width": 30, "heads": 4})
