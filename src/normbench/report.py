"""The HTML report: claim verdicts, figures and tables drawn from the aggregated tables alone.

One self-contained page: figures are PNGs embedded as data URIs (and also
written as files, for `snakemake --report`), the tables sort with a few lines
of inline script, and nothing is fetched from the network. Each norm keeps one
colour across every figure.
"""

from __future__ import annotations

import base64
import io
import math
import os
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from normbench import claims  # noqa: E402
from normbench.captions import FIGURE_CAPTIONS  # noqa: E402
from normbench.config import choices  # noqa: E402
from normbench.html import environment  # noqa: E402
from normbench.plugins import is_plugin, short_name  # noqa: E402
from normbench.results import benchmark_rounds, read_json, write_atomic, write_json, write_table  # noqa: E402
from normbench.runs import RUN_RECORD, config_sha256, run_record  # noqa: E402

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
    """The cells with `column` blanked where they diverged: a diverged cell's accuracy or throughput is no
    measure of its norm, yet its settings keep their place on the axes (a study where every cell diverged
    still draws, empty)."""
    return cells.assign(**{column: cells[column].mask(cells["diverged"].astype(bool))})


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
    grid = sns.catplot(finished(cells, "train_samples_per_s"), kind="bar", x=x, y="train_samples_per_s",
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


def folding_table(probes: pd.DataFrame) -> dict:
    """BN folding per setting: the largest output difference and the inference speed-up, mean over seeds (C11)."""
    wide = probes.pivot_table(index=["batch_size", "bn_momentum", "seed"], columns="quantity", values="value")
    wide["speedup"] = wide["infer_s_unfolded"] / wide["infer_s_folded"]
    table = wide.groupby(level=["batch_size", "bn_momentum"]).agg(
        diff=("fold_rel_diff", "max"), unfolded=("infer_s_unfolded", "mean"), folded=("infer_s_folded", "mean"),
        speedup=("speedup", "mean"))
    return {"columns": ["batch size", "BN momentum", "largest output difference (relative)",
                        "unfolded inference (ms)", "folded inference (ms)", "unfolded / folded"],
            "rows": [[_format(b), _format(m), f"{row['diff']:.2g}", _format(row["unfolded"] * 1e3),
                      _format(row["folded"] * 1e3), _format(row["speedup"])] for (b, m), row in table.iterrows()]}


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


def generalization_table(cells: pd.DataFrame, probes: pd.DataFrame) -> dict:
    means = generalization(cells, probes).groupby(["norm", "dropout"])[["train_acc_eval", "test_acc_eval", "gap"]].mean()
    return {"columns": ["norm", "dropout", "train accuracy (eval mode)", "test accuracy", "gap"],
            "rows": [[norm, _format(dropout), *map(_format, row)] for (norm, dropout), row in means.iterrows()]}


def drift_table(probes: pd.DataFrame, cells: pd.DataFrame) -> dict:
    """C1's drift per norm: each percentile's travel over training in widths of the distribution."""
    drift = cells.join(claims.percentile_drift(probes).rename("drift"), on="cell", how="inner")
    by_norm = drift.groupby("norm")["drift"]
    return {"columns": ["norm", "drift (mean over seeds)", "per seed"],
            "rows": [[norm, _format(values.mean()), ", ".join(_format(v) for v in values)]
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
    rates = finished(cells, "train_samples_per_s").groupby([*keys, "norm"])["train_samples_per_s"].mean()
    # With norm as the only axis there is one setting: a one-row table.
    rates = (rates.unstack("norm") if keys else rates.to_frame("every cell").T).reindex(columns=norms)
    ratios = rates.rdiv(rates["bn"], axis=0)
    return {"index": [_label(k) for k in keys] or ["setting"], "columns": norms,
            "rows": [{"key": [_format(k) for k in (key if isinstance(key, tuple) else (key,))],
                      "values": [_format(v) for v in row]} for key, row in ratios.iterrows()]}


def learning_rate_table(cells: pd.DataFrame, curves: pd.DataFrame, thresholds: dict) -> dict:
    """Per norm: the stable learning-rate range (C3) and steps/seconds to the target accuracy at its best lr (C13)."""
    stable_acc, target_acc = thresholds.get("stable_acc", 0.0), thresholds.get("target_acc")
    columns = ["norm", f"stable lr range (no divergence, final acc >= {stable_acc:g} in every seed)", "decades",
               "best lr", "final acc at best lr"]
    if target_acc is not None:
        columns += [f"steps to {target_acc:g} test acc", f"seconds to {target_acc:g}"]
    rows = []
    for norm in _order(cells, "norm"):
        norm_cells = cells[cells["norm"] == norm]
        stable, lr = claims.stable_lrs(norm_cells, stable_acc), claims.best_lr(norm_cells)
        row = [norm, f"{stable[0]:g} to {stable[-1]:g}" if stable else "none",
               _format(math.log10(stable[-1] / stable[0])) if stable else "", _format(lr),
               _format(claims.accuracy(norm_cells[norm_cells["lr"] == lr]).mean())]
        if target_acc is not None:
            first = claims.first_reach(curves[(curves["norm"] == norm) & (curves["lr"] == lr)], target_acc)
            seeds = norm_cells["seed"].nunique()
            reached_by = "" if len(first) == seeds else f" ({len(first)} of {seeds} seeds)"
            row += [_format(first["step"].mean()) + reached_by if len(first) else "not reached",
                    _format(first["elapsed_s"].mean()) if len(first) else ""]
        rows.append(row)
    return {"columns": columns, "rows": rows}


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


def describe_model(settings: dict) -> str:
    """The model in a few words, e.g. "resnet, depth 8, width 8"."""
    depth = f", depth {settings['depth']}" if settings.get("depth") else ""
    return f"{settings['model']}{depth}, width {settings['width']}"


def memory_format(cells: pd.DataFrame) -> str:
    """The study's memory format, said because channels_last speeds some norms more than others (README, Speed)."""
    if "channels_last" in cells and cells["channels_last"].astype(bool).any():
        return "channels_last (NHWC): it speeds some norms more than others, so step times here compare norms in it"
    return "contiguous (NCHW)"


def setup(spec: dict, cells: pd.DataFrame) -> list[tuple[str, str]]:
    """A study's fixed setup, as its section's box shows it: what every cell shares."""
    first = cells.iloc[0]

    def shared(column: str) -> str:
        values = sorted({_format(v) for v in cells[column]}) if column in cells else []
        return " or ".join(values)

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
    steps = " or ".join(sorted({_format(v) for v in cells["total_steps"]}))
    return f"{describe_model(cells.iloc[0])}, {steps} steps"


def reference(spec: dict, cells: pd.DataFrame) -> dict | None:
    """The study's reference cells and whether they learned enough for its other cells to mean something."""
    chosen = spec.get("report", {}).get("reference")
    if not chosen:
        return None
    bar = spec.get("report", {}).get("reference_acc", 0.85)
    described = {"cells": ", ".join(f"{key} {value}" for key, value in chosen.items()), "bar": _format(bar)}
    picked = cells[np.logical_and.reduce([cells[key] == value for key, value in chosen.items()])]
    if picked.empty:
        return {**described, "accuracy": "not in this run", "seeds": 0, "reached": False}
    estimate = claims.mean_interval(claims.accuracy(picked), len(picked))
    return {**described, "accuracy": claims.format_estimate(estimate), "seeds": estimate.samples,
            "reached": bool(estimate.value >= bar)}


def study_section(name: str, spec: dict, cells: pd.DataFrame, curves: pd.DataFrame, probes: pd.DataFrame,
                  report_dir: Path, figures_dir: Path) -> dict:
    if "ghost_batch" in cells:  # per-worker BN as ghost batches: the images behind each statistic
        cells = cells.assign(statistics_batch=claims.statistics_batch(cells))
        curves = curves.assign(statistics_batch=claims.statistics_batch(curves)) if "ghost_batch" in curves else curves
    x, facets = study_axes(cells)
    seeds = cells["seed"].nunique()
    section = {"name": name, "description": spec.get("description", ""), "axes": claims.varying_settings(cells),
               "cells": len(cells), "seeds": seeds, "figures": [], "tables": [], "setup": setup(spec, cells),
               "reference": reference(spec, cells)}

    def add(kind: str, title: str, figure) -> None:
        counted = f" Intervals over {seeds} seed{'s' if seeds != 1 else ''}" + \
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
            percentiles_figure(probes))
        section["tables"].append({"title": "Drift of the percentiles (C1)", **drift_table(probes, cells)})
    if "ics_l2" in quantities:
        add("ics", "Internal covariate shift per layer", ics_figure(probes))
        add("landscape", "Loss landscape along the gradient", landscape_figure(probes))
    if "acc_ema" in quantities:
        add("inference", "Accuracy with running, precise and per-batch BN statistics", inference_figure(probes))
        section["tables"].append({"title": "BN folded into the conv before it (C11)", **folding_table(probes)})
    if "train_acc_eval" in quantities:
        add("generalization", "Train - test accuracy gap", generalization_figure(cells, probes))
        section["tables"].append({"title": "Train and test accuracy (C9)", **generalization_table(cells, probes)})
    add("throughput", "Training throughput", throughput_figure(cells, x_or_norm, facets))
    if x == "lr":
        section["tables"].append({"title": "Learning-rate range and speed to target",
                                  **learning_rate_table(cells, curves, spec.get("report", {}))})
    section["step_time"] = step_time_ratios(cells, [a for a in [x, *facets] if a is not None])
    shown = ["cell", *section["axes"], *TABLE_COLUMNS[1:]]
    section["columns"] = [c for c in dict.fromkeys(shown) if c in cells]
    section["runs_dir"] = os.path.commonpath([os.path.abspath(folder) for folder in cells["cell_dir"]])
    section["rows"] = [
        {"values": [_format(row[c]) for c in section["columns"]], "folder": os.path.relpath(row["cell_dir"], report_dir)}
        for _, row in cells.sort_values("cell").iterrows()
    ]
    return section


def shown(table: pd.DataFrame) -> pd.DataFrame:
    """The table with plugged-in norms and models by their short names: a path would swamp every label."""
    return table.assign(**{column: table[column].map(lambda name: short_name(name) if is_plugin(name) else name)
                           for column in ("norm", "model") if column in table})


def leaderboard(by_study: dict[str, claims.Tables], studies: dict[str, dict]) -> dict | None:
    """Every norm of the run, built in or plugged in, per study: final accuracy over seeds with its interval, the
    mean first step at the study's target accuracy (where it sets one), step time relative to BN in the same study
    (on the same device: one study's cells share it), and diverged cells. "How does my norm compare?" on one
    screen; the report's tables sort by any column."""
    rows = []
    for study, tables_ in by_study.items():
        cells = tables_.cells
        if study == "benchmarks" or cells["norm"].nunique() < 2:
            continue
        target = studies.get(study, {}).get("report", {}).get("target_acc")
        finished_rate = finished(cells, "train_samples_per_s").groupby("norm")["train_samples_per_s"].mean()
        for norm in _order(cells, "norm"):
            mine = cells[cells["norm"] == norm]
            per_seed = claims.accuracy(mine).groupby(mine["seed"]).mean()
            reached = claims.first_reach(tables_.curves[tables_.curves["norm"] == norm], target) \
                if target and "norm" in tables_.curves else None
            relative = finished_rate.get("bn", math.nan) / finished_rate.get(norm, math.nan)
            rows.append([study, norm, claims.format_estimate(claims.mean_interval(per_seed, len(mine))),
                         _format(reached["step"].mean()) if reached is not None and len(reached) else
                         ("never" if target else ""),
                         _format(relative) if "bn" in finished_rate and not math.isnan(relative) else "",
                         f"{int(mine['diverged'].astype(bool).sum())} of {len(mine)}"])
    if not rows:
        return None
    return {"columns": ["study", "norm", "final test accuracy [95% CI]", "steps to target", "step time / BN's",
                        "diverged"], "rows": rows}


def _format(value) -> str:
    if isinstance(value, float):
        return "" if pd.isna(value) else f"{value:.4g}"
    return str(value)


def decidability(verdict: claims.Verdict) -> str:
    """What decides the claim, in words: the test behind a decided verdict, or the effect the run could detect and
    the seeds the observed one needs (a range: a spread from few seeds is itself uncertain)."""
    estimate = verdict.estimate
    if estimate is None or math.isnan(verdict.detectable_effect):
        return ""
    unit = estimate.sample_unit
    scale = " (log scale)" if estimate.scale == "log" else ""
    detect = f"detects {verdict.detectable_effect:.2g}{scale} from the bar with {estimate.samples} {unit} at 80% power"
    if verdict.verdict != "inconclusive":
        family = {True: "holds", False: "does not hold", None: "not tested"}[verdict.holds_family_wise]
        p = f"p = {verdict.p_value:.2g} against the bar, {family} family-wise (Holm)" if not math.isnan(
            verdict.p_value) else ""
        return claims.join_notes(f"decided with {estimate.samples} {unit}", p, detect)
    low, point, high = verdict.seeds_needed
    if math.isnan(point):
        return detect
    if math.isinf(point):
        return f"{detect}; the effect sits on the bar: no number of {unit} decides it"
    span = "" if low == high else f" ({low:.0f}–{'∞' if math.isinf(high) else f'{high:.0f}'} over the spread's " \
                                  f"95% range)"
    return f"{detect}; decidable with ≈ {point:.0f} {unit}{span} at the observed effect"


def family_wise(verdicts: list[claims.Verdict]) -> str:
    """"n of m decided verdicts hold family-wise (Holm, 5%)" for the claims header."""
    tested = [v.holds_family_wise for v in verdicts if v.holds_family_wise is not None]
    if not tested:
        return "no verdict was decided by a test, so none is corrected for the family"
    return (f"{sum(tested)} of {len(tested)} decided verdicts hold family-wise (Holm's correction over the "
            f"{len(tested)} claims decided in this run, 5% family-wise error)")


def claim_rows(verdicts: list[claims.Verdict], scales: dict[str, str] | None = None) -> list[dict]:
    """The claims table: one row per claim, with its verdict, effect and interval, and what it rests on. Each claim
    restates a published finding; where the run does not support it, the row says at what scale it was tried."""
    rows = []
    for verdict in verdicts:
        note = verdict.note
        if verdict.verdict in ("refuted", "inconclusive") and verdict.study in (scales or {}):
            note = claims.join_notes(f"not reproduced at this scale: {scales[verdict.study]}", note)
        estimate = verdict.estimate
        effect = claims.format_estimate(estimate) if estimate is not None else ""
        rows.append({
            "id": verdict.claim.id, "statement": verdict.claim.statement, "anchor": verdict.claim.anchor,
            "verdict": verdict.verdict, "effect": effect, "measures": verdict.claim.effect, "rule": verdict.claim.bar,
            "evidence": f"{estimate.samples} {estimate.sample_unit}, {estimate.cells} {estimate.cell_unit}"
            if estimate else "",
            "note": note, "power": decidability(verdict), "study": verdict.study or "",
            "anchor_id": ("benchmarks" if verdict.study == "benchmarks" else f"study-{verdict.study}")
            if verdict.study else "",
        })
    return rows


def claims_table(verdicts: list[claims.Verdict]) -> pd.DataFrame:
    """The verdicts as a tidy table (claims.csv)."""
    return pd.DataFrame([{
        "claim": v.claim.id, "statement": v.claim.statement, "study": v.study, "verdict": v.verdict,
        "effect": v.claim.effect, "rule": v.claim.bar, "threshold": v.claim.threshold,
        **({"estimate": v.estimate.value, "ci_low": v.estimate.low, "ci_high": v.estimate.high,
            "scale": v.estimate.scale, "samples": v.estimate.samples, "sample_unit": v.estimate.sample_unit,
            "censored_samples": v.estimate.censored, "cells": v.estimate.cells,
            "p_value": v.p_value, "holds_family_wise": v.holds_family_wise,
            "detectable_effect": v.detectable_effect, "seeds_needed_low": v.seeds_needed[0],
            "seeds_needed": v.seeds_needed[1], "seeds_needed_high": v.seeds_needed[2]}
           if v.estimate else {}),
        "note": v.note,
    } for v in verdicts])


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
            rows.append([device, layout, case["shape"].iloc[0], dtype, norm, _format(times.median() * 1e6), relative,
                         str(len(times))])
    return {"columns": ["device", "layout", "shape", "dtype", "norm", "median time (µs)", "time / BN's [95% CI]",
                        "rounds (all repeats)"],
            "rows": rows, "measured_on": benchmark_machine(rounds)}


def benchmark_machine(rounds: pd.DataFrame) -> str:
    machines = rounds[["device", "threads"]].drop_duplicates()
    return "; ".join(f"{device}, {threads} CPU threads" for device, threads in machines.itertuples(index=False))


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


def numerics_table(numerics: pd.DataFrame) -> dict | None:
    """Max absolute output error against float64: one row per norm and mean offset, one column per dtype."""
    if numerics.empty:
        return None
    wide = numerics.pivot_table(index=["norm", "mean_offset"], columns="dtype", values="max_abs_error", sort=False)
    devices = sorted(numerics["device"].dropna().unique()) if "device" in numerics else []
    return {"device": ", ".join(devices) or "not recorded", "columns": ["norm", "input mean offset", *wide.columns],
            "rows": [[norm, _format(offset), *map(_format, row)] for (norm, offset), row in wide.iterrows()]}


def _read(path: Path) -> pd.DataFrame:
    """A table that may be empty (no probes recorded, say)."""
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=["study"])


def render_report(tables: Path, config: dict, out: Path, figures_dir: Path, bench: Path | None = None,
                  invocation: Path | None = None) -> None:
    """Write the report for the workflow `config` from the tables in `tables` and the micro-benchmarks in
    `bench`: reports/report.html, its figures as files under `figures_dir`, claims.csv beside the page, and the
    run's record (run.json) beside the tables' folder.

    `invocation` is the workflow run's record (its start time and command line): cells trained since
    that start are marked as trained in this run, the others as reused.
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
    sns.set_theme(style="ticks", context="notebook")
    # Sections in the config's order (studies of earlier runs that the config no longer names, last).
    order = {study: index for index, study in enumerate(studies)}
    by_study = {study: claims.Tables(study_cells, curves[curves["study"] == study], probes[probes["study"] == study])
                for study, study_cells in sorted(cells.groupby("study", sort=False),
                                                 key=lambda item: order.get(item[0], len(order)))}
    if not rounds.empty:
        by_study["benchmarks"] = claims.Tables(bench=rounds)
    verdicts = claims.evaluate(claims.claim_sections(config), by_study)  # on the full plugin references
    write_table(claims_table(verdicts), out.parent / "claims.csv")
    write_json(tables.parent / RUN_RECORD, run_record(config, cells, run.get("started"), run.get("command")))
    by_study = {study: claims.Tables(*(shown(table) for table in (tables_.cells, tables_.curves, tables_.probes)),
                                     tables_.bench) for study, tables_ in by_study.items()}
    sections = [
        study_section(study, studies.get(study, {}), tables_.cells, tables_.curves, tables_.probes,
                      out.parent.resolve(), figures_dir)
        for study, tables_ in by_study.items() if study != "benchmarks"
    ]
    template = environment().get_template("report.html")
    how = origin.value_counts()
    details = {
        **provenance(cells),
        "config sha256": config_sha256(config)[:16],
        "command of this run": run.get("command", "not recorded (report rendered outside a workflow run)"),
        "reproduce with": "make reproduce (or a bare snakemake in the checkout, after make setup)",
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
                           numerics=numerics_table(numerics), benchmarks=benchmark_table(rounds),
                           benchmarks_description=config.get("benchmarks", {}).get("description", ""),
                           generated=pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"))
    write_atomic(out, lambda f: f.write(html))
