rule report:
    input:
        cells=f"{TABLES}/cells.csv",
        curves=f"{TABLES}/curves.csv",
    output:
        "reports/report.html",
    log:
        "results/logs/report.log",
    shell:
        "normbench report --tables {TABLES} --out {output} > {log} 2>&1"
