"""Verdicts on synthetic results whose truth is known: a clear effect is supported, noise is
inconclusive, the opposite effect is refuted; bad claim declarations are refused before any run."""

import itertools
import math
import re

import numpy as np
import pandas as pd
import pytest

from scipy import stats

from normbench.claims import (CLAIMS, Estimate, Side, Tables, bounded_interval, by_condition, check_claims,
                              claim_sections, decide, evaluate, format_estimate, holm, mean_interval, p_value,
                              power_analysis)
from normbench.config import SettingsError

SEEDS = range(5)


def cells_table(axes: dict, accuracy, seeds=SEEDS, rng_seed=0, **fixed) -> pd.DataFrame:
    """One row per grid point and seed; `accuracy(point, rng)` gives its final test accuracy."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for values in itertools.product(*axes.values(), seeds):
        point = dict(zip([*axes, "seed"], values))
        cell = "/".join(f"{k}~{v}" for k, v in point.items())
        rows.append({"cell": cell, "diverged": False, **fixed, **point, "final_test_acc": accuracy(point, rng)})
    return pd.DataFrame(rows)


def verdict(study: str, claim_id: str, tables: Tables, **spec):
    """The claim's verdict, judged by its own rule and threshold (docs/claims.md's)."""
    verdicts = evaluate({study: {"claims": [claim_id], **spec}}, {study: tables})
    return next(v for v in verdicts if v.claim.id == claim_id)


@pytest.mark.parametrize("gap, spread, expected", [(0.1, 0.005, "supported"), (0.0, 0.05, "inconclusive"),
                                                   (-0.1, 0.005, "refuted")])
def test_small_batch_gap(gap, spread, expected):
    def accuracy(point, rng):
        small_batch_gap = gap if point["batch_size"] == 4 and point["norm"] == "bn" else 0.0
        return 0.8 - small_batch_gap + rng.normal(0, spread)

    cells = cells_table({"norm": ["bn", "gn"], "batch_size": [4, 64]}, accuracy)
    result = verdict("batch_size", "C6", Tables(cells))
    assert result.verdict == expected
    assert result.estimate.samples == 5 and result.estimate.cells == 15  # BN at batch 4, GN at every batch
    assert result.estimate.value == pytest.approx(gap, abs=0.06)


@pytest.mark.parametrize("difference, spread, expected", [(0.0, 0.002, "supported"), (0.0, 0.05, "inconclusive"),
                                                          (0.1, 0.002, "refuted")])
def test_syncbn_equivalence_is_a_two_sided_rule(difference, spread, expected):
    points = [("bn", 1, 32), ("bn", 2, 16), ("syncbn", 2, 16)]
    rows = []
    rng = np.random.default_rng(1)
    for (norm, world, batch), seed in itertools.product(points, SEEDS):
        acc = 0.8 + (difference if norm == "syncbn" else 0.0) + rng.normal(0, spread)
        rows.append({"cell": f"{norm}/{world}/{seed}", "norm": norm, "world_size": world, "batch_size": batch,
                     "seed": seed, "diverged": False, "final_test_acc": acc})
    result = verdict("distributed", "C7", Tables(pd.DataFrame(rows)))
    assert result.verdict == expected


@pytest.mark.parametrize("slowdown, spread, repeats, expected", [(2.0, 0.05, 5, "supported"),
                                                                (1.0, 0.5, 3, "inconclusive"),
                                                                (0.5, 0.05, 5, "refuted")])
def test_benchmark_ratio_interval_is_over_repeats(slowdown, spread, repeats, expected):
    """Each repeat (a process) has its own speed, shared by all its rounds: the interval must follow the repeats."""
    rng = np.random.default_rng(2)
    rows = []
    for repeat in range(repeats):
        session_speed = rng.normal(1.0, spread)  # what a rerun changes; rounds within a session barely differ
        for norm, scale in (("bn", 1.0), ("gn", slowdown), ("ln", slowdown), ("rms", 0.5 * slowdown)):
            ratio = scale * (session_speed if norm != "bn" else 1.0)
            rows += [{"repeat": repeat, "layout": "channels", "dtype": "fp32", "device": "cpu", "norm": norm,
                      "time_s": max(1e-6, t)} for t in rng.normal(ratio, 0.001, 50) * 1e-3]
    result = verdict("benchmarks", "C12", Tables(bench=pd.DataFrame(rows)))
    assert result.verdict == expected
    assert result.estimate.sample_unit == "repeats" and result.estimate.samples == repeats
    assert re.match(r"decided by (GN|LN) on cpu \(both must be slower\); RMSNorm over LN's time: 0.5", result.note)
    assert [label for label, _ in result.estimate.conditions] == ["GN on cpu", "LN on cpu"]  # each apart


def test_c12_without_an_interval_for_one_norm_is_inconclusive():
    """GN clearly slower over 3 repeats, LN timed in one repeat only (no interval), or not at all: the claim says
    both are slower, so the one without an interval decides, inconclusively."""
    def rows(norm, repeats, ratio):
        return [{"repeat": r, "layout": "channels", "dtype": "fp32", "device": "cpu", "norm": norm,
                 "time_s": ratio * 1e-3} for r in repeats for _ in range(5)]

    timed = rows("bn", range(3), 1.0) + rows("gn", range(3), 2.0)
    one_ln = verdict("benchmarks", "C12", Tables(bench=pd.DataFrame(timed + rows("ln", [0], 1.0))))
    assert one_ln.verdict == "inconclusive" and one_ln.note.startswith("decided by LN on cpu")
    no_ln = verdict("benchmarks", "C12", Tables(bench=pd.DataFrame(timed)))
    assert no_ln.verdict == "inconclusive" and no_ln.note.startswith("decided by LN on cpu")


def learning_rate_tables(none_diverges_from: float, none_speed: float = 0.3) -> Tables:
    """bn learns at every lr; none diverges from `none_diverges_from` on and learns slower. Evaluations every 5
    steps to 60: accuracy 0.04 * speed * step, at most 0.8 (bn crosses 0.7 between steps 15 and 20; none, at the
    default speed, between 55 and 60)."""
    cells = cells_table({"norm": ["bn", "none"], "lr": [0.01, 0.1, 1.0, 10.0]}, lambda point, rng: 0.8)
    cells["diverged"] = (cells["norm"] == "none") & (cells["lr"] >= none_diverges_from)
    cells.loc[cells["diverged"], "final_test_acc"] = np.nan
    curves = []
    for _, cell in cells.iterrows():
        for step in range(5, 61, 5):
            speed = 1.0 if cell["norm"] == "bn" else none_speed
            acc = 0.1 if cell["diverged"] else min(0.8, 0.04 * speed * step)
            curves.append({"cell": cell["cell"], "norm": cell["norm"], "lr": cell["lr"], "seed": cell["seed"],
                           "step": step, "elapsed_s": step / 10, "test_acc": acc})
    return Tables(cells, pd.DataFrame(curves))


def test_learning_rate_claims_measure_range_and_speed():
    tables = learning_rate_tables(none_diverges_from=1.0)
    report = {"report": {"target_acc": 0.7, "stable_acc": 0.5}}
    c3 = verdict("learning_rate", "C3", tables, **report)
    # BN stable at the top lr (10: at least that), none up to 0.1 and unstable from 1: at least 10 / 1, one decade;
    # on a decade grid the seeds' tie is known only to a grid step, so the bar of half a decade is not cleared.
    assert c3.estimate.value == pytest.approx(1.0) and c3.estimate.lower_bound and c3.verdict == "inconclusive"
    assert c3.estimate.low == pytest.approx(0.5) and "stable at the top lr tried (extend the grid)" in c3.note
    c13 = verdict("learning_rate", "C13", tables, **report)
    # bn reaches 0.7 in (15, 20] steps, none in (55, 60]: none over bn lies in [55/20, 60/15].
    assert c13.estimate.low == pytest.approx(2.75) and c13.estimate.high == pytest.approx(4.0)
    assert c13.estimate.value == pytest.approx(math.sqrt(2.75 * 4.0)) and c13.verdict == "supported"
    same = verdict("learning_rate", "C3",
                   learning_rate_tables(none_diverges_from=100.0), **report)
    assert same.verdict == "inconclusive"  # both stable at the top: the grid says nothing of either boundary
    assert math.isnan(same.seeds_needed[1]) and "more seeds cannot decide it" in same.note
    slower = verdict("learning_rate", "C13", learning_rate_tables(100.0, none_speed=0.5), **report)
    # none in (30, 35]: the ratio lies in [1.5, 2.33], across the bar of 2 in every seed: evaluations too sparse
    assert slower.verdict == "inconclusive" and math.isnan(slower.seeds_needed[1])
    assert "more seeds cannot decide it" in slower.note
    alike = verdict("learning_rate", "C13", learning_rate_tables(100.0, none_speed=1.0), **report)
    assert alike.estimate.high == pytest.approx(20 / 15) and alike.verdict == "refuted"  # both in (15, 20]
    censored = verdict("learning_rate", "C13", tables,
                       report={"target_acc": 0.75, "stable_acc": 0.5})  # none never gets there
    assert censored.estimate.value == pytest.approx(3.0) and censored.estimate.lower_bound  # 60 budget steps / 20
    assert censored.verdict == "supported" and "never reached" in censored.note


def test_no_stable_lr_or_target_without_a_norm_gives_lower_bounds():
    tables = learning_rate_tables(none_diverges_from=0.0)  # no lr is stable without a norm
    diverged = tables.cells.loc[tables.cells["diverged"], "cell"]
    tables = Tables(tables.cells, tables.curves[~tables.curves["cell"].isin(diverged)])  # died before an eval
    report = {"report": {"target_acc": 0.7, "stable_acc": 0.5}}
    c3 = verdict("learning_rate", "C3", tables, **report)
    assert c3.estimate.lower_bound and c3.estimate.value == pytest.approx(3.0)  # bn to 10, none below 0.01
    assert c3.verdict == "supported" and "stable at no lr" in c3.note
    c13 = verdict("learning_rate", "C13", tables, **report)
    assert c13.estimate.samples == len(SEEDS) and c13.estimate.lower_bound  # every seed counted, at the budget
    assert c13.estimate.value == pytest.approx(3.0) and c13.verdict == "supported"  # 60 budget steps over 20


def test_a_failed_or_timed_out_run_is_not_a_run_that_never_reached_the_target():
    tables = learning_rate_tables(none_diverges_from=100.0)
    cells = tables.cells.assign(failed=False, timed_out=False, steps=60)
    bn_seed0 = (cells["norm"] == "bn") & (cells["seed"] == 0)
    none_seed1 = (cells["norm"] == "none") & (cells["seed"] == 1)
    cells.loc[bn_seed0, "failed"] = True  # out of memory: left out
    cells.loc[none_seed1, ["timed_out", "steps"]] = [True, 25]  # stopped at step 25: censored there
    curves = tables.curves[~(tables.curves["cell"].isin(cells.loc[none_seed1, "cell"]) & (tables.curves["step"] > 25))]
    c13 = verdict("learning_rate", "C13", Tables(cells, curves), report={"target_acc": 0.7, "stable_acc": 0.5})
    assert c13.estimate.samples == len(SEEDS) - 1  # seed 0 has no BN run to compare
    assert "1 of 5 seed(s) without a norm never reached" in c13.note


def test_a_timed_out_lr_says_nothing_of_the_stability_boundary():
    """none diverges from lr 1 on. In seed 0 its lr-1 run timed out instead: that seed's boundary is then known only
    to lie above 0.1 and below 10, not below 1; BN's top lr timing out leaves its boundary open above 1."""
    tables = learning_rate_tables(none_diverges_from=1.0)
    cells = tables.cells.assign(timed_out=False)
    none_seed0_lr1 = (cells["norm"] == "none") & (cells["seed"] == 0) & (cells["lr"] == 1.0)
    cells.loc[none_seed0_lr1, ["diverged", "timed_out"]] = [False, True]
    report = {"report": {"target_acc": 0.7, "stable_acc": 0.5}}
    c3 = verdict("learning_rate", "C3", Tables(cells, tables.curves), **report)
    # Seed 0: BN at least 10, none in [0.1, 10): at least 0 decades. The others: at least 10 / 1, one decade.
    assert c3.estimate.lower_side.mean == pytest.approx((0 + 1 + 1 + 1 + 1) / 5)
    bn_top = (cells["norm"] == "bn") & (cells["lr"] == 10.0)
    cells.loc[bn_top, "timed_out"] = True
    c3 = verdict("learning_rate", "C3", Tables(cells, tables.curves), **report)
    assert c3.estimate.lower_side.mean == pytest.approx((-1 + 0 + 0 + 0 + 0) / 5)  # BN at least 1 now, not 10


