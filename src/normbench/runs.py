"""A finished run as a whole: its identity (results/run.json), its archive, and reading one back to compare.

A run is a results/ folder with reports/ beside it, or an archive of the two made by `normbench archive`:
run.json, the tables, claims.csv and the report, without weights or checkpoints, small enough to share or
commit. `normbench compare` reads either. `normbench record` keeps a run in the repository (docs/runs/), with
the figures a GPU run is judged by.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import io
import json
import re
import shutil
import statistics
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

import normbench
from normbench.config import SettingsError
from normbench.provenance import git_commit
from normbench.results import write_atomic, write_json

RUN_RECORD = "run.json"
TABLES = ("cells", "curves", "probes", "numerics")
REPORT_FILES = ("claims.csv", "report.html")  # in reports/, beside results/


def config_sha256(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def distinct(table: pd.DataFrame, column: str) -> list[str]:
    """The column's distinct values as sorted strings (none where the table lacks it)."""
    return sorted(map(str, table[column].dropna().unique())) if column in table else []


def run_record(config: dict, cells: pd.DataFrame, started: str | None, command: str | None) -> dict:
    """What identifies a run: the config (and its hash), the code (commits the cells were trained at), the
    machines and devices, when it started and ended, and normbench's version."""
    ended = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    started = started or (str(cells["env_time"].min()) if "env_time" in cells and len(cells) else ended)
    config_hash = config_sha256(config)
    commits = distinct(cells, "env_git_commit") or [git_commit() or "unknown"]
    machines = sorted({f"{host}: {device}" for host, device in zip(cells.get("env_host", []),
                                                                    cells.get("env_device_name", []))})
    stamp = datetime.datetime.fromisoformat(started).strftime("%Y%m%dT%H%M%S")
    return {"run_id": f"{stamp}-{config_hash[:8]}", "config_sha256": config_hash, "config": config,
            "commits": commits, "machines": machines, "started": started, "ended": ended,
            "normbench": normbench.__version__, "command": command, "cells": len(cells)}


def archive(results: Path, out: Path) -> list[str]:
    """Pack a finished run (results/ and the reports/ beside it) into a .tar.gz; the names packed."""
    results, out = Path(results), Path(out)
    if not results.is_dir():
        raise SettingsError(f"{results}: no such folder; name a finished run's results/ folder")
    if out.is_dir():
        raise SettingsError(f"{out} is a folder; name the archive file to write, e.g. {out / 'run.tar.gz'}")
    members = {RUN_RECORD: results / RUN_RECORD,
               **{f"tables/{name}.csv": results / "tables" / f"{name}.csv" for name in TABLES},
               **{name: results.parent / "reports" / name for name in REPORT_FILES}}
    for required in (RUN_RECORD, "tables/cells.csv", "claims.csv"):
        if not members[required].is_file():
            raise SettingsError(f"{results} holds no finished run: {members[required]} is missing; run the "
                                f"workflow through its report first (make reproduce, or snakemake)")
    present = {name: path for name, path in members.items() if path.is_file()}
    _record(members[RUN_RECORD].read_bytes(), members[RUN_RECORD])  # an archive that compare can read

    def write(handle) -> None:  # a linked file goes in as the file it points to: the archive travels alone
        with tarfile.open(fileobj=handle, mode="w:gz", dereference=True) as tar:
            for name, path in present.items():
                tar.add(path, arcname=name)

    write_atomic(out, write, mode="wb")
    return list(present)


@dataclass(frozen=True)
class FinishedRun:
    """A run read back: its record, the cells and curves tables, and its claims table."""

    source: str
    record: dict
    cells: pd.DataFrame
    curves: pd.DataFrame
    claims: pd.DataFrame

    @property
    def name(self) -> str:
        return self.record.get("run_id", self.source)


def _record(text: bytes, where) -> dict:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SettingsError(f"{where}: run.json is not valid JSON ({error}); the report step writes it: rerun the "
                            f"workflow's report") from None


def _files_of(path: Path) -> dict[str, bytes]:
    """The run's files by archive name, from an archive or from a results/ folder."""
    if path.is_file():
        try:
            if not tarfile.is_tarfile(path):
                raise SettingsError(f"{path} is no run archive (a .tar.gz made by normbench archive)")
            # Decompressed whole, so that gzip's checksum at the end catches a changed byte (tarfile stops early)
            with tarfile.open(fileobj=io.BytesIO(gzip.decompress(path.read_bytes()))) as tar:
                return {member.name: tar.extractfile(member).read() for member in tar.getmembers() if member.isfile()}
        except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
            raise SettingsError(f"{path}: the archive is damaged ({error or type(error).__name__}); archive the run "
                                f"again") from None
    if not path.is_dir():
        raise SettingsError(f"{path}: no such results folder or run archive")
    if (path / "results").is_dir() and not (path / RUN_RECORD).exists():
        raise SettingsError(f"{path} is a checkout, not a run: name its results/ folder ({path / 'results'})")
    candidates = {RUN_RECORD: path / RUN_RECORD, "tables/cells.csv": path / "tables/cells.csv",
                  "tables/curves.csv": path / "tables/curves.csv", "claims.csv": path.parent / "reports/claims.csv"}
    return {name: file.read_bytes() for name, file in candidates.items() if file.is_file()}


