# Data stage: validate + normalise each file, exact dedup across a stage, decontaminate
# against the local evaluation tasks.


rule validate:
    input:
        lambda w: data_task(w.stage, w.dtask)["path"],
    output:
        data="work/data/{stage}/validated/{dtask}.jsonl",
        stats="work/data/{stage}/validated/{dtask}.stats.json",
        rejects="work/data/{stage}/validated/{dtask}.rejects.jsonl",
    params:
        instruction=lambda w: shlex.quote(data_task(w.stage, w.dtask).get("instruction", "")),
        on_error=config["data"]["on_error"],
    log:
        "logs/validate/{stage}/{dtask}.log",
    benchmark:
        "benchmarks/validate/{stage}/{dtask}.tsv"
    resources:
        mem_mb=2000,
    shell:
        "{KALM} validate --input {input} --task {wildcards.dtask} --out {output.data} "
        "--stats {output.stats} --rejects {output.rejects} --on-error {params.on_error} "
        "--instruction {params.instruction} > {log} 2>&1"


rule dedup:
    input:
        lambda w: expand("work/data/{stage}/validated/{dtask}.jsonl", stage=w.stage, dtask=data_tasks(w.stage)),
    output:
        data="work/data/{stage}/dedup.jsonl",
        stats="work/data/{stage}/dedup.stats.json",
    log:
        "logs/dedup/{stage}.log",
    benchmark:
        "benchmarks/dedup/{stage}.tsv"
    resources:
        mem_mb=4000,
    shell:
        "{KALM} dedup {input} --out {output.data} --stats {output.stats} > {log} 2>&1"


rule decontaminate:
    input:
        data="work/data/{stage}/dedup.jsonl",
        eval_tasks=list(local_eval_tasks().values()),
    output:
        data="work/data/{stage}/decontaminated.jsonl",
        stats="work/data/{stage}/decontaminated.stats.json",
        report="work/data/{stage}/contamination_report.json",
    params:
        eval_tasks=" ".join(f"--eval-task {shlex.quote(f'{t}={p}')}" for t, p in local_eval_tasks().items()),
    log:
        "logs/decontaminate/{stage}.log",
    benchmark:
        "benchmarks/decontaminate/{stage}.tsv"
    resources:
        mem_mb=4000,
    shell:
        "{KALM} decontaminate --input {input.data} {params.eval_tasks} --out {output.data} "
        "--stats {output.stats} --report {output.report} > {log} 2>&1"
