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
from normbench.plugins import is_plugin, short_name

CONFIDENCE = 0.95
POWER = 0.8  # of the t-test behind "detectable effect" and "seeds needed"
MIN_SAMPLES = 3  # the fewest seeds "seeds needed" proposes
MAX_SAMPLES = 10_000  # beyond it "seeds needed" says: no practical number
CHANCE_ACCURACY = 0.1  # ten balanced classes: for cells from before summaries recorded their chance_acc
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
class Side:
    """One end of an interval as a one-sample t summary on the analysis scale (logarithms for ratios): the mean,
    standard error and count of the samples' lower (or upper) bounds. p-values against a threshold come from it."""

    mean: float
    sem: float
    n: int

    def end(self, upper: bool) -> float:
        from scipy import stats  # here, not at the top: the workflow imports this module while it plans

        quantile = stats.t.ppf((1 + CONFIDENCE) / 2, self.n - 1)
        return self.mean + (1 if upper else -1) * quantile * self.sem

    def p_beyond(self, threshold: float, above: bool) -> float:
        """Two-sided p-value of the t-test of the mean against `threshold`, when the mean lies on the named side
        (1 where it does not): below 1 - CONFIDENCE exactly when the interval excludes the threshold there."""
        from scipy import stats

        distance = (self.mean - threshold) if above else (threshold - self.mean)
        if distance <= 0:
            return 1.0
        return 0.0 if self.sem == 0 else float(min(1.0, 2 * stats.t.sf(distance / self.sem, self.n - 1)))


@dataclass(frozen=True)
class Estimate:
    """An effect with its 95% interval and what it rests on (`samples` seeds or rounds, `cells` runs).

    A sample may be censored (a run that never reached the target, a grid boundary known only between two grid
    points): it then counts as an interval, and the effect's interval runs from the t-interval's low end over the
    samples' lower bounds to its high end over their upper bounds, infinite where a bound is missing. An upper bound
    can so refute but never support an `above` rule, and a lower bound the reverse. Ratios are judged on the log
    scale: `value` is then the geometric mean and the interval the exponentiated one of the logarithms."""

    value: float
    low: float
    high: float
    samples: int
    sample_unit: str
    cells: int
    note: str = ""
    cell_unit: str = "cells"  # what `cells` counts: training runs, or benchmark cases
    spread: float = math.nan  # standard deviation of the per-sample effects (of their logarithms on the log scale)
    fails: str = ""  # a precondition of the claim that the run broke (the verdict is then refuted), e.g. unequal outputs
    conditions: tuple[tuple[str, "Estimate"], ...] = ()  # the same effect per condition the overall one averages
    scale: str = "linear"  # or "log"
    lower_side: Side | None = None  # None where some sample has no lower bound
    upper_side: Side | None = None  # None where some sample has no upper bound
    censored: int = 0  # samples known only as a bound or a range

    @property
    def lower_bound(self) -> bool:
        """Only a lower bound: some samples have no upper bound (the true effect may be any larger)."""
        return self.upper_side is None and self.lower_side is not None

    @property
    def upper_bound(self) -> bool:
        return self.lower_side is None and self.upper_side is not None

    def on_scale(self, value: float) -> float:
        """A value (a threshold) on the scale the interval was computed on."""
        return math.log(value) if self.scale == "log" else value


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
    reads_time: bool = False  # its effect is a time: its cells may not share a GPU (a study's gpu_share)

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
    seeds_needed: tuple[float, float, float] = (math.nan, math.nan, math.nan)  # (low, at the observed spread, high)
    p_value: float = math.nan  # of the t-test behind a decided verdict (see p_value)
    holds_family_wise: bool | None = None  # under Holm's correction over the run's decided claims


# -- shared measurements (the report's tables use them too) -------------------------------------------------


def chance_accuracy(cells: pd.DataFrame) -> pd.Series:
    """What always predicting the commonest test label scores: 1/classes for a balanced image set, the commonest
    character's rate for text. Cells from before summaries recorded it count ten balanced classes."""
    chance = cells["chance_acc"] if "chance_acc" in cells else pd.Series(np.nan, index=cells.index)
    return chance.fillna(CHANCE_ACCURACY)


def accuracy(cells: pd.DataFrame, column: str = "final_test_acc") -> pd.Series:
    """Final (or best) test accuracy, with a diverged cell counted at chance (it ends predicting nothing useful)
    and a timed-out or failed one left out: it stopped early, so its accuracy says nothing of the full run."""
    diverged = cells["diverged"].astype(bool)
    return cells[column].where(~diverged, chance_accuracy(cells)).where(~unfinished(cells))


def stable_lrs(cells: pd.DataFrame, stable_acc: float) -> list[float]:
    """Learning rates at which no cell diverged and every cell ended at least `stable_acc` accurate (a timed-out
    or failed cell says neither: left out)."""
    cells = cells[~unfinished(cells)]
    stable = (~cells["diverged"].astype(bool) & (cells["final_test_acc"] >= stable_acc)).groupby(cells["lr"]).all()
    return sorted(stable[stable].index)


def unfinished(cells: pd.DataFrame) -> pd.Series:
    """Cells that stopped early without diverging: timed out, or failed (out of memory)."""
    flags = [cells[column].fillna(False).astype(bool) for column in ("timed_out", "failed") if column in cells]
    return pd.concat(flags, axis=1).any(axis=1) if flags else pd.Series(False, index=cells.index)


def measured(cells: pd.DataFrame, column: str) -> pd.Series:
    """`column` blanked where a cell diverged or stopped early (timed out, failed): no measure of its norm."""
    return cells[column].mask(cells["diverged"].astype(bool) | unfinished(cells))


