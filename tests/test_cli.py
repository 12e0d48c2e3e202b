"""The command line gives exactly the settings typed, refuses what it cannot do with a message that names the fix,
and documents itself."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from normbench.cells import studies_table
from normbench.cli import main
from normbench.config import SETTING_NAMES
from normbench.results import read_json

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def mlp_words(fashion_root):
    """A cell that trains in about a second, as --set words."""
    return [f"data_root={fashion_root}", "model=mlp", "width=16", "train_subset=256", "test_subset=200",
            "batch_size=64", "epochs=1", "device=cpu"]


def test_repeated_set_groups_accumulate(tmp_path, mlp_words):
    main(["train", "--out", str(tmp_path), "--threads", "1", "--set", *mlp_words, "--set", "norm=gn",
          "--set", "lr=0.05"])
    settings = read_json(tmp_path / "config.json")
    assert settings["norm"] == "gn" and settings["lr"] == 0.05 and settings["width"] == 16


def test_a_setting_given_twice_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match=r"setting 'norm' is given twice \(norm=\"gn\" and norm=bn\)"):
        main(["train", "--out", str(tmp_path / "cell"), "--set", "norm=gn", "--set", "norm=bn"])
    assert not (tmp_path / "cell").exists()


def test_a_finished_cell_of_other_settings_is_not_overwritten(tmp_path, mlp_words):
    main(["train", "--out", str(tmp_path), "--threads", "1", "--set", *mlp_words])
    before = (tmp_path / "summary.json").read_text()
    with pytest.raises(SystemExit, match=r"holds a finished cell of other settings \(norm: 'bn' there, 'gn' here\); "
                                         r"train into a new folder, or pass --force"):
        main(["train", "--out", str(tmp_path), "--set", *mlp_words, "norm=gn"])
    assert (tmp_path / "summary.json").read_text() == before
    main(["train", "--out", str(tmp_path), "--threads", "1", "--force", "--set", *mlp_words, "norm=gn"])
    assert read_json(tmp_path / "config.json")["norm"] == "gn" and read_json(tmp_path / "summary.json")["steps"] == 4
    (tmp_path / "config.json").write_text('{"norm": "g')  # damaged: refused, then replaced with --force, as it says
    with pytest.raises(SystemExit, match=r"config.json: not valid JSON .*--force --set \.\.\.` with its settings"):
        main(["train", "--out", str(tmp_path), "--set", *mlp_words, "norm=gn"])
    main(["train", "--out", str(tmp_path), "--threads", "1", "--force", "--set", *mlp_words, "norm=gn"])
    assert read_json(tmp_path / "config.json")["norm"] == "gn"


@pytest.mark.parametrize("words, message", [
    (["--set", "nrom=gn"], r"unknown setting 'nrom'; did you mean 'norm'\?"),
    (["--set", "batchsize=4"], r"unknown setting 'batchsize'; did you mean 'batch_size'\?"),
    (["--from", "missing.json"], r"cannot read settings file 'missing.json': No such file or directory"),
])
def test_bad_input_gets_a_message_not_a_traceback(tmp_path, monkeypatch, words, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=message):
        main(["train", "--out", "cell", *words])


def test_an_interrupt_or_a_full_disk_ends_with_a_message_not_a_traceback(monkeypatch, capsys):
    import errno

    import normbench.cli as cli

    for error, message in [(KeyboardInterrupt(), "normbench: interrupted; a cell keeps its last checkpoint"),
                           (OSError(errno.ENOSPC, "No space left on device", "cell/checkpoint.pt"),
                            "normbench: error: No space left on device (cell/checkpoint.pt); a cell keeps its last")]:
        def fail(args, error=error):
            raise error

        monkeypatch.setattr(cli, "_settings", fail)
        with pytest.raises(SystemExit, match=re.escape(message)):
            cli.main(["settings"])


def test_a_reader_that_stops_early_ends_the_output_quietly(monkeypatch, capfd):
    """`normbench settings | head`: a BrokenPipeError is an OSError, and must not be reported as the machine's."""
    import normbench.cli as cli

    def fail(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_settings", fail)
    with pytest.raises(SystemExit) as stopped:
        cli.main(["settings"])
    assert stopped.value.code == 1


@pytest.mark.parametrize("words, message", [
    (["--time-limit", "-5"], "argument --time-limit: -5 is not 0 or more"),
    (["--timeout", "0"], "argument --timeout: 0 is not above 0"),
    (["--threads", "0"], "argument --threads: 0 is not above 0"),
    (["--set", "model=mlp", "lr=.nan"], "setting 'lr': nan is not a finite number"),
    (["--set", "model=mlp", "norm=bn", "batch_size=1"], "norm 'bn' normalizes each MLP feature over the 1 sample"),
    (["--set", "model=mlp", "norm=ghostbn", "ghost_batch=1"], "over the 1 sample of its ghost batch"),
    (["--out-is-a-file"], "is a file; --out names the cell's folder"),
])
def test_numbers_that_cannot_train_are_refused_before_any_work(tmp_path, capsys, words, message):
    (tmp_path / "file").touch()
    if words == ["--out-is-a-file"]:
        words, out = ["--set", "model=mlp"], tmp_path / "file"
    else:
        out = tmp_path / "cell"
    with pytest.raises(SystemExit) as stopped:  # argparse prints its message; normbench's is the exit's
        main(["train", "--out", str(out), *words])
    assert message in str(stopped.value) + capsys.readouterr().err and not (tmp_path / "cell").exists()


def test_integral_floats_and_leading_zeros_are_the_integers_they_spell(tmp_path, mlp_words):
    words = [w for w in mlp_words if not w.startswith(("width=", "batch_size="))]
    main(["train", "--out", str(tmp_path / "cell"), "--threads", "1", "--set", *words, "width=32.0",
          "batch_size=64.0", "seed=010"])
    settings = read_json(tmp_path / "cell/config.json")
    assert (settings["width"], settings["batch_size"], settings["seed"]) == (32, 64, 10)
    assert all(isinstance(settings[key], int) for key in ("width", "batch_size", "seed"))
    with pytest.raises(SystemExit, match=r"setting 'width': 32.5 is not of type 'integer' \(`normbench settings` gives"):
        main(["train", "--out", str(tmp_path / "other"), "--set", *words, "width=32.5"])


@pytest.mark.parametrize("command, message", [
    (["train", "--out", "x", "--from", "{cell}"], r"settings file '.*cell' is a folder; did you mean '.*cell/config.json'\?"),
    (["studies", "{cell}/config.json"], r"has no `studies` mapping: `normbench studies` reads a workflow config"),
    (["aggregate", "{cell}/summary.json", "--runs-root", "{tmp}/elsewhere"], r"is not under --runs-root"),
])
def test_commands_on_the_wrong_input_say_so(tmp_path, monkeypatch, mlp_words, command, message):
    cell = tmp_path / "cell"
    main(["train", "--out", str(cell), "--threads", "1", "--set", *mlp_words])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=message):
        main([word.format(cell=cell, tmp=tmp_path) for word in command])


