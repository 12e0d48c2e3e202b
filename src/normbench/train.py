"""The training loop: build -> train steps -> evaluate -> record, resumable at every evaluation.

One loop serves every cell. It is deterministic on CPU for a given seed and
thread count: the model is initialized from the seed, each epoch's shuffle and
each step's augmentation come from generators seeded by (seed, epoch) and
(seed, step), so a run resumed from a checkpoint takes exactly the steps of
an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import math
import os
import pickle
import resource
import signal
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from normbench import plugins, results
from normbench.config import Settings, SettingsError, completed, describe_differences
from normbench.data import Split, augment_batch, load_data, model_io
from normbench.distributed import (Preempted, Worker, all_reduce_sum, any_worker, join_process_group, launch,
                                   mean_over_workers, under_torchrun)
from normbench.models import build_model
from normbench.precision import Precision, fp32_mode, numerics_record
from normbench import probes
from normbench.probes import Probe
from normbench.provenance import environment
from normbench.timing import DeviceClock, synchronize

PROBE_IMAGES = 1000  # the fixed test images the mechanism probes look at
SYNC_EVERY_STEPS = 32  # steps between host reads of the divergence flag (and the time limit), besides evaluations


def resolve_device(name: str, worker: Worker = Worker()) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SettingsError("setting 'device': cuda was asked for but torch sees no CUDA device; use cpu or auto")
    return torch.device("cuda", worker.local_rank) if name == "cuda" else torch.device("cpu")


@contextlib.contextmanager
def cell_folder_lock(out_dir: Path, take: bool = True) -> Iterator[None]:
    """One writer per cell: a second `normbench train` into the same folder is refused while the first runs (an
    exclusive flock on out_dir/.lock; the kernel releases it when its process ends, also after SIGKILL)."""
    if not take:
        yield
        return
    if out_dir.exists() and not out_dir.is_dir():
        raise SettingsError(f"{out_dir} is a file; --out names the cell's folder (made where it is missing)")
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir / ".lock", os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SettingsError(f"{out_dir} is being trained by another normbench process; wait for it to end (or "
                            f"stop it), or train into another folder") from None
    try:
        yield
    finally:
        os.close(fd)


def check_cell_folder(settings: Settings, out_dir: Path, force: bool) -> None:
    """Refuse to train into a folder that holds a cell of other settings (finished or not), unless forced."""
    existing = out_dir / results.CONFIG
    if not existing.exists():
        return
    try:
        differences = describe_differences(completed(results.read_json(existing)), settings.to_dict())
    except results.UnreadableResult:
        if not force:
            raise
        differences = "a damaged config.json"  # forced: replaced like a cell of other settings
    if differences and force:  # the old cell's results go; its checkpoint is ignored (other settings)
        (out_dir / results.SUMMARY).unlink(missing_ok=True)
    elif differences:
        state = "a finished cell" if (out_dir / results.SUMMARY).exists() else "an unfinished cell"
        raise SettingsError(f"{out_dir} holds {state} of other settings ({differences}); train into a new folder, "
                            f"or pass --force to replace it")


def run_cell(settings: Settings, out_dir: str | Path, threads: int | None = None, timeout_s: float = 300.0,
             time_limit_s: float | None = None, force: bool = False) -> dict:
    """Train a cell in this process, in world_size launched workers, or as a worker of an outer torchrun.

    `threads` is the CPU thread budget of the whole cell, shared among its local workers. After
    `time_limit_s` seconds the cell stops at its next sync point and is recorded as timed out.
    """
    # One process per cell takes the folder: this one, or rank 0 of an outer torchrun.
    with cell_folder_lock(Path(out_dir), take=not under_torchrun() or os.environ.get("RANK") == "0"):
        return _run_cell(settings, out_dir, threads, timeout_s, time_limit_s, force)


def _run_cell(settings: Settings, out_dir: str | Path, threads: int | None, timeout_s: float,
              time_limit_s: float | None, force: bool) -> dict:
    check_cell_folder(settings, Path(out_dir), force)
    local_workers = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if under_torchrun() else settings.world_size
    if threads is not None and threads < local_workers:  # e.g. Snakemake capped the job's threads at --cores
        print(f"normbench: warning: --threads {threads} cannot be shared by {local_workers} workers on this node; "
              f"each runs one thread ({local_workers} in all)", file=sys.stderr)
    if under_torchrun():
        return _worker(settings.to_dict(), str(out_dir), threads, timeout_s, time_limit_s)
    if settings.world_size == 1:
        if threads:
            torch.set_num_threads(threads)
        return train(settings, out_dir, time_limit_s=time_limit_s)
    if resolve_device(settings.device).type == "cuda" and torch.cuda.device_count() < settings.world_size:
        raise SettingsError(f"setting 'world_size': {settings.world_size} workers need as many GPUs on this node, "
                            f"torch sees {torch.cuda.device_count()}; lower world_size or use device=cpu")
    launch(settings.world_size, _worker, settings.to_dict(), str(out_dir), threads, timeout_s, time_limit_s)
    return results.read_json(Path(out_dir) / results.SUMMARY)


def _worker(settings_values: dict, out_dir: str, threads: int | None, timeout_s: float,
            time_limit_s: float | None) -> dict:
    """One data-parallel worker (module level, so the launcher can start it in a fresh process)."""
    settings = Settings(**settings_values)
    worker = join_process_group(resolve_device(settings.device).type, timeout_s)
    try:
        if worker.world_size != settings.world_size:
            raise SettingsError(f"setting 'world_size': {settings.world_size}, but torchrun started {worker.world_size} workers")
        if threads:
            torch.set_num_threads(max(1, threads // int(os.environ.get("LOCAL_WORLD_SIZE", worker.world_size))))
        return train(settings, out_dir, worker, time_limit_s)
    finally:
        dist.destroy_process_group()


def make_optimizer(model: torch.nn.Module, settings: Settings) -> torch.optim.Optimizer:
    """Weight decay on conv/linear weights only: decaying norm gains and biases fights the norm (timm's default).
    On CUDA the fused kernels: one launch for every parameter's update instead of several per tensor (the CPU
    keeps the default implementation, so that its recorded cells rerun to the same numbers)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if next(model.parameters()).device.type == "cuda" else {}
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.effective_lr, momentum=settings.momentum, **fused)
    return torch.optim.AdamW(groups, lr=settings.effective_lr, **fused)