def best_lr(cells: pd.DataFrame) -> float:
    """The learning rate with the highest mean accuracy over seeds; NaN where no run finished."""
    means = cells.assign(acc=accuracy(cells)).groupby("lr")["acc"].mean()
    return means.idxmax() if means.notna().any() else math.nan


def varying_settings(cells: pd.DataFrame) -> list[str]:
    """Settings that take more than one value among a study's cells: its grid axes."""
    return [name for name in SETTING_NAMES if name in cells and cells[name].nunique(dropna=False) > 1]


def _paired(cells: pd.DataFrame, value: pd.Series, axis: str, a, b,
            combine: Callable[[pd.Series, pd.Series], pd.Series] = operator.sub) -> pd.Series:
    """combine(value(a), value(b)), a difference unless told otherwise, for cells alike in every other setting,
    averaged per seed."""
    keys = [c for c in dict.fromkeys([*varying_settings(cells), "seed"]) if c != axis]
    # dropna=False: a setting left blank in some cells (ghost_batch of plain BN) is a value of its own, not a reason
    # to drop them.
    wide = cells.assign(_value=value).pivot_table(index=keys, columns=axis, values="_value", dropna=False)
    wide = wide.reindex(columns=[a, b])
    conditions = [key for key in keys if key != "seed"]
    if conditions:  # a condition that no seed has on both sides (ghost BN, never with dropout) pairs nothing
        wide = wide[wide.notna().groupby(level=conditions, dropna=False).transform("any").all(axis=1)]
    paired = combine(wide[a], wide[b])  # a side without cells: no seed gives a value
    # Ratios average on the log scale, as they are judged; a seed counts only with every condition (a seed missing
    # one, timed out say, would average over easier or harder conditions than the others).
    values = np.log(paired) if combine is operator.truediv else paired
    means = values.groupby(level="seed").mean(skipna=False)
    return np.exp(means) if combine is operator.truediv else means


def accuracy_resolution(cells: pd.DataFrame) -> float:
    """One test image's worth of accuracy: no accuracy difference is known more finely."""
    test_images = cells["test_subset"].fillna(10_000).min() if "test_subset" in cells else 10_000
    return 1 / test_images


# -- intervals ---------------------------------------------------------------------------------------------


def mean_interval(effects: pd.Series, cells: int, note: str = "", unit: str = "seeds", cell_unit: str = "cells",
                  log: bool = False, resolution: float = 0.0) -> Estimate:
    """Mean effect over independent samples (seeds, or benchmark repeats) with a Student t 95% interval (none
    from fewer than two); `log`: the geometric mean of ratios with the interval of their logarithms."""
    return bounded_interval(effects, effects, cells, note, unit, cell_unit, log, resolution)


def bounded_interval(lower: pd.Series, upper: pd.Series, cells: int, note: str = "", unit: str = "seeds",
                     cell_unit: str = "cells", log: bool = False, resolution: float = 0.0) -> Estimate:
    """The effect over samples each known as a range [lower, upper] (equal ends: measured exactly; an infinite
    end: censored). The interval's low end is the t-interval's over the lower bounds and its high end over the
    upper bounds. Tied samples get an interval of the measure's `resolution` instead of a zero-width one."""
    frame = pd.DataFrame({"lower": lower, "upper": upper}).dropna(how="all")
    frame = frame.fillna({"lower": -math.inf if not log else 0.0, "upper": math.inf})
    n, scale = len(frame), "log" if log else "linear"
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, unit, cells, join_notes(note, f"no {unit[:-1]} gave a value"),
                        cell_unit, scale=scale)
    with np.errstate(divide="ignore"):
        ends = np.log(frame) if log else frame
    # A sample measured as infinite (a ratio over a zero) is larger than any other: a lower bound at the largest
    # finite value measured, open above (and the reverse below), so that it can support but never refute.
    finite = ends.to_numpy()[np.isfinite(ends.to_numpy())]
    if len(finite):
        exact = ends["lower"] == ends["upper"]
        ends.loc[exact & (ends["lower"] == math.inf), "lower"] = finite.max()
        ends.loc[exact & (ends["upper"] == -math.inf), "upper"] = finite.min()
    censored = int((ends["lower"] != ends["upper"]).sum())
    finite_lower, finite_upper = np.isfinite(ends["lower"]).all(), np.isfinite(ends["upper"]).all()
    # The value shown: the mean of the samples' midpoints, or of their finite ends where a range is open.
    middle = ends.where(np.isfinite(ends)).mean(axis=1)
    center = float(middle.mean())
    back = math.exp if log else float
    if n == 1:  # a single censored sample is still shown as the bound it is
        only = lambda end: Side(center, math.nan, 1) if np.isfinite(ends[end]).all() else None  # noqa: E731
        return Estimate(back(center), math.nan, math.nan, 1, unit, cells, join_notes(note, f"one {unit[:-1]}: no interval"),
                        cell_unit, scale=scale, lower_side=only("lower"), upper_side=only("upper"), censored=censored)
    half_resolution = (math.log1p(resolution / 2) if log else resolution / 2)

    def side(values: pd.Series) -> Side:
        # Tied samples (up to rounding) give no certainty finer than the measure itself.
        floor = half_resolution / Side(0.0, 1.0, n).end(upper=True)
        return Side(float(values.mean()), max(float(values.std(ddof=1) / math.sqrt(n)), floor), n)

    lower_side = side(ends["lower"]) if finite_lower else None
    upper_side = side(ends["upper"]) if finite_upper else None
    low = back(lower_side.end(upper=False)) if lower_side else (0.0 if log else -math.inf)
    high = back(upper_side.end(upper=True)) if upper_side else math.inf
    spread = float(middle.std(ddof=1))
    return Estimate(back(center), low, high, n, unit, cells, note, cell_unit, spread, scale=scale,
                    lower_side=lower_side, upper_side=upper_side, censored=censored)


