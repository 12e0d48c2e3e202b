rule aggregate:
    input:
        all_summaries(),
    output:
        cells=f"{TABLES}/cells.csv",
        curves=f"{TABLES}/curves.csv",
    log:
        "results/logs/aggregate.log",
    shell:
        "normbench aggregate {input} --runs-root {RUNS} --out {TABLES} > {log} 2>&1"
