"""Reduced precision: every mode trains, pure bf16 really is bf16, fp16 skips steps with non-finite gradients."""

import pytest
import torch

from normbench.cells import make_settings
from normbench.precision import Precision, exact_fp32, fp32_mode, numerics_record
from normbench.results import read_json
from normbench.train import train


@pytest.mark.parametrize("precision", ["bf16", "fp16", "bf16-pure"])
def test_every_precision_trains_a_cell(fashion_root, tmp_path, precision, device):
    settings = make_settings({"data_root": str(fashion_root), "model": "mlp", "width": 32, "norm": "bn",
                              "train_subset": 512, "test_subset": 200, "batch_size": 32, "epochs": 1,
                              "evals_per_epoch": 2, "lr": 0.05, "precision": precision, "device": device})
    summary = train(settings, tmp_path)
    assert not summary["diverged"] and summary["final_test_acc"] > 0.3
    assert read_json(tmp_path / "env.json")["device"].startswith(device)
    weights = torch.load(tmp_path / "model.pt")
    expected = torch.bfloat16 if precision == "bf16-pure" else torch.float32
    assert {w.dtype for name, w in weights.items() if "num_batches" not in name} == {expected}


def test_autocast_runs_convolutions_and_norms_in_the_low_dtype():
    conv_bn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.GroupNorm(2, 4))
    with Precision("bf16", torch.device("cpu")).autocast():
        assert conv_bn[0](torch.randn(2, 1, 8, 8)).dtype == torch.bfloat16
    with Precision("fp32", torch.device("cpu")).autocast():
        assert conv_bn(torch.randn(2, 1, 8, 8)).dtype == torch.float32


def test_fp16_scaler_skips_a_step_with_infinite_gradients(device):
    precision = Precision("fp16", torch.device(device))
    weight = torch.nn.Parameter(torch.ones(3, device=device))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    precision.backward((weight * float("inf")).sum())
    assert precision.step(optimizer).item()  # skipped: the flag stays on the device until the loop reads it
    assert torch.equal(weight.detach(), torch.ones(3, device=device))
    optimizer.zero_grad()
    precision.backward(weight.sum())
    precision.unscale(optimizer)
    assert torch.equal(weight.grad, torch.ones(3, device=device))  # true scale, not 65536
    assert not precision.step(optimizer).item()
    assert torch.allclose(weight.detach(), torch.full((3,), 0.9, device=device))


def test_without_a_scaler_the_step_is_plain_and_reports_nothing():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    precision = Precision("bf16", torch.device("cpu"))
    precision.backward(weight.sum())
    assert precision.step(optimizer) is None
    assert torch.allclose(weight.detach(), torch.full((3,), 0.9))


def test_fp32_mode_sets_tf32_and_determinism_and_restores_them():
    before = numerics_record(torch.device("cuda"))
    with fp32_mode(tf32=True, deterministic=True):
        inside = numerics_record(torch.device("cuda"))
        with exact_fp32():  # what the folding and ICS probes run under
            exact = numerics_record(torch.device("cuda"))
    assert inside == {"tf32": {"matmul": True, "cudnn_conv": True}, "deterministic_algorithms": True,
                      "cudnn_benchmark": False, "cudnn_deterministic": True}
    assert exact["tf32"] == {"matmul": False, "cudnn_conv": False} and exact["deterministic_algorithms"]
    assert numerics_record(torch.device("cuda")) == before and not before["deterministic_algorithms"]
    assert numerics_record(torch.device("cpu"))["tf32"] is None  # no TF32 on a CPU
