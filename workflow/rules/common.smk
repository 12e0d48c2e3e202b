# Validation and grid expansion, done while the workflow is parsed: a bad
# config stops here, before any job runs.
import json
import shlex

import pandas as pd
from snakemake.utils import Paramspace, validate

from normbench.config import Settings, format_assignment, study_cells
from normbench.data import dataset_files


validate(config, schema="../schemas/config.schema.yaml")

CONDA_ENV = "../envs/normbench.yaml"
RUNS = "results/runs"
TABLES = "results/tables"


def study_settings(study):
    """The settings every cell of a study shares: the config's defaults, then the study's fixed ones."""
    return {**config.get("defaults", {}), **config["studies"][study].get("fixed", {})}


# One Paramspace per study; a cell's folder spells its grid values (norm~gn/batch_size~4/...).
SPACES = {
    study: Paramspace(
        pd.DataFrame(study_cells(study, {**spec, "fixed": study_settings(study)})),
        single_wildcard="cell",
    )
    for study, spec in config["studies"].items()
}


def all_summaries():
    return [
        f"{RUNS}/{study}/{cell}/summary.json"
        for study, space in SPACES.items()
        for cell in space.instance_patterns
    ]


def cell_values(wildcards):
    """The settings given for one cell: the study's, then the cell's axis values."""
    return {**study_settings(wildcards.study), **SPACES[wildcards.study].instance(wildcards)}


def cell_settings(wildcards):
    """One cell's full Settings, defaults included (validated when the grid was expanded)."""
    return Settings(**cell_values(wildcards))


def cell_assignments(wildcards):
    """The cell's given settings as quoted key=value words for `normbench train --set`."""
    return " ".join(shlex.quote(format_assignment(key, value)) for key, value in cell_values(wildcards).items())


def cell_workers(wildcards):
    """One core per data-parallel worker of the cell."""
    return int(cell_settings(wildcards).world_size)  # Paramspace values are numpy scalars


def cell_dataset_files(wildcards):
    settings = cell_settings(wildcards)
    if settings.dataset == "text":
        return [settings.text_path]
    return [f"{settings.data_root}/{path}" for path in dataset_files(settings.dataset)]
