"""A user's own code, named where a built-in name goes: `path/to/file.py:Name` or `package.module:Name`.

A file on disk is enough (benchopt's way): it is loaded by path with
importlib, no packaging needed; a module is imported by name. Either way the
object is checked before any job runs (the trial build calls it), and the
SHA-256 of the file it came from goes into every cell's provenance, so a
number can be traced to the code that made it.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import re
from functools import cache
from pathlib import Path
from typing import Any

REFERENCE = re.compile(r"^(?P<source>[^:\s]+):(?P<name>[A-Za-z_][A-Za-z0-9_]*)$")


class PluginError(ValueError):
    """A plugin that cannot be loaded or used; the message names the reference, the file and what went wrong."""


def is_plugin(value: Any) -> bool:
    return isinstance(value, str) and REFERENCE.match(value) is not None


def _split(reference: str) -> tuple[str, str]:
    match = REFERENCE.match(reference)
    if match is None:
        raise PluginError(f"{reference!r} is no plugin reference; write path/to/file.py:Name or package.module:Name")
    return match["source"], match["name"]


def _is_file(source: str) -> bool:
    return source.endswith(".py") or "/" in source


def load_object(reference: str) -> Any:
    """The object a reference names, its file loaded (or module imported) once per process."""
    source, name = _split(reference)
    module = load_module(reference)
    if not hasattr(module, name):
        where = f"file {source}" if _is_file(source) else f"module {source}"
        close = difflib.get_close_matches(name, [n for n in dir(module) if not n.startswith("_")], n=1)
        raise PluginError(f"plugin {reference!r}: {where} has no {name!r}" +
                          (f"; did you mean {close[0]!r}?" if close else ""))
    return getattr(module, name)


@cache
def load_module(reference: str) -> Any:
    """The module a reference's object lives in: its file loaded by path, or its module imported."""
    source, _ = _split(reference)
    if _is_file(source):
        path = Path(source)
        if not path.is_file():
            raise PluginError(f"plugin {reference!r}: no file {path} (a relative path counts from {Path.cwd()})")
        spec = importlib.util.spec_from_file_location(f"normbench_plugin_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as error:  # noqa: BLE001  whatever the user's file raises, say where
            raise PluginError(f"plugin {reference!r}: loading {path} failed: {type(error).__name__}: {error}") from None
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as error:
            raise PluginError(f"plugin {reference!r}: cannot import module {source!r} ({error})") from None
    return module


def source_file(reference: str) -> Path:
    """The file a plugin's code comes from: the path it names, or its module's file."""
    source, _ = _split(reference)
    if _is_file(source):
        return Path(source)
    return Path(load_module(reference).__file__)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def short_name(reference: str) -> str:
    """A readable name for folders and figure labels: `file.Name` or `module.Name` (config.json keeps the whole
    reference)."""
    source, name = _split(reference)
    readable = f"{Path(source).stem if _is_file(source) else source.rsplit('.', 1)[-1]}.{name}"
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", readable)  # safe in a folder name and a shell word


def provenance(references: list[str]) -> dict[str, dict]:
    """Each plugin reference with its file and that file's SHA-256, for env.json."""
    return {reference: {"file": str(source_file(reference).resolve()), "sha256": file_sha256(source_file(reference))}
            for reference in references if is_plugin(reference)}


def describe_model(settings) -> str:
    """The model in a few words, e.g. "resnet, depth 8, width 8", a plugged-in one by its short name (`settings`: a
    mapping, or a table's row); a stem stride other than 1 is named ("..., stem stride 2")."""
    depth, stride = settings.get("depth"), settings.get("stem_stride")
    depth = f", depth {depth:g}" if depth and depth == depth else ""  # None, 0 and a table's NaN: no depth
    stride = f", stem stride {stride:g}" if stride and stride == stride and stride != 1 else ""
    model = short_name(settings["model"]) if is_plugin(settings["model"]) else settings["model"]
    return f"{model}{depth}, width {settings['width']:g}{stride}"
