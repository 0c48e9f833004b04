"""Teacher scores for contrastive distillation (KaLM-Embedding-V2.5): one job per part of the mined data.

Each record's query and candidates (its positives and hard negatives) are encoded with the teacher, in
the teacher's own instruction format (``TeacherConfig.query_prompt`` / ``passage_prompt``), and the
cosine similarities are stored with the record: ``pos_teacher`` (one per positive) and ``neg_teacher``
(one per negative), float32 lists in ``kalm.data.shards.RECORD_SCHEMA``. The student's training then
reads them from the Arrow cache like the texts and never loads the teacher
(``kalm.losses.distill``, ``kalm.training.objective``).

Memory: a chunk of ``CHUNK_RECORDS`` records and their distinct texts' embeddings at a time. A text
repeated in a chunk is encoded once.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from kalm import options
from kalm.data.shards import iter_shard, record_writer
from kalm.io import StageStats
from kalm.mining.config import TeacherConfig
from kalm.models.modeling import add_pooling_argument

log = logging.getLogger(__name__)

CHUNK_RECORDS = 4096


def teacher_query(text: str, instruction: str | None, cfg: TeacherConfig) -> str:
    """The teacher's form of a query: its prompt with the record's instruction, or the text alone."""
    if not instruction:
        return text
    return cfg.query_prompt.replace("{instruction}", instruction).replace("{text}", text)


def teacher_passage(text: str, instruction: str | None, symmetric: bool, cfg: TeacherConfig) -> str:
    """The teacher's form of a candidate: as a query on symmetric tasks (STS, pairs), else its passage prompt."""
    if symmetric:
        return teacher_query(text, instruction, cfg)
    return cfg.passage_prompt.replace("{text}", text)


def score_records(records: list[dict], encode, symmetric: dict[str, bool], cfg: TeacherConfig) -> int:
    """Add ``pos_teacher`` and ``neg_teacher`` to ``records`` (in place) with ``encode`` (texts -> L2-normalised
    float32 rows). Returns the distinct texts encoded."""
    texts: dict[str, int] = {}

    def row(text: str) -> int:
        return texts.setdefault(text, len(texts))

    plan = []
    for rec in records:
        instr, sym = rec.get("instruction"), symmetric.get(rec["task"], False)
        q = row(teacher_query(rec["query"], instr, cfg))
        pos = [row(teacher_passage(t, instr, sym, cfg)) for t in rec["pos"]]
        neg = [row(teacher_passage(t, instr, sym, cfg)) for t in rec.get("neg") or []]
        plan.append((q, pos, neg))
    vecs = encode(list(texts))
    for rec, (q, pos, neg) in zip(records, plan):
        rec["pos_teacher"] = [round(float(x), 6) for x in vecs[pos] @ vecs[q]]
        rec["neg_teacher"] = [round(float(x), 6) for x in vecs[neg] @ vecs[q]] if neg else []
    return len(texts)


def teacher_score(
    input_path: str,
    out_path: str,
    stats_path: str,
    model_spec: str,
    symmetric: dict[str, bool],
    cfg: TeacherConfig,
    pooling: str = "mean",
    threads: int | None = None,
) -> StageStats:
    """``kalm teacher-score``: one part of the mined records, with the teacher's scores added."""
    import torch

    from kalm.mining.embed import encode_texts
    from kalm.models.modeling import load_embedding_model

    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    model = load_embedding_model(model_spec, max_seq_length=cfg.max_seq_length, pooling=pooling)
    stats = StageStats("teacher_score", teacher=model_spec, texts_encoded=0)

    def encode(texts):
        return encode_texts(model, texts, cfg.token_budget, cfg.batch_size, cfg.precision, progress=False)

    with record_writer(out_path) as out:
        chunk: list[dict] = []

        def flush():
            stats.extra["texts_encoded"] += score_records(chunk, encode, symmetric, cfg)
            for rec in chunk:
                out.write(rec)
                stats.keep(task=rec["task"])
            log.info("teacher scores: %d records (%.1f records/s)", stats.kept, stats.kept / (time.time() - t0))
            chunk.clear()

        for rec in iter_shard(input_path):
            stats.seen(task=rec["task"])
            chunk.append(rec)
            if len(chunk) == CHUNK_RECORDS:
                flush()
        if chunk:
            flush()
    stats.extra["seconds"] = round(time.time() - t0, 3)
    stats.write(stats_path)
    return stats


def _run(args: argparse.Namespace) -> None:
    cfg = options.from_args(TeacherConfig, args, json.loads(args.options) if args.options else None)
    teacher_score(
        args.input,
        args.out,
        args.stats,
        args.model,
        json.loads(args.symmetric) if args.symmetric else {},
        cfg,
        args.pooling,
        args.threads,
    )


def register(sub) -> None:
    p = sub.add_parser("teacher-score", help="add a teacher's scores of each record's candidates (distillation)")
    p.add_argument("--input", required=True, help="one part of the mined records (.parquet)")
    p.add_argument("--out", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--model", required=True, help="the teacher model: a path or a name")
    p.add_argument("--symmetric", help='JSON {"task": instruction on both sides}')
    p.add_argument("--options", help="the config's finetune.distill section as JSON (TeacherConfig's keys); flags win")
    p.add_argument("--threads", type=int)
    options.add_arguments(p, TeacherConfig)
    add_pooling_argument(p)
    p.set_defaults(func=_run)
