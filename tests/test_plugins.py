"""A user's own norm through the built-ins' door: by file path or module name, checked before any job, traced by
its file's SHA-256 (the shipped example, examples/mean_only_bn.py, against its definition)."""

import hashlib
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from normbench.cells import make_settings
from normbench.config import SettingsError
from normbench.norms import norm_factory
from normbench.plugins import PluginError, provenance, short_name
from normbench.results import read_json

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = f"{REPO}/examples/mean_only_bn.py:MeanOnlyBatchNorm"


@pytest.mark.parametrize("layout, shape, dims", [("channels", (6, 4, 3, 3), (0, 2, 3)), ("features", (6, 4), (0,))])
def test_the_example_norm_is_mean_only_batch_norm(layout, shape, dims):
    layer = norm_factory(EXAMPLE, layout)(4).double().train()
    with torch.no_grad():
        layer.bias.copy_(torch.arange(4.0))
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    view = [1, 4] + [1] * (len(shape) - 2)
    torch.testing.assert_close(layer(x), x - x.mean(dims, keepdim=True) + torch.arange(4.0).view(view).double())
    torch.testing.assert_close(layer.running_mean, 0.1 * x.mean(dims))


def test_a_plugin_with_batch_statistics_takes_ghost_batches_like_ghostbn(tmp_path):
    (tmp_path / "bnplugin.py").write_text(
        "import torch\n"
        "class BN(torch.nn.BatchNorm2d):\n"
        "    batch_statistics = True\n"
        "    def __init__(self, num_features, layout):\n"
        "        super().__init__(num_features)\n")
    plugin = norm_factory(f"{tmp_path}/bnplugin.py:BN", "channels", ghost_batch=2)(3).double().train()
    builtin = norm_factory("ghostbn", "channels", ghost_batch=2)(3).double().train()
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64) * 2 + 1
    torch.testing.assert_close(plugin(x), builtin(x))
    torch.testing.assert_close(plugin.norm.running_var, builtin.running_var)  # four virtual batches, in turn
    torch.testing.assert_close(plugin.eval()(x), builtin.eval()(x))


def test_one_layout_written_without_its_comma_is_still_one_layout(tmp_path):
    (tmp_path / "one.py").write_text("import torch\ndef Norm(n, layout):\n    return torch.nn.Identity()\n"
                                     "Norm.layouts = ('channels')\n")  # a string, not a tuple
    assert isinstance(norm_factory(f"{tmp_path}/one.py:Norm", "channels")(4), torch.nn.Identity)
    with pytest.raises(PluginError, match=r"supports the layouts channels, not tokens"):
        norm_factory(f"{tmp_path}/one.py:Norm", "tokens")


def test_ghost_batches_are_refused_for_a_plugin_without_batch_statistics(tmp_path):
    (tmp_path / "plain.py").write_text("import torch\ndef Norm(n, layout):\n    return torch.nn.Identity()\n")
    with pytest.raises(SettingsError, match=r"declares no batch statistics, so ghost_batch does not apply to it; "
                                            r"set `batch_statistics = True`"):
        make_settings({"model": "resnet", "depth": 8, "width": 8, "batch_size": 8, "ghost_batch": 2,
                       "norm": f"{tmp_path}/plain.py:Norm"})


