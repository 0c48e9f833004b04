"""Public corpora as the DAG's first step: a data task's ``source``, fetched and converted file by file.

A data task names a ``path`` (files the user has) or a ``source`` (issue 18)::

    source:
      hf: HIT-TMG/KaLM-embedding-pretrain-data     # a dataset repository on the hub ...
      revision: e3ec86c81294deae4c025b502e39b89d522adf5a  # ... pinned to a commit
      # local: mirror/KaLM-embedding-pretrain-data # or a folder of the same layout (offline sites, tests)
      files: [paq/train-00000-of-00001.parquet]    # paths in the repository (a glob for a local folder)
      columns: {query: query, pos: pos, neg: neg}  # KaLM field <- the file's column (neg optional)
      license: mit

One ``fetch`` job per file (:func:`fetch`): the file is downloaded with ``huggingface_hub.hf_hub_download``
(revision pinned, cached, resumed after a kill) or taken from the local folder, then converted to the
project's input format (Parquet with ``query``, ``pos``, ``neg``) row group by row group (JSON Lines, plain
or gzipped: a batch of lines at a time), so a 12 GB file is never read whole; the output is written atomically. A row whose query or positive is missing or of the
wrong type is dropped and counted (``in = kept + dropped by reason``, the stats JSON, with the source, its
revision, file and licence); a mapped column missing from the file is an error naming the file, the
column and the columns it has. Offline without a local copy: an error naming the source and how to
mirror it. The file list is part of the config, not read from the hub, so the DAG (and a dry run on a
fresh clone) knows every job without the network.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from kalm.io import StageStats, atomic_path, write_json

log = logging.getLogger(__name__)

FIELDS = ("query", "pos", "neg")  # the KaLM record fields a source maps; query and pos required
SUFFIX = ".parquet"


class SourceError(ValueError):
    """A source spec or file that cannot be fetched or converted; the message names what and where."""


def check_spec(spec: dict, where: str) -> dict:
    """``spec`` with its rules checked: ``hf`` (with a ``revision``) or ``local``, ``files``, ``columns``."""
    if bool(spec.get("hf")) == bool(spec.get("local")):
        raise SourceError(f"{where}: a source names exactly one of hf (a hub dataset) or local (a folder)")
    if spec.get("hf") and not spec.get("revision"):
        raise SourceError(f"{where}: source hf {spec['hf']!r} needs a revision (a commit: the data must not move)")
    cols = spec.get("columns") or {}
    missing = [f for f in ("query", "pos") if f not in cols]
    if missing or set(cols) - set(FIELDS):
        raise SourceError(f"{where}: source.columns maps {list(FIELDS)} (query and pos required), got {sorted(cols)}")
    if not spec.get("files"):
        raise SourceError(f"{where}: source.files lists the files to fetch (paths in the repository)")
    return spec


def source_files(spec: dict, where: str = "source") -> list[str]:
    """The repository paths of a source, in order: the listed ones; for a local folder, globs expanded there."""
    check_spec(spec, where)
    files = [spec["files"]] if isinstance(spec["files"], str) else list(spec["files"])
    if spec.get("hf"):
        bad = [f for f in files if any(c in f for c in "*?[")]
        if bad:
            raise SourceError(f"{where}: hub sources list their files (no globs: {bad}); the DAG is built offline")
        return files
    root = Path(spec["local"])
    out: list[str] = []
    for pattern in files:
        if any(c in pattern for c in "*?["):
            found = sorted(
                str(p.relative_to(root)) for p in root.rglob("*") if fnmatch.fnmatch(str(p.relative_to(root)), pattern)
            )
            if not found:
                raise SourceError(f"{where}: no file of {root} matches {pattern!r}")
            out += found
        else:
            out.append(pattern)
    return out


def output_name(repo_path: str) -> str:
    """The fetched file's name: the repository path with ``/`` as ``__`` (``paq__train-00000-of-00001.parquet``)."""
    name = repo_path.replace("/", "__")
    return name if name.endswith(SUFFIX) else name + SUFFIX


