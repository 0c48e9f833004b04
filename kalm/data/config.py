"""The data stages' options, each declared once, here, with its type, default, bounds and help: the config
schema's ``data.dedup`` and ``data.decontaminate`` sections and the flags of ``kalm dedup`` and ``kalm
decontaminate`` are derived from these fields (kalm.options, kalm.schema); the rules pass a section as
``--options`` JSON.

Light on purpose (no numpy, no pyarrow): the workflow imports it when it builds the DAG.
"""

from __future__ import annotations

from dataclasses import dataclass

from kalm.options import option


@dataclass
class DedupConfig:
    near_dup: bool = option(False, "remove near-duplicates (MinHash/LSH) after the exact step; false: exact only")
    threshold: float = option(0.8, "Jaccard threshold on character shingles", exclusive_minimum=0, maximum=1)
    num_perm: int = option(128, "MinHash signature length", minimum=8, maximum=1024)
    shingle: int = option(5, "characters per shingle", minimum=1, maximum=32)
    seed: int = option(1, "seed of the MinHash permutations", minimum=0)
    shards: int = option(
        1,
        "hash partitions P of the stage: one exact-dedup, minhash and near-dup filter job each, and P record "
        "batches in each scatter file (the result does not depend on P)",
        minimum=1,
        aliases=("--partitions",),
    )
    scatter_jobs: int = option(
        0,
        "exact-dedup scatter jobs: the validated parts, in input order, are split into this many contiguous "
        "runs, one job and one scatter file each, so that an exact-dedup job reads this many files (and "
        "batches of this many) whatever the number of input files; 0: one job per input file (the result "
        "does not depend on it)",
        minimum=0,
    )
    band_jobs: int = option(
        1, "near-dup bucket jobs: the LSH bands are split over this many (the result does not depend on it)", minimum=1
    )
    bucket_chunk: int = option(
        1 << 22,
        "near-dup bucket jobs: records of one band held at a time (a key range over all partitions, ~40 B a "
        "record; a bucket is never cut; the result does not depend on it)",
        minimum=1000,
        aliases=("--chunk-records",),
    )


def scatter_runs(parts: list, scatter_jobs: int) -> list[list]:
    """``parts`` (a stage's validated parts, in input order) as the contiguous runs of near-equal length that
    ``DedupConfig.scatter_jobs`` makes, one scatter job each (0, or more jobs than parts: one part each)."""
    jobs = min(scatter_jobs or len(parts), len(parts))
    return [parts[g * len(parts) // jobs : (g + 1) * len(parts) // jobs] for g in range(jobs)]


@dataclass
class DecontaminateConfig:
    near_dup: bool = option(
        False, "also drop near-copies of evaluation texts (MinHash/LSH, exact Jaccard check)", aliases=("--near",)
    )
    threshold: float = option(0.8, "Jaccard threshold of a near-copy", exclusive_minimum=0, maximum=1)
    num_perm: int = option(128, "MinHash signature length", minimum=8, maximum=1024)
    shingle: int = option(5, "characters per shingle", minimum=1, maximum=32)
    mteb: bool = option(
        True,
        "also decontaminate against MTEB tasks without a local folder when their data is cached offline",
        flag=False,  # the workflow turns this into --mteb-task arguments
    )
    contain_min_chars: int = option(
        50,
        "also drop a record whose query or a positive contains a whole evaluation text of at least this many "
        "normalised characters (0: off)",
        minimum=0,
    )
