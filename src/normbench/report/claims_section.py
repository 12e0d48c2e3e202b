"""The claims section: one row per claim with its verdict, effect and interval, what would decide it, and how
many verdicts survive Holm's correction; and claims.csv, the same as a table.
"""

from __future__ import annotations

import math

import pandas as pd

from normbench import claims
from normbench.report.studies import scale


def decidability(verdict: claims.Verdict) -> str:
    """What decides the claim, in words: the test behind a decided verdict, or the effect the run could detect and
    the seeds the observed one needs (a range: a spread from few seeds is itself uncertain)."""
    estimate = verdict.estimate
    if estimate is None or math.isnan(verdict.detectable_effect):
        return ""
    unit = estimate.sample_unit
    scale = " (in natural log of the ratio)" if estimate.scale == "log" else ""
    detect = (f"detects {verdict.detectable_effect:.2g}{scale} from the threshold with {estimate.samples} {unit} at "
              f"80% power")
    if verdict.verdict != "inconclusive":
        family = {True: "holds", False: "does not hold", None: "not tested"}[verdict.holds_family_wise]
        p = f"p = {verdict.p_value:.2g} against the threshold, {family} family-wise (Holm)" if not math.isnan(
            verdict.p_value) else ""
        return claims.join_notes(f"decided with {estimate.samples} {unit}", p, detect)
    low, point, high = verdict.seeds_needed
    if math.isnan(point):
        return detect
    if math.isinf(point):
        return f"{detect}; the effect sits on the threshold: no number of {unit} decides it"
    span = "" if low == high else f" ({low:.0f}–{'∞' if math.isinf(high) else f'{high:.0f}'} over the spread's " \
                                  f"95% range)"
    return f"{detect}; decidable with ≈ {point:.0f} {unit}{span} at the observed effect"


def family_wise(verdicts: list[claims.Verdict]) -> str:
    """"n of m decided verdicts hold family-wise (Holm, 5%, over the k claims tested)" for the claims header."""
    decided = [v.holds_family_wise for v in verdicts if v.holds_family_wise is not None]
    tested = sum(not math.isnan(v.p_value) for v in verdicts)
    if not decided:
        return "no verdict was decided by a test, so none is corrected for the family"
    return (f"{sum(decided)} of {len(decided)} decided verdicts hold family-wise (Holm's correction over the "
            f"{tested} claims tested in this run, decided or not, at 5% family-wise error)")


def claim_rows(verdicts: list[claims.Verdict], scales: dict[str, str] | None = None) -> list[dict]:
    """The claims table: one row per claim, with its verdict, effect and interval, and what it rests on. Each claim
    restates a published finding; where the run does not support it, the row says at what scale it was tried."""
    rows = []
    for verdict in verdicts:
        note = verdict.note
        published = verdict.claim.id in claims.CLAIMS_BY_ID  # a claim of the user's restates no paper
        if published and verdict.verdict in ("refuted", "inconclusive") and verdict.study in (scales or {}):
            note = claims.join_notes(f"not reproduced at this scale: {scales[verdict.study]}", note)
        estimate = verdict.estimate
        effect = claims.format_estimate(estimate) if estimate is not None else ""
        rows.append({
            "id": verdict.claim.id, "statement": verdict.claim.statement, "anchor": verdict.claim.anchor,
            "verdict": verdict.verdict, "effect": effect, "measures": verdict.claim.effect, "rule": verdict.claim.bar,
            "evidence": f"{estimate.samples} {estimate.sample_unit}, {estimate.cells} {estimate.cell_unit}"
            if estimate else "",
            "note": note, "power": decidability(verdict), "study": verdict.study or "",
            "family_wise": verdict.holds_family_wise,
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
