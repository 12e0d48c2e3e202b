"""One section of the report per study: its setup box, reference cells, figures and tables, and where each
cell came from (trained in this run, resumed, or reused).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pandas as pd

from normbench import claims
from normbench.captions import FIGURE_CAPTIONS
from normbench.claims import format_value
from normbench.plugins import describe_model, is_plugin, short_name
from normbench.report.figures import (TABLE_COLUMNS, _label, _save, accuracy_figure, curves_figure,
                                      generalization_figure, gradient_profile_figure, ics_figure, inference_figure,
                                      landscape_figure, percentiles_figure, saturation_figure, shared_device,
                                      study_axes, throughput_figure)
from normbench.report.tables import (accuracy_estimate, at_setting, drift_table, folding_table, folding_time_table,
                                     generalization_table, learning_rate_table, shown, step_time_ratios)


def origins(cells: pd.DataFrame, started: str | None) -> pd.Series:
    """How each cell's numbers came about: `resumed` from a checkpoint, trained in `this run` of the workflow
    (which started at `started`), or `reused` from an earlier run."""
    this_run = pd.to_datetime(cells["env_time"], utc=True) >= pd.Timestamp(started) if started else False
    resumed = cells.get("resumed_from_step", pd.Series(index=cells.index)).fillna(0) > 0
    return pd.Series(np.select([resumed, this_run], ["resumed", "this run"], "reused"), index=cells.index)


def trained(cells: pd.DataFrame, origin: pd.Series) -> pd.Series:
    """The cells table's account of each origin: the step a resumed cell resumed from, a reused cell's date."""
    resumed_from = "resumed from step " + cells.get("resumed_from_step", pd.Series(0, index=cells.index)) \
        .fillna(0).astype(int).astype(str)
    reused = "reused, trained " + pd.to_datetime(cells["env_time"], utc=True).dt.strftime("%Y-%m-%d %H:%M")
    return pd.Series(np.select([origin == "resumed", origin == "reused"], [resumed_from, reused], "this run"),
                     index=cells.index)


def memory_format(cells: pd.DataFrame) -> str:
    """The study's memory format, said because channels_last speeds some norms more than others (README, Speed)."""
    if "channels_last" in cells and cells["channels_last"].astype(bool).any():
        return "channels_last (NHWC): it speeds some norms more than others, so step times here compare norms in it"
    return "contiguous (NCHW)"


def values_taken(cells: pd.DataFrame, column: str) -> str:
    """The values a column takes, in order of value (2.15 before 10), as the report spells them: "3 or 4"."""
    values = sorted(cells[column].dropna().unique()) if column in cells else []
    return " or ".join(dict.fromkeys(format_value(v) for v in values))


def setup(spec: dict, cells: pd.DataFrame) -> list[tuple[str, str]]:
    """A study's fixed setup, as its section's box shows it: what every cell shares."""
    first = cells.iloc[0]
    shared = functools.partial(values_taken, cells)
    train = "all" if pd.isna(first.get("train_subset")) else f"{int(first['train_subset']):,}"
    test = "all" if pd.isna(first.get("test_subset")) else f"{int(first['test_subset']):,}"
    rows = [("data", f"{first['dataset']}: {train} training images, {test} test images"),
            ("model", describe_model(first)),
            ("batch", f"{shared('batch_size')} per worker, on {shared('world_size')} worker(s)"),
            ("training", f"{shared('epochs')} epochs, {shared('total_steps')} steps per cell, {first['optimizer']} "
                         f"at peak lr {shared('lr')}, {first['schedule']} schedule, {shared('precision')}"),
            ("memory format", memory_format(cells)),
            ("cells", f"{len(cells)} over {cells['seed'].nunique()} seeds, paired by seed (same initialization "
                      f"and batches)")]
    if spec.get("differs_from_anchor"):
        rows.append(("differs from the anchor", spec["differs_from_anchor"]))
    return rows


def scale(cells: pd.DataFrame) -> str:
    """The study's scale in a few words, for verdicts that differ from the paper's."""
    return f"{describe_model(cells.iloc[0])}, {values_taken(cells, 'total_steps')} steps"


def reference(spec: dict, cells: pd.DataFrame) -> dict | None:
    """The study's reference cells and whether they learned enough for its other cells to mean something."""
    chosen = spec.get("report", {}).get("reference")
    if not chosen:
        return None
    bar = spec.get("report", {}).get("reference_acc", 0.85)
    described = {"cells": ", ".join(f"{key} {value}" for key, value in chosen.items()), "bar": format_value(bar)}
    picked = cells[at_setting(cells, chosen)]
    if picked.empty:
        return {**described, "accuracy": "not in this run", "seeds": 0, "reached": False}
    estimate = accuracy_estimate(picked)
    return {**described, "accuracy": claims.format_estimate(estimate), "seeds": estimate.samples,
            "reached": bool(estimate.value >= bar)}


