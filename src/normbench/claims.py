"""The common claims about normalization that normbench tests, as computations, and their verdicts.

Each claim names the study kind it reads, a measure (a function from that
study's tables to one effect per seed, or per benchmark repeat) and its rule
and threshold, fixed before any run (docs/claims.md, "Thresholds"): every
config is judged by the same bar, and a config only says which study measures
which claim. The effect's 95% t-interval over seeds is compared with the
threshold, so every verdict is computed from runs: `supported` when the whole
interval satisfies the rule, `refuted` when none of it does, `inconclusive`
when it straddles the threshold (or when one seed gives no interval), `not run`
when no study declares the claim. Beside each verdict: the effect the run
could detect at its seeds and spread, and the seeds that would decide it.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from normbench.config import SETTING_NAMES, Settings, SettingsError

CONFIDENCE = 0.95
POWER = 0.8  # of the t-test behind "detectable effect" and "seeds needed"
MIN_SAMPLES = 3  # the fewest seeds "seeds needed" proposes
CHANCE_ACCURACY = 0.1  # ten classes: what a diverged image classifier is worth
BADLY_SCALED_INITS = ("normal-0.01", "normal-1")
RULES = {
    "above": "effect > {threshold:g}",
    "below": "effect < {threshold:g}",
    "within": "|effect| < {threshold:g}",
}


@dataclass(frozen=True)
class Tables:
    """One study's rows of the aggregated tables (bench: the micro-benchmark rounds)."""

    cells: pd.DataFrame = field(default_factory=pd.DataFrame)
    curves: pd.DataFrame = field(default_factory=pd.DataFrame)
    probes: pd.DataFrame = field(default_factory=pd.DataFrame)
    bench: pd.DataFrame = field(default_factory=pd.DataFrame)


@dataclass(frozen=True)
class Estimate:
    """An effect with its 95% interval and what it rests on (`samples` seeds or rounds, `cells` runs)."""

    value: float
    low: float
    high: float
    samples: int
    sample_unit: str
    cells: int
    note: str = ""
    lower_bound: bool = False  # some samples were censored upward: the effect is at least this
    cell_unit: str = "cells"  # what `cells` counts: training runs, or benchmark cases
    spread: float = math.nan  # sample standard deviation of the per-sample effects
    fails: str = ""  # a precondition of the claim that the run broke (the verdict is then refuted), e.g. unequal outputs
    conditions: tuple[tuple[str, "Estimate"], ...] = ()  # the same effect per condition the overall one averages


@dataclass(frozen=True)
class Claim:
    id: str
    statement: str
    anchor: str
    experiment: str  # the study (or benchmarks) that measures it
    effect: str  # what the effect is, with its unit
    rule: str  # above, below or within: see RULES
    threshold: float  # docs/claims.md's value, fixed before any run
    measure: Callable[[Tables, dict], Estimate]
    needs: dict[str, tuple] = field(default_factory=dict)  # axis -> values the study's cells must include
    report_keys: tuple[str, ...] = ()  # keys the study's `report` section must set
    probes: tuple[str, ...] = ()  # probes the study's cells must record

    @property
    def bar(self) -> str:
        return RULES[self.rule].format(threshold=self.threshold)


@dataclass(frozen=True)
class Verdict:
    claim: Claim
    verdict: str
    study: str | None = None
    estimate: Estimate | None = None
    note: str = ""
    detectable_effect: float = math.nan  # distance from the threshold the run detects with 80% power
    seeds_needed: float = math.nan  # seeds that would decide the claim at the observed effect and spread


# -- shared measurements (the report's tables use them too) -------------------------------------------------


def accuracy(cells: pd.DataFrame) -> pd.Series:
    """Final test accuracy, with a diverged cell counted at chance: it ends predicting nothing useful."""
    return cells["final_test_acc"].where(~cells["diverged"].astype(bool), CHANCE_ACCURACY).fillna(CHANCE_ACCURACY)


def stable_lrs(cells: pd.DataFrame, stable_acc: float) -> list[float]:
    """Learning rates at which no cell diverged and every cell ended at least `stable_acc` accurate."""
    stable = (~cells["diverged"].astype(bool) & (cells["final_test_acc"] >= stable_acc)).groupby(cells["lr"]).all()
    return sorted(stable[stable].index)


def best_lr(cells: pd.DataFrame) -> float:
    """The learning rate with the highest mean accuracy over seeds."""
    return cells.assign(acc=accuracy(cells)).groupby("lr")["acc"].mean().idxmax()


def first_reach(curves: pd.DataFrame, target_acc: float) -> pd.DataFrame:
    """Per seed, the first evaluation whose test accuracy reaches `target_acc`: its step and
    elapsed_s (seeds that never reach it are absent)."""
    reached = curves[curves["test_acc"] >= target_acc].sort_values("step").groupby("seed").first()
    return reached[["step", "elapsed_s"]]


