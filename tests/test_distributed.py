"""Data parallelism on CPU (gloo): the cross-process BatchNorm and whole training runs against single-process truth."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from normbench.cells import make_settings
from normbench.config import format_assignment
from normbench.distributed import WorkerFailed
from normbench.norms import CrossProcessBatchNorm, norm_factory
from normbench.train import run_cell, train

WORLD = 2


def _syncbn_rank(rank: int, store: str, shape: tuple, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)  # every rank draws the same global batch and parameters, then keeps its slice
    x = torch.randn(shape, dtype=torch.float64) * 3 + 10
    upstream = torch.randn(shape, dtype=torch.float64)
    layer = CrossProcessBatchNorm(shape[1], momentum=0.3).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(shape[1]))
        layer.bias.copy_(torch.randn(shape[1]))
    local = slice(rank * shape[0] // WORLD, (rank + 1) * shape[0] // WORLD)
    x_local = x[local].clone().requires_grad_()
    y = layer(x_local)
    y.backward(upstream[local])
    torch.save({"y": y.detach(), "x_grad": x_local.grad, "weight_grad": layer.weight.grad, "bias_grad": layer.bias.grad,
                "running_mean": layer.running_mean, "running_var": layer.running_var}, f"{out}/{rank}.pt")
    dist.barrier()  # both ranks done before either tears gloo down (a rank leaving early can abort the other)
    dist.destroy_process_group()


@pytest.mark.parametrize("shape", [(8, 3, 4, 5), (12, 6)])
def test_cross_process_batchnorm_equals_batchnorm_on_the_concatenated_batch(tmp_path, shape):
    mp.spawn(_syncbn_rank, args=(str(tmp_path / "store"), shape, str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]

    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 10).requires_grad_()
    upstream = torch.randn(shape, dtype=torch.float64)
    reference = torch.nn.BatchNorm2d(shape[1], momentum=0.3) if len(shape) == 4 else torch.nn.BatchNorm1d(shape[1], momentum=0.3)
    reference = reference.double()
    with torch.no_grad():
        reference.weight.copy_(torch.randn(shape[1]))
        reference.bias.copy_(torch.randn(shape[1]))
    y = reference(x)
    y.backward(upstream)

    close = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), **close)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), x.grad, **close)
    # DDP sums (then averages) parameter gradients over workers; their sum is the single-process gradient.
    torch.testing.assert_close(sum(r["weight_grad"] for r in ranks), reference.weight.grad, **close)
    torch.testing.assert_close(sum(r["bias_grad"] for r in ranks), reference.bias.grad, **close)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], reference.running_mean, **close)
        torch.testing.assert_close(r["running_var"], reference.running_var, **close)


def test_outside_a_process_group_it_is_plain_batchnorm():
    torch.manual_seed(1)
    x = torch.randn(6, 4, 3, 3)
    ours, theirs = norm_factory("syncbn")(4), norm_factory("bn")(4)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_cuda_path_converts_to_torch_syncbatchnorm():
    """On CUDA the loop hands the model to convert_sync_batchnorm; every norm layer must be converted."""
    layer = norm_factory("syncbn")(4)
    with torch.no_grad():
        layer.weight.fill_(2.0)
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), layer))
    assert isinstance(model[1], torch.nn.SyncBatchNorm) and torch.all(model[1].weight == 2.0)


@pytest.fixture
def cell(fashion_root):
    def settings(**overrides):
        values = {"data_root": str(fashion_root), "model": "resnet20", "width": 8, "train_subset": 32,
                  "test_subset": 200, "epochs": 1, "evals_per_epoch": 1, "lr": 0.01, "device": "cpu"}
        return make_settings({**values, **overrides})
    return settings


def final_parameters(folder: Path) -> dict:
    return torch.load(folder / "model.pt")


def max_difference(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if "num_batches" not in k)


def test_syncbn_on_two_workers_trains_the_model_of_bn_on_one(cell, tmp_path):
    single = tmp_path / "bn_world1"
    train(cell(norm="bn", batch_size=16), single)

    synced = tmp_path / "syncbn_world2"  # through an outer torchrun, as on several nodes
    assignments = [format_assignment(k, v) for k, v in cell(norm="syncbn", world_size=2, batch_size=8).to_dict().items()]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
         "-m", "normbench.cli", "train", "--threads", "2", "--out", str(synced), "--set", *assignments],
        capture_output=True, text=True, env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    per_worker = tmp_path / "bn_world2"  # through the cell's own launcher
    run_cell(cell(norm="bn", world_size=2, batch_size=8), per_worker, threads=2)

    # Two steps: float32 reduction-order noise stays near 1e-6 (this small BN net amplifies such noise about
    # tenfold per step later on, as a change of thread count shows), while per-worker statistics change the model.
    assert max_difference(final_parameters(synced), final_parameters(single)) < 2e-6
    assert max_difference(final_parameters(per_worker), final_parameters(single)) > 1e-3


def test_syncbn_in_one_process_trains_the_model_of_bn(cell, tmp_path, device):
    """On CUDA this runs through torch.nn.SyncBatchNorm, which without other workers must be plain BN."""
    train(cell(norm="bn", batch_size=16, device=device), tmp_path / "bn")
    train(cell(norm="syncbn", batch_size=16, device=device), tmp_path / "syncbn")
    # Without a process group torch.nn.SyncBatchNorm calls F.batch_norm: the same kernels. Bitwise on the CPU; on
    # CUDA two runs of the same cell differ by GPU nondeterminism (atomics in cuDNN's backward), still far below
    # the 1e-3 by which per-worker statistics move the model in the test above.
    assert max_difference(final_parameters(tmp_path / "syncbn"), final_parameters(tmp_path / "bn")) < 1e-4


def test_a_failing_worker_fails_the_cell_with_its_rank(cell, tmp_path):
    broken = cell(norm="bn", world_size=2, batch_size=8, data_root=str(tmp_path / "no-data"))
    with pytest.raises(WorkerFailed, match=r"worker rank \d of this 2-process cell failed first: DatasetMissing: the data folder .*no-data. does not exist"):
        run_cell(broken, tmp_path / "cell", threads=2, timeout_s=60)
    assert not (tmp_path / "cell" / "summary.json").exists()


def _silent_peer(rank: int, port: int, out: str) -> None:
    import time

    from normbench.distributed import all_reduce_sum, join_process_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    join_process_group("cpu", timeout_s=2)
    if rank == 1:
        time.sleep(30)  # a hung worker: it never joins the collective
        return
    started = time.monotonic()
    try:
        all_reduce_sum(torch.ones(1))
        outcome = "returned"
    except Exception as error:  # gloo's timeout error
        outcome = f"raised {type(error).__name__}"
    Path(out).write_text(f"{outcome} after {time.monotonic() - started:.1f}")
    os._exit(0)  # leave without waiting for the hung peer


def test_a_hung_worker_is_bounded_by_the_collective_timeout(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    workers = [context.Process(target=_silent_peer, args=(rank, port, str(tmp_path / "outcome"))) for rank in range(WORLD)]
    for worker in workers:
        worker.start()
    workers[0].join(timeout=25)
    for worker in workers:
        worker.kill()
    outcome, seconds = (tmp_path / "outcome").read_text().rsplit(" after ", 1)
    assert outcome.startswith("raised") and float(seconds) < 25  # well before the silent peer would wake


def test_a_two_worker_cell_resumes_to_the_numbers_of_an_uninterrupted_one(cell, tmp_path):
    """Each rank's random states are gathered into the checkpoint and every rank resumes at the same step."""
    settings = cell(norm="syncbn", world_size=2, batch_size=8, evals_per_epoch=2, epochs=2)
    run_cell(settings, tmp_path / "whole", threads=2)
    run_cell(settings, tmp_path / "cut", threads=2, time_limit_s=0.0)  # stops at the first evaluation
    state = torch.load(tmp_path / "cut/checkpoint.pt", weights_only=True)
    assert len(state["cpu_rng_by_rank"]) == 2 and state["cuda_rng_by_rank"] == [None, None]
    resumed = run_cell(settings, tmp_path / "cut", threads=2)
    assert resumed["resumed_from_step"] == 1 and resumed["steps"] == 4
    assert max_difference(final_parameters(tmp_path / "cut"), final_parameters(tmp_path / "whole")) == 0


