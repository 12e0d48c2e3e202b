"""Probes against behaviour known from theory: vanishing gradients in deep sigmoid MLPs, saturation, dead units."""

import copy

import torch
import torch.nn.functional as F

from normbench import probes
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


# -- mechanism probes ----------------------------------------------------------------------------------------


def test_ics_of_a_two_layer_net_matches_the_hand_computed_gradients():
    """ICS of the second layer: its gradient before and after the first layer's plain gradient step, written out
    from the chain rule for logits = W2 (W1 x) and mean cross-entropy."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4, bias=False), torch.nn.Linear(4, 2, bias=False)).double()
    x, y, lr = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,)), 0.5
    w1, w2 = model[0].weight.detach(), model[1].weight.detach()
    onehot = F.one_hot(y, 2).double()

    def gradients(w1, w2):
        hidden = x @ w1.T
        delta = (torch.softmax(hidden @ w2.T, dim=1) - onehot) / len(x)
        return (delta @ w2).T @ x, delta.T @ hidden  # dL/dW1, dL/dW2

    g1, g2 = gradients(w1, w2)
    _, g2_after = gradients(w1 - lr * g1, w2)
    rows = probes.ics_rows(model, x, y, lr, step=0)
    ics = {row["quantity"]: row["value"] for row in rows if row.get("layer") == "1"}
    assert abs(ics["ics_l2"] - (g2 - g2_after).norm().item()) < 1e-12
    assert abs(ics["ics_cos"] - F.cosine_similarity(g2.flatten(), g2_after.flatten(), dim=0).item()) < 1e-12
    assert not [row for row in rows if row.get("layer") == "0"]  # nothing before the first layer
    # beta along the gradient: the largest gradient change per distance moved, here from the hand gradients
    moved = [gradients(w1 - m * lr * g1, w2 - m * lr * g2) for m in probes.STEP_MULTIPLIERS]
    distance = [m * lr * torch.cat([g1.flatten(), g2.flatten()]).norm() for m in probes.STEP_MULTIPLIERS]
    betas = [torch.cat([(a - g1).flatten(), (b - g2).flatten()]).norm() / d for (a, b), d in zip(moved, distance)]
    beta = next(row["value"] for row in rows if row["quantity"] == "beta")
    assert abs(beta - max(betas).item()) < 1e-10


def test_ics_probe_leaves_the_model_and_the_random_stream_alone():
    torch.manual_seed(1)
    model = build_model(Settings(model="cnn", depth=3, width=4, norm="noisybn", dropout=0.3), (1, 28, 28), 10)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    probes.ics_rows(model, x, y, 0.1, step=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_precise_bn_statistics_are_the_training_set_population_statistics():
    torch.manual_seed(2)
    inputs = torch.randn(2000, 5, dtype=torch.float64) * torch.arange(1, 6) + 3
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(5, momentum=0.9)).double()
    for batch in inputs[:64].split(8):  # an EMA dominated by the last small batch
        model(batch)
    precise = probes.precise_bn(model, inputs, batch_size=50)
    torch.testing.assert_close(precise[0].running_mean, inputs.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(precise[0].running_var, inputs.var(0), rtol=0.03, atol=0)
    assert (model[0].running_mean - inputs.mean(0)).abs().max() > 0.1  # the original keeps its EMA


def test_batch_statistics_in_eval_equal_a_training_forward():
    torch.manual_seed(3)
    model = build_model(Settings(model="resnet", depth=8, width=4), (1, 28, 28), 10)
    x = torch.randn(6, 1, 28, 28)
    expected = copy.deepcopy(model).train()(x)
    torch.testing.assert_close(probes.batch_statistics(model).eval()(x), expected)


def test_folded_bn_gives_the_unfolded_outputs_without_any_batchnorm():
    torch.manual_seed(4)
    model = build_model(Settings(model="resnet", depth=8, width=8), (1, 28, 28), 10)
    with torch.no_grad():  # running statistics and affine parameters away from their initial 0, 1
        for _ in range(3):
            model(torch.randn(16, 1, 28, 28) * 2 + 1)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 2)
                module.bias.uniform_(-1, 1)
    model.eval()
    folded = probes.fold_bn(model)
    assert not [m for m in folded.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    x = torch.randn(20, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    assert 0 < probes.fold_difference(model, x) < 1e-5


def test_percentiles_are_those_of_the_last_sigmoid_input():
    torch.manual_seed(5)
    model = build_model(Settings(model="mlp", depth=3, width=20, activation="sigmoid", norm="bn"), (1, 28, 28), 10)
    model(torch.randn(64, 1, 28, 28))  # running statistics off their initial values
    x = torch.randn(300, 1, 28, 28)
    rows = probes.percentile_rows(model, x, step=7)
    model.eval()
    with torch.no_grad():
        # Up to the last norm (what the last sigmoid receives), BN normalizing by these images' statistics.
        sigmoid_input = copy.deepcopy(model).train().layers[:-2](x)
    for row in rows:
        q = int(row["quantity"][1:]) / 100
        assert abs(row["value"] - torch.quantile(sigmoid_input[:, row["unit"]], q).item()) < 1e-6
    assert {row["quantity"] for row in rows} == {"p15", "p50", "p85"} and len(rows) == 3 * probes.PERCENTILE_UNITS
    assert model.training is False  # untouched by the probe, which works on a copy