def mirror_hint(spec: dict, repo_path: str) -> str:
    return (
        f"mirror it with `huggingface-cli download {spec['hf']} {repo_path} --repo-type dataset --revision "
        f"{spec['revision']} --local-dir <folder>` and set the task's source.local: <folder> (same layout)"
    )


def resolve_file(spec: dict, repo_path: str) -> Path:
    """The local file of ``repo_path``: in the local folder, or downloaded (cached, resumable) from the hub."""
    if spec.get("local"):
        path = Path(spec["local"]) / repo_path
        if not path.is_file():
            raise SourceError(f"source local {spec['local']}: no file {repo_path}")
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.constants import HF_HUB_OFFLINE
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(
            hf_hub_download(
                spec["hf"],
                repo_path,
                repo_type="dataset",
                revision=spec["revision"],
                local_files_only=bool(HF_HUB_OFFLINE),
            )
        )
    except LocalEntryNotFoundError:
        raise SourceError(
            f"source hf {spec['hf']}@{spec['revision']}: {repo_path} is not in the local cache and the hub cannot "
            f"be reached (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}); {mirror_hint(spec, repo_path)}"
        ) from None


def _texts(value: Any) -> list[str] | None:
    """A positive / negative column's value as a list of non-empty strings (a string is one text); None if
    it is of another type."""
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return [v for v in value if v.strip()]
    return None


def _parquet_batches(path: Path, columns: dict[str, str], fields: list[str]):
    """(total rows, batches of {field: values}): one Parquet row group at a time."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    for field, col in columns.items():
        if col not in names:
            raise SourceError(f"{path}: column {col!r} (source.columns.{field}) is not in the file; it has {names}")

    def batches():
        for rg in range(pf.num_row_groups):
            table = pf.read_row_group(rg, columns=[columns[f] for f in fields])
            yield {f: table.column(columns[f]).to_pylist() for f in fields}

    return pf.metadata.num_rows, batches()


MALFORMED_JSON = "malformed_json"


def _jsonl_batches(path: Path, columns: dict[str, str], fields: list[str], stats: StageStats, batch_size: int):
    """(total rows or None, batches of {field: values}) of a JSON Lines file (``.jsonl``, or ``.jsonl.gz``),
    streamed ``batch_size`` lines at a time. A line that is not a JSON object is dropped (``malformed_json``,
    the first ones logged with their line number); the first object without a mapped query or pos column is
    an error naming the file, the line and the keys it has (a wrong mapping, not a bad row)."""
    import gzip

    import orjson

    checked = False

    def batches():
        nonlocal checked
        opener = gzip.open if path.name.endswith(".gz") else open
        chunk: dict[str, list] = {f: [] for f in fields}
        with opener(path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = orjson.loads(line)
                except orjson.JSONDecodeError:
                    rec = None
                if not isinstance(rec, dict):
                    stats.seen()
                    stats.drop(MALFORMED_JSON)
                    if stats.dropped.get(MALFORMED_JSON, 0) <= 5:
                        log.warning("%s:%d: not a JSON object, dropped", path, line_no)
                    continue
                if not checked:
                    for field in ("query", "pos"):
                        if columns[field] not in rec:
                            raise SourceError(
                                f"{path}:{line_no}: column {columns[field]!r} (source.columns.{field}) is not in the "
                                f"record; it has {sorted(rec)}"
                            )
                    checked = True
                for field in fields:
                    chunk[field].append(rec.get(columns[field]))
                if len(chunk["query"]) == batch_size:
                    yield chunk
                    chunk = {f: [] for f in fields}
        if chunk["query"]:
            yield chunk

    return None, batches()


SOURCE_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz")


def convert(path: Path, columns: dict[str, str], out: str | Path, stats: StageStats, batch_size: int = 8192) -> None:
    """Stream ``path`` (Parquet by row group, JSON Lines by ``batch_size`` lines) into ``out`` with the KaLM
    fields, counting what is dropped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [f for f in FIELDS if f in columns]
    if path.name.endswith(".parquet"):
        total, batches = _parquet_batches(path, columns, fields)
    else:
        total, batches = _jsonl_batches(path, columns, fields, stats, batch_size)
    schema = pa.schema(
        [("query", pa.string()), ("pos", pa.list_(pa.string()))]
        + ([("neg", pa.list_(pa.string()))] if "neg" in fields else [])
    )
    t0, done, n_batch = time.time(), 0, 0
    with atomic_path(out) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for rows in batches:
                kept: dict[str, list] = {f: [] for f in fields}
                n = len(rows["query"])
                for i in range(n):
                    stats.seen()
                    query = rows["query"][i]
                    if not isinstance(query, str | type(None)):
                        stats.drop("malformed_query")
                        continue
                    if not query or not query.strip():
                        stats.drop("missing_query")
                        continue
                    pos = _texts(rows["pos"][i]) if rows["pos"][i] is not None else []
                    if pos is None:
                        stats.drop("malformed_pos")
                        continue
                    if not pos:
                        stats.drop("missing_pos")
                        continue
                    neg = []
                    if "neg" in fields and rows["neg"][i] is not None:
                        neg = _texts(rows["neg"][i])
                        if neg is None:
                            stats.drop("malformed_neg")
                            continue
                    kept["query"].append(query)
                    kept["pos"].append(pos)
                    if "neg" in fields:
                        kept["neg"].append(neg)
                    stats.keep()
                writer.write_table(pa.table(kept, schema=schema))
                done, n_batch = done + n, n_batch + 1
                rate = done / max(time.time() - t0, 1e-9)
                eta = f", ETA {(total - done) / rate:.0f} s" if total and rate else ""
                log.info("%s: batch %d, %d rows (%.0f rows/s%s)", path.name, n_batch, done, rate, eta)
    stats.check()


