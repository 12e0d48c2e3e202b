# Validation and grid expansion, done while the workflow is parsed: a bad
# config stops here, before any job runs.
import contextlib
import datetime
import functools
import json
import os
import shlex
import sys
import tempfile

import pandas as pd
import yaml
from snakemake.utils import Paramspace, validate

from normbench.cells import ARCHITECTURE, check_reference, study_cells
from normbench.claims import check_claims, claim_sections, studies_claiming
from normbench.config import Settings, SettingsError, format_assignment, normalize_workflow_config
from normbench.data import dataset_files
from normbench.captions import FIGURE_CAPTIONS
from normbench.plugins import is_plugin, short_name, source_file as plugin_source
from normbench.results import read_json, write_json
from normbench import devices, warm


@contextlib.contextmanager
def refusing_bad_config():
    """A config the workflow cannot run stops the planning with normbench's message alone, as the command line
    does: raised as a WorkflowError from here, Snakemake would print this file's frames after it, which would bury
    the fix it names."""
    try:
        yield
    except SettingsError as error:
        sys.exit(f"normbench: error: {error}")


# Numbers as numbers (lr: 1e-3 as in YAML 1.2, width: 16.0 as 16, --config's nested '2000' as 2000) and a
# "did you mean" for a mistyped name anywhere, then the schema's own validation.
with open(os.path.join(workflow.basedir, "workflow/schemas/config.schema.yaml")) as schema_file, refusing_bad_config():
    config.update(normalize_workflow_config(config, yaml.safe_load(schema_file)))
validate(config, schema="../schemas/config.schema.yaml")

# Jobs call the normbench installed beside the Python that runs Snakemake, so that .venv/bin/snakemake works
# without an activated venv (the prefix keeps Snakemake's default strict mode).
shell.prefix(f"set -euo pipefail; export PATH={shlex.quote(os.path.dirname(sys.executable))}:$PATH; ")

CONDA_ENV = "../envs/normbench.yaml"
RUNS = "results/runs"
TABLES = "results/tables"
TRAIN_BENCHMARKS = "results/benchmarks/train"  # Snakemake's time and memory record of each train job
BENCH = "results/bench/norms.json"
INVOCATION = "results/logs/invocation.json"
WARM_LOG = "results/logs/warm.log"


# What a cell may use, unless the config's `resources` (top level, then the study's) say otherwise.
DEFAULT_RESOURCES = {"time_limit_min": 120, "mem_mb": 4096, "threads_per_worker": 1, "gpu_share": 1}
RUNTIME_MARGIN_MIN = 5  # start-up, data loading, the last evaluation and the writes, beyond the training time limit


def study_resources(study):
    return {**DEFAULT_RESOURCES, **config.get("resources", {}), **config["studies"][study].get("resources", {})}


def study_settings(study):
    """The settings every cell of a study shares: the config's defaults, then the study's fixed ones."""
    return {**config.get("defaults", {}), **config["studies"][study].get("fixed", {})}


# One Paramspace per study; a cell's folder spells its grid values (norm~gn/batch_size~4/...), a plugin by its short
# name (norm~my_norm.MyNorm: a path would nest folders); config.json keeps the whole reference.
with refusing_bad_config():
    GRIDS = {study: study_cells(study, {**spec, "fixed": study_settings(study)})
             for study, spec in config["studies"].items()}
    for study, cells in GRIDS.items():  # two plugins of one short name would share a folder: refuse it
        references = {v for cell in cells for v in cell.values() if is_plugin(v)}
        clashes = [ref for ref in references if sum(short_name(other) == short_name(ref) for other in references) > 1]
        if clashes:
            raise SettingsError(f"study {study!r}: plugins {', '.join(sorted(clashes))} share the short name "
                                f"{short_name(clashes[0])!r} that names their cells' folders; rename one file or "
                                f"object")
    SPACES = {
        study: Paramspace(
            pd.DataFrame([{axis: short_name(v) if is_plugin(v) else v for axis, v in cell.items()} for cell in cells],
                         dtype=object),
            single_wildcard="cell",
        )
        for study, cells in GRIDS.items()
    }
    # Each cell's axis values by its folder pattern, as the config gave them: a 1,000-cell plan reads them by lookup
    # (Paramspace.instance would parse every folder name back, once per job attribute).
    CELL_AXES = {study: dict(zip(SPACES[study].instance_patterns, cells)) for study, cells in GRIDS.items()}
    settings_of_cells = {study: [{**study_settings(study), **cell} for cell in cells] for study, cells in GRIDS.items()}
    check_claims(
        claim_sections(config),
        settings_of_cells,
        {study: study_resources(study)["gpu_share"] for study in config["studies"]},
    )
    for study, spec in config["studies"].items():
        if spec.get("report", {}).get("reference"):
            check_reference(study, spec["report"]["reference"], settings_of_cells[study])

