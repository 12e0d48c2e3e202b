"""The norm micro-benchmarks: sessions repeated in separate processes, every case timed, rounds kept for the
ratios, intervals over the repeats."""

import torch

from normbench.bench import CASES, DTYPES
from normbench.cli import main
from normbench.provenance import device_name
from normbench.report.tables import benchmark_table
from normbench.results import benchmark_rounds


def test_bench_times_every_case_and_reports_ratios_to_bn(tmp_path):
    out = tmp_path / "norms.json"
    main(["bench", "--out", str(out), "--max-time", "0.01", "--threads", "1", "--device", "cpu", "--repeats", "2"])
    rounds = benchmark_rounds(out)
    assert set(rounds["repeat"]) == {0, 1}
    assert set(rounds["device"]) == {device_name(torch.device("cpu"))} and set(rounds["threads"]) == {1}
    timed = rounds.groupby(["repeat", "layout", "norm", "dtype"])["time_s"].agg(["size", "min"])
    assert len(timed) == 2 * len(CASES) * len(DTYPES)
    assert (timed["size"] >= 5).all() and (timed["min"] > 0).all()  # --benchmark-min-rounds=5, real timings
    # Each session runs the cases in an order of its own after a warm-up case, which is not kept; maps channels_last.
    order = rounds.groupby(["repeat", "layout", "norm", "dtype"])["position"].first().unstack("repeat")
    assert (order[0] != order[1]).any() and order.min().min() == 1 and "warm_up" not in rounds
    assert set(rounds.loc[rounds["layout"] == "channels", "memory_format"]) == {"channels_last"}
    table = benchmark_table(rounds)
    relative = {(row[1], row[3], row[4]): row[6] for row in table["rows"]}
    assert [relative[layout, dtype, "bn"] for layout in ("channels", "tokens") for dtype in DTYPES] == \
        ["1 (reference)"] * 4
    value, interval = relative["channels", "fp32", "gn"].split(" [")
    low, high = map(float, interval.rstrip("]").split(", "))
    assert low <= float(value) <= high and float(value) > 0  # the mean of two repeats' ratios, with its interval
    assert table["measured_on"] == f"{device_name(torch.device('cpu'))}, 1 CPU threads"
