"""The HTML report: figures and tables drawn from the aggregated tables alone.

One self-contained page: figures are PNGs embedded as data URIs, the table
sorts with a few lines of inline script, and nothing is fetched from the
network. Each norm keeps one colour across every figure.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
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
# Which varying setting becomes the x axis of a study's figures, and which become panels, by preference.
X_AXIS_PREFERENCE = ("world_size", "batch_size", "lr", "precision", "init", "norm_placement", "width", "depth",
                     "bn_momentum")
FACET_PREFERENCE = ("model", "activation", "warmup_steps", "precision", "init", "world_size", "batch_size", "lr")
LOG_AXES = {"batch_size": 2, "world_size": 2, "width": 2, "lr": 10}
AXIS_LABELS = {
    "batch_size": "per-worker batch size (images)", "lr": "peak learning rate", "world_size": "workers",
    "test_acc": "test accuracy", "final_test_acc": "final test accuracy", "epoch": "epoch",
    "train_samples_per_s": "training throughput (images/s)", "test_loss": "test loss", "init": "weight init",
    "layer_index": "layer (from the input)", "norm_placement": "norm placement", "warmup_steps": "warm-up steps",
}
TABLE_COLUMNS = ["cell", "final_test_acc", "best_test_acc", "final_test_loss", "diverged", "steps",
                 "skipped_steps", "train_samples_per_s", "wall_time_s"]


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def varying_settings(cells: pd.DataFrame) -> list[str]:
    """Settings that take more than one value among a study's cells: its grid axes."""
    return [name for name in SETTING_NAMES if name in cells and cells[name].nunique(dropna=False) > 1]


def _linked(cells: pd.DataFrame, a: str, b: str) -> bool:
    """Whether two axes move together (one value of each always goes with one value of the other)."""
    return cells.groupby(a)[b].nunique().max() == 1 and cells.groupby(b)[a].nunique().max() == 1


def study_axes(cells: pd.DataFrame) -> tuple[str | None, list[str]]:
    """The x axis of a study's figures and up to two axes for panels (columns, rows).

    norm is always the colour and seeds are pooled into error bands; an axis linked
    to one already chosen (world_size with batch_size at a fixed global batch) adds nothing.
    """
    axes = [a for a in varying_settings(cells) if a not in ("norm", "seed")]
    x = next((a for a in X_AXIS_PREFERENCE if a in axes), axes[0] if axes else None)
    rank = {a: i for i, a in enumerate(FACET_PREFERENCE)}
    facets: list[str] = []
    for axis in sorted((a for a in axes if a != x), key=lambda a: rank.get(a, len(rank))):
        if not any(_linked(cells, axis, other) for other in [x, *facets]):
            facets.append(axis)
    return x, facets[:2]


def _label(name: str) -> str:
    return AXIS_LABELS.get(name, name.replace("_", " "))


def _order(cells: pd.DataFrame, axis: str) -> list:
    """Values of an axis in the order the settings schema lists them (or sorted)."""
    enum = settings_schema()["properties"].get(axis, {}).get("enum")
    present = set(cells[axis].dropna())
    return [v for v in enum if v in present] if enum else sorted(present)


def _hue(cells: pd.DataFrame) -> dict:
    norms = _order(cells, "norm")
    return {"hue": "norm", "hue_order": norms, "palette": {norm: NORM_PALETTE[norm] for norm in norms}}


def _panels(cells: pd.DataFrame, facets: list[str]) -> dict:
    panels = {}
    if facets:
        panels.update(col=facets[0], col_order=_order(cells, facets[0]))
    if len(facets) > 1:
        panels.update(row=facets[1], row_order=_order(cells, facets[1]))
    return panels


def accuracy_figure(cells: pd.DataFrame, x: str, facets: list[str]) -> str:
    """Final test accuracy against the study's x axis, mean and 95% CI over seeds; diverged cells as red crosses."""
    finished = cells[~cells["diverged"].astype(bool)]
    numeric = pd.api.types.is_numeric_dtype(cells[x])
    common = dict(x=x, y="final_test_acc", errorbar=("ci", 95), height=3.4, aspect=1.3, **_hue(cells),
                  **_panels(cells, facets))
    if numeric:
        grid = sns.relplot(finished, kind="line", marker="o", **common)
    else:
        grid = sns.catplot(finished, kind="point", order=_order(cells, x), **common)
    diverged = cells[cells["diverged"].astype(bool)]
    # FacetGrid keys its panels by (row value, column value), or by the column value alone.
    for key, subset in diverged.groupby(facets[::-1]) if facets else [((), diverged)]:
        axis = grid.axes_dict[key if len(facets) == 2 else key[0]] if facets else grid.ax
        positions = subset[x] if numeric else subset[x].map(_order(cells, x).index)
        axis.scatter(positions, [0.0] * len(subset), marker="x", color="red", s=60, zorder=5, label="diverged")
        axis.legend(loc="lower left", fontsize="small")
    for axis in grid.axes.flat:
        if numeric and x in LOG_AXES:
            values = sorted(cells[x].unique())
            axis.set_xscale("log", base=LOG_AXES[x])
            axis.set_xticks(values, labels=[f"{v:g}" for v in values])
        axis.grid(alpha=0.3)
    grid.set_axis_labels(_label(x), _label("final_test_acc"))
    return _png(grid.figure)