def join_notes(*notes: str) -> str:
    """Notes in one sentence list, empty ones left out."""
    return "; ".join(note for note in notes if note)


def deciding_side(estimate: Estimate, rule: str, threshold: float) -> tuple[str, float, float] | None:
    """The verdict more samples could reach, with the distance from the bar on the analysis scale and the spread
    behind it: ("supported" | "refuted", distance, sd). None where no number of samples can decide: the effect
    sits on the bar, or censored samples leave open exactly the side that would decide."""
    t = estimate.on_scale(threshold)
    lower, upper = estimate.lower_side, estimate.upper_side

    def sd(side: Side) -> float:
        return side.sem * math.sqrt(side.n)

    if rule == "within":
        if lower and upper and -t < lower.mean and upper.mean < t:
            return "supported", min(lower.mean + t, t - upper.mean), max(sd(lower), sd(upper))
        if lower and lower.mean > t:
            return "refuted", lower.mean - t, sd(lower)
        if upper and upper.mean < -t:
            return "refuted", -t - upper.mean, sd(upper)
        return None
    above = rule == "above"
    toward, away = (lower, upper) if above else (upper, lower)
    if toward and (toward.mean - t if above else t - toward.mean) > 0:
        return "supported", abs(toward.mean - t), sd(toward)
    if away and (t - away.mean if above else away.mean - t) > 0:
        return "refuted", abs(away.mean - t), sd(away)
    return None


def power(samples: np.ndarray, distance: float, sd: float, equivalence_to: float | None = None) -> np.ndarray:
    """Power of the 95% t-interval to exclude the bar at `distance` from the true effect, for each sample count
    (noncentral t). `equivalence_to`: the two one-sided tests (TOST) of a `within` rule instead, for an effect at
    `distance` inside the nearer of the bounds ±`equivalence_to`."""
    from scipy import stats

    df, se = samples - 1, sd / np.sqrt(samples)
    critical = stats.t.ppf((1 + CONFIDENCE) / 2, df)

    def beyond(threshold, shift):
        """P(T > threshold) for T noncentral t; scipy's nct gives NaN for a large shift at few degrees of freedom,
        where the normal approximation (Johnson & Welch) is close to its value, 1 or 0."""
        exact = stats.nct.sf(threshold, df, shift)
        approximate = stats.norm.sf((threshold - shift) / np.sqrt(1 + threshold ** 2 / (2 * df)))
        return np.where(np.isnan(exact), approximate, exact)

    if equivalence_to is None:
        shift = distance / se
        return beyond(critical, shift) + 1 - beyond(-critical, shift)
    effect = equivalence_to - distance  # |effect|, inside the bounds
    above_lower = beyond(critical, (effect + equivalence_to) / se)
    below_upper = 1 - beyond(-critical, (effect - equivalence_to) / se)
    return np.clip(above_lower + below_upper - 1, 0, 1)


def power_analysis(estimate: Estimate, rule: str, threshold: float) -> tuple[float, tuple[float, float, float]]:
    """(detectable effect, seeds needed) at POWER: the distance from the bar the run's samples detect given their
    spread (statsmodels' TTestPower), and the samples that would decide the claim at the observed effect, as
    (low, point, high) over the 95% range of the spread (a spread from 3 samples is known to a factor of 6).
    `within` rules that would be supported need the two one-sided tests' power. NaN where the run gives no
    spread; inf where no number of samples decides (see deciding_side)."""
    nothing = (math.nan, math.nan, math.nan)
    if estimate.samples < 2 or math.isnan(estimate.spread):
        return math.nan, nothing
    from scipy import stats
    from statsmodels.stats.power import TTestPower

    n = estimate.samples
    detectable = TTestPower().solve_power(nobs=n, alpha=1 - CONFIDENCE, power=POWER) * estimate.spread
    side = deciding_side(estimate, rule, threshold)
    if side is None:
        return float(detectable), (math.inf, math.inf, math.inf)
    verdict, distance, sd = side
    equivalence_to = estimate.on_scale(threshold) if rule == "within" and verdict == "supported" else None
    counts = np.arange(MIN_SAMPLES, MAX_SAMPLES + 1)

    def needed(spread: float) -> float:
        if spread == 0:
            return float(MIN_SAMPLES)
        enough = np.nonzero(power(counts, distance, spread, equivalence_to) >= POWER)[0]
        return float(counts[enough[0]]) if len(enough) else math.inf

    chi2 = stats.chi2(n - 1)
    spreads = (sd * math.sqrt((n - 1) / chi2.ppf((1 + CONFIDENCE) / 2)), sd, sd * math.sqrt((n - 1) / chi2.ppf((1 - CONFIDENCE) / 2)))
    return float(detectable), tuple(needed(spread) for spread in spreads)


def _p_for(estimate: Estimate, rule: str, threshold: float, verdict: str) -> float:
    """The two-sided p-value of the t-test that would give `verdict` (supported or refuted): against the threshold
    from that verdict's side (for a supported `within` rule, the larger of the tests against the two bounds: twice
    TOST's p, below 0.05 exactly when the 95% interval lies between them); 1 where a censored side leaves no test."""
    t, lower, upper = estimate.on_scale(threshold), estimate.lower_side, estimate.upper_side

    def beyond(side: Side | None, bar: float, above: bool) -> float:
        return 1.0 if side is None else side.p_beyond(bar, above)

    if rule == "within":
        if verdict == "supported":
            return max(beyond(lower, -t, True), beyond(upper, t, False))
        return min(beyond(lower, t, True), beyond(upper, -t, False))
    if (rule == "above") == (verdict == "supported"):
        return beyond(lower, t, True)
    return beyond(upper, t, False)


