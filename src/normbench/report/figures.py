"""The report's figures, drawn with seaborn from the tidy tables alone, and the intervals they draw.

Each norm keeps one colour across every figure; bands are the claims table's t intervals (on a log axis, of the
logarithms), clipped to a bounded quantity's range.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: figures are files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from normbench import claims  # noqa: E402
from normbench.config import choices  # noqa: E402
from normbench.results import write_atomic  # noqa: E402


NORM_ORDER = choices("norm")  # the built-in norms; plugged-in ones follow them, sorted
MODE_PALETTE = dict(zip(("ema", "precise", "batch"), sns.color_palette("dark", 3)))
NORM_PALETTE = {**dict(zip(NORM_ORDER, sns.color_palette("colorblind") + sns.color_palette("dark"))),
                "none": (0.45, 0.45, 0.45)}
PLUGIN_PALETTE = sns.color_palette("pastel")
# Which varying setting becomes the x axis of a study's figures, and which become panels, by preference.
X_AXIS_PREFERENCE = ("statistics_batch", "world_size", "batch_size", "lr", "dropout", "precision", "init", "norm_placement", "width", "depth",
                     "bn_momentum")
FACET_PREFERENCE = ("model", "activation", "warmup_steps", "precision", "init", "world_size", "batch_size", "lr")
LOG_AXES = {"batch_size": 2, "statistics_batch": 2, "world_size": 2, "width": 2, "lr": 10}
AXIS_LABELS = {
    "batch_size": "per-worker batch size (images)", "lr": "peak learning rate", "world_size": "workers",
    "test_acc": "test accuracy", "final_test_acc": "final test accuracy", "epoch": "epoch",
    "train_samples_per_s": "training throughput (images/s)", "test_loss": "test loss", "init": "weight init",
    "layer_index": "layer (from the input)", "norm_placement": "norm placement", "warmup_steps": "warm-up steps",
    "statistics_batch": "images per BN statistic (per worker)", "bn_momentum": "BN momentum", "step": "step",
}
TABLE_COLUMNS = ["cell", "final_test_acc", "best_test_acc", "final_test_loss", "diverged", "timed_out", "steps",
                 "skipped_steps", "train_samples_per_s", "wall_time_s", "peak_memory_mb", "trained"]


def t_interval(values) -> tuple[float, float]:
    """The 95% Student t interval of the mean over seeds: the claims table's interval, drawn in every figure."""
    estimate = claims.mean_interval(pd.Series(values, dtype=float), len(values))
    return (estimate.low, estimate.high) if not math.isnan(estimate.low) else (estimate.value, estimate.value)


def bounded_t_interval(lowest: float, highest: float):
    """The t interval clipped to a quantity's range (accuracy and shares in [0, 1], a cosine in [-1, 1]): a wide
    interval over few seeds must not claim impossible values. The captions say so."""
    def interval(values) -> tuple[float, float]:
        low, high = t_interval(values)
        return max(low, lowest), min(high, highest)

    return interval


ACCURACY_INTERVAL = bounded_t_interval(0.0, 1.0)


def log_t_interval(values) -> tuple[float, float]:
    """The t interval of the logarithms, back on the original scale: for positive quantities on a log axis,
    where an interval of the raw values would reach below zero."""
    low, high = t_interval(np.log(np.asarray(values, dtype=float)))
    return math.exp(low), math.exp(high)


def geometric_mean(values) -> float:
    return math.exp(np.log(np.asarray(values, dtype=float)).mean())


# For lines on a log axis: the geometric mean over seeds and the t interval of the logarithms.
ON_LOG_AXIS = {"estimator": geometric_mean, "errorbar": log_t_interval}