def varying_settings(cells: pd.DataFrame) -> list[str]:
    """Settings that take more than one value among a study's cells: its grid axes."""
    return [name for name in SETTING_NAMES if name in cells and cells[name].nunique(dropna=False) > 1]


def _paired(cells: pd.DataFrame, value: pd.Series, axis: str, a, b,
            combine: Callable[[pd.Series, pd.Series], pd.Series] = operator.sub) -> pd.Series:
    """combine(value(a), value(b)), a difference unless told otherwise, for cells alike in every other setting,
    averaged per seed."""
    keys = [c for c in dict.fromkeys([*varying_settings(cells), "seed"]) if c != axis]
    wide = cells.assign(_value=value).pivot_table(index=keys, columns=axis, values="_value").reindex(columns=[a, b])
    return combine(wide[a], wide[b]).groupby(level="seed").mean()  # a side without cells: no seed gives a value


# -- intervals ---------------------------------------------------------------------------------------------


def mean_interval(effects: pd.Series, cells: int, note: str = "", lower_bound: bool = False, unit: str = "seeds",
                  cell_unit: str = "cells") -> Estimate:
    """Mean effect over independent samples (seeds, or benchmark repeats) with a Student t 95% interval (none
    from fewer than two)."""
    effects = effects.dropna()
    n = len(effects)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, unit, cells, join_notes(note, f"no {unit[:-1]} gave a value"),
                        cell_unit=cell_unit)
    mean = float(effects.mean())
    if n == 1:
        return Estimate(mean, math.nan, math.nan, 1, unit, cells, join_notes(note, f"one {unit[:-1]}: no interval"),
                        lower_bound, cell_unit)
    from scipy import stats  # here, not at the top: the workflow imports this module while it plans

    sem = float(stats.sem(effects))
    low, high = (mean, mean) if sem == 0 else stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=sem)
    return Estimate(mean, float(low), float(high), n, unit, cells, note, lower_bound, cell_unit,
                    float(effects.std(ddof=1)))


def join_notes(*notes: str) -> str:
    """Notes in one sentence list, empty ones left out."""
    return "; ".join(note for note in notes if note)


def margin(estimate: Estimate, rule: str, threshold: float) -> float:
    """How far the effect lies from deciding its rule: from the threshold, or for `within` from the nearer bound."""
    if rule == "within":
        return threshold - abs(estimate.value)
    return estimate.value - threshold


def power_analysis(estimate: Estimate, rule: str, threshold: float) -> tuple[float, float]:
    """(detectable effect, seeds needed) of a two-sided one-sample t-test at 5% and POWER (statsmodels'
    TTestPower): the distance from the threshold the run's samples detect given their spread, and the samples
    that would detect the observed distance. NaN where the run gives no spread."""
    if estimate.samples < 2 or math.isnan(estimate.spread):
        return math.nan, math.nan
    from statsmodels.stats.power import TTestPower

    power = TTestPower()
    detectable = power.solve_power(nobs=estimate.samples, alpha=1 - CONFIDENCE, power=POWER) * estimate.spread
    distance = abs(margin(estimate, rule, threshold))
    if estimate.spread == 0:
        return float(detectable), float(MIN_SAMPLES) if distance > 0 else math.inf
    if distance == 0:
        return float(detectable), math.inf
    effect_size = distance / estimate.spread
    # Three samples is the floor: below it the t-interval is too wide to use (and the solver too unstable).
    if effect_size >= power.solve_power(nobs=MIN_SAMPLES, alpha=1 - CONFIDENCE, power=POWER):
        return float(detectable), float(MIN_SAMPLES)
    needed = power.solve_power(effect_size=effect_size, alpha=1 - CONFIDENCE, power=POWER)
    return float(detectable), float(math.ceil(needed))


def time_ratio(rounds: pd.DataFrame, norm: str, reference: str) -> pd.Series:
    """Per benchmark repeat (one process each), the norm's median time over the reference's: medians are robust
    to a round that another process interrupted, and repeats are independent where rounds are not."""
    medians = rounds.groupby(["repeat", "norm"])["time_s"].median().unstack("norm")
    return medians[norm] / medians[reference]


def format_estimate(estimate: Estimate) -> str:
    """"0.12 [0.05, 0.19]", "≥ 1.3 [...]" for a lower bound, or the value alone without an interval."""
    if math.isnan(estimate.value):
        return ""
    interval = "" if math.isnan(estimate.low) else f" [{estimate.low:.3g}, {estimate.high:.3g}]"
    return f"{'≥ ' if estimate.lower_bound else ''}{estimate.value:.3g}{interval}"


