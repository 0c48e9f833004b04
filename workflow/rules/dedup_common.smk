# File names and sizes of the dedup stage's shard jobs (included by rules/dedup.smk, so that it also
# runs alone, as tests/test_dedup_shuffle.py runs it; Snakemake's lint wants functions apart from rules).

import os
import shlex

from kalm.data.config import DedupConfig, scatter_runs
from kalm.options import options_json


def dedup_options():
    """The data.dedup section as `--options` JSON for the kalm dedup steps (DedupConfig declares its keys)."""
    return f"--options {shlex.quote(options_json(DedupConfig, DEDUP))}"


def dedup_parts(stage):
    """The stage's records after exact (and near-) dedup: one Parquet file per partition."""
    return [f"work/data/{stage}/dedup/p{j}.parquet" for j in DEDUP_PARTITIONS]


def scatter_groups(stage):
    """The validated parts of each scatter job, in input order (kalm.data.config.scatter_runs)."""
    return scatter_runs(validated_parts(stage), DEDUP["scatter_jobs"])


def scatter_files(stage):
    """The scatter files of a stage, one per scatter job (scatter_groups): what every exact-dedup job reads."""
    return [f"work/data/{stage}/scatter/g{g}.arrow" for g in range(len(scatter_groups(stage)))]


def _exact_out(stage="{stage}", j="{partition}"):
    # without near-dup the exact partitions are the stage's output
    return f"work/data/{stage}/exact/p{j}.parquet" if DEDUP["near_dup"] else f"work/data/{stage}/dedup/p{j}.parquet"


def _mb(input, per_mb, base=500):
    return base + int(per_mb * sum(os.path.getsize(f) for f in input if os.path.isfile(f)) / 2**20)