def lr_multiplier(step: int, total_steps: int, settings: Settings) -> float:
    """Linear warm-up to the peak, then cosine decay to zero (or constant)."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    if settings.schedule == "constant":
        return 1.0
    progress = (step - settings.warmup_steps) / max(1, total_steps - settings.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def seeded_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for the index-th epoch or step of a run: resuming needs no RNG state."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def epoch_permutation(seed: int, epoch: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.randperm(n, generator=seeded_generator(seed, epoch)).to(device)


def batch_indices(permutation: torch.Tensor, step_in_epoch: int, settings: Settings, rank: int = 0) -> torch.Tensor:
    """This worker's slice of the global batch: world k with batch b sees what world 1 with batch k*b sees."""
    start = step_in_epoch * settings.global_batch_size + rank * settings.batch_size
    return permutation[start:start + settings.batch_size]


def eval_batch_size(device: torch.device) -> int:
    """On the CPU small enough that a small CNN's maps stay in the core's cache: one thread evaluated 2,000 test images
    with a ResNet-8 of width 8 in 0.22 s at 250 a batch against 0.31 s at 1,000 (a VGG-4 of width 16: 0.23 against
    0.50 s). On an accelerator large: few launches."""
    return 250 if device.type == "cpu" else 1000


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, memory_format: torch.memory_format,
             precision: Precision, batch_size: int | None = None) -> tuple[float, float]:
    """Mean loss and accuracy over a split (per image, or per token for text), in eval mode
    (running statistics for BN), at the cell's precision, in batches of `batch_size` (default: the device's)."""
    model.eval()
    batch_size = batch_size or eval_batch_size(split.inputs.device)
    loss_sum, correct = 0.0, 0
    for start in range(0, len(split), batch_size):
        inputs = split.inputs[start:start + batch_size].contiguous(memory_format=memory_format)
        labels = split.labels[start:start + batch_size]
        with precision.autocast():
            logits = model(inputs).float()
        loss_sum += F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
    model.train()
    return loss_sum / split.labels.numel(), correct / split.labels.numel()


