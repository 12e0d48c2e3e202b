"""The micro-benchmarks: sessions repeated in separate processes, every case timed, rounds kept for the
ratios, intervals over the repeats; a study's model timed with BN folded and not."""

import json

import pytest
import torch

from normbench.bench import CASES, DTYPES, FOLD_ROUNDS
from normbench.cli import main
from normbench.provenance import device_name
from normbench.report import rounds_of
from normbench.report.tables import benchmark_table, folding_time_table
from normbench.results import benchmark_rounds


FOLD = {"inference": {"model": "resnet", "depth": 8, "width": 8, "stem_stride": 2, "channels_last": True}}


def test_bench_times_every_case_and_reports_ratios_to_bn(tmp_path):
    out = tmp_path / "norms.json"
    main(["bench", "--out", str(out), "--max-time", "0.01", "--threads", "1", "--device", "cpu", "--repeats", "2",
          "--fold", json.dumps(FOLD)])
    everything = benchmark_rounds(out)
    rounds = rounds_of(everything, "benchmarks")
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

    # The inference study's ResNet-8, unfolded and folded, in each repeat: C11's speed, with its interval.
    folding = rounds_of(everything, "inference")
    assert len(folding) + len(rounds) == len(everything)
    timed = folding.groupby(["repeat", "network"])["time_s"].agg(["size", "min"])
    assert len(timed) == 4 and (timed["size"] == FOLD_ROUNDS).all() and (timed["min"] > 0).all()  # both each round
    assert set(folding["shape"]) == {"250x1x28x28"}  # the CPU's evaluation batch
    row = folding_time_table(folding)["rows"][0]
    assert row[1:3] == ["resnet, depth 8, width 8, stem stride 2", "250x1x28x28"] and row[-1] == "2"
    assert float(row[3]) > 0 and float(row[4]) > 0


@pytest.mark.parametrize("fold, message", [
    ("{", r"--fold: not JSON"),
    ('{"inference": {"model": "resnet", "width": "wide"}}', r"folding benchmark of study 'inference': setting 'width'"),
])
def test_bad_folding_settings_are_named_before_any_session(tmp_path, fold, message):
    with pytest.raises(SystemExit, match=message):
        main(["bench", "--out", str(tmp_path / "norms.json"), "--fold", fold])
