"""The README walked as a new user reads it: every command it shows exists with the options it names, every
repository path it names is there, and every make target it runs is defined. (What a run produces is checked
against a real run in test_workflow.)"""

import re
import subprocess
from pathlib import Path

import pytest

from normbench.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
GENERATED = ("results/", "reports/", "data/", ".venv", "/tmp/", "/shared/", "my.", "path/")


def code_blocks(language: str = "") -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.MULTILINE | re.DOTALL)


def synopsis() -> dict[str, str]:
    """The "Command line" block: each `normbench <command>` line with its continuation lines."""
    block = README.split("## Command line", 1)[1].split("```", 2)[1]
    commands: dict[str, str] = {}
    command = None
    for line in block.splitlines():
        match = re.match(r"normbench (\S+)", line)
        if match:
            command = match.group(1)
            commands[command] = line
        elif command and line.startswith(" "):
            commands[command] += line
    return commands


def parser_options() -> dict[str, set[str]]:
    """Each subcommand's long options, from the real parser."""
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    return {name: {option for action in sub._actions for option in action.option_strings
                   if option.startswith("--") and option != "--help"}
            for name, sub in subparsers.choices.items()}


def test_the_synopsis_names_every_command_and_option_and_nothing_else():
    shown, real = synopsis(), parser_options()
    shown.pop("--version")
    assert set(shown) == set(real)
    for command, line in shown.items():
        assert set(re.findall(r"--[a-z-]+", line)) == real[command], command


def test_every_command_line_shown_parses():
    """Each `normbench ...` and `.venv/bin/normbench ...` command in a bash block is accepted by the parser."""
    parser = build_parser()
    commands = [re.sub(r"\\\n\s*", "", block) for block in code_blocks("bash")]
    lines = [line.split("normbench ", 1)[1] for block in commands for line in block.splitlines()
             if re.match(r"\s*(\.venv/bin/)?normbench ", line)]
    assert lines, "the README shows normbench commands"
    for line in lines:
        parser.parse_args(line.split())


def test_every_make_target_it_runs_is_defined():
    targets = set(re.findall(r"`make ([a-z][a-z-]*)", README)) | {
        target for block in code_blocks("bash") for target in re.findall(r"^make ([a-z][a-z-]*)", block, re.MULTILINE)}
    assert {"setup", "reproduce", "test", "bench", "lint"} <= targets
    for target in sorted(targets):
        run = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
        assert run.returncode == 0, f"make {target}: {run.stderr}"


def test_every_repository_path_it_names_exists():
    named = set(re.findall(r"`([\w.-]+/[\w./~-]+)`", README))
    named |= set(re.findall(r"--(?:workflow-profile|configfile) (\S+)", README))
    paths = sorted(p.rstrip("/") for p in named if not p.startswith(GENERATED) and "<" not in p and "*" not in p)
    assert "config/gpu-smoke.yaml" in paths and "workflow/profiles/slurm" in paths
    missing = [p for p in paths if not (REPO / p).exists() and not (REPO / "src" / p).exists()]
    assert not missing, missing


def schema_names(node) -> set[str]:
    """Every property name a JSON schema (as parsed YAML) declares, at any depth."""
    if isinstance(node, list):
        return set().union(*map(schema_names, node))
    if not isinstance(node, dict):
        return set()
    return set(node.get("properties", {})) | set().union(*map(schema_names, node.values()))


@pytest.mark.parametrize("key", sorted(set(re.findall(r"`([a-z_0-9]+): [^`]+`", README))))
def test_every_key_written_as_key_value_exists(key):
    """`norm: gn`, `time_limit_min: ...`, `timed_out: true`: a setting, a workflow config key, or a summary field."""
    import yaml

    from normbench.config import SETTING_NAMES

    workflow = schema_names(yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text()))
    summary_fields = set(re.findall(r'^\s+"([a-z_]+)": ', (REPO / "src/normbench/train.py").read_text(), re.MULTILINE))
    assert key in set(SETTING_NAMES) | workflow | summary_fields | {"studies", "gpu"}