def curves_figure(curves: pd.DataFrame, x: str | None, facets: list[str]) -> str:
    """Test accuracy over training, one panel per value of the study's x axis (and of its first panel axis)."""
    panels = {}
    if x is not None:
        panels.update(col=x, col_order=_order(curves, x))
    if facets:
        panels.update(row=facets[0], row_order=_order(curves, facets[0]))
    elif x is not None:
        panels["col_wrap"] = 4
    if len(facets) > 1:
        panels["style"] = facets[1]
    grid = sns.relplot(curves, x="epoch", y="test_acc", kind="line", marker="o", errorbar=("ci", 95),
                       height=2.6, aspect=1.2, **_hue(curves), **panels)
    grid.set_axis_labels(_label("epoch"), _label("test_acc"))
    grid.set_titles(size=9)
    return _png(grid.figure)


def throughput_figure(cells: pd.DataFrame, x: str, facets: list[str]) -> str:
    grid = sns.catplot(cells, kind="bar", x=x, y="train_samples_per_s", order=_order(cells, x), errorbar=("ci", 95),
                       height=3.2, aspect=1.3, **_hue(cells), **_panels(cells, facets[:1]))
    grid.set_axis_labels(_label(x), _label("train_samples_per_s"))
    return _png(grid.figure)


def gradient_profile_figure(probes: pd.DataFrame, model: str) -> str:
    """Per-layer gradient norm at initialization (the first step), input side on the left (C4, C5)."""
    at_init = probes[(probes["step"] == 0) & (probes["quantity"] == "grad_norm") & (probes["model"] == model)]
    grid = sns.relplot(at_init, x="layer_index", y="value", kind="line", marker="o", errorbar=("ci", 95), height=2.8,
                       aspect=1.1, col="init", col_order=_order(at_init, "init"), row="activation",
                       row_order=_order(at_init, "activation"), facet_kws={"sharey": False}, **_hue(at_init))
    grid.set(yscale="log")
    grid.set_axis_labels(_label("layer_index"), "gradient norm of the layer's weight")
    return _png(grid.figure)


def saturation_figure(probes: pd.DataFrame) -> str:
    """Share of saturated sigmoid units / dead ReLU units at initialization, averaged over layers."""
    at_init = probes[(probes["step"] == 0) & probes["quantity"].isin(["saturated_frac", "dead_frac"])]
    per_cell = at_init.groupby(["cell", "model", "activation", "init", "norm"], as_index=False)["value"].mean()
    grid = sns.catplot(per_cell, kind="bar", x="init", y="value", order=_order(per_cell, "init"),
                       col="activation", col_order=_order(per_cell, "activation"), row="model",
                       row_order=_order(per_cell, "model"), height=2.8, aspect=1.2, **_hue(per_cell))
    grid.set_axis_labels(_label("init"), "saturated (sigmoid) / dead (ReLU) share")
    return _png(grid.figure)


def step_time_ratios(cells: pd.DataFrame, keys: list[str]) -> dict | None:
    """Training step time of each norm relative to BatchNorm in the same cell otherwise (mean over seeds).

    Step time is images per step over images per second, so at equal batch the ratio is
    bn's throughput over the norm's: above 1 the norm is slower than BatchNorm.
    """
    norms = _order(cells, "norm")
    if "bn" not in norms or len(norms) < 2:
        return None
    rates = cells.groupby([*keys, "norm"])["train_samples_per_s"].mean().unstack("norm")[norms]
    ratios = rates.rdiv(rates["bn"], axis=0)
    return {"index": [_label(k) for k in keys], "columns": norms,
            "rows": [{"key": [_format(k) for k in (key if isinstance(key, tuple) else (key,))],
                      "values": [_format(v) for v in row]} for key, row in ratios.iterrows()]}


