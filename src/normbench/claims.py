"""The common claims about normalization that normbench tests, as computations, and their verdicts.

Each claim that normbench can test names the study kind it reads and a
measure: a function from that study's tables to one effect per seed (or, for
the micro-benchmarks, per timing round). The effect's 95% confidence interval
(a t-interval over seeds, or over repeated benchmark sessions) is compared with the rule
and threshold that the config declares next to the study, so every verdict is
computed from runs: `supported` when the whole interval satisfies the rule,
`refuted` when none of it does, `inconclusive` when it straddles the threshold
(or when one seed gives no interval), `not run` when no study declares the claim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from normbench.config import SETTING_NAMES, SettingsError

CONFIDENCE = 0.95
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


@dataclass(frozen=True)
class Claim:
    id: str
    statement: str
    anchor: str
    experiment: str  # the study (or benchmarks) that measures it
    effect: str  # what the effect is, with its unit
    measure: Callable[[Tables, dict], Estimate] | None = None  # None: normbench has no experiment for it yet
    needs: dict[str, tuple] = field(default_factory=dict)  # axis -> values the study's cells must include
    thresholds: tuple[str, ...] = ()  # keys the study's `report` section must set


@dataclass(frozen=True)
class Verdict:
    claim: Claim
    verdict: str
    study: str | None = None
    rule: str = ""
    estimate: Estimate | None = None
    note: str = ""


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


def _paired(cells: pd.DataFrame, value: pd.Series, axis: str, a, b) -> pd.Series:
    """value(a) - value(b) for cells alike in every other setting, averaged per seed."""
    keys = [c for c in dict.fromkeys([*varying_settings(cells), "seed"]) if c != axis]
    wide = cells.assign(_value=value).pivot_table(index=keys, columns=axis, values="_value")
    return (wide[a] - wide[b]).groupby(level="seed").mean()


# -- intervals ---------------------------------------------------------------------------------------------


def mean_interval(effects: pd.Series, cells: int, note: str = "", lower_bound: bool = False, unit: str = "seeds",
                  cell_unit: str = "cells") -> Estimate:
    """Mean effect over independent samples (seeds, or benchmark repeats) with a Student t 95% interval (none
    from fewer than two)."""
    effects = effects.dropna()
    n = len(effects)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, unit, cells, note or f"no {unit[:-1]} gave a value",
                        cell_unit=cell_unit)
    mean = float(effects.mean())
    if n == 1:
        return Estimate(mean, math.nan, math.nan, 1, unit, cells, note or f"one {unit[:-1]}: no interval",
                        lower_bound, cell_unit)
    from scipy import stats  # here, not at the top: the workflow imports this module while it plans

    sem = float(stats.sem(effects))
    low, high = (mean, mean) if sem == 0 else stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=sem)
    return Estimate(mean, float(low), float(high), n, unit, cells, note, lower_bound, cell_unit)


def time_ratio(rounds: pd.DataFrame, norm: str, reference: str) -> pd.Series:
    """Per benchmark repeat (one process each), the norm's median time over the reference's: medians are robust
    to a round that another process interrupted, and repeats are independent where rounds are not."""
    medians = rounds.groupby(["repeat", "norm"])["time_s"].median().unstack("norm")
    return medians[norm] / medians[reference]


def decide(estimate: Estimate, rule: str, threshold: float) -> str:
    """supported / refuted / inconclusive from where the interval lies against the threshold."""
    low, high = estimate.low, estimate.high
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
    return mean_interval(effects, len(cells), "; ".join(filter(None, notes)), lower_bound=bool(censored.any()))


def _init_robustness_with_bn(tables: Tables, spec: dict) -> Estimate:
    cells = tables.cells[tables.cells["init"].isin(BADLY_SCALED_INITS)]
    return mean_interval(_paired(cells, accuracy(cells), "norm", "bn", "none"), len(cells))


def _balanced_gradients_with_bn(tables: Tables, spec: dict) -> Estimate:
    probes = tables.probes
    at_init = probes[(probes["step"] == 0) & (probes["quantity"] == "grad_norm") & (probes["activation"] == "sigmoid")]
    ends = at_init.sort_values("layer_index").groupby("cell")["value"].agg(["first", "last"])
    distance = np.log10(ends["first"] / ends["last"]).abs().rename("decades")  # 0: first and last layer alike
    cells = tables.cells[tables.cells["activation"] == "sigmoid"].set_index("cell")
    cells = cells.join(distance, how="inner").reset_index()
    return mean_interval(_paired(cells, cells["decades"], "norm", "none", "bn"), len(cells))


def _bn_gap_at_small_batch(tables: Tables, spec: dict) -> Estimate:
    cells = tables.cells[tables.cells["batch_size"] == tables.cells["batch_size"].min()]
    return mean_interval(_paired(cells, accuracy(cells), "norm", "gn", "bn"), len(cells))


def _syncbn_matches_global_bn(tables: Tables, spec: dict) -> Estimate:
    cells = tables.cells.assign(global_batch=tables.cells["batch_size"] * tables.cells["world_size"])
    sync = cells[(cells["norm"] == "syncbn") & (cells["world_size"] == cells["world_size"].max())]
    single = cells[(cells["norm"] == "bn") & (cells["world_size"] == 1)]
    joined = sync.assign(acc=accuracy(sync)).merge(single.assign(acc=accuracy(single)), on=["global_batch", "seed"],
                                                   suffixes=("_sync", "_single"))
    effects = (joined["acc_sync"] - joined["acc_single"]).groupby(joined["seed"]).mean()
    return mean_interval(effects, len(sync) + len(single))


def _ln_beats_bn_in_transformers(tables: Tables, spec: dict) -> Estimate:
    cells = tables.cells[tables.cells["norm"].isin(["ln", "bn"])]
    return mean_interval(_paired(cells, accuracy(cells), "norm", "ln", "bn"), len(cells))


def _gn_ln_slower_than_bn(tables: Tables, spec: dict) -> Estimate:
    bench = tables.bench
    rounds = bench[(bench["layout"] == "channels") & (bench["dtype"] == "fp32")]
    effects = (time_ratio(rounds, "gn", "bn") + time_ratio(rounds, "ln", "bn")) / 2
    rms = mean_interval(time_ratio(rounds, "rms", "ln"), 2, unit="repeats") if "rms" in set(rounds["norm"]) else None
    notes = [f"measured on {', '.join(sorted(set(rounds['device'])))}",
             f"RMSNorm over LN's time: {rms.value:.2f} [{rms.low:.2f}, {rms.high:.2f}]" if rms else ""]
    return mean_interval(effects, 3, "; ".join(filter(None, notes)), unit="repeats", cell_unit="cases")


CLAIMS: tuple[Claim, ...] = (
    Claim("C1", "BN reduces internal covariate shift: layer-input distributions stay stable during training",
          "Ioffe & Szegedy 2015, Fig. 1", "bn_fig1", "drift of a layer's input percentiles over training"),
    Claim("C2", "BN's benefit does not come from less ICS; it smooths the loss landscape",
          "Santurkar et al. 2018", "ics", "ICS (L2, cosine) and loss-landscape smoothness"),
    Claim("C3", "BN allows much larger learning rates", "Ioffe & Szegedy 2015; Bjorck et al. 2018",
          "learning_rate", "largest stable learning rate with BN over that without a norm (decades)",
          _larger_stable_lr_with_bn, {"norm": ("bn", "none"), "lr": ()}),
    Claim("C4", "BN makes training robust to weight initialization; without it a badly scaled init cannot learn",
          "Glorot & Bengio 2010; He et al. 2015", "init",
          "final test accuracy with BN minus without, at the badly scaled inits N(0,0.01²) and N(0,1)",
          _init_robustness_with_bn, {"norm": ("bn", "none"), "init": ()}),
    Claim("C5", "Sigmoid networks suffer vanishing gradients; BN keeps inputs out of the saturated region",
          "lecture notes (0.25^d)", "init",
          "how many decades closer to 1 BN keeps the first-to-last layer gradient-norm ratio of sigmoid nets at init",
          _balanced_gradients_with_bn, {"norm": ("bn", "none"), "activation": ("sigmoid",)}),
    Claim("C6", "BN degrades at small batch while GN/LN are batch-independent", "Wu & He 2018, Fig. 1",
          "batch_size", "final test accuracy of GN minus BN at the smallest per-worker batch",
          _bn_gap_at_small_batch, {"norm": ("bn", "gn"), "batch_size": ()}),
    Claim("C7", "SyncBN across data-parallel workers recovers large-batch BN",
          "Peng et al. 2018; Wu & Johnson 2021", "distributed",
          "final test accuracy of SyncBN on the most workers minus single-process BN at the same global batch",
          _syncbn_matches_global_bn, {"norm": ("bn", "syncbn"), "world_size": (1,)}),
    Claim("C8", "Running statistics (momentum EMA) can differ from the true population statistics",
          "Ioffe & Szegedy 2015 §3.1; Wu & Johnson 2021", "inference", "accuracy with EMA vs precise-BN statistics"),
    Claim("C9", "BN regularizes like dropout and may replace it", "Ioffe & Szegedy 2015 §4.2; Hoffer et al. 2017",
          "regularization", "train-test accuracy gap with and without BN and dropout"),
    Claim("C10", "BN is a poor fit for Transformers; LayerNorm (or RMSNorm) is the standard",
          "Ba et al. 2016; Shen et al. 2020; Xiong et al. 2020", "transformer",
          "final test accuracy of LN minus BN, averaged over placement and warm-up",
          _ln_beats_bn_in_transformers, {"norm": ("ln", "bn")}),
    Claim("C11", "At inference, BN folds into the preceding conv/linear layer for free", "lecture notes",
          "inference", "output difference folded vs unfolded"),
    Claim("C12", "Normalization costs compute: GN/LN are slower than BN", "Wu & He 2018; Zhang & Sennrich 2019",
          "benchmarks", "median forward+backward time of GN and LN over BN's, fp32 conv maps (x)",
          _gn_ln_slower_than_bn),
    Claim("C13", "BN speeds up training: the same accuracy in far fewer steps", "Ioffe & Szegedy 2015",
          "learning_rate", "steps to the target accuracy without a norm over those with BN, each at its best "
          "learning rate (x; a run that never reaches it counts all its steps)",
          _fewer_steps_with_bn, {"norm": ("bn", "none"), "lr": ()}, ("target_acc",)),
)
CLAIMS_BY_ID = {claim.id: claim for claim in CLAIMS}


def claim_sections(config: dict) -> dict[str, dict]:
    """The parts of a workflow config that may declare claims, by name: each study, and the micro-benchmarks
    as `benchmarks`."""
    return {**config.get("studies", {}), "benchmarks": config.get("benchmarks", {})}


def check_claims(studies: dict[str, dict], cells_by_study: dict[str, list[dict]]) -> None:
    """Refuse, before any run, a claim that cannot be measured: unknown, without an experiment in normbench,
    declared by two studies, or declared by a study whose cells lack the settings the claim compares."""
    declared_by: dict[str, str] = {}
    for study, spec in studies.items():
        for claim_id in spec.get("claims", {}):
            claim = CLAIMS_BY_ID.get(claim_id)
            if claim is None:
                raise SettingsError(f"study {study!r}: unknown claim {claim_id!r}; known: {', '.join(CLAIMS_BY_ID)}")
            if claim.measure is None:
                raise SettingsError(f"study {study!r}: claim {claim_id} has no experiment in normbench yet "
                                    f"(it needs a {claim.experiment!r} study); remove it from the study's claims")
            if claim_id in declared_by:
                raise SettingsError(f"claim {claim_id} is declared by both {declared_by[claim_id]!r} and {study!r}; "
                                    f"keep it in one study")
            declared_by[claim_id] = study
            for key in claim.thresholds:
                if key not in spec.get("report", {}):
                    raise SettingsError(f"study {study!r}: claim {claim_id} needs report: {{{key}: ...}} in the study")
            for axis, values in claim.needs.items():
                present = {cell.get(axis) for cell in cells_by_study.get(study, [])}
                missing = [v for v in values if v not in present]
                if missing or (not values and len(present) < 2):
                    wanted = f"the values {', '.join(map(str, values))}" if values else "at least two values"
                    raise SettingsError(f"study {study!r}: claim {claim_id} compares {axis} and needs {wanted} "
                                        f"among its cells; add them to the grid or drop the claim")


def evaluate(studies: dict[str, dict], tables_by_study: dict[str, Tables]) -> list[Verdict]:
    """One verdict per claim, in the order of CLAIMS, from the studies (config specs) that declare it;
    `not run` where no study with results does."""
    declared = {claim_id: study for study, spec in studies.items() if study in tables_by_study
                for claim_id in spec.get("claims", {})}
    verdicts = []
    for claim in CLAIMS:
        study = declared.get(claim.id)
        if study is None:
            why = f"no {claim.experiment} study in this run" if claim.measure else \
                f"normbench has no {claim.experiment} study yet"
            verdicts.append(Verdict(claim, "not run", note=why))
            continue
        rule = studies[study]["claims"][claim.id]
        estimate = claim.measure(tables_by_study[study], studies[study])
        verdicts.append(Verdict(claim, decide(estimate, rule["rule"], rule["threshold"]), study,
                                RULES[rule["rule"]].format(threshold=rule["threshold"]), estimate, estimate.note))
    return verdicts