def decide(estimate: Estimate, rule: str, threshold: float) -> str:
    """supported / refuted / inconclusive from where the interval lies against the threshold."""
    low, high = estimate.low, estimate.high
    if estimate.fails:
        return "refuted"
    if math.isnan(low) or math.isnan(high):
        return "inconclusive"
    if rule == "above":
        below = high < threshold and not estimate.lower_bound  # a lower bound cannot show the effect is small
        return "supported" if low > threshold else "refuted" if below else "inconclusive"
    if rule == "below":
        return "supported" if high < threshold else "refuted" if low > threshold else "inconclusive"
    if rule == "within":
        inside = -threshold < low and high < threshold
        return "supported" if inside else "refuted" if low > threshold or high < -threshold else "inconclusive"
    raise ValueError(f"unknown rule {rule!r}; known rules: {', '.join(RULES)}")


# -- the measures ------------------------------------------------------------------------------------------


def _fewer_steps_with_bn(tables: Tables, spec: dict) -> Estimate:
    cells, curves = tables.cells, tables.curves
    target, seeds = spec["report"]["target_acc"], sorted(cells["seed"].unique())
    steps = {}
    for norm in ("bn", "none"):
        lr = best_lr(cells[cells["norm"] == norm])
        steps[norm] = first_reach(curves[(curves["norm"] == norm) & (curves["lr"] == lr)], target)["step"].reindex(seeds)
    # A run without a norm that never reaches the target (a diverged one included) counts the study's whole step
    # budget: the ratio is then a lower bound.
    censored = steps["none"].isna() & steps["bn"].notna()
    ratio = steps["none"].fillna(curves["step"].max()) / steps["bn"]
    note = f"lower bound: {censored.sum()} seed(s) without a norm never reached {target:g}" if censored.any() else ""
    return mean_interval(ratio, len(cells), note, lower_bound=bool(censored.any()))


def _larger_stable_lr_with_bn(tables: Tables, spec: dict) -> Estimate:
    cells, stable_acc = tables.cells, spec.get("report", {}).get("stable_acc", 0.0)
    largest = {norm: pd.Series({seed: max(stable_lrs(seed_cells, stable_acc), default=np.nan)
                                for seed, seed_cells in cells[cells["norm"] == norm].groupby("seed")})
               for norm in ("bn", "none")}
    # Stable at no lr without a norm: its largest stable lr lies below the smallest one tried, so measuring
    # against that smallest lr gives a lower bound.
    censored = largest["none"].isna() & largest["bn"].notna()
    effects = np.log10(largest["bn"] / largest["none"].fillna(cells["lr"].min()))
    notes = [f"lower bound: {censored.sum()} seed(s) stable at no lr without a norm" if censored.any() else "",
             "a seed with no stable lr with BN is left out" if effects.isna().any() else ""]
    return mean_interval(effects, len(cells), join_notes(*notes), lower_bound=bool(censored.any()))


def by_condition(cells: pd.DataFrame, axes: list[str], measure: Callable[[pd.DataFrame], Estimate]) -> tuple:
    """The measure on each combination of `axes` alone: where conditions disagree, one mean hides a failure."""
    axes = [axis for axis in axes if axis in cells and cells[axis].nunique() > 1]
    if not axes:
        return ()
    return tuple((", ".join(f"{a} {v}" for a, v in zip(axes, key if isinstance(key, tuple) else (key,))),
                  measure(group)) for key, group in cells.groupby(axes))


def _init_robustness_with_bn(tables: Tables, spec: dict) -> Estimate:
    cells = tables.cells[tables.cells["init"].isin(BADLY_SCALED_INITS)]

    def measure(cells: pd.DataFrame) -> Estimate:
        return mean_interval(_paired(cells, accuracy(cells), "norm", "bn", "none"), len(cells))

    return dataclasses.replace(measure(cells), conditions=by_condition(cells, ["activation", "init"], measure))


def _balanced_gradients_with_bn(tables: Tables, spec: dict) -> Estimate:
    probes = tables.probes
    at_init = probes[(probes["step"] == 0) & (probes["quantity"] == "grad_norm") & (probes["activation"] == "sigmoid")]
    ends = at_init.sort_values("layer_index").groupby("cell")["value"].agg(["first", "last"])
    distance = np.log10(ends["first"] / ends["last"]).abs().rename("decades")  # 0: first and last layer alike
    cells = tables.cells[tables.cells["activation"] == "sigmoid"].set_index("cell")
    cells = cells.join(distance, how="inner").reset_index()
    return mean_interval(_paired(cells, cells["decades"], "norm", "none", "bn"), len(cells))


def statistics_batch(cells: pd.DataFrame) -> pd.Series:
    """The images each BatchNorm statistic is computed over: the ghost batch (the per-worker batch that BN on
    several workers would see), else the per-worker batch."""
    ghost = cells["ghost_batch"] if "ghost_batch" in cells else pd.Series(np.nan, index=cells.index)
    return ghost.fillna(cells["batch_size"])


