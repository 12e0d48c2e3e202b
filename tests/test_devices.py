"""A GPU of its own per cell (normbench.devices), on a faked list of GPUs: no CUDA is needed to check that
concurrent jobs never share, that a multi-GPU cell gets distinct ones and that a dead job frees its GPUs."""

import os
import signal
import subprocess
import sys

import pytest

from normbench.claims import check_claims
from normbench.cli import main
from normbench.config import SettingsError
from normbench.devices import GPUS_ENV, LOCKS_ENV, assign_gpus, claim_gpus
from normbench.results import read_json

HOLD = ("import sys, time; from pathlib import Path; from normbench.devices import claim_gpus\n"
        "print(','.join(claim_gpus(int(sys.argv[1]), sys.argv[2].split(','), Path(sys.argv[3]), wait_s=30, "
        "share=int(sys.argv[4]))), flush=True)\n"
        "time.sleep(60)")


def holder(count: int, gpus: str, locks, share: int = 1) -> tuple[subprocess.Popen, list[str]]:
    """A process that claims `count` GPUs (alone, or one of `share` on each) and keeps them, as a train job does."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(count), gpus, str(locks), str(share)],
                               stdout=subprocess.PIPE, text=True)
    return process, process.stdout.readline().strip().split(",")


def test_concurrent_jobs_never_share_and_a_dead_job_frees_its_gpus(tmp_path):
    jobs = [holder(1, "0,1,2,3", tmp_path), holder(2, "0,1,2,3", tmp_path)]  # a one-GPU and a two-worker cell
    try:
        claimed = [gpu for _, gpus in jobs for gpu in gpus]
        assert len(claimed) == 3 and len(set(claimed)) == 3  # distinct, the DDP cell's two included
        third, third_gpus = holder(1, "0,1,2,3", tmp_path)
        jobs.append((third, third_gpus))
        assert set(third_gpus) == {"0", "1", "2", "3"} - set(claimed)
        with pytest.raises(SettingsError, match=r"no 1 free GPU\(s\) among 0, 1, 2, 3 after 0.5 s"):
            claim_gpus(1, ["0", "1", "2", "3"], tmp_path, wait_s=0.5, poll_s=0.1)
        jobs[1][0].send_signal(signal.SIGKILL)  # the two-worker cell dies: both its GPUs come free
        jobs[1][0].wait()
        assert sorted(claim_gpus(2, ["0", "1", "2", "3"], tmp_path, wait_s=5)) == \
            sorted(jobs[1][1])
    finally:
        for process, _ in jobs:
            process.kill()
            process.wait()


def test_packed_cells_share_a_gpu_k_at_most_and_never_with_a_cell_that_needs_one_alone(tmp_path):
    jobs = [holder(1, "0,1", tmp_path, share=2) for _ in range(4)]  # two GPUs, two packed cells on each
    try:
        claimed = sorted(gpu for _, gpus in jobs for gpu in gpus)
        assert claimed == ["0", "0", "1", "1"]  # spread over both GPUs, two on each
        with pytest.raises(SettingsError, match=r"no 1 shareable \(by 2\) GPU\(s\) among 0, 1"):
            claim_gpus(1, ["0", "1"], tmp_path, wait_s=0.5, poll_s=0.1, share=2)  # a third on either: too many
        with pytest.raises(SettingsError, match=r"no 1 free GPU\(s\) among 0, 1"):
            claim_gpus(1, ["0", "1"], tmp_path, wait_s=0.5, poll_s=0.1)  # a cell that times its steps: none alone
        on_zero = [process for process, gpus in jobs if gpus == ["0"]]
        for process in on_zero:  # both sharers of GPU 0 end: it is free for a cell alone
            process.kill()
            process.wait()
        assert claim_gpus(1, ["0", "1"], tmp_path, wait_s=5) == ["0"]
        with pytest.raises(SettingsError, match=r"no 1 shareable"):  # and while it has it, no sharer joins
            claim_gpus(1, ["0"], tmp_path, wait_s=0.5, poll_s=0.1, share=2)
    finally:
        for process, _ in jobs:
            process.kill()
            process.wait()


def test_a_study_that_times_its_cells_may_not_pack_them():
    cells = [{"norm": norm, "seed": 0} for norm in ("bn", "gn")]
    timed = {"id": "mine", "statement": "GN steps as fast as BN", "measure": "train_samples_per_s",
             "compare": {"norm": ["gn", "bn"]}, "combine": "ratio", "rule": "above", "threshold": 0.9}
    with pytest.raises(SettingsError, match=r"study 'tiny': claim mine reads times, and its cells share GPUs "
                                            r"\(resources: gpu_share 4\)"):
        check_claims({"tiny": {"claims": [timed]}}, {"tiny": cells}, {"tiny": 4})
    grid = [{"norm": "bn", "bn_momentum": m, "batch_size": b, "probes": ["inference"]} for m in (0.1, 0.9)
            for b in (16, 32)]
    # Accuracy, and folding, whose time the micro-benchmarks take alone: these cells may pack.
    check_claims({"inference": {"claims": ["C8", "C11"]}}, {"inference": grid}, {"inference": 4})


def test_a_cell_needing_more_gpus_than_the_machine_has_is_refused(tmp_path):
    with pytest.raises(SettingsError, match=r"4 workers need as many GPUs; this machine has 2 \(0, 1\)"):
        claim_gpus(4, ["0", "1"], tmp_path)


def test_assignment_happens_only_under_the_workflow_and_for_gpu_cells(tmp_path, monkeypatch):
    monkeypatch.delenv(GPUS_ENV, raising=False)
    assert assign_gpus(1, "auto") is None  # by hand, or under SLURM: the scheduler or the user decides
    monkeypatch.setenv(GPUS_ENV, "5,7")
    monkeypatch.setenv(LOCKS_ENV, str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert assign_gpus(1, "cpu") is None and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert assign_gpus(2, "cuda") == ["5", "7"] and os.environ["CUDA_VISIBLE_DEVICES"] == "5,7"


def test_a_train_command_claims_its_gpu_before_cuda_and_records_it(tmp_path, monkeypatch, fashion_root):
    monkeypatch.setenv(GPUS_ENV, "3")
    monkeypatch.setenv(LOCKS_ENV, str(tmp_path / "locks"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    main(["train", "--out", str(tmp_path / "cell"), "--threads", "1", "--set", f"data_root={fashion_root}",
          "model=mlp", "width=16", "train_subset=256", "test_subset=200", "batch_size=64", "epochs=1"])
    env = read_json(tmp_path / "cell/env.json")
    assert env["cuda_visible_devices"] == "3"  # on this CPU-only machine GPU 3 is faked: the cell ran on the CPU
    assert env["device"] == "cpu" and env["device_uuid"] is None and env["gpu_share"] == 1
