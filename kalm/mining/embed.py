"""Encode the texts that hard-negative mining needs, one shard per job.

The texts of a mining run are the formatted queries and the candidate passages of every
task that is mined (``texts_to_embed``), de-duplicated. Shard ``i`` of ``n`` encodes the texts whose
64-bit hash is ``i`` modulo ``n`` (:func:`text_shard`) and writes them in the order of that hash
(:func:`write_embedding_shard`): ``shard{i}.npy`` (float16 by default, memory-mappable), ``shard{i}.ids.json``
(the texts, in row order) and ``shard{i}.digests.npy`` (their sorted hashes). A reader finds a text's row by
binary search in the memory-mapped hashes (:class:`ShardedEmbeddings`), so a mining job touches a few pages
per text it looks up instead of parsing every shard's texts. A re-run reuses a shard whose texts are unchanged. A shard job streams the records (Parquet shards of the stage, a row
group at a time) and keeps only its own texts, so its memory is its shard's texts, not the corpus'.

Encoding (``encode_texts``) sorts the texts by token length and cuts batches under a token
budget (``batch rows x longest row <= token_budget``), so short texts go in large batches and
long ones in small batches: padding waste is small and memory per batch is bounded whatever
the length mix. GPUs encode in bf16 (fp16 where bf16 is unsupported), CPUs in fp32. Padding
is on the right and pooling ignores it, so a text's embedding does not depend on the batch it
falls in (a test).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from kalm import options
from kalm.evaluation.instructions import format_query
from kalm.io import atomic_path, release_pages, write_json
from kalm.mining.config import EmbedConfig, MineConfig
from kalm.models.modeling import add_pooling_argument

log = logging.getLogger(__name__)

PAD_MULTIPLE = 16  # batch lengths are rounded up to this: few distinct shapes (see pad_to_multiple)


def mining_texts(
    record: dict, symmetric: bool, query_instruction: bool = True, passage_instruction: str = "symmetric"
) -> tuple[str, list[str]]:
    """The query text and candidate passage texts of one record, as the encoder sees them.

    ``query_instruction``: queries carry the KaLM instruction prefix (the retriever is an
    instruction-tuned model); ``passage_instruction``: ``symmetric`` puts it on passages of
    symmetric tasks only (KaLM), ``always`` / ``never`` override that.
    """
    instruction = record.get("instruction")
    query = format_query(record["query"], instruction if query_instruction else None)
    on_passages = passage_instruction == "always" or (passage_instruction == "symmetric" and symmetric)
    passages = [format_query(t, instruction if on_passages else None) for t in record["pos"] + record.get("neg", [])]
    return query, passages


def texts_to_embed(
    records: list[dict],
    mine_tasks: dict[str, bool],
    query_instruction: bool = True,
    passage_instruction: str = "symmetric",
) -> list[str]:
    """Unique texts of the records of mined tasks; ``mine_tasks`` maps task -> symmetric."""
    texts: set[str] = set()
    for rec in records:
        if rec["task"] in mine_tasks:
            query, passages = mining_texts(rec, mine_tasks[rec["task"]], query_instruction, passage_instruction)
            texts.add(query)
            texts.update(passages)
    return sorted(texts)


def text_digest(text: str) -> int:
    """A 64-bit hash of an encoder-side text, stable across runs (embedding shards, pool range samples)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def text_shard(text: str, num_shards: int) -> int:
    """The embedding shard of a text: :func:`text_digest` modulo ``num_shards``."""
    return text_digest(text) % num_shards


def shard_texts(
    inputs,
    mine_tasks: dict[str, bool],
    shard: int,
    num_shards: int,
    query_instruction: bool = True,
    passage_instruction: str = "symmetric",
) -> list[str]:
    """The sorted texts of shard ``shard`` of ``num_shards``: :func:`texts_to_embed` of the records of
    ``inputs`` (record files, streamed), restricted to the texts that :func:`text_shard` puts there; or the
    union of :func:`scatter_texts` files for this shard (the workflow's embed jobs)."""
    paths = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if paths and all(str(p).endswith(TEXTS_SUFFIX) for p in paths):
        return sorted(_scattered_texts(paths, shard, num_shards))
    texts: set[str] = set()
    for t in iter_mining_texts(paths, mine_tasks, query_instruction, passage_instruction):
        if t not in texts and text_shard(t, num_shards) == shard:
            texts.add(t)
    return sorted(texts)


