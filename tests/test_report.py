"""The report from synthetic tables whose truth is known: axes, learning-rate table, escaping, self-containment."""

import itertools
import math
import re

import pandas as pd
import pytest

from normbench.captions import FIGURE_CAPTIONS
from normbench.config import Settings
from normbench.numerics import output_errors
from normbench.claims import Tables
from normbench.report import render_report
from normbench.report.figures import (ACCURACY_INTERVAL, bounded_t_interval, geometric_mean, log_t_interval, study_axes,
                                      t_interval, throughput_figure)
from normbench.report.studies import reference, setup, study_section
from normbench.report.tables import _median_reach, leaderboard, learning_rate_table, step_time_ratios


DEFAULTS = {**Settings().to_dict(), "probes": ""}  # every setting is a column of the aggregated table


def synthetic_cells() -> pd.DataFrame:
    rows = []
    for norm in ("bn", "none"):
        for lr in (0.01, 0.1, 1.0):
            for seed in (0, 1):
                diverged = norm == "none" and lr == 1.0
                acc = None if diverged else {"bn": 0.8, "none": 0.6}[norm] - (0.3 if lr == 0.01 and norm == "none" else 0)
                rows.append({**DEFAULTS, "study": "lr", "cell": f"norm~{norm}/lr~{lr}/seed~{seed}", "cell_dir": f"results/runs/lr/{norm}/{lr}/{seed}",
                             "norm": norm, "lr": lr, "seed": seed, "batch_size": 64, "world_size": 1,
                             "final_test_acc": acc, "best_test_acc": acc, "final_test_loss": 0.5, "diverged": diverged,
                             "steps": 100, "total_steps": 100, "skipped_steps": 0, "train_samples_per_s": 1000.0 if norm == "bn" else 1250.0,
                             "wall_time_s": 10.0, "env_torch": "2.14.1", "env_time": "2026-01-01T00:00:00", "env_host": "h"})
    return pd.DataFrame(rows)