def _bn_gap_at_small_batch(tables: Tables, spec: dict) -> Estimate:
    cells = tables.cells.assign(statistics_batch=statistics_batch(tables.cells), acc=accuracy(tables.cells))
    bn = cells[cells["norm"].isin(["bn", "ghostbn"])]
    smallest = bn[bn["statistics_batch"] == bn["statistics_batch"].min()]
    joined = smallest.merge(cells[cells["norm"] == "gn"], on=["batch_size", "seed"], suffixes=("_bn", "_gn"))
    effects = (joined["acc_gn"] - joined["acc_bn"]).groupby(joined["seed"]).mean()
    note = f"BN statistics over {smallest['statistics_batch'].min():g} images" if len(smallest) else "no BN cells"
    return mean_interval(effects, len(smallest) + int((cells["norm"] == "gn").sum()), note)


def _brn_beats_bn_at_small_batch(tables: Tables, spec: dict) -> Estimate:
    """Batch Renorm minus BN with statistics over the same, smallest number of images, paired by seed."""
    cells = tables.cells.assign(statistics_batch=statistics_batch(tables.cells), acc=accuracy(tables.cells))
    bn = cells[cells["norm"].isin(["bn", "ghostbn"])]
    smallest = bn[bn["statistics_batch"] == bn["statistics_batch"].min()]
    brn = cells[cells["norm"] == "brn"]
    joined = brn.merge(smallest, on=["batch_size", "statistics_batch", "seed"], suffixes=("_brn", "_bn"))
    effects = (joined["acc_brn"] - joined["acc_bn"]).groupby(joined["seed"]).mean()
    note = (f"statistics over {joined['statistics_batch'].min():g} images" if len(joined)
            else "no BRN cell with statistics over BN's smallest batch")
    return mean_interval(effects, len(joined) * 2, note)


def _gn_ws_small_matches_bn_large(tables: Tables, spec: dict) -> Estimate:
    """GN+WS minus BN with statistics over its largest batch (at least 32 images), paired by seed. GN+WS keeps no
    batch statistic, so at optimizer batch B it trains exactly as on B/2 workers of 2 (Qiao et al.'s micro-batch)."""
    cells = tables.cells.assign(statistics_batch=statistics_batch(tables.cells), acc=accuracy(tables.cells))
    bn = cells[(cells["norm"] == "bn") & (cells["statistics_batch"] >= 32)]
    largest = bn[bn["statistics_batch"] == bn["statistics_batch"].max()]
    gn_ws = cells[cells["norm"] == "gn+ws"]
    joined = gn_ws.merge(largest, on="seed", suffixes=("_ws", "_bn"))
    effects = (joined["acc_ws"] - joined["acc_bn"]).groupby(joined["seed"]).mean()
    note = (f"BN over {largest['statistics_batch'].max():g} images; GN+WS batch-independent (per-worker 2 = "
            f"{gn_ws['batch_size'].max():g} / 2 workers)" if len(joined) else "no BN cell over 32 images or more")
    return mean_interval(effects, len(gn_ws) + len(largest), note)


def _syncbn_matches_global_bn(tables: Tables, spec: dict) -> Estimate:
    cells = tables.cells.assign(global_batch=tables.cells["batch_size"] * tables.cells["world_size"])
    sync = cells[(cells["norm"] == "syncbn") & (cells["world_size"] == cells["world_size"].max())]
    single = cells[(cells["norm"] == "bn") & (cells["world_size"] == 1)]
    joined = sync.assign(acc=accuracy(sync)).merge(single.assign(acc=accuracy(single)), on=["global_batch", "seed"],
                                                   suffixes=("_sync", "_single"))
    effects = (joined["acc_sync"] - joined["acc_single"]).groupby(joined["seed"]).mean()
    return mean_interval(effects, len(sync) + len(single))


def _ln_against(other: str) -> Callable[[Tables, dict], Estimate]:
    """The transformer study's measure of LN against `other` (bn for C10, dyt for C14): final accuracy of LN minus
    the other's, paired by seed, and apart for each placement and warm-up where they differ."""
    def measure_claim(tables: Tables, spec: dict) -> Estimate:
        cells = tables.cells[tables.cells["norm"].isin(["ln", other])]

        def measure(cells: pd.DataFrame) -> Estimate:
            return mean_interval(_paired(cells, accuracy(cells), "norm", "ln", other), len(cells))

        return dataclasses.replace(measure(cells), conditions=by_condition(cells, ["norm_placement", "warmup_steps"],
                                                                           measure))

    return measure_claim


