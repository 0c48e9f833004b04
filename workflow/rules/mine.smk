# Hard-negative mining: encode the texts to mine in shards (one job each), then one FAISS
# search + sampling + ranking-consistency filter job.


rule embed:
    input:
        "work/data/finetune/decontaminated.jsonl",
    output:
        npy="work/embed/shard{shard}.npy",
        ids="work/embed/shard{shard}.ids.json",
    params:
        model=config["embed"]["model"] or config["base_model"],
        mine_tasks=shlex.quote(mine_tasks_json()),
        batch_size=config["embed"]["batch_size"],
        max_len=config["max_seq_length"],
    threads: config["threads"]
    log:
        "logs/embed/shard{shard}.log",
    benchmark:
        "benchmarks/embed/shard{shard}.tsv"
    resources:
        mem_mb=8000,
        gpu=gpus("embed"),
    shell:
        "{GPU_RUN} --gpus {resources.gpu} -- "
        "OMP_NUM_THREADS={threads} {KALM} embed --input {input} --mine-tasks {params.mine_tasks} "
        "--model {params.model} --shard {wildcards.shard} --num-shards {NUM_SHARDS} "
        "--out-dir work/embed --batch-size {params.batch_size} --max-seq-length {params.max_len} > {log} 2>&1"


rule mine:
    input:
        data="work/data/finetune/decontaminated.jsonl",
        shards=expand("work/embed/shard{shard}.npy", shard=range(NUM_SHARDS)),
    output:
        data="work/data/finetune/mined.jsonl",
        stats="work/data/finetune/mined.stats.json",
    params:
        mine_tasks=shlex.quote(mine_tasks_json()),
        lo=config["mine"]["range_for_sampling"][0],
        hi=config["mine"]["range_for_sampling"][1],
        n=config["mine"]["negative_number"],
        topk=config["mine"]["filter_topk"],
        pad=config["mine"]["pad"],
        sampling=config["mine"].get("sampling", "random"),
        seed=config["seed"],
    log:
        "logs/mine/mine.log",
    benchmark:
        "benchmarks/mine/mine.tsv"
    resources:
        mem_mb=8000,
        gpu=gpus("mine"),
    shell:
        "{GPU_RUN} --gpus {resources.gpu} -- "
        "{KALM} mine --input {input.data} --embeddings {input.shards} --mine-tasks {params.mine_tasks} "
        "--out {output.data} --stats {output.stats} --range {params.lo} {params.hi} "
        "--negative-number {params.n} --filter-topk {params.topk} --pad {params.pad} --seed {params.seed} "
        "--sampling {params.sampling} > {log} 2>&1"
