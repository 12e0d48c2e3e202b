"""Runs compared: verdicts that differ are flagged, step-time changes only beyond their noise, and a run archived
and read back compares equal to itself."""

import gzip
import json
import tarfile

import numpy as np
import pandas as pd
import pytest

from normbench.report.compare import cell_comparison, claim_comparison, log_ratio_interval, render_compare
from normbench.config import SettingsError
from normbench.runs import FinishedRun, archive, load_run, record_run


def finished_run(name: str, verdict_c6: str, step_s: float, noise: float, seed: int = 0) -> FinishedRun:
    """Two cells of study `tiny` (eight evaluation intervals each, of `step_s` seconds a step) and two claims."""
    rng = np.random.default_rng(seed)
    cells = pd.DataFrame([{"study": "tiny", "cell": f"norm~{norm}", "model": "mlp", "depth": 2, "width": 16, "dataset": "fashion_mnist",
                           "seed": 0, "total_steps": 80, "final_test_acc": 0.8 + 0.01 * (norm == "gn"),
                           "env_host": name, "env_device_name": "cpu model"} for norm in ("bn", "gn")])
    intervals = {norm: np.cumsum(10 * step_s * np.exp(rng.normal(0, noise, 8))) for norm in ("bn", "gn")}
    curves = pd.DataFrame([{"study": "tiny", "cell": f"norm~{norm}", "step": 10 * (i + 1), "timed_steps": 10 * (i + 1),
                            "train_time_s": intervals[norm][i]} for norm in ("bn", "gn") for i in range(8)])
    claims = pd.DataFrame([{"claim": "C6", "statement": "BN degrades at small batch", "study": "tiny",
                            "verdict": verdict_c6, "estimate": 0.05, "ci_low": 0.01, "ci_high": 0.09,
                            "rule": "effect > 0.02"},
                           {"claim": "C1", "statement": "ICS", "study": None, "verdict": "not run", "rule": "x"}])
    return FinishedRun(name, {"run_id": name}, cells, curves, claims)


def test_differing_verdicts_and_slower_steps_are_flagged():
    baseline, other = finished_run("a", "supported", 0.01, 0.01), finished_run("b", "inconclusive", 0.02, 0.01, 1)
    claims = claim_comparison([baseline, other])
    assert claims.set_index(["claim", "run"]).loc[("C6", "b"), "differs"]
    assert not claims[claims["claim"] == "C1"]["differs"].any()  # not run in either: nothing to differ
    cells, left_out = cell_comparison([baseline, other])
    assert len(cells) == 2 and cells["step_time_changed"].all() and left_out == []
    assert cells["step_time_ratio"].to_numpy() == pytest.approx([2.0, 2.0], rel=0.05)
    assert (cells["ratio_low"] > 1).all() and cells["acc_difference"].abs().max() == 0


def test_step_times_of_cells_that_shared_a_gpu_are_not_compared():
    """A packed cell (gpu_share > 1) was timed beside other cells: twice as slow says nothing about the code."""
    baseline, other = finished_run("a", "supported", 0.01, 0.01), finished_run("b", "supported", 0.02, 0.01, 1)
    other = FinishedRun("b", other.record, other.cells.assign(env_gpu_share=[4, 1]), other.curves, other.claims)
    cells, left_out = cell_comparison([baseline, other])
    by_cell = cells.set_index("cell")
    assert np.isnan(by_cell.loc["norm~bn", "step_time_ratio"]) and not by_cell.loc["norm~bn", "step_time_changed"]
    assert by_cell.loc["norm~gn", "step_time_changed"]  # the gn cell had its GPU to itself in both runs
    assert left_out == ["b: the step times of 1 cell(s) trained on a shared GPU (not compared)"]


def test_a_change_within_the_noise_is_not_flagged():
    ratio, low, high = log_ratio_interval(pd.Series([1.0, 1.2, 0.9, 1.1]), pd.Series([1.05, 0.95, 1.15, 1.0]))
    assert low < 1 < high
    # 1% slower, with repeats that vary by 30%: within the noise.
    cells, _ = cell_comparison([finished_run("a", "supported", 0.01, 0.3), finished_run("b", "supported", 0.0101, 0.3)])
    assert not cells["step_time_changed"].any()