def iter_mining_texts(paths, mine_tasks: dict[str, bool], query_instruction: bool, passage_instruction: str):
    """Every query and passage text of the mined tasks' records in ``paths`` (streamed), as the encoder sees
    them (:func:`mining_texts`), repeats included."""
    from kalm.data.shards import iter_records

    for rec in iter_records(paths, columns=["task", "query", "pos", "neg", "instruction"]):
        if rec["task"] in mine_tasks:
            query, passages = mining_texts(rec, mine_tasks[rec["task"]], query_instruction, passage_instruction)
            yield query
            yield from passages


TEXTS_SUFFIX = ".texts.arrow"  # kalm embed --step scatter's files: one column "text"


def scatter_texts(
    input_path,
    mine_tasks: dict[str, bool],
    out_path: str,
    num_shards: int,
    query_instruction: bool = True,
    passage_instruction: str = "symmetric",
) -> list[int]:
    """``kalm embed --step scatter``: the texts to mine of one part of the stage (queries and passages of its
    mined tasks, formatted as the encoder sees them), each distinct text once, sorted, into one file of
    ``num_shards`` partitions by :func:`text_shard` (:mod:`kalm.partitioned`), so that embed job j reads
    partition j of every part's file instead of the whole stage (whose reading and hashing grew with the
    stage in every job). Returns the texts per shard."""
    import pyarrow as pa

    from kalm.partitioned import PartitionedWriter

    if not str(out_path).endswith(TEXTS_SUFFIX):  # before reading the part
        raise ValueError(f"{out_path}: a scatter output must end in {TEXTS_SUFFIX}")
    shard_of: dict[str, int] = {}
    for t in iter_mining_texts([input_path], mine_tasks, query_instruction, passage_instruction):
        if t not in shard_of:
            shard_of[t] = text_shard(t, num_shards)
    texts = sorted(shard_of)
    schema = pa.schema([("text", pa.large_string())])
    with PartitionedWriter(out_path, schema, num_shards, buffer_rows=len(texts) + 1) as out:  # one round
        out.write(pa.table({"text": pa.array(texts, pa.large_string())}), [shard_of[t] for t in texts])
    log.info("scatter %s: %d texts over %d embedding shards", input_path, len(texts), num_shards)
    return out.rows


def _scattered_texts(paths, shard: int, num_shards: int) -> set[str]:
    """The union of shard ``shard``'s texts of :func:`scatter_texts` files (each checked to hold
    ``num_shards`` partitions: a file scattered for another ``embed.shards`` fails with its name)."""
    from kalm.partitioned import read_partition

    texts: set[str] = set()
    for path in paths:
        for batch in read_partition(path, shard, num_shards):
            texts.update(batch.column("text").to_pylist())
    return texts