def study_section(name: str, spec: dict, cells: pd.DataFrame, curves: pd.DataFrame, probes: pd.DataFrame,
                  bench: pd.DataFrame, report_dir: Path, figures_dir: Path) -> dict:
    if "ghost_batch" in cells:  # per-worker BN as ghost batches: the images behind each statistic
        cells = cells.assign(statistics_batch=claims.statistics_batch(cells))
        curves = curves.assign(statistics_batch=claims.statistics_batch(curves)) if "ghost_batch" in curves else curves
    x, facets = study_axes(cells)
    seeds = cells["seed"].nunique()
    section = {"name": name, "description": spec.get("description", ""), "axes": claims.varying_settings(cells),
               "cells": len(cells), "seeds": seeds, "figures": [], "tables": [], "setup": setup(spec, cells),
               "reference": reference(spec, cells)}

    def add(kind: str, title: str, figure, intervals: bool = True) -> None:
        counted = "" if not intervals else f" Intervals over {seeds} seed{'s' if seeds != 1 else ''}" + \
            (" (one seed: none)." if seeds == 1 else ".")
        section["figures"].append({"title": title, "caption": FIGURE_CAPTIONS[kind] + counted,
                                   "src": _save(figure, figures_dir / name / f"{kind}.png")})

    x_or_norm = x or "norm"
    add("accuracy", f"Final test accuracy vs {_label(x_or_norm)}", accuracy_figure(cells, x_or_norm, facets))
    if len(curves):
        add("curves", "Learning curves", curves_figure(curves, x, facets))
    if "init" in section["axes"] and len(probes):
        add("gradient_profile", "Gradient norm per layer at initialization", gradient_profile_figure(probes))
        add("saturation", "Saturated or dead units at initialization", saturation_figure(probes))
    quantities = set(probes["quantity"]) if len(probes) else set()
    if "p50" in quantities:
        add("percentiles", "Figure 1 of Ioffe & Szegedy 2015: a last-hidden-layer sigmoid input over training",
            percentiles_figure(probes), intervals=False)  # the first seed's traces
        section["tables"].append({"title": "Drift of the percentiles (C1)", **drift_table(probes, cells)})
    if "ics_l2" in quantities:
        add("ics", "Internal covariate shift per layer", ics_figure(probes))
        add("landscape", "Loss landscape along the gradient", landscape_figure(probes))
    if "acc_ema" in quantities:
        add("inference", "Accuracy with running, precise and per-batch BN statistics", inference_figure(probes))
        section["tables"].append({"title": "BN folded into the conv before it: outputs (C11)", **folding_table(probes)})
    if len(bench):
        section["tables"].append({"title": "BN folded into the conv before it: inference time, timed while nothing "
                                           "else ran (C11)", **folding_time_table(bench)})
    if "train_acc_eval" in quantities:
        add("generalization", "Train - test accuracy gap", generalization_figure(cells, probes))
        section["tables"].append({"title": "Train and test accuracy (C9)", **generalization_table(cells, probes)})
    add("throughput", "Training throughput", throughput_figure(cells, x_or_norm, facets))
    shared = int(shared_device(cells).sum())
    if shared:  # packed cells (gpu_share): their step times count nowhere, and the caption says so
        section["figures"][-1]["caption"] += (f" {shared} of {len(cells)} cells shared their GPU with other cells "
                                              f"(the study's gpu_share): their throughput is left out here and in "
                                              f"every step-time table.")
    if x == "lr":
        section["tables"].append({"title": "Learning-rate range and speed to target",
                                  **learning_rate_table(cells, curves, spec.get("report", {}))})
    # A step's time follows the optimizer's batch, not the images behind each BN statistic: ghost BN is compared
    # with BN at the same batch.
    step_keys = ["batch_size" if axis == "statistics_batch" else axis for axis in [x, *facets] if axis is not None]
    section["step_time"] = step_time_ratios(cells, list(dict.fromkeys(step_keys)))
    shown = ["cell", *section["axes"], *TABLE_COLUMNS[1:]]
    section["columns"] = [c for c in dict.fromkeys(shown) if c in cells]
    section["runs_dir"] = os.path.commonpath([os.path.abspath(folder) for folder in cells["cell_dir"]])
    section["rows"] = [
        {"values": [format_value(row[c]) for c in section["columns"]], "folder": os.path.relpath(row["cell_dir"], report_dir)}
        for _, row in cells.sort_values("cell").iterrows()
    ]
    return section
