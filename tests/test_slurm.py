"""The SLURM profile against a real SLURM: a one-node cluster (munge, slurmctld, slurmd) started here, as root.

Debian's slurm-wlm and munge are installed with apt when missing. The cluster keeps no accounting, so the
workflow asks squeue for job states and submits without an account, as the README says for such clusters.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from normbench.results import read_json

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The standard place: the executor's job steps drop SLURM_* variables (SLURM_CONF among them) before their srun.
SLURM_CONF = Path("/etc/slurm/slurm.conf")
MARK = "# written by normbench's SLURM test\n"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _install() -> None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("needs root and apt-get to install Debian's slurm-wlm and munge")
    quiet = {"stdout": subprocess.DEVNULL, "env": {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}}
    subprocess.run(["apt-get", "update", "-qq"], check=True, **quiet)
    subprocess.run(["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"], check=True, **quiet)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running one-node cluster whose only partition has this machine's cores; stopped afterwards."""
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld, slurmd and munged needs root")
    if SLURM_CONF.exists() and not SLURM_CONF.read_text().startswith(MARK):
        pytest.skip(f"{SLURM_CONF} belongs to a SLURM installation here; this test does not touch it")
    _install()
    state = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 - 1024
    SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SLURM_CONF.write_text(MARK + "\n".join([
        "ClusterName=normbench", f"SlurmctldHost={host}", f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}", "AuthType=auth/munge", "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none", "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "SlurmUser=root", "SlurmdUser=root", "ReturnToService=2", "MinJobAge=600",
        f"StateSaveLocation={state}/ctld", f"SlurmdSpoolDir={state}/d", f"SlurmctldPidFile={state}/ctld.pid",
        f"SlurmdPidFile={state}/d.pid", f"SlurmctldLogFile={state}/ctld.log", f"SlurmdLogFile={state}/d.log",
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN",
        f"PartitionName=normbench Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
    for folder in (state / "ctld", state / "d"):
        folder.mkdir()
    munge_started = False
    if subprocess.run(["pgrep", "-x", "munged"], stdout=subprocess.DEVNULL).returncode != 0:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["munged", "--force"], check=True)  # --force: as root, with Debian's log folder
        munge_started = True
    subprocess.run(["slurmctld"], check=True)
    subprocess.run(["slurmd"], check=True)
    try:
        for _ in range(60):
            idle = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.strip()
            if idle == "idle":
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the node did not come up: sinfo says {idle!r}; see {state}/ctld.log")
        yield state
    finally:
        subprocess.run(["scancel", "--full", "--partition", "normbench"], stderr=subprocess.DEVNULL)
        for daemon in ("ctld", "d"):
            pid_file = state / f"{daemon}.pid"
            if pid_file.exists():
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
        if munge_started:
            subprocess.run(["pkill", "-x", "munged"])
        SLURM_CONF.unlink()


def test_a_study_runs_through_the_slurm_profile(cluster, tmp_path, fashion_root):
    # device auto (the default): planned on a machine without CUDA, no cell asks SLURM for a GPU, which this
    # cluster (no GPUs, no gres) would refuse.
    config = {"defaults": {"data_root": str(fashion_root)},
              "resources": {"time_limit_min": 3, "mem_mb": 1500},
              "studies": {"tiny": {"fixed": {"model": "mlp", "width": 16, "train_subset": 512, "test_subset": 200,
                                             "batch_size": 64, "epochs": 1, "lr": 0.05},
                                   "grid": {"norm": ["bn", "gn"]}}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run(
        [str(BIN / "snakemake"), "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--workflow-profile", str(REPO / "workflow/profiles/slurm"), "--configfile", str(tmp_path / "config.yaml"),
         "--slurm-status-command", "squeue", "--slurm-no-account", "--slurm-init-seconds-before-status-checks", "1",
         "--seconds-between-status-checks", "2"],
        capture_output=True, text=True, env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
    )
    assert run.returncode == 0, run.stderr[-4000:]
    for norm in ("bn", "gn"):
        summary = read_json(tmp_path / f"results/runs/tiny/norm~{norm}/summary.json")
        assert summary["steps"] == summary["total_steps"] == 8 and not summary["diverged"]
    assert (tmp_path / "reports/report.html").exists()
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+)", run.stderr)
    assert len(set(submitted)) == 5  # each cell was its own SLURM job, and so were numerics, aggregate and report


def test_a_requeued_cell_resumes_from_its_checkpoint(cluster, tmp_path, fashion_root):
    """`scontrol requeue` (what preemption in REQUEUE mode does): SLURM stops the running job with SIGTERM and
    queues it again; the cell saves its state on the way out and the new job continues from there."""
    config = {"defaults": {"data_root": str(fashion_root)},
              "resources": {"time_limit_min": 5, "mem_mb": 1500},
              "studies": {"long": {"fixed": {"model": "mlp", "width": 64, "train_subset": 4096, "test_subset": 200,
                                             "batch_size": 16, "epochs": 6, "evals_per_epoch": 2, "lr": 0.05},
                                   "grid": {"norm": ["bn"]}}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    workflow = subprocess.Popen(
        [str(BIN / "snakemake"), "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--workflow-profile", str(REPO / "workflow/profiles/slurm"), "--configfile", str(tmp_path / "config.yaml"),
         "--slurm-status-command", "squeue", "--slurm-no-account", "--slurm-init-seconds-before-status-checks", "1",
         "--seconds-between-status-checks", "2", "results/runs/long/norm~bn/summary.json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    try:
        metrics = tmp_path / "results/runs/long/norm~bn/metrics.jsonl"
        for _ in range(600):  # until the cell has evaluated once
            if metrics.exists() and metrics.read_text().count("\n") >= 1:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the cell never evaluated")
        job = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i"], capture_output=True, text=True,
                             check=True).stdout.split()
        assert len(job) == 1
        subprocess.run(["scontrol", "requeue", job[0]], check=True)
        # SLURM holds a requeued job back a while (its begin time moves on); a test need not wait for that.
        for _ in range(300):
            state = subprocess.run(["squeue", "-h", "-j", job[0], "-o", "%T"], capture_output=True, text=True).stdout
            if state.strip() == "PENDING":
                subprocess.run(["scontrol", "update", f"JobId={job[0]}", "StartTime=now"], check=True)
                break
            time.sleep(0.2)
        _, errors = workflow.communicate(timeout=600)
    finally:
        workflow.kill()
    assert workflow.returncode == 0, errors[-4000:]
    summary = read_json(metrics.parent / "summary.json")
    assert summary["steps"] == summary["total_steps"] == 6 * 4096 // 16
    assert summary["resumed_from_step"] > 0  # the requeued job continued; it did not start again
    rows = [line for line in metrics.read_text().splitlines() if line]
    assert len(rows) == 6 * 2  # every evaluation once, none lost or repeated
