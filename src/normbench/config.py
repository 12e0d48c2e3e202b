"""Cell settings, their validation, and the expansion of a study into cells.

A study in the workflow config is `fixed` settings plus a `grid` of axes; each
point of the grid is one cell. Settings are checked against
settings.schema.yaml (the same file the workflow's config schema refers to)
and then against the model they build, so an impossible cell fails before
any training starts.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
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
    device: str = "auto"

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
        return dataclasses.asdict(self)


SETTING_NAMES = tuple(f.name for f in fields(Settings))


@cache
def settings_schema() -> dict:
    return yaml.safe_load(files("normbench").joinpath("settings.schema.yaml").read_text())


def _check_against_schema(values: dict[str, Any]) -> None:
    unknown = sorted(set(values) - set(SETTING_NAMES))
    if unknown:
        raise SettingsError(f"unknown setting(s) {', '.join(map(repr, unknown))}; known settings: {', '.join(SETTING_NAMES)}")
    validator = jsonschema.Draft202012Validator(settings_schema())
    for error in sorted(validator.iter_errors(values), key=lambda e: list(e.path)):
        key = error.path[0] if error.path else "?"
        raise SettingsError(f"setting {key!r}: {error.message}")


def _check_consistency(settings: Settings) -> None:
    """Checks that involve several settings or the model itself."""
    from normbench.data import model_io  # lazy: keeps `import normbench.config` light for the Snakefile
    from normbench.models import build_model

    if settings.model not in ("mlp", "cnn") and settings.activation != "relu":
        raise SettingsError(f"setting 'activation': {settings.activation!r} applies to models mlp and cnn; ResNets use relu")
    if settings.model in ("resnet20", "resnet32", "resnet56") and settings.depth is not None:
        raise SettingsError(f"setting 'depth': model {settings.model!r} fixes its depth; use model 'resnet' with depth=6n+2")
    transformer = settings.model in ("vit", "gpt")
    if (settings.dataset == "text") != (settings.model == "gpt"):
        raise SettingsError(f"setting 'model': {settings.model!r} with dataset {settings.dataset!r}; "
                            "the text dataset goes with model gpt, and gpt needs dataset text")
    if settings.dataset == "text" and not (settings.text_path and Path(settings.text_path).is_file()):
        raise SettingsError(f"setting 'text_path': {settings.text_path!r} is no readable file; point it to a UTF-8 text")
    if transformer and settings.width % settings.heads:
        raise SettingsError(f"setting 'heads': {settings.heads} heads do not divide width {settings.width}")
    if settings.dataset == "text" and (settings.augment or settings.channels_last):
        raise SettingsError("settings 'augment' and 'channels_last' apply to images, not to text")
    if settings.train_subset is not None and settings.train_subset < settings.global_batch_size:
        raise SettingsError(
            f"setting 'train_subset': {settings.train_subset} images make no full batch of "
            f"{settings.global_batch_size}; raise train_subset or lower batch_size"
        )
    import torch

    input_shape, num_classes = model_io(settings)
    try:
        with torch.device("meta"):  # shapes and norm groups checked without allocating weights
            build_model(settings, input_shape, num_classes)
    except ValueError as error:
        raise SettingsError(f"model {settings.model!r} with norm {settings.norm!r}: {error}") from None


def make_settings(values: dict[str, Any]) -> Settings:
    """Validate raw values (defaults filled in) and return the Settings, or raise SettingsError."""
    _check_against_schema(values)
    settings = Settings(**values)
    _check_consistency(settings)
    return settings


def parse_assignments(assignments: list[str]) -> dict[str, Any]:
    """Turn `key=value` strings from the command line into typed values (YAML scalars)."""
    values = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key:
            raise SettingsError(f"cannot read {assignment!r}: write settings as key=value, e.g. norm=gn")
        values[key] = _parse_scalar(raw)
    return values


def format_assignment(key: str, value: Any) -> str:
    """The `key=value` word that parse_assignments reads back as `value` (numpy scalars included)."""
    return f"{key}={json.dumps(value.item() if hasattr(value, 'item') else value)}"


def _parse_scalar(raw: str) -> Any:
    value = yaml.safe_load(raw) if raw else ""
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_settings_file(path: str | Path) -> dict[str, Any]:
    """Read a cell's config.json (or any JSON/YAML mapping of settings)."""
    text = Path(path).read_text()
    values = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
    if not isinstance(values, dict):
        raise SettingsError(f"{path}: expected a mapping of settings")
    return values


def study_cells(study_name: str, study: dict[str, Any]) -> list[dict[str, Any]]:
    """Every cell of a study as a dict of its axis values, each validated with the fixed settings.

    `grid` axes combine as a product; `linked` axes vary together (their i-th values form
    one point), e.g. world_size [1, 2] with batch_size [32, 16] for a fixed global batch.
    """
    fixed, grid, linked = study.get("fixed", {}), study.get("grid", {}), study.get("linked", {})
    for first, second in ((fixed, grid), (fixed, linked), (grid, linked)):
        overlap = sorted(set(first) & set(second))
        if overlap:
            raise SettingsError(f"study {study_name!r}: {', '.join(overlap)} appears twice among fixed, grid and linked; keep one")
    lengths = {len(values) for values in linked.values()}
    if len(lengths) > 1:
        raise SettingsError(f"study {study_name!r}: linked axes {', '.join(linked)} must list the same number of values")
    linked_points = [dict(zip(linked, values)) for values in zip(*linked.values())] or [{}]
    grid_points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    cells = [{**point, **link} for point in grid_points for link in linked_points]
    for cell in cells:
        try:
            make_settings({**fixed, **cell})
        except SettingsError as error:
            raise SettingsError(f"study {study_name!r}, cell {json.dumps(cell)}: {error}") from None
    return cells
