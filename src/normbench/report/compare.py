"""Runs side by side: each claim's verdict in every run, at each run's scale, and every cell that several runs
trained with the same settings, its accuracy and its step time compared.

The first run is the baseline. A verdict that differs between runs is flagged (the most telling result: a claim
that holds at one scale and not at another). A step-time change is flagged only where its 95% interval over
repeats (the evaluation intervals of the cell, each a stretch of timed training steps) excludes 1, as
`asv compare` and `pytest-benchmark compare` mark regressions only beyond their noise.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from normbench.config import SETTING_DEFAULTS, SETTING_NAMES
from normbench.html import environment
from normbench.results import write_atomic, write_table
from normbench.report.figures import shared_device
from normbench.report.studies import scale
from normbench.runs import FinishedRun

CONFIDENCE = 0.95


def study_scale(cells: pd.DataFrame) -> str:
    """A study's scale in a few words: the report's (model, steps), then data, device and seeds."""
    if cells.empty:
        return ""
    devices = ", ".join(sorted(map(str, cells["env_device_name"].dropna().unique()))) \
        if "env_device_name" in cells else str(cells["device"].iloc[0])
    return f"{scale(cells)}, {cells['dataset'].iloc[0]}, {devices}, {cells['seed'].nunique()} seed(s)"


def _effect(row: pd.Series) -> str:
    if pd.isna(row.get("estimate")):
        return ""
    interval = "" if pd.isna(row.get("ci_low")) else f" [{row['ci_low']:.3g}, {row['ci_high']:.3g}]"
    return f"{row['estimate']:.3g}{interval}".replace("inf", "∞")


CLAIM_COLUMNS = ["claim", "statement", "run", "verdict", "effect", "rule", "study", "scale", "holds_family_wise"]
CELL_COLUMNS = ["study", "cell", "baseline", "run", "acc_baseline", "acc_run", "acc_difference", "diverged_baseline",
                "diverged_run", "machine_baseline", "machine_run", "step_time_ratio", "ratio_low", "ratio_high",
                "step_time_changed"]


def claim_comparison(runs: list[FinishedRun]) -> pd.DataFrame:
    """One row per claim and run: verdict, effect with interval, the study's scale; `differs` where the runs'
    verdicts (of those that ran the claim) are not all the same."""
    rows = []
    for run in runs:
        for _, claim in run.claims.iterrows():
            study = claim.get("study")
            cells = run.cells[run.cells["study"] == study] if isinstance(study, str) else pd.DataFrame()
            rows.append({"claim": claim["claim"], "statement": claim["statement"], "run": run.name,
                         "verdict": claim["verdict"], "effect": _effect(claim), "rule": claim["rule"],
                         "study": study if isinstance(study, str) else "",
                         "scale": study_scale(cells) if study != "benchmarks" else
                         f"micro-benchmarks on {'; '.join(run.record.get('machines', [])) or 'an unrecorded machine'}",
                         "holds_family_wise": claim.get("holds_family_wise") if pd.notna(claim.get("holds_family_wise"))
                         else None})
    table = pd.DataFrame(rows, columns=CLAIM_COLUMNS)
    ran = table[table["verdict"] != "not run"]
    differs = ran.groupby("claim")["verdict"].nunique() > 1
    table["differs"] = table["claim"].map(differs).fillna(False).astype(bool)
    return table


def step_times(curves: pd.DataFrame) -> pd.Series:
    """Seconds per timed training step in each evaluation interval of a cell: its repeats."""
    if not {"train_time_s", "timed_steps"} <= set(curves.columns):
        return pd.Series(dtype=float)
    ordered = curves.sort_values("step")
    seconds = ordered["train_time_s"].diff().fillna(ordered["train_time_s"])
    steps = ordered["timed_steps"].diff().fillna(ordered["timed_steps"])
    return (seconds / steps)[steps > 0]


def log_ratio_interval(baseline: pd.Series, other: pd.Series) -> tuple[float, float, float]:
    """other / baseline as a ratio of geometric means, with Welch's 95% interval of the difference of the
    logarithms; NaN bounds with fewer than two repeats on a side."""
    from scipy import stats

    a, b = np.log(baseline.dropna()), np.log(other.dropna())
    if len(a) == 0 or len(b) == 0:
        return math.nan, math.nan, math.nan
    difference = b.mean() - a.mean()
    if len(a) < 2 or len(b) < 2:
        return math.exp(difference), math.nan, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return math.exp(difference), math.exp(difference), math.exp(difference)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf((1 + CONFIDENCE) / 2, df) * se
    return math.exp(difference), math.exp(difference - half), math.exp(difference + half)


def same_settings(shared: pd.DataFrame) -> pd.Series:
    """Rows of a merge (suffixes _a, _b) whose cells agree in every setting both record: a cell path names only
    the grid's values, so two configs may train different cells into the same path."""
    names = [name for name in SETTING_NAMES if f"{name}_a" in shared and f"{name}_b" in shared]
    alike = pd.Series(True, index=shared.index)
    for name in names:
        a, b = shared[f"{name}_a"], shared[f"{name}_b"]
        alike &= (a == b) | (a.isna() & b.isna()) | (a.astype(str) == b.astype(str))
    return alike


def _flag(value) -> bool:
    """A table's boolean as read back from CSV (True, 'True', 1.0), blank as False."""
    return str(value).strip().lower() in ("true", "1", "1.0")