def p_value(estimate: Estimate, rule: str, threshold: float, verdict: str) -> float:
    """The p-value of the claim's test against its threshold: for a decided verdict, of the t-test behind it
    (below 0.05 exactly when the 95% interval decides); for an inconclusive one, the smaller of the two verdicts'
    (0.05 or more). NaN with fewer than two samples, or for a claim decided by a broken precondition."""
    if estimate.fails or estimate.samples < 2 or math.isnan(estimate.low):
        return math.nan
    if verdict in ("supported", "refuted"):
        return _p_for(estimate, rule, threshold, verdict)
    return min(_p_for(estimate, rule, threshold, "supported"), _p_for(estimate, rule, threshold, "refuted"))


def holm(p_values: list[float], decided: list[bool]) -> list[bool | None]:
    """Whether each decided verdict holds under Holm's correction over every claim tested in the run (decided or
    not: the family is fixed before the results, family-wise error 5%); None for a claim not decided."""
    from statsmodels.stats.multitest import multipletests

    tested = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    holds: list[bool | None] = [None] * len(p_values)
    if tested:
        rejected = multipletests([p_values[i] for i in tested], alpha=1 - CONFIDENCE, method="holm")[0]
        for i, reject in zip(tested, rejected):
            holds[i] = bool(reject) if decided[i] else None
    return holds


def time_ratio(rounds: pd.DataFrame, norm: str, reference: str) -> pd.Series:
    """Per benchmark repeat (one process each, on one device), the norm's median time over the reference's: medians
    are robust to a round that another process interrupted, and repeats are independent where rounds are not."""
    medians = rounds.groupby(["repeat", "norm"])["time_s"].median().unstack("norm")
    if norm not in medians or reference not in medians:  # not benchmarked: no repeat gives a value
        return pd.Series(dtype=float)
    return medians[norm] / medians[reference]


def format_estimate(estimate: Estimate) -> str:
    """"0.12 [0.05, 0.19]", "≥ 1.3 [1.1, ∞]" for a lower bound, or the value alone without an interval."""
    if math.isnan(estimate.value):
        return ""
    interval = "" if math.isnan(estimate.low) else f" [{estimate.low:.3g}, {estimate.high:.3g}]".replace("inf", "∞")
    bound = "≥ " if estimate.lower_bound else "≤ " if estimate.upper_bound else ""
    return f"{bound}{estimate.value:.3g}{interval}"


def decide(estimate: Estimate, rule: str, threshold: float) -> str:
    """supported / refuted / inconclusive from where the interval lies against the threshold (an open end, from
    censored samples, never lies beyond it)."""
    low, high = estimate.low, estimate.high
    if estimate.fails:
        return "refuted"
    if math.isnan(low) or math.isnan(high):
        return "inconclusive"
    if rule == "above":
        return "supported" if low > threshold else "refuted" if high < threshold else "inconclusive"
    if rule == "below":
        return "supported" if high < threshold else "refuted" if low > threshold else "inconclusive"
    if rule == "within":
        inside = -threshold < low and high < threshold
        return "supported" if inside else "refuted" if low > threshold or high < -threshold else "inconclusive"
    raise ValueError(f"unknown rule {rule!r}; known rules: {', '.join(RULES)}")


# -- the measures ------------------------------------------------------------------------------------------


def steps_to_target(cells: pd.DataFrame, curves: pd.DataFrame, target: float, budget: float) -> pd.DataFrame:
    """Per seed, where its run first reached `target` test accuracy, as a range of steps: after the evaluation
    before the first one at the target, and by that one (evaluations are where accuracy is known), with the
    training seconds by then (elapsed_s). A run that never got there is censored: at the budget if it trained (or
    diverged) to the end, at its last step if it timed out (upper and elapsed_s infinite); a failed run is left out."""
    rows = {}
    runs = {name: run for name, run in curves.sort_values("step").groupby("cell")}
    for _, cell in cells.iterrows():
        if cell.get("failed") == True:  # noqa: E712  a numpy bool, or NaN where the table has none
            continue
        run = runs.get(cell["cell"], curves.iloc[:0])
        at_target = run[run["test_acc"] >= target]
        if len(at_target):
            first = at_target["step"].iloc[0]
            before = run.loc[run["step"] < first, "step"]
            rows[cell["seed"]] = (before.iloc[-1] if len(before) else 0.0, first, at_target["elapsed_s"].iloc[0])
        elif cell.get("timed_out") == True:  # noqa: E712
            rows[cell["seed"]] = (cell["steps"], math.inf, math.inf)
        else:
            rows[cell["seed"]] = (budget, math.inf, math.inf)
    return pd.DataFrame.from_dict(rows, orient="index", columns=["lower", "upper", "elapsed_s"], dtype=float)


def _fewer_steps_with_bn(tables: Tables, spec: dict) -> Estimate:
    cells, curves = tables.cells, tables.curves
    target, seeds = spec["report"]["target_acc"], sorted(cells["seed"].unique())
    budget = curves["step"].max()
    steps = {}
    for norm in ("bn", "none"):
        mine = cells[cells["norm"] == norm]
        at_best = mine[mine["lr"] == best_lr(mine)]
        steps[norm] = steps_to_target(at_best, curves, target, budget).reindex(seeds)
    # none over BN: smallest when no-norm was quick and BN slow, largest the other way round.
    with np.errstate(divide="ignore"):
        lower = steps["none"]["lower"] / steps["bn"]["upper"]
        upper = steps["none"]["upper"] / steps["bn"]["lower"]
    unreached = {norm: int((steps[norm]["upper"] == math.inf).sum()) for norm in steps}
    notes = [f"{count} of {len(seeds)} seed(s) {'with BN' if norm == 'bn' else 'without a norm'} never reached "
             f"{target:g} (censored at the step budget, or where a timed-out run stopped)"
             for norm, count in unreached.items() if count]
    return bounded_interval(lower, upper, len(cells), join_notes(
        *notes, "each seed's steps known to the evaluation that first reached the target"), log=True)