def synthetic_curves(cells: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, cell in cells.iterrows():
        for step in (10, 20, 30):
            acc = 0.0 if cell["diverged"] else cell["final_test_acc"] * step / 30
            rows.append({"study": "lr", "cell": cell["cell"], "norm": cell["norm"], "lr": cell["lr"], "seed": cell["seed"],
                         "step": step, "epoch": step / 10, "test_acc": acc, "elapsed_s": step / 10})
    return pd.DataFrame(rows)


def test_axes_skip_linked_settings():
    cells = pd.DataFrame({"norm": ["bn", "bn", "gn", "gn"], "world_size": [1, 2, 1, 2], "batch_size": [32, 16, 32, 16],
                          "seed": [0, 0, 0, 0]})
    assert study_axes(cells) == ("world_size", [])


def test_learning_rate_table_finds_stable_range_and_time_to_target():
    cells = synthetic_cells()
    table = learning_rate_table(cells, synthetic_curves(cells), {"stable_acc": 0.5, "target_acc": 0.5})
    rows = {row[0]: row for row in table["rows"]}
    assert rows["bn"][1:3] == ["0.01 to 1", "2"]  # two decades, nothing diverged
    assert rows["none"][1:3] == ["0.1 to 0.1", "0"]  # 0.01 too inaccurate, 1.0 diverged
    assert rows["bn"][3] == "0.01" and rows["bn"][5] == "20"  # 0.8 * 20/30 >= 0.5 first at step 20
    assert rows["none"][5] == "30"


def test_a_seed_that_never_reached_the_target_counts_as_beyond_every_seed_that_did():
    """As C13 reads them (censored): the mean of the seeds that got there would flatter a norm that mostly did not."""
    assert _median_reach(pd.Series([20.0, math.inf, math.inf])) == "not by most seeds (1 of 3 seeds)"
    assert _median_reach(pd.Series([30.0, 20.0, math.inf])) == "30 (2 of 3 seeds)"
    assert _median_reach(pd.Series([30.0, 20.0, 10.0])) == "20"
    assert _median_reach(pd.Series([math.inf, math.inf])) == "never"


def write_tables(folder):
    cells = synthetic_cells()
    cells.to_csv(folder / "cells.csv", index=False)
    synthetic_curves(cells).to_csv(folder / "curves.csv", index=False)
    (folder / "probes.csv").write_text("")
    output_errors(shape=(4, 8, 4, 4)).to_csv(folder / "numerics.csv", index=False)


def test_report_is_self_contained_and_escapes_config_text(tmp_path):
    write_tables(tmp_path)
    out = tmp_path / "report.html"
    config = {"studies": {"lr": {"description": "<script>alert(1)</script>", "report": {"target_acc": 0.5},
                                 "claims": ["C3"]}}}
    render_report(tmp_path, config, out, tmp_path / "figures")
    html = out.read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert(1)" not in html
    assert html.count("data:image/png;base64,") == 3
    assert sorted(p.name for p in (tmp_path / "figures/lr").iterdir()) == ["accuracy.png", "curves.png", "throughput.png"]
    assert "Learning-rate range and speed to target" in html and "Numerical error of the norm layers" in html
    assert re.search(r"Computed on\s+\S", html) and "Computed on\nnot recorded" not in html  # the device it ran on
    assert "https://" not in html and "http://" not in html
    # The claims table comes first: bn stable up to the top lr 1 (so at least there), none up to 0.1 and unstable at
    # 1: BN's boundary lies at least 0 decades above none's, and nothing bounds it from above.
    assert html.index('id="claims"') < html.index('id="study-lr"')
    claims = pd.read_csv(tmp_path / "claims.csv").set_index("claim")
    assert claims.loc["C3", "verdict"] == "inconclusive" and claims.loc["C3", "estimate"] == 0.0
    assert claims.loc["C3", "ci_high"] == float("inf") and claims.loc["C3", "censored_samples"] == 2
    assert "extend the grid" in claims.loc["C3", "note"] and math.isnan(claims.loc["C3", "seeds_needed"])
    assert claims.loc["C3", "samples"] == 2 and claims.loc["C1", "verdict"] == "not run"
    assert "no verdict was decided by a test" in html


def test_cells_are_marked_reused_or_trained_in_this_run(tmp_path):
    write_tables(tmp_path)
    (tmp_path / "invocation.json").write_text('{"started": "2026-01-01T00:00:00+00:00", "command": "snakemake -c2"}')
    render_report(tmp_path, {"studies": {}}, tmp_path / "report.html", tmp_path / "figures",
                  invocation=tmp_path / "invocation.json")
    html = (tmp_path / "report.html").read_text()
    assert "12: 12 trained in this run, 0 resumed from a checkpoint, 0 reused" in html and "snakemake -c2" in html
    (tmp_path / "invocation.json").write_text('{"started": "2026-01-02T00:00:00+00:00", "command": "snakemake"}')
    render_report(tmp_path, {"studies": {}}, tmp_path / "report.html", tmp_path / "figures",
                  invocation=tmp_path / "invocation.json")
    html = (tmp_path / "report.html").read_text()
    assert "0 trained in this run, 0 resumed from a checkpoint, 12 reused" in html
    assert "reused, trained 2026-01-01 00:00" in html


def test_step_time_ratios_leave_out_diverged_cells():
    cells = synthetic_cells()
    cells.loc[cells["diverged"], "train_samples_per_s"] = 0.0  # stopped on its first step
    ratios = step_time_ratios(cells, ["lr"])
    by_lr = {row["key"][0]: row["values"] for row in ratios["rows"]}
    assert ratios["columns"] == ["bn", "none"]
    assert by_lr["0.1"] == ["1", "0.8"] and by_lr["1"] == ["1", ""]  # none is faster; at lr 1 every seed diverged


def test_report_command_takes_the_config_as_a_file_and_claims_sort_naturally(tmp_path):
    import yaml

    from normbench.cli import main

    write_tables(tmp_path)
    config = {"studies": {"lr": {"report": {"target_acc": 0.5}, "claims": ["C3", "C13"]}}}
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(config))
    main(["report", "--tables", str(tmp_path), "--config", str(tmp_path / "my.yaml"), "--figures",
          str(tmp_path / "figures"), "--out", str(tmp_path / "report.html")])
    claims = pd.read_csv(tmp_path / "claims.csv")
    assert list(claims["claim"]) == ["C1", "C2a", "C2b", *(f"C{i}" for i in range(3, 17))]  # C2 before C13
    assert claims.set_index("claim").loc["C3", "verdict"] == "inconclusive"
    html = (tmp_path / "report.html").read_text()
    assert html.index("<strong>C2b</strong>") < html.index("<strong>C3</strong>") < html.index("<strong>C13</strong>")
    assert "The folders are under" in html  # where the cell links point


