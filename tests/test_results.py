"""Cell folders aggregated into tables, and the report's provenance read from them."""

import re

import pandas as pd
import pytest

from normbench.cli import main
from normbench.report import provenance
from normbench.results import (CONFIG, ENV, METRICS, PROBES, UnreadableResult, aggregate, read_json, read_jsonl,
                               write_json, write_table)

# What env.json held before it recorded TF32 and determinism.
OLD_ENV = {"device": "cpu", "torch": "2.14.1", "host": "h", "time": "2026-01-01T00:00:00+00:00"}
CPU = {"tf32": None, "deterministic_algorithms": False, "cudnn_benchmark": False, "cudnn_deterministic": False}


def cell(runs, name: str, env: dict):
    """A finished cell's folder with the given env.json; returns its summary.json."""
    folder = runs / "s" / name
    write_json(folder / CONFIG, {"device": "auto", "norm": "bn", "seed": 0})
    write_json(folder / ENV, env)
    for rows in (METRICS, PROBES):
        (folder / rows).write_text("")
    write_json(folder / "summary.json", {"final_test_acc": 0.8, "diverged": False})
    return folder / "summary.json"


def provenance_of(tmp_path, envs: dict) -> dict:
    """The provenance of cells with these env.json files, through cells.csv as the report reads it."""
    runs = tmp_path / "runs"
    write_table(aggregate([cell(runs, name, env) for name, env in envs.items()], runs)["cells"], tmp_path / "cells.csv")
    return provenance(pd.read_csv(tmp_path / "cells.csv"))


def test_provenance_says_whether_tf32_and_deterministic_kernels_were_on(tmp_path):
    cuda = {**OLD_ENV, "device": "cuda:0"}
    shown = provenance_of(tmp_path, {
        "old": OLD_ENV,
        "cpu": {**OLD_ENV, **CPU},
        "tf32": {**cuda, **CPU, "tf32": {"matmul": True, "cudnn_conv": True}, "cudnn_benchmark": True},
        "deterministic": {**cuda, **CPU, "tf32": {"matmul": False, "cudnn_conv": False},
                          "deterministic_algorithms": True, "cudnn_deterministic": True},
    })
    assert shown["TF32"].startswith("on for 1 of 3 cells")
    assert shown["deterministic algorithms"] == "on for 1 of 3 cells"
    assert shown["cuDNN"] == "deterministic on for 1 of 2 cells, autotuner (benchmark) on for 1 of 2 cells"
    assert shown["TF32 and determinism not recorded"] == "1 of 4 cells (older env.json)"
    assert not {"tf32", "tf32_matmul", "deterministic_algorithms", "cudnn_benchmark"} & set(shown)


def test_provenance_of_cpu_cells_and_of_older_ones(tmp_path):
    cpu = provenance_of(tmp_path / "cpu", {"a": {**OLD_ENV, **CPU}})
    assert cpu["TF32"] == "off (fp32 is IEEE float32)" and cpu["deterministic algorithms"] == "off"
    assert "cuDNN" not in cpu  # no cuDNN on the CPU
    old = provenance_of(tmp_path / "old", {"a": OLD_ENV})  # aggregates, and says nothing it did not record
    assert old.keys() == cpu.keys() - {"TF32", "deterministic algorithms"}


@pytest.mark.parametrize("damaged", ["summary.json", METRICS])
def test_a_damaged_result_file_stops_the_aggregate_naming_the_cell(tmp_path, damaged):
    runs = tmp_path / "runs"
    summaries = [cell(runs, "good", OLD_ENV), cell(runs, "cut", OLD_ENV)]
    path = runs / "s/cut" / damaged
    path.write_text('{"final_test_acc": 0.8, "diver')  # a file cut short
    with pytest.raises(UnreadableResult, match=rf"{re.escape(str(path))}: not valid JSON .* the cell in "
                                               rf"{re.escape(str(runs / 's/cut'))} is damaged: train it again"):
        aggregate(summaries, runs)
    with pytest.raises(SystemExit, match=r"normbench: error: .*cut.* not valid JSON"):
        main(["aggregate", *map(str, summaries), "--runs-root", str(runs), "--out", str(tmp_path / "tables")])


def test_a_damaged_file_names_its_line_and_bytes_that_are_no_text_are_damage_too(tmp_path):
    path = tmp_path / "cell" / METRICS
    path.parent.mkdir()
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    with pytest.raises(UnreadableResult, match=r"not valid JSON \(.*, line 3\)"):
        read_jsonl(path)
    path.write_bytes(bytes(range(128, 256)))
    with pytest.raises(UnreadableResult, match=r"not valid JSON \(not UTF-8 text\)"):
        read_jsonl(path)
    config = tmp_path / "cell" / CONFIG
    config.write_bytes(bytes(range(128, 256)))
    with pytest.raises(UnreadableResult, match=r"not UTF-8 text.*train it again \(`normbench train --out .* --force "
                                               r"--set \.\.\.` with its settings"):
        read_json(config)


def test_benchmark_rounds_expand_paired_cases_by_network(tmp_path):
    """A norm case gives one row per round; C11's case, whose rounds each timed two networks, one per network and
    round."""
    from normbench.results import PAIRED_ROUNDS, benchmark_rounds

    norm = {"extra_info": {"repeat": 0, "norm": "bn", "layout": "channels"}, "stats": {"data": [1.0, 2.0, 3.0]}}
    paired = {"extra_info": {"repeat": 0, "fold_study": "inference", PAIRED_ROUNDS: {"unfolded": [4.0, 5.0],
                                                                                     "folded": [2.0, 2.5]}},
              "stats": {"data": [6.0, 7.5]}}
    write_json(tmp_path / "bench.json", {"benchmarks": [norm, paired]})
    rounds = benchmark_rounds(tmp_path / "bench.json")
    assert rounds[rounds["norm"] == "bn"]["time_s"].tolist() == [1.0, 2.0, 3.0]
    folding = rounds[rounds["fold_study"] == "inference"].set_index(["network", "round"])["time_s"]
    assert folding.to_dict() == {("unfolded", 0): 4.0, ("unfolded", 1): 5.0, ("folded", 0): 2.0, ("folded", 1): 2.5}
    assert PAIRED_ROUNDS not in rounds
