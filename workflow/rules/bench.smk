rule bench:
    output:
        BENCH,
    params:
        max_time=lambda wildcards: config.get("benchmarks", {}).get("max_time_s", 0.5),
    threads: os.cpu_count()  # alone on the machine (Snakemake caps it at --cores): timings untouched by training
    conda:
        CONDA_ENV
    log:
        "results/logs/bench.log",
    shell:
        "normbench bench --out {output} --max-time {params.max_time} --threads {threads} > {log} 2>&1"