def load_run(path: str | Path) -> FinishedRun:
    """A finished run from its results/ folder or its archive; a clear error where a part is missing."""
    path = Path(path)
    files = _files_of(path)
    for required in (RUN_RECORD, "tables/cells.csv", "claims.csv"):
        if required not in files:
            raise SettingsError(f"{path}: the run has no {required}; compare reads a results/ folder whose workflow "
                                f"ran through its report, or an archive of one (normbench archive)")

    def table(name: str) -> pd.DataFrame:
        if name not in files:
            return pd.DataFrame()
        try:
            return pd.read_csv(io.BytesIO(files[name]), low_memory=False)
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as error:
            raise SettingsError(f"{path}: {name} cannot be read ({error}); rerun the workflow's aggregate and "
                                f"report steps") from None

    return FinishedRun(str(path), _record(files[RUN_RECORD], path), table("tables/cells.csv"),
                       table("tables/curves.csv"), table("claims.csv"))


TRAINING_BENCHMARK = "test_training_steps_against_a_minimal_loop"  # make bench's case (tests/benchmarks)


def training_speed(bench: Path) -> dict:
    """normbench's training samples/s and its ratio to a minimal hand-written loop, from `make bench`'s JSON
    (medians over the paired rounds), with the device and batch they ran at: of its training benchmarks (eager, and
    compiled with CUDA graphs on a GPU) the fastest, both loops at their best."""
    advice = "run `make bench` (it writes results/bench/speed.json) and name that file"
    try:
        data = json.loads(Path(bench).read_text())
    except OSError as error:
        raise SettingsError(f"{bench}: cannot be read ({error.strerror}); {advice}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SettingsError(f"{bench} is not valid JSON ({error}); {advice}") from None
    benchmarks = data.get("benchmarks") if isinstance(data, dict) else None
    cases = [case.get("extra_info") for case in (benchmarks if isinstance(benchmarks, list) else [])
             if isinstance(case, dict) and str(case.get("name")).startswith(TRAINING_BENCHMARK)]
    if not cases:
        raise SettingsError(f"{bench} holds no training benchmark; {advice}")
    try:
        info = max(cases, key=lambda info: statistics.median(info["normbench_samples_per_s"]))
        ours, minimal = info["normbench_samples_per_s"], info["minimal_samples_per_s"]
        return {"bench_device": info["device"], "bench_device_name": info["device_name"],
                "bench_batch_size": info["batch_size"], "bench_compile": info.get("compile", False),
                "bench_samples_per_s_fp32_bn": statistics.median(ours),
                "gpu_overhead_ratio": statistics.median(a / b for a, b in zip(ours, minimal, strict=True))}
    except (KeyError, TypeError, ValueError) as error:  # statistics.StatisticsError is a ValueError
        raise SettingsError(f"{bench}: its training benchmark lacks a figure ({type(error).__name__}: {error}); it "
                            f"was written by another version of normbench; {advice}") from None


NO_BENCH = dict.fromkeys(("bench_device", "bench_device_name", "bench_batch_size", "bench_compile",
                          "bench_samples_per_s_fp32_bn", "gpu_overhead_ratio"))


def record_run(results: Path, out_root: Path, bench: Path | None = None) -> Path:
    """Record a finished run in the repository as <out_root>/<date>-<device>/: its claims, cells and report, and
    run.json with what a reader checks first (the device, driver and torch the cells ran on, the commit, the
    workflow's wall time and, from `make bench`, normbench's fp32 BN samples/s and overhead ratio) beside the run's
    own record; and the run's archive (run.tar.gz), which `normbench compare` reads. Returns the folder."""
    results = Path(results)
    if not results.is_dir():
        raise SettingsError(f"{results}: no such folder; name a finished run's results/ folder (reports/ beside it)")
    run = load_run(results)
    record = run.record
    speed = training_speed(bench) if bench else NO_BENCH
    try:
        wall_s = (datetime.datetime.fromisoformat(record["ended"])
                  - datetime.datetime.fromisoformat(record["started"])).total_seconds()
    except (KeyError, TypeError, ValueError) as error:
        raise SettingsError(f"{results / RUN_RECORD}: no start and end of the run ({type(error).__name__}: {error}); "
                            f"the workflow's report step writes them: rerun it") from None
    on_cuda = run.cells.get("env_device", pd.Series("", index=run.cells.index)).astype(str).str.startswith("cuda")
    devices = run.cells[on_cuda] if on_cuda.any() else run.cells  # a GPU run's gloo cells name no GPU
    named = {column: "; ".join(distinct(devices, f"env_{column}")) or None
             for column in ("device_name", "driver", "torch")}
    device = named["device_name"] or "unknown device"
    summary = {**named, "device_name": device,
               "commit": "; ".join(record.get("commits", [])), "config": record.get("config"),
               "workflow_wall_s": wall_s, **speed, "run": record}
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower().replace("nvidia", "")).strip("-")
    folder = Path(out_root) / f"{record['started'][:10]}-{slug}"
    if (folder / RUN_RECORD).exists():
        recorded = _record((folder / RUN_RECORD).read_bytes(), folder).get("run", {}).get("run_id")
        if recorded != record.get("run_id"):
            raise SettingsError(f"{folder} already records another run ({recorded}); move it aside (e.g. add the "
                                f"time to its name) or record into another --out")
    if folder.exists():  # the same run recorded again, or a recording that stopped before its run.json: replaced
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for source in (results / "tables/cells.csv", results.parent / "reports/claims.csv",
                   results.parent / "reports/report.html"):
        if source.is_file():
            shutil.copyfile(source, folder / source.name)
    archive(results, folder / "run.tar.gz")
    write_json(folder / RUN_RECORD, summary)
    return folder
