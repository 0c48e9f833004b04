"""Encode the texts that hard-negative mining needs, one shard per job.

The texts of a mining run are the formatted queries and the candidate passages of every
task that is mined (``texts_to_embed``), de-duplicated and sorted so that every shard job
derives the same list from the same input. Shard ``i`` of ``n`` encodes a contiguous slice
and writes ``shard{i}.npy`` (float16 by default, memory-mappable) with ``shard{i}.ids.json``
(the texts, in row order). sentence-transformers sorts each shard by length before batching,
so padding waste stays small.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from kalm.instructions import format_passage, format_query
from kalm.io import atomic_path, read_jsonl, write_json

log = logging.getLogger(__name__)


def mining_texts(record: dict, symmetric: bool) -> tuple[str, list[str]]:
    """The query text and candidate passage texts of one record, as the encoder sees them."""
    instruction = record.get("instruction")
    query = format_query(record["query"], instruction)
    passages = [format_passage(t, instruction, symmetric) for t in record["pos"] + record.get("neg", [])]
    return query, passages


def texts_to_embed(records: list[dict], mine_tasks: dict[str, bool]) -> list[str]:
    """Unique texts of the records of mined tasks; ``mine_tasks`` maps task -> symmetric."""
    texts: set[str] = set()
    for rec in records:
        if rec["task"] in mine_tasks:
            query, passages = mining_texts(rec, mine_tasks[rec["task"]])
            texts.add(query)
            texts.update(passages)
    return sorted(texts)


def shard_bounds(n_items: int, shard: int, num_shards: int) -> tuple[int, int]:
    per = -(-n_items // num_shards)
    return min(shard * per, n_items), min((shard + 1) * per, n_items)


def encode(model, texts: list[str], batch_size: int) -> np.ndarray:
    if not texts:
        return np.zeros((0, model.get_embedding_dimension()), dtype=np.float32)
    return model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                        convert_to_numpy=True, show_progress_bar=len(texts) > 10 * batch_size)


def embed_shard(input_path: str, mine_tasks: dict[str, bool], model_spec: str, shard: int, num_shards: int,
                out_dir: str, batch_size: int = 64, max_seq_length: int | None = None, dtype: str = "float16") -> Path:
    from kalm.modeling import load_embedding_model

    texts = texts_to_embed(list(read_jsonl(input_path)), mine_tasks)
    lo, hi = shard_bounds(len(texts), shard, num_shards)
    out_dir = Path(out_dir)
    npy, ids = out_dir / f"shard{shard}.npy", out_dir / f"shard{shard}.ids.json"
    if npy.exists() and ids.exists() and json.loads(ids.read_text(encoding="utf-8")) == texts[lo:hi]:
        log.info("shard %d already encoded, reusing %s", shard, npy)
        return npy
    model = load_embedding_model(model_spec, max_seq_length=max_seq_length)
    log.info("encoding shard %d/%d: texts %d..%d of %d", shard, num_shards, lo, hi, len(texts))
    vectors = encode(model, texts[lo:hi], batch_size).astype(dtype)
    with atomic_path(npy) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, vectors)
    write_json(ids, texts[lo:hi])
    return npy


def load_shards(paths: list[str]) -> tuple[np.ndarray, dict[str, int]]:
    """Concatenate shards as float32; return the matrix and text -> row."""
    mats, texts = [], []
    for p in sorted(paths, key=lambda p: int(Path(p).stem.removeprefix("shard"))):
        mats.append(np.load(p, mmap_mode="r").astype(np.float32))
        texts.extend(json.loads(Path(p).with_suffix(".ids.json").read_text(encoding="utf-8")))
    matrix = np.concatenate(mats) if mats else np.zeros((0, 0), dtype=np.float32)
    return matrix, {t: i for i, t in enumerate(texts)}


def _run(args: argparse.Namespace) -> None:
    embed_shard(args.input, json.loads(args.mine_tasks), args.model, args.shard, args.num_shards,
                args.out_dir, args.batch_size, args.max_seq_length, args.dtype)


def register(sub) -> None:
    p = sub.add_parser("embed", help="encode one shard of the texts to mine")
    p.add_argument("--input", required=True, help="decontaminated fine-tuning records")
    p.add_argument("--mine-tasks", required=True, help='JSON {"task": symmetric_bool}')
    p.add_argument("--model", required=True)
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--num-shards", type=int, required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-seq-length", type=int)
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.set_defaults(func=_run)