def _save(figure, path: Path) -> str:
    """Write the figure to `path` as PNG and return it as a data URI for the self-contained page."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    write_atomic(path, lambda f: f.write(buffer.getvalue()), mode="wb")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _linked(cells: pd.DataFrame, a: str, b: str) -> bool:
    """Whether two axes move together (one value of each always goes with one value of the other)."""
    return cells.groupby(a)[b].nunique().max() == 1 and cells.groupby(b)[a].nunique().max() == 1


def study_axes(cells: pd.DataFrame) -> tuple[str | None, list[str]]:
    """The x axis of a study's figures and up to two axes for panels (columns, rows).

    norm is always the colour and seeds are pooled into error bands; an axis linked
    to one already chosen (world_size with batch_size at a fixed global batch) adds nothing.
    """
    axes = [a for a in claims.varying_settings(cells) if a not in ("norm", "seed", "ghost_batch")]
    if "statistics_batch" in cells and cells["ghost_batch"].nunique() > 1:  # per-worker BN as ghost batches
        axes.append("statistics_batch")
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
    """Values of an axis in the order the settings schema lists them (or sorted), then any others (plugins) sorted."""
    enum = choices(axis) or []
    present = set(cells[axis].dropna())
    return [v for v in enum if v in present] + sorted(present - set(enum), key=str)


def _hue(cells: pd.DataFrame) -> dict:
    norms = _order(cells, "norm")
    plugins = [norm for norm in norms if norm not in NORM_PALETTE]
    colors = {**NORM_PALETTE, **dict(zip(plugins, PLUGIN_PALETTE * (1 + len(plugins) // len(PLUGIN_PALETTE))))}
    return {"hue": "norm", "hue_order": norms, "palette": {norm: colors[norm] for norm in norms}}


def _panels(cells: pd.DataFrame, facets: list[str]) -> dict:
    panels = {}
    if facets:
        panels.update(col=facets[0], col_order=_order(cells, facets[0]))
    if len(facets) > 1:
        panels.update(row=facets[1], row_order=_order(cells, facets[1]))
    return panels


# Short names for panel titles, which share a line when a figure has rows and columns of panels.
PANEL_LABELS = {"batch_size": "batch", "statistics_batch": "images per BN statistic", "bn_momentum": "momentum",
                "norm_placement": "placement", "warmup_steps": "warm-up steps", "world_size": "workers"}


def _titled(grid, panels: dict):
    """Name each panel by its short axis name and value; returns the grid's figure."""
    templates = {f"{side}_template": f"{PANEL_LABELS.get(panels[side], panels[side])} = {{{side}_name}}"
                 for side in ("col", "row") if side in panels}
    grid.set_titles(size=9, **templates)
    return grid.figure


def finished(cells: pd.DataFrame, column: str) -> pd.DataFrame:
    """The cells with `column` blanked where they diverged or stopped early (as the claims leave them out), yet
    with their settings in place on the axes (a study where every cell diverged still draws, empty)."""
    return cells.assign(**{column: claims.measured(cells, column)})


def timed(cells: pd.DataFrame) -> pd.DataFrame:
    """The cells with their throughput where it measures the norm: finished, on a GPU of their own (packing)."""
    measured = finished(cells, "train_samples_per_s")
    return measured.assign(train_samples_per_s=measured["train_samples_per_s"].mask(shared_device(cells)))


def shared_device(cells: pd.DataFrame) -> pd.Series:
    """Cells that trained on a GPU shared with other cells (a study's gpu_share): their step times say nothing."""
    share = cells["env_gpu_share"] if "env_gpu_share" in cells else pd.Series(1, index=cells.index)
    return share.fillna(1).astype(float) > 1


def accuracy_figure(cells: pd.DataFrame, x: str, facets: list[str]):
    """Final test accuracy against the study's x axis, mean and 95% CI over seeds; diverged cells as red crosses."""
    measured = finished(cells, "final_test_acc")
    numeric = pd.api.types.is_numeric_dtype(cells[x])
    panels = _panels(cells, facets)
    common = dict(x=x, y="final_test_acc", errorbar=ACCURACY_INTERVAL, height=3.4, aspect=1.3, **_hue(cells), **panels)
    if numeric:  # relplot fails on a column without a value (every cell diverged): it gets no rows instead
        grid = sns.relplot(measured.dropna(subset=["final_test_acc"]), kind="line", marker="o", **common)
    else:  # categories are not a scale: points with intervals, no lines between them, norms side by side
        dodge = 0.3 if x != "norm" and cells["norm"].nunique() > 1 else False  # seaborn divides it by the norms less one
        grid = sns.catplot(measured, kind="point", order=_order(cells, x), linestyle="none", dodge=dodge, **common)
        grid.tick_params(axis="x", labelrotation=30)
    diverged = cells[cells["diverged"].astype(bool)]
    # FacetGrid keys its panels by (row value, column value), or by the column value alone.
    by_panel = diverged.groupby(facets[::-1]) if facets else [((), diverged)] if len(diverged) else []
    for key, subset in by_panel:
        axis = grid.axes_dict[key if len(facets) == 2 else key[0]] if facets else grid.ax
        positions = subset[x] if numeric else subset[x].map(_order(cells, x).index)
        crosses = axis.scatter(positions, [0.0] * len(subset), marker="x", color="red", s=60, zorder=5)
        axis.legend(handles=[crosses], labels=["diverged"], loc="lower left", fontsize="small")
    for axis in grid.axes.flat:
        if numeric and x in LOG_AXES:
            values = sorted(cells[x].unique())
            axis.set_xscale("log", base=LOG_AXES[x])
            axis.set_xticks(values, labels=[f"{v:g}" for v in values])
        axis.grid(alpha=0.3)
        axis.set_ylim(0, 1)
    grid.set_axis_labels(_label(x), _label("final_test_acc"))
    return _titled(grid, panels)