def learning_rate_table(cells: pd.DataFrame, curves: pd.DataFrame, thresholds: dict) -> dict:
    """Per norm: the stable learning-rate range (C3) and steps/seconds to the target accuracy at its best lr (C13)."""
    stable_acc, target_acc = thresholds.get("stable_acc", 0.0), thresholds.get("target_acc")
    columns = ["norm", f"stable lr range (no divergence, final acc >= {stable_acc:g})", "decades",
               "best lr", "final acc at best lr"]
    if target_acc is not None:
        columns += [f"steps to {target_acc:g} test acc", f"seconds to {target_acc:g}"]
    rows = []
    for norm in _order(cells, "norm"):
        by_lr = cells[cells["norm"] == norm].groupby("lr").agg(
            acc=("final_test_acc", "mean"), diverged=("diverged", "any"))
        stable = by_lr[~by_lr["diverged"] & (by_lr["acc"] >= stable_acc)].index
        best_lr = by_lr["acc"].idxmax() if by_lr["acc"].notna().any() else None
        row = [norm, f"{stable.min():g} to {stable.max():g}" if len(stable) else "none",
               _format(math.log10(stable.max() / stable.min())) if len(stable) else "",
               _format(best_lr) if best_lr is not None else "", _format(by_lr["acc"].max())]
        if target_acc is not None:
            reached = curves[(curves["norm"] == norm) & (curves["lr"] == best_lr) & (curves["test_acc"] >= target_acc)]
            first = reached.sort_values("step").groupby("seed").first()
            row += [_format(first["step"].mean()) if len(first) else "not reached",
                    _format(first["elapsed_s"].mean()) if len(first) else ""]
        rows.append(row)
    return {"columns": columns, "rows": rows}


def study_section(name: str, spec: dict, cells: pd.DataFrame, curves: pd.DataFrame, probes: pd.DataFrame,
                  report_dir: Path) -> dict:
    x, facets = study_axes(cells)
    section = {"name": name, "description": spec.get("description", ""), "axes": varying_settings(cells),
               "cells": len(cells), "figures": [], "tables": []}
    if x is not None:
        section["figures"].append({"title": f"Final test accuracy vs {_label(x)}", "src": accuracy_figure(cells, x, facets)})
    if len(curves):
        section["figures"].append({"title": "Learning curves", "src": curves_figure(curves, x, facets)})
    if "init" in section["axes"] and len(probes):
        for model in _order(probes, "model"):
            section["figures"].append({"title": f"Gradient norm per layer at initialization, {model}",
                                       "src": gradient_profile_figure(probes, model)})
        section["figures"].append({"title": "Saturated or dead units at initialization", "src": saturation_figure(probes)})
    if x is not None:
        section["figures"].append({"title": "Training throughput", "src": throughput_figure(cells, x, facets)})
    if x == "lr":
        section["tables"].append({"title": "Learning-rate range and speed to target",
                                  **learning_rate_table(cells, curves, spec.get("report", {}))})
    section["step_time"] = step_time_ratios(cells, [a for a in [x, *facets] if a is not None])
    shown = ["cell", *section["axes"], *TABLE_COLUMNS[1:]]
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


def numerics_table(numerics: pd.DataFrame) -> dict | None:
    """Max absolute output error against float64: one row per norm and mean offset, one column per dtype."""
    if numerics.empty:
        return None
    wide = numerics.pivot_table(index=["norm", "mean_offset"], columns="dtype", values="max_abs_error", sort=False)
    return {"columns": ["norm", "input mean offset", *wide.columns],
            "rows": [[norm, _format(offset), *map(_format, row)] for (norm, offset), row in wide.iterrows()]}


def _read(path: Path) -> pd.DataFrame:
    """A table that may be empty (no probes recorded, say)."""
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=["study"])


def render_report(tables: Path, studies: dict, out: Path) -> None:
    """Write the report for `studies` (the workflow config's studies) from the tables in `tables`."""
    cells, curves, probes, numerics = (_read(tables / f"{name}.csv") for name in ("cells", "curves", "probes", "numerics"))
    sns.set_theme(style="ticks", context="notebook")
    sections = [
        study_section(study, studies.get(study, {}), study_cells, curves[curves["study"] == study],
                      probes[probes["study"] == study], out.parent.resolve())
        for study, study_cells in cells.groupby("study", sort=False)
    ]
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    template = environment.from_string(files("normbench").joinpath("templates/report.html").read_text())
    details = {**provenance(cells), "studies config sha256": hashlib.sha256(
        json.dumps(studies, sort_keys=True).encode()).hexdigest()[:16],
        "reproduce with": "make reproduce (or: snakemake --workflow-profile workflow/profiles/default)"}
    html = template.render(sections=sections, provenance=details, numerics=numerics_table(numerics),
                           generated=pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"))
    write_atomic(out, lambda f: f.write(html))