def _boundary(grid: list[float], stable: list[float]) -> tuple[float, float]:
    """Where a seed's largest stable learning rate lies, as a range between grid points: from the top of the run
    of stable lrs that starts at the grid's bottom (an unstable lr in between makes anything above it uncertain)
    to the lr tried after the largest stable one (open above the grid's top; 0 when the bottom lr failed)."""
    if not stable:
        return 0.0, grid[0]
    unstable = [lr for lr in grid if lr not in stable]
    surely = [lr for lr in stable if not unstable or lr < unstable[0]]
    above = [lr for lr in grid if lr > max(stable)]
    return (max(surely) if surely else 0.0), (above[0] if above else math.inf)


def _larger_stable_lr_with_bn(tables: Tables, spec: dict) -> Estimate:
    cells, stable_acc = tables.cells, spec.get("report", {}).get("stable_acc", 0.0)
    grid = sorted(cells["lr"].unique())

    def seed_boundary(seed_cells: pd.DataFrame) -> tuple[float, float]:
        # A timed-out or failed lr says neither stable nor unstable: the boundary is read from the finished ones.
        finished = sorted(seed_cells.loc[~unfinished(seed_cells), "lr"].unique())
        return _boundary(finished, stable_lrs(seed_cells, stable_acc)) if finished else (math.nan, math.nan)

    bounds = {norm: pd.DataFrame({seed: seed_boundary(seed_cells)
                                  for seed, seed_cells in cells[cells["norm"] == norm].groupby("seed")},
                                 index=["lower", "upper"]).T
              for norm in ("bn", "none")}
    bn, none = bounds["bn"], bounds["none"]
    with np.errstate(divide="ignore"):
        lower = np.log10(bn["lower"] / none["upper"])  # decades: BN's boundary at its lowest over none's at its highest
        upper = np.log10(bn["upper"] / none["lower"])
    notes = [f"{(bn['upper'] == math.inf).sum()} seed(s) with BN stable at the top lr tried (extend the grid)"
             if (bn["upper"] == math.inf).any() else "",
             f"{(none['lower'] == 0).sum()} seed(s) without a norm stable at no lr" if (none["lower"] == 0).any() else "",
             f"{(bn['lower'] == 0).sum()} seed(s) with BN stable at no lr" if (bn["lower"] == 0).any() else "",
             f"every seed's boundary known only as a range between two lrs of the grid ({len(grid)} lrs over "
             f"{math.log10(grid[-1] / grid[0]):.3g} decades)" if len(grid) > 1 else ""]
    step = math.log10(grid[1] / grid[0]) if len(grid) > 1 else 0.0
    return bounded_interval(lower, upper, len(cells), join_notes(*notes), resolution=step)


def format_value(value, blank: str = "") -> str:
    """A value as a grid or a table spells it: 8 for a table's 8.0, four significant digits, a blank (NaN) as
    `blank`."""
    if isinstance(value, float):
        return blank if math.isnan(value) else f"{value:.4g}"
    return str(value)


def by_condition(cells: pd.DataFrame, axes: list[str], measure: Callable[[pd.DataFrame], Estimate]) -> tuple:
    """The measure on each combination of `axes` alone: where conditions disagree, one mean hides a failure."""
    axes = [axis for axis in axes if axis in cells and cells[axis].nunique(dropna=False) > 1]
    if not axes:
        return ()
    return tuple((", ".join(f"{a} {format_value(v, blank='blank')}"
                            for a, v in zip(axes, key if isinstance(key, tuple) else (key,))),
                  measure(group)) for key, group in cells.groupby(axes, dropna=False))


def _init_robustness_with_bn(tables: Tables, spec: dict) -> Estimate:
    cells = tables.cells[tables.cells["init"].isin(BADLY_SCALED_INITS)]

    def measure(cells: pd.DataFrame) -> Estimate:
        return mean_interval(_paired(cells, accuracy(cells), "norm", "bn", "none"), len(cells),
                             resolution=accuracy_resolution(cells))

    return dataclasses.replace(measure(cells), conditions=by_condition(cells, ["activation", "init"], measure))


def _balanced_gradients_with_bn(tables: Tables, spec: dict) -> Estimate:
    probes = tables.probes
    at_init = probes[(probes["step"] == 0) & (probes["quantity"] == "grad_norm") & (probes["activation"] == "sigmoid")]
    ends = at_init.sort_values("layer_index").groupby("cell")["value"].agg(["first", "last"])
    distance = np.log10(ends["first"] / ends["last"]).abs().rename("decades")  # 0: first and last layer alike
    cells = tables.cells[tables.cells["activation"] == "sigmoid"].set_index("cell")
    cells = cells.join(distance, how="inner").reset_index()

    def measure(cells: pd.DataFrame) -> Estimate:
        return mean_interval(_paired(cells, cells["decades"], "norm", "none", "bn"), len(cells))

    return dataclasses.replace(measure(cells), conditions=by_condition(cells, ["init"], measure))


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
    return mean_interval(effects, len(smallest) + int((cells["norm"] == "gn").sum()), note,
                         resolution=accuracy_resolution(cells))


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
    return mean_interval(effects, len(joined) * 2, note, resolution=accuracy_resolution(cells))


