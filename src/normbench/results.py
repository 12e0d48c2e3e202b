"""Cell outputs written atomically, and their aggregation into tidy tables.

A cell folder holds plain files a person can open: config.json (resolved
settings), metrics.jsonl (one line per evaluation), summary.json (final
numbers), probes.jsonl (per-layer measurements, see probes), env.json
(provenance), model.pt (the final weights) and, while a cell is unfinished,
checkpoint.pt (for resuming).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from normbench.config import completed

CONFIG, METRICS, PROBES, SUMMARY, ENV, CHECKPOINT, WEIGHTS = (
    "config.json", "metrics.jsonl", "probes.jsonl", "summary.json", "env.json", "checkpoint.pt", "model.pt")


def write_atomic(path: str | Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are for everyone the umask allows
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, data: Any) -> None:
    write_atomic(path, lambda f: json.dump(data, f, indent=2, sort_keys=True))


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    write_atomic(path, lambda f: f.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows))


class UnreadableResult(ValueError):
    """A result file that does not parse; the message names it and how to make it anew."""


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UnreadableResult(_unreadable(path, f"{error.msg}, line {error.lineno}")) from None
    except UnicodeDecodeError:
        raise UnreadableResult(_unreadable(path, "not UTF-8 text")) from None


def read_jsonl(path: str | Path) -> list[dict]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UnreadableResult(_unreadable(path, "not UTF-8 text")) from None
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as error:
            raise UnreadableResult(_unreadable(path, f"{error.msg}, line {number}")) from None
    return rows


def _unreadable(path: str | Path, problem: str) -> str:
    """A damaged file of a cell, and the way to train the cell again (from its settings, unless they are the damaged
    file)."""
    folder = Path(path).parent
    again = f"`normbench train --out {folder} --from {folder}/config.json --force`, or " \
        if Path(path).name != CONFIG else f"`normbench train --out {folder} --force --set ...` with its settings, or "
    return (f"{path}: not valid JSON ({problem}); the cell in {folder} is damaged: train it again ({again}delete the "
            f"folder and rerun the workflow)")


def write_table(frame: pd.DataFrame, path: str | Path) -> None:
    write_atomic(path, lambda f: frame.to_csv(f, index=False))


def job_seconds(benchmark_file: Path) -> float | None:
    """The wall time of a cell's whole train job (start-up included), from Snakemake's benchmark record."""
    if not benchmark_file.exists():
        return None
    return float(pd.read_csv(benchmark_file, sep="\t")["s"].iloc[0])


def columns(record: dict, prefix: str) -> dict:
    """A JSON record as table columns, a nested record's keys joined to its own (env.json's tf32: {matmul: ...}
    becomes env_tf32_matmul): a table cell holds one value, not a dict to parse back."""
    flat = {}
    for key, value in record.items():
        flat.update(columns(value, f"{prefix}{key}_") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def aggregate(summary_paths: Iterable[str | Path], runs_root: str | Path,
              job_benchmarks: str | Path | None = None) -> dict[str, pd.DataFrame]:
    """Tidy tables from cell folders: `cells` (one row per cell), `curves` (one per evaluation)
    and `probes` (one per measured quantity of a layer at a probed step).

    `study` and `cell` come from the folder's place under `runs_root`
    (`<runs_root>/<study>/<cell path>/summary.json`); settings and summary
    numbers become columns, so figures can be drawn from the tables alone. With `job_benchmarks` (the folder of
    Snakemake's `<study>/<cell>.tsv` records of the train jobs), `job_s` is each cell's whole job time.
    """
    runs_root = Path(runs_root)
    cells, curves, probes = [], [], []
    for summary_path in sorted(map(Path, summary_paths)):
        folder = summary_path.parent
        study, *cell_parts = folder.relative_to(runs_root).parts
        identity = {"study": study, "cell": "/".join(cell_parts), "cell_dir": str(folder)}
        # A list setting (probes) becomes one comma-separated value, as a table cell holds.
        settings = {key: ",".join(value) if isinstance(value, list) else value
                    for key, value in completed(read_json(folder / CONFIG)).items()}
        env = columns(read_json(folder / ENV), "env_")
        # `device` is the kind of device the cell ran on (cpu, cuda), not the setting's `auto` (device_setting).
        used = {"device_setting": settings["device"], "device": env["env_device"].split(":")[0]}
        job = {"job_s": job_seconds(Path(job_benchmarks) / study / f"{identity['cell']}.tsv")} if job_benchmarks else {}
        cells.append({**identity, **settings, **read_json(summary_path), **env, **used, **job})
        # A cell's lr setting is its peak; the lr of each evaluation row is the schedule's value then.
        curves += [{**identity, **settings, **{("lr_now" if k == "lr" else k): v for k, v in row.items()}}
                   for row in read_jsonl(folder / METRICS)]
        probes += [{**identity, **settings, **row} for row in read_jsonl(folder / PROBES)]
    return {"cells": pd.DataFrame(cells), "curves": pd.DataFrame(curves), "probes": pd.DataFrame(probes)}


PAIRED_ROUNDS = "rounds_by_network"  # extra_info of a benchmark case whose rounds each time several networks


def benchmark_rounds(path: str | Path) -> pd.DataFrame:
    """pytest-benchmark's JSON (run with --benchmark-save-data) as tidy rows: one per timing round,
    with the case's extra_info (layout, norm, dtype, shape, device, threads, and the repeat: its session). A case
    whose rounds each timed several networks (PAIRED_ROUNDS, C11's folding) gives one row per network and
    round, with its `network`."""
    rows = []
    for bench in read_json(path)["benchmarks"]:
        info = {"repeat": 0, **bench["extra_info"]}
        paired = info.pop(PAIRED_ROUNDS, None)
        parts = paired.items() if paired is not None else [(None, bench["stats"]["data"])]
        rows += [{**info, **({"network": network} if network else {}), "round": index, "time_s": seconds}
                 for network, times in parts for index, seconds in enumerate(times)]
    return pd.DataFrame(rows)
