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


def test_a_wheel_carries_every_data_file_the_package_reads(tmp_path):
    """A non-editable install (a wheel on a cluster or GPU node) must hold the schema and the report template."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "source"  # built from a copy: setuptools writes build/ beside the sources
    skipped = shutil.ignore_patterns(".*", "*.egg-info", "data", "results", "reports", "build")
    shutil.copytree(REPO, source, ignore=skipped)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(source)], check=True, cwd=tmp_path)
    names = zipfile.ZipFile(next(tmp_path.glob("normbench-*.whl"))).namelist()
    package = REPO / "src/normbench"
    data_files = {f"normbench/{p.relative_to(package)}" for p in package.rglob("*")
                  if p.is_file() and p.suffix not in {".py", ".pyc"} and "__pycache__" not in p.parts}
    assert data_files and data_files <= set(names)