# The settings that decide a model's inference time: a training setting changed reruns the cells, not the benchmarks.
TIMED_SETTINGS = (*ARCHITECTURE, "channels_last", "tf32", "deterministic")


def folded_models():
    """The model of each study that claims C11: the micro-benchmarks time its inference with BN folded and not, while
    nothing else runs (the cells check the folded outputs). Refused where no benchmark would time it, or where the
    study's cells hold several models (one is timed)."""
    models = {}
    for study in studies_claiming(config, "C11"):
        if "benchmarks" not in config:
            raise SettingsError(f"study {study!r} claims C11, whose inference time the micro-benchmarks take: add a "
                                f"`benchmarks:` section to the config (e.g. {{max_time_s: 0.05, repeats: 5}})")
        cells = [{**study_settings(study), **values} for values in GRIDS[study]]
        differing = [name for name in TIMED_SETTINGS if len({json.dumps(cell.get(name)) for cell in cells}) > 1]
        if differing:
            raise SettingsError(f"study {study!r} claims C11, and its cells differ in {', '.join(differing)}: the "
                                f"micro-benchmarks time one model; claim C11 in a study of one model")
        if cells[0].get("precision", Settings.precision) != "fp32":
            raise SettingsError(f"study {study!r} claims C11, which is timed in fp32, and its cells train in "
                                f"{cells[0]['precision']}: claim C11 in an fp32 study")
        models[study] = {name: cells[0][name] for name in TIMED_SETTINGS if name in cells[0]}
    return models


with refusing_bad_config():
    FOLDED_MODELS = folded_models()


def folded_model_files(wildcards):
    """The files the timed models are built from: changed, they are timed again."""
    return [path for values in FOLDED_MODELS.values() for path in model_files(Settings(**values))]


onstart:
    # The report tells the cells trained in this run from those reused, and shows this command.
    write_json(
        INVOCATION,
        {
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "command": shlex.join(sys.argv),
        },
    )
    # Jobs on this machine run their cells in a warm server (torch imported once); on a cluster each job starts
    # its own process. A Unix socket path must be short: it lives in a fresh temporary folder.
    if workflow.local_exec:
        run_folder = tempfile.mkdtemp(prefix="normbench-")
        warm_socket = os.path.join(run_folder, "warm.sock")
        if warm.start_server(warm_socket, WARM_LOG):
            os.environ[warm.SOCKET_ENV] = warm_socket
        # Each train job claims GPUs of its own among these (normbench.devices), instead of all taking cuda:0.
        if cuda_at_plan():
            os.environ[devices.GPUS_ENV] = ",".join(machine_gpus())
            # one folder per user on this machine: concurrent workflows see each other's GPUs taken
            os.environ[devices.LOCKS_ENV] = os.path.join(tempfile.gettempdir(), f"normbench-gpu-locks-{os.getuid()}")
            # A GPU held by this workflow frees within a cell's run time: wait up to that long for it.
            os.environ[devices.WAIT_ENV] = str(60 * max(study_runtime_min(study) for study in config["studies"]))


def report_inputs():
    """What the report reads: the tables, and the micro-benchmarks when the config asks for them."""
    tables = {name: f"{TABLES}/{name}.csv" for name in ("cells", "curves", "probes", "numerics")}
    return {**tables, **({"bench": BENCH} if "benchmarks" in config else {})}


def compare_target():
    """The comparison page, where the config lists earlier runs to compare this one with."""
    return ["reports/compare.html"] if config.get("compare") else []


def compared_file(run):
    """What a listed run is read from: its archive, or its results folder's run.json (the run finished)."""
    return run if os.path.isfile(run) or run.endswith((".tar.gz", ".tgz")) else os.path.join(run, "run.json")


def all_summaries():
    return [
        f"{RUNS}/{study}/{cell}/summary.json"
        for study, space in SPACES.items()
        for cell in space.instance_patterns
    ]


def cell_values(wildcards):
    """The settings given for one cell: the study's, then the cell's axis values."""
    return {**study_settings(wildcards.study), **CELL_AXES[wildcards.study][wildcards.cell]}


CELL_SETTINGS = {}  # (study, cell) -> Settings: threads, GPUs and input files of each job all read them


def cell_settings(wildcards):
    """One cell's full Settings, defaults included (validated when the grid was expanded), built once."""
    key = (wildcards.study, wildcards.cell)
    if key not in CELL_SETTINGS:
        CELL_SETTINGS[key] = Settings(**cell_values(wildcards))
    return CELL_SETTINGS[key]