def curves_figure(curves: pd.DataFrame, x: str | None, facets: list[str]):
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
    grid = sns.relplot(curves, x="epoch", y="test_acc", kind="line", marker="o", errorbar=ACCURACY_INTERVAL,
                       height=2.6, aspect=1.2, **_hue(curves), **panels)
    for axis in grid.axes.flat:
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # whole epochs
        axis.set_ylim(0, 1)  # an accuracy: a wide interval over few seeds must not stretch the scale
    grid.set_axis_labels(_label("epoch"), _label("test_acc"))
    return _titled(grid, panels)


def throughput_figure(cells: pd.DataFrame, x: str, facets: list[str]):
    """Training throughput per norm against the study's x axis, diverged cells left out (see `finished`)."""
    panels = _panels(cells, facets[:1])
    grid = sns.catplot(timed(cells), kind="bar", x=x, y="train_samples_per_s",
                       order=_order(cells, x), errorbar=t_interval, height=3.2, aspect=1.3, **_hue(cells), **panels)
    grid.set(ylim=(0, None))  # a throughput is positive; a wide interval over few seeds is cut at zero
    grid.set_axis_labels(_label(x), _label("train_samples_per_s"))
    return _titled(grid, panels)


def gradient_profile_figure(probes: pd.DataFrame):
    """Per-layer gradient norm at initialization (the first step), input side on the left (C4, C5)."""
    at_init = probes[(probes["step"] == 0) & (probes["quantity"] == "grad_norm")]
    at_init = at_init.assign(network=at_init["model"] + ", " + at_init["activation"])
    grid = sns.relplot(at_init, x="layer_index", y="value", kind="line", marker="o", height=2.8, aspect=1.2,
                       col="init", col_order=_order(at_init, "init"), row="network",
                       row_order=sorted(at_init["network"].unique()), facet_kws={"sharey": True}, **ON_LOG_AXIS,
                       **_hue(at_init))
    grid.set(yscale="log")  # one log scale for every panel: decades compare across inits and activations
    grid.set_titles(template="{row_name}\ninit {col_name}", size=9)
    grid.set_axis_labels(_label("layer_index"), "weight gradient norm")
    return grid.figure


def saturation_figure(probes: pd.DataFrame):
    """Share of saturated sigmoid units / dead ReLU units at initialization, averaged over layers."""
    at_init = probes[(probes["step"] == 0) & probes["quantity"].isin(["saturated_frac", "dead_frac"])]
    per_cell = at_init.groupby(["cell", "model", "activation", "init", "norm"], as_index=False)["value"].mean()
    grid = sns.catplot(per_cell, kind="bar", x="init", y="value", order=_order(per_cell, "init"),
                       col="activation", col_order=_order(per_cell, "activation"), row="model",
                       row_order=_order(per_cell, "model"), errorbar=ACCURACY_INTERVAL, height=2.8, aspect=1.4,
                       **_hue(per_cell))
    grid.set_titles(template="{row_name}, {col_name}", size=9)
    grid.tick_params(axis="x", labelrotation=30)
    grid.set_axis_labels(_label("init"), "saturated / dead share")
    return grid.figure


def _rows(probes: pd.DataFrame, *quantities: str) -> pd.DataFrame:
    return probes[probes["quantity"].isin(quantities)]


