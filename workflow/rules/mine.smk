# Hard-negative mining: encode the texts to mine in shards (one job each), then one FAISS
# search + sampling + ranking-consistency filter job.


def instruction_args():
    """embed and mine must format texts the same way: one source for both rules."""
    m = config["mine"]
    args = f"--passage-instruction {m.get('passage_instruction', 'symmetric')}"
    return args if m.get("query_instruction", True) else args + " --no-query-instruction"


def mine_args():
    m, index = config["mine"], config["mine"].get("index", {})
    lo, hi = m["range_for_sampling"]
    args = (f"--range {lo} {hi} --negative-number {m['negative_number']} --filter-topk {m['filter_topk']} "
            f"--pad {m['pad']} --sampling {m.get('sampling', 'random')} --pool {m.get('pool', 'task')} "
            f"--query-batch {m.get('query_batch', 4096)} --index {index.get('type', 'flat')} "
            f"--given-negatives {m.get('given_negatives', 'keep')}")
    if m.get("margin_ratio") is not None:
        args += f" --margin-ratio {m['margin_ratio']}"
    for key in ("nlist", "nprobe", "hnsw_m", "ef_search"):
        if key in index:
            args += f" --{key.replace('_', '-')} {index[key]}"
    return args


def mine_mem_mb(wildcards, input):
    """Measured: 1M x 896 float16 (1.7 GiB) mined with a flat index peaks at 6.1 GiB: the memory-mapped
    store, a float32 index (2x the store) and the records' texts. Ask for that, plus headroom."""
    shards = sum(os.path.getsize(p) for p in input.shards) / 2**20
    return int(2048 + 3 * shards + 4 * os.path.getsize(input.data) / 2**20)


rule embed:
    input:
        data="work/data/finetune/decontaminated.jsonl",
        model=embed_model_input(),  # models/pretrain with embed.model: pretrain
    output:
        npy="work/embed/shard{shard}.npy",
        ids="work/embed/shard{shard}.ids.json",
    params:
        model=embed_model(),
        mine_tasks=shlex.quote(mine_tasks_json()),
        batch_size=config["embed"]["batch_size"],
        token_budget=config["embed"].get("token_budget", 4096),
        precision=config["embed"].get("precision", "auto"),
        dtype=config["embed"].get("dtype", "float16"),
        instructions=instruction_args(),
        max_len=config["max_seq_length"],
        pooling=embed_pooling_arg(),
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
        "OMP_NUM_THREADS={threads} {KALM} embed --input {input.data} --mine-tasks {params.mine_tasks} "
        "--model {params.model} --shard {wildcards.shard} --num-shards {NUM_SHARDS} "
        "--out-dir work/embed --batch-size {params.batch_size} --token-budget {params.token_budget} "
        "--precision {params.precision} --dtype {params.dtype} --max-seq-length {params.max_len}{params.pooling} "
        "{params.instructions} --threads {threads} > {log} 2>&1"


rule mine:
    input:
        data="work/data/finetune/decontaminated.jsonl",
        shards=expand("work/embed/shard{shard}.npy", shard=range(NUM_SHARDS)),
    output:
        data="work/data/finetune/mined.jsonl",
        stats="work/data/finetune/mined.stats.json",
    params:
        mine_tasks=shlex.quote(mine_tasks_json()),
        args=mine_args(),
        instructions=instruction_args(),
        seed=config["seed"],
    log:
        "logs/mine/mine.log",
    benchmark:
        "benchmarks/mine/mine.tsv"
    resources:
        mem_mb=mine_mem_mb,
        gpu=gpus("mine"),
    shell:
        "{GPU_RUN} --gpus {resources.gpu} -- "
        "{KALM} mine --input {input.data} --embeddings {input.shards} --mine-tasks {params.mine_tasks} "
        "--out {output.data} --stats {output.stats} {params.args} {params.instructions} --seed {params.seed} "
        "> {log} 2>&1"
