wildcard_constraints:
    study=r"[A-Za-z0-9_]+",
    cell=r".+",


# One rule per image dataset: from Debian's package where there is one, else torchvision's download.
for image_dataset in ("fashion_mnist", "cifar10"):

    rule:
        name:
            f"prepare_{image_dataset}"
        output:
            [f"{{root}}/{path}" for path in dataset_files(image_dataset)],
        params:
            dataset=image_dataset,
        conda:
            CONDA_ENV
        log:
            f"{{root}}/normbench/prepare_{image_dataset}.log",  # beside its cache: any root, relative or absolute
        shell:
            "normbench data {params.dataset} --root {wildcards.root} --download > {log} 2>&1"


rule train:
    input:
        cell_input_files,
        timed_out_marker,
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
        f"{TRAIN_BENCHMARKS}/{{study}}/{{cell}}.tsv"
    threads: cell_threads
    resources:
        gpu=cell_gpus,
        gpu_slots=cell_gpu_slots,
        mem_mb=cell_mem_mb,
        runtime=lambda wildcards: study_runtime_min(wildcards.study),
        time_limit_s=cell_time_limit_s,
    # --force: Snakemake decides when a cell is out of date; a checkpoint of the same settings still resumes.
    shell:
        "normbench train --out {params.folder:q} --force --threads {threads} --time-limit {resources.time_limit_s} "
        "--set {params.assignments} > {log} 2>&1"