def percentiles_figure(probes: pd.DataFrame):
    """Ioffe & Szegedy 2015, Figure 1(b, c): percentiles of one last-hidden-layer sigmoid input over training."""
    rows = _rows(probes, "p15", "p50", "p85")
    rows = rows[(rows["unit"] == 0) & (rows["seed"] == rows["seed"].min())]
    norms = _order(rows, "norm")
    grid = sns.relplot(rows, x="step", y="value", hue="quantity", hue_order=["p85", "p50", "p15"],
                       palette=sns.color_palette("crest", 3), col="norm", col_order=norms, kind="line", height=3.0,
                       aspect=1.4, facet_kws={"sharey": False})
    grid.legend.set_title("percentile")
    grid.set_titles(template="norm = {col_name}", size=9)
    grid.set_axis_labels("step", "sigmoid input")
    return grid.figure


def ics_figure(probes: pd.DataFrame):
    """Per-layer internal covariate shift (Santurkar et al. 2018), each cell's mean over its probed steps."""
    per_cell = _rows(probes, "ics_l2", "ics_cos").groupby(["cell", "norm", "seed", "layer_index", "quantity"],
                                                          as_index=False)["value"].mean()
    figure, (l2_axis, cos_axis) = plt.subplots(1, 2, figsize=(8.4, 3.0), constrained_layout=True)
    common = dict(x="layer_index", y="value", marker="o", **_hue(per_cell))
    sns.lineplot(per_cell[per_cell["quantity"] == "ics_l2"], ax=l2_axis, legend=False, **ON_LOG_AXIS, **common)
    sns.lineplot(per_cell[per_cell["quantity"] == "ics_cos"], ax=cos_axis, errorbar=bounded_t_interval(-1, 1),
                 **common)
    l2_axis.set_yscale("log")
    l2_axis.set_title("||G - G'|| (log scale; larger: more shift)", size=9)
    cos_axis.set_title("cos(G, G') (1: no shift)", size=9)
    for axis in (l2_axis, cos_axis):
        axis.set(xlabel=_label("layer_index"), ylabel="")
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    sns.move_legend(cos_axis, "upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    sns.despine(figure)
    return figure


def landscape_figure(probes: pd.DataFrame):
    """Loss range and effective beta-smoothness along the gradient over training (Santurkar et al. 2018, Fig. 4)."""
    rows = _rows(probes, "loss_range", "beta")
    grid = sns.relplot(rows, x="step", y="value", col="quantity", col_order=["loss_range", "beta"], kind="line",
                       marker="o", height=3.0, aspect=1.3, facet_kws={"sharey": False}, **ON_LOG_AXIS, **_hue(rows))
    grid.set(yscale="log")
    grid.axes_dict["loss_range"].set_title("loss range along the gradient", size=9)
    grid.axes_dict["beta"].set_title("effective beta-smoothness", size=9)
    grid.set_axis_labels("step", "")
    return grid.figure


def inference_figure(probes: pd.DataFrame):
    """Test accuracy of each trained BN model with running (EMA), precise-BN and per-batch statistics (C8)."""
    rows = _rows(probes, "acc_ema", "acc_precise", "acc_batch")
    rows = rows.assign(statistics=rows["quantity"].str.removeprefix("acc_"))
    grid = sns.catplot(rows, kind="point", x="bn_momentum", y="value", hue="statistics",
                       hue_order=list(MODE_PALETTE), palette=MODE_PALETTE, col="batch_size",
                       col_order=_order(rows, "batch_size"), linestyle="none", dodge=0.3, errorbar=ACCURACY_INTERVAL,
                       height=3.0, aspect=1.2)
    grid.set_titles(template="batch size = {col_name}", size=9)
    grid.set_axis_labels(_label("bn_momentum"), "test accuracy")
    return grid.figure


def generalization(cells: pd.DataFrame, probes: pd.DataFrame) -> pd.DataFrame:
    """The cells with their train accuracy (eval mode), test accuracy and gap (claims.generalization)."""
    return cells.join(claims.generalization(probes), on="cell", how="inner")


def generalization_figure(cells: pd.DataFrame, probes: pd.DataFrame):
    """Train minus test accuracy per norm and dropout (C9)."""
    cells = generalization(cells, probes)
    grid = sns.catplot(cells, kind="bar", x="dropout", y="gap", order=_order(cells, "dropout"),
                       errorbar=bounded_t_interval(-1, 1),
                       height=3.2, aspect=1.4, **_hue(cells))
    grid.set_axis_labels(_label("dropout"), "train - test accuracy")
    return grid.figure


def set_style() -> None:
    """One look for every figure of a page."""
    sns.set_theme(style="ticks", context="notebook")
