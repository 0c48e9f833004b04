# Data stage: validate + normalise each task (a .jsonl/.parquet file or a folder of shards) and give
# its records their instruction (or none, by the instruction rule: common.smk validate_instruction_args),
# exact dedup across a stage, near-dup removal (data.dedup.near_dup: scatter `minhash` per shard,
# gather `near_dedup`), decontaminate against the evaluation tasks (exact, containment with
# data.decontaminate.contain_min_chars, near with data.decontaminate.near_dup).

DEDUP = dedup_settings()
DECON = decontaminate_settings()
NEAR_SHARDS = list(range(DEDUP["shards"]))


rule validate:
    input:
        lambda w: data_task(w.stage, w.dtask)["path"],
    output:
        data="work/data/{stage}/validated/{dtask}.jsonl",
        stats="work/data/{stage}/validated/{dtask}.stats.json",
        rejects="work/data/{stage}/validated/{dtask}.rejects.jsonl",
    params:
        # the task's instruction, or --drop-instructions where eval.instruction_set's rule gives its type
        # none (the same rule as the evaluation: common.smk train_instruction_sides)
        instruction=lambda w: validate_instruction_args(w.stage, w.dtask),
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
        "{params.instruction} > {log} 2>&1"


if not DEDUP["near_dup"]:

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

else:

    # exact dedup, scattering the kept records round-robin over the near-dup shards
    rule dedup:
        input:
            lambda w: expand("work/data/{stage}/validated/{dtask}.jsonl", stage=w.stage, dtask=data_tasks(w.stage)),
        output:
            shards=temp(expand("work/data/{{stage}}/exact/shard{shard}.jsonl", shard=NEAR_SHARDS)),
            stats="work/data/{stage}/exact.stats.json",
        log:
            "logs/dedup/{stage}.log",
        benchmark:
            "benchmarks/dedup/{stage}.tsv"
        resources:
            mem_mb=4000,
        shell:
            "{KALM} dedup {input} --shard-out {output.shards} --stats {output.stats} > {log} 2>&1"

    # MinHash signatures of one shard (uint32 [records, num_perm]); streams the shard
    rule minhash:
        input:
            "work/data/{stage}/exact/shard{shard}.jsonl",
        output:
            temp("work/data/{stage}/minhash/shard{shard}.npy"),
        params:
            opts=f"--num-perm {DEDUP['num_perm']} --shingle {DEDUP['shingle']} --seed {DEDUP['seed']}",
        log:
            "logs/minhash/{stage}/shard{shard}.log",
        benchmark:
            "benchmarks/minhash/{stage}/shard{shard}.tsv"
        resources:
            mem_mb=2000,
        shell:
            "{KALM} dedup --step minhash {input} --out {output} {params.opts} > {log} 2>&1"

    # gather: LSH bands over all signatures, keep the first record of each near-dup cluster
    rule near_dedup:
        input:
            shards=expand("work/data/{{stage}}/exact/shard{shard}.jsonl", shard=NEAR_SHARDS),
            sigs=expand("work/data/{{stage}}/minhash/shard{shard}.npy", shard=NEAR_SHARDS),
            exact_stats="work/data/{stage}/exact.stats.json",
        output:
            data="work/data/{stage}/dedup.jsonl",
            stats="work/data/{stage}/dedup.stats.json",
        params:
            opts=f"--threshold {DEDUP['threshold']} --num-perm {DEDUP['num_perm']} --shingle {DEDUP['shingle']}",
        log:
            "logs/near_dedup/{stage}.log",
        benchmark:
            "benchmarks/near_dedup/{stage}.tsv"
        resources:
            # signatures (4 * num_perm B/record) + band keys and groups; measured in README "Data stage"
            mem_mb=lambda w, input: 1000 + int(3 * sum(os.path.getsize(f) for f in input.sigs if os.path.exists(f)) / 2**20),
        shell:
            "{KALM} dedup --step near {input.shards} --signatures {input.sigs} --exact-stats {input.exact_stats} "
            "--out {output.data} --stats {output.stats} {params.opts} > {log} 2>&1"


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
        # the same task specs (subsets, mirror) as the evaluate jobs: decontaminate against their data
        mteb_tasks=" ".join(f"--mteb-task-json {shlex.quote(json.dumps(eval_task_spec(lang, t), ensure_ascii=False))}"
                            for lang, t in mteb_eval_tasks()),
        near=(f"--near --threshold {DECON['threshold']} --num-perm {DECON['num_perm']} --shingle {DECON['shingle']}"
              if DECON["near_dup"] else "") + f" --contain-min-chars {DECON['contain_min_chars']}",
    log:
        "logs/decontaminate/{stage}.log",
    benchmark:
        "benchmarks/decontaminate/{stage}.tsv"
    resources:
        mem_mb=4000,
    shell:
        "{KALM} decontaminate --input {input.data} {params.eval_tasks} {params.mteb_tasks} {params.near} --out {output.data} "
        "--stats {output.stats} --report {output.report} > {log} 2>&1"
