"""The Snakemake workflow on a tiny config: validation, the full run into a report, rerunning one cell."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from normbench.cells import study_cells
from normbench.results import read_jsonl

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def without_venv() -> dict:
    """The environment of a user who did not activate the venv: its bin folder is not on PATH."""
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p).resolve() != BIN.resolve())
    return {**os.environ, "PATH": path}


def snakemake_command(workdir: Path, *args: str, cores: str | None = "2") -> list[str]:
    return [str(BIN / "snakemake"), *args, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            *(["--cores", cores] if cores else []), "--configfile", str(workdir / "config.yaml")]


def snakemake(workdir: Path, *args: str, cores: str | None = "2") -> subprocess.CompletedProcess:
    """Run the venv's snakemake as a user would without activating the venv."""
    return subprocess.run(snakemake_command(workdir, *args, cores=cores), capture_output=True, text=True,
                          env=without_venv())


def write_config(workdir: Path, fashion_root: Path, **study_changes) -> None:
    study = {"fixed": {"model": "mlp", "width": 16, "train_subset": 256, "test_subset": 200, "epochs": 2,
                       "evals_per_epoch": 1, "lr": 0.05},
             "grid": {"norm": ["bn", "gn"], "batch_size": [8, 32], "seed": [0, 1]},
             "claims": ["C6"]}
    study.update(study_changes)
    config = {"defaults": {"data_root": str(fashion_root), "device": "cpu"}, "studies": {"tiny": study},
              "benchmarks": {"max_time_s": 0.01, "repeats": 2, "claims": ["C12"]}}
    workdir.mkdir(exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def without_timing(rows):
    return [{k: v for k, v in row.items() if k not in ("elapsed_s", "train_time_s", "timed_steps")} for row in rows]


def test_workflow_runs_into_a_report_and_reruns_a_cell(tmp_path, fashion_root):
    write_config(tmp_path, fashion_root)
    run = snakemake(tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    cell = tmp_path / "results/runs/tiny/norm~gn/batch_size~8/seed~1"
    assert {p.name for p in cell.iterdir()} >= {"summary.json", "metrics.jsonl", "config.json", "env.json", "model.pt"}
    report = (tmp_path / "reports/report.html").read_text()
    assert report.count("data:image/png;base64,") == 3 and "norm~gn/batch_size~8/seed~1" in report
    assert "http://" not in report and "https://" not in report  # self-contained
    assert "8: 8 trained in this run" in report and "Micro-benchmarks of the norm layers" in report
    assert re.search(r"\d+% of the train jobs&#39; time \(\d+ s over 8 cells", report)
    claims = pd.read_csv(tmp_path / "reports/claims.csv").set_index("claim")
    # C6 rests on BN at the smallest batch (2 seeds) and GN at every batch (4 cells)
    assert claims.loc["C6", "samples"] == 2 and claims.loc["C6", "cells"] == 6 and claims.loc["C12", "cells"] == 2  # GN or LN, and BN
    assert set(claims["verdict"]) <= {"supported", "refuted", "inconclusive", "not run"}
    assert (tmp_path / "reports/figures/tiny/accuracy.png").stat().st_size > 0
    cells_table = (tmp_path / "results/tables/cells.csv").read_text().splitlines()
    assert len(cells_table) == 1 + 8
    curves = pd.read_csv(tmp_path / "results/tables/curves.csv")
    assert (curves["lr"] == 0.05).all() and curves["lr_now"].lt(0.05).all()  # the setting, and the schedule's value
    probes = pd.read_csv(tmp_path / "results/tables/probes.csv")
    assert (probes["depth"].isna() | (probes["depth"] == 3)).all() and probes["layer_index"].max() == 3

    # Every file the README's "What a run produces" names is there, with the fields it names.
    produces = (REPO / "README.md").read_text().split("## What a run produces", 1)[1].split("```")[1]
    for line in produces.splitlines():
        cell_file = re.match(r"    (\w+\.\w+) ", line)
        if cell_file and cell_file.group(1) != "checkpoint.pt":
            assert (cell / cell_file.group(1)).exists(), cell_file.group(1)
        listed = re.match(r"((?:results|reports)/[^\s,]+(?:, [^\s,]+)*) ", line)
        if listed and "<" not in listed.group(1):
            folder = listed.group(1).split(", ")[0].rsplit("/", 1)[0]
            for name in listed.group(1).split(", "):
                path = tmp_path / (name if "/" in name else f"{folder}/{name}")
                assert path.exists(), path
    summary_text = produces.split("summary.json", 1)[1].split("env.json", 1)[0]
    summary = json.loads((cell / "summary.json").read_text())
    assert set(re.findall(r"[a-z]+_[a-z_]+", summary_text)) <= set(summary)
    env = json.loads((cell / "env.json").read_text())
    assert {"tf32", "deterministic_algorithms", "cudnn_benchmark", "cudnn_deterministic"} <= set(env)

    # The run's identity, its archive, and the run compared with its own archive: nothing flagged.
    record = json.loads((tmp_path / "results/run.json").read_text())
    assert record["cells"] == 8 and record["config"]["studies"]["tiny"]["claims"] == ["C6"]
    assert {"run_id", "config_sha256", "commits", "machines", "started", "ended", "normbench"} <= set(record)
    packed = subprocess.run([str(BIN / "normbench"), "archive", "results", "--out", "run.tar.gz"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert packed.returncode == 0 and (tmp_path / "run.tar.gz").stat().st_size < 2_000_000, packed.stderr
    compared = subprocess.run([str(BIN / "normbench"), "compare", "results", "run.tar.gz", "--out",
                               "reports/compare.html"], cwd=tmp_path, capture_output=True, text=True)
    assert compared.returncode == 0, compared.stderr
    assert "0 differing verdicts, 8 cells compared, 0 step-time changes" in compared.stdout

    # `make setup` again (it runs `normbench data`) leaves every finished cell up to date.
    setup = subprocess.run([str(BIN / "normbench"), "data", "fashion_mnist", "--root", str(fashion_root)],
                           capture_output=True, text=True)
    assert setup.returncode == 0 and "tensor cache up to date" in setup.stdout, setup.stderr[-3000:]
    planned = snakemake(tmp_path, "--dry-run")
    assert "Nothing to be done" in planned.stdout + planned.stderr, planned.stdout[-3000:]

    before = read_jsonl(cell / "metrics.jsonl")
    rerun = snakemake(tmp_path, "--forcerun", str(cell.relative_to(tmp_path) / "summary.json"))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "4 of 4 steps" in rerun.stderr  # the cell, aggregate, report and the target all
    assert without_timing(read_jsonl(cell / "metrics.jsonl")) == without_timing(before)
    assert "8: 1 trained in this run, 0 resumed from a checkpoint, 7 reused" in (tmp_path / "reports/report.html").read_text()

    # SIGKILL the workflow while the report renders: no report is left, and the next run builds a whole one.
    killed = subprocess.Popen(snakemake_command(tmp_path, "--forcerun", "report"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=without_venv(), start_new_session=True)
    log = tmp_path / "results/logs/report.log"
    while not (log.exists() and log.stat().st_size == 0) and killed.poll() is None:  # the job truncates its log
        time.sleep(0.01)
    time.sleep(1.0)  # inside the report: imports and figures take several seconds
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "reports/report.html").exists()
    assert snakemake(tmp_path, "--unlock").returncode == 0  # a killed Snakemake leaves its lock, as always
    again = snakemake(tmp_path, "--rerun-incomplete")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "report" in again.stderr and "</html>" in (tmp_path / "reports/report.html").read_text()

    # Without --cores, as the README has it.
    snakemake_report = snakemake(tmp_path, "--report", "reports/snakemake.html", cores=None)
    assert snakemake_report.returncode == 0, snakemake_report.stderr[-3000:]
    page = (tmp_path / "reports/snakemake.html").read_text()
    assert "Final test accuracy of each cell" in page and "One row per claim that normbench tests" in page

    # A config that lists earlier runs gets the comparison page from the workflow too.
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**config, "compare": ["run.tar.gz"]}, sort_keys=False))
    compared = snakemake(tmp_path)
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert "rule compare:" in compared.stderr and "rule train:" not in compared.stderr  # no cell trained again
    table = pd.read_csv(tmp_path / "reports/compare.csv")
    assert set(table["claim"]) >= {"C6", "C12"} and not table["differs"].any()
    assert len(pd.read_csv(tmp_path / "reports/compare_cells.csv")) == 8


@pytest.mark.parametrize("grid,message", [
    ({"norm": ["bn", "batchnorm"]}, "setting 'norm': unknown norm 'batchnorm'; known: bn, "),
    ({"norm": ["bn"], "batch_size": [0, 8]}, "setting 'batch_size': 0 is less than the minimum of 1"),
    ({"norm": ["gn"], "gn_groups": [5]}, "gn_groups=5 does not divide"),
    ({"norm": ["bn", "ln"], "batch_size": [8, 32]}, "claim C6 compares norm and needs the values gn"),
])
def test_bad_config_is_rejected_before_any_job(tmp_path, fashion_root, grid, message):
    write_config(tmp_path, fashion_root, grid=grid)
    run = snakemake(tmp_path)
    assert run.returncode != 0
    assert message in run.stderr + run.stdout
    assert not (tmp_path / "results").exists()
    assert 'File "' not in run.stdout + run.stderr  # normbench's own message, without Python frames behind it


@pytest.mark.parametrize("change, message", [
    ({"grid": {"norm": ["bn"], "batch_size": [1], "seed": [0]}, "claims": []},
     "norm 'bn' normalizes each MLP feature over the 1 sample of its per-worker batch"),
    ({"report": {"reference": {"nrom": "bn"}}}, "studies: tiny: report: reference: unknown setting 'nrom'"),
    ({"report": {"reference": {"norm": "ln"}}}, 'report: reference: {"norm": "ln"} picks none of the study\'s cells'),
    ({"fixed": {"model": "mlp", "lr": float("nan")}}, "setting 'lr': nan is not a finite number"),
])
def test_a_config_that_cannot_train_is_refused_at_planning(tmp_path, fashion_root, change, message):
    write_config(tmp_path, fashion_root, **change)
    run = snakemake(tmp_path, "--dry-run")
    assert run.returncode != 0 and message in run.stderr + run.stdout, run.stderr[-3000:]
    assert 'File "' not in run.stdout + run.stderr


@pytest.mark.parametrize("change, message", [
    ({"grdi": {"norm": ["bn"]}}, "studies: tiny: unknown key 'grdi'; did you mean 'grid'?"),
    ({"fixed": {"nrom": "bn", "model": "mlp"}}, "studies: tiny: fixed: unknown setting 'nrom'; did you mean 'norm'?"),
    ({"linked": {"batch_sise": [8, 32]}}, "studies: tiny: linked: unknown setting 'batch_sise'; did you mean"),
])
def test_a_mistyped_name_anywhere_gets_a_hint_and_no_schema_dump(tmp_path, fashion_root, change, message):
    write_config(tmp_path, fashion_root, **change)
    run = snakemake(tmp_path, "--dry-run")
    assert run.returncode != 0 and message in run.stderr + run.stdout, run.stderr[-3000:]
    assert "additionalProperties" not in run.stderr + run.stdout  # the schema is not printed


def test_numbers_arrive_as_numbers_and_linked_axes_alone_make_a_study(tmp_path, fashion_root):
    """width: 16.0 is the integer 16; --config passes nested values as strings ('2000'), read as numbers here."""
    write_config(tmp_path, fashion_root, grid=None, linked={"norm": ["bn", "gn"], "batch_size": [8.0, 32]}, claims=[])
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del config["studies"]["tiny"]["grid"]
    config["studies"]["tiny"]["fixed"]["width"] = 16.0
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = snakemake(tmp_path, "--dry-run", "--printshellcmds", "--config", "resources={mem_mb: 2000}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"^train\s+2$", run.stdout, re.MULTILINE), run.stdout[-3000:]
    assert run.stdout.count(" width=16 ") == 2 and " batch_size=8 " in run.stdout


@pytest.mark.parametrize("config, profile", [("config.yaml", "default"), ("full.yaml", "gpu"), ("gpu.yaml", "gpu"),
                                             ("gpu-smoke.yaml", "gpu")])
def test_shipped_configs_validate_and_plan_every_cell(tmp_path, config, profile):
    shutil.copy(REPO / "config" / config, tmp_path / "config.yaml")
    run = snakemake(tmp_path, "--dry-run", "--workflow-profile", str(REPO / "workflow/profiles" / profile))
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    studies = yaml.safe_load((REPO / "config" / config).read_text())["studies"]
    cells = sum(len(study_cells(name, spec)) for name, spec in studies.items())
    assert re.search(rf"^train\s+{cells}$", run.stdout, re.MULTILINE), run.stdout[-3000:]


def test_the_gpu_config_measures_every_claim():
    """config/gpu.yaml is the paper-scale run of a GPU record: no claim row may stay `not run`."""
    from normbench.claims import CLAIMS_BY_ID

    config = yaml.safe_load((REPO / "config/gpu.yaml").read_text())
    listed = [claim for spec in [*config["studies"].values(), config["benchmarks"]] for claim in spec.get("claims", [])]
    assert sorted(listed) == sorted(CLAIMS_BY_ID)


def test_lint_is_clean():
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run([str(BIN / "snakemake"), "--lint"], cwd=REPO, capture_output=True, text=True, env=env)
    assert run.returncode == 0 and "Congratulations" in run.stdout + run.stderr, run.stdout + run.stderr


def test_bare_snakemake_uses_the_default_profile_and_config():
    run = subprocess.run([str(BIN / "snakemake"), "--dry-run", "--forceall"], cwd=REPO, capture_output=True,
                         text=True, env=without_venv())  # --forceall: every job, whatever results/ holds
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Using workflow specific profile profiles/default" in run.stdout + run.stderr
    studies = yaml.safe_load((REPO / "config/config.yaml").read_text())["studies"]
    cells = sum(len(study_cells(name, spec)) for name, spec in studies.items())
    assert re.search(rf"^train\s+{cells}$", run.stdout, re.MULTILINE), run.stdout[-3000:]


def test_folding_is_checked_in_the_cells_and_timed_by_the_benchmarks(tmp_path, fashion_root):
    """C11: the trained cells compare folded outputs; the bench job, alone, times the study's model folded and not."""
    write_config(tmp_path, fashion_root, fixed={"model": "resnet", "depth": 8, "width": 4, "train_subset": 128,
                                                "test_subset": 100, "batch_size": 32, "epochs": 1,
                                                "evals_per_epoch": 1, "lr": 0.05, "probes": ["inference"]},
                 grid={"seed": [0, 1]}, claims=["C11"])
    run = snakemake(tmp_path, "--printshellcmds")
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"--fold '\{\"tiny\": \{.*\"model\": \"resnet\"", run.stdout + run.stderr)
    probes = pd.read_csv(tmp_path / "results/tables/probes.csv")
    assert (probes.loc[probes["quantity"] == "fold_rel_diff", "value"] < 1e-4).sum() == 2
    assert not probes["quantity"].str.startswith("infer_s").any()  # no timing beside training
    c11 = pd.read_csv(tmp_path / "reports/claims.csv").set_index("claim").loc["C11"]
    assert c11["samples"] == 2 and c11["sample_unit"] == "repeats" and c11["estimate"] > 0
    assert "timed by the micro-benchmarks on" in c11["note"]
    assert "inference time, timed while nothing else ran (C11)" in (tmp_path / "reports/report.html").read_text()


@pytest.mark.parametrize("change, message", [
    ({"grid": {"width": [4, 8]}}, r"study 'tiny' claims C11, and its cells differ in width: the micro-benchmarks "
                                  r"time one model"),
    ({"benchmarks": None}, r"study 'tiny' claims C11, whose inference time the micro-benchmarks take: add a "
                           r"`benchmarks:` section"),
    ({"grid": {"precision": ["bf16"]}}, r"study 'tiny' claims C11, which is timed in fp32, and its cells train in "
                                        r"bf16"),
])
def test_folding_claims_are_refused_where_no_single_model_would_be_timed(tmp_path, fashion_root, change, message):
    write_config(tmp_path, fashion_root, fixed={"model": "resnet", "depth": 8, "probes": ["inference"]},
                 grid=change.get("grid", {"seed": [0]}), claims=["C11"])
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    if "benchmarks" in change:
        del config["benchmarks"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    planned = snakemake(tmp_path, "--dry-run")
    output = planned.stdout + planned.stderr
    assert planned.returncode != 0 and re.search(message, output), output[-3000:]


def test_a_users_config_runs_alone_and_reads_exponents_as_numbers(tmp_path, fashion_root):
    write_config(tmp_path, fashion_root, grid={"norm": ["bn", "gn"]}, claims=[])
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config["studies"]["tiny"]["fixed"]["lr"] = "1e-3"  # what PyYAML makes of `lr: 1e-3`
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = snakemake(tmp_path, "--dry-run", "--printshellcmds", "--workflow-profile",
                    str(REPO / "workflow/profiles/default"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"^train\s+2$", run.stdout, re.MULTILINE), run.stdout[-3000:]
    assert run.stdout.count(" lr=0.001 ") == 2


def test_a_cell_over_its_time_limit_is_recorded_as_timed_out(tmp_path, fashion_root):
    write_config(tmp_path, fashion_root, grid={"norm": ["bn", "gn"]}, claims=[], resources={"time_limit_min": 1e-6})
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del config["benchmarks"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = snakemake(tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    cells = pd.read_csv(tmp_path / "results/tables/cells.csv")
    assert cells["timed_out"].all() and (cells["steps"] < cells["total_steps"]).all()
    assert (cells["device"] == "cpu").all() and (cells["device_setting"] == "cpu").all()
    assert "<th>timed_out</th>" in (tmp_path / "reports/report.html").read_text()

    # A longer limit continues exactly the timed-out cells, from their checkpoints; then nothing is left to do.
    config["studies"]["tiny"]["resources"]["time_limit_min"] = 100
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    longer = snakemake(tmp_path)
    assert longer.returncode == 0, longer.stderr[-3000:]
    cells = pd.read_csv(tmp_path / "results/tables/cells.csv")
    assert not cells["timed_out"].any() and (cells["steps"] == cells["total_steps"]).all()
    assert (cells["resumed_from_step"] > 0).all()
    planned = snakemake(tmp_path, "--dry-run")
    assert "Nothing to be done" in planned.stdout + planned.stderr, planned.stdout[-3000:]


def test_a_packed_study_passes_its_share_and_a_timed_claim_refuses_packing(tmp_path, fashion_root):
    write_config(tmp_path, fashion_root, resources={"gpu_share": 2})
    planned = snakemake(tmp_path, "--dry-run", "--printshellcmds")
    assert planned.returncode == 0, planned.stderr[-3000:]
    commands = [line.removeprefix("Shell command: ") for line in (planned.stdout + planned.stderr).splitlines()
                if line.startswith("Shell command: normbench train")]
    assert len(commands) == 8 and all(line.split(" > ")[0].endswith("--gpu-share 2") for line in commands)
    write_config(tmp_path, fashion_root, resources={"gpu_share": 2}, claims=[
        {"id": "mine", "statement": "GN steps as fast as BN", "measure": "train_samples_per_s",
         "compare": {"norm": ["gn", "bn"]}, "combine": "ratio", "rule": "above", "threshold": 0.9}])
    refused = snakemake(tmp_path, "--dry-run")
    assert refused.returncode != 0
    assert "claim mine reads times, and its cells share GPUs (resources: gpu_share 2)" in refused.stdout + refused.stderr