def test_fewer_threads_than_workers_runs_one_thread_each_and_says_so(tmp_path, mlp_words, capsys):
    main(["train", "--out", str(tmp_path / "cell"), "--threads", "1", "--set", *mlp_words, "world_size=2", "norm=gn"])
    assert "--threads 1 cannot be shared by 2 workers on this node; each runs one thread" in capsys.readouterr().err
    assert read_json(tmp_path / "cell/summary.json")["steps"] == 2


def test_a_cell_out_of_time_before_its_first_evaluation_says_so(tmp_path, mlp_words, capsys):
    words = [word for word in mlp_words if not word.startswith("train_subset=")] + ["train_subset=4096"]
    main(["train", "--out", str(tmp_path), "--threads", "1", "--time-limit", "0", "--set", *words])  # 64 steps: out of time at the first sync point, before the evaluation at the end
    assert re.search(r": not evaluated yet \(timed out: time limit of 0 s reached after step \d+ of 64\)",
                     capsys.readouterr().out)
    assert read_json(tmp_path / "summary.json")["final_test_acc"] is None


def test_a_study_without_a_grid_is_listed(tmp_path, capsys):
    config = {"studies": {"pairs": {"fixed": {"model": "mlp"}, "linked": {"norm": ["bn", "gn"], "batch_size": [8, 32]}}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    main(["studies", str(tmp_path / "config.yaml")])
    assert "| `pairs` | none (descriptive) | 2 | mlp, width 16: (norm, batch_size) ∈ {(bn, 8), (gn, 32)} |" in capsys.readouterr().out


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    (tmp_path / "cell.yaml").write_text("norm: gn\nlr: [0.1\nwidth: 8\n")
    with pytest.raises(SystemExit, match=r"cell.yaml, line 3: not valid YAML"):
        main(["train", "--out", str(tmp_path / "cell"), "--from", str(tmp_path / "cell.yaml")])


def test_exponent_numbers_in_yaml_are_numbers(tmp_path, mlp_words):
    (tmp_path / "cell.yaml").write_text("lr: 1e-3\nweight_decay: 5E-4\n")
    main(["train", "--out", str(tmp_path / "cell"), "--threads", "1", "--from", str(tmp_path / "cell.yaml"),
          "--set", *mlp_words])
    settings = read_json(tmp_path / "cell/config.json")
    assert settings["lr"] == 0.001 and settings["weight_decay"] == 0.0005


def test_a_relative_data_root_from_elsewhere_says_where_it_looked(tmp_path, monkeypatch, mlp_words):
    main(["train", "--out", str(tmp_path / "cell"), "--threads", "1", "--set", *mlp_words])
    relative = {**read_json(tmp_path / "cell/config.json"), "data_root": "data"}
    (tmp_path / "relative.json").write_text(json.dumps(relative))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=rf"the data folder 'data' does not exist \(relative paths count from the "
                                         rf"current directory, {re.escape(str(tmp_path))}\).*--set data_root="):
        main(["train", "--out", "again", "--from", "relative.json"])


def test_settings_command_lists_every_setting_with_default_and_meaning(capsys):
    main(["settings"])
    out = capsys.readouterr().out
    for name in SETTING_NAMES:
        assert re.search(rf"^{name} +default \S+\n +\S", out, re.MULTILINE), name
    # Everything the schema allows, as the README promises: every norm and model name, bounds.
    assert "one of: bn, syncbn, ghostbn, noisybn, brn, gn, gn+ws, ln, in, rms, frn, dyt, none]" in out and "resnet32" in out
    assert "any of: percentiles, ics, inference, generalization" in out and "[integer; >= 1]" in out


def test_version_and_quick_help():
    version = subprocess.run([sys.executable, "-m", "normbench.cli", "--version"], capture_output=True, text=True)
    assert re.fullmatch(r"normbench \d+\.\d+\.\d+\n", version.stdout)
    # --help loads no torch: the imports that need it come after argument parsing.
    probe = "import sys; from normbench.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout == "False\n"


def test_readme_table_of_studies_is_the_default_config():
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    assert studies_table(config) in (REPO / "README.md").read_text(), \
        "regenerate the README's table with `normbench studies config/config.yaml`"
