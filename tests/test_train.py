"""The training loop end to end on tiny Fashion-MNIST cells: learning, determinism, resume, divergence."""

import copy
import json
import math

import pytest
import torch

from normbench import train as train_module
from normbench.cli import main
from normbench.cells import make_settings
from normbench.config import SettingsError, format_assignment
from normbench.results import read_json, read_jsonl
from normbench.train import train

TIMING = {"elapsed_s", "train_time_s", "timed_steps", "wall_time_s", "train_samples_per_s", "resumed_from_step", "forward_s", "backward_s",
          "optimizer_s", "compile_time_s", "peak_memory_mb", "probe_time_s", "time_limit_s"}


@pytest.fixture
def tiny(fashion_root):
    def settings(**overrides):
        values = {"data_root": str(fashion_root), "model": "resnet20", "width": 4, "gn_groups": 2, "norm": "bn",
                  "train_subset": 1024, "test_subset": 500, "batch_size": 32, "epochs": 2, "evals_per_epoch": 2,
                  "lr": 0.05, "seed": 0, "device": "cpu"}
        return make_settings({**values, **overrides})
    return settings


def without_timing(rows):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def test_tiny_cell_learns_and_writes_its_files(tiny, tmp_path):
    summary = train(tiny(), tmp_path)
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in metrics] == [16, 32, 48, 64]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"] < math.log(10)
    assert summary["final_test_acc"] > 0.3 and not summary["diverged"]
    assert summary["steps"] == 64 and summary["train_samples_per_s"] > 0
    assert read_json(tmp_path / "config.json") == tiny().to_dict()
    env = read_json(tmp_path / "env.json")
    assert env["torch"] and env["device"] == "cpu"
    assert read_json(tmp_path / "summary.json") == summary


def test_same_seed_same_numbers_other_seed_other_numbers(tiny, tmp_path):
    first = train(tiny(), tmp_path / "a")
    again = train(tiny(), tmp_path / "b")
    other = train(tiny(seed=1), tmp_path / "c")
    assert without_timing([first]) == without_timing([again])
    assert without_timing(read_jsonl(tmp_path / "a/metrics.jsonl")) == without_timing(read_jsonl(tmp_path / "b/metrics.jsonl"))
    assert other["final_test_loss"] != first["final_test_loss"]


def test_interrupted_run_resumes_to_the_same_numbers(tiny, tmp_path, monkeypatch):
    settings = tiny(augment=True)
    uninterrupted = train(settings, tmp_path / "whole")

    real_evaluate, calls = train_module.evaluate, []

    def interrupt_at_third_evaluation(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_evaluate(*args)

    monkeypatch.setattr(train_module, "evaluate", interrupt_at_third_evaluation)
    with pytest.raises(KeyboardInterrupt):
        train(settings, tmp_path / "cut")
    assert not (tmp_path / "cut/summary.json").exists()
    monkeypatch.setattr(train_module, "evaluate", real_evaluate)

    resumed = train(settings, tmp_path / "cut")
    assert resumed["resumed_from_step"] == 32
    assert without_timing([resumed]) == without_timing([uninterrupted])
    assert without_timing(read_jsonl(tmp_path / "cut/metrics.jsonl")) == without_timing(read_jsonl(tmp_path / "whole/metrics.jsonl"))


def test_divergence_is_recorded_not_raised(tiny, tmp_path):
    summary = train(tiny(lr=50.0, norm="none"), tmp_path)
    assert summary["diverged"] and summary["diverged_step"] < 64
    assert "training loss" in summary["diverged_reason"]
    assert summary["final_test_acc"] is None
    assert read_json(tmp_path / "summary.json")["diverged"]


def test_absurd_learning_rate_ends_as_diverged_with_exit_status_zero(tiny, tmp_path, capsys):
    assignments = [format_assignment(k, v) for k, v in tiny(lr=1e4, epochs=1).to_dict().items()]
    main(["train", "--out", str(tmp_path), "--threads", "1", "--set", *assignments])  # no SystemExit
    assert "diverged: training loss" in capsys.readouterr().out
    assert read_json(tmp_path / "summary.json")["diverged"]


def test_cli_rejects_bad_settings_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"setting 'norm': unknown norm 'foo'; known: bn, .*or your own as path/to/file.py:Name"):
        main(["train", "--out", str(tmp_path / "cell"), "--set", "norm=foo"])
    with pytest.raises(SystemExit, match=r"setting 'batch_size': 0 is less than the minimum"):
        main(["train", "--out", str(tmp_path / "cell"), "--set", "batch_size=0"])
    assert not (tmp_path / "cell").exists()


