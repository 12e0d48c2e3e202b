"""Settings are validated before any work, with messages that name the key and the fix."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from normbench.cells import make_settings, study_cells
from normbench.config import (SETTING_NAMES, Settings, SettingsError, format_assignment, normalize_workflow_config,
                              parse_assignments, settings_schema)

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_schema_covers_every_setting():
    assert make_settings({}) == Settings()
    assert set(settings_schema()["properties"]) == set(SETTING_NAMES)


@pytest.mark.parametrize("values,message", [
    ({"norm": "batchnorm"}, r"setting 'norm': unknown norm 'batchnorm'; known: bn, "),
    ({"batch_size": 0}, r"setting 'batch_size': 0 is less than the minimum of 1"),
    ({"lr": -1.0}, r"setting 'lr'"),
    ({"nrom": "bn"}, r"unknown setting 'nrom'; did you mean 'norm'\?"),
    ({"norm": "gn", "gn_groups": 3, "width": 8}, r"gn_groups=3 does not divide a layer of 8 channels"),
    ({"model": "resnet20", "depth": 14}, r"setting 'depth'"),
    ({"model": "resnet", "depth": 21}, r"6n\+2"),
    ({"model": "resnet20", "activation": "sigmoid"}, r"setting 'activation'"),
    ({"model": "mlp", "norm": "in"}, r"needs spatial maps"),
    ({"train_subset": 100, "batch_size": 128}, r"setting 'train_subset'"),
])
def test_bad_settings_are_rejected_with_the_key(values, message):
    with pytest.raises(SettingsError, match=message):
        make_settings(values)


def test_assignments_are_typed():
    values = parse_assignments(["norm=gn", "batch_size=4", "lr=1e-3", "augment=true", "train_subset=null"])
    assert values == {"norm": "gn", "batch_size": 4, "lr": 0.001, "augment": True, "train_subset": None}
    with pytest.raises(SettingsError, match="key=value"):
        parse_assignments(["norm"])


def test_assignments_round_trip():
    import numpy as np

    values = {"norm": "none", "lr": 1e-05, "train_subset": None, "augment": False, "batch_size": np.int64(4), "precision": "fp32"}
    words = [format_assignment(key, value) for key, value in values.items()]
    assert parse_assignments(words) == {**values, "batch_size": 4}


def test_linear_lr_scaling_uses_the_global_batch():
    assert make_settings({"lr": 0.1, "batch_size": 32, "lr_reference_batch": 128}).effective_lr == pytest.approx(0.025)
    assert make_settings({"lr": 0.1, "batch_size": 32}).effective_lr == 0.1


def test_study_expands_to_the_grid_product():
    cells = study_cells("s", {"fixed": {"width": 8, "gn_groups": 4}, "grid": {"norm": ["bn", "gn"], "batch_size": [4, 16, 128]}})
    assert len(cells) == 6
    assert {"norm": "gn", "batch_size": 16} in cells


def test_linked_axes_vary_together():
    cells = study_cells("d", {"grid": {"norm": ["bn", "syncbn"]}, "linked": {"world_size": [1, 2], "batch_size": [32, 16]}})
    assert cells == [{"norm": "bn", "world_size": 1, "batch_size": 32}, {"norm": "bn", "world_size": 2, "batch_size": 16},
                     {"norm": "syncbn", "world_size": 1, "batch_size": 32}, {"norm": "syncbn", "world_size": 2, "batch_size": 16}]
    with pytest.raises(SettingsError, match="must list the same number of values"):
        study_cells("d", {"grid": {"norm": ["bn"]}, "linked": {"world_size": [1, 2], "batch_size": [32]}})


def test_study_errors_name_the_study_and_cell():
    with pytest.raises(SettingsError, match=r"study 's', cell \{\"norm\": \"foo\"\}: setting 'norm'"):
        study_cells("s", {"grid": {"norm": ["bn", "foo"]}})
    with pytest.raises(SettingsError, match="norm appears twice among fixed, grid and linked"):
        study_cells("s", {"fixed": {"norm": "bn"}, "grid": {"norm": ["gn"]}})


def test_planning_a_cell_leaves_torch_dynamo_unimported():
    """The trial build skips drawing meta weights, whose kernels import torch._dynamo (seconds of every plan)."""
    check = ("import sys; from normbench.cells import make_settings; "
             "[make_settings({'model': m, 'width': 8}) for m in ('resnet20', 'vit', 'mlp', 'cnn')]; "
             "print('torch._dynamo' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


@pytest.mark.parametrize("study, message", [
    ({"grid": {"norm": ["bn", "gn", "bn"]}, "claims": ["C6"]}, r"studies: s: grid: norm: 'bn' is listed twice"),
    ({"grid": {"norm": ["bn", "gn"]}, "claims": ["C6", "C6"]}, r"studies: s: claims: 'C6' is listed twice"),
])
def test_a_value_listed_twice_is_named_without_the_schema(study, message):
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    with pytest.raises(SettingsError, match=message):
        normalize_workflow_config({"studies": {"s": study}}, schema)


@pytest.mark.parametrize("change, message", [
    ({"thresold": 0.1, "threshold": None}, r"claims: item 2: unknown key 'thresold'; did you mean 'threshold'\?"),
    ({"measure": "final_acc"}, r"item 2: measure: 'final_acc' is unknown; did you mean 'final_test_acc'\?"),
    ({"rule": "abve"}, r"item 2: rule: 'abve' is unknown; did you mean 'above'\?"),
    ({"combine": None}, r"item 2: missing key 'combine'"),
    ({"threshold": "big"}, r"item 2: threshold: 'big' is no number"),
    ({"statement": 5}, r"item 2: statement: 5 is no string"),
])
def test_a_claim_declared_in_the_config_is_refused_naming_its_wrong_key(change, message):
    claim = {"id": "mine", "statement": "x", "measure": "final_test_acc", "compare": {"norm": ["gn", "bn"]},
             "combine": "difference", "rule": "above", "threshold": 0.1, **change}
    claim = {key: value for key, value in claim.items() if value is not None}
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    with pytest.raises(SettingsError, match=message):
        normalize_workflow_config({"studies": {"s": {"grid": {"norm": ["bn"]}, "claims": ["C6", claim]}}}, schema)
