rule bench:
    input:
        folded_model_files,
    output:
        BENCH,
    params:
        max_time=lambda wildcards: config["benchmarks"]["max_time_s"],  # the schema fills in the defaults
        repeats=lambda wildcards: config["benchmarks"]["repeats"],
        device=lambda wildcards: layer_device(),
        fold=lambda wildcards: json.dumps(FOLDED_MODELS, sort_keys=True),
    threads: os.cpu_count()  # alone on the machine (Snakemake caps it at --cores): timings untouched by training
    resources:
        gpu=lambda wildcards: int(layer_device() == "cuda"),
    conda:
        CONDA_ENV
    log:
        "results/logs/bench.log",
    shell:
        "normbench bench --out {output} --max-time {params.max_time} --repeats {params.repeats} --threads {threads} "
        "--device {params.device} --fold {params.fold:q} "
        "> {log} 2>&1"