def test_init_claims_read_bad_inits_and_sigmoid_gradients():
    def accuracy(point, rng):
        cannot_learn = point["norm"] == "none" and point["init"] != "kaiming"
        return (0.1 if cannot_learn else 0.8) + rng.normal(0, 0.01)

    cells = cells_table({"activation": ["sigmoid", "relu"], "init": ["normal-0.01", "kaiming", "normal-1"],
                         "norm": ["bn", "none"]}, accuracy)
    probes = []
    for _, cell in cells.iterrows():
        for layer in range(4):  # sigmoid without a norm loses a decade per layer toward the input
            decay = 10.0 ** -(3 - layer) if cell["norm"] == "none" and cell["activation"] == "sigmoid" else 1.0
            probes.append({"cell": cell["cell"], "activation": cell["activation"], "step": 0, "layer_index": layer,
                           "quantity": "grad_norm", "value": decay})
    tables = Tables(cells, probes=pd.DataFrame(probes))
    c4 = verdict("init", "C4", tables)
    assert c4.estimate.value == pytest.approx(0.7, abs=0.02) and c4.verdict == "supported"
    c5 = verdict("init", "C5", tables)
    assert c5.estimate.value == pytest.approx(3.0) and c5.verdict == "supported"


def test_diverged_transformer_counts_at_chance():
    cells = cells_table({"norm": ["ln", "bn"], "norm_placement": ["pre", "post"]}, lambda point, rng: 0.7)
    cells["diverged"] = cells["norm"] == "bn"
    result = verdict("transformer", "C10", Tables(cells))
    assert result.estimate.value == pytest.approx(0.6) and result.verdict == "supported"