def test_log_axis_intervals_stay_positive_and_match_the_logarithms():
    """Gradient norms spread over decades: a t interval of the raw values reaches below zero, which a log axis
    cannot draw; the interval of the logarithms, taken back, is positive and centred on the geometric mean."""
    values = [1e-3, 1.0, 1e3]
    assert t_interval(values)[0] < 0
    low, high = log_t_interval(values)
    assert geometric_mean(values) == pytest.approx(1.0)
    assert 0 < low < 1.0 < high
    assert low * high == pytest.approx(1.0)  # symmetric in the logarithms around log 1 = 0


def study_cells(study: str, axes: dict, **fixed) -> pd.DataFrame:
    """One cell per combination of `axes` (no axes: a single cell) over `fixed` settings; a diverged cell has no
    accuracy."""
    rows = []
    for values in itertools.product(*axes.values()):
        point = {"diverged": False, **fixed, **dict(zip(axes, values))}
        cell = "/".join(f"{k}~{v}" for k, v in point.items())
        acc = None if point["diverged"] else 0.8
        rows.append({**DEFAULTS, "study": study, "cell": cell, "cell_dir": f"results/runs/{study}/{cell}", **point,
                     "final_test_acc": acc, "best_test_acc": acc, "final_test_loss": 0.5, "timed_out": False,
                     "steps": 100, "total_steps": 100, "skipped_steps": 0, "train_samples_per_s": 1000.0,
                     "wall_time_s": 10.0, "env_time": "2026-01-01T00:00:00", "env_host": "h"})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("axes, fixed", [
    ({"precision": ["fp32", "bf16"], "seed": [0, 1]}, {"norm": "bn"}),
    ({"seed": [0, 1, 2]}, {"norm": "bn"}),
    ({}, {"norm": "gn"}),
    ({"norm": ["bn", "gn"], "precision": ["fp32", "bf16"], "init": ["kaiming", "xavier"]}, {}),
    ({"lr": [0.1, 1.0]}, {"norm": "bn", "diverged": True}),
    ({}, {"norm": "bn", "diverged": True}),
], ids=["one norm, categorical axis", "one condition", "single cell", "categorical axes only",
        "every cell diverged", "single diverged cell"])
def test_report_renders_every_study_shape(tmp_path, axes, fixed):
    cells = study_cells("s", axes, **fixed)
    cells.to_csv(tmp_path / "cells.csv", index=False)
    pd.concat([cells.assign(step=step, epoch=step / 10, test_acc=step / 100, elapsed_s=step / 10)
               for step in (10, 20, 30)]).to_csv(tmp_path / "curves.csv", index=False)
    (tmp_path / "probes.csv").write_text("")
    (tmp_path / "numerics.csv").write_text("")
    render_report(tmp_path, {"studies": {"s": {}}}, tmp_path / "report.html", tmp_path / "figures")
    assert sorted(p.name for p in (tmp_path / "figures/s").iterdir()) == ["accuracy.png", "curves.png",
                                                                          "throughput.png"]


def test_ghost_batches_are_timed_against_bn_at_the_same_optimizer_batch(tmp_path):
    """gpu.yaml's batch_size shape: the x axis is the images behind each BN statistic (2, 4, or the whole batch of
    32), but a step's time follows the batch of 32: ghost BN's rows are against BN's, not blank."""
    rows = []
    for norm, ghost, speed in [("bn", None, 1000.0), ("ghostbn", 2, 500.0), ("ghostbn", 4, 800.0), ("gn", None, 400.0)]:
        rows.append(study_cells("b", {"seed": [0, 1]}, norm=norm, ghost_batch=ghost, batch_size=32)
                    .assign(train_samples_per_s=speed))
    cells = pd.concat(rows, ignore_index=True)
    cells["cell"] = cells["cell"] + "/" + cells["norm"] + cells["ghost_batch"].astype(str)
    section = study_section("b", {}, cells, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), tmp_path, tmp_path / "f")
    assert section["step_time"]["index"] == ["per-worker batch size (images)"]
    assert section["step_time"]["columns"] == ["bn", "ghostbn", "gn"]
    assert section["step_time"]["rows"][0]["values"] == ["1", "1.538", "2.5"]  # 1000/650 for the mean ghost BN


