rule report:
    input:
        cells=f"{TABLES}/cells.csv",
        curves=f"{TABLES}/curves.csv",
        probes=f"{TABLES}/probes.csv",
        numerics=f"{TABLES}/numerics.csv",
    output:
        "reports/report.html",
    params:
        tables=lambda wildcards, input: os.path.dirname(input.cells),
        studies=json.dumps(config["studies"]),
    conda:
        CONDA_ENV
    log:
        "results/logs/report.log",
    shell:
        "normbench report --tables {params.tables} --studies {params.studies:q} --out {output} > {log} 2>&1"
