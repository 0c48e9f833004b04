# Dedup stage as shard jobs (kalm/data/dedup.py, kalm/data/near_dedup.py): every job's memory depends on its
# shard, never on the corpus, so the stage scales out as SLURM jobs.
#
#   validated parts ─► dedup_scatter (one job per part, or data.dedup.scatter_jobs runs of parts: record to
#     partition digest % P)
#     ─► dedup (exact, one job per partition: first occurrence = smallest id of each digest)
#     ─► [data.dedup.near_dup] minhash (per partition) ─► near_buckets (data.dedup.band_jobs jobs,
#        each a range of LSH bands over all partitions) ─► near_components (one job: union-find over
#        the verified pairs) ─► near_filter (per partition)
#     ─► dedup_stats (gather: the stage's funnel, work/data/{stage}/dedup.stats.json)
#
# Output: dedup_parts(stage) = work/data/{stage}/dedup/p{j}.parquet, j < data.dedup.shards, each in
# id (input) order; the result does not depend on the number of partitions or band jobs.

import json
import os
import shlex


include: "dedup_common.smk"


DEDUP = dedup_settings()
DEDUP_PARTITIONS = list(range(DEDUP["shards"]))
DEDUP_BAND_JOBS = list(range(DEDUP["band_jobs"]))


# a run of validated parts (one, or data.dedup.scatter_jobs runs) -> one file of P partitions (the records + their
# digest, record batches per partition)
rule dedup_scatter:
    input:
        lambda w: scatter_groups(w.stage)[int(w.group)],
    output:
        temp("work/data/{stage}/scatter/g{group}.arrow"),
    log:
        "logs/dedup_scatter/{stage}/g{group}.log",
    benchmark:
        "benchmarks/dedup_scatter/{stage}/g{group}.tsv"
    wildcard_constraints:
        group=r"\d+",
    resources:
        # one input batch + one row group buffered over all partitions (rounds spilled, merged a partition at a time)
        mem_mb=1000,
    params:
        # P only (a params change re-runs the job; the near-dup settings must not re-run the shuffle)
        shards=DEDUP["shards"],
    shell:
        "{KALM} dedup --step scatter {input} --shards {params.shards} --out {output} > {log} 2>&1"


# exact dedup of partition j: its record batches of every scatter file in, first occurrences out (id order)
rule dedup:
    input:
        lambda w: scatter_files(w.stage),
    output:
        data=temp(_exact_out()) if DEDUP["near_dup"] else _exact_out(),
        stats="work/data/{stage}/exact/p{partition}.stats.json",
    log:
        "logs/dedup/{stage}/p{partition}.log",
    benchmark:
        "benchmarks/dedup/{stage}/p{partition}.tsv"
    wildcard_constraints:
        partition=r"\d+",
    resources:
        # ids + digests of this partition (24 B a record, sorted), far below its 1/P of the scatter files
        mem_mb=lambda w, input: _mb(input, 0.5 / DEDUP["shards"], base=1000),
    params:
        shards=DEDUP["shards"],
    shell:
        "{KALM} dedup --step exact {input} --shards {params.shards} --partition p{wildcards.partition} "
        "--out {output.data} --stats {output.stats} > {log} 2>&1"


