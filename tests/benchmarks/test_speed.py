"""normbench's speed against its baselines, measured in one run on this machine (`make bench`).

- training: normbench's training steps against a minimal hand-written loop on the same model, batch and data, on
  the GPU where there is one (ResNet-20 of width 16, fp32 BN, batch 256: the figure a GPU run record quotes), eager
  and, on a GPU, both compiled with CUDA graphs (`compile: reduce-overhead`);
- start-up: `normbench --help` against `python -c "import torch"`;
- planning: a dry run of a 1,000-cell config.
"""

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from normbench.cells import make_settings
from normbench.data import load_data, model_io
from normbench.models import build_model
from normbench.provenance import device_name
from normbench.precision import fp32_mode
from normbench.timing import synchronize
from normbench.train import epoch_permutation, resolve_device, train

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def installed(name: str) -> str:
    """A command installed beside this Python (the venv), else the one on PATH (packages installed elsewhere, as on
    a GPU machine without network: .ci/gpu-check)."""
    return str(BIN / name) if (BIN / name).exists() else shutil.which(name) or name


ROUNDS = 3
TRAINING_ROUNDS = 5  # a round trains 12 steps twice, about 20 s on one core


def minimal_loop_samples_per_s(settings) -> float:
    """The same model, optimizer, batches and data as a normbench cell, trained by the shortest loop there is, in
    the same arithmetic (IEEE float32: no TF32 convolutions on CUDA)."""
    device = resolve_device(settings.device)
    train_split, _ = load_data(settings, device, torch.float32)
    torch.manual_seed(settings.seed)
    model = build_model(settings, *model_io(settings)).to(device).train()
    forward = torch.compile(model, mode="reduce-overhead") if settings.compile == "reduce-overhead" else model
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                fused=device.type == "cuda" or None)  # at its best, as normbench's on CUDA
    permutation = epoch_permutation(settings.seed, 0, len(train_split), device)
    steps = len(train_split) // settings.batch_size

    def step(index: torch.Tensor) -> None:
        loss = F.cross_entropy(forward(train_split.inputs[index]), train_split.labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with fp32_mode(settings.tf32, settings.deterministic):
        step(permutation[:settings.batch_size])  # untimed, as normbench's first step: allocation, autotuning, compiling
        synchronize(device)
        started = time.perf_counter()
        for index in permutation[settings.batch_size:steps * settings.batch_size].split(settings.batch_size):
            step(index)
        synchronize(device)
    return (steps - 1) * settings.batch_size / (time.perf_counter() - started)


@pytest.mark.parametrize("compile_mode", [False, "reduce-overhead"])
def test_training_steps_against_a_minimal_loop(benchmark, record_ratio, fashion_root, tmp_path, compile_mode):
    cuda = torch.cuda.is_available()
    if compile_mode and not cuda:
        pytest.skip("CUDA graphs need a GPU")
    settings = make_settings({"data_root": str(fashion_root), "model": "resnet20", "width": 16, "batch_size": 256,
                              "train_subset": 256 * (200 if cuda else 12), "test_subset": 100, "epochs": 1,
                              "device": "auto", "compile": compile_mode})
    torch.set_num_threads(1)
    runs = iter(range(1000))
    ours, minimal = [], []

    def both() -> None:  # one pair per round, back to back, so that a slow moment of the machine hits both alike
        ours.append(train(settings, tmp_path / str(next(runs)))["train_samples_per_s"])
        minimal.append(minimal_loop_samples_per_s(settings))

    benchmark.pedantic(both, rounds=TRAINING_ROUNDS, warmup_rounds=1)
    del ours[0], minimal[0]  # the warm-up round
    device = resolve_device(settings.device)
    benchmark.extra_info.update(normbench_samples_per_s=ours, minimal_samples_per_s=minimal, device=device.type,
                                device_name=device_name(device), batch_size=settings.batch_size,
                                compile=compile_mode)
    mode = f", compile {compile_mode}" if compile_mode else ""
    record_ratio(f"overhead ratio (normbench samples/s / minimal loop samples/s, median of paired rounds{mode})",
                 statistics.median(a / b for a, b in zip(ours, minimal)))


def _seconds(command: list[str], **kwargs) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    return time.perf_counter() - started


def test_start_up_against_import_torch(benchmark, record_ratio):
    times = {"help": [], "torch": []}

    def both() -> None:
        times["help"].append(_seconds([installed("normbench"), "--help"]))
        times["torch"].append(_seconds([sys.executable, "-c", "import torch"]))

    benchmark.pedantic(both, rounds=ROUNDS)
    record_ratio("start-up ratio (normbench --help / import torch)",
                 statistics.median(times["help"]) / statistics.median(times["torch"]))


def test_planning_a_thousand_cells(benchmark, record_ratio, fashion_root, tmp_path):
    grid = {"norm": ["bn", "gn", "ln", "none", "rms"], "lr": [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0],
            "batch_size": [8, 16, 32, 64], "seed": [0, 1, 2, 3, 4]}
    config = {"defaults": {"data_root": str(fashion_root), "device": "cpu"},
              "studies": {"big": {"fixed": {"model": "resnet20", "width": 8}, "grid": grid}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    command = [installed("snakemake"), "--dry-run", "--snakefile", str(REPO / "Snakefile"), "--directory",
               str(tmp_path), "--configfile", str(tmp_path / "config.yaml"), "--cores", "2"]
    seconds = []
    benchmark.pedantic(lambda: seconds.append(_seconds(command)), rounds=ROUNDS)
    record_ratio("planning 1,000 cells (s, median dry run)", statistics.median(seconds))