@dataclasses.dataclass
class Progress:
    """What a checkpoint carries besides the model and optimizer."""

    step: int = 0
    metrics: list[dict] = dataclasses.field(default_factory=list)
    probes: list[dict] = dataclasses.field(default_factory=list)
    train_time_s: float = 0.0
    timed_steps: int = 0  # the steps whose time train_time_s holds: not probed, not compiling
    probe_time_s: float = 0.0  # spent in probed steps (their probes and the step itself), not counted as training
    skipped_steps: int = 0  # optimizer steps GradScaler skipped for inf/NaN gradients (fp16)
    wall_time_s: float = 0.0  # of earlier sessions, when resumed
    resumed_from_step: int | None = None
    # This worker's training loss sum, correct count and samples since the last evaluation: a checkpoint taken
    # between evaluations (on preemption) carries them, so the next evaluation's train numbers come out the same.
    train_sums: tuple = (0.0, 0, 0)


CHECKPOINT_FORMAT = 3  # 2: random states per rank, each worker's own CUDA device only; 3: train sums per rank


def rng_states(device: torch.device, worker: Worker, train_sums: tuple = (0.0, 0, 0)) -> dict:
    """Every worker's CPU and CUDA generator states and its train sums since the last evaluation, gathered to all
    ranks (rank 0 saves them). Only the worker's own device: a checkpoint then resumes where another number of
    GPUs is visible."""
    own = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None, train_sums)
    states = [own]
    if worker.world_size > 1:
        states = [None] * worker.world_size
        dist.all_gather_object(states, own)
    return {"cpu_rng_by_rank": [cpu for cpu, _, _ in states], "cuda_rng_by_rank": [cuda for _, cuda, _ in states],
            "train_sums_by_rank": [sums for _, _, sums in states]}