def test_one_seed_gives_no_interval_and_absent_studies_are_not_run():
    cells = cells_table({"norm": ["bn", "gn"], "batch_size": [4, 64]}, lambda point, rng: 0.8, seeds=[0])
    verdicts = evaluate({"batch_size": {"claims": ["C6"]}}, {"batch_size": Tables(cells)})
    assert [v.claim.id for v in verdicts] == [claim.id for claim in CLAIMS]
    by_id = {v.claim.id: v for v in verdicts}
    assert by_id["C6"].verdict == "inconclusive" and "one seed" in by_id["C6"].note
    assert {v.verdict for k, v in by_id.items() if k != "C6"} == {"not run"}


def test_decide_follows_the_interval():
    def interval(low, high):
        return Estimate((low + high) / 2, low, high, 3, "seeds", 6)

    assert decide(interval(0.1, 0.2), "above", 0.05) == "supported"
    assert decide(interval(0.0, 0.2), "above", 0.05) == "inconclusive"
    assert decide(interval(-0.2, 0.0), "above", 0.05) == "refuted"
    assert decide(interval(-0.2, -0.1), "below", 0.0) == "supported"
    assert decide(interval(-0.01, 0.01), "within", 0.02) == "supported"
    assert decide(interval(0.03, 0.05), "within", 0.02) == "refuted"
    censored = Estimate(1.0, 0.9, math.inf, 3, "seeds", 6)  # the true effect may be any larger
    assert decide(censored, "above", 2.0) == "inconclusive" and decide(censored, "above", 0.5) == "supported"