def written_run(root, run: FinishedRun):
    """The run as a finished workflow leaves it under `root`: results/ (run.json, tables) and reports/."""
    results, reports = root / "results", root / "reports"
    (results / "tables").mkdir(parents=True)
    reports.mkdir()
    run.cells.to_csv(results / "tables/cells.csv", index=False)
    run.curves.to_csv(results / "tables/curves.csv", index=False)
    run.claims.to_csv(reports / "claims.csv", index=False)
    (results / "run.json").write_text(json.dumps({"run_id": "20261129T120000-abcdef12", "commits": ["x"],
                                                  "machines": ["h: cpu"], "config_sha256": "0" * 64,
                                                  "started": "2026-11-29T10:00:00+00:00",
                                                  "ended": "2026-11-29T10:09:30+00:00"}))
    (reports / "report.html").write_text("<html></html>")
    return results


def test_a_run_archived_and_read_back_compares_equal_to_itself(tmp_path):
    results = written_run(tmp_path, finished_run("a", "supported", 0.01, 0.05))
    packed = archive(results, tmp_path / "run.tar.gz")
    assert set(packed) == {"run.json", "tables/cells.csv", "tables/curves.csv", "claims.csv", "report.html"}
    with tarfile.open(tmp_path / "run.tar.gz") as tar:
        assert not any(name.endswith(".pt") for name in tar.getnames())
    counts = render_compare([load_run(results), load_run(tmp_path / "run.tar.gz")], tmp_path / "compare.html",
                            tmp_path / "compare.csv")
    assert counts == {"claims": 2, "differing verdicts": 0, "cells compared": 2, "step-time changes": 0,
                      "divergence changes": 0}
    page = (tmp_path / "compare.html").read_text()
    assert 'class="flag"' not in page and "http://" not in page and "https://" not in page
    assert "20261129T120000-abcdef12" in page and "<style>" in page
    assert len(pd.read_csv(tmp_path / "compare_cells.csv")) == 2


def test_a_gpu_run_is_recorded_with_its_device_wall_time_and_speed(tmp_path):
    results, reports = tmp_path / "results", tmp_path / "reports"
    (results / "tables").mkdir(parents=True)
    reports.mkdir()
    run = finished_run("a", "supported", 0.01, 0.05)
    cells = run.cells.assign(env_device=["cuda:0", "cpu"], env_device_name=["NVIDIA H200", "AMD EPYC"],
                             env_driver=["580.159.04", None], env_torch="2.11.0+cu130")
    cells.to_csv(results / "tables/cells.csv", index=False)
    run.claims.to_csv(reports / "claims.csv", index=False)
    (reports / "report.html").write_text("<html></html>")
    (results / "run.json").write_text(json.dumps({"run_id": "r", "commits": ["abc"], "config": {"studies": {}},
                                                  "started": "2026-11-29T10:00:00+00:00",
                                                  "ended": "2026-11-29T10:09:30+00:00"}))
    bench = tmp_path / "speed.json"
    speed = {"device": "cuda", "device_name": "NVIDIA H200", "batch_size": 256}
    bench.write_text(json.dumps({"benchmarks": [{"name": "test_start_up_against_import_torch", "extra_info": {}}, {
        "name": "test_training_steps_against_a_minimal_loop[False]",
        "extra_info": {"normbench_samples_per_s": [25_000.0, 24_000.0, 26_000.0],
                       "minimal_samples_per_s": [30_000.0, 30_000.0, 30_000.0], "compile": False, **speed}}, {
        "name": "test_training_steps_against_a_minimal_loop[reduce-overhead]",
        "extra_info": {"normbench_samples_per_s": [100_000.0, 110_000.0, 90_000.0],
                       "minimal_samples_per_s": [100_000.0, 100_000.0, 100_000.0], "compile": "reduce-overhead",
                       **speed}}]}))
    folder = record_run(results, tmp_path / "docs/runs", bench)
    assert folder.name == "2026-11-29-h200"
    assert sorted(p.name for p in folder.iterdir()) == ["cells.csv", "claims.csv", "report.html", "run.json",
                                                        "run.tar.gz"]
    assert load_run(folder / "run.tar.gz").record["run_id"] == "r"  # compare reads the recorded run
    record = json.loads((folder / "run.json").read_text())
    assert record["device_name"] == "NVIDIA H200" and record["driver"] == "580.159.04"  # the GPU cells', not the CPU's
    assert record["torch"] == "2.11.0+cu130" and record["commit"] == "abc" and record["workflow_wall_s"] == 570
    assert record["bench_samples_per_s_fp32_bn"] == 100_000 and record["gpu_overhead_ratio"] == pytest.approx(1.0)
    assert record["bench_compile"] == "reduce-overhead"  # the faster of the two training benchmarks
    assert record["run"]["run_id"] == "r" and record["config"] == {"studies": {}}
    assert record_run(results, tmp_path / "docs/runs") == folder  # the same run again: recorded afresh
    assert json.loads((folder / "run.json").read_text())["gpu_overhead_ratio"] is None  # no bench: said so
    (results / "run.json").write_text(json.dumps({"run_id": "other", "started": "2026-11-29T11:00:00+00:00",
                                                  "ended": "2026-11-29T11:05:00+00:00"}))
    with pytest.raises(SettingsError, match="already records another run"):
        record_run(results, tmp_path / "docs/runs")
    for text in ('{"benchmarks": []}', "not json", '{"benchmarks": [{"name": "test_training_steps_against_a_minimal_loop"}]}'):
        bench.write_text(text)
        with pytest.raises(SettingsError, match="make bench"):
            record_run(results, tmp_path / "other", bench)


