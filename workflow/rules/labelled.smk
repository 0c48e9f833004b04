# Example-based multi-class data (KaLM-V2): a `format: labelled` task's {text, label} records become KaLM
# records with a same-class text as the positive and other classes' texts as negatives (kalm/data/labelled.py),
# one job per task (it needs the task's classes); validate then reads the result as the task's input.


rule labelled:
    input:
        lambda w: raw_task_files(w.stage, w.dtask),
    output:
        data="work/data/{stage}/labelled/{dtask}.parquet",
        stats="work/data/{stage}/labelled/{dtask}.stats.json",
    log:
        "logs/labelled/{stage}/{dtask}.log",
    benchmark:
        "benchmarks/labelled/{stage}/{dtask}.tsv"
    resources:
        mem_mb=4000,  # the task's texts and labels
    params:
        options=lambda w: shlex.quote(options_json(LabelledConfig, data_task(w.stage, w.dtask).get("labelled", {}))),
        seed=config["seed"],
    shell:
        "{KALM} labelled --input {input} --task {wildcards.dtask} --out {output.data} --stats {output.stats} "
        "--options {params.options} --seed {params.seed} > {log} 2>&1"