def test_a_module_reference_loads_like_a_file(tmp_path, monkeypatch):
    (tmp_path / "mynorms").mkdir()
    (tmp_path / "mynorms/__init__.py").write_text("")
    (tmp_path / "mynorms/layers.py").write_text(
        "import torch\ndef Scale(num_features, layout):\n    return torch.nn.Identity()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(norm_factory("mynorms.layers:Scale", "tokens")(8), torch.nn.Identity)
    assert short_name("mynorms.layers:Scale") == "layers.Scale"
    record = provenance(["mynorms.layers:Scale", "bn"])
    assert list(record) == ["mynorms.layers:Scale"]
    assert record["mynorms.layers:Scale"]["sha256"] == hashlib.sha256(
        (tmp_path / "mynorms/layers.py").read_bytes()).hexdigest()


@pytest.mark.parametrize("source, name, message", [
    (None, "Missing", r"plugin '.*bad.py:Missing': no file .*bad.py \(a relative path counts from"),
    ("x = 1\n", "Missing", r"plugin '.*bad.py:Missing': file .*bad.py has no 'Missing'$"),
    ("class MyNorm:\n    pass\n", "Mynorm", r"file .*bad.py has no 'Mynorm'; did you mean 'MyNorm'\?"),
    ("raise RuntimeError('broken at import')\n", "Norm", r"loading .*bad.py failed: RuntimeError: broken at import"),
    ("def Norm(n, layout):\n    raise TypeError('no')\n", "Norm",
     r"norm '.*bad.py:Norm': calling it with \(16, layout='channels'\) raised TypeError: no"),
    ("def Norm(n, layout):\n    return 3\n", "Norm", r"norm '.*bad.py:Norm' returned a int, not a torch.nn.Module"),
    ("def Norm(n, layout):\n    pass\nNorm.layouts = ('tokens',)\n", "Norm",
     r"supports the layouts tokens, not channels"),
])
def test_a_broken_plugin_is_refused_before_training_naming_the_file_and_object(tmp_path, source, name, message):
    path = tmp_path / f"bad{len(str(source))}" / "bad.py"  # a fresh file per case: loading is cached per process
    path.parent.mkdir()
    if source is not None:
        path.write_text(source)
    with pytest.raises(SettingsError, match=message):
        make_settings({"model": "resnet", "depth": 8, "width": 16, "norm": f"{path}:{name}"})


def test_a_plugin_trains_through_the_workflow_and_is_traced_to_its_file(tmp_path, fashion_root):
    from test_workflow import snakemake  # the venv's snakemake, as a user without an activated venv runs it

    plugin = tmp_path / "my_norm.py"
    shutil.copy(REPO / "examples/mean_only_bn.py", plugin)
    reference = f"{plugin}:MeanOnlyBatchNorm"
    config = {"defaults": {"data_root": str(fashion_root), "device": "cpu"},
              "studies": {"mine": {"fixed": {"model": "mlp", "width": 16, "train_subset": 1024, "test_subset": 200,
                                             "batch_size": 32, "epochs": 1, "lr": 0.05},
                                   "grid": {"norm": ["bn", reference], "seed": [0, 1]},
                                   "claims": [{"id": "mine-vs-bn", "statement": "my norm is no worse than BN",
                                               "measure": "final_test_acc", "compare": {"norm": [reference, "bn"]},
                                               "combine": "difference", "rule": "above", "threshold": -0.5}]}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = snakemake(tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    cell = tmp_path / "results/runs/mine/norm~my_norm.MeanOnlyBatchNorm/seed~0"
    assert read_json(cell / "config.json")["norm"] == reference
    assert read_json(cell / "env.json")["plugins"][reference]["sha256"] == hashlib.sha256(plugin.read_bytes()).hexdigest()
    cells = pd.read_csv(tmp_path / "results/tables/cells.csv")
    assert set(cells["norm"]) == {"bn", reference} and cells["final_test_acc"].gt(0.3).all()
    report = (tmp_path / "reports/report.html").read_text()
    board = report.split('id="leaderboard"', 1)[1].split("</section>", 1)[0]
    assert "<td>my_norm.MeanOnlyBatchNorm</td>" in board and "<td>bn</td>" in board  # by its short name
    assert (tmp_path / "reports/figures/mine/accuracy.png").stat().st_size > 0
    mine = pd.read_csv(tmp_path / "reports/claims.csv").set_index("claim").loc["mine-vs-bn"]
    assert mine["verdict"] in ("supported", "inconclusive") and mine["samples"] == 2  # computed from the run

    plugin.write_text(plugin.read_text() + "\n# changed\n")  # a changed plugin makes its cells, and only those, stale
    planned = snakemake(tmp_path, "--dry-run")
    assert re.search(r"^train\s+2$", planned.stdout, re.MULTILINE), planned.stdout[-3000:]  # its two seeds

    (tmp_path / "other").mkdir()
    shutil.copy(plugin, tmp_path / "other/my_norm.py")  # the same short name, my_norm.MeanOnlyBatchNorm
    config["studies"]["mine"]["grid"]["norm"] = [reference, f"{tmp_path}/other/my_norm.py:MeanOnlyBatchNorm"]
    config["studies"]["mine"]["claims"] = []
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    clash = snakemake(tmp_path, "--dry-run")
    assert clash.returncode != 0 and "share the short name 'my_norm.MeanOnlyBatchNorm'" in clash.stderr + clash.stdout

    config["studies"]["mine"]["grid"]["norm"] = ["bn", f"{tmp_path}/missing.py:Norm"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    refused = snakemake(tmp_path, "--dry-run")
    assert refused.returncode != 0 and f"no file {tmp_path}/missing.py" in refused.stderr + refused.stdout


def test_a_model_plugin_gets_the_cells_norm_for_its_layout_and_trains(tmp_path, fashion_root):
    from normbench.models import build_model
    from normbench.train import train

    settings = make_settings({"model": f"{REPO}/examples/small_convnet.py:build", "width": 8, "norm": EXAMPLE,
                              "data_root": str(fashion_root), "train_subset": 512, "test_subset": 200,
                              "batch_size": 32, "epochs": 1, "lr": 0.05, "device": "cpu"})
    model = build_model(settings, (1, 28, 28), 10)
    assert sum(type(m).__name__ == "MeanOnlyBatchNorm" for m in model.modules()) == 3  # the plugged-in norm
    summary = train(settings, tmp_path)
    assert summary["steps"] == 16 and not summary["diverged"]
    assert set(read_json(tmp_path / "env.json")["plugins"]) == {settings.model, settings.norm}
    frn = build_model(make_settings({"model": settings.model, "norm": "frn", "width": 8}), (1, 28, 28), 10)
    after = [type(frn[i + 1]).__name__ for i, layer in enumerate(frn) if type(layer).__name__ == "FilterResponseNorm"]
    assert after == ["Identity"] * 3  # FRN's TLU in place of the ReLU, as in the built-in models

    (tmp_path / "features.py").write_text("import torch\nlayout = 'features'\n"
                                          "def build(settings, shape, classes, norm_layer):\n"
                                          "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 16),"
                                          " norm_layer(16), torch.nn.Linear(16, classes))\n")
    flat = build_model(make_settings({"model": f"{tmp_path}/features.py:build", "norm": "ln"}), (1, 28, 28), 10)
    assert isinstance(flat[2], torch.nn.LayerNorm)  # LayerNorm over features, as the model's `layout` asked


@pytest.mark.parametrize("source, message", [
    ("def build(settings, shape, classes, norm_layer):\n    return None\n", r"returned a NoneType, not a torch.nn"),
    ("def build(settings, shape, classes, norm_layer):\n    raise KeyError('width')\n",
     r"calling it with input shape \(1, 28, 28\) and 10 classes raised KeyError"),
    ("import torch\ndef build(settings, shape, classes, norm_layer):\n    return torch.nn.Flatten()\n",
     r"never called norm_layer, so its cells would train the same model whatever their norm \('bn' here\)"),
])
def test_a_broken_model_plugin_is_refused_before_training(tmp_path, source, message):
    (tmp_path / "model.py").write_text(source)
    with pytest.raises(SettingsError, match=message):
        make_settings({"model": f"{tmp_path}/model.py:build"})
    with pytest.raises(SettingsError, match="probe 'percentiles' reads the inputs of the last hidden activation"):
        make_settings({"model": f"{REPO}/examples/small_convnet.py:build", "probes": ["percentiles"]})


def test_a_plugin_norm_trains_in_data_parallel_workers(tmp_path, fashion_root):
    """Each spawned worker loads the file itself (a fresh process): the cell runs as a built-in one does."""
    from normbench.train import run_cell

    settings = make_settings({"model": "mlp", "width": 16, "norm": EXAMPLE, "world_size": 2, "batch_size": 16,
                              "data_root": str(fashion_root), "train_subset": 256, "test_subset": 200, "epochs": 1,
                              "lr": 0.05, "device": "cpu"})
    summary = run_cell(settings, tmp_path, threads=2)
    assert summary["steps"] == 8 and not summary["diverged"]
    assert EXAMPLE in read_json(tmp_path / "env.json")["plugins"]


def test_a_checkpoint_of_other_plugin_code_starts_the_cell_afresh(tmp_path, fashion_root, capfd):
    """The same settings with an edited plugin file: the old checkpoint may not even fit the new model."""
    from normbench.plugins import load_module
    from normbench.train import train

    def write_model(hidden: int) -> None:
        (tmp_path / "model.py").write_text(
            "import torch\nlayout = 'features'\ndef build(settings, shape, classes, norm_layer):\n"
            f"    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, {hidden}), norm_layer({hidden}),"
            f" torch.nn.Linear({hidden}, classes))\n")
        load_module.cache_clear()  # as a new process would load it

    write_model(16)
    settings = make_settings({"model": f"{tmp_path}/model.py:build", "norm": "ln", "data_root": str(fashion_root),
                              "train_subset": 2048, "test_subset": 200, "batch_size": 32, "epochs": 1,
                              "device": "cpu"})
    assert train(settings, tmp_path / "cell", time_limit_s=0.0)["timed_out"]  # stopped with a checkpoint
    write_model(24)
    summary = train(settings, tmp_path / "cell")
    assert summary["resumed_from_step"] is None and summary["steps"] == 64 and not summary["timed_out"]
    assert re.search(r"checkpoint.pt was written by other code of .*model.py:build \(its file changed since\); "
                     r"starting afresh", capfd.readouterr().err)


def test_a_plugin_that_reads_values_while_it_builds_is_checked_by_a_real_build(tmp_path):
    """Planning builds models on the meta device, whose tensors hold no values; a plugin that reads one is built
    on the CPU instead, and refused only if that fails too."""
    (tmp_path / "reads.py").write_text("import torch\nclass Norm(torch.nn.LayerNorm):\n"
                                       "    def __init__(self, n, layout):\n"
                                       "        super().__init__(n, eps=float(torch.ones(n).mean()) * 1e-5)\n")
    settings = make_settings({"model": "mlp", "norm": f"{tmp_path}/reads.py:Norm"})
    assert settings.norm.endswith("reads.py:Norm")
    (tmp_path / "fails.py").write_text("import torch\nclass Norm(torch.nn.LayerNorm):\n"
                                       "    def __init__(self, n, layout):\n"
                                       "        super().__init__(n, eps=float(torch.ones(n).mean() - 2))\n"
                                       "        assert self.eps > 0, 'eps must be positive'\n")
    with pytest.raises(SettingsError, match=r"raised AssertionError: eps must be positive"):
        make_settings({"model": "mlp", "norm": f"{tmp_path}/fails.py:Norm"})


@pytest.mark.parametrize("values", [{"batch_size": 1}, {"ghost_batch": 1}])
def test_a_plugin_with_batch_statistics_over_one_sample_is_refused_like_bn(values):
    with pytest.raises(SettingsError, match=r"normalizes each MLP feature over the 1 sample of its (per-worker|ghost) "
                                            r"batch, which has no variance"):
        make_settings({"model": "mlp", "norm": EXAMPLE, **values})
