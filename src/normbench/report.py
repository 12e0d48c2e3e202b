"""The HTML report: figures and tables drawn from the aggregated tables alone.

One self-contained page: figures are PNGs embedded as data URIs, the table
sorts with a few lines of inline script, and nothing is fetched from the
network. Each norm keeps one colour across every figure.
"""

from __future__ import annotations

import base64
import io
import os
from importlib.resources import files
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from normbench.config import SETTING_NAMES, settings_schema  # noqa: E402
from normbench.results import write_atomic  # noqa: E402

NORM_ORDER = settings_schema()["properties"]["norm"]["enum"]
NORM_PALETTE = {**dict(zip(NORM_ORDER, sns.color_palette("colorblind"))), "none": (0.45, 0.45, 0.45)}
# Which varying setting becomes the x axis of a study's main figure, in order of preference.
X_AXIS_PREFERENCE = ("world_size", "batch_size", "lr", "precision", "width", "depth", "bn_momentum")
LOG_AXES = {"batch_size", "lr", "world_size", "width"}
AXIS_LABELS = {
    "batch_size": "per-worker batch size (images)", "lr": "peak learning rate", "world_size": "workers",
    "test_acc": "test accuracy", "final_test_acc": "final test accuracy", "epoch": "epoch",
    "train_samples_per_s": "training throughput (images/s)", "test_loss": "test loss",
}
TABLE_COLUMNS = ["cell", "final_test_acc", "best_test_acc", "final_test_loss", "diverged", "steps",
                 "train_samples_per_s", "wall_time_s"]


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def varying_settings(cells: pd.DataFrame) -> list[str]:
    """Settings that take more than one value among a study's cells: its grid axes."""
    return [name for name in SETTING_NAMES if name in cells and cells[name].nunique(dropna=False) > 1]


def _label(name: str) -> str:
    return AXIS_LABELS.get(name, name.replace("_", " "))


def _hue(cells: pd.DataFrame) -> dict:
    norms = [norm for norm in NORM_ORDER if norm in set(cells["norm"])]
    return {"hue": "norm", "hue_order": norms, "palette": {norm: NORM_PALETTE[norm] for norm in norms}}


def accuracy_figure(cells: pd.DataFrame, x: str) -> str:
    """Final test accuracy against the study's main axis, mean and 95% CI over seeds; diverged cells as red crosses."""
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    finished = cells[~cells["diverged"]]
    sns.lineplot(finished, x=x, y="final_test_acc", marker="o", errorbar=("ci", 95), ax=axis, **_hue(cells))
    diverged = cells[cells["diverged"]]
    if len(diverged):
        axis.scatter(diverged[x], [0.0] * len(diverged), marker="x", color="red", s=60, label="diverged", zorder=5)
        axis.legend()
    if x in LOG_AXES:
        axis.set_xscale("log", base=2 if x in ("batch_size", "world_size", "width") else 10)
        axis.set_xticks(sorted(cells[x].unique()), labels=[f"{v:g}" for v in sorted(cells[x].unique())])
    axis.set(xlabel=_label(x), ylabel=_label("final_test_acc"))
    axis.grid(alpha=0.3)
    return _png(figure)


def curves_figure(curves: pd.DataFrame, facet: str | None) -> str:
    """Test accuracy over training, one panel per value of the study's main axis."""
    grid = sns.relplot(curves, x="epoch", y="test_acc", kind="line", marker="o", errorbar=("ci", 95),
                       col=facet, col_wrap=4 if facet else None, height=2.8, aspect=1.2, **_hue(curves))
    grid.set_axis_labels(_label("epoch"), _label("test_acc"))
    if facet:
        grid.set_titles(f"{_label(facet)} = {{col_name}}")
    return _png(grid.figure)


def throughput_figure(cells: pd.DataFrame, x: str) -> str:
    figure, axis = plt.subplots(figsize=(6.4, 3.6))
    sns.barplot(cells, x=x, y="train_samples_per_s", errorbar=("ci", 95), ax=axis, **_hue(cells))
    axis.set(xlabel=_label(x), ylabel=_label("train_samples_per_s"))
    return _png(figure)


def step_time_ratios(cells: pd.DataFrame, x: str | None) -> dict | None:
    """Training step time of each norm relative to BatchNorm in the same cell otherwise (mean over seeds).

    Step time is images per step over images per second, so at equal batch the ratio is
    bn's throughput over the norm's: above 1 the norm is slower than BatchNorm.
    """
    norms = [norm for norm in NORM_ORDER if norm in set(cells["norm"])]
    if "bn" not in norms or len(norms) < 2:
        return None
    keys = [x] if x else []
    rates = cells.groupby([*keys, "norm"])["train_samples_per_s"].mean().unstack("norm")[norms]
    ratios = rates.rdiv(rates["bn"], axis=0)
    return {"index": _label(x) if x else "", "columns": norms,
            "rows": [{"key": _format(key), "values": [_format(v) for v in row]} for key, row in ratios.iterrows()]}


def study_section(name: str, cells: pd.DataFrame, curves: pd.DataFrame, report_dir: Path) -> dict:
    axes = varying_settings(cells)
    x = next((axis for axis in X_AXIS_PREFERENCE if axis in axes and axis != "norm"), None)
    section = {"name": name, "axes": axes, "cells": len(cells), "figures": []}
    if x is not None:
        section["figures"].append({"title": f"Final test accuracy vs {_label(x)}", "src": accuracy_figure(cells, x)})
    if len(curves):
        section["figures"].append({"title": "Learning curves", "src": curves_figure(curves, x)})
    if x is not None:
        section["figures"].append({"title": "Training throughput", "src": throughput_figure(cells, x)})
    section["step_time"] = step_time_ratios(cells, x)
    shown = ["cell", *[a for a in axes if a != "cell"], *TABLE_COLUMNS[1:]]
    section["columns"] = [c for c in dict.fromkeys(shown) if c in cells]
    section["rows"] = [
        {"values": [_format(row[c]) for c in section["columns"]], "folder": os.path.relpath(row["cell_dir"], report_dir)}
        for _, row in cells.sort_values("cell").iterrows()
    ]
    return section


def _format(value) -> str:
    if isinstance(value, float):
        return "" if pd.isna(value) else f"{value:.4g}"
    return str(value)


def provenance(cells: pd.DataFrame) -> dict[str, str]:
    """Each provenance field with every distinct value the cells report."""
    fields = [c for c in cells.columns if c.startswith("env_") and c not in ("env_time", "env_host")]
    summary = {c.removeprefix("env_"): ", ".join(sorted(map(str, cells[c].dropna().unique()))) for c in fields}
    times = cells["env_time"].dropna()
    if len(times):
        summary["cells trained"] = f"{times.min()} to {times.max()}"
    summary["hosts"] = ", ".join(sorted(cells["env_host"].dropna().unique()))
    return summary


def render_report(tables: Path, out: Path) -> None:
    cells = pd.read_csv(tables / "cells.csv")
    curves = pd.read_csv(tables / "curves.csv")
    sns.set_theme(style="ticks", context="notebook")
    sections = [
        study_section(study, study_cells, curves[curves["study"] == study], out.parent.resolve())
        for study, study_cells in cells.groupby("study", sort=True)
    ]
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    template = environment.from_string(files("normbench").joinpath("templates/report.html").read_text())
    html = template.render(sections=sections, provenance=provenance(cells),
                           generated=pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"))
    write_atomic(out, lambda f: f.write(html))
