"""The HTML report: claim verdicts, figures and tables drawn from the aggregated tables alone.

One self-contained page: figures are PNGs embedded as data URIs (and also
written as files, for `snakemake --report`), the tables sort with a few lines
of inline script, and nothing is fetched from the network. The package: the
claims section, the study sections, the figures, the tables, and the
comparison of runs (normbench.report.compare), sharing one page style.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from normbench import claims
from normbench.html import environment
from normbench.results import benchmark_rounds, read_json, write_atomic, write_json, write_table
from normbench.runs import RUN_RECORD, run_record
from normbench.report.tables import benchmark_machine, benchmark_table, leaderboard, numerics_table, shown
from normbench.report.figures import set_style
from normbench.report.studies import origins, scale, study_section, trained
from normbench.report.claims_section import claim_rows, claims_table, family_wise


def harness_efficiency(cells: pd.DataFrame) -> str:
    """The share of the train jobs' time spent in training steps: the rest is start-up, data loading,
    evaluation and writing."""
    timed = cells.dropna(subset=["job_s"]) if "job_s" in cells else cells.iloc[:0]
    if timed.empty:
        return "not measured (no Snakemake benchmark records of the train jobs)"
    share = timed["train_time_s"].sum() / timed["job_s"].sum()
    return (f"{share:.0%} of the train jobs' time ({timed['job_s'].sum():.0f} s over {len(timed)} cells, start-up "
            f"included) was spent in training steps")


# env.json's record of what decides float32 arithmetic and determinism (precision.numerics_record): said in words.
ARITHMETIC_FIELDS = ("env_tf32", "env_deterministic_algorithms", "env_cudnn_benchmark", "env_cudnn_deterministic")


def _share(flags: pd.Series) -> str:
    """A flag over the cells that recorded it: on, off, or "on for N of M cells"."""
    on = int(flags.eq(True).sum())
    return "on" if on == len(flags) else "off" if on == 0 else f"on for {on} of {len(flags)} cells"


def arithmetic(cells: pd.DataFrame) -> dict[str, str]:
    """Whether fp32 matmuls and convolutions could use TF32 and whether kernels were deterministic, over the cells
    whose env.json records it (older ones do not: they are counted, not guessed)."""
    recorded = cells.dropna(subset=["env_deterministic_algorithms"]) if "env_deterministic_algorithms" in cells \
        else cells.iloc[:0]
    if recorded.empty:
        return {}
    tf32 = recorded.filter(like="env_tf32_").eq(True).any(axis=1)  # a CPU cell has none: its fp32 is IEEE
    summary = {"TF32": "off (fp32 is IEEE float32)" if not tf32.any() else
               f"{_share(tf32)} (fp32 matmuls and convolutions may round their inputs to 10 mantissa bits)",
               "deterministic algorithms": _share(recorded["env_deterministic_algorithms"])}
    cuda = recorded[recorded["device"] == "cuda"]
    if len(cuda):  # cuDNN's flags mean nothing to a CPU cell
        summary["cuDNN"] = (f"deterministic {_share(cuda['env_cudnn_deterministic'])}, "
                            f"autotuner (benchmark) {_share(cuda['env_cudnn_benchmark'])}")
    if len(recorded) < len(cells):
        summary["TF32 and determinism not recorded"] = (f"{len(cells) - len(recorded)} of {len(cells)} cells "
                                                        f"(older env.json)")
    return summary


def provenance(cells: pd.DataFrame) -> dict[str, str]:
    """Each provenance field with every distinct value the cells report; TF32 and determinism in words."""
    fields = [c for c in cells.columns if c.startswith("env_") and c not in ("env_time", "env_host")
              and not c.startswith(ARITHMETIC_FIELDS)]
    summary = {c.removeprefix("env_"): ", ".join(sorted(map(str, cells[c].dropna().unique()))) for c in fields}
    summary.update(arithmetic(cells))
    times = cells["env_time"].dropna()
    if len(times):
        summary["cells trained"] = f"{times.min()} to {times.max()}"
    summary["hosts"] = ", ".join(sorted(cells["env_host"].dropna().unique()))
    return summary


def _read(path: Path) -> pd.DataFrame:
    """A table that may be empty (no probes recorded, say)."""
    try:
        return pd.read_csv(path, low_memory=False)  # one pass: a column blank in early rows keeps one type
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=["study"])


def _sections(arguments: list[tuple], jobs: int) -> list[dict]:
    """The study sections, drawn by `jobs` forked processes at once (their figures are most of the report's time)."""
    if jobs <= 1 or len(arguments) <= 1:
        return [study_section(*args) for args in arguments]
    with ProcessPoolExecutor(min(jobs, len(arguments)), mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(study_section, *zip(*arguments)))


def rounds_of(rounds: pd.DataFrame, study: str) -> pd.DataFrame:
    """The micro-benchmark rounds a study's claims read: its model's inference folded and not (C11); for
    `benchmarks`, the norm layers' (C12)."""
    folding = rounds["fold_study"] if "fold_study" in rounds else pd.Series(None, index=rounds.index, dtype=object)
    return rounds[folding.isna()] if study == "benchmarks" else rounds[folding == study]


def render_report(tables: Path, config: dict, out: Path, figures_dir: Path, bench: Path | None = None,
                  invocation: Path | None = None, jobs: int = 1) -> None:
    """Write the report for the workflow `config` from the tables in `tables` and the micro-benchmarks in
    `bench`: reports/report.html, its figures as files under `figures_dir`, claims.csv beside the page, and the
    run's record (run.json) beside the tables' folder.

    `invocation` is the workflow run's record (its start time and command line): cells trained since
    that start are marked as trained in this run, the others as reused. `jobs` processes draw the figures.
    """
    cells, curves, probes, numerics = (_read(tables / f"{name}.csv") for name in ("cells", "curves", "probes", "numerics"))
    # A cell that failed (out of memory) measured nothing: listed in the provenance, left out of every table below.
    failed = cells[cells["failed"].eq(True)] if "failed" in cells else cells.iloc[:0]
    cells = cells.drop(failed.index)
    curves, probes = (table[~table["cell_dir"].isin(failed["cell_dir"])] if "cell_dir" in table else table
                      for table in (curves, probes))
    run = read_json(invocation) if invocation and invocation.exists() else {}
    origin = origins(cells, run.get("started"))
    cells["trained"] = trained(cells, origin)
    studies = config.get("studies", {})
    rounds = benchmark_rounds(bench) if bench else pd.DataFrame()
    norm_rounds = rounds_of(rounds, "benchmarks")
    set_style()
    # Sections in the config's order (studies of earlier runs that the config no longer names, last).
    order = {study: index for index, study in enumerate(studies)}
    by_study = {study: claims.Tables(study_cells, curves[curves["study"] == study], probes[probes["study"] == study],
                                     rounds_of(rounds, study))
                for study, study_cells in sorted(cells.groupby("study", sort=False),
                                                 key=lambda item: order.get(item[0], len(order)))}
    if not rounds.empty:
        by_study["benchmarks"] = claims.Tables(bench=norm_rounds)
    verdicts = claims.evaluate(claims.claim_sections(config), by_study)  # on the full plugin references
    write_table(claims_table(verdicts), out.parent / "claims.csv")
    record = run_record(config, cells, run.get("started"), run.get("command"))
    write_json(tables.parent / RUN_RECORD, record)
    by_study = {study: claims.Tables(*(shown(table) for table in (tables_.cells, tables_.curves, tables_.probes)),
                                     tables_.bench) for study, tables_ in by_study.items()}
    sections = _sections([(study, studies.get(study, {}), tables_.cells, tables_.curves, tables_.probes,
                           tables_.bench, out.parent.resolve(), figures_dir)
                          for study, tables_ in by_study.items() if study != "benchmarks"], jobs)
    template = environment().get_template("report.html")
    how = origin.value_counts()
    details = {
        **provenance(cells),
        "config sha256": record["config_sha256"][:16],
        "command of this run": run.get("command", "not recorded (report rendered outside a workflow run)"),
        "reproduce with": "the command of this run, in the same folder (the default study: make reproduce)",
        "harness efficiency": harness_efficiency(cells),
        **({"failed cells (left out)": "; ".join(f"{row.study}/{row.cell}: {row.failure_reason}"
                                                 for row in failed.itertuples())} if len(failed) else {}),
        "cells": f"{len(cells)}: {how.get('this run', 0)} trained in this run, {how.get('resumed', 0)} resumed "
                 f"from a checkpoint, {how.get('reused', 0)} reused from earlier runs (see each cell's 'trained')",
    }
    scales = {study: scale(tables_.cells) for study, tables_ in by_study.items() if study != "benchmarks"}
    scales["benchmarks"] = f"{benchmark_machine(rounds)}" if not rounds.empty else ""
    html = template.render(claims=claim_rows(verdicts, scales), family_wise=family_wise(verdicts),
                           sections=sections, provenance=details,
                           leaderboard=leaderboard(by_study, studies),
                           numerics=numerics_table(numerics), benchmarks=benchmark_table(norm_rounds),
                           benchmarks_description=config.get("benchmarks", {}).get("description", ""),
                           generated=pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"))
    write_atomic(out, lambda f: f.write(html))