def test_a_preempted_two_worker_cell_stops_every_worker_at_one_step_and_resumes(cell, tmp_path):
    """SIGTERM to the cell's process group (as SLURM sends it): both workers agree at a sync point, rank 0 saves
    every rank's state, and the rerun continues to the numbers of an uninterrupted run."""
    import signal
    import time

    settings = cell(norm="syncbn", world_size=2, batch_size=8, model="mlp", width=32, train_subset=4096,
                    epochs=2, evals_per_epoch=1)  # 256 steps an epoch
    words = [format_assignment(k, v) for k, v in settings.to_dict().items()]
    command = [sys.executable, "-m", "normbench.cli", "train", "--threads", "2", "--set", *words, "--out"]
    process = subprocess.Popen([*command, str(tmp_path / "cut")], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               text=True, start_new_session=True)
    while not (tmp_path / "cut/checkpoint.pt").exists() and process.poll() is None:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGTERM)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode != 0 and "stopped by SIGTERM" in stderr, stderr[-2000:]
    state = torch.load(tmp_path / "cut/checkpoint.pt", weights_only=True)
    assert 256 < state["progress"]["step"] < 512 and len(state["train_sums_by_rank"]) == 2
    subprocess.run([*command, str(tmp_path / "cut")], check=True, capture_output=True)
    subprocess.run([*command, str(tmp_path / "whole")], check=True, capture_output=True)
    resumed, whole = (json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])
                      for name in ("cut", "whole"))
    timing = ("elapsed_s", "train_time_s", "timed_steps")
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in whole.items() if k not in timing}
