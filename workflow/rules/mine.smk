# Hard-negative mining (issue 15: every job's memory depends on its shard, not the corpus):
#   embed_texts one job per part of stage_data("finetune"): its distinct texts to mine, scattered by hash
#               into one temporary file of embed.shards partitions -> work/embed/texts/p{part}.texts.arrow
#   embed       one job per text shard (embed.shards): the texts hashed to it, read from its partition of
#               every part's file; rows in digest order, with the sorted digests (a mine job binary-searches them)
#   mine_ranges one job per candidate pool (a mined task, or `global`): mine.pool_shards text ranges of
#               about equal size (quantiles of a bottom-k sample of its passages) -> {pool}/ranges.json,
#               then one more pass scattering the passages by range -> {pool}/ranges/r{j}.parquet (temp)
#   mine_quantizer  ivf only, one job per pool: the pool's one coarse quantizer, k-means on the vectors of its
#               100,000 passages of smallest digest (nlist = distinct passages / index.list_size, read from the
#               range files); a pool too large for that sample (39 points a list) is trained cell by cell
#               on its passages' range files -> {pool}/quantizer.faiss
#   mine_index  one job per pool shard, reading its range's file: its passages in a canonical order (sorted),
#               their vectors and, for hnsw, the index built once; for ivf, the pool's quantizer filled with
#               the shard's rows; a flat index is rebuilt from the vectors in each mine job (a copy of them:
#               cheaper to rebuild than to store twice)
#   mine_ivf    ivf only, one job per pool: the shards' lists merged on disk in pieces of consecutive lists of
#               at most index.scan_mib MiB -> {pool}/ivf (piece<p>.faiss + lists<p>.ivfdata, pieces.json)
#   mine        one job per part j of stage_data("finetune") (the query shards): its own queries against
#               their tasks' whole pools (flat/hnsw: one pool shard's index at a time, top k merged; ivf:
#               nprobe lists of the pool, the merged pieces memory-mapped one at a time, top k merged)
#               -> work/data/finetune/mined/p{j}.parquet (mined_parts())
#   mine_gather the stage's funnel entry, work/data/finetune/mined.stats.json
# The sampling RNG is per record (seed, record id): the records are the same for any number of parts.


rule embed_texts:
    input:
        lambda w: stage_data("finetune")[int(w.part)],
    output:
        temp("work/embed/texts/p{part}.texts.arrow"),
    log:
        "logs/embed_texts/p{part}.log",
    benchmark:
        "benchmarks/embed_texts/p{part}.tsv"
    wildcard_constraints:
        part=r"\d+",
    resources:
        mem_mb=2000,  # one part's distinct texts to mine
    params:
        mine_tasks=shlex.quote(mine_tasks_json()),
        instructions=instruction_args(),
        num_shards=NUM_SHARDS,
    shell:
        "{KALM} embed --step scatter --input {input} --mine-tasks {params.mine_tasks} "
        "--num-shards {params.num_shards} --out {output} {params.instructions} > {log} 2>&1"


rule embed:
    input:
        data=embed_texts,
        model=embed_model_input(),  # models/pretrain with embed.model: pretrain
    output:
        npy="work/embed/shard{shard}.npy",
        ids="work/embed/shard{shard}.ids.json",
        digests="work/embed/shard{shard}.digests.npy",
    log:
        "logs/embed/shard{shard}.log",
    benchmark:
        "benchmarks/embed/shard{shard}.tsv"
    threads: config["threads"]
    resources:
        # the model, and this shard's texts (a 1/embed.shards hash slice of the texts to mine)
        mem_mb=8000,
        gpu=gpus("embed"),
    params:
        model=embed_model(),
        num_shards=NUM_SHARDS,
        mine_tasks=shlex.quote(mine_tasks_json()),
        embed=shlex.quote(options_json(EmbedConfig, config["embed"])),
        instructions=instruction_args(),
        max_len=config["max_seq_length"],
        pooling=embed_pooling_arg(),
    shell:
        "{GPU_RUN} --gpus {resources.gpu} -- "
        "OMP_NUM_THREADS={threads} {KALM} embed --input {input.data} --mine-tasks {params.mine_tasks} "
        "--model {params.model} --shard {wildcards.shard} --num-shards {params.num_shards} "
        "--out-dir work/embed --options {params.embed} --max-seq-length {params.max_len}{params.pooling} "
        "{params.instructions} --threads {threads} > {log} 2>&1"


rule mine_ranges:
    input:
        data=stage_data("finetune"),
    output:
        ranges="work/mine_index/{pool}/ranges.json",
        passages=temp(directory("work/mine_index/{pool}/ranges")),
    log:
        "logs/mine_ranges/{pool}.log",
    benchmark:
        "benchmarks/mine_ranges/{pool}.tsv"
    wildcard_constraints:
        pool="[^/]+",
    resources:
        mem_mb=1000,  # a bottom-k sample of at most 20,000 texts, 100,000 digests; the scatter buffers ~64k passages
    params:
        mine_tasks=shlex.quote(mine_tasks_json()),
        args=mine_args(),
    shell:
        "{KALM} mine --step ranges --input {input.data} --mine-tasks {params.mine_tasks} --pools-dir work/mine_index "
        "--only-pool {wildcards.pool} {params.args} > {log} 2>&1"