def cell_assignments(wildcards):
    """The cell's given settings as quoted key=value words for `normbench train --set`. A packed cell's share of
    its GPU follows them as `--gpu-share K`: carried here, it leaves the command line and the params of every
    unpacked cell as they were, so that no finished cell becomes out of date."""
    words = [shlex.quote(format_assignment(key, value)) for key, value in cell_values(wildcards).items()]
    share = study_resources(wildcards.study)["gpu_share"]
    return " ".join(words + ([f"--gpu-share {share}"] if share > 1 else []))


def cell_threads(wildcards):
    """The cell's cores: its data-parallel workers times the study's threads per worker (SLURM: --cpus-per-task)."""
    workers = cell_settings(wildcards).world_size
    return workers * study_resources(wildcards.study)["threads_per_worker"]


def cell_time_limit_s(wildcards):
    return round(study_resources(wildcards.study)["time_limit_min"] * 60)


def study_runtime_min(study):
    """What a scheduler grants a cell's job: the study's training time limit plus a margin (SLURM: --time)."""
    return round(study_resources(study)["time_limit_min"]) + RUNTIME_MARGIN_MIN


def cell_mem_mb(wildcards):
    return study_resources(wildcards.study)["mem_mb"]


@functools.cache
def cuda_at_plan():
    """Whether `device: auto` means CUDA: torch sees a GPU on the machine that plans the workflow. (A cluster whose
    login node has none, but whose nodes do, says `device: cuda` in the config.) Asked once, in this process,
    which forks no jobs (the warm server is a process of its own)."""
    import torch

    return torch.cuda.is_available()


def machine_gpus():
    """The GPUs this workflow may use: those CUDA_VISIBLE_DEVICES names, else every one torch sees."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(index) for index in range(torch.cuda.device_count())]


def on_cuda(device_setting):
    return device_setting == "cuda" or (device_setting == "auto" and cuda_at_plan())


def cell_gpu_need(wildcards):
    """(workers on CUDA, packed?): a cell that runs on CUDA needs one GPU per data-parallel worker, a whole one
    unless its study packs cells (gpu_share > 1)."""
    settings = cell_settings(wildcards)
    workers = settings.world_size if on_cuda(settings.device) else 0
    return workers, study_resources(wildcards.study)["gpu_share"] > 1


def cell_gpus(wildcards):
    """GPUs of a cell's own (SLURM: --gpus; a profile's `resources: gpu: N` caps the GPUs in use on one machine)."""
    workers, packed = cell_gpu_need(wildcards)
    return 0 if packed else workers


def cell_gpu_slots(wildcards):
    """A packed cell's share of GPUs, one slot per worker: a profile's `resources: gpu_slots: N` caps the packed
    cells running at once on one machine (its GPUs times the share)."""
    workers, packed = cell_gpu_need(wildcards)
    return workers if packed else 0


# The device settings of every cell, gathered once from the expanded grids.
CELL_DEVICES = {cell.get("device", study_settings(study).get("device", Settings.device))
                for study, cells in GRIDS.items() for cell in cells}


def layer_device():
    """Where the micro-benchmarks and the numerics table run: CUDA when the config's cells do (so C12 and the
    error table describe the device that trained), else the CPU."""
    return "cuda" if any(on_cuda(device) for device in CELL_DEVICES) else "cpu"


def timed_out_marker(wildcards):
    """A timed-out cell continues when its time limit rises: at planning, such a cell gets (or renews) a file
    `time_limit_raised` in its folder, an input of its train job that is then newer than its outputs. Once a
    cell has one it stays an input, so the job's input set never changes by itself."""
    folder = f"{RUNS}/{wildcards.study}/{wildcards.cell}"
    marker = f"{folder}/time_limit_raised"
    summary_path = f"{folder}/summary.json"
    limit_s = cell_time_limit_s(wildcards)
    if os.path.exists(summary_path):
        summary = read_json(summary_path)
        stopped_under = summary.get("time_limit_s")
        asked = read_json(marker)["time_limit_s"] if os.path.exists(marker) else None
        if summary.get("timed_out") and stopped_under is not None and limit_s > stopped_under and asked != limit_s:
            write_json(marker, {"time_limit_s": limit_s, "stopped_under_s": stopped_under})
    return [marker] if os.path.exists(marker) else []


def model_files(settings):
    """The files a model is built from: a plugged-in norm's or model's source, a text corpus (its vocabulary)."""
    plugins = [str(plugin_source(name)) for name in (settings.norm, settings.model) if is_plugin(name)]
    return ([settings.text_path] if settings.dataset == "text" else []) + plugins


def cell_input_files(wildcards):
    """The data a cell reads, and the files of a plugged-in norm or model: a changed plugin makes its cells out of
    date."""
    settings = cell_settings(wildcards)
    images = [] if settings.dataset == "text" else \
        [f"{settings.data_root}/{path}" for path in dataset_files(settings.dataset)]
    return images + model_files(settings)
