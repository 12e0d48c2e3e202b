"""A cell's settings checked against each other and against the model they build, and a study's grid
expanded into cells.

A study in the workflow config is `fixed` settings plus a `grid` of axes; each
point of the grid is one cell. Every cell is checked before any training
starts, so an impossible cell stops the workflow while it is planned. This
module sits above config, data and models (imports flow one way).
"""

from __future__ import annotations

import itertools
import json
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from normbench.claims import studies_claiming
from normbench.config import SETTING_NAMES, Settings, SettingsError, check_against_schema, check_names, completed
from normbench.data import model_io
from normbench.norms import uses_batch_statistics
from normbench.plugins import describe_model, is_plugin

# The settings that decide a model's shapes and layers; cells alike in these share one trial build.
ARCHITECTURE = ("dataset", "text_path", "context", "model", "depth", "width", "stem_stride", "activation", "heads",
                "patch_size", "norm_placement", "norm", "gn_groups", "ghost_batch", "dropout")


def make_settings(values: dict[str, Any]) -> Settings:
    """Validate raw values (defaults filled in) and return the Settings, or raise SettingsError."""
    settings = Settings(**check_against_schema(values))
    _check_consistency(settings)
    return settings


def _check_consistency(settings: Settings) -> None:
    """Checks that involve several settings or the model itself."""
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
    if settings.stem_stride != 1 and (transformer or settings.model == "mlp"):
        raise SettingsError(f"setting 'stem_stride': applies to the first conv of cnn and resnet models, not to "
                            f"{settings.model!r}; leave it at 1")
    if settings.dropout and transformer:
        raise SettingsError(f"setting 'dropout': applies to mlp, cnn and resnet models, not {settings.model!r}")
    if (settings.norm == "ghostbn" and settings.ghost_batch is None) or (
            settings.ghost_batch is not None and settings.norm not in ("ghostbn", "brn") and not is_plugin(settings.norm)):
        raise SettingsError(f"setting 'ghost_batch': set it for norm ghostbn (brn and plugins with batch statistics "
                            f"may take it too), and only for them (norm is {settings.norm!r}, ghost_batch "
                            f"{settings.ghost_batch!r})")
    if settings.ghost_batch is not None and settings.batch_size % settings.ghost_batch:
        raise SettingsError(f"setting 'ghost_batch': {settings.ghost_batch} does not divide batch_size "
                            f"{settings.batch_size}; ghost batches must split each batch evenly")
    # The samples behind each statistic: a ghost batch, SyncBN's global batch, else the worker's own batch.
    over, samples = (("ghost batch", settings.ghost_batch) if settings.ghost_batch else
                     ("global batch", settings.global_batch_size) if settings.norm == "syncbn" else
                     ("per-worker batch", settings.batch_size))
    if settings.model == "mlp" and uses_batch_statistics(settings.norm) and samples < 2:
        raise SettingsError(f"setting '{'ghost_batch' if settings.ghost_batch else 'batch_size'}': norm "
                            f"{settings.norm!r} normalizes each MLP feature over the 1 sample of its {over}, which "
                            f"has no variance; use 2 or more, or a norm without batch statistics (ln, rms, dyt)")
    _check_probes(settings)
    if settings.train_subset is not None and settings.train_subset < settings.global_batch_size:
        raise SettingsError(
            f"setting 'train_subset': {settings.train_subset} images make no full batch of "
            f"{settings.global_batch_size}; raise train_subset or lower batch_size"
        )
    error = _trial_build(tuple(getattr(settings, name) for name in ARCHITECTURE))
    if error:
        raise SettingsError(f"model {settings.model!r} with norm {settings.norm!r}: {error}")


