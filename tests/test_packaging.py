"""pyproject.toml, environment.yml and the workflow's conda env pin the same packages (the workflow's
env without the test extras)."""

import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def pip_pins(path: Path) -> set[str]:
    dependencies = yaml.safe_load(path.read_text())["dependencies"]
    pip = next(entry["pip"] for entry in dependencies if isinstance(entry, dict))
    return {line for line in pip if not line.startswith("-e")}


def test_every_file_lists_the_same_pins():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = set(project["dependencies"])
    pins = runtime | set(project["optional-dependencies"]["test"])
    assert all("==" in pin for pin in pins)
    assert pip_pins(REPO / "environment.yml") == pins
    assert pip_pins(REPO / "workflow/envs/normbench.yaml") == runtime