def test_the_reference_box_counts_seeds_not_cells():
    cells = study_cells("i", {"init": ["xavier", "kaiming"], "seed": [0, 1, 2]}, norm="bn")
    box = reference({"report": {"reference": {"norm": "bn"}}}, cells)
    assert box["seeds"] == 3 and box["accuracy"] == "0.8 [0.8, 0.8]"
    cells.loc[cells["seed"] == 2, "final_test_acc"] = 0.1  # two seeds learned, one did not: an interval past 0
    assert reference({"report": {"reference": {"norm": "bn"}}}, cells)["accuracy"] == "0.567 [0, 1]"


def test_throughput_leaves_out_diverged_cells():
    """A diverged cell is timed up to the check that caught it: counted, it would make its norm look slower."""
    cells = study_cells("s", {"norm": ["bn", "gn"], "seed": [0, 1, 2]})
    diverged = (cells["norm"] == "bn") & (cells["seed"] == 2)
    cells.loc[diverged, ["diverged", "train_samples_per_s"]] = [True, 1000.0 / 6]
    figure = throughput_figure(cells, "norm", [])
    assert [bar.get_height() for bar in figure.axes[0].patches] == pytest.approx([1000.0, 1000.0])
    assert step_time_ratios(cells, [])["rows"][0]["values"] == ["1", "1"]
    assert "Diverged cells are left out" in FIGURE_CAPTIONS["throughput"]


def test_the_setup_box_names_the_memory_format():
    """channels_last speeds BN more than GN: a study's box says which format its step times were taken in."""
    cells = synthetic_cells()
    assert dict(setup({}, cells))["memory format"] == "contiguous (NCHW)"
    assert dict(setup({}, cells.assign(channels_last=True)))["memory format"].startswith("channels_last (NHWC)")


def test_the_leaderboard_ranks_every_norm_of_a_study_with_its_interval_speed_and_divergences():
    cells = synthetic_cells()
    curves = synthetic_curves(cells)
    board = leaderboard({"lr": Tables(cells, curves)}, {"lr": {"report": {"target_acc": 0.5}}})
    rows = {(row[1], row[2]): row for row in board["rows"]}  # one row per norm and setting: lrs are not pooled
    assert list(rows) == [(norm, f"lr {lr}") for norm in ("bn", "none") for lr in (0.01, 0.1, 1)]
    assert board["columns"][3] == "final test accuracy [95% CI]"
    assert rows["bn", "lr 0.1"][3] == "0.8 [0.8, 0.8]" and rows["bn", "lr 0.1"][6] == "0 of 2"
    assert rows["none", "lr 1"][6] == "2 of 2" and rows["none", "lr 1"][3] == "0.1 [0.1, 0.1]"  # diverged: chance
    assert rows["bn", "lr 0.1"][5] == "1" and rows["none", "lr 0.1"][5] == "0.8"  # 1250/s against BN's 1000/s
    assert rows["none", "lr 1"][5] == ""  # no finished cell to time
    assert rows["bn", "lr 0.1"][4] == "20" and rows["none", "lr 0.1"][4] == "30"  # first evaluation at 0.5
    assert rows["none", "lr 0.01"][4] == "never"


def test_the_leaderboard_compares_with_bn_at_the_same_setting_when_a_setting_is_blank():
    """The regularization grid: ghost_batch blank for plain BN and none, 8 for ghost BN. Each row's step time is
    against BN at its own dropout (ghost BN against plain BN), not BN over the study; one seed gives no interval."""
    rows = []
    for norm, dropout, ghost, speed in [("bn", 0.0, None, 1000.0), ("none", 0.0, None, 2000.0),
                                        ("bn", 0.3, None, 500.0), ("none", 0.3, None, 250.0),
                                        ("ghostbn", 0.0, 8, 800.0)]:
        rows.append({**DEFAULTS, "study": "reg", "cell": f"{norm}/{dropout}/{ghost}", "cell_dir": "results/runs/reg",
                     "norm": norm, "dropout": dropout, "ghost_batch": ghost, "seed": 0, "final_test_acc": 0.8,
                     "diverged": False, "steps": 10, "total_steps": 10, "train_samples_per_s": speed})
    board = leaderboard({"reg": Tables(pd.DataFrame(rows), pd.DataFrame())}, {})
    by_row = {(row[1], row[2]): row for row in board["rows"]}
    assert by_row["bn", "dropout 0"][5] == "1" and by_row["bn", "dropout 0.3"][5] == "1"
    assert by_row["none", "dropout 0"][5] == "0.5" and by_row["none", "dropout 0.3"][5] == "2"
    assert by_row["ghostbn", "ghost_batch 8, dropout 0"][5] == "1.25"  # BN at dropout 0: 1000/s against 800/s
    assert by_row["bn", "dropout 0"][3] == "0.8"  # one seed: no interval, not [0, 1]


