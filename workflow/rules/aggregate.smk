rule aggregate:
    input:
        all_summaries(),
    output:
        cells=f"{TABLES}/cells.csv",
        curves=f"{TABLES}/curves.csv",
        probes=f"{TABLES}/probes.csv",
    params:
        runs=lambda wildcards: RUNS,
        job_benchmarks=lambda wildcards: TRAIN_BENCHMARKS,
        tables=lambda wildcards, output: os.path.dirname(output.cells),
    conda:
        CONDA_ENV
    log:
        "results/logs/aggregate.log",
    shell:
        "normbench aggregate {input} --runs-root {params.runs} --job-benchmarks {params.job_benchmarks} "
        "--out {params.tables} > {log} 2>&1"


rule numerics:
    output:
        f"{TABLES}/numerics.csv",
    params:
        device=lambda wildcards: layer_device(),
    resources:
        gpu=lambda wildcards: int(layer_device() == "cuda"),
    conda:
        CONDA_ENV
    log:
        "results/logs/numerics.log",
    shell:
        "normbench numerics --device {params.device} --out {output} > {log} 2>&1"