def restore_rng_states(state: dict, device: torch.device, worker: Worker) -> None:
    """This worker's own generator states from `rng_states`; a CUDA state only onto this worker's CUDA device."""
    torch.set_rng_state(state["cpu_rng_by_rank"][worker.rank])
    cuda = state["cuda_rng_by_rank"][worker.rank]
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def preemption_requests() -> Iterator[list[str]]:
    """SIGTERM and SIGUSR1 (how SLURM preempts, requeues or ends a job; `sbatch --signal` sends the second ahead
    of time) ask the cell to stop at its next sync point with a checkpoint; the list gets the signal's name."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread may take signals
        yield received
        return
    previous = {number: signal.signal(number, lambda got, _frame: received.append(signal.Signals(got).name))
                for number in PREEMPTION_SIGNALS}
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


CHECKPOINT_KEYS = {"format", "settings", "model", "optimizer", "scheduler", "scaler", "progress"}  # and the RNGs'


def save_checkpoint(path: Path, model, optimizer, scheduler, scaler, progress: Progress, settings: Settings,
                    rng: dict, code: dict[str, str]) -> None:
    state = {
        "format": CHECKPOINT_FORMAT, "settings": settings.to_dict(), "plugin_code": code,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "progress": progress.__dict__, **rng,
    }
    results.write_atomic(path, lambda f: torch.save(state, f), mode="wb")


def read_checkpoint(path: Path, settings: Settings, code: dict[str, str]) -> dict | None:
    """The checkpoint's state when it can resume this cell, else None with a warning: a file that cannot be read
    (cut short, damaged, an older format), of other settings or of other plugin code (`code`: each plugin's SHA-256)
    starts the cell afresh, which gives the same numbers as resuming, since a cell is deterministic from its
    settings."""
    if not path.exists():
        return None
    try:
        with zipfile.ZipFile(path) as archive:  # torch.save's format: every record carries a CRC-32
            bad_record = archive.testzip()
        if bad_record is not None:
            raise zipfile.BadZipFile(f"record {bad_record} fails its CRC-32")
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors, numbers and containers only
    except (zipfile.BadZipFile, RuntimeError, EOFError, pickle.UnpicklingError) as error:  # an unusable file
        # (an OSError, e.g. a network filesystem failing, is no verdict on the file: it stops the cell instead)
        print(f"normbench: warning: cannot read the checkpoint {path} ({type(error).__name__}: {error}); it is "
              f"damaged or incomplete, so the cell starts afresh", file=sys.stderr)
        return None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or not CHECKPOINT_KEYS <= set(state):
        print(f"normbench: warning: {path} was written by another version of normbench; the cell starts afresh",
              file=sys.stderr)
        return None
    if completed(state["settings"]) != settings.to_dict():
        print(f"normbench: {path} holds other settings; starting afresh", file=sys.stderr)
        return None
    # (a checkpoint from before the digests has none: a cell without plugins resumes, one with them starts afresh)
    changed = [reference for reference, digest in code.items()
               if state.get("plugin_code", {}).get(reference) != digest]
    if changed:  # the same settings, other code: the checkpoint's model may not even load into this one
        print(f"normbench: {path} was written by other code of {', '.join(changed)} (its file changed since); "
              f"starting afresh", file=sys.stderr)
        return None
    return state


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler, settings: Settings, code: dict[str, str],
                    device: torch.device, worker: Worker) -> Progress | None:
    """Restore a checkpoint of the same settings and plugin code (see read_checkpoint for the others)."""
    state = read_checkpoint(path, settings, code)
    if state is None:
        return None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    restore_rng_states(state, device, worker)
    progress = Progress(**{**state["progress"], "train_sums": tuple(state["train_sums_by_rank"][worker.rank])})
    progress.resumed_from_step = progress.step
    return progress


def peak_memory_mb(device: torch.device) -> float:
    """The most memory this cell held: CUDA's peak allocation on a GPU, the process's peak RSS on the CPU
    (which includes the Python runtime and torch itself, about 1 GB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def prepare_model(settings: Settings, device: torch.device, dtype: torch.dtype, memory_format: torch.memory_format,
                  worker: Worker) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The model and the module to call in training: itself, or its DDP wrapper when there are several workers."""
    torch.manual_seed(settings.seed)
    model = build_model(settings, *model_io(settings))
    if settings.norm == "syncbn" and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # PyTorch's own on CUDA
    model = model.to(device, dtype, memory_format=memory_format)
    trained = model
    if worker.world_size > 1:
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    # torch.compile wraps only what trains; evaluation runs the eager model (the same parameters).
    if not settings.compile:
        return model, trained
    return model, torch.compile(trained, mode="reduce-overhead" if settings.compile == "reduce-overhead" else None)


def after_training_rows(settings: Settings, model: torch.nn.Module, train_split: Split, test_split: Split,
                        probe_inputs: torch.Tensor, memory_format: torch.memory_format, precision: Precision,
                        step: int, test_acc: float) -> list[dict]:
    """The probes that read the trained model: BN statistics three ways and BN folding on `probe_inputs`
    (inference), and the train accuracy in eval mode (generalization). `test_acc` is the last evaluation's, with
    running statistics."""
    rows = []

    def accuracy_row(quantity: str, network: torch.nn.Module, split: Split, batch_size: int | None = None):
        rows.append({"step": step, "quantity": quantity,
                     "value": evaluate(network, split, memory_format, precision, batch_size)[1]})

    if "inference" in settings.probes:
        rows.append({"step": step, "quantity": "acc_ema", "value": test_acc})
        accuracy_row("acc_precise", probes.precise_bn(model, train_split.inputs, settings.batch_size), test_split)
        accuracy_row("acc_batch", probes.batch_statistics(model), test_split, settings.batch_size)
        rows.append({"step": step, "quantity": "fold_rel_diff", "value": probes.fold_difference(model, probe_inputs)})
    if "generalization" in settings.probes:
        accuracy_row("train_acc_eval", model, train_split)
        rows.append({"step": step, "quantity": "test_acc_eval", "value": test_acc})
    return rows


def train(settings: Settings, out_dir: str | Path, worker: Worker = Worker(), time_limit_s: float | None = None) -> dict:
    """Train one cell into `out_dir` and return its summary. Resumes from out_dir/checkpoint.pt, which an
    interrupted or timed-out run leaves behind.

    With several workers each sees its slice of every global batch, gradients are
    averaged by DDP, losses and accuracies are summed over workers, and only rank 0 writes.
    """
    # fp32 is IEEE float32 unless the cell allows TF32; a SIGTERM stops the cell with a checkpoint, not at once
    with fp32_mode(settings.tf32, settings.deterministic), preemption_requests() as stop_requests:
        return _train(settings, out_dir, worker, time_limit_s, stop_requests)


def _train(settings: Settings, out_dir: Path, worker: Worker, time_limit_s: float | None,
           stop_requests: list[str]) -> dict:
    run = CellRun(settings, out_dir, worker, time_limit_s, stop_requests)
    try:  # out of memory ends the cell as a result (failed), like divergence, not as a crash
        for step in range(run.progress.step, run.total_steps):
            run.train_step(step)
            if run.at_sync_point() and run.sync_point():
                break
    except (torch.cuda.OutOfMemoryError, MemoryError) as error:
        run.out_of_memory(error)
    return run.finish()


class CellRun:
    """One session of a cell, in the phases `_train` calls in turn: build (data, model, optimizer, schedule and
    the progress of a checkpoint), `train_step` (one optimizer step, probed or timed), `sync_point` (divergence,
    skipped fp16 steps, time limit, preemption, and the evaluation when one is due) and `finish` (the probes of
    the trained model, the summary and the cell's files)."""

    def __init__(self, settings: Settings, out_dir: Path, worker: Worker, time_limit_s: float | None,
                 stop_requests: list[str]) -> None:
        self.started = time.perf_counter()
        self.settings, self.out_dir, self.worker = settings, Path(out_dir), worker
        self.time_limit_s, self.stop_requests = time_limit_s, stop_requests
        self.device = device = resolve_device(settings.device, worker)
        self.precision = Precision(settings.precision, device)
        self.train_split, self.test_split = load_data(settings, device, self.precision.storage_dtype)
        self.memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        self.model, self.trained = prepare_model(settings, device, self.precision.storage_dtype, self.memory_format,
                                                 worker)
        self.optimizer = make_optimizer(self.model, settings)
        self.steps_per_epoch = len(self.train_split) // settings.global_batch_size  # the last partial batch is dropped
        self.total_steps = total_steps = self.steps_per_epoch * settings.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_multiplier(step, total_steps, settings))
        self.eval_steps = {round(self.steps_per_epoch * (e + k / settings.evals_per_epoch))
                           for e in range(settings.epochs) for k in range(1, settings.evals_per_epoch + 1)}
        # Probe the first step (the network at initialization) and the last before each evaluation (main worker).
        self.probe_steps = {0, *(step - 1 for step in self.eval_steps)} if worker.is_main else set()
        self.checkpoint_path = self.out_dir / results.CHECKPOINT
        provenance = plugins.provenance([settings.norm, settings.model])  # the code this cell runs, hashed once
        # A checkpoint resumes only the code it came from: by reference, the SHA-256 of each plugin's file.
        self.plugin_code = {reference: record["sha256"] for reference, record in provenance.items()}
        self.progress = self.resumed_progress()
        if worker.is_main:
            results.write_json(self.out_dir / results.CONFIG, settings.to_dict())
            results.write_json(self.out_dir / results.ENV, {
                **environment(device), **numerics_record(device), "world_size": worker.world_size,
                "plugins": provenance})

        self.diverged_reason = self.timed_out_reason = self.failed_reason = None
        # Each step's loss stays on the device until the next sync point (each evaluation and every
        # SYNC_EVERY_STEPS steps), where one collective and one read find the first diverged step among them.
        self.window_losses: list[torch.Tensor] = []
        self.skip_flags: list[tuple[int, torch.Tensor]] = []  # (step, skipped?) since the last sync point (fp16)
        self.loss_sum = torch.tensor(float(self.progress.train_sums[0]), device=device)
        self.correct = torch.tensor(int(self.progress.train_sums[1]), device=device, dtype=torch.int64)
        self.seen = int(self.progress.train_sums[2])
        self.permutation, self.permutation_epoch = None, None
        self.clock = DeviceClock(device)
        self.interval_started = self.clock.mark()
        self.probe_s = 0.0  # time of the probed steps inside the current training interval
        self.phase_marks: list[tuple] = []  # before forward, after loss, backward, optimizer: of timed steps
        self.compile_time_s = None
        # The fixed test images the mechanism probes look at (percentiles during training, folding after it).
        self.probe_inputs = self.test_split.inputs[:PROBE_IMAGES].contiguous(memory_format=self.memory_format) \
            if settings.probes else None
        if "percentiles" in settings.probes and self.progress.step == 0 and worker.is_main:  # at initialization
            self.progress.probes += probes.percentile_rows(self.model, self.probe_inputs, 0)
        self.bar = tqdm(total=total_steps, initial=self.progress.step, desc=str(self.out_dir), unit="step",
                        file=sys.stderr, disable=None if worker.is_main else True, leave=False)
        self.model.train()

    def resumed_progress(self) -> Progress:
        """The checkpoint's progress, or a fresh start; every rank reads the checkpoint and must agree."""
        progress = load_checkpoint(self.checkpoint_path, self.model, self.optimizer, self.scheduler,
                                   self.precision.scaler, self.settings, self.plugin_code, self.device,
                                   self.worker) or Progress()
        if self.worker.world_size > 1:
            steps = [None] * self.worker.world_size
            dist.all_gather_object(steps, progress.step)
            if len(set(steps)) > 1:
                raise SettingsError(f"the workers of this cell read {self.checkpoint_path} differently (resuming at "
                                    f"steps {steps}); the cell folder must be one file system that every rank sees")
        return progress

    def save_state(self) -> None:
        """The resumable state after progress.step: every worker gathers, rank 0 writes."""
        rng = rng_states(self.device, self.worker, (self.loss_sum.item(), int(self.correct.item()), self.seen))
        if self.worker.is_main:
            results.write_jsonl(self.out_dir / results.METRICS, self.progress.metrics)
            results.write_jsonl(self.out_dir / results.PROBES, self.progress.probes)
            elapsed = time.perf_counter() - self.started  # the checkpoint counts this session's time too
            save_checkpoint(self.checkpoint_path, self.model, self.optimizer, self.scheduler, self.precision.scaler,
                            dataclasses.replace(self.progress, wall_time_s=self.progress.wall_time_s + elapsed),
                            self.settings, rng, self.plugin_code)

    def close_interval(self) -> None:
        """Book the training interval since the last evaluation: its probed steps as probing, the rest as training."""
        self.progress.train_time_s += self.clock.seconds(self.interval_started, self.clock.mark()) - self.probe_s
        self.progress.probe_time_s += self.probe_s
        self.probe_s = 0.0

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This worker's inputs and labels of `step`: the epoch's shuffle, then the step's augmentation."""
        settings = self.settings
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        if self.permutation_epoch != epoch:
            self.permutation = epoch_permutation(settings.seed, epoch, len(self.train_split), self.device)
            self.permutation_epoch = epoch
        index = batch_indices(self.permutation, step_in_epoch, settings, self.worker.rank)
        inputs, labels = self.train_split.inputs[index], self.train_split.labels[index]
        if settings.augment:
            inputs = augment_batch(inputs, seeded_generator(settings.seed, step))
        return inputs, labels

    def train_step(self, step: int) -> None:
        settings, clock, progress = self.settings, self.clock, self.progress
        inputs, labels = self.batch(step)
        probe = Probe(self.model) if step in self.probe_steps else None
        probe_started = clock.mark() if probe else None  # a probed step is timed as probing, not as training
        if probe and "ics" in settings.probes:  # before this step's update, on the same batch
            progress.probes += probes.ics_rows(self.model, inputs, labels, settings.effective_lr, step)
        # A compiled model keeps its graph: no activation hooks, only the gradient and weight norms.
        watching = probe.watching_activations() if probe and not settings.compile else contextlib.nullcontext()
        # The phases of one step in SYNC_EVERY_STEPS (not a probed one) are timed apart, as timm's benchmark --detail.
        compiling = settings.compile and self.compile_time_s is None  # the session's first step compiles the model
        timed = step % SYNC_EVERY_STEPS == SYNC_EVERY_STEPS // 2 and probe is None and not compiling
        marks = [clock.mark()] if timed else []
        if settings.compile == "reduce-overhead":  # a new training step: the last one's graph outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        with self.precision.autocast(), watching:
            logits = self.trained(inputs.contiguous(memory_format=self.memory_format))
        loss = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten())  # per image, or per token
        marks += [clock.mark()] if timed else []
        self.window_losses.append(loss.detach())
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss)
        marks += [clock.mark()] if timed else []
        if probe:
            self.precision.unscale(self.optimizer)
            progress.probes += probe.rows(step)
        skipped = self.precision.step(self.optimizer)
        if skipped is not None:
            self.skip_flags.append((step, skipped))
        self.scheduler.step()
        if timed:
            self.phase_marks.append((*marks, clock.mark()))
        if compiling:  # timed apart from training, probe and all: the interval restarts after it
            self.compile_time_s = clock.seconds(self.interval_started, clock.mark())
            self.interval_started = clock.mark()
        elif probe:
            self.probe_s += clock.seconds(probe_started, clock.mark())
        else:
            progress.timed_steps += 1
        self.loss_sum += loss.detach() * labels.numel()
        self.correct += (logits.argmax(-1) == labels).sum()
        self.seen += labels.numel()
        self.bar.update()
        progress.step = step + 1

    def at_sync_point(self) -> bool:
        return self.progress.step in self.eval_steps or self.progress.step % SYNC_EVERY_STEPS == 0

    def sync_point(self) -> bool:
        """Read what the device holds since the last sync point: a diverged step ends the cell, so does the time
        limit (after an evaluation) and a preemption request (with a checkpoint); evaluate when one is due.
        True when training stops here."""
        progress, device = self.progress, self.device
        # The global mean losses: every worker sees the same values, so all find the same diverged step.
        losses = mean_over_workers(torch.stack(self.window_losses))
        broke = (~torch.isfinite(losses) | (losses > self.settings.max_loss)).nonzero().flatten().tolist()  # one read
        self.window_losses.clear()
        flags = torch.stack([flag for _, flag in self.skip_flags]).tolist() if self.skip_flags else []
        skipped_at = [step for (step, _), flag in zip(self.skip_flags, flags) if flag]
        self.skip_flags.clear()
        if broke:
            first_diverged = progress.step - len(losses) + broke[0]
            self.diverged_reason = (f"training loss {float(losses[broke[0]]):.4g} at step {first_diverged} "
                                    f"(bound: finite and <= {self.settings.max_loss:g})")
            progress.step = first_diverged
            progress.probes = [row for row in progress.probes if row["step"] < first_diverged]
            progress.skipped_steps += sum(step < first_diverged for step in skipped_at)
            return True
        progress.skipped_steps += len(skipped_at)
        evaluating = progress.step in self.eval_steps
        # Every worker has the same limit and asks here, so all stop at the same step.
        out_of_time = self.time_limit_s is not None and \
            any_worker(time.perf_counter() - self.started > self.time_limit_s, device)
        if out_of_time and progress.step < self.total_steps:
            self.timed_out_reason = (f"time limit of {self.time_limit_s:g} s reached after step {progress.step} of "
                                     f"{self.total_steps}")
        preempted = any_worker(bool(self.stop_requests), device) and progress.step < self.total_steps
        if evaluating:
            self.evaluation()
        if self.timed_out_reason or preempted:
            # Between evaluations this interval's time and train sums go in the checkpoint, without an evaluation
            # of its own: a resumed cell then writes the metrics an uninterrupted one does.
            if not evaluating:
                self.close_interval()
                self.save_state()
            if self.timed_out_reason:
                return True
            raise Preempted(f"stopped by {self.stop_requests[0] if self.stop_requests else 'another worker'} after "
                            f"step {progress.step} of {self.total_steps}, its checkpoint saved; run the cell again "
                            f"to continue")
        return False

    def evaluation(self) -> None:
        """Test loss and accuracy, the train numbers since the last evaluation, a metrics row and a checkpoint."""
        progress = self.progress
        self.close_interval()
        test_loss, test_acc = evaluate(self.model, self.test_split, self.memory_format, self.precision)
        totals = all_reduce_sum(torch.stack([self.loss_sum, self.correct.to(self.loss_sum.dtype),
                                             self.loss_sum.new_tensor(self.seen)]))
        train_loss, train_acc = (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()
        progress.metrics.append({
            "step": progress.step, "epoch": progress.step / self.steps_per_epoch,
            "train_loss": train_loss, "train_acc": train_acc,
            "test_loss": test_loss, "test_acc": test_acc, "lr": self.optimizer.param_groups[0]["lr"],
            "elapsed_s": progress.wall_time_s + time.perf_counter() - self.started,
            # Cumulative timed training: per evaluation interval, one repeat of the step time.
            "train_time_s": progress.train_time_s, "timed_steps": progress.timed_steps,
        })
        if self.worker.is_main and "percentiles" in self.settings.probes:
            progress.probes += probes.percentile_rows(self.model, self.probe_inputs, progress.step)
        if self.worker.is_main:
            self.bar.write(f"step {progress.step}/{self.total_steps} epoch {progress.step / self.steps_per_epoch:.2f} "
                           f"train_loss {train_loss:.4f} test_acc {test_acc:.4f}")
        self.loss_sum.zero_()
        self.correct.zero_()
        self.seen = 0
        if progress.step < self.total_steps:  # at the last evaluation the finished cell's files follow instead
            self.save_state()
        self.interval_started = self.clock.mark()

    def out_of_memory(self, error: BaseException) -> None:
        if self.worker.world_size > 1:  # the other workers wait in a collective: the cell fails as a whole
            raise error
        self.failed_reason = (f"out of memory at step {self.progress.step}: "
                              f"{(str(error) or type(error).__name__).splitlines()[0]}")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def finish(self) -> dict:
        """The probes of the trained model, the summary and the cell's files (rank 0); returns the summary."""
        settings, progress, worker = self.settings, self.progress, self.worker
        self.bar.close()
        if threading.current_thread() is threading.main_thread():  # past the last sync point a signal ends the cell
            for number in PREEMPTION_SIGNALS:                        # at once (it is rerun from its checkpoint)
                signal.signal(number, signal.SIG_DFL)
        synchronize(self.device)
        if self.diverged_reason is not None or self.failed_reason is not None:  # the steps since the last
            self.close_interval()                                                # evaluation still count
        phases = {name: [self.clock.seconds(marks[i], marks[i + 1]) for marks in self.phase_marks]
                  for i, name in enumerate(("forward", "backward", "optimizer"))}
        finished = self.diverged_reason is None and self.timed_out_reason is None and self.failed_reason is None
        if worker.is_main and finished:
            progress.probes += after_training_rows(settings, self.model, self.train_split, self.test_split,
                                                   self.probe_inputs, self.memory_format, self.precision,
                                                   progress.step, progress.metrics[-1]["test_acc"])
        # A diverged or failed cell has no final numbers.
        final = progress.metrics[-1] if progress.metrics and self.diverged_reason is None \
            and self.failed_reason is None else {}
        summary = {
            "final_test_acc": final.get("test_acc"),
            "best_test_acc": max((row["test_acc"] for row in progress.metrics), default=None),
            # What always predicting the commonest test label scores: the accuracy a diverged cell is worth.
            "chance_acc": float(torch.bincount(self.test_split.labels.flatten()).max()
                                / self.test_split.labels.numel()),
            "final_test_loss": final.get("test_loss"),
            "final_train_loss": final.get("train_loss"),
            "diverged": self.diverged_reason is not None,
            "diverged_step": progress.step if self.diverged_reason else None,
            "diverged_reason": self.diverged_reason,
            "failed": self.failed_reason is not None,
            "failed_step": progress.step if self.failed_reason else None,
            "failure_reason": self.failed_reason,
            "timed_out": self.timed_out_reason is not None,
            "timed_out_reason": self.timed_out_reason,
            "time_limit_s": self.time_limit_s,  # this session's: the workflow continues a timed-out cell when it rises
            "steps": progress.step,
            "skipped_steps": progress.skipped_steps,
            "total_steps": self.total_steps,
            # Over the steps that ran and were timed as training (not probed, not compiling); a diverged cell's
            # steps past the diverged one ran too, up to the sync point that found it.
            "train_samples_per_s": (progress.timed_steps * settings.global_batch_size / progress.train_time_s)
            if progress.train_time_s > 0 and progress.timed_steps else None,
            "train_time_s": progress.train_time_s,
            "probe_time_s": progress.probe_time_s,
            "probed_steps": sum(step < progress.step for step in self.probe_steps),
            "wall_time_s": progress.wall_time_s + time.perf_counter() - self.started,
            "num_params": sum(p.numel() for p in self.model.parameters()),
            "peak_memory_mb": peak_memory_mb(self.device),
            # Mean seconds per step of each phase, over one timed step in SYNC_EVERY_STEPS of this session.
            **{f"{name}_s": sum(times) / len(times) if times else None for name, times in phases.items()},
            "compile_time_s": self.compile_time_s,
            "resumed_from_step": progress.resumed_from_step,
        }
        if worker.is_main:
            results.write_jsonl(self.out_dir / results.METRICS, progress.metrics)
            results.write_jsonl(self.out_dir / results.PROBES, progress.probes)
            results.write_atomic(self.out_dir / results.WEIGHTS, lambda f: torch.save(self.model.state_dict(), f),
                                 mode="wb")
            results.write_json(self.out_dir / results.SUMMARY, summary)
            # A finished cell keeps its weights, not its resumable state: a forced rerun trains afresh. A timed-out
            # cell keeps its checkpoint, so that a rerun with a longer limit goes on from where it stopped.
            if self.timed_out_reason is None:
                self.checkpoint_path.unlink(missing_ok=True)
        return summary
