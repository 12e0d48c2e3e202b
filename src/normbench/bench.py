"""Micro-benchmarks (pytest-benchmark): forward + backward time of the norm layers per norm, layout and dtype (C12),
and inference with BN folded into the conv before it against unfolded, for the model of each study that claims C11.

Every case runs in one pytest session on the same inputs and device, so each
ratio against BatchNorm is measured in one run. `run` repeats that session in
separate processes: rounds within a session share their process, allocator
and clock state, so their spread is timer noise; the spread between sessions
is what a rerun would see, and the report's intervals are taken over those
repeats. Each repeat runs the cases in its own shuffled order after a
warm-up case that is thrown away, so no norm always pays for coming first
(BN, the denominator of every ratio, used to). Conv maps are channels_last,
as the studies train them. On CUDA each round waits for the GPU, so a round
times the kernels, not their launch. Folding is timed here rather than in
its study's cells, which trained beside other jobs: a cell's timings moved
with what ran on the other core (an unfolded/folded ratio of 1.12-1.67 alone
against 0.94-1.02 beside training). The architecture decides the time, so an
untrained model of the study's settings stands in for the trained ones (whose
folded outputs the cells check). Each session keeps its freed memory
(`keep_freed_memory`), as a steady loop does.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import random
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from normbench.cells import make_settings
from normbench.config import SettingsError
from normbench.data import model_io
from normbench.models import build_model
from normbench.norms import norm_factory
from normbench.plugins import describe_model
from normbench.precision import fp32_mode
from normbench.probes import fold_bn
from normbench.provenance import device_name
from normbench.results import PAIRED_ROUNDS, read_json, write_json
from normbench.timing import DeviceClock, synchronize
from normbench.train import eval_batch_size, resolve_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Conv maps and tokens (batch, patches + class token, width) as each device trains them. On the CPU a small
# ResNet stage and ViT; on a GPU the anchors' own sizes, a ResNet-50 stage at 32 images per GPU (Wu & He 2018) and
# ViT-B's tokens, large enough that a round times the kernels rather than their launch (at the CPU's sizes every
# norm took the same 0.2 ms on an H200).
SHAPES = {"cpu": {"channels": (32, 32, 16, 16), "tokens": (32, 17, 64)},
          "cuda": {"channels": (32, 256, 56, 56), "tokens": (32, 197, 768)}}
NORMS = {"channels": ("bn", "gn", "ln", "in", "rms", "brn", "frn", "dyt"), "tokens": ("bn", "ln", "rms", "dyt")}
CASES = [(layout, norm) for layout, norms in NORMS.items() for norm in norms]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout, norm", CASES)
def test_norm_forward_backward(benchmark, device: torch.device, case_position: int, layout: str, norm: str,
                               dtype: str) -> None:
    shape = SHAPES[device.type][layout]
    generator = torch.Generator().manual_seed(0)
    features = shape[1] if layout == "channels" else shape[-1]
    memory_format = torch.channels_last if layout == "channels" else torch.contiguous_format
    layer = norm_factory(norm, layout, gn_groups=8)(features).to(device, DTYPES[dtype]).train()
    x = torch.randn(shape, generator=generator).to(device, DTYPES[dtype]).contiguous(memory_format=memory_format)
    x.requires_grad_()
    upstream = torch.randn(shape, generator=generator).to(device, DTYPES[dtype]).contiguous(memory_format=memory_format)
    benchmark.extra_info.update(layout=layout, norm=norm, dtype=dtype, shape="x".join(map(str, shape)),
                                memory_format=str(memory_format).removeprefix("torch."), position=case_position,
                                device=device_name(device), threads=torch.get_num_threads())

    def forward_backward() -> None:
        layer(x).backward(upstream)
        synchronize(device)

    benchmark(forward_backward)


# Rounds per repeat, each timing the unfolded and then the folded model. A batch of the default's ResNet-8 (stem
# stride 2) takes about 9 ms on the CPU, and one round's ratio ranged from 0.4 to 2.7: a repeat's median needs many.
FOLD_ROUNDS = 40


def test_inference_with_bn_folded(benchmark, device: torch.device, case_position: int, fold_study: str,
                                  fold_settings: dict) -> None:
    """A study's model in eval mode on a batch of the device's evaluation size, unfolded and with its BN folded (C11),
    in fp32 (TF32 only where the study sets tf32). Each round times the two back to back, in turn first, so that
    the ratio can be taken round by round."""
    settings = make_settings(fold_settings)
    input_shape, num_classes = model_io(settings)
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = build_model(settings, input_shape, num_classes).to(device).eval()
    networks = {"unfolded": model.to(memory_format=memory_format),
                "folded": fold_bn(model).to(memory_format=memory_format)}
    shape = (eval_batch_size(device), *input_shape)
    x = torch.randint(num_classes, shape, device=device) if settings.dataset == "text" else \
        torch.randn(shape).to(device).contiguous(memory_format=memory_format)
    clock = DeviceClock(device)
    times: dict[str, list[float]] = {name: [] for name in networks}

    def both() -> None:
        for name in ("unfolded", "folded") if len(times["folded"]) % 2 == 0 else ("folded", "unfolded"):
            started = clock.mark()
            networks[name](x)
            times[name].append(clock.seconds(started, clock.mark()))

    with torch.no_grad(), fp32_mode(settings.tf32, settings.deterministic):
        both()  # warm-up, not kept
        for kept in times.values():
            kept.clear()
        benchmark.pedantic(both, rounds=FOLD_ROUNDS)
    benchmark.extra_info.update(fold_study=fold_study, shape="x".join(map(str, shape)), position=case_position,
                                model=describe_model(vars(settings)), device=device_name(device),
                                threads=torch.get_num_threads(), **{PAIRED_ROUNDS: times})


WARM_UP = "warm_up"  # extra_info key of the case each session runs first and `run` throws away


def test_warm_up(benchmark, device: torch.device) -> None:
    """Pays the first-case costs (allocator, kernels' first calls, clocks) for no case in particular."""
    benchmark.extra_info[WARM_UP] = True
    x = torch.randn(SHAPES[device.type]["channels"], device=device, requires_grad=True)
    layer = norm_factory("bn", "channels")(x.shape[1]).to(device)
    benchmark(lambda: (layer(x).sum().backward(), synchronize(device)))


class _SessionPlugin:
    """Gives the benchmarks the device that `run` was asked for (the `device` fixture) and the studies whose folding
    they time, and runs the cases in an order of their own per session, after the warm-up."""

    def __init__(self, device: torch.device, order_seed: int, fold: dict[str, dict]) -> None:
        self._device, self._order_seed, self._fold, self._positions = device, order_seed, fold, {}

    @pytest.fixture
    def device(self) -> torch.device:
        return self._device

    @pytest.fixture
    def fold_settings(self, fold_study: str) -> dict:
        return self._fold[fold_study]

    def pytest_generate_tests(self, metafunc) -> None:
        if "fold_study" in metafunc.fixturenames:
            metafunc.parametrize("fold_study", sorted(self._fold))

    @pytest.fixture
    def case_position(self, request) -> int:
        """Where the case ran in this session (0: the warm-up)."""
        return self._positions[request.node.nodeid]

    def pytest_collection_modifyitems(self, items: list) -> None:
        random.Random(self._order_seed).shuffle(items)
        items.sort(key=lambda item: item.name != "test_warm_up")  # stable: the shuffled order stays behind it
        self._positions = {item.nodeid: index for index, item in enumerate(items)}


def run(out: Path, max_time_s: float, threads: int | None = None, device: str = "auto", repeats: int = 1,
        fold: dict[str, dict] | None = None) -> None:
    """Run the micro-benchmarks on `device` (auto: CUDA where there is one) `repeats` times, each session in a
    process of its own, into one pytest-benchmark JSON at `out`: rounds included, each case's `repeat` in its
    extra_info. `fold` maps a study to the settings of the model whose inference is timed folded and unfolded."""
    for study, values in (fold or {}).items():  # before any session: a bad setting is named, not a pytest error
        try:
            make_settings(values)
        except SettingsError as error:
            raise SettingsError(f"folding benchmark of study {study!r}: {error}") from None
    # Each session a fresh process, forked from a server that has imported this module (torch, pytest) and run
    # nothing: no allocator, thread pool or CUDA state carried over, and no import paid per repeat.
    fresh = multiprocessing.get_context("forkserver")
    fresh.set_forkserver_preload([__name__])
    with tempfile.TemporaryDirectory() as scratch:
        sessions = []
        for repeat in range(repeats):
            part = Path(scratch) / f"repeat{repeat}.json"
            process = fresh.Process(target=session, args=(part, max_time_s, threads, device, repeat, fold or {}))
            process.start()
            process.join()
            if process.exitcode != 0:
                raise RuntimeError(f"the micro-benchmarks failed in repeat {repeat} (exit code {process.exitcode})")
            sessions.append(read_json(part))
    for repeat, result in enumerate(sessions):
        for case in result["benchmarks"]:
            case["extra_info"]["repeat"] = repeat
    merged = {**sessions[0], "benchmarks": [case for result in sessions for case in result["benchmarks"]
                                            if not case["extra_info"].get(WARM_UP)]}
    write_json(out, merged)


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> None:
    """Keep freed buffers in the process, as a steady loop does, for every case (C11's and C12's). By default glibc
    gives large freed activations back to the OS and faults their pages in again when they are reallocated, more
    in some processes than in others: with the same code, a folded ResNet-8 of stem stride 1 took 27 ms a batch in
    some sessions and 46 ms in others, and the unfolded/folded ratio ranged from 1.0 to 1.7 over five repeats; with
    this, from 1.15 to 1.22."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: its allocator keeps its own policy
    # Buffers up to 32 MB from the heap (the largest every glibc accepts), and the heap's top kept.
    if not (libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) and libc.mallopt(M_MMAP_THRESHOLD, 1 << 25)):
        warnings.warn("glibc refused to keep freed memory in the process: timings may vary between repeats")


def session(out: Path, max_time_s: float, threads: int | None, device: str, order_seed: int = 0,
            fold: dict[str, dict] | None = None) -> None:
    """One pytest-benchmark session of every case, in this process and in the order `order_seed` shuffles them
    into, into `out`."""
    keep_freed_memory()
    if threads:
        torch.set_num_threads(threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        ini = Path(scratch) / "pytest.ini"
        ini.write_text("[pytest]\n")  # this module's own settings, not those of the project it runs in
        code = pytest.main([str(Path(__file__)), "-c", str(ini), "--rootdir", scratch, "-q", "-p", "no:cacheprovider",
                            "--benchmark-only", "--benchmark-save-data", f"--benchmark-json={out}",
                            f"--benchmark-max-time={max_time_s}", "--benchmark-min-rounds=5",
                            "--benchmark-warmup=on", "--benchmark-sort=name"],
                           plugins=[_SessionPlugin(resolve_device(device), order_seed, fold or {})])
    if code != 0:
        raise RuntimeError(f"the micro-benchmarks failed (pytest exit code {code})")
