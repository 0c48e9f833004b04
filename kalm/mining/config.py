"""The mining options (``MineConfig``, and ``EmbedConfig`` of the encoder): each declared once, here, with its type, default, bounds and help.
The config schema's ``mine`` section and ``kalm mine``'s flags are derived from these fields (kalm.options,
kalm.schema); the workflow passes the section as ``--options`` JSON, and ``kalm embed`` gets the two
instruction options from it too (the mining texts must be formatted as the encoder saw them).

Light on purpose (no faiss, no numpy): the workflow imports it when it builds the DAG.
"""

from __future__ import annotations

from dataclasses import dataclass

from kalm.options import option

INDEX_TYPES = ("flat", "flat_fp16", "ivf", "hnsw")
GIVEN_NEGATIVES = ("keep", "replace")
PASSAGE_INSTRUCTION = ("symmetric", "always", "never")
POOLS = ("task", "global")
EMBED_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
EMBED_DTYPES = ("float16", "float32")


@dataclass
class MineConfig:
    range_for_sampling: tuple[int, ...] = option(
        (50, 100), "rank window [lo, hi) negatives are sampled from", minimum=0, length=2, aliases=("--range",)
    )
    negative_number: int = option(7, "hard negatives per record (given ones first, then mined)", minimum=1)
    filter_topk: int = option(
        50, "ranking-consistency filter: drop a record whose positive ranks below this (0: off)", minimum=0
    )
    margin_ratio: float | None = option(
        None,
        "TopK-PercPos: keep negatives scoring below ratio x positive score (NV-Retriever: 0.95); null = off",
        exclusive_minimum=0,
        maximum=1,
    )
    pad: str = option(
        "random", "a record short of negatives: pad with random pool passages, or not", choices=("random", "none")
    )
    sampling: str = option(
        "random", "random: sample the window (KaLM); top: its best-ranked candidates", choices=("random", "top")
    )
    pool: str = option("task", "candidates from the query's task, or from every mined task", choices=POOLS)
    given_negatives: str = option(
        "keep",
        "a record's own negatives: keep them first and mine only up to negative_number (KaLM's hn_mine), "
        "or replace them with mined ones",
        choices=GIVEN_NEGATIVES,
    )
    query_instruction: bool = option(True, "encode mining queries with their task instruction")
    passage_instruction: str = option(
        "symmetric", "instruction on passages: symmetric tasks only (KaLM), always, never", choices=PASSAGE_INSTRUCTION
    )
    query_batch: int = option(4096, "queries per FAISS search call", minimum=1)
    pool_shards: int = option(
        1,
        "text-range shards per candidate pool, one mine_index job each; flat/hnsw: an index each, searched in "
        "turn by a mine job (one in memory); ivf: one quantizer, the lists merged (mine_ivf); flat and ivf "
        "results do not depend on it",
        minimum=1,
    )
    index_type: str = option(
        "flat",
        "flat: exact; flat_fp16: exact, half the memory; ivf / hnsw: approximate",
        config="index.type",
        choices=INDEX_TYPES,
        aliases=("--index",),
    )
    nlist: int | None = option(
        None, "ivf: lists of a pool (default: its distinct passages / list_size)", config="index.nlist", minimum=1
    )
    list_size: int = option(
        256,
        "ivf: passages per list when nlist is null: a query scans nprobe x list_size passages at any pool size",
        config="index.list_size",
        minimum=1,
    )
    nprobe: int = option(32, "ivf: lists searched per query", config="index.nprobe", minimum=1)
    scan_mib: float = option(
        256,
        "ivf: the pool's merged lists are cut into pieces of at most this many MiB (a larger list alone), "
        "written (mine_ivf) and scanned (mine) one piece at a time: a job maps one piece, whatever the pool",
        config="index.scan_mib",
        exclusive_minimum=0,
    )
    hnsw_m: int = option(32, "hnsw: links per node", config="index.hnsw_m", minimum=4)
    ef_search: int = option(256, "hnsw: search breadth (at least the k searched)", config="index.ef_search", minimum=1)
    seed: int = option(0, "seed of the per-record sampling (the config's top-level seed)", config=None)


@dataclass
class EmbedConfig:
    """The ``embed`` section: the encoder of the mining texts and its batching."""

    model: str | None = option(
        None,
        "retriever used for mining: a model path or name; 'pretrain' = models/pretrain (needs pretrain.enabled); "
        "null = base_model",
        flag=False,  # the rule resolves it (workflow/rules/common.smk embed_model) and passes --model
    )
    shards: int = option(1, "embedding jobs (one GPU each under SLURM)", minimum=1, flag=False)
    batch_size: int = option(64, "most texts per batch", minimum=1)
    token_budget: int = option(4096, "padded tokens per batch (texts x longest)", minimum=1)
    precision: str = option(
        "auto", "GPU compute precision (auto: bf16 where supported); CPUs use fp32", choices=EMBED_PRECISIONS
    )
    dtype: str = option("float16", "storage dtype of the shards", choices=EMBED_DTYPES)


@dataclass
class TeacherConfig:
    """The teacher of contrastive distillation (``finetune.distill`` beside the trainer's ``weight`` and
    ``temperature``): ``kalm teacher-score`` encodes each mined record's query and candidates with it, in
    the teacher's own instruction format, and stores the cosine scores with the record."""

    teacher: str | None = option(
        None,
        "the teacher model (a path or a name; KaLM V2.5: Qwen3-Embedding-8B); null = no teacher_score stage",
        flag=False,  # the rule passes it as --model
    )
    query_prompt: str = option(
        "Instruct: {instruction}\nQuery: {text}",
        "the teacher's query format when the record has an instruction (Qwen3-Embedding's by default); "
        "a query without one is encoded as it is",
        pattern=r"\{text\}",
    )
    passage_prompt: str = option(
        "{text}",
        "the teacher's passage format (symmetric tasks use the query format on both sides)",
        pattern=r"\{text\}",
    )
    batch_size: int = option(32, "most texts per teacher batch", minimum=1)
    token_budget: int = option(8192, "padded tokens per teacher batch (texts x longest)", minimum=1)
    max_seq_length: int | None = option(512, "the teacher's tokens per text", minimum=8)
    precision: str = option(
        "auto", "GPU compute precision (auto: bf16 where supported); CPUs use fp32", choices=EMBED_PRECISIONS
    )