@pytest.mark.parametrize("studies, cells, message", [
    ({"s": {"claims": ["C99"]}}, {"s": []}, "unknown claim 'C99'"),
    ({"s": {"claims": ["C6"]}}, {"s": [{"norm": "bn", "batch_size": 4}, {"norm": "bn", "batch_size": 8}]},
     "needs the values gn"),
    ({"s": {"claims": ["C3"]}}, {"s": [{"norm": "bn", "lr": 0.1}, {"norm": "none", "lr": 0.1}]},
     "lr and needs at least two values"),
    ({"s": {"claims": ["C13"]}}, {"s": [{"norm": n, "lr": lr} for n in ("bn", "none") for lr in (0.1, 1)]},
     "needs report: {target_acc"),
    ({"s": {"claims": ["C2a"]}}, {"s": [{"norm": n} for n in ("bn", "none")]}, "reads the 'ics' probe"),
    ({"a": {"claims": ["C6"]}, "b": {"claims": ["C6"]}}, {"a": [{"norm": "gn"}], "b": [{"norm": "gn"}]},
     "declared by both 'a' and 'b'"),
    # Each claim's measure reads one kind of table: the micro-benchmarks' rounds (C12), or a study's cells.
    ({"s": {"claims": ["C12"]}}, {"s": [{"norm": n} for n in ("bn", "gn", "ln")]},
     "study 's': claim C12 is measured by the micro-benchmarks, not by training cells: list it under benchmarks: "
     "claims"),
    ({"benchmarks": {"claims": ["C12", "C6"]}}, {},
     "benchmarks: claim C6 is measured by training cells (a batch_size study), not by the micro-benchmarks: list it "
     "under a study's claims"),
])
def test_impossible_claims_are_refused(studies, cells, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        check_claims(studies, cells)


def test_c12_is_accepted_under_benchmarks():
    check_claims(claim_sections({"studies": {"s": {"claims": []}}, "benchmarks": {"claims": ["C12"]}}), {"s": []})


def exact(value: float, spread: float, samples: int) -> Estimate:
    """An estimate from `samples` exactly measured samples of this mean and spread."""
    side = Side(value, spread / math.sqrt(samples), samples)
    return Estimate(value, side.end(upper=False), side.end(upper=True), samples, "seeds", 2 * samples,
                    spread=spread, lower_side=side, upper_side=side)


def test_power_matches_the_published_one_sample_case():
    """G*Power's one-sample t-test: d = 0.5, two-sided 5%, power 0.8 needs 34 samples (33.37 rounded up)."""
    detectable, needed = power_analysis(exact(0.5, 1.0, 3), "above", 0.0)
    assert needed[1] == 34
    assert needed[0] < 34 < needed[2]  # a spread from 3 seeds is known only to a wide range
    assert detectable > 0.5  # three seeds detect only far larger effects than half a spread
    assert power_analysis(exact(0.5, 1.0, 34), "above", 0.0)[0] < 0.5
    # A small spread: scipy's noncentral t gives NaN at a large shift and few degrees of freedom; the range stays
    # ordered (a smaller spread never needs more seeds).
    low, point, high = power_analysis(exact(0.035, 0.0093, 3), "above", 0.0)[1]
    assert low == point == 3 <= high
    assert all(math.isnan(v) for v in power_analysis(Estimate(0.5, math.nan, math.nan, 1, "seeds", 2), "above", 0)[1])


def test_within_rules_get_the_power_of_two_one_sided_tests():
    """Seeds needed to show |effect| < 0.02 at a true effect of 0.01 and a spread of 0.02, checked by simulating
    the 95% interval: at that count at least 80% of runs land inside the bounds, at a few fewer not."""
    needed = power_analysis(exact(0.01, 0.02, 3), "within", 0.02)[1][1]
    rng = np.random.default_rng(0)

    def simulated(n: int) -> float:
        samples = rng.normal(0.01, 0.02, (40_000, n))
        half = stats.t.ppf(0.975, n - 1) * samples.std(axis=1, ddof=1) / math.sqrt(n)
        means = samples.mean(axis=1)
        return float(((means - half > -0.02) & (means + half < 0.02)).mean())

    assert simulated(int(needed)) >= 0.79 and simulated(int(needed) - 3) < 0.8


def test_ratio_claims_are_judged_on_the_log_scale():
    """Ratios 0.2, 1 and 5: an arithmetic interval reaches below zero, the one of the logarithms cannot."""
    estimate = mean_interval(pd.Series([0.2, 1.0, 5.0]), 6, log=True)
    assert estimate.value == pytest.approx(1.0) and 0 < estimate.low < 1 < estimate.high
    assert estimate.low * estimate.high == pytest.approx(1.0)  # symmetric in the logarithms
    assert mean_interval(pd.Series([0.2, 1.0, 5.0]), 6).low < 0


def test_an_infinite_sample_is_a_bound_at_the_largest_finite_one():
    """A ratio over a zero (BN's drift or beta exactly 0) is larger than any measured ratio: it counts as at least
    the largest finite sample, so it can support an `above` rule but never refute it, and shows as a bound."""
    estimate = mean_interval(pd.Series([3.0, 3.1, 2.9, math.inf]), 8, log=True)
    bounds = np.log([3.0, 3.1, 2.9, 3.1])
    low = math.exp(bounds.mean() - stats.t.ppf(0.975, 3) * bounds.std(ddof=1) / 2)
    assert estimate.censored == 1 and estimate.lower_bound and estimate.high == math.inf
    assert estimate.low == pytest.approx(low) and decide(estimate, "above", 2.0) == "supported"
    below = mean_interval(pd.Series([3.0, 3.1, 2.9, 0.0]), 8, log=True)  # a ratio of zero: at most the smallest
    assert below.upper_bound and below.low == 0.0 and decide(below, "above", 4.0) == "refuted"


def test_one_censored_sample_shows_as_a_bound():
    estimate = bounded_interval(pd.Series([4.0]), pd.Series([math.inf]), 2, log=True)
    assert format_estimate(estimate) == "≥ 4" and decide(estimate, "above", 2.0) == "inconclusive"


def test_tied_samples_get_the_resolution_of_the_measure():
    estimate = mean_interval(pd.Series([0.5, 0.5]), 4, resolution=0.01)
    assert estimate.low == pytest.approx(0.495) and estimate.high == pytest.approx(0.505)


def test_holm_keeps_only_verdicts_that_survive_the_family():
    """p = 0.01, 0.02, 0.04 over three claims: Holm's thresholds are 0.05/3, 0.05/2 and 0.05."""
    assert holm([0.01, 0.02, 0.04, math.nan], [True] * 4) == [True, True, True, None]
    assert holm([0.01, 0.03, 0.04], [True] * 3) == [True, False, False]
    # The family is every claim tested, not only those that came out decided: an inconclusive one counts too.
    assert holm([0.015, 0.03], [True, True]) == [True, True]
    assert holm([0.015, 0.03, 0.5], [True, True, False]) == [True, False, None]
    decided = exact(0.1, 0.01, 5)
    p = p_value(decided, "above", 0.05, "supported")
    assert p == pytest.approx(2 * stats.t.sf((0.1 - 0.05) / (0.01 / math.sqrt(5)), 4))
    undecided = exact(0.06, 0.05, 5)
    assert decide(undecided, "above", 0.05) == "inconclusive" and p_value(undecided, "above", 0.05, "inconclusive") > 0.05
    assert math.isnan(p_value(Estimate(0.1, math.nan, math.nan, 1, "seeds", 2), "above", 0.05, "inconclusive"))


def probe_rows(cells: pd.DataFrame, rows_of) -> pd.DataFrame:
    """Tidy probe rows for each cell: `rows_of(cell)` gives (quantity, value, extra columns) triples."""
    return pd.DataFrame([{"cell": cell["cell"], "quantity": q, "value": v, **extra}
                         for _, cell in cells.iterrows() for q, v, extra in rows_of(cell)])


def test_percentile_drift_without_bn_over_with_bn():
    cells = cells_table({"norm": ["bn", "none"]}, lambda point, rng: 0.9)

    def rows_of(cell):  # width 1 throughout; the median walks 6 widths without a norm, 1 with BN
        walk = 6.0 if cell["norm"] == "none" else 1.0
        return [(f"p{p}", walk * step / 10 + offset, {"unit": unit, "step": step})
                for step in range(11) for unit in range(2) for p, offset in ((15, -0.5), (50, 0.0), (85, 0.5))]

    result = verdict("bn_fig1", "C1", Tables(cells, probes=probe_rows(cells, rows_of)))
    assert result.estimate.value == pytest.approx(6.0) and result.verdict == "supported"


def test_ics_and_smoothness_ratios():
    cells = cells_table({"norm": ["bn", "none", "noisybn"]}, lambda point, rng: 0.9)

    def rows_of(cell):  # BN: twice the ICS of no norm in every layer, a third of its beta
        ics = {"bn": 2.0, "none": 1.0, "noisybn": 5.0}[cell["norm"]]
        beta = {"bn": 1.0, "none": 3.0, "noisybn": 1.0}[cell["norm"]]
        return [("ics_l2", ics * (layer + 1), {"layer_index": layer, "step": 0}) for layer in range(3)] + \
            [("beta", beta, {"step": 0})]

    tables = Tables(cells, probes=probe_rows(cells, rows_of))
    c2a, c2b = verdict("ics", "C2a", tables), verdict("ics", "C2b", tables)
    assert c2a.estimate.value == pytest.approx(2.0) and c2a.verdict == "supported"
    assert c2b.estimate.value == pytest.approx(3.0) and c2b.verdict == "supported"


def test_precise_bn_gap_is_read_at_the_extreme_cell():
    cells = cells_table({"bn_momentum": [0.1, 0.9], "batch_size": [8, 64]}, lambda point, rng: 0.9, norm="bn")

    def rows_of(cell):  # the EMA loses 5 points at momentum 0.9 and batch 8 only
        loss = 0.05 if (cell["bn_momentum"], cell["batch_size"]) == (0.9, 8) else 0.0
        return [("acc_ema", 0.9 - loss, {}), ("acc_precise", 0.9, {})]

    result = verdict("inference", "C8", Tables(cells, probes=probe_rows(cells, rows_of)))
    assert result.estimate.value == pytest.approx(0.05) and result.verdict == "supported"
    assert "momentum 0.9, batch 8" in result.note
    # Every seed's gap the same: known to one test image (2,000 here), not to a zero-width interval.
    tied = verdict("inference", "C8", Tables(cells.assign(test_subset=2000), probes=probe_rows(cells, rows_of)))
    assert tied.estimate.high - tied.estimate.low == pytest.approx(1 / 2000)


def test_generalization_gap_without_bn_minus_with_bn():
    cells = cells_table({"norm": ["bn", "none"], "dropout": [0.0, 0.3]}, lambda point, rng: 0.8)

    def rows_of(cell):
        gap = 0.15 if cell["norm"] == "none" and cell["dropout"] == 0 else 0.05
        return [("train_acc_eval", 0.8 + gap, {}), ("test_acc_eval", 0.8, {})]

    result = verdict("regularization", "C9", Tables(cells, probes=probe_rows(cells, rows_of)))
    assert result.estimate.value == pytest.approx(0.10) and result.verdict == "supported"


def folding_rounds(speedups: list[float], study: str = "inference", drift: float = 0.0) -> pd.DataFrame:
    """Micro-benchmark rounds of a study's model folded and not, one repeat per speed-up; each round's pair of times
    shares the machine's speed at that moment, which `drift` moves from round to round."""
    rng = np.random.default_rng(6)
    rows = []
    for repeat, speedup in enumerate(speedups):
        for round_, speed in enumerate(np.exp(rng.normal(0, drift, 20))):
            rows += [{"repeat": repeat, "round": round_, "fold_study": study, "network": network, "device": "cpu",
                      "shape": "250x1x28x28", "model": "resnet, depth 8, width 8", "time_s": time_s * speed}
                     for network, time_s in (("unfolded", speedup * 1e-2), ("folded", 1e-2))]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("difference, expected", [(1e-7, "supported"), (1e-3, "refuted")])
def test_folding_speed_comes_from_the_benchmarks_and_needs_equal_outputs(difference, expected):
    cells = cells_table({"batch_size": [8, 64]}, lambda point, rng: 0.9, norm="bn", device="cpu")
    rows = probe_rows(cells, lambda cell: [("fold_rel_diff", difference, {})])
    result = verdict("inference", "C11", Tables(cells, probes=rows, bench=folding_rounds([1.3, 1.32, 1.34])))
    assert result.estimate.value == pytest.approx(1.32, rel=1e-3) and result.verdict == expected
    assert result.estimate.sample_unit == "repeats" and result.estimate.samples == 3
    assert "timed by the micro-benchmarks on cpu: an untrained resnet, depth 8, width 8 (batch 250)" in result.note


def test_folding_speed_is_taken_round_by_round():
    """The machine's speed moves from round to round by 30%; each round's pair shares it, so the ratio stays exact."""
    cells = cells_table({"batch_size": [8]}, lambda point, rng: 0.9, norm="bn", device="cpu")
    rows = probe_rows(cells, lambda cell: [("fold_rel_diff", 1e-7, {})])
    result = verdict("inference", "C11", Tables(cells, probes=rows, bench=folding_rounds([1.2] * 3, drift=0.3)))
    assert result.estimate.value == pytest.approx(1.2) and result.estimate.high / result.estimate.low < 1.001


def test_folding_not_timed_is_inconclusive_and_says_where_it_is_timed():
    cells = cells_table({"batch_size": [8]}, lambda point, rng: 0.9, norm="bn", device="cpu")
    result = verdict("inference", "C11", Tables(cells, probes=probe_rows(cells, lambda cell: [("fold_rel_diff", 1e-7, {})])))
    assert result.verdict == "inconclusive" and "the micro-benchmarks time it" in result.note


def init_verdict(learns, spread: float):
    """C4 over its four badly scaled conditions (activation x init) with and without BN: 0.8 accuracy where
    `learns(norm, activation, init)`, else 0.1 (stuck), each cell with noise of `spread`."""
    def accuracy(point, rng):
        return (0.8 if learns(point["norm"], point["activation"], point["init"]) else 0.1) + rng.normal(0, spread)

    cells = cells_table({"activation": ["sigmoid", "relu"], "init": ["normal-0.01", "normal-1"],
                         "norm": ["bn", "none"]}, accuracy)
    return verdict("init", "C4", Tables(cells))


def test_a_support_resting_on_one_condition_says_so_and_names_the_others():
    """C4 over four conditions: BN rescues only relu at N(0, 1), by enough to carry the mean past 0.1."""
    result = init_verdict(lambda norm, activation, init: (norm, activation, init) == ("bn", "relu", "normal-1"),
                          spread=0.002)
    assert result.verdict == "supported"  # the mean over conditions, 0.175, is above 0.1
    assert "the support rests on one of 4 conditions (activation relu, init normal-1)" in result.note
    assert all(f"{condition}: refuted" in result.note for condition in
               ("activation relu, init normal-0.01", "activation sigmoid, init normal-0.01",
                "activation sigmoid, init normal-1"))


def test_small_batch_gap_reads_ghost_batches_as_per_worker_batches():
    """BN over ghost batches of 2 in a batch of 32 is BN on 16 workers of 2: GN at the same batch is its pair."""
    points = [("ghostbn", 2), ("ghostbn", 8), ("bn", None), ("gn", None)]
    rows = [{"cell": f"{norm}/{ghost}/{seed}", "norm": norm, "ghost_batch": ghost, "batch_size": 32, "seed": seed,
             "diverged": False, "final_test_acc": 0.85 - (0.1 if ghost == 2 else 0.0) + 0.001 * seed}
            for (norm, ghost), seed in itertools.product(points, SEEDS)]
    result = verdict("batch_size", "C6", Tables(pd.DataFrame(rows)))
    assert result.estimate.value == pytest.approx(0.1) and result.verdict == "supported"
    assert result.note == "BN statistics over 2 images"


def test_a_condition_that_disagrees_is_named_beside_the_verdict():
    """BN rescues every badly scaled init but sigmoid at N(0, 0.01²): the mean is supported, the exception named."""
    result = init_verdict(lambda norm, activation, init:
                          norm == "bn" and (activation, init) != ("sigmoid", "normal-0.01"), spread=0.005)
    assert result.verdict == "supported"
    assert "except activation sigmoid, init normal-0.01: refuted (" in result.note
    assert result.note.count("except") == 1 and "relu" not in result.note


def batch_size_study(accuracy_of: dict, spread=0.003, rng_seed=3) -> Tables:
    """The default batch_size study's shape: ghost batches of 2 for BN and BRN, BN and GN+WS over all 32."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for (norm, ghost), seed in itertools.product([("ghostbn", 2), ("brn", 2), ("bn", None), ("gn", None),
                                                  ("gn+ws", None)], SEEDS):
        rows.append({"cell": f"{norm}/{seed}", "norm": norm, "ghost_batch": ghost, "batch_size": 32, "seed": seed,
                     "diverged": False, "final_test_acc": accuracy_of[norm] + rng.normal(0, spread)})
    return Tables(pd.DataFrame(rows))


@pytest.mark.parametrize("brn, expected", [(0.80, "supported"), (0.70, "refuted")])
def test_batch_renorm_is_compared_with_bn_over_the_same_ghost_batch(brn, expected):
    tables = batch_size_study({"ghostbn": 0.70, "brn": brn, "bn": 0.85, "gn": 0.84, "gn+ws": 0.85})
    result = verdict("batch_size", "C15", tables)
    assert result.verdict == expected and result.estimate.value == pytest.approx(brn - 0.70, abs=0.01)
    assert "statistics over 2 images" in result.estimate.note


@pytest.mark.parametrize("gn_ws, expected", [(0.85, "supported"), (0.80, "refuted")])
def test_gn_ws_is_compared_with_bn_over_its_largest_batch(gn_ws, expected):
    tables = batch_size_study({"ghostbn": 0.70, "brn": 0.75, "bn": 0.85, "gn": 0.84, "gn+ws": gn_ws})
    result = verdict("batch_size", "C16", tables)
    assert result.verdict == expected and result.estimate.value == pytest.approx(gn_ws - 0.85, abs=0.01)
    assert "BN over 32 images" in result.estimate.note


@pytest.mark.parametrize("dyt, expected", [(0.85, "supported"), (0.75, "refuted")])
def test_dyt_matches_ln_within_two_points(dyt, expected):
    cells = cells_table({"norm": ["ln", "dyt", "bn"]}, lambda point, rng: {"ln": 0.85, "dyt": dyt, "bn": 0.8}[
        point["norm"]] + rng.normal(0, 0.002))
    result = verdict("transformer", "C14", Tables(cells))
    assert result.verdict == expected and result.estimate.value == pytest.approx(0.85 - dyt, abs=0.01)


MY_CLAIM = {"id": "my-dyt", "statement": "DyT is as good as LN here", "measure": "final_test_acc",
            "compare": {"norm": ["dyt", "ln"]}, "combine": "difference", "rule": "within", "threshold": 0.01}


@pytest.mark.parametrize("dyt, expected", [(0.85, "supported"), (0.80, "refuted")])
def test_a_claim_declared_in_the_config_is_judged_like_the_built_in_ones(dyt, expected):
    cells = cells_table({"norm": ["ln", "dyt"]}, lambda point, rng: {"ln": 0.85, "dyt": dyt}[point["norm"]]
                        + rng.normal(0, 0.001))
    verdicts = evaluate({"transformer": {"claims": ["C14", MY_CLAIM]}}, {"transformer": Tables(cells)})
    assert [v.claim.id for v in verdicts][-1] == "my-dyt" and verdicts[-2].claim.id == CLAIMS[-1].id
    mine = verdicts[-1]
    assert mine.verdict == expected and mine.estimate.value == pytest.approx(dyt - 0.85, abs=0.005)
    assert mine.estimate.samples == 5 and not math.isnan(mine.detectable_effect)  # the same power columns
    assert mine.claim.bar == "|effect| < 0.01" and mine.study == "transformer"
    ratio = evaluate({"t": {"claims": [{**MY_CLAIM, "combine": "ratio", "rule": "above", "threshold": 0.9}]}},
                     {"t": Tables(cells)})[-1]
    assert ratio.estimate.value == pytest.approx(dyt / 0.85, abs=0.01)


def test_a_declared_claim_names_a_setting_of_the_study_where_its_verdict_differs():
    """Over norm x lr the effect is the mean over the learning rates, as for the built-in claims; the row says at
    which lr the verdict differs, and ties at one lr still get one test image of width."""
    gap = {0.01: 0.0, 0.1: -0.1}  # DyT minus LN: alike at lr 0.01, far behind at 0.1
    cells = cells_table({"norm": ["ln", "dyt"], "lr": [0.01, 0.1]},
                        lambda point, rng: 0.85 + (gap[point["lr"]] if point["norm"] == "dyt" else 0.0),
                        test_subset=2000)
    mine = evaluate({"t": {"claims": [MY_CLAIM]}}, {"t": Tables(cells)})[-1]
    assert mine.verdict == "refuted" and mine.estimate.value == pytest.approx(-0.05)
    assert [label for label, _ in mine.estimate.conditions] == ["lr 0.01", "lr 0.1"]
    assert "except lr 0.01: supported" in mine.note
    assert mine.estimate.conditions[0][1].high - mine.estimate.conditions[0][1].low > 0  # tied seeds: resolution
    assert "the mean over the study's other settings" in mine.claim.effect


def test_conditions_are_labelled_as_the_grid_spells_them():
    cells = pd.DataFrame({"ghost_batch": [8.0, None, 8.0, None], "lr": [0.1, 0.1, 0.05, 0.05]})
    labels = [label for label, _ in by_condition(cells, ["ghost_batch", "lr"], len)]
    assert labels == ["ghost_batch 8, lr 0.05", "ghost_batch 8, lr 0.1", "ghost_batch blank, lr 0.05",
                      "ghost_batch blank, lr 0.1"]


def test_cells_with_a_blank_setting_are_paired_like_the_others():
    """The regularization grid: ghost_batch is blank for plain BN and none, 8 for ghost BN. A declared claim on
    dropout pairs every norm's cells, the blank-ghost-batch ones too (they are all of them here)."""
    points = [("bn", 0.0, None), ("none", 0.0, None), ("bn", 0.3, None), ("none", 0.3, None), ("ghostbn", 0.0, 8)]
    gain = {"bn": 0.01, "none": 0.05, "ghostbn": 0.03}  # dropout's accuracy gain per norm
    rows = [{"cell": f"{norm}/{dropout}/{ghost}/{seed}", "norm": norm, "dropout": dropout, "ghost_batch": ghost,
             "seed": seed, "diverged": False, "final_test_acc": 0.8 + (gain[norm] if dropout else 0.0)}
            for (norm, dropout, ghost), seed in itertools.product(points, SEEDS)]
    claim = {**MY_CLAIM, "compare": {"dropout": [0.3, 0.0]}, "rule": "above", "threshold": 0.0}
    result = evaluate({"regularization": {"claims": [claim]}}, {"regularization": Tables(pd.DataFrame(rows))})[-1]
    assert result.estimate.samples == 5
    assert result.estimate.value == pytest.approx((0.01 + 0.05) / 2)  # bn's and none's gains, ghostbn unpaired


@pytest.mark.parametrize("change, message", [
    ({"measure": "final_acc"}, r"claim 'my-dyt', key 'measure': unknown measure 'final_acc'; known: final_test_acc"),
    ({"compare": {"norm": ["dyt", "rms"]}}, r"claim my-dyt compares norm and needs the values dyt, rms"),
    ({"compare": {"nrom": ["dyt", "ln"]}}, r"key 'compare': 'nrom' is no setting"),
    ({"id": "C6"}, r"key 'id': C6 is a built-in claim"),
    ({"compare": {"seed": [0, 1]}}, r"key 'compare': claims are paired by seed; compare another setting"),
    ({"threshold": -0.01}, r"key 'threshold': 'within' bounds the effect's distance from 0: give a positive"),
])
def test_a_declared_claim_that_cannot_be_measured_is_refused_before_any_run(change, message):
    cells = [{"norm": norm, "seed": seed} for norm in ("ln", "dyt") for seed in (0, 1)]
    with pytest.raises(SettingsError, match=message):
        check_claims({"transformer": {"claims": [{**MY_CLAIM, **change}]}}, {"transformer": cells})
    with pytest.raises(SettingsError, match=r"study 'transformer' lists claim my-dyt twice; keep one"):
        check_claims({"transformer": {"claims": [MY_CLAIM, MY_CLAIM]}}, {"transformer": cells})
    linked = [{"world_size": world, "batch_size": 64 // world, "seed": seed} for world in (1, 2) for seed in (0, 1)]
    with pytest.raises(SettingsError, match=r"claim my-dyt compares world_size 2 with 1, but no cells of the two are "
                                            r"alike in the study's other settings \(batch_size changes with world"):
        check_claims({"d": {"claims": [{**MY_CLAIM, "compare": {"world_size": [2, 1]}}]}}, {"d": linked})