def test_cells_at_the_same_path_with_other_settings_are_not_compared():
    baseline, other = finished_run("a", "supported", 0.01, 0.01), finished_run("b", "supported", 0.01, 0.01)
    baseline = FinishedRun("a", {"run_id": "a"}, baseline.cells.assign(width=64), baseline.curves, baseline.claims)
    widths = other.cells["cell"].map({"norm~bn": 64, "norm~gn": 256})  # gn trained wider in the other run
    other = FinishedRun("b", {"run_id": "b"}, other.cells.assign(width=widths), other.curves, other.claims)
    cells, left_out = cell_comparison([baseline, other])
    assert list(cells["cell"]) == ["norm~bn"]
    assert left_out == ["b: 1 cell(s) at the baseline's paths with other settings (not compared)"]


def test_a_run_from_before_a_setting_existed_compares_at_its_default():
    """An archive from before stem_stride has no such column: its cells trained at the default, 1. A cell of stride 2
    at the same path is another cell; one of stride 1 is the same."""
    baseline, other = finished_run("a", "supported", 0.01, 0.01), finished_run("b", "supported", 0.01, 0.01)
    strides = other.cells["cell"].map({"norm~bn": 1, "norm~gn": 2})
    other = FinishedRun("b", {"run_id": "b"}, other.cells.assign(stem_stride=strides), other.curves, other.claims)
    cells, left_out = cell_comparison([baseline, other])
    assert list(cells["cell"]) == ["norm~bn"]
    assert left_out == ["b: 1 cell(s) at the baseline's paths with other settings (not compared)"]


@pytest.mark.parametrize("make, message", [
    (lambda path: path.mkdir(), "the run has no run.json"),
    (lambda path: path.write_text("not an archive"), "is no run archive"),
    (lambda path: None, "no such results folder or run archive"),
    (lambda path: path.write_bytes(gzip.compress(b"x" * 600)[:40]), "is no run archive|the archive is damaged"),
])
def test_a_folder_or_file_that_is_no_finished_run_is_refused_clearly(tmp_path, make, message):
    make(tmp_path / "run")
    with pytest.raises(SettingsError, match=message):
        load_run(tmp_path / "run")