def _gn_ln_slower_than_bn(tables: Tables, spec: dict) -> Estimate:
    bench = tables.bench
    rounds = bench[(bench["layout"] == "channels") & (bench["dtype"] == "fp32")]
    effects = (time_ratio(rounds, "gn", "bn") + time_ratio(rounds, "ln", "bn")) / 2
    rms = mean_interval(time_ratio(rounds, "rms", "ln"), 2, unit="repeats") if "rms" in set(rounds["norm"]) else None
    notes = [f"measured on {', '.join(sorted(set(rounds['device'])))}",
             f"RMSNorm over LN's time: {rms.value:.2f} [{rms.low:.2f}, {rms.high:.2f}]" if rms else ""]
    return mean_interval(effects, 3, join_notes(*notes), unit="repeats", cell_unit="cases")


def per_cell(probes: pd.DataFrame, quantity: str) -> pd.Series:
    """A probe quantity's mean per cell (over its probed steps and layers)."""
    return probes[probes["quantity"] == quantity].groupby("cell")["value"].mean()


def _with(cells: pd.DataFrame, values: pd.Series, name: str) -> pd.DataFrame:
    """The cells with one more column from a per-cell series (cells without a value dropped)."""
    return cells.join(values.rename(name), on="cell", how="inner")


def percentile_drift(probes: pd.DataFrame) -> pd.Series:
    """Per cell, how far the 15th, 50th and 85th percentiles of the watched inputs travel over training (each one's
    range over the recorded steps, averaged over the three) in units of the distribution's mean width
    (85th minus 15th percentile), averaged over the watched units. 0: a distribution that never moves."""
    rows = probes[probes["quantity"].isin(["p15", "p50", "p85"])]
    wide = rows.pivot_table(index=["cell", "unit", "step"], columns="quantity", values="value")
    by_unit = wide.groupby(level=["cell", "unit"])
    travel = (by_unit.max() - by_unit.min()).mean(axis=1)
    width = (wide["p85"] - wide["p15"]).groupby(level=["cell", "unit"]).mean()
    return (travel / width).groupby(level="cell").mean()


def _drift_without_bn(tables: Tables, spec: dict) -> Estimate:
    cells = _with(tables.cells, percentile_drift(tables.probes), "drift")
    return mean_interval(_paired(cells, cells["drift"], "norm", "none", "bn", operator.truediv), len(cells))


def _ics_with_bn(tables: Tables, spec: dict) -> Estimate:
    ics = tables.probes[tables.probes["quantity"] == "ics_l2"].groupby(["cell", "layer_index"])["value"].mean()
    frame = ics.reset_index().merge(tables.cells[["cell", "norm", "seed"]], on="cell")
    wide = frame.pivot_table(index=["seed", "layer_index"], columns="norm", values="value")
    # Per seed, the geometric mean over layers of BN's ICS over no norm's: every layer counts alike.
    effects = np.exp(np.log(wide["bn"] / wide["none"]).groupby(level="seed").mean())
    return mean_interval(effects, int(tables.cells["norm"].isin(["bn", "none"]).sum()))


def _smoother_with_bn(tables: Tables, spec: dict) -> Estimate:
    cells = _with(tables.cells, per_cell(tables.probes, "beta"), "beta")
    return mean_interval(_paired(cells, cells["beta"], "norm", "none", "bn", operator.truediv),
                         int(cells["norm"].isin(["bn", "none"]).sum()))


def _precise_bn_beats_ema(tables: Tables, spec: dict) -> Estimate:
    cells = tables.cells
    extreme = cells[(cells["bn_momentum"] == cells["bn_momentum"].max()) & (cells["batch_size"] == cells["batch_size"].min())]
    gap = per_cell(tables.probes, "acc_precise") - per_cell(tables.probes, "acc_ema")
    extreme = _with(extreme, gap, "gap")
    note = f"at momentum {extreme['bn_momentum'].max():g}, batch {extreme['batch_size'].min():g}" if len(extreme) else ""
    return mean_interval(extreme.groupby("seed")["gap"].mean(), len(extreme), note)


def generalization(probes: pd.DataFrame) -> pd.DataFrame:
    """Per cell: train accuracy (eval mode, after training), test accuracy and their gap."""
    train, test = per_cell(probes, "train_acc_eval"), per_cell(probes, "test_acc_eval")
    return pd.DataFrame({"train_acc_eval": train, "test_acc_eval": test, "gap": train - test})


def _bn_narrows_generalization_gap(tables: Tables, spec: dict) -> Estimate:
    gap = generalization(tables.probes)["gap"]
    cells = _with(tables.cells[(tables.cells["dropout"] == 0) & tables.cells["norm"].isin(["bn", "none"])], gap, "gap")
    return mean_interval(_paired(cells, cells["gap"], "norm", "none", "bn"), len(cells))


FOLDED_OUTPUT_TOLERANCE = 1e-4  # docs/claims.md, C11: folded outputs equal to 1e-4 relative


