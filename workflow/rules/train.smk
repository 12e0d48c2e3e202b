wildcard_constraints:
    study=r"[A-Za-z0-9_]+",
    cell=r".+",


rule prepare_data:
    output:
        [f"{{root}}/{path}" for path in dataset_files("fashion_mnist")],
    conda:
        CONDA_ENV
    log:
        "results/logs/prepare_data/{root}.log",
    shell:
        "normbench data fashion_mnist --root {wildcards.root} > {log} 2>&1"


rule train:
    input:
        cell_dataset_files,
    output:
        summary=f"{RUNS}/{{study}}/{{cell}}/summary.json",
        metrics=f"{RUNS}/{{study}}/{{cell}}/metrics.jsonl",
        probes=f"{RUNS}/{{study}}/{{cell}}/probes.jsonl",
        settings=f"{RUNS}/{{study}}/{{cell}}/config.json",
        env=f"{RUNS}/{{study}}/{{cell}}/env.json",
    params:
        assignments=cell_assignments,
        folder=lambda wildcards, output: os.path.dirname(output.summary),
    conda:
        CONDA_ENV
    log:
        "results/logs/train/{study}/{cell}.log",
    benchmark:
        "results/benchmarks/train/{study}/{cell}.tsv"
    threads: cell_workers
    shell:
        "normbench train --out {params.folder} --threads {threads} --set {params.assignments} > {log} 2>&1"
