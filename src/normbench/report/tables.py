"""The report's tables: per-study summaries (folding, generalization, drift, learning rates, step times), the
leaderboard of the norms, and the micro-benchmark and numerics tables.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

from normbench import claims
from normbench.claims import format_value
from normbench.plugins import is_plugin, short_name
from normbench.report.figures import _label, _order, generalization, timed


def folding_table(probes: pd.DataFrame) -> dict:
    """BN folding per setting: the largest output difference of the trained models, over seeds (C11)."""
    folded = probes[probes["quantity"] == "fold_rel_diff"].groupby(["batch_size", "bn_momentum"])["value"].max()
    return {"columns": ["batch size", "BN momentum", "largest output difference (relative)"],
            "rows": [[format_value(b), format_value(m), f"{diff:.2g}"] for (b, m), diff in folded.items()]}


def folding_time_table(rounds: pd.DataFrame) -> dict:
    """The study's model's inference time folded and not, from the micro-benchmarks (C11): medians over every
    round, and the ratio (per repeat, the median of its rounds') as a geometric mean with its 95% interval over
    the repeats."""
    estimate = claims.folding_speedup(rounds)
    interval = "" if math.isnan(estimate.low) else f" [{estimate.low:.2f}, {estimate.high:.2f}]"
    medians = rounds.groupby("network")["time_s"].median()
    return {"columns": ["device", "model (untrained)", "batch (inputs)", "unfolded (ms)", "folded (ms)",
                        "unfolded / folded [95% CI]", "repeats"],
            "rows": [[rounds["device"].iloc[0], rounds["model"].iloc[0], rounds["shape"].iloc[0],
                      format_value(medians["unfolded"] * 1e3),
                      format_value(medians["folded"] * 1e3), f"{estimate.value:.2f}{interval}",
                      str(rounds["repeat"].nunique())]]}


def generalization_table(cells: pd.DataFrame, probes: pd.DataFrame) -> dict:
    means = generalization(cells, probes).groupby(["norm", "dropout"])[["train_acc_eval", "test_acc_eval", "gap"]].mean()
    return {"columns": ["norm", "dropout", "train accuracy (eval mode)", "test accuracy", "gap"],
            "rows": [[norm, format_value(dropout), *map(format_value, row)] for (norm, dropout), row in means.iterrows()]}


def drift_table(probes: pd.DataFrame, cells: pd.DataFrame) -> dict:
    """C1's drift per norm: each percentile's travel over training in widths of the distribution."""
    drift = cells.join(claims.percentile_drift(probes).rename("drift"), on="cell", how="inner")
    by_norm = drift.groupby("norm")["drift"]
    return {"columns": ["norm", "drift (mean over seeds)", "per seed"],
            "rows": [[norm, format_value(values.mean()), ", ".join(format_value(v) for v in values)]
                     for norm, values in by_norm]}


def step_time_ratios(cells: pd.DataFrame, keys: list[str]) -> dict | None:
    """Training step time of each norm relative to BatchNorm in the same cell otherwise (mean over seeds).

    Step time is images per step over images per second, so at equal batch the ratio is
    bn's throughput over the norm's: above 1 the norm is slower than BatchNorm. Diverged cells
    stopped early and are left out (a setting where every seed diverged has no ratio).
    """
    norms = _order(cells, "norm")
    if "bn" not in norms or len(norms) < 2:
        return None
    rates = timed(cells).groupby([*keys, "norm"])["train_samples_per_s"].mean()
    # With norm as the only axis there is one setting: a one-row table.
    rates = (rates.unstack("norm") if keys else rates.to_frame("every cell").T).reindex(columns=norms)
    ratios = rates.rdiv(rates["bn"], axis=0)
    return {"index": [_label(k) for k in keys] or ["setting"], "columns": norms,
            "rows": [{"key": [format_value(k) for k in (key if isinstance(key, tuple) else (key,))],
                      "values": [format_value(v) for v in row]} for key, row in ratios.iterrows()]}


def _median_reach(by_seed: pd.Series) -> str:
    """The median over seeds of where each first reached a target (steps or seconds), a seed that never did counting
    as beyond every one that did (censored, as C13 reads it), so slow norms are not flattered by their lucky seeds."""
    reached, seeds = int(np.isfinite(by_seed).sum()), len(by_seed)  # seeds of finished (or diverged) runs
    if not seeds:
        return "no finished run"
    if not reached:
        return "never"
    median = by_seed.sort_values().iloc[(seeds - 1) // 2]  # the lower median: defined while half the seeds reach
    text = format_value(median) if np.isfinite(median) else "not by most seeds"
    return text if reached == seeds else f"{text} ({reached} of {seeds} seeds)"


def learning_rate_table(cells: pd.DataFrame, curves: pd.DataFrame, thresholds: dict) -> dict:
    """Per norm: the stable learning-rate range (C3) and steps/seconds to the target accuracy at its best lr (C13)."""
    stable_acc, target_acc = thresholds.get("stable_acc", 0.0), thresholds.get("target_acc")
    columns = ["norm", f"stable lr range (no divergence, final acc >= {stable_acc:g} in every seed)", "decades",
               "best lr", "final acc at best lr"]
    if target_acc is not None:
        columns += [f"steps to {target_acc:g} test acc (median over seeds)", f"seconds to {target_acc:g} (median)"]
    rows = []
    for norm in _order(cells, "norm"):
        norm_cells = cells[cells["norm"] == norm]
        stable, lr = claims.stable_lrs(norm_cells, stable_acc), claims.best_lr(norm_cells)
        row = [norm, f"{stable[0]:g} to {stable[-1]:g}" if stable else "none",
               format_value(math.log10(stable[-1] / stable[0])) if stable else "", format_value(lr),
               format_value(claims.accuracy(norm_cells[norm_cells["lr"] == lr]).mean())]
        if target_acc is not None:
            reach = claims.steps_to_target(norm_cells[norm_cells["lr"] == lr], curves, target_acc, curves["step"].max())
            row += [_median_reach(reach["upper"]), _median_reach(reach["elapsed_s"])]
        rows.append(row)
    return {"columns": columns, "rows": rows}


def shown(table: pd.DataFrame) -> pd.DataFrame:
    """The table with plugged-in norms and models by their short names: a path would swamp every label."""
    return table.assign(**{column: table[column].map(lambda name: short_name(name) if is_plugin(name) else name)
                           for column in ("norm", "model") if column in table})


def at_setting(cells: pd.DataFrame, setting: dict) -> pd.Series:
    """Cells at `setting`, a blank value matching a blank (plain BN's ghost_batch)."""
    wanted, values = pd.Series(setting, dtype=object), cells[list(setting)]
    return (values.eq(wanted) | (values.isna() & wanted.isna())).all(axis=1)


def accuracy_estimate(cells: pd.DataFrame) -> claims.Estimate:
    """The mean final test accuracy over seeds with its 95% interval, clipped to what an accuracy can be."""
    estimate = claims.mean_interval(claims.accuracy(cells).groupby(cells["seed"]).mean(), len(cells))
    return dataclasses.replace(estimate, low=float(np.clip(estimate.low, 0.0, 1.0)),  # none stays none
                               high=float(np.clip(estimate.high, 0.0, 1.0)))

def leaderboard(by_study: dict[str, claims.Tables], studies: dict[str, dict]) -> dict | None:
    """Every norm of the run, built in or plugged in, per study and setting (the study's other axes, seeds
    aside: a norm at two learning rates is two rows): final accuracy over seeds with its interval (clipped to
    [0, 1]), the median step at which seeds first reached the study's target accuracy (where it sets one; a seed
    that never did counts as beyond them), step time relative to BN's at the same setting (or, where BN has no cell
    at it, BN's over the study; one study's cells share a device), and diverged cells. "How does my norm compare?"
    on one screen; the report's tables sort by any column."""
    rows = []
    for study, tables_ in by_study.items():
        cells, curves = tables_.cells, tables_.curves
        if study == "benchmarks" or cells["norm"].nunique() < 2:
            continue
        axes = [axis for axis in claims.varying_settings(cells) if axis not in ("norm", "seed")]
        target = studies.get(study, {}).get("report", {}).get("target_acc")
        rate = timed(cells)
        bn_rate = rate[rate["norm"] == "bn"]
        for (norm, *values), mine in cells.groupby(["norm", *axes], sort=False, dropna=False):
            setting = dict(zip(axes, values))
            # BN at the same setting of the other axes; ghost_batch is the norm's own (ghost BN against plain BN).
            shared = {axis: value for axis, value in setting.items() if axis != "ghost_batch"}
            bn = bn_rate[at_setting(bn_rate, shared)] if shared else bn_rate
            own = rate.loc[rate.index.isin(mine.index), "train_samples_per_s"].mean()
            relative = (bn if len(bn) else bn_rate)["train_samples_per_s"].mean() / own
            estimate = accuracy_estimate(mine)
            runs = curves[curves["cell"].isin(mine["cell"])] if "cell" in curves else curves.iloc[:0]
            reach = claims.steps_to_target(mine, runs, target, runs["step"].max()) if target else None
            rows.append([study, norm, ", ".join(f"{axis} {format_value(value)}" for axis, value in setting.items()
                                                if not pd.isna(value)),
                         claims.format_estimate(estimate),
                         _median_reach(reach["upper"]) if target else "no target set",
                         "" if math.isnan(own) else format_value(relative) if len(bn_rate) else "no BN cell",
                         f"{int(mine['diverged'].astype(bool).sum())} of {len(mine)}"])
    if not rows:
        return None
    return {"columns": ["study", "norm", "setting", "final test accuracy [95% CI]", "steps to target (median)",
                        "step time / BN's", "diverged"], "rows": rows}


def benchmark_table(rounds: pd.DataFrame) -> dict | None:
    """Median forward+backward time per norm, and its ratio to BatchNorm's (geometric mean, with a 95% interval of
    the logarithms over the benchmark's repeats, separate processes), per device, layout and dtype."""
    if rounds.empty:
        return None
    rows = []
    for (device, layout, dtype), case in rounds.groupby(["device", "layout", "dtype"], sort=False):
        for norm, times in case.groupby("norm", sort=False)["time_s"]:
            if norm == "bn":
                relative = "1 (reference)"
            else:
                estimate = claims.mean_interval(claims.time_ratio(case, norm, "bn"), 2, unit="repeats", log=True)
                interval = "" if math.isnan(estimate.low) else f" [{estimate.low:.2f}, {estimate.high:.2f}]"
                relative = f"{estimate.value:.2f}{interval}"
            rows.append([device, layout, case["shape"].iloc[0], dtype, norm, format_value(times.median() * 1e6), relative,
                         str(len(times))])
    return {"columns": ["device", "layout", "shape", "dtype", "norm", "median time (µs)", "time / BN's [95% CI]",
                        "rounds (all repeats)"],
            "rows": rows, "measured_on": benchmark_machine(rounds)}


def benchmark_machine(rounds: pd.DataFrame) -> str:
    machines = rounds[["device", "threads"]].drop_duplicates()
    return "; ".join(f"{device}, {threads} CPU threads" for device, threads in machines.itertuples(index=False))


def numerics_table(numerics: pd.DataFrame) -> dict | None:
    """Max absolute output error against float64: one row per norm and mean offset, one column per dtype."""
    if numerics.empty:
        return None
    wide = numerics.pivot_table(index=["norm", "mean_offset"], columns="dtype", values="max_abs_error", sort=False)
    devices = sorted(numerics["device"].dropna().unique()) if "device" in numerics else []
    return {"device": ", ".join(devices) or "not recorded", "columns": ["norm", "input mean offset", *wide.columns],
            "rows": [[norm, format_value(offset), *map(format_value, row)] for (norm, offset), row in wide.iterrows()]}
