# The report's plots and tables (kalm report; kalm/report.py), drawn from the stats files the stages
# wrote. They are targets of `rule all`, never inputs of results/mteb_<lang>.json: `snakemake` builds
# them, then `snakemake --report report.html` gathers them with the captions of workflow/report/.
# config report.eval_runs: also evaluate each fine-tune run's model (eval.smk's evaluate / aggregate
# under results/runs/run<r>), so that the MTEB chart shows base vs every run vs soup (else base vs soup).

REPORT_DIR = "results/report"
REPORT_STAGES = [s for s in DATA_STAGES if s != "pretrain" or config["pretrain"]["enabled"]]
EVAL_RUNS = config["report"]["eval_runs"]


REPORT_PLOTS = [
    f"{REPORT_DIR}/rulegraph.svg",
    f"{REPORT_DIR}/funnel.svg",
    f"{REPORT_DIR}/funnel.html",
    *expand(f"{REPORT_DIR}/training_{{stage}}.svg", stage=REPORT_STAGES),
    f"{REPORT_DIR}/mteb.svg",
    f"{REPORT_DIR}/mteb.html",
]


localrules:
    report_rulegraph,
    report_funnel,
    report_training,
    report_mteb,


rule report_rulegraph:
    output:
        report(
            f"{REPORT_DIR}/rulegraph.svg",
            caption="../report/rulegraph.rst",
            category="1. Pipeline",
            labels={"figure": "rule graph"},
        ),
    log:
        "logs/report/rulegraph.log",
    benchmark:
        "benchmarks/report/rulegraph.tsv"
    resources:
        mem_mb=1000,
    params:
        snakefile=workflow.main_snakefile,
        config=lambda w: shlex.quote(json.dumps(config, ensure_ascii=False)),
        targets=" ".join(rulegraph_targets()),
    shell:
        "{KALM} report rulegraph --snakefile {params.snakefile} --config-json {params.config} --out {output} "
        "{params.targets} > {log} 2>&1"


rule report_funnel:
    input:
        stats=[f for stage in REPORT_STAGES for f in report_funnel_stats(stage)],
        contamination=expand("work/data/{stage}/contamination_report.json", stage=REPORT_STAGES),
    output:
        plot=report(
            f"{REPORT_DIR}/funnel.svg",
            caption="../report/funnel.rst",
            category="2. Data funnel",
            labels={"figure": "funnel chart"},
        ),
        table=report(
            f"{REPORT_DIR}/funnel.html",
            caption="../report/funnel_table.rst",
            category="2. Data funnel",
            labels={"figure": "funnel table"},
        ),
    log:
        "logs/report/funnel.log",
    benchmark:
        "benchmarks/report/funnel.tsv"
    resources:
        mem_mb=1000,
    params:
        stages=" ".join(f"--stage {stage} " + " ".join(report_funnel_stats(stage)) for stage in REPORT_STAGES),
        contamination=" ".join(f"{stage}=work/data/{stage}/contamination_report.json" for stage in REPORT_STAGES),
    shell:
        "{KALM} report funnel {params.stages} --contamination {params.contamination} "
        "--out {output.plot} --table {output.table} > {log} 2>&1"


rule report_training:
    input:
        lambda w: list(report_training_metrics(w.stage).values()),
    output:
        report(
            f"{REPORT_DIR}/training_{{stage}}.svg",
            caption="../report/training.rst",
            category="3. Training",
            subcategory="{stage}",
            labels={"stage": "{stage}", "figure": "training curves"},
        ),
    log:
        "logs/report/training_{stage}.log",
    benchmark:
        "benchmarks/report/training_{stage}.tsv"
    resources:
        mem_mb=1000,
    params:
        runs=lambda w: " ".join(f"{label}={path}" for label, path in report_training_metrics(w.stage).items()),
    shell:
        "{KALM} report training --run {params.runs} --title '{wildcards.stage}' --out {output} > {log} 2>&1"


rule report_mteb:
    input:
        [p for lang in LANGUAGES for p in report_mteb_models(lang).values()],
    output:
        plot=report(
            f"{REPORT_DIR}/mteb.svg",
            caption="../report/mteb.rst",
            category="4. MTEB",
            labels={"figure": "per-type chart"},
        ),
        table=report(
            f"{REPORT_DIR}/mteb.html",
            caption="../report/mteb_table.rst",
            category="4. MTEB",
            labels={"figure": "per-task table"},
        ),
    log:
        "logs/report/mteb.log",
    benchmark:
        "benchmarks/report/mteb.tsv"
    resources:
        mem_mb=1000,
    params:
        langs=report_mteb_args(),
    shell:
        "{KALM} report mteb {params.langs} --out {output.plot} --table {output.table} > {log} 2>&1"