def _check_probes(settings: Settings) -> None:
    """Each probe measures something only some cells have."""
    if "percentiles" in settings.probes and settings.model not in ("mlp", "cnn"):
        raise SettingsError("probe 'percentiles' reads the inputs of the last hidden activation: models mlp and cnn")
    if "inference" in settings.probes and settings.norm != "bn":
        raise SettingsError(f"probe 'inference' compares BatchNorm's statistics and folds BN: it needs norm bn, "
                            f"not {settings.norm!r}")
    if {"ics", "inference"} & set(settings.probes) and (settings.world_size > 1 or settings.compile):
        raise SettingsError("probes 'ics' and 'inference' run in one eager process: use world_size 1, compile false")
    if "ics" in settings.probes and settings.precision != "fp32":
        raise SettingsError("probe 'ics' compares gradients to float tolerance: use precision fp32")


class NoRandomDraws(TorchFunctionMode):
    """Meta weights hold no values, so drawing them is skipped: meta `normal_` alone imports torch._dynamo
    (about 2 s of every dry run)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("normal_", "uniform_", "trunc_normal_"):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


@cache
def _trial_build(architecture: tuple) -> str | None:
    """Build the model on the meta device (shapes and norm groups checked, no weights allocated); the error, if any.

    Cached by architecture: a 1,000-cell grid over seeds and learning rates builds each model once.
    """
    from normbench.models import build_model

    settings = Settings(**dict(zip(ARCHITECTURE, architecture)))
    try:
        with torch.device("meta"), NoRandomDraws():
            build_model(settings, *model_io(settings))
        return None
    except ValueError as error:
        if not (is_plugin(settings.norm) or is_plugin(settings.model)):
            return str(error)
    try:  # a user's code may read a value while it builds, which meta tensors do not hold: a real build decides
        build_model(settings, *model_io(settings))
        return None
    except ValueError as error:
        return str(error)


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


def check_reference(study_name: str, reference: dict[str, Any], cells: list[dict[str, Any]]) -> None:
    """A study's `report: reference` names settings and picks some of its cells (given as their full settings):
    the report judges whether the study trained by them."""
    where = f"studies: {study_name}: report: reference: "
    check_names(reference, SETTING_NAMES, "setting", where)
    defaults = Settings().to_dict()
    full = [{**defaults, **cell} for cell in cells]
    if not any(all(cell[key] == value for key, value in reference.items()) for cell in full):
        example = json.dumps({key: full[0][key] for key in reference})
        raise SettingsError(f"{where}{json.dumps(reference)} picks none of the study's cells; name values its cells "
                            f"take, e.g. {example}")


def _values(values: list) -> str:
    return "{" + ", ".join(map(str, values)) + "}"


def studies_table(config: dict[str, Any]) -> str:
    """The Markdown table of a workflow config's studies: claims, cell count and grid, generated so that the
    README cannot drift from the config (a test compares them)."""
    defaults = config.get("defaults", {})
    lines = ["| study | claims | cells | model: grid (each combination is one cell) |", "|---|---|---|---|"]
    for name, study in config["studies"].items():
        fixed = {**defaults, **study.get("fixed", {})}
        axes = [f"{axis} {_values(values)}" for axis, values in study.get("grid", {}).items()]
        linked = study.get("linked", {})
        if linked:
            points = ", ".join("(" + ", ".join(map(str, point)) + ")" for point in zip(*linked.values()))
            axes.append(f"({', '.join(linked)}) ∈ {{{points}}}")
        cells = len(study_cells(name, {**study, "fixed": fixed}))
        model = describe_model(completed(fixed))
        claims = ", ".join(entry["id"] if isinstance(entry, dict) else entry
                           for entry in study.get("claims", [])) or "none (descriptive)"
        lines.append(f"| `{name}` | {claims} | {cells} | {model}: {' × '.join(axes)} |")
    if "benchmarks" in config:
        claims = ", ".join(config["benchmarks"].get("claims", {})) or "none"
        folding = studies_claiming(config, "C11")
        folded = f"; inference with BN folded and not, for the model of {', '.join(folding)} (C11's speed)" \
            if folding else ""
        lines.append(f"| micro-benchmarks | {claims} | | forward + backward of each norm layer on conv maps and "
                     f"tokens, fp32 and bf16{folded} (`normbench bench`) |")
    return "\n".join(lines) + "\n"