def _folding_is_free(tables: Tables, spec: dict) -> Estimate:
    probes = tables.probes
    speedup = per_cell(probes, "infer_s_unfolded") / per_cell(probes, "infer_s_folded")
    cells = _with(tables.cells, speedup, "speedup")
    worst = per_cell(probes, "fold_rel_diff").max()
    fails = (f"folded outputs differ by {worst:.2g} (relative), more than {FOLDED_OUTPUT_TOLERANCE:g}"
             if worst > FOLDED_OUTPUT_TOLERANCE else "")
    note = f"largest folded output difference {worst:.2g} relative; inference on {', '.join(sorted(set(cells['device'])))}"
    return dataclasses.replace(mean_interval(cells.groupby("seed")["speedup"].mean(), len(cells), note), fails=fails)


CLAIMS: tuple[Claim, ...] = (
    Claim("C1", "BN reduces internal covariate shift: layer-input distributions stay stable during training",
          "Ioffe & Szegedy 2015, Fig. 1", "bn_fig1",
          "drift of the last hidden layer's input percentiles over training (in widths), without BN over with BN (x)",
          "above", 2.0, _drift_without_bn, {"norm": ("bn", "none")}, probes=("percentiles",)),
    Claim("C2a", "BN does not reduce internal covariate shift (its benefit comes from elsewhere)",
          "Santurkar et al. 2018", "ics",
          "ICS (L2 change of a layer's gradient when the layers before it update) with BN over without (x, "
          "geometric mean over layers)",
          "above", 0.8, _ics_with_bn, {"norm": ("bn", "none")}, probes=("ics",)),
    Claim("C2b", "BN smooths the loss landscape", "Santurkar et al. 2018", "ics",
          "effective beta-smoothness along the gradient without a norm over with BN (x)",
          "above", 2.0, _smoother_with_bn, {"norm": ("bn", "none")}, probes=("ics",)),
    Claim("C3", "BN allows much larger learning rates", "Ioffe & Szegedy 2015; Bjorck et al. 2018",
          "learning_rate", "largest stable learning rate with BN over that without a norm (decades)",
          "above", 0.5, _larger_stable_lr_with_bn, {"norm": ("bn", "none"), "lr": ()}),
    Claim("C4", "BN makes training robust to weight initialization; without it a badly scaled init cannot learn",
          "Glorot & Bengio 2010; He et al. 2015", "init",
          "final test accuracy with BN minus without, at the badly scaled inits N(0,0.01²) and N(0,1)",
          "above", 0.1, _init_robustness_with_bn, {"norm": ("bn", "none"), "init": ()}),
    Claim("C5", "Sigmoid networks suffer vanishing gradients; BN keeps inputs out of the saturated region",
          "lecture notes (0.25^d)", "init",
          "how many decades closer to 1 BN keeps the first-to-last layer gradient-norm ratio of sigmoid nets at init",
          "above", 0.5, _balanced_gradients_with_bn, {"norm": ("bn", "none"), "activation": ("sigmoid",)}),
    Claim("C6", "BN degrades at small batch while GN/LN are batch-independent", "Wu & He 2018, Fig. 1",
          "batch_size", "final test accuracy of GN minus BN at the smallest per-worker batch (BN statistics over "
          "that many images, per worker or per ghost batch)",
          "above", 0.02, _bn_gap_at_small_batch, {"norm": ("gn",)}),
    Claim("C7", "SyncBN across data-parallel workers recovers large-batch BN",
          "Peng et al. 2018; Wu & Johnson 2021", "distributed",
          "final test accuracy of SyncBN on the most workers minus single-process BN at the same global batch",
          "within", 0.02, _syncbn_matches_global_bn, {"norm": ("bn", "syncbn"), "world_size": (1,)}),
    Claim("C8", "Running statistics (momentum EMA) can differ from the true population statistics",
          "Ioffe & Szegedy 2015 §3.1; Wu & Johnson 2021", "inference",
          "test accuracy with precise-BN statistics minus with the EMA, at the largest momentum and smallest batch",
          "above", 0.01, _precise_bn_beats_ema, {"bn_momentum": (), "batch_size": ()}, probes=("inference",)),
    Claim("C9", "BN regularizes like dropout and may replace it", "Ioffe & Szegedy 2015 §4.2; Hoffer et al. 2017",
          "regularization", "train-test accuracy gap without a norm minus with BN, no dropout",
          "above", 0.02, _bn_narrows_generalization_gap, {"norm": ("bn", "none"), "dropout": (0,)},
          probes=("generalization",)),
    Claim("C10", "BN is a poor fit for Transformers; LayerNorm (or RMSNorm) is the standard",
          "Ba et al. 2016; Shen et al. 2020; Xiong et al. 2020", "transformer",
          "final test accuracy of LN minus BN, over the study's placements and warm-ups (each apart where they differ)",
          "above", 0.02, _ln_against("bn"), {"norm": ("ln", "bn")}),
    Claim("C11", "At inference, BN folds into the preceding conv/linear layer for free", "lecture notes",
          "inference", "inference time unfolded over folded (x), with outputs equal to 1e-4 relative",
          "above", 1.05, _folding_is_free, {"norm": ("bn",)}, probes=("inference",)),
    Claim("C12", "Normalization costs compute: GN/LN are slower than BN", "Wu & He 2018; Zhang & Sennrich 2019",
          "benchmarks", "median forward+backward time of GN and LN over BN's, fp32 conv maps (x)",
          "above", 1.1, _gn_ln_slower_than_bn),
    Claim("C13", "BN speeds up training: the same accuracy in far fewer steps", "Ioffe & Szegedy 2015",
          "learning_rate", "steps to the target accuracy without a norm over those with BN, each at its best "
          "learning rate (x; a run that never reaches it counts all its steps)",
          "above", 2.0, _fewer_steps_with_bn, {"norm": ("bn", "none"), "lr": ()}, ("target_acc",)),
    Claim("C14", "Transformers need no normalization layer: Dynamic Tanh matches LayerNorm",
          "Zhu, Chen, He, LeCun & Liu 2025", "transformer",
          "final test accuracy of LN minus DyT, over the study's placements and warm-ups (each apart where they differ)",
          "within", 0.02, _ln_against("dyt"), {"norm": ("ln", "dyt")}),
    Claim("C15", "Batch Renormalization fixes BN at small batch", "Ioffe 2017", "batch_size",
          "final test accuracy of Batch Renorm minus BN, both with statistics over the smallest per-worker batch",
          "above", 0.02, _brn_beats_bn_at_small_batch, {"norm": ("brn",)}),
    Claim("C16", "Weight Standardization + GN at a micro-batch matches BN at a large batch", "Qiao et al. 2019",
          "batch_size", "final test accuracy of GN+WS (batch-independent: per-worker batch 2) minus BN with "
          "statistics over 32 or more images", "above", -0.02, _gn_ws_small_matches_bn_large, {"norm": ("gn+ws", "bn")}),
)
CLAIMS_BY_ID = {claim.id: claim for claim in CLAIMS}