def test_a_norm_whose_every_run_timed_out_has_no_best_lr():
    cells = synthetic_cells().assign(timed_out=False)
    cells.loc[cells["norm"] == "none", "timed_out"] = True
    rows = {row[0]: row for row in learning_rate_table(cells, synthetic_curves(cells), {"stable_acc": 0.5})["rows"]}
    assert rows["none"][1:] == ["none", "", "", ""] and rows["bn"][1] == "0.01 to 1"


def test_the_percentile_caption_counts_the_probes_images():
    from normbench.train import PROBE_IMAGES

    assert f"over {PROBE_IMAGES:,} fixed test images" in FIGURE_CAPTIONS["percentiles"]


def test_a_failed_cell_is_listed_and_left_out_of_every_table(tmp_path):
    write_tables(tmp_path)
    render_report(tmp_path, {"studies": {"lr": {"claims": ["C3"], "report": {"stable_acc": 0.5}}}}, tmp_path / "a.html",
                  tmp_path / "figures")
    before = pd.read_csv(tmp_path / "claims.csv").set_index("claim").loc["C3", "cells"]
    cells = pd.read_csv(tmp_path / "cells.csv")
    cells["failed"] = False
    cells["failure_reason"] = None
    cells.loc[0, ["failed", "failure_reason"]] = [True, "out of memory at step 3: CUDA out of memory"]
    cells.to_csv(tmp_path / "cells.csv", index=False)
    render_report(tmp_path, {"studies": {"lr": {"claims": ["C3"], "report": {"stable_acc": 0.5}}}}, tmp_path / "b.html",
                  tmp_path / "figures")
    html = (tmp_path / "b.html").read_text()
    assert "failed cells (left out)" in html and f"{cells.loc[0, 'cell']}: out of memory at step 3" in html
    assert pd.read_csv(tmp_path / "claims.csv").set_index("claim").loc["C3", "cells"] == before - 1


def test_bands_of_bounded_quantities_stay_in_their_range():
    values = [0.99, 0.98, 0.30]  # three seeds, one far off: the raw t interval runs past 1 and below 0
    assert t_interval(values)[1] > 1 and t_interval(values)[0] < 0
    assert ACCURACY_INTERVAL(values) == (0.0, 1.0)
    low, high = bounded_t_interval(-1, 1)([0.9, 0.95, 0.99])
    assert -1 <= low < 0.95 < high <= 1


def test_figures_drawn_by_several_processes_make_the_same_report(tmp_path):
    cells = synthetic_cells()
    cells = pd.concat([cells, cells.assign(study="lr2", cell_dir=cells["cell_dir"].str.replace("/lr/", "/lr2/"))])
    cells.to_csv(tmp_path / "cells.csv", index=False)
    synthetic_curves(cells).assign(study=cells["study"].repeat(3).to_numpy()).to_csv(tmp_path / "curves.csv",
                                                                                   index=False)
    for empty in ("probes", "numerics"):
        (tmp_path / f"{empty}.csv").write_text("")
    config = {"studies": {"lr": {}, "lr2": {}}}
    pages = []
    for jobs in (1, 2):
        render_report(tmp_path, config, tmp_path / f"{jobs}.html", tmp_path / f"figures{jobs}", jobs=jobs)
        pages.append(re.sub(r"Generated \S+", "", (tmp_path / f"{jobs}.html").read_text()))
    assert pages[0] == pages[1] and 'id="study-lr2"' in pages[1]
    assert sorted(p.name for p in (tmp_path / "figures2").iterdir()) == ["lr", "lr2"]