if DEDUP["near_dup"]:

    # signatures, ids and sorted band keys of one exact partition (memory-mapped .npy files)
    rule minhash:
        input:
            "work/data/{stage}/exact/p{partition}.parquet",
        output:
            temp(directory("work/data/{stage}/minhash/p{partition}")),
        log:
            "logs/minhash/{stage}/p{partition}.log",
        benchmark:
            "benchmarks/minhash/{stage}/p{partition}.tsv"
        wildcard_constraints:
            partition=r"\d+",
        resources:
            # a batch of texts, then one band's keys + sort order (24 B a record of the partition)
            mem_mb=lambda w, input: _mb(input, 1, base=1000),
        params:
            opts=dedup_options(),
        shell:
            "{KALM} dedup --step minhash {input} --out {output} {params.opts} > {log} 2>&1"

    # verified LSH candidate pairs of band job k's bands, across all partitions
    rule near_buckets:
        input:
            lambda w: expand("work/data/{stage}/minhash/p{j}", stage=w.stage, j=DEDUP_PARTITIONS),
        output:
            temp("work/data/{stage}/near/pairs{band_job}.npy"),
        log:
            "logs/near_buckets/{stage}/{band_job}.log",
        benchmark:
            "benchmarks/near_buckets/{stage}/{band_job}.tsv"
        wildcard_constraints:
            band_job=r"\d+",
        resources:
            # one key range of a band (data.dedup.bucket_chunk records x ~40 B) + the pairs
            mem_mb=lambda w: 1000 + DEDUP["bucket_chunk"] * 40 // 2**20 * 3,
        params:
            opts=dedup_options(),
        shell:
            "{KALM} dedup --step buckets {input} --band-job {wildcards.band_job} {params.opts} --out {output} "
            "> {log} 2>&1"

    # connected components of all pairs: the ids to drop (all but the smallest id of each cluster)
    rule near_components:
        input:
            lambda w: expand("work/data/{stage}/near/pairs{k}.npy", stage=w.stage, k=DEDUP_BAND_JOBS),
        output:
            drop="work/data/{stage}/near/drop.npy",
            stats="work/data/{stage}/near/components.json",
        log:
            "logs/near_components/{stage}.log",
        benchmark:
            "benchmarks/near_components/{stage}.tsv"
        resources:
            # the pairs and the ids in them (union-find), never the records
            mem_mb=lambda w, input: _mb(input, 8, base=1000),
        shell:
            "{KALM} dedup --step components {input} --out {output.drop} --stats {output.stats} > {log} 2>&1"

    # drop the near-duplicates from one exact partition
    rule near_filter:
        input:
            data="work/data/{stage}/exact/p{partition}.parquet",
            drop="work/data/{stage}/near/drop.npy",
            components="work/data/{stage}/near/components.json",
        output:
            data="work/data/{stage}/dedup/p{partition}.parquet",
            stats="work/data/{stage}/dedup/p{partition}.stats.json",
        log:
            "logs/near_filter/{stage}/p{partition}.log",
        benchmark:
            "benchmarks/near_filter/{stage}/p{partition}.tsv"
        wildcard_constraints:
            partition=r"\d+",
        resources:
            # one batch + the dropped ids (16 B each)
            mem_mb=lambda w, input: 1000
            + int(2 * os.path.getsize(input.drop) / 2**20 if os.path.exists(input.drop) else 0),
        shell:
            "{KALM} dedup --step filter {input.data} --drop {input.drop} --components {input.components} "
            "--partition p{wildcards.partition} --out {output.data} --stats {output.stats} > {log} 2>&1"


# the stage's funnel: in = kept + exact_duplicate + near_duplicate, per task
rule dedup_stats:
    input:
        exact=lambda w: expand("work/data/{stage}/exact/p{j}.stats.json", stage=w.stage, j=DEDUP_PARTITIONS),
        near=lambda w: (
            expand("work/data/{stage}/dedup/p{j}.stats.json", stage=w.stage, j=DEDUP_PARTITIONS)
            if DEDUP["near_dup"]
            else []
        ),
        components=lambda w: [f"work/data/{w.stage}/near/components.json"] if DEDUP["near_dup"] else [],
        # the partitions themselves: the stats are of finished outputs
        data=lambda w: dedup_parts(w.stage),
    output:
        "work/data/{stage}/dedup.stats.json",
    log:
        "logs/dedup_stats/{stage}.log",
    resources:
        mem_mb=500,
    params:
        near=lambda w, input: (
            f"--near-stats {' '.join(input.near)} --components {input.components}" if DEDUP["near_dup"] else ""
        ),
        settings=shlex.quote(
            json.dumps(
                {k: DEDUP[k] for k in ("threshold", "num_perm", "shingle", "seed")}
                | {"band_jobs": len(DEDUP_BAND_JOBS)}
                if DEDUP["near_dup"]
                else {}
            )
        ),
    shell:
        "{KALM} dedup --step stats {input.exact} {params.near} --params {params.settings} --out {output} > {log} 2>&1"
