"""Probes against behaviour known from theory: vanishing gradients in deep sigmoid MLPs, saturation, dead units."""

import torch
import torch.nn.functional as F

from normbench.cells import make_settings
from normbench.config import Settings
from normbench.models import build_model
from normbench.probes import Probe
from normbench.results import read_jsonl
from normbench.train import train


def probe_one_step(settings: Settings, batch: int = 64) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(settings, (1, 28, 28), 10)
    probe = Probe(model)
    with probe.watching_activations():
        loss = F.cross_entropy(model(torch.randn(batch, 1, 28, 28)), torch.randint(0, 10, (batch,)))
    loss.backward()
    return probe.rows(step=0)


def gradient_profile(rows: list[dict]) -> list[float]:
    return [row["value"] for row in sorted(rows, key=lambda r: r["layer_index"]) if row["quantity"] == "grad_norm"]


def test_deep_sigmoid_mlp_at_small_init_has_vanishing_gradients():
    small = gradient_profile(probe_one_step(Settings(model="mlp", depth=20, width=64, activation="sigmoid",
                                                     norm="none", init="normal-0.01")))
    assert len(small) == 21
    assert small[0] < 1e-6 * small[-1]  # orders of magnitude smaller at the input than at the output
    assert all(inner <= outer for inner, outer in zip(small[:-2], small[1:-1]))  # shrinking toward the input
    normalized = gradient_profile(probe_one_step(Settings(model="mlp", depth=20, width=64, activation="sigmoid",
                                                          norm="bn", init="normal-0.01")))
    assert normalized[0] > 1e-2 * normalized[-1]  # BatchNorm rescales each layer's input and keeps them alive


def test_saturation_and_dead_units():
    def fraction(rows, quantity):
        values = [row["value"] for row in rows if row["quantity"] == quantity]
        return sum(values) / len(values)

    large = probe_one_step(Settings(model="mlp", depth=4, width=64, activation="sigmoid", norm="none", init="normal-1"))
    glorot = probe_one_step(Settings(model="mlp", depth=4, width=64, activation="sigmoid", norm="none", init="xavier"))
    assert fraction(large, "saturated_frac") > 0.5 > 0.1 > fraction(glorot, "saturated_frac")
    relu = probe_one_step(Settings(model="cnn", depth=6, width=8, activation="relu", norm="bn", init="kaiming"))
    assert 0 <= fraction(relu, "dead_frac") < 0.5


def test_training_records_probes_at_init_and_before_each_evaluation(fashion_root, tmp_path):
    settings = make_settings({"data_root": str(fashion_root), "model": "cnn", "depth": 6, "width": 8,
                              "activation": "sigmoid", "init": "xavier", "norm": "bn", "train_subset": 256,
                              "test_subset": 100, "batch_size": 32, "epochs": 1, "evals_per_epoch": 2})
    train(settings, tmp_path)
    rows = read_jsonl(tmp_path / "probes.jsonl")
    assert sorted({row["step"] for row in rows}) == [0, 3, 7]
    at_init = [row for row in rows if row["step"] == 0]
    assert {row["quantity"] for row in at_init} == {"grad_norm", "weight_norm", "saturated_frac"}
    assert len([row for row in at_init if row["quantity"] == "grad_norm"]) == 7  # six convs and the head
