# Hard-negative mining (issue 15: every job's memory depends on its shard, not the corpus):
#   embed       one job per text shard (embed.shards): the texts hashed to it, streamed from stage_data
#   mine_ranges one job per candidate pool (a mined task, or `global`): mine.pool_shards text ranges of
#               about equal size (quantiles of a bottom-k sample of its passages) -> {pool}/ranges.json
#   mine_index  one job per pool shard: the passages of its text range in a canonical order (sorted),
#               their vectors and, for ivf/hnsw, the index trained and filled once (faiss.write_index);
#               a flat index is rebuilt from the vectors in each mine job (a copy of them: cheaper to
#               rebuild than to store twice)
#   mine        one job per part j of stage_data("finetune") (the query shards): its own queries against
#               their tasks' whole pools, one pool shard's index at a time, top k merged
#               -> work/data/finetune/mined/p{j}.parquet (mined_parts())
#   mine_gather the stage's funnel entry, work/data/finetune/mined.stats.json
# The sampling RNG is per record (seed, record id): the records are the same for any number of parts.


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


def _files_mb(paths):
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p)) / 2**20


def _ids_files(shards):
    return [p[: -len(".npy")] + ".ids.json" for p in shards]


def mine_index_mem_mb(wildcards, input):
    """A pool shard of at most the whole store: its texts (twice: the builder's map, the store's text -> row
    map, one embedding shard's ids parsed at a time), its float32 vectors in an ivf/hnsw index (2x the
    float16 store), divided among the pool's shards."""
    per_shard = (3 * _files_mb(input.shards) + 3 * _files_mb(_ids_files(input.shards))) / len(POOL_SHARDS)
    return int(2048 + per_shard + 3 * max([_files_mb([p]) for p in _ids_files(input.shards)] or [0]))


def mine_mem_mb(wildcards, input):
    """Measured: 1M x 896 float16 (1.7 GiB) mined with a flat index peaks at 6.1 GiB: a float32 index (2x
    the vectors) and the records' texts. A query shard holds one task's records of its part, the vectors of
    their own texts and one pool (memory-mapped texts and vectors, 8 B keys) with one shard's index: ask
    for the largest pool shard's index, the part's records, one ids file parsed, plus headroom."""
    shards = [_files_mb([os.path.join(d, "vectors.npy")]) for d in input.pools] or [0]
    ids = max([_files_mb([p]) for p in _ids_files(input.shards)] or [0])
    return int(2048 + 3 * max(shards) + 4 * _files_mb([input.data]) + 3 * ids)


rule embed:
    input:
        data=stage_data("finetune"),
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
        # the model, and this shard's texts (a 1/embed.shards hash slice of the texts to mine)
        mem_mb=8000,
        gpu=gpus("embed"),
    shell:
        "{GPU_RUN} --gpus {resources.gpu} -- "
        "OMP_NUM_THREADS={threads} {KALM} embed --input {input.data} --mine-tasks {params.mine_tasks} "
        "--model {params.model} --shard {wildcards.shard} --num-shards {NUM_SHARDS} "
        "--out-dir work/embed --batch-size {params.batch_size} --token-budget {params.token_budget} "
        "--precision {params.precision} --dtype {params.dtype} --max-seq-length {params.max_len}{params.pooling} "
        "{params.instructions} --threads {threads} > {log} 2>&1"


rule mine_ranges:
    input:
        data=stage_data("finetune"),
    output:
        "work/mine_index/{pool}/ranges.json",
    wildcard_constraints:
        pool="[^/]+",
    params:
        mine_tasks=shlex.quote(mine_tasks_json()),
        shards=len(POOL_SHARDS),
        instructions=instruction_args(),
        pool=MINE_POOL,
    log:
        "logs/mine_ranges/{pool}.log",
    benchmark:
        "benchmarks/mine_ranges/{pool}.tsv"
    resources:
        mem_mb=1000,  # a bottom-k sample of 1,000 texts per shard
    shell:
        "{KALM} mine --step ranges --input {input.data} --mine-tasks {params.mine_tasks} --pools-dir work/mine_index "
        "--only-pool {wildcards.pool} --pool {params.pool} --pool-shards {params.shards} {params.instructions} "
        "> {log} 2>&1"


rule mine_index:
    input:
        data=stage_data("finetune"),
        ranges="work/mine_index/{pool}/ranges.json",
        shards=expand("work/embed/shard{shard}.npy", shard=range(NUM_SHARDS)),
    output:
        directory("work/mine_index/{pool}/shard{j}"),
    wildcard_constraints:
        pool="[^/]+",
        j=r"\d+",
    params:
        mine_tasks=shlex.quote(mine_tasks_json()),
        args=mine_args(),
        instructions=instruction_args(),
    log:
        "logs/mine_index/{pool}/shard{j}.log",
    benchmark:
        "benchmarks/mine_index/{pool}/shard{j}.tsv"
    resources:
        mem_mb=mine_index_mem_mb,
    shell:
        "{KALM} mine --step pool --input {input.data} --embeddings {input.shards} --mine-tasks {params.mine_tasks} "
        "--pools-dir work/mine_index --only-pool {wildcards.pool} --pool-shard {wildcards.j} {params.args} "
        "{params.instructions} > {log} 2>&1"


rule mine:
    input:
        data=lambda w: stage_data("finetune")[int(w.part)],
        pools=pool_shard_dirs(),
        ranges=expand("work/mine_index/{pool}/ranges.json", pool=mine_pools()),
        shards=expand("work/embed/shard{shard}.npy", shard=range(NUM_SHARDS)),
    output:
        data="work/data/finetune/mined/p{part}.parquet",
        stats="work/data/finetune/mined/p{part}.stats.json",
    params:
        mine_tasks=shlex.quote(mine_tasks_json()),
        args=mine_args(),
        instructions=instruction_args(),
        seed=config["seed"],
    log:
        "logs/mine/p{part}.log",
    benchmark:
        "benchmarks/mine/p{part}.tsv"
    resources:
        mem_mb=mine_mem_mb,
        gpu=gpus("mine"),
    shell:
        "{GPU_RUN} --gpus {resources.gpu} -- "
        "{KALM} mine --step apply --input {input.data} --pools-dir work/mine_index --embeddings {input.shards} "
        "--mine-tasks {params.mine_tasks} --out {output.data} --stats {output.stats} {params.args} "
        "{params.instructions} --seed {params.seed} > {log} 2>&1"


rule mine_gather:
    input:
        mined_parts(".stats.json"),
    output:
        "work/data/finetune/mined.stats.json",
    log:
        "logs/mine/gather.log",
    resources:
        mem_mb=500,
    shell:
        "{KALM} mine --step merge --input {input} --stats {output} > {log} 2>&1"
