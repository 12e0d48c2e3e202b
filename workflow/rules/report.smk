rule report:
    input:
        unpack(lambda wildcards: report_inputs()),
    output:
        html="reports/report.html",
        run="results/run.json",
        claims=report(
            "reports/claims.csv",
            caption="../report/claims.rst",
            category="Claims",
        ),
        figures=report(
            directory("reports/figures"),
            patterns=["{study}/{figure}.png"],
            caption="../report/figure.rst",
            category="{study}",
            labels={"study": "{study}", "figure": "{figure}"},
        ),
    params:
        tables=lambda wildcards, input: os.path.dirname(input.cells),
        config=json.dumps(config),
        bench=lambda wildcards, input: f"--bench {input.bench}" if "bench" in input.keys() else "",
        invocation=INVOCATION,
        captions=FIGURE_CAPTIONS,
    threads: os.cpu_count()  # the figures of the studies drawn at once; Snakemake caps it at --cores
    conda:
        CONDA_ENV
    log:
        "results/logs/report.log",
    shell:
        "normbench report --tables {params.tables} --config {params.config:q} {params.bench} "
        "--invocation {params.invocation} --figures {output.figures} --out {output.html} --jobs {threads} > {log} 2>&1"


# Earlier runs beside this one, where the config lists them (compare: [...]).
rule compare:
    input:
        runs=lambda wildcards: [compared_file(run) for run in config["compare"]],
        this_run="results/run.json",
    output:
        html="reports/compare.html",
        claims="reports/compare.csv",
        cells="reports/compare_cells.csv",
    params:
        runs=lambda wildcards: " ".join(shlex.quote(run) for run in config["compare"]),
    conda:
        CONDA_ENV
    log:
        "results/logs/compare.log",
    shell:
        "normbench compare {params.runs} results --out {output.html} --csv {output.claims} > {log} 2>&1"