def _gn_ws_small_matches_bn_large(tables: Tables, spec: dict) -> Estimate:
    """GN+WS minus BN with statistics over its largest batch (at least 32 images), paired by seed. GN+WS keeps no
    batch statistic, so at optimizer batch B it trains exactly as on B/2 workers of 2 (Qiao et al.'s micro-batch)."""
    cells = tables.cells.assign(statistics_batch=statistics_batch(tables.cells), acc=accuracy(tables.cells))
    bn = cells[(cells["norm"] == "bn") & (cells["statistics_batch"] >= 32)]
    largest = bn[bn["statistics_batch"] == bn["statistics_batch"].max()]
    gn_ws = cells[cells["norm"] == "gn+ws"]
    joined = gn_ws.merge(largest, on="seed", suffixes=("_ws", "_bn"))
    effects = (joined["acc_ws"] - joined["acc_bn"]).groupby(joined["seed"]).mean()
    note = (f"BN over {largest['statistics_batch'].max():g} images; GN+WS batch-independent (its batch of "
            f"{gn_ws['batch_size'].max():g} trains as {gn_ws['batch_size'].max() / 2:g} workers of 2)" if len(joined)
            else "no BN cell over 32 images or more")
    return mean_interval(effects, len(gn_ws) + len(largest), note, resolution=accuracy_resolution(cells))


def _syncbn_matches_global_bn(tables: Tables, spec: dict) -> Estimate:
    cells = tables.cells.assign(global_batch=tables.cells["batch_size"] * tables.cells["world_size"])
    sync = cells[(cells["norm"] == "syncbn") & (cells["world_size"] == cells["world_size"].max())]
    single = cells[(cells["norm"] == "bn") & (cells["world_size"] == 1)]
    joined = sync.assign(acc=accuracy(sync)).merge(single.assign(acc=accuracy(single)), on=["global_batch", "seed"],
                                                   suffixes=("_sync", "_single"))
    effects = (joined["acc_sync"] - joined["acc_single"]).groupby(joined["seed"]).mean()
    return mean_interval(effects, len(sync) + len(single), resolution=accuracy_resolution(cells))


def _ln_against(other: str) -> Callable[[Tables, dict], Estimate]:
    """The transformer study's measure of LN against `other` (bn for C10, dyt for C14): final accuracy of LN minus
    the other's, paired by seed, and apart for each placement and warm-up where they differ."""
    def measure_claim(tables: Tables, spec: dict) -> Estimate:
        cells = tables.cells[tables.cells["norm"].isin(["ln", other])]

        def measure(cells: pd.DataFrame) -> Estimate:
            return mean_interval(_paired(cells, accuracy(cells), "norm", "ln", other), len(cells),
                                 resolution=accuracy_resolution(cells))

        return dataclasses.replace(measure(cells), conditions=by_condition(cells, ["norm_placement", "warmup_steps"],
                                                                           measure))

    return measure_claim


def _gn_ln_slower_than_bn(tables: Tables, spec: dict) -> Estimate:
    """GN's and LN's time over BN's, each apart and per device; the effect is the smaller one, since the claim
    says both are slower."""
    bench = tables.bench
    rounds = bench[(bench["layout"] == "channels") & (bench["dtype"] == "fp32")]
    conditions = tuple((f"{norm.upper()} on {device}", mean_interval(time_ratio(on_device, norm, "bn"), 2,
                                                                      unit="repeats", cell_unit="cases", log=True))
                       for device, on_device in rounds.groupby("device") for norm in ("gn", "ln"))
    # Both must be slower: a condition below the bar refutes the claim, else the least certain one decides.
    claim = CLAIMS_BY_ID["C12"]
    refuting = [c for c in conditions if decide(c[1], claim.rule, claim.threshold) == "refuted"]
    # Without an interval (one repeat, or none) a condition is the least certain of all.
    label, smallest = min(refuting or conditions, key=lambda condition: condition[1].high if refuting else
                          -math.inf if math.isnan(condition[1].low) else condition[1].low)
    rms = (mean_interval(time_ratio(rounds, "rms", "ln"), 2, unit="repeats", log=True)
           if "rms" in set(rounds["norm"]) else None)
    notes = [f"decided by {label} (both must be slower)",
             f"RMSNorm over LN's time: {format_estimate(rms)} (below 1: faster)" if rms else ""]
    return dataclasses.replace(smallest, note=join_notes(*notes), conditions=conditions)


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
    return mean_interval(_paired(cells, cells["drift"], "norm", "none", "bn", operator.truediv), len(cells), log=True)


def _ics_with_bn(tables: Tables, spec: dict) -> Estimate:
    ics = tables.probes[tables.probes["quantity"] == "ics_l2"].groupby(["cell", "layer_index"])["value"].mean()
    frame = ics.reset_index().merge(tables.cells[["cell", "norm", "seed"]], on="cell")
    wide = frame.pivot_table(index=["seed", "layer_index"], columns="norm", values="value")
    # Per seed, the geometric mean over layers of BN's ICS over no norm's: every layer counts alike.
    effects = np.exp(np.log(wide["bn"] / wide["none"]).groupby(level="seed").mean())
    return mean_interval(effects, int(tables.cells["norm"].isin(["bn", "none"]).sum()), log=True)


def _smoother_with_bn(tables: Tables, spec: dict) -> Estimate:
    cells = _with(tables.cells, per_cell(tables.probes, "beta"), "beta")
    return mean_interval(_paired(cells, cells["beta"], "norm", "none", "bn", operator.truediv),
                         int(cells["norm"].isin(["bn", "none"]).sum()), log=True)


def _precise_bn_beats_ema(tables: Tables, spec: dict) -> Estimate:
    cells = tables.cells
    extreme = cells[(cells["bn_momentum"] == cells["bn_momentum"].max()) & (cells["batch_size"] == cells["batch_size"].min())]
    gap = per_cell(tables.probes, "acc_precise") - per_cell(tables.probes, "acc_ema")
    extreme = _with(extreme, gap, "gap")
    note = f"at momentum {extreme['bn_momentum'].max():g}, batch {extreme['batch_size'].min():g}" if len(extreme) else ""
    return mean_interval(extreme.groupby("seed")["gap"].mean(), len(extreme), note,
                         resolution=accuracy_resolution(extreme))