def shard_bounds(n_items: int, shard: int, num_shards: int) -> tuple[int, int]:
    per = -(-n_items // num_shards)
    return min(shard * per, n_items), min((shard + 1) * per, n_items)


def token_budget_batches(lengths: list[int], token_budget: int, max_batch: int, multiple: int = 1) -> list[np.ndarray]:
    """Indices of ``lengths`` in batches, longest texts first, each with rows x padded length <= budget.

    Padded length = the batch's longest, rounded up to ``multiple``. A text longer than the
    budget gets a batch of its own (it must be encoded anyway).
    """
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    batches, start = [], 0
    while start < len(order):
        padded = -(-max(1, lengths[order[start]]) // multiple) * multiple  # the first row is the longest
        rows = max(1, min(max_batch, token_budget // padded))
        batches.append(order[start : start + rows])
        start += rows
    return batches


def pad_to_multiple(features: dict, multiple: int, pad_id: int, limit: int | None = None) -> dict:
    """Right-pad token tensors to a multiple of ``multiple`` tokens (masked: results unchanged).

    Few distinct batch shapes mean fewer per-shape kernel caches and allocator fragments; on
    CPU, peak memory also grew with rows per batch (measured on 6,000 texts: 1.23 GB with 512
    rows of short texts, 0.81 GB with 64), hence the 64-row default.
    """
    import torch.nn.functional as F

    length = features["input_ids"].shape[1]
    extra = -length % multiple
    if limit:  # never past the model's maximum length (position embeddings)
        extra = max(0, min(extra, limit - length))
    if extra:
        for key, value in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in features:
                features[key] = F.pad(features[key], (0, extra), value=value)
    return features


def token_lengths(tokenizer, texts: list[str], max_length: int | None, chunk: int = 8192) -> list[int]:
    """Token count of each text (truncated), tokenising in chunks: only the counts are kept,
    never the token ids of the whole shard (those would cost more memory than the model)."""
    lengths: list[int] = []
    for start in range(0, len(texts), chunk):
        enc = tokenizer(texts[start : start + chunk], truncation=True, max_length=max_length)["input_ids"]
        lengths += map(len, enc)
    return lengths


def autocast_dtype(precision: str, device):
    """The ``torch`` autocast dtype for ``precision`` on ``device`` (None: plain fp32)."""
    import torch

    if precision == "fp32" or device.type != "cuda":
        if precision in ("fp16", "bf16") and device.type != "cuda":
            log.info("precision %s requested on %s: encoding in fp32", precision, device)
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def encode_texts(
    model,
    texts: list[str],
    token_budget: int = 4096,
    max_batch: int = 64,
    precision: str = "auto",
    progress: bool = True,
    out_dtype=np.float32,
) -> np.ndarray:
    """L2-normalised embeddings of ``texts`` (row i = text i) as ``out_dtype``, token-budget batches.

    The defaults suit CPUs (4096 tokens, 64 rows: as fast as larger batches there, and less
    peak memory); give GPUs far more (config/kalm_full.yaml).
    """
    import torch

    dim = model.get_embedding_dimension()
    out = np.zeros((len(texts), dim), dtype=out_dtype)
    if not texts:
        return out
    lengths = token_lengths(model.tokenizer, texts, model.max_seq_length)
    batches = token_budget_batches(lengths, token_budget, max_batch, PAD_MULTIPLE)
    pad_id = model.tokenizer.pad_token_id or 0
    amp = autocast_dtype(precision, model.device)
    model.eval()
    t0, done, last_report = time.time(), 0, 0.0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc="encode", unit="text", mininterval=5)
    with torch.inference_mode(), torch.autocast(model.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        for idx in batches:
            features = pad_to_multiple(
                model.preprocess([texts[i] for i in idx]), PAD_MULTIPLE, pad_id, model.max_seq_length
            )
            features = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
            emb = model(features)["sentence_embedding"].float()
            emb = torch.nn.functional.normalize(emb, dim=-1)
            out[idx] = emb.cpu().numpy()
            done += len(idx)
            if bar is not None:
                bar.update(len(idx))
            elif time.time() - last_report > 30:
                last_report = time.time()
                log.info("encoded %d/%d texts (%.0f texts/s)", done, len(texts), done / (time.time() - t0))
    if bar is not None:
        bar.close()
    return out


def embed_shard(
    input_path,
    mine_tasks: dict[str, bool],
    model_spec: str,
    shard: int,
    num_shards: int,
    out_dir: str,
    token_budget: int = 4096,
    max_batch: int = 64,
    max_seq_length: int | None = None,
    dtype: str = "float16",
    precision: str = "auto",
    query_instruction: bool = True,
    passage_instruction: str = "symmetric",
    threads: int | None = None,
    pooling: str = "mean",
) -> Path:
    """Encode shard ``shard`` of the texts of ``input_path`` (a record file or a list of them)."""
    texts = digest_order(shard_texts(input_path, mine_tasks, shard, num_shards, query_instruction, passage_instruction))
    out_dir = Path(out_dir)
    npy = out_dir / f"shard{shard}.npy"
    ids, digests = ids_path(npy), digests_path(npy)
    if npy.exists() and digests.exists() and ids.exists() and read_ids(ids) == texts:
        log.info("shard %d already encoded, reusing %s", shard, npy)
        return npy
    import torch

    from kalm.models.modeling import load_embedding_model

    if threads:
        torch.set_num_threads(threads)
    model = load_embedding_model(model_spec, max_seq_length=max_seq_length, pooling=pooling)
    log.info("encoding shard %d/%d: %d texts on %s", shard, num_shards, len(texts), model.device)
    t0 = time.time()
    vectors = encode_texts(model, texts, token_budget, max_batch, precision, out_dtype=np.dtype(dtype))
    log.info("encoded %d texts in %.1f s", len(texts), time.time() - t0)
    return write_embedding_shard(npy, texts, vectors)


def ids_path(npy: str | Path) -> Path:
    return Path(npy).with_suffix(".ids.json")


def digests_path(npy: str | Path) -> Path:
    return Path(npy).with_suffix(".digests.npy")


def digest_order(texts) -> list[str]:
    """``texts`` ordered by (:func:`text_digest`, text): the row order of an embedding shard."""
    return sorted(texts, key=lambda t: (text_digest(t), t))


def write_embedding_shard(npy: str | Path, texts: list[str], vectors: np.ndarray) -> Path:
    """Write one embedding shard: rows of ``vectors`` for ``texts``, reordered by :func:`digest_order`, as
    ``npy`` with its ids (the texts) and its sorted digests (the lookup key of :class:`ShardedEmbeddings`).
    The vectors are written last: a shard is complete when its ``.npy`` exists (each file is atomic)."""
    if len(texts) != len(vectors):
        raise ValueError(f"{npy}: {len(vectors)} vectors for {len(texts)} texts")
    digests = np.fromiter((text_digest(t) for t in texts), dtype=np.uint64, count=len(texts))
    order = np.lexsort((np.arange(len(texts)), digests)) if len(texts) else np.zeros(0, np.int64)
    if not np.array_equal(order, np.arange(len(texts))):
        texts, digests, vectors = [texts[i] for i in order], digests[order], vectors[order]
    npy = Path(npy)
    write_json(ids_path(npy), texts)
    with atomic_path(digests_path(npy)) as tmp, open(tmp, "wb") as f:
        np.save(f, digests)
    with atomic_path(npy) as tmp, open(tmp, "wb") as f:
        np.save(f, vectors)
    return npy


def read_ids(path: Path) -> list[str]:
    """A shard's texts (its ids file): orjson, 1.85x json's speed on 1.9M texts; json where orjson refuses
    (a lone surrogate, which validation keeps out of records)."""
    import orjson

    raw = path.read_bytes()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw.decode("utf-8", "surrogatepass"))


class ShardedEmbeddings:
    """The rows of every embedding shard, memory-mapped (no copy), addressed by text.

    A text is found by its :func:`text_digest`, binary-searched in each shard's sorted digests (memory-mapped:
    a lookup reads a few pages), so opening the store costs nothing and a job's memory and time depend on
    the texts it looks up, not on the store's size. Two texts of one shard with the same 64-bit digest (all
    texts of a digest share a shard) are told apart by reading that shard's ids, only when one of them is
    looked up. ``vectors(texts)`` gathers rows as float32: only what a search needs is ever converted, so a
    1M x 896 float16 store costs 1.7 GiB of page cache, not 3.4 GiB of float32 copies.
    """

    def __init__(self, paths: list[str]):
        self.paths = sorted((Path(p) for p in paths), key=lambda p: int(p.stem.removeprefix("shard")))
        self.shards: list[np.ndarray] = []
        self.digests: list[np.ndarray] = []
        for p in self.paths:
            self.shards.append(np.load(p, mmap_mode="r"))
            self.digests.append(np.load(digests_path(p), mmap_mode="r"))
            if len(self.digests[-1]) != len(self.shards[-1]):
                raise ValueError(f"{p}: {len(self.shards[-1])} rows but {len(self.digests[-1])} digests")
        self._ids: dict[int, list[str]] = {}  # a shard's texts, read only to resolve a digest collision
        self.dim = next((m.shape[1] for m in self.shards if m.ndim == 2 and len(m)), 0)
        self.dtype = next((m.dtype for m in self.shards if m.ndim == 2 and len(m)), np.dtype(np.float16))
        self.routed = self._hash_sharded()

    ROUTE_CHECK = 64  # digests of each shard checked against digest % shards before lookups trust it

    def _hash_sharded(self) -> bool:
        """Whether the shards are the workflow's (``shard0`` .. ``shard{E-1}``, text to shard
        :func:`text_shard`, i.e. digest % E): then a text is looked up in its one shard, so a lookup costs
        the same whatever E (searching every shard cost E binary searches a text: mine_index 1.43x the time
        a passage at 40 shards against 4). Checked on ``ROUTE_CHECK`` digests of each shard, spread over it;
        any other set of shards is searched shard by shard, as before."""
        n = len(self.paths)
        if [p.stem for p in self.paths] != [f"shard{i}" for i in range(n)]:
            return False
        for i, digests in enumerate(self.digests):
            if len(digests):
                probe = np.asarray(digests[np.linspace(0, len(digests) - 1, self.ROUTE_CHECK).astype(np.int64)])
                if (probe % np.uint64(n) != i).any():
                    return False
        release_pages(*self.digests)
        return True

    def _resolve(self, s: int, first: int, text: str) -> int:
        """The row of ``text`` among the rows ``first``.. of shard ``s`` that share its digest."""
        ids = self._ids.setdefault(s, read_ids(ids_path(self.paths[s])))
        digests = self.digests[s]
        row = first
        while row < len(ids) and digests[row] == digests[first]:
            if ids[row] == text:
                return row
            row += 1
        return -1

    def locate(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of each text; shard -1 where a text is in no shard."""
        return self.locate_digests(
            np.fromiter((text_digest(t) for t in texts), dtype=np.uint64, count=len(texts)), texts
        )

    def locate_digests(self, want: np.ndarray, texts: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of each :func:`text_digest` in ``want``; shard -1 where none has it. Without ``texts``
        a digest shared by two texts (a 64-bit collision) gives the first of its rows."""
        shard = np.full(len(want), -1, dtype=np.int64)
        row = np.zeros(len(want), dtype=np.int64)
        home = (want % np.uint64(len(self.digests))).astype(np.int64) if self.routed else None
        everything = np.arange(len(want))
        for s, digests in enumerate(self.digests):
            idx = everything if home is None else np.nonzero(home == s)[0]  # routed: this shard's texts only
            if not len(digests) or not len(idx):
                continue
            w = want[idx]
            pos = np.minimum(np.searchsorted(digests, w), len(digests) - 1)
            hit = np.asarray(digests[pos]) == w
            twin = hit & (pos + 1 < len(digests)) & (texts is not None)
            twin[twin] = np.asarray(digests[pos[twin] + 1]) == w[twin]  # a digest collision in this shard
            for i in np.nonzero(twin)[0]:
                pos[i] = self._resolve(s, int(pos[i]), texts[idx[i]])
                hit[i] = pos[i] >= 0
            found = idx[hit]
            if (shard[found] >= 0).any():
                i = int(found[shard[found] >= 0][0])
                what = f"text {texts[i][:80]!r}" if texts is not None else f"digest {int(want[i])}"
                raise ValueError(f"{self.paths[s]}: {what} is in two shards (shards from different runs?)")
            shard[found], row[found] = s, pos[hit]
        return shard, row

    def __contains__(self, text: str) -> bool:
        return bool(self.locate([text])[0][0] >= 0)

    def vectors(self, texts: list[str], chunk: int = 65536) -> np.ndarray:
        """The rows of ``texts`` as float32 (a KeyError names a text in no shard)."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), chunk):
            part = texts[start : start + chunk]
            shard_of, rows_all = self.locate(part)
            if (shard_of < 0).any():
                missing = part[int(np.nonzero(shard_of < 0)[0][0])]
                raise KeyError(f"text not in the embedding shards (stale shards?): {missing[:200]!r}")
            self._gather(out[start : start + len(part)], shard_of, rows_all)
        return out

    def vectors_of_digests(self, digests: np.ndarray, dtype=np.float32) -> np.ndarray:
        """The rows of texts given by their digests (:meth:`locate_digests`), as ``dtype`` (``self.dtype``: as
        stored, half the memory of float32 for float16 shards)."""
        shard_of, rows = self.locate_digests(np.asarray(digests, dtype=np.uint64))
        if (shard_of < 0).any():
            raise KeyError(f"digest {int(digests[int(np.nonzero(shard_of < 0)[0][0])])} in no embedding shard")
        out = np.empty((len(digests), self.dim), dtype=dtype)
        self._gather(out, shard_of, rows)
        return out

    def _gather(self, out: np.ndarray, shard_of: np.ndarray, rows_all: np.ndarray) -> None:
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            rows = rows_all[sel]
            order = np.argsort(rows)  # ascending rows: sequential reads of the memory map
            out[sel[order]] = self.shards[s][rows[order]]
            release_pages(self.shards[s])  # copied out: the pages read leave this process, shard by shard
        release_pages(*self.digests)


def _run(args: argparse.Namespace) -> None:
    instructions = options.from_args(MineConfig, args)
    if args.step == "scatter":
        if len(args.input) != 1 or not args.out or args.num_shards is None:
            raise SystemExit("kalm embed --step scatter: one --input part, --num-shards and --out")
        scatter_texts(
            args.input[0],
            json.loads(args.mine_tasks),
            args.out,
            args.num_shards,
            instructions.query_instruction,
            instructions.passage_instruction,
        )
        return
    missing = [
        f"--{n.replace('_', '-')}" for n in ("model", "shard", "num_shards", "out_dir") if getattr(args, n) is None
    ]
    if missing:
        raise SystemExit(f"kalm embed: {', '.join(missing)} required")
    c = options.from_args(EmbedConfig, args, json.loads(args.options) if args.options else None)
    embed_shard(
        args.input,
        json.loads(args.mine_tasks),
        args.model,
        args.shard,
        args.num_shards,
        args.out_dir,
        c.token_budget,
        c.batch_size,
        args.max_seq_length,
        c.dtype,
        c.precision,
        instructions.query_instruction,
        instructions.passage_instruction,
        args.threads,
        args.pooling,
    )


INSTRUCTION_OPTIONS = ("query_instruction", "passage_instruction")  # kalm embed's, from the mine section


def add_instruction_args(p) -> None:
    """The instruction options of MineConfig (kalm embed and kalm mine must format texts the same way)."""
    skip = tuple(f.name for f in dataclasses.fields(MineConfig) if f.name not in INSTRUCTION_OPTIONS)
    options.add_arguments(p, MineConfig, skip=skip)


def register(sub) -> None:
    p = sub.add_parser("embed", help="encode one shard of the texts to mine")
    p.add_argument(
        "--step",
        choices=["encode", "scatter"],
        default="encode",
        help=f"encode: embed shard --shard of the texts of --input; scatter: one part's texts into --out, one "
        f"{TEXTS_SUFFIX} file of --num-shards partitions (the workflow's embed jobs read those)",
    )
    p.add_argument(
        "--input",
        required=True,
        nargs="+",
        help=f"the fine-tuning records (the stage's .parquet shards, or .jsonl), streamed; or {TEXTS_SUFFIX} "
        "files of --step scatter for this shard",
    )
    p.add_argument("--mine-tasks", required=True, help='JSON {"task": symmetric_bool}')
    p.add_argument("--model")
    p.add_argument("--shard", type=int)
    p.add_argument("--num-shards", type=int)
    p.add_argument("--out-dir")
    p.add_argument("--out", help=f"--step scatter: the part's {TEXTS_SUFFIX} file")
    p.add_argument("--max-seq-length", type=int)
    p.add_argument("--options", help="the config's embed section as JSON (EmbedConfig's keys); flags win")
    options.add_arguments(p, EmbedConfig)
    p.add_argument("--threads", type=int)
    add_instruction_args(p)
    add_pooling_argument(p)
    p.set_defaults(func=_run)