rule mine_quantizer:
    input:
        ranges="work/mine_index/{pool}/ranges.json",
        passages="work/mine_index/{pool}/ranges",  # its training sample (bottom-k by digest) is drawn from these
        shards=expand("work/embed/shard{shard}.npy", shard=range(NUM_SHARDS)),
    output:
        "work/mine_index/{pool}/quantizer.faiss",
    log:
        "logs/mine_quantizer/{pool}.log",
    benchmark:
        "benchmarks/mine_quantizer/{pool}.tsv"
    wildcard_constraints:
        pool="[^/]+",
    threads: config["threads"]
    resources:
        mem_mb=2000,  # at most 100,000 sample vectors (as stored: float16), the centroids, one cell's points (two-level)
    params:
        mine_tasks=shlex.quote(mine_tasks_json()),
        args=mine_args(),
    shell:
        "OMP_NUM_THREADS={threads} {KALM} mine --step quantizer --embeddings {input.shards} "
        "--mine-tasks {params.mine_tasks} --pools-dir work/mine_index --only-pool {wildcards.pool} {params.args} "
        "> {log} 2>&1"


rule mine_ivf:
    input:
        quantizer="work/mine_index/{pool}/quantizer.faiss",
        shards=lambda w: pool_shard_dirs(w.pool),
    output:
        directory("work/mine_index/{pool}/ivf"),
    log:
        "logs/mine_ivf/{pool}.log",
    benchmark:
        "benchmarks/mine_ivf/{pool}.tsv"
    wildcard_constraints:
        pool="[^/]+",
    resources:
        mem_mb=1000,  # the lists are copied through memory maps, one piece (index.scan_mib) at a time
    params:
        mine_tasks=shlex.quote(mine_tasks_json()),
        args=mine_args(),
    shell:
        "{KALM} mine --step ivf --mine-tasks {params.mine_tasks} --pools-dir work/mine_index "
        "--only-pool {wildcards.pool} {params.args} > {log} 2>&1"


rule mine_index:
    input:
        ranges="work/mine_index/{pool}/ranges.json",
        quantizer=ivf_quantizer,
        passages="work/mine_index/{pool}/ranges",  # r{j}.parquet: this shard's passages, scattered by mine_ranges
        shards=expand("work/embed/shard{shard}.npy", shard=range(NUM_SHARDS)),
    output:
        directory("work/mine_index/{pool}/shard{j}"),
    log:
        "logs/mine_index/{pool}/shard{j}.log",
    benchmark:
        "benchmarks/mine_index/{pool}/shard{j}.tsv"
    wildcard_constraints:
        pool="[^/]+",
        j=r"\d+",
    threads: config["threads"]
    resources:
        mem_mb=mine_index_mem_mb,
    params:
        mine_tasks=shlex.quote(mine_tasks_json()),
        args=mine_args(),
    shell:
        "OMP_NUM_THREADS={threads} {KALM} mine --step pool --embeddings {input.shards} --mine-tasks {params.mine_tasks} "
        "--pools-dir work/mine_index --only-pool {wildcards.pool} --pool-shard {wildcards.j} {params.args} "
        "> {log} 2>&1"


rule mine:
    input:
        data=lambda w: stage_data("finetune")[int(w.part)],
        pools=pool_shard_dirs(),
        ivf=ivf_dirs(),
        ranges=expand("work/mine_index/{pool}/ranges.json", pool=mine_pools()),
        shards=expand("work/embed/shard{shard}.npy", shard=range(NUM_SHARDS)),
    output:
        data="work/data/finetune/mined/p{part}.parquet",
        stats="work/data/finetune/mined/p{part}.stats.json",
    log:
        "logs/mine/p{part}.log",
    benchmark:
        "benchmarks/mine/p{part}.tsv"
    threads: config["threads"]  # faiss's OpenMP threads: without it a job takes every core of its node
    resources:
        mem_mb=mine_mem_mb,
        gpu=gpus("mine"),
    params:
        mine_tasks=shlex.quote(mine_tasks_json()),
        args=mine_args(),
        seed=config["seed"],
    shell:
        "{GPU_RUN} --gpus {resources.gpu} -- "
        "OMP_NUM_THREADS={threads} {KALM} mine --step apply --input {input.data} --pools-dir work/mine_index --embeddings {input.shards} "
        "--mine-tasks {params.mine_tasks} --out {output.data} --stats {output.stats} {params.args} "
        "--seed {params.seed} > {log} 2>&1"


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
