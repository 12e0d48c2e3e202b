"""Cell settings: their defaults, their schema, and reading them from the command line and from files.

Settings are checked here against settings.schema.yaml (the same file the
workflow's config schema refers to); normbench.cells checks them against each
other and against the model they build.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
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
    stem_stride: int = 1
    activation: str = "relu"
    init: str = "default"
    heads: int = 4
    patch_size: int = 7
    norm_placement: str = "pre"
    norm: str = "bn"
    ghost_batch: int | None = None
    dropout: float = 0.0
    brn_relax_steps: int = 40_000
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
    compile: bool | str = False  # or "reduce-overhead"
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


def choices(setting: str) -> list | None:
    """The values the settings schema lists for `setting` (for norm: the built-in names beside plugin references)."""
    schema = settings_schema()["properties"].get(setting, {})
    return schema.get("enum") or next((branch["enum"] for branch in schema.get("anyOf", []) if "enum" in branch), None)


def settings_help() -> list[tuple[str, str, str]]:
    """(name, default, description) of every setting, in the order of Settings, for `normbench settings`: the
    schema's description with its allowed values and bounds, so that the command says all the schema says."""
    properties = settings_schema()["properties"]

    def describe(schema: dict) -> str:
        allowed = schema.get("enum") or schema.get("items", {}).get("enum") or next(
            (branch["enum"] for branch in schema.get("anyOf", []) if "enum" in branch), None)
        limits = [f"{word} {schema[key]}" for key, word in (("minimum", ">="), ("exclusiveMinimum", ">"),
                                                             ("maximum", "<=")) if key in schema]
        kinds = "/".join(sorted(_types(schema) - {"null"}))
        allowed = [value if isinstance(value, str) else json.dumps(value) for value in allowed or []]  # false, true
        facts = ([f"one of: {', '.join(allowed)}" if "items" not in schema else f"any of: {', '.join(allowed)}"]
                 if allowed else [kinds] if kinds else []) + limits + (["or null"] if "null" in _types(schema) else [])
        return f"{schema.get('description', '')} [{'; '.join(facts)}]" if facts else schema.get("description", "")

    return [(f.name, json.dumps(f.default), describe(properties[f.name])) for f in fields(Settings)]


SETTING_DEFAULTS = Settings().to_dict()


def completed(recorded: dict[str, Any]) -> dict[str, Any]:
    """A cell's recorded settings with the default of every setting added since it was written, which is the
    behaviour it trained with (a new setting's default keeps the old one: stem_stride 1, for one)."""
    return {**SETTING_DEFAULTS, **recorded}