# What a claim declared in a config may measure: a column of cells.csv per cell (final accuracy counts a diverged
# cell at chance, as the built-in claims do).
MEASURES: dict[str, Callable[[pd.DataFrame], pd.Series]] = {
    "final_test_acc": lambda cells: accuracy(cells),
    "best_test_acc": lambda cells: cells["best_test_acc"],
    "final_test_loss": lambda cells: cells["final_test_loss"],
    "final_train_loss": lambda cells: cells["final_train_loss"],
    "train_samples_per_s": lambda cells: cells["train_samples_per_s"].mask(cells["diverged"].astype(bool)),
}
COMBINE = {"difference": operator.sub, "ratio": operator.truediv}


def declared_claim(entry: dict, study: str) -> Claim:
    """A claim stated in a study's config, of the common shape "measure M of A against B, paired by seed":
    `{id, statement, measure, compare: {axis: [A, B]}, combine: difference|ratio, rule, threshold}`. Its effect
    is combine(M(A), M(B)) per seed, judged like the built-in claims."""
    def problem(key: str, message: str) -> SettingsError:
        return SettingsError(f"study {study!r}: claim {entry.get('id', '?')!r}, key {key!r}: {message}")

    if study == "benchmarks":
        raise problem("id", "a claim of your own compares training cells: declare it in a study")
    if entry["id"] in CLAIMS_BY_ID:
        raise problem("id", f"{entry['id']} is a built-in claim; give yours an id of its own")
    if entry["measure"] not in MEASURES:
        raise problem("measure", f"unknown measure {entry['measure']!r}; known: {', '.join(MEASURES)}")
    if entry["combine"] not in COMBINE:
        raise problem("combine", f"{entry['combine']!r}; use difference or ratio")
    if entry["rule"] not in RULES:
        raise problem("rule", f"{entry['rule']!r}; use {', '.join(RULES)}")
    if len(entry["compare"]) != 1 or len(next(iter(entry["compare"].values()))) != 2:
        raise problem("compare", "name one setting and the two values compared, e.g. {norm: [dyt, ln]}")
    (axis, (a, b)), = entry["compare"].items()
    if axis not in SETTING_NAMES:
        raise problem("compare", f"{axis!r} is no setting")
    measure_of, combine = MEASURES[entry["measure"]], COMBINE[entry["combine"]]

    def measure(tables: Tables, spec: dict) -> Estimate:
        cells = tables.cells[tables.cells[axis].isin([a, b])]
        return mean_interval(_paired(cells, measure_of(cells), axis, a, b, combine), len(cells))

    sign = "/" if entry["combine"] == "ratio" else "-"
    return Claim(entry["id"], entry["statement"], entry.get("anchor", "declared in the config"), study,
                 f"{entry['measure']} of {axis} {a} {sign} {b}, paired by seed", entry["rule"],
                 float(entry["threshold"]), measure, {axis: (a, b)})