def generalization(probes: pd.DataFrame) -> pd.DataFrame:
    """Per cell: train accuracy (eval mode, after training), test accuracy and their gap."""
    train, test = per_cell(probes, "train_acc_eval"), per_cell(probes, "test_acc_eval")
    return pd.DataFrame({"train_acc_eval": train, "test_acc_eval": test, "gap": train - test})


def _bn_narrows_generalization_gap(tables: Tables, spec: dict) -> Estimate:
    gap = generalization(tables.probes)["gap"]
    cells = _with(tables.cells[(tables.cells["dropout"] == 0) & tables.cells["norm"].isin(["bn", "none"])], gap, "gap")
    return mean_interval(_paired(cells, cells["gap"], "norm", "none", "bn"), len(cells),
                         resolution=accuracy_resolution(cells))  # of the test accuracy, the coarser of the two


FOLDED_OUTPUT_TOLERANCE = 1e-4  # docs/claims.md, C11: folded outputs equal to 1e-4 relative


def folding_speedup(rounds: pd.DataFrame) -> Estimate:
    """The unfolded model's time over the folded one's: per benchmark repeat the median over its rounds, each
    round's two timed back to back; over the repeats, the geometric mean with its interval (one case)."""
    per_repeat = pd.Series(dtype=float)  # none: not timed
    if len(rounds):
        paired = rounds.pivot_table(index=["repeat", "round"], columns="network", values="time_s")
        per_repeat = (paired["unfolded"] / paired["folded"]).groupby(level="repeat").median()
    return mean_interval(per_repeat, 1, unit="repeats", cell_unit="cases", log=True)


def _folding_is_free(tables: Tables, spec: dict) -> Estimate:
    """Speed from the micro-benchmarks, which time the study's model folded and not while nothing else runs (per
    repeat, a session of its own); equal outputs from the trained cells."""
    worst = per_cell(tables.probes, "fold_rel_diff").max()
    fails = (f"folded outputs differ by {worst:.2g} (relative), more than {FOLDED_OUTPUT_TOLERANCE:g}"
             if worst > FOLDED_OUTPUT_TOLERANCE else "")
    rounds = tables.bench
    timed_on = ", ".join(f"{device}: an untrained {model} (batch {shape.split('x')[0]})" for device, model, shape in
                         rounds[["device", "model", "shape"]].drop_duplicates().itertuples(index=False)) \
        if len(rounds) else ""
    estimate = folding_speedup(rounds)
    note = join_notes(estimate.note, f"largest folded output difference {worst:.2g} relative (the trained cells)",
                      f"timed by the micro-benchmarks on {timed_on}" if timed_on else
                      "inference not timed: the micro-benchmarks time it (the config's benchmarks section)")
    return dataclasses.replace(estimate, note=note, fails=fails)


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
          "lr_stability", "largest stable learning rate with BN over that without a norm (decades)",
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
          "learning rate (x; a run that never reaches it is censored at the step budget: a bound, not a value)",
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
ACCURACY_MEASURES = ("final_test_acc", "best_test_acc")
MEASURES: dict[str, Callable[[pd.DataFrame], pd.Series]] = {
    "final_test_acc": lambda cells: accuracy(cells),
    "best_test_acc": lambda cells: accuracy(cells, "best_test_acc"),
    # A diverged cell has no final loss or speed worth a number: its seed drops out (the note counts them).
    "final_test_loss": lambda cells: measured(cells, "final_test_loss"),
    "final_train_loss": lambda cells: measured(cells, "final_train_loss"),
    "train_samples_per_s": lambda cells: measured(cells, "train_samples_per_s"),
}
COMBINE = {"difference": operator.sub, "ratio": operator.truediv}
DECLARED = "declared in the config"  # the anchor of a declared claim that names none


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
    if entry["rule"] == "within" and float(entry["threshold"]) <= 0:
        raise problem("threshold", "'within' bounds the effect's distance from 0: give a positive threshold, e.g. 0.01")
    if entry["combine"] == "ratio" and (entry["rule"] == "within" or float(entry["threshold"]) <= 0):
        raise problem("rule", "a ratio is judged on the log scale against a positive threshold with above or below; "
                              "for 'within', compare a difference")
    if len(entry["compare"]) != 1 or len(next(iter(entry["compare"].values()))) != 2:
        raise problem("compare", "name one setting and the two values compared, e.g. {norm: [dyt, ln]}")
    (axis, (a, b)), = entry["compare"].items()
    if axis not in SETTING_NAMES:
        raise problem("compare", f"{axis!r} is no setting")
    if axis == "seed":
        raise problem("compare", "claims are paired by seed; compare another setting (norm, lr, batch_size, ...)")
    measure_of, combine = MEASURES[entry["measure"]], COMBINE[entry["combine"]]

    ratio = entry["combine"] == "ratio"
    # An accuracy difference is known to one test image at best: tied seeds give no zero-width interval.
    resolution = accuracy_resolution if entry["measure"] in ACCURACY_MEASURES and not ratio else lambda cells: 0.0

    def on(cells: pd.DataFrame) -> Estimate:
        return mean_interval(_paired(cells, measure_of(cells), axis, a, b, combine), len(cells), log=ratio,
                             resolution=resolution(cells))

    def measure(tables: Tables, spec: dict) -> Estimate:
        cells = tables.cells[tables.cells[axis].isin([a, b])]
        # The study's other settings that pair both sides at each of their values: the effect at each apart, so
        # that the report names one whose own verdict differs from the mean's (as for C4 or C10).
        crossed = [other for other in varying_settings(cells) if other not in (axis, "seed")
                   and cells.groupby(other, dropna=False)[axis].nunique().min() == 2]
        return dataclasses.replace(on(cells), conditions=by_condition(cells, crossed, on))

    sign = "/" if ratio else "-"
    label = {value: short_name(value) if is_plugin(value) else value for value in (a, b)}
    return Claim(entry["id"], entry["statement"], entry.get("anchor", DECLARED), study,
                 f"{entry['measure']} of {axis} {label[a]} {sign} {label[b]}, paired by seed, the mean over the "
                 f"study's other settings", entry["rule"],
                 float(entry["threshold"]), measure, {axis: (a, b)}, reads_time=entry["measure"] == "train_samples_per_s")