def fetch(spec: dict, repo_path: str, out: str, stats_path: str | None = None, task: str | None = None) -> dict:
    """``kalm fetch``: one source file, fetched and converted to ``out``; returns the stats."""
    check_spec(spec, f"task {task}" if task else "source")
    if not repo_path.endswith(SOURCE_SUFFIXES):
        raise SourceError(f"{repo_path}: a source file is Parquet or JSON Lines ({', '.join(SOURCE_SUFFIXES)})")
    where = {"hf": spec["hf"], "revision": spec["revision"]} if spec.get("hf") else {"local": spec["local"]}
    stats = StageStats("fetch", task=task, source={**where, "file": repo_path, "license": spec.get("license")})
    path = resolve_file(spec, repo_path)
    convert(path, spec["columns"], out, stats)
    result = stats.as_dict()
    if stats_path:
        write_json(stats_path, result)
    log.info("%s: %d rows in, %d kept, dropped %s", repo_path, result["in"], result["kept"], result["dropped"])
    return result


def _run(args: argparse.Namespace) -> int:
    try:
        fetch(json.loads(args.source), args.file, args.out, args.stats, args.task)
    except SourceError as e:
        raise SystemExit(f"kalm fetch: {e}") from None
    return 0


def register(sub) -> None:
    p = sub.add_parser("fetch", help="download one file of a data source and convert it to the input format")
    p.add_argument("--source", required=True, help="the task's source spec as JSON (hf + revision, or local)")
    p.add_argument("--file", required=True, help="the file's path in the repository")
    p.add_argument("--out", required=True, help="the converted Parquet file")
    p.add_argument("--stats", help="stats JSON: in, kept, dropped by reason, the source, revision and licence")
    p.add_argument("--task", help="the data task (for messages and the stats)")
    p.set_defaults(func=_run)