def cell_comparison(runs: list[FinishedRun]) -> tuple[pd.DataFrame, list[str]]:
    """Every cell (same study, path and settings) that the baseline and another run both trained: the accuracy
    difference and the step-time ratio with its interval over repeats, each machine named; changed step times
    first. Also what was left out: cells of one run only, and cells at the same path with other settings."""
    baseline, rows, left_out = runs[0], [], []
    columns = ["study", "cell", "final_test_acc", "diverged", "env_host", "env_device_name", *SETTING_NAMES]

    def compared(cells: pd.DataFrame) -> pd.DataFrame:
        """The columns compared, and whether the cell shared its GPU with others (packing): then its step times were
        taken beside theirs and compare nothing."""
        # A run archived before a setting existed trained with its default (config.completed), and has no column.
        added = {name: value for name, value in SETTING_DEFAULTS.items()
                 if name not in cells and not isinstance(value, list)}
        return cells[[column for column in columns if column in cells]].assign(packed=shared_device(cells), **added)

    def cell_repeats(run: FinishedRun) -> dict[tuple, pd.Series]:
        """Each cell's step-time repeats, by (study, cell): one pass over the run's curves."""
        return {} if run.curves.empty else {key: step_times(group)
                                            for key, group in run.curves.groupby(["study", "cell"])}

    none, baseline_repeats = pd.Series(dtype=float), cell_repeats(baseline)

    for run in runs:
        if run.curves.empty:
            left_out.append(f"{run.name}: no curves table, so no step times")
    for other in runs[1:]:
        other_repeats = cell_repeats(other)
        merged = compared(baseline.cells).merge(compared(other.cells), on=["study", "cell"], suffixes=("_a", "_b"),
                                                how="outer", indicator=True)
        only = {side: int((merged["_merge"] == side).sum()) for side in ("left_only", "right_only")}
        both = merged[merged["_merge"] == "both"]
        alike = same_settings(both)
        if only["left_only"] or only["right_only"]:
            left_out.append(f"{other.name}: {only['left_only']} cell(s) of the baseline and {only['right_only']} of "
                            f"its own have no counterpart")
        if (~alike).any():
            left_out.append(f"{other.name}: {int((~alike).sum())} cell(s) at the baseline's paths with other settings "
                            f"(not compared)")
        packed = both[alike]["packed_a"].astype(bool) | both[alike]["packed_b"].astype(bool)
        if packed.any():
            left_out.append(f"{other.name}: the step times of {int(packed.sum())} cell(s) trained on a shared GPU "
                            f"(not compared)")
        for index, cell in both[alike].iterrows():
            key = (cell["study"], cell["cell"])
            repeats = (none, none) if packed[index] else (baseline_repeats.get(key, none), other_repeats.get(key, none))
            ratio, low, high = log_ratio_interval(*repeats)
            rows.append({
                "study": cell["study"], "cell": cell["cell"], "baseline": baseline.name, "run": other.name,
                "acc_baseline": cell["final_test_acc_a"], "acc_run": cell["final_test_acc_b"],
                "acc_difference": cell["final_test_acc_b"] - cell["final_test_acc_a"],
                "diverged_baseline": _flag(cell.get("diverged_a")), "diverged_run": _flag(cell.get("diverged_b")),
                "machine_baseline": f"{cell.get('env_host_a', '')}: {cell.get('env_device_name_a', '')}",
                "machine_run": f"{cell.get('env_host_b', '')}: {cell.get('env_device_name_b', '')}",
                "step_time_ratio": ratio, "ratio_low": low, "ratio_high": high,
                "step_time_changed": bool(low > 1 or high < 1),  # NaN bounds compare False: not flagged
            })
    table = pd.DataFrame(rows, columns=CELL_COLUMNS)
    if len(table):
        table = table.sort_values("step_time_changed", ascending=False, kind="stable").reset_index(drop=True)
    return table, left_out


def render_compare(runs: list[FinishedRun], out: Path, csv: Path | None = None) -> dict[str, int]:
    """The comparison page (self-contained HTML, the report's style) and, with `csv`, the claims and cells
    tables as CSV (`csv` and `<csv stem>_cells.csv`). Returns counts of what was flagged."""
    claims, (cells, left_out) = claim_comparison(runs), cell_comparison(runs)
    left_out = [f"{run.name}: no claims (its claims.csv holds no row)" for run in runs if run.claims.empty] + left_out
    by_claim = [{"claim": claim, "statement": group["statement"].iloc[0], "differs": bool(group["differs"].any()),
                 "runs": group.to_dict("records")} for claim, group in claims.groupby("claim", sort=False)]
    counts = {"claims": len(by_claim), "differing verdicts": sum(claim["differs"] for claim in by_claim),
              "cells compared": len(cells),
              "step-time changes": int(cells["step_time_changed"].sum()) if len(cells) else 0,
              "divergence changes": int((cells["diverged_baseline"] != cells["diverged_run"]).sum())}
    html = environment().get_template("compare.html").render(
        runs=[{"name": run.name, "source": run.source, **{key: run.record.get(key, "") for key in
                                                          ("commits", "machines", "started", "ended", "normbench",
                                                           "config_sha256")}} for run in runs],
        claims=by_claim, cells=cells.to_dict("records"), left_out=left_out,
        differing=counts["differing verdicts"], changed=counts["step-time changes"])
    write_atomic(out, lambda f: f.write(html))
    if csv is not None:
        write_table(claims, csv)
        write_table(cells, csv.with_name(f"{csv.stem}_cells.csv"))
    return counts