def describe_differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The settings that differ between two cells, e.g. "norm: 'bn' there, 'gn' here"."""
    keys = sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))
    return "; ".join(f"{key}: {old.get(key)!r} there, {new.get(key)!r} here" for key in keys)


def check_names(names, known, what: str, where: str = "", listing: str = "`normbench settings` lists them") -> None:
    """Raise SettingsError for the first unknown name, suggesting the closest known one."""
    for name in sorted(set(names) - set(known)):
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else listing
        raise SettingsError(f"{where}unknown {what} {name!r}; {hint}")


def check_against_schema(values: dict[str, Any]) -> dict[str, Any]:
    """The values in their schema types (32.0 for an integer is 32); SettingsError for an unknown name (suggesting
    the closest known one) or a value the schema refuses."""
    check_names(values, SETTING_NAMES, "setting")
    values = {key: as_schema_type(value, settings_schema()["properties"][key]) for key, value in values.items()}
    for key, value in values.items():  # NaN passes every bound of the schema (each comparison is false)
        if isinstance(value, float) and not math.isfinite(value):
            raise SettingsError(f"setting {key!r}: {value} is not a finite number; give a finite one")
    validator = jsonschema.Draft202012Validator(settings_schema())
    for error in sorted(validator.iter_errors(values), key=lambda e: list(e.path)):
        key = error.path[0] if error.path else "?"
        if error.context and isinstance(error.instance, str):  # anyOf: a built-in name, or a plugin reference
            known = choices(key)
            close = difflib.get_close_matches(error.instance, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SettingsError(f"setting {key!r}: unknown {key} {error.instance!r}; {hint}known: {', '.join(known)}; "
                                f"or your own as path/to/file.py:Name or package.module:Name (the object's name after "
                                f"a colon; no spaces in the path)")
        message = "; or ".join(sub.message for sub in error.context) if error.context else error.message
        raise SettingsError(f"setting {key!r}: {message} (`normbench settings` gives each setting's meaning and "
                            f"default)")
    return values


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
        values[key] = yaml12_scalar(raw)
    return values


_INTEGER = re.compile(r"^[-+]?[0-9]+$")
_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+\.?[0-9]*)([eE][-+]?[0-9]+)?$")


def yaml12_scalar(raw: str) -> Any:
    """A command-line value as YAML 1.2 reads it: 010 is ten (PyYAML's YAML 1.1 reads eight), 1e-3 a number;
    lists and strings as YAML reads them."""
    if _INTEGER.match(raw):
        return int(raw, 10)
    if _FLOAT.match(raw):
        return float(raw)
    return numbers_as_yaml12(yaml.safe_load(raw)) if raw else ""


def _types(schema: dict) -> set[str]:
    kind = schema.get("type", [])
    return set(kind) if isinstance(kind, list) else {kind}


def as_schema_type(value: Any, schema: dict) -> Any:
    """A scalar in the type its schema asks for, where that loses nothing: 32.0 for an integer is 32; '2000' (how
    Snakemake's --config passes nested values) is 2000 for a number. Anything else is returned as it is, for the
    schema to judge."""
    types = _types(schema)
    if isinstance(value, str) and types & {"integer", "number", "boolean"}:
        parsed = yaml12_scalar(value)
        value = parsed if isinstance(parsed, (int, float)) else value
    if "integer" in types and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def normalize_workflow_config(config: dict[str, Any], workflow_schema: dict) -> dict[str, Any]:
    """The workflow config with numbers as numbers (see numbers_as_yaml12 and as_schema_type), following the
    workflow schema (and the settings schema for settings and grid axes); unknown names anywhere are refused with
    the closest known one, before the schema's own validation (whose message would dump the schema)."""
    settings = settings_schema()
    config = numbers_as_yaml12(config)

    def resolve(schema: dict) -> dict:
        reference = schema.get("$ref")
        if reference is None:
            return schema
        if reference.startswith("#/"):
            node = workflow_schema
            for part in reference[2:].split("/"):
                node = node[part]
            return resolve(node)
        return settings  # the only file the workflow schema refers to

    def walk(value: Any, schema: dict, where: str) -> Any:
        schema = resolve(schema)
        if isinstance(value, list) and schema.get("uniqueItems"):  # the schema's own message would dump the list
            for index, item in enumerate(value):
                if item in value[:index]:
                    shown = item.get("id", item) if isinstance(item, dict) else item
                    raise SettingsError(f"{where}{shown!r} is listed twice; keep one")
        if isinstance(value, dict) and "properties" in schema:
            if schema.get("additionalProperties") is False:
                known = list(schema["properties"])
                check_names(value, known, "setting" if schema is settings else "key", where,
                            listing="`normbench settings` lists them" if schema is settings else
                            f"known: {', '.join(known)}")
            walked = {key: walk(item, schema["properties"].get(key, {}), f"{where}{key}: ")
                      for key, item in value.items()}
            return checked_settings(walked, where) if schema is settings else walked
        if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
            return {key: walk(item, schema["additionalProperties"], f"{where}{key}: ") for key, item in value.items()}
        if isinstance(value, list) and "items" in schema:
            return [walk(item, schema["items"], f"{where}item {index + 1}: ") for index, item in enumerate(value)]
        objects = [branch for branch in schema.get("anyOf", []) if branch.get("type") == "object"]
        if isinstance(value, dict) and objects:  # a claim declared in place: name the key that is wrong
            branch = objects[0]
            check_names(value, list(branch["properties"]), "key", where,
                        listing=f"known: {', '.join(branch['properties'])}")
            missing = [key for key in branch.get("required", []) if key not in value]
            if missing:
                raise SettingsError(f"{where}missing key {missing[0]!r} (a claim of your own needs "
                                    f"{', '.join(branch['required'])})")
            for key, item in value.items():
                allowed = branch["properties"].get(key, {}).get("enum")
                wanted = branch["properties"].get(key, {}).get("type")
                item = as_schema_type(item, branch["properties"].get(key, {}))
                if (wanted == "number" and (isinstance(item, bool) or not isinstance(item, (int, float)))) or (
                        wanted == "string" and not isinstance(item, str)):
                    raise SettingsError(f"{where}{key}: {item!r} is no {wanted}")
                if allowed and item not in allowed:
                    close = difflib.get_close_matches(str(item), allowed, n=1)
                    hint = f"did you mean {close[0]!r}? " if close else ""
                    raise SettingsError(f"{where}{key}: {item!r} is unknown; {hint}known: {', '.join(allowed)}")
            return walk(value, branch, where)
        return as_schema_type(value, schema)

    config = walk(config, workflow_schema, "")
    studies = config.get("studies")
    for name, study in (studies.items() if isinstance(studies, dict) else ()):
        for axes in ("grid", "linked"):
            if isinstance(study, dict) and isinstance(study.get(axes), dict):
                check_names(study[axes], SETTING_NAMES, "setting", f"studies: {name}: {axes}: ")
                study[axes] = {axis: [checked_settings({axis: v}, f"studies: {name}: {axes}: ")[axis] for v in values]
                               if isinstance(values, list) else values for axis, values in study[axes].items()}
    return config


def checked_settings(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Setting values of a workflow config held to the settings schema with `normbench train`'s messages (an unknown
    name with the closest known one), where the workflow schema's own check would print the schema."""
    try:
        return check_against_schema(values)
    except SettingsError as error:
        raise SettingsError(f"{where}{error}") from None


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
    if path.is_dir():
        hint = f"; did you mean {str(path / 'config.json')!r}?" if (path / "config.json").exists() else ""
        raise SettingsError(f"settings file {str(path)!r} is a folder{hint}")
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