def test_archiving_an_unfinished_run_names_what_is_missing(tmp_path):
    (tmp_path / "results").mkdir()
    with pytest.raises(SettingsError, match=r"holds no finished run: .*run.json is missing"):
        archive(tmp_path / "results", tmp_path / "run.tar.gz")


def test_a_changed_byte_in_an_archive_is_caught(tmp_path):
    """A byte changed inside the compressed stream can decompress to other text: gzip's checksum catches it."""
    results = written_run(tmp_path, finished_run("a", "supported", 0.01, 0.05))
    archive(results, tmp_path / "run.tar.gz")
    data = bytearray((tmp_path / "run.tar.gz").read_bytes())
    for offset in (len(data) // 3, len(data) // 2, 2 * len(data) // 3):
        damaged = data.copy()
        damaged[offset] ^= 0x55
        (tmp_path / "damaged.tar.gz").write_bytes(damaged)
        with pytest.raises(SettingsError, match="the archive is damaged|is no run archive"):
            load_run(tmp_path / "damaged.tar.gz")


def test_archives_hold_linked_files_themselves_and_refuse_a_folder_as_out(tmp_path):
    results = written_run(tmp_path / "a", finished_run("a", "supported", 0.01, 0.05))
    (tmp_path / "elsewhere.csv").write_bytes((results / "tables/cells.csv").read_bytes())
    (results / "tables/cells.csv").unlink()
    (results / "tables/cells.csv").symlink_to(tmp_path / "elsewhere.csv")
    archive(results, tmp_path / "run.tar.gz")
    assert len(load_run(tmp_path / "run.tar.gz").cells) == 2
    (tmp_path / "out").mkdir()
    with pytest.raises(SettingsError, match="is a folder; name the archive file"):
        archive(results, tmp_path / "out")


def test_runs_without_claims_or_shared_cells_or_curves_compare_and_say_so(tmp_path):
    baseline, other = finished_run("a", "supported", 0.01, 0.01), finished_run("b", "supported", 0.01, 0.01)
    empty_claims = baseline.claims.iloc[:0]
    elsewhere = other.cells.assign(study="other")
    runs = [FinishedRun("a", {"run_id": "a"}, baseline.cells, pd.DataFrame(), empty_claims),
            FinishedRun("b", {"run_id": "b"}, elsewhere, other.curves, empty_claims)]
    counts = render_compare(runs, tmp_path / "compare.html", tmp_path / "compare.csv")
    assert counts["claims"] == 0 and counts["cells compared"] == 0
    page = (tmp_path / "compare.html").read_text()
    assert "a: no claims" in page and "a: no curves table, so no step times" in page
    assert list(pd.read_csv(tmp_path / "compare_cells.csv").columns)[:2] == ["study", "cell"]  # a header, no rows


def test_a_cell_that_diverged_in_one_run_is_flagged(tmp_path):
    baseline, other = finished_run("a", "supported", 0.01, 0.01), finished_run("b", "supported", 0.01, 0.01)
    cells = other.cells.assign(diverged=[True, False])
    cells.loc[0, "final_test_acc"] = np.nan
    runs = [FinishedRun("a", {"run_id": "a"}, baseline.cells.assign(diverged=False), baseline.curves, baseline.claims),
            FinishedRun("b", {"run_id": "b"}, cells, other.curves, other.claims)]
    assert render_compare(runs, tmp_path / "compare.html")["divergence changes"] == 1
    page = (tmp_path / "compare.html").read_text()
    assert page.count('<span class="flag">diverged in one run</span>') == 1 and ">nan<" not in page


def test_a_recording_left_without_its_run_json_is_replaced(tmp_path):
    results = written_run(tmp_path, finished_run("a", "supported", 0.01, 0.05))
    stale = tmp_path / "docs/runs/2026-11-29-cpu-model"
    stale.mkdir(parents=True)
    (stale / "cells.csv").write_text("half")
    assert record_run(results, tmp_path / "docs/runs") == stale
    assert (stale / "run.json").exists() and (stale / "cells.csv").read_text() != "half"