def study_claims(study: str, spec: dict) -> list[Claim]:
    """The claims a config section lists: built-in ids, and claims declared in place."""
    return [declared_claim(entry, study) if isinstance(entry, dict) else CLAIMS_BY_ID[entry]
            for entry in spec.get("claims", []) if isinstance(entry, dict) or entry in CLAIMS_BY_ID]


def studies_claiming(config: dict, claim_id: str) -> list[str]:
    """The studies of a workflow config that list a built-in claim."""
    return [study for study, spec in config.get("studies", {}).items() if claim_id in spec.get("claims", [])]


def claim_sections(config: dict) -> dict[str, dict]:
    """The parts of a workflow config that may declare claims, by name: each study, and the micro-benchmarks
    as `benchmarks`."""
    return {**config.get("studies", {}), "benchmarks": config.get("benchmarks", {})}


def check_claims(studies: dict[str, dict], cells_by_study: dict[str, list[dict]],
                 gpu_shares: dict[str, int] | None = None) -> None:
    """Refuse, before any run, a claim that cannot be measured: unknown, declared by two studies, declared where
    its measure finds no data (a training claim under `benchmarks`, C12 in a study), declared by a study whose
    cells lack the settings the claim compares or the probes it reads, or a claim on time by a study whose cells
    share GPUs (`gpu_shares`: each study's gpu_share). `studies` are claim_sections(config)."""
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
            if declared_by.get(claim_id) == study:
                raise SettingsError(f"study {study!r} lists claim {claim_id} twice; keep one")
            if claim_id in declared_by:
                raise SettingsError(f"claim {claim_id} is declared by both {declared_by[claim_id]!r} and {study!r}; "
                                    f"keep it in one study")
            declared_by[claim_id] = study
            if claim.reads_time and (gpu_shares or {}).get(study, 1) > 1:
                raise SettingsError(f"study {study!r}: claim {claim_id} reads times, and its cells share GPUs "
                                    f"(resources: gpu_share {gpu_shares[study]}); time it on GPUs of its own "
                                    f"(gpu_share 1) or drop the claim")
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
            if isinstance(entry, dict):
                _check_pairs(study, claim, cells)
            for probe in claim.probes:
                if any(probe not in cell.get("probes", ()) for cell in cells):
                    raise SettingsError(f"study {study!r}: claim {claim_id} reads the {probe!r} probe; add "
                                        f"probes: [{probe}] to the study's fixed settings")


def _check_pairs(study: str, claim: Claim, cells: list[dict]) -> None:
    """A declared claim pairs cells of A and B alike in every other grid value: a setting linked to the compared one
    (world_size with batch_size) leaves no pair, and the claim no value."""
    (axis, (a, b)), = claim.needs.items()
    others = sorted({key for cell in cells for key in cell} - {axis, "seed"})
    side_a, side_b = ({tuple(str(cell.get(key)) for key in others) for cell in cells if cell.get(axis) == value}
                      for value in (a, b))
    if not side_a & side_b:
        apart = [key for index, key in enumerate(others)
                 if not {point[index] for point in side_a} & {point[index] for point in side_b}]
        raise SettingsError(f"study {study!r}: claim {claim.id} compares {axis} {a} with {b}, but no cells of the two "
                            f"are alike in the study's other settings ({', '.join(apart)} changes with {axis}); "
                            f"compare cells that differ in {axis} alone")


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
        note = join_notes(estimate.fails, estimate.note, dissent(estimate, claim, verdict))
        if verdict != "inconclusive":
            needed = (math.nan, math.nan, math.nan)  # decided: no seeds to ask for
        elif (estimate.censored and estimate.samples > 1
                and deciding_side(estimate, claim.rule, claim.threshold) is None):
            note = join_notes(note, "censored samples leave open the side that would decide: more seeds cannot "
                                    "decide it; lengthen the runs, evaluate more often or widen the grid")
            needed = (math.nan, math.nan, math.nan)
        verdicts.append(Verdict(claim, verdict, study, estimate, note, detectable, needed,
                                p_value(estimate, claim.rule, claim.threshold, verdict)))
    holds = holm([v.p_value for v in verdicts], [v.verdict in ("supported", "refuted") for v in verdicts])
    return [dataclasses.replace(v, holds_family_wise=hold) for v, hold in zip(verdicts, holds)]


def dissent(estimate: Estimate, claim: Claim, verdict: str) -> str:
    """The conditions whose own verdict differs from the averaged one, and whether the averaged support rests on a
    single condition."""
    parts = [(label, part, decide(part, claim.rule, claim.threshold)) for label, part in estimate.conditions]
    exceptions = [f"{label}: {part_verdict} ({format_estimate(part)})"
                  for label, part, part_verdict in parts if part_verdict != verdict]
    supporting = [label for label, _, part_verdict in parts if part_verdict == "supported"]
    rests = (f"the support rests on one of {len(parts)} conditions ({supporting[0]})"
             if verdict == "supported" and len(parts) > 1 and len(supporting) == 1 else "")
    return join_notes(rests, "except " + "; ".join(exceptions) if exceptions else "")
