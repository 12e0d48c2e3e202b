"""The norm micro-benchmarks: one pytest-benchmark session, every case timed, rounds kept for the ratios."""

import torch

from normbench.bench import CASES, DTYPES
from normbench.cli import main
from normbench.provenance import device_name
from normbench.report import benchmark_table
from normbench.results import benchmark_rounds


def test_bench_times_every_case_and_reports_ratios_to_bn(tmp_path):
    out = tmp_path / "norms.json"
    main(["bench", "--out", str(out), "--max-time", "0.01", "--threads", "1", "--device", "cpu"])
    rounds = benchmark_rounds(out)
    assert set(rounds["device"]) == {device_name(torch.device("cpu"))} and set(rounds["threads"]) == {1}
    timed = rounds.groupby(["layout", "norm", "dtype"])["time_s"].agg(["size", "min"])
    assert len(timed) == len(CASES) * len(DTYPES)
    assert (timed["size"] >= 5).all() and (timed["min"] > 0).all()  # --benchmark-min-rounds=5, real timings
    table = benchmark_table(rounds)
    relative = {(row[0], row[2], row[3]): row[5] for row in table["rows"]}
    assert [relative[layout, dtype, "bn"] for layout in ("channels", "tokens") for dtype in DTYPES] == \
        ["1 (reference)"] * 4
    low, high = map(float, relative["channels", "fp32", "gn"].split("[")[1].rstrip("]").split(", "))
    assert 0 < low <= high
    assert table["measured_on"] == f"{device_name(torch.device('cpu'))}, 1 CPU threads"
