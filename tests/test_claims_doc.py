"""docs/claims.md, the threshold table the verdicts rest on, says what normbench.claims computes: every claim the
package judges is in the doc with the same rule and threshold, the doc's other claims are exactly those it marks
"not yet measured by normbench", and the ratio claims are the ones the doc judges on the log scale."""

import re
from pathlib import Path

from normbench import claims

DOC = Path(__file__).resolve().parents[1] / "docs/claims.md"
NOT_YET = "not yet measured by normbench"


def table_after(text: str, heading: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table under the `## heading...` section, as {column: cell}."""
    section = re.search(rf"^## {re.escape(heading)}.*?(?=^## |\Z)", text, re.M | re.S)
    assert section, f"docs/claims.md has no '## {heading}' section"
    table = re.search(r"^\|.*?(?=^(?!\|)|\Z)", section.group(0), re.M | re.S)  # the first run of table lines
    assert table, f"no table under '## {heading}'"
    lines = table.group(0).strip().splitlines()
    assert len(lines) > 2, f"no table under '## {heading}'"
    split = lambda line: [cell.strip() for cell in line.strip("|").split("|")]  # noqa: E731
    header = split(lines[0])
    assert set(lines[1]) <= set("|-: "), f"the table under '## {heading}' has no separator row"
    rows = [dict(zip(header, split(line), strict=True)) for line in lines[2:]]
    assert rows, f"the table under '## {heading}' is empty"
    return rows


def thresholds(text: str) -> dict[str, dict[str, str]]:
    rows = table_after(text, "Thresholds")
    by_id = {row["id"]: row for row in rows}
    assert len(by_id) == len(rows), "a claim appears twice in the thresholds table"
    return by_id


def number(cell: str) -> float:
    return float(cell.replace("−", "-"))  # the doc writes negative thresholds with a minus sign


def log_scale_ids(text: str) -> set[str]:
    """The claims the doc names as ratio effects judged on the log scale."""
    found = re.search(r"Ratio effects \(([^)]*)\)\s+are judged on the log scale", text)
    assert found, "docs/claims.md does not say which ratio effects are judged on the log scale"
    return {part.strip() for part in found.group(1).split(",")}


def is_ratio(claim: claims.Claim) -> bool:
    """Whether the package measures the claim as a ratio: its effect's unit is "x" ("(x)", "(x, ...", "(x; ...")."""
    return re.search(r"\(x[),;]", claim.effect) is not None


def mismatches(text: str) -> list[str]:
    """Every way the doc and normbench.claims disagree (empty: they agree)."""
    doc, problems = thresholds(text), []
    for claim in claims.CLAIMS:
        row = doc.get(claim.id)
        if row is None:
            problems.append(f"{claim.id} is judged by normbench but missing from the doc's thresholds")
            continue
        if NOT_YET in row["status"]:
            problems.append(f"{claim.id} is judged by normbench but the doc says it is {NOT_YET}")
        if row["rule"] != claim.rule:
            problems.append(f"{claim.id}: the doc's rule is {row['rule']!r}, the package's {claim.rule!r}")
        if number(row["threshold"]) != claim.threshold:
            problems.append(f"{claim.id}: the doc's threshold is {row['threshold']}, the package's {claim.threshold:g}")
    for claim_id, row in doc.items():
        if row["rule"] not in claims.RULES:
            problems.append(f"{claim_id}: unknown rule {row['rule']!r} in the doc")
        if claim_id not in claims.CLAIMS_BY_ID and row["status"] != NOT_YET:
            problems.append(f"{claim_id} is in the doc but not in normbench.claims, and not marked {NOT_YET!r}")
    return problems


def test_the_doc_and_the_package_agree_on_every_rule_and_threshold():
    assert mismatches(DOC.read_text()) == []


def test_the_check_fails_on_a_changed_threshold_or_a_missing_claim():
    text = DOC.read_text()
    changed = re.sub(r"^(\| C6 \|.*\| above \| )0\.02( \|)", r"\g<1>0.03\2", text, count=1, flags=re.M)
    assert changed != text
    assert mismatches(changed) == ["C6: the doc's threshold is 0.03, the package's 0.02"]
    dropped = re.sub(r"^\| C9 \|.*\| above \| 0\.02 \| measured \|\n", "", text, count=1, flags=re.M)
    assert dropped != text
    assert any(problem.startswith("C9 is judged by normbench but missing") for problem in mismatches(dropped))
    marked = text.replace("| 0.02 | measured |", f"| 0.02 | {NOT_YET} |", 1)
    assert any(f"the doc says it is {NOT_YET}" in problem for problem in mismatches(marked))


def test_the_claims_the_doc_marks_not_yet_measured_are_exactly_those_the_package_lacks():
    doc = thresholds(DOC.read_text())
    not_yet = {claim_id for claim_id, row in doc.items() if row["status"] == NOT_YET}
    assert set(doc) - set(claims.CLAIMS_BY_ID) == not_yet
    assert {row["status"] for row in doc.values()} <= {"measured", NOT_YET}


def test_the_claims_table_lists_each_judged_claim_and_marks_the_others():
    """The claims table has one row per claim (C2 for C2a and C2b); a row says it is not yet measured exactly
    when none of its thresholds is judged by normbench."""
    text = DOC.read_text()
    rows = {row["id"]: row["claim as usually stated"] for row in table_after(text, "Claims")}
    base = lambda claim_id: re.sub(r"[a-z]$", "", claim_id)  # noqa: E731
    doc = thresholds(text)
    assert set(rows) == {base(claim_id) for claim_id in doc}
    for claim_id, statement in rows.items():
        measured = {i for i in doc if base(i) == claim_id} & set(claims.CLAIMS_BY_ID)
        assert (NOT_YET in statement.lower()) == (not measured), claim_id


def test_the_ratio_claims_are_those_the_doc_judges_on_the_log_scale():
    ratio_ids = {claim.id for claim in claims.CLAIMS if is_ratio(claim)}
    assert ratio_ids  # the unit marker is read, not absent everywhere
    assert log_scale_ids(DOC.read_text()) == ratio_ids
    doc = thresholds(DOC.read_text())
    assert all("×" in doc[claim_id]["effect (unit)"] for claim_id in ratio_ids)


def test_c11_folded_output_tolerance_matches_the_doc():
    effect = thresholds(DOC.read_text())["C11"]["effect (unit)"]
    tolerance = re.search(r"equal to (\S+) relative", effect)
    assert tolerance and float(tolerance.group(1)) == claims.FOLDED_OUTPUT_TOLERANCE
