"""Cell settings: their defaults, their schema, and reading them from the command line and from files.

Settings are checked here against settings.schema.yaml (the same file the
workflow's config schema refers to); normbench.cells checks them against each
other and against the model they build.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, fields
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import yaml


class SettingsError(ValueError):
    """A setting that cannot run; the message names the key and the fix."""


@dataclass(frozen=True)
class Settings:
    """Everything that determines a cell's numbers (execution details like threads excluded)."""

    dataset: str = "fashion_mnist"
    data_root: str = "data"
    text_path: str | None = None
    context: int = 64
    train_subset: int | None = None
    test_subset: int | None = None
    augment: bool = False
    model: str = "resnet20"
    depth: int | None = None
    width: int = 16
    activation: str = "relu"
    init: str = "default"
    heads: int = 4
    patch_size: int = 7
    norm_placement: str = "pre"
    norm: str = "bn"
    ghost_batch: int | None = None
    dropout: float = 0.0
    gn_groups: int = 8
    norm_eps: float = 1e-5
    bn_momentum: float = 0.1
    batch_size: int = 128
    world_size: int = 1
    precision: str = "fp32"
    optimizer: str = "sgd"
    lr: float = 0.1
    lr_reference_batch: int | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    epochs: int = 2
    evals_per_epoch: int = 1
    seed: int = 0
    max_loss: float = 1e3
    channels_last: bool = False
    compile: bool = False
    tf32: bool = False
    deterministic: bool = False
    probes: tuple[str, ...] = ()
    device: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "probes", tuple(self.probes))  # a list from JSON or YAML; hashable here

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def effective_lr(self) -> float:
        """The peak learning rate, linearly scaled with the global batch when a reference is set."""
        if self.lr_reference_batch is None:
            return self.lr
        return self.lr * self.global_batch_size / self.lr_reference_batch

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (lists, not tuples): what config.json holds and reads back as equal."""
        return {**dataclasses.asdict(self), "probes": list(self.probes)}


SETTING_NAMES = tuple(f.name for f in fields(Settings))


@cache
def settings_schema() -> dict:
    return yaml.safe_load(files("normbench").joinpath("settings.schema.yaml").read_text())


def settings_help() -> list[tuple[str, str, str]]:
    """(name, default, description) of every setting, in the order of Settings, for `normbench settings`."""
    properties = settings_schema()["properties"]
    return [(f.name, json.dumps(f.default), properties[f.name].get("description", "")) for f in fields(Settings)]


def describe_differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The settings that differ between two cells, e.g. "norm: 'bn' there, 'gn' here"."""
    keys = sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))
    return "; ".join(f"{key}: {old.get(key)!r} there, {new.get(key)!r} here" for key in keys)


def check_against_schema(values: dict[str, Any]) -> None:
    """Raise SettingsError for an unknown name (suggesting the closest known one) or a value the schema refuses."""
    for key in sorted(set(values) - set(SETTING_NAMES)):
        close = difflib.get_close_matches(key, SETTING_NAMES, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "`normbench settings` lists them"
        raise SettingsError(f"unknown setting {key!r}; {hint}")
    validator = jsonschema.Draft202012Validator(settings_schema())
    for error in sorted(validator.iter_errors(values), key=lambda e: list(e.path)):
        key = error.path[0] if error.path else "?"
        raise SettingsError(f"setting {key!r}: {error.message}")


def parse_assignments(assignments: list[str]) -> dict[str, Any]:
    """Turn `key=value` strings from the command line into typed values (YAML scalars); a key given twice
    is an error, since only one of its values could be trained."""
    values = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key:
            raise SettingsError(f"cannot read {assignment!r}: write settings as key=value, e.g. norm=gn")
        if key in values:
            raise SettingsError(f"setting {key!r} is given twice ({format_assignment(key, values[key])} and "
                                f"{assignment}); give each setting once")
        values[key] = numbers_as_yaml12(yaml.safe_load(raw) if raw else "")
    return values


def format_assignment(key: str, value: Any) -> str:
    """The `key=value` word that parse_assignments reads back as `value` (numpy scalars included)."""
    return f"{key}={json.dumps(value.item() if hasattr(value, 'item') else value)}"


# PyYAML (and so Snakemake's config loading) follows YAML 1.1, which reads 1e-3 as a string: it wants a dot
# (1.0e-3). YAML 1.2 and JSON read it as a number, as every user expects.
_EXPONENT_NUMBER = re.compile(r"^[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$")


def numbers_as_yaml12(value: Any) -> Any:
    """`value` (a scalar, or nested lists and mappings) with every string such as '1e-3' read as a float."""
    if isinstance(value, dict):
        return {key: numbers_as_yaml12(item) for key, item in value.items()}
    if isinstance(value, list):
        return [numbers_as_yaml12(item) for item in value]
    if isinstance(value, str) and _EXPONENT_NUMBER.match(value):
        return float(value)
    return value


def load_settings_file(path: str | Path) -> dict[str, Any]:
    """Read a cell's config.json (or any JSON/YAML mapping of settings); a missing or malformed file is a
    SettingsError that names the file (and the line)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SettingsError(f"cannot read settings file {str(path)!r}: {error.strerror}") from None
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as error:
        raise SettingsError(f"{path}, line {error.lineno}: not valid JSON ({error.msg})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise SettingsError(f"{path}{where}: not valid YAML ({getattr(error, 'problem', None) or error})") from None
    if not isinstance(values, dict):
        raise SettingsError(f"{path}: expected a mapping of settings (key: value lines)")
    return numbers_as_yaml12(values)