def study_claims(study: str, spec: dict) -> list[Claim]:
    """The claims a config section lists: built-in ids, and claims declared in place."""
    return [declared_claim(entry, study) if isinstance(entry, dict) else CLAIMS_BY_ID[entry]
            for entry in spec.get("claims", []) if isinstance(entry, dict) or entry in CLAIMS_BY_ID]


def claim_sections(config: dict) -> dict[str, dict]:
    """The parts of a workflow config that may declare claims, by name: each study, and the micro-benchmarks
    as `benchmarks`."""
    return {**config.get("studies", {}), "benchmarks": config.get("benchmarks", {})}


def check_claims(studies: dict[str, dict], cells_by_study: dict[str, list[dict]]) -> None:
    """Refuse, before any run, a claim that cannot be measured: unknown, declared by two studies, declared where
    its measure finds no data (a training claim under `benchmarks`, C12 in a study), or declared by a study whose
    cells lack the settings the claim compares or the probes it reads. `studies` are claim_sections(config)."""
    declared_by: dict[str, str] = {}
    defaults = Settings()
    for study, spec in studies.items():
        for entry in spec.get("claims", []):
            claim = declared_claim(entry, study) if isinstance(entry, dict) else CLAIMS_BY_ID.get(entry)
            if claim is None:
                raise SettingsError(f"study {study!r}: unknown claim {entry!r}; known: {', '.join(CLAIMS_BY_ID)}")
            claim_id = claim.id
            if claim.experiment == "benchmarks" and study != "benchmarks":
                raise SettingsError(f"study {study!r}: claim {claim_id} is measured by the micro-benchmarks, not by "
                                    f"training cells: list it under benchmarks: claims")
            if study == "benchmarks" and claim.experiment != "benchmarks":
                raise SettingsError(f"benchmarks: claim {claim_id} is measured by training cells (a "
                                    f"{claim.experiment} study), not by the micro-benchmarks: list it under a "
                                    f"study's claims")
            if claim_id in declared_by:
                raise SettingsError(f"claim {claim_id} is declared by both {declared_by[claim_id]!r} and {study!r}; "
                                    f"keep it in one study")
            declared_by[claim_id] = study
            for key in claim.report_keys:
                if key not in spec.get("report", {}):
                    raise SettingsError(f"study {study!r}: claim {claim_id} needs report: {{{key}: ...}} in the study")
            cells = cells_by_study.get(study, [])
            for axis, values in claim.needs.items():
                present = {cell.get(axis, getattr(defaults, axis)) for cell in cells}
                missing = [v for v in values if v not in present]
                if missing or (not values and len(present) < 2):
                    wanted = f"the values {', '.join(map(str, values))}" if values else "at least two values"
                    raise SettingsError(f"study {study!r}: claim {claim_id} compares {axis} and needs {wanted} "
                                        f"among its cells; add them to the grid or drop the claim")
            for probe in claim.probes:
                if any(probe not in cell.get("probes", ()) for cell in cells):
                    raise SettingsError(f"study {study!r}: claim {claim_id} reads the {probe!r} probe; add "
                                        f"probes: [{probe}] to the study's fixed settings")


def evaluate(studies: dict[str, dict], tables_by_study: dict[str, Tables]) -> list[Verdict]:
    """One verdict per claim, in the order of CLAIMS, from the studies (config specs) that declare it;
    `not run` where no study with results does."""
    declared = {claim.id: study for study, spec in studies.items() if study in tables_by_study
                for claim in study_claims(study, spec)}
    own = [claim for study, spec in studies.items() if study in tables_by_study for claim in study_claims(study, spec)
           if claim.id not in CLAIMS_BY_ID]
    verdicts = []
    for claim in [*CLAIMS, *own]:  # the built-in claims, then those the config declares
        study = declared.get(claim.id)
        if study is None:
            verdicts.append(Verdict(claim, "not run", note=f"no {claim.experiment} study in this run"))
            continue
        estimate = claim.measure(tables_by_study[study], studies[study])
        detectable, needed = power_analysis(estimate, claim.rule, claim.threshold)
        verdict = decide(estimate, claim.rule, claim.threshold)
        parts = [(label, part, decide(part, claim.rule, claim.threshold)) for label, part in estimate.conditions]
        exceptions = [f"{label}: {part_verdict} ({format_estimate(part)})"
                      for label, part, part_verdict in parts if part_verdict != verdict]
        note = join_notes(estimate.fails, estimate.note, "except " + "; ".join(exceptions) if exceptions else "")
        verdicts.append(Verdict(claim, verdict, study, estimate, note, detectable, needed))
    return verdicts