def test_cli_reruns_a_cell_from_its_config(tiny, tmp_path):
    cell = tmp_path / "cell"
    assignments = [format_assignment(key, value) for key, value in tiny(norm="gn", epochs=1).to_dict().items()]
    main(["train", "--out", str(cell), "--threads", "1", "--set", *assignments])
    main(["train", "--out", str(tmp_path / "rerun"), "--threads", "1", "--from", str(cell / "config.json")])
    assert read_json(tmp_path / "rerun/config.json") == read_json(cell / "config.json")
    assert without_timing(read_jsonl(tmp_path / "rerun/metrics.jsonl")) == without_timing(read_jsonl(cell / "metrics.jsonl"))


def test_atomic_writes_leave_no_partial_file_and_normal_permissions(tmp_path):
    import os
    import stat

    from normbench.results import write_atomic, write_json

    write_json(tmp_path / "a.json", {"x": 1})
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o666 & ~_current_umask()

    def fail(handle):
        handle.write("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_atomic(tmp_path / "a.json", fail)
    assert read_json(tmp_path / "a.json") == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def _current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_device_side_divergence_check_stops_at_the_step_of_a_per_step_check(tiny, tmp_path, monkeypatch, device):
    # An MLP without a norm whose lr ramps up until the loss breaks the bound, just after the first evaluation.
    settings = tiny(model="mlp", width=32, norm="none", lr=2.0, warmup_steps=64, max_loss=10.0, device=device)
    monkeypatch.setattr(train_module, "SYNC_EVERY_STEPS", 1)  # a host read of the loss every step
    every_step = train(settings, tmp_path / "every")
    monkeypatch.setattr(train_module, "SYNC_EVERY_STEPS", 1000)  # only at evaluations
    at_evaluations = train(settings, tmp_path / "evals")
    assert every_step["diverged"] and every_step["diverged_step"] % 16  # between two evaluations
    for key in ("diverged_step", "diverged_reason", "steps", "skipped_steps"):
        assert at_evaluations[key] == every_step[key], key
    assert read_jsonl(tmp_path / "evals/probes.jsonl") == read_jsonl(tmp_path / "every/probes.jsonl")
    assert without_timing(read_jsonl(tmp_path / "evals/metrics.jsonl")) == \
        without_timing(read_jsonl(tmp_path / "every/metrics.jsonl"))


@pytest.mark.parametrize("overrides, stop", [({}, 16),  # the first sync point is an evaluation
                                             ({"train_subset": 2048, "epochs": 1, "evals_per_epoch": 1}, 32)])
def test_a_cell_past_its_time_limit_is_recorded_as_timed_out_and_resumes(tiny, tmp_path, overrides, stop):
    settings = tiny(**overrides)
    whole = train(settings, tmp_path / "whole")
    summary = train(settings, tmp_path / "cut", time_limit_s=0.0)  # out of time at the first sync point
    assert summary["timed_out"] and not summary["diverged"] and summary["steps"] == stop
    assert f"time limit of 0 s reached after step {stop} of 64" in summary["timed_out_reason"]
    evaluated = read_jsonl(tmp_path / "cut/metrics.jsonl")  # the evaluations due so far, none of the stop's own
    assert [row["step"] for row in evaluated] == ([16] if stop == 16 else [])
    assert summary["final_test_acc"] == (evaluated[-1]["test_acc"] if evaluated else None)
    assert (tmp_path / "cut/checkpoint.pt").exists()
    resumed = train(settings, tmp_path / "cut")
    assert not resumed["timed_out"] and resumed["resumed_from_step"] == stop
    assert without_timing([resumed]) == without_timing([{**whole, "timed_out": False}])
    assert without_timing(read_jsonl(tmp_path / "cut/metrics.jsonl")) == \
        without_timing(read_jsonl(tmp_path / "whole/metrics.jsonl"))


def test_a_killed_cell_resumes_to_the_numbers_of_an_uninterrupted_one(tiny, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    settings = tiny(evals_per_epoch=8)
    words = [format_assignment(k, v) for k, v in settings.to_dict().items()]
    command = [sys.executable, "-m", "normbench.cli", "train", "--threads", "1", "--out", str(tmp_path / "cut"),
               "--set", *words]
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    while not (tmp_path / "cut/checkpoint.pt").exists() and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "cut/summary.json").exists(), "the cell finished before it could be killed"
    subprocess.run(command, check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    resumed = read_json(tmp_path / "cut/summary.json")
    # The same command, uninterrupted: one thread too (two threads round differently), whatever this process runs.
    whole_command = [word if word != str(tmp_path / "cut") else str(tmp_path / "whole") for word in command]
    subprocess.run(whole_command, check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    whole = read_json(tmp_path / "whole/summary.json")
    assert resumed["resumed_from_step"] > 0
    assert without_timing([resumed]) == without_timing([whole])
    assert without_timing(read_jsonl(tmp_path / "cut/metrics.jsonl")) == without_timing(read_jsonl(tmp_path / "whole/metrics.jsonl"))


def test_checkpoints_load_without_running_code(tiny, tmp_path, capsys):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"settings": Payload()}, tmp_path / "checkpoint.pt")  # a whole, valid file that would run code
    assert train_module.read_checkpoint(tmp_path / "checkpoint.pt", tiny(), {}) is None
    captured = capsys.readouterr()
    assert "code ran" not in captured.out and "Weights only load failed" in captured.err
    assert pickle.loads(pickle.dumps(Payload())) is None  # the payload does run code when unpickled plainly


@pytest.mark.parametrize("damage", ["truncated", "older format", "a part missing"])
def test_a_damaged_checkpoint_restarts_the_cell_with_a_warning(tiny, tmp_path, capsys, damage):
    settings = tiny()
    whole = train(settings, tmp_path / "whole")
    train(settings, tmp_path / "cut", time_limit_s=0.0)  # leaves a checkpoint at step 16
    checkpoint = tmp_path / "cut/checkpoint.pt"
    if damage == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    else:
        state = torch.load(checkpoint, weights_only=True)
        gone = "format" if damage == "older format" else "optimizer"
        torch.save({key: value for key, value in state.items() if key != gone}, checkpoint)
    capsys.readouterr()
    restarted = train(settings, tmp_path / "cut")
    warning = capsys.readouterr().err
    assert str(checkpoint) in warning and "the cell starts afresh" in warning
    assert restarted["resumed_from_step"] is None
    assert without_timing([restarted]) == without_timing([whole])


def test_a_checkpoint_from_before_plugin_digests_resumes_a_cell_without_plugins(tiny, tmp_path):
    """Checkpoints gained the plugins' digests without a new format: in-flight built-in cells keep their progress."""
    settings = tiny()
    whole = train(settings, tmp_path / "whole")
    train(settings, tmp_path / "cut", time_limit_s=0.0)
    checkpoint = tmp_path / "cut/checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)
    torch.save({key: value for key, value in state.items() if key != "plugin_code"}, checkpoint)
    resumed = train(settings, tmp_path / "cut")
    assert resumed["resumed_from_step"] == 16
    assert without_timing([resumed]) == without_timing([whole])


def test_a_cell_from_before_a_setting_existed_resumes_at_its_default(tiny, tmp_path):
    """A setting added since a cell was written (stem_stride) takes its default there, which is what the cell trained
    with: its config.json and checkpoint still hold the same settings, so it resumes."""
    settings = tiny()
    whole = train(settings, tmp_path / "whole")
    train(settings, tmp_path / "cut", time_limit_s=0.0)
    checkpoint, config = tmp_path / "cut/checkpoint.pt", tmp_path / "cut/config.json"
    state = torch.load(checkpoint, weights_only=True)
    del state["settings"]["stem_stride"]
    torch.save(state, checkpoint)
    config.write_text(json.dumps({key: value for key, value in read_json(config).items() if key != "stem_stride"}))
    resumed = train(settings, tmp_path / "cut")
    assert resumed["resumed_from_step"] == 16
    assert without_timing([resumed]) == without_timing([whole])


def test_rng_states_are_restored_per_rank_onto_the_workers_own_device(monkeypatch):
    """A checkpoint holds each rank's own CUDA state; resuming sets only the worker's device, so it works where
    fewer GPUs are visible than when it was written (faked here: no CUDA is needed)."""
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    cpu_states = [torch.get_rng_state(), torch.Generator().manual_seed(7).get_state()]
    state = {"cpu_rng_by_rank": cpu_states, "cuda_rng_by_rank": [torch.tensor([0], dtype=torch.uint8),
                                                                 torch.tensor([1], dtype=torch.uint8)]}
    worker = train_module.Worker(rank=1, local_rank=0, world_size=2)  # its GPU is cuda:0 where one is visible
    train_module.restore_rng_states(state, torch.device("cuda", 0), worker)
    assert restored == [(state["cuda_rng_by_rank"][1], torch.device("cuda", 0))]
    assert torch.equal(torch.get_rng_state(), cpu_states[1])
    restored.clear()
    train_module.restore_rng_states(state, torch.device("cpu"), train_module.Worker())  # a CPU cell: no CUDA
    assert restored == [] and torch.equal(torch.get_rng_state(), cpu_states[0])
    assert train_module.rng_states(torch.device("cpu"), train_module.Worker())["cuda_rng_by_rank"] == [None]


def test_probes_leave_training_untouched(tiny, tmp_path, device):
    """The ICS probe draws dropout and reseeds inside a forked RNG (the CUDA one too): the trained numbers are
    those of a cell without it."""
    settings = dict(model="mlp", width=32, depth=2, dropout=0.3, epochs=1, device=device)
    plain = train(tiny(**settings), tmp_path / "plain")
    probed = train(tiny(**settings, probes=["ics"]), tmp_path / "probed")
    keep = ("final_test_acc", "final_test_loss", "final_train_loss", "steps")
    assert {k: probed[k] for k in keep} == {k: plain[k] for k in keep}
    assert without_timing(read_jsonl(tmp_path / "probed/metrics.jsonl")) == \
        without_timing(read_jsonl(tmp_path / "plain/metrics.jsonl"))
    assert any(row["quantity"] == "ics_l2" for row in read_jsonl(tmp_path / "probed/probes.jsonl"))


def test_a_cell_records_tf32_and_determinism_and_leaves_the_process_as_it_was(tiny, tmp_path):
    summary = train(tiny(model="mlp", width=32, epochs=1, deterministic=True), tmp_path)
    env = read_json(tmp_path / "env.json")
    assert env["deterministic_algorithms"] and env["cudnn_deterministic"] and env["tf32"] is None  # a CPU cell
    assert not torch.are_deterministic_algorithms_enabled() and summary["final_test_acc"] > 0.3


def test_atomic_write_killed_midway_keeps_the_old_file(tmp_path):
    import subprocess
    import sys

    (tmp_path / "table.csv").write_text("old\n")
    code = ("import os, signal; from normbench.results import write_atomic\n"
            "def write(f):\n    f.write('half'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
            f"write_atomic({str(tmp_path / 'table.csv')!r}, write)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    assert (tmp_path / "table.csv").read_text() == "old\n"


def test_step_phases_are_timed_apart(tiny, tmp_path, device):
    summary = train(tiny(device=device), tmp_path)
    phases = [summary[f"{name}_s"] for name in ("forward", "backward", "optimizer")]
    assert all(0 < seconds for seconds in phases)
    assert sum(phases) * summary["steps"] < 1.5 * summary["train_time_s"]  # parts of the measured steps
    assert summary["compile_time_s"] is None
    assert summary["peak_memory_mb"] > (100 if device == "cpu" else 0)  # the process's RSS; CUDA's allocations


def test_compile_modes_reach_torch_compile_and_nothing_else_is_a_mode(tiny, monkeypatch):
    from normbench.distributed import Worker

    modes = []
    monkeypatch.setattr(torch, "compile", lambda module, mode=None: modes.append(mode) or module)
    for setting in (True, "reduce-overhead", False):
        train_module.prepare_model(tiny(compile=setting), torch.device("cpu"), torch.float32, torch.contiguous_format,
                                   Worker())
    assert modes == [None, "reduce-overhead"]
    with pytest.raises(SettingsError, match="compile"):
        tiny(compile="max-speed")


@pytest.mark.slow
@pytest.mark.parametrize("mode", [True, "reduce-overhead"])
def test_a_compiled_cell_trains_like_the_eager_one_and_times_its_compilation(tiny, tmp_path, device, capsys, mode):
    """From the command line, as a user runs it: the compiling first step (probed, too) is timed apart, once. On a
    GPU reduce-overhead replays CUDA graphs (on the CPU it is the default mode: tried there only on a GPU)."""
    if mode == "reduce-overhead" and device == "cpu":
        pytest.skip("CUDA graphs need a GPU; on the CPU reduce-overhead compiles as true does")
    settings = dict(model="mlp", width=32, epochs=1, device=device)
    eager = train(tiny(**settings), tmp_path / "eager")
    words = [format_assignment(k, v) for k, v in tiny(**settings, compile=mode).to_dict().items()]
    main(["train", "--out", str(tmp_path / "compiled"), "--set", *words])
    compiled = read_json(tmp_path / "compiled/summary.json")
    assert compiled["compile_time_s"] > 0 and not compiled["diverged"]
    assert 0 < compiled["train_time_s"] < compiled["compile_time_s"] and compiled["train_samples_per_s"] > 0
    assert 0 < compiled["probe_time_s"] < compiled["compile_time_s"]  # later probed steps only
    assert f"{compiled['train_samples_per_s']:.0f} samples/s" in capsys.readouterr().out
    assert compiled["final_train_loss"] == pytest.approx(eager["final_train_loss"], rel=1e-3)
    assert compiled["final_test_acc"] == pytest.approx(eager["final_test_acc"], abs=0.01)


def test_a_second_writer_into_a_cell_folder_is_refused_while_the_first_runs(tiny, tmp_path):
    import subprocess
    import sys

    hold = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)")
    (tmp_path / "cell").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "cell/.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"  # as a running `normbench train` holds it
        with pytest.raises(SettingsError, match=r"cell is being trained by another normbench process"):
            train_module.run_cell(tiny(model="mlp", width=16, epochs=1), tmp_path / "cell")
        assert not (tmp_path / "cell/config.json").exists()  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    summary = train_module.run_cell(tiny(model="mlp", width=16, epochs=1), tmp_path / "cell")  # freed at its death
    assert summary["steps"] == 32


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   MemoryError()])
def test_out_of_memory_is_a_result_not_a_crash(tiny, tmp_path, monkeypatch, capsys, error):
    from normbench.precision import Precision

    real_backward, calls = Precision.backward, []

    def backward_until_memory_runs_out(self, loss):
        calls.append(1)
        if len(calls) == 6:  # the sixth step asks for more than there is
            raise error
        real_backward(self, loss)

    monkeypatch.setattr(Precision, "backward", backward_until_memory_runs_out)
    main(["train", "--out", str(tmp_path), "--threads", "1", "--set",
          *[format_assignment(k, v) for k, v in tiny(model="mlp", width=16).to_dict().items()]])
    summary = read_json(tmp_path / "summary.json")
    assert summary["failed"] and summary["failed_step"] == 5 and summary["steps"] == 5
    assert summary["failure_reason"].startswith("out of memory at step 5")
    assert summary["final_test_acc"] is None and not summary["diverged"]
    assert not (tmp_path / "checkpoint.pt").exists()  # it would run out again: no resumable state kept
    assert "failed: out of memory at step 5" in capsys.readouterr().out  # and the command exits 0


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1"])
def test_a_preempted_cell_stops_with_a_checkpoint_and_resumes_to_the_uninterrupted_numbers(tiny, tmp_path,
                                                                                           signal_name):
    """SIGTERM between two evaluations: the cell finishes its step, checkpoints at the next sync point (every 32
    steps, so past the last evaluation) and exits non-zero; the rerun continues from there to the same numbers."""
    import signal
    import subprocess
    import sys
    import time

    settings = tiny(model="mlp", width=64, train_subset=8192, evals_per_epoch=1)  # 256 steps an epoch
    words = [format_assignment(k, v) for k, v in settings.to_dict().items()]
    command = [sys.executable, "-m", "normbench.cli", "train", "--threads", "1", "--out", str(tmp_path / "cut"),
               "--set", *words]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    while not (tmp_path / "cut/checkpoint.pt").exists() and process.poll() is None:
        time.sleep(0.005)
    sent = time.monotonic()
    process.send_signal(getattr(signal, signal_name))
    stderr = process.communicate(timeout=30)[1]
    assert process.returncode != 0 and time.monotonic() - sent < 30
    assert f"stopped by {signal_name} after step" in stderr and not (tmp_path / "cut/summary.json").exists()
    stopped_at = torch.load(tmp_path / "cut/checkpoint.pt", weights_only=True)["progress"]["step"]
    assert 256 < stopped_at < 512 and stopped_at % 32 == 0  # past the last evaluation (256), at a sync point
    subprocess.run(command, check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    resumed = read_json(tmp_path / "cut/summary.json")
    uninterrupted = [str(tmp_path / "whole") if word == str(tmp_path / "cut") else word for word in command]
    subprocess.run(uninterrupted, check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # same threads
    whole = read_json(tmp_path / "whole/summary.json")
    assert resumed["resumed_from_step"] == stopped_at
    assert without_timing([resumed]) == without_timing([whole])
    assert without_timing(read_jsonl(tmp_path / "cut/metrics.jsonl")) == \
        without_timing(read_jsonl(tmp_path / "whole/metrics.jsonl"))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_optimizer_is_fused_on_cuda_and_steps_as_the_default_one(device, optimizer):
    device = torch.device(device)
    settings = make_settings({"model": "mlp", "width": 16, "optimizer": optimizer, "lr": 0.1, "weight_decay": 0.01})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4)).to(device)
    reference = copy.deepcopy(model)
    chosen = train_module.make_optimizer(model, settings)
    assert bool(chosen.defaults.get("fused")) == (device.type == "cuda")
    groups = [{"params": [p for p in reference.parameters() if p.ndim > 1], "weight_decay": 0.01},
              {"params": [p for p in reference.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    default = (torch.optim.SGD(groups, lr=0.1, momentum=settings.momentum) if optimizer == "sgd"
               else torch.optim.AdamW(groups, lr=0.1))
    x = torch.randn(16, 8, device=device)
    for _ in range(3):
        for net, opt in ((model, chosen), (reference, default)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for fused_param, default_param in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(fused_param, default_param, rtol=1e-5, atol=1e-6)
