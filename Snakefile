# normbench: train every cell of every study in the config, aggregate, report.
# The logic lives in the normbench package; these rules only wire files.
from snakemake.utils import min_version

min_version("9.0")


# The default config, unless the command line names its own with --configfile: a user's config then runs alone
# (Snakemake would otherwise merge it into this one, default studies and all).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/bench.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        "reports/report.html",
        compare_target(),
