"""Drop training records that leak evaluation data.

A record is contaminated when its query or any positive

- equals, after normalisation (``kalm.text.dedup_key``), any text of a configured evaluation
  task (dropped as ``overlaps_eval``), or
- is a near-duplicate of one (``near_overlaps_eval``, with ``near=True``): the Jaccard similarity of
  their k-character shingle sets is >= ``threshold``. Candidates come from the same MinHash/LSH
  machinery as near-dedup (``kalm.data.minhash``); each candidate is then checked with the exact
  Jaccard similarity of the two texts, so a drop is never a MinHash estimation error.

Why MinHash/LSH on character shingles rather than exact n-gram overlap (GPT-3 style 13-grams):
word n-grams need a Chinese word segmenter, and a fixed n either misses short evaluation texts
(queries are shorter than 13 words) or, when small, flags any shared phrase of a templated corpus.
Jaccard on character shingles treats both languages alike and scores a copy with a word changed
as similar in proportion to its length. What it does not catch, an evaluation text embedded in a
much longer training text (containment, low Jaccard), is caught exactly by ``contain_min_chars``:
a query or positive that contains a whole evaluation text of at least that many characters is
dropped as ``contains_eval`` (``kalm.data.containment``). Not caught: an evaluation text that appears
inside a training text only in part, or with edits.

Evaluation texts: queries and corpus of retrieval tasks, both sentences of STS / pair tasks, texts
of classification tasks, read from local task folders; MTEB tasks without a folder are loaded
with mteb from their local mirror (``eval.mirror``, as ``kalm evaluate`` does) or the offline HF
cache, and otherwise skipped with a logged note and ``"skipped"`` in the report. The report lists, per evaluation task, how many
training records overlapped (exactly / near) and a few examples.

Sharded (the workflow): the evaluation texts are gathered and indexed once, ``--step index``
(:class:`EvalIndex`: the normalised texts, their exact-match hashes, the containment anchors and the
MinHash/LSH band index, saved to a folder); every training shard is then checked against it in its
own job, ``--step apply``, which memory-maps the folder (a job's memory is one batch of records plus
the pages of the index it touches, whatever the corpus size); ``--step merge`` adds up the shards'
stats and reports. A record's fate depends on the record alone, so the kept records are the same
whatever the sharding; the report's examples are the ``N_EXAMPLES`` overlapping records with the
smallest record ids (input order), per evaluation task, so the merged report is the same too
(tests/test_sharded_stages.py). The default ``--step all`` does the three in one process.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from kalm import options
from kalm.data.config import DecontaminateConfig
from kalm.data.dedup import sorted_unique
from kalm.data.shards import record_writer
from kalm.io import StageStats, atomic_path, merge_stats, read_json, read_jsonl, write_json
from kalm.text import dedup_key

log = logging.getLogger(__name__)

# Fields that hold evaluation texts in local task files (see kalm.evaluation.local_tasks).
EVAL_TEXT_FIELDS = ("text", "sentence1", "sentence2", "query", "positive", "negative")
N_EXAMPLES = 5
BATCH = 4096


def _collect(rec: dict, keys: set[str]) -> None:
    for field in EVAL_TEXT_FIELDS:
        value = rec.get(field)
        values = value if isinstance(value, list) else [value]
        keys.update(dedup_key(v) for v in values if isinstance(v, str) and v.strip())


def eval_texts(task_dir: str) -> set[str]:
    """Normalised texts of one local evaluation task folder (every .jsonl file in it)."""
    keys: set[str] = set()
    files = sorted(Path(task_dir).glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"evaluation task folder {task_dir} has no .jsonl files")
    for f in files:
        for rec in read_jsonl(f):
            _collect(rec, keys)
    return keys


def _walk(obj, keys: set[str], depth: int = 0) -> None:
    """Collect the texts of a loaded mteb task's data (dicts of splits of datasets or lists)."""
    if depth > 6 or obj is None:
        return
    if isinstance(obj, dict):
        if any(f in obj for f in EVAL_TEXT_FIELDS) and not any(isinstance(v, dict) for v in obj.values()):
            _collect(obj, keys)
            return
        for value in obj.values():
            _walk(value, keys, depth + 1)
        return
    column_names = getattr(obj, "column_names", None)
    if column_names is not None:  # a datasets.Dataset
        for field in column_names:
            if field in EVAL_TEXT_FIELDS or field in ("title", "sentences"):
                for value in obj[field]:
                    values = value if isinstance(value, list) else [value]
                    keys.update(dedup_key(v) for v in values if isinstance(v, str) and v.strip())
        return
    if isinstance(obj, (list, tuple)):
        for value in obj:
            _walk(value, keys, depth + 1)


def mteb_eval_texts(spec: dict | str) -> tuple[set[str] | None, str]:
    """Texts of a registered MTEB task, or (None, why it was skipped).

    ``spec`` is the task spec ``kalm evaluate`` gets (name, subsets, splits, ``mirror_root`` or
    ``mirror``): the data comes from the same place as the evaluation's, the task's local mirror
    when there is one, else the offline Hugging Face cache. A spec mistake (unknown task or
    benchmark, a subset the task lacks) stops the stage; data that cannot be loaded is a skip.
    """
    from kalm.evaluation.evaluate import TaskSpecError, load_task_data, resolve_task
    from kalm.evaluation.mteb_mirror import dataset_tasks

    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    try:
        task = resolve_task(spec)
        load_task_data(task, spec)
    except TaskSpecError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to load offline means: skip, with a note
        return None, f"no offline data ({type(e).__name__}: {str(e)[:1000]})"
    keys: set[str] = set()
    for sub in dataset_tasks(task):
        _walk(getattr(sub, "dataset", None), keys)
        for attr in ("corpus", "queries"):
            _walk(getattr(sub, attr, None), keys)
    if not keys:
        return None, "no texts found in the loaded task"
    return keys, ""


class NearIndex:
    """MinHash/LSH index of evaluation texts; ``query`` returns verified near matches.

    ``texts``: any sequence of strings; ``arrays``: the ``sigs``, ``order`` and ``sorted`` band
    arrays of :meth:`arrays` from an earlier build (memory-mapped by the shard jobs)."""

    def __init__(
        self,
        texts,
        owners,
        threshold: float,
        num_perm: int,
        shingle: int,
        seed: int = 1,
        arrays: dict[str, np.ndarray] | None = None,
    ):
        from kalm.data.minhash import band_keys, optimal_bands, signatures

        self.texts, self.owners = texts, owners
        self.threshold, self.num_perm, self.shingle, self.seed = threshold, num_perm, shingle, seed
        self.bands, self.rows = optimal_bands(threshold, num_perm)
        self._sig = lambda t: signatures(t, num_perm, shingle, seed)
        self._keys = lambda s: band_keys(s, self.bands, self.rows)
        if arrays is not None:
            self.sigs, self.order, self.sorted = arrays["sigs"], arrays["order"], arrays["sorted"]
        else:
            self.sigs = self._sig([texts[i] for i in range(len(texts))])
            keys = self._keys(self.sigs)
            self.order = np.stack([np.argsort(keys[:, b], kind="stable") for b in range(self.bands)])
            self.sorted = np.stack([keys[self.order[b], b] for b in range(self.bands)])
        self._shingles: dict[int, set[str]] = {}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"sigs": self.sigs, "order": self.order, "sorted": self.sorted}

    def _shingle_set(self, text: str) -> set[str]:
        k = self.shingle
        return {text[i : i + k] for i in range(max(len(text) - k + 1, 1))}

    def _eval_shingles(self, i: int) -> set[str]:
        if i not in self._shingles:
            self._shingles[i] = self._shingle_set(self.texts[i])
        return self._shingles[i]

    def query(self, texts: list[str]) -> list[list[tuple[int, float]]]:
        """For each text, [(eval text index, exact Jaccard)] of the eval texts with Jaccard >= threshold."""
        out: list[list[tuple[int, float]]] = [[] for _ in texts]
        n_eval = len(self.texts)
        if not texts or not n_eval:
            return out
        sigs = self._sig(texts)
        keys = self._keys(sigs)
        pairs = []
        for b in range(self.bands):
            lo = np.searchsorted(self.sorted[b], keys[:, b], side="left")
            hi = np.searchsorted(self.sorted[b], keys[:, b], side="right")
            cnt = hi - lo
            total = int(cnt.sum())
            if not total:
                continue
            ti = np.repeat(np.arange(len(texts)), cnt)
            within = np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt)
            ei = np.asarray(self.order[b])[np.repeat(lo, cnt) + within]
            pairs.append(ti.astype(np.int64) * n_eval + ei)
        if not pairs:
            return out
        flat = sorted_unique(np.concatenate(pairs))
        ti, ei = flat // n_eval, flat % n_eval
        est = (sigs[ti] == np.asarray(self.sigs[ei])).mean(axis=1)
        keep = est >= self.threshold - 0.15  # generous: the exact check below decides
        for t, e in zip(ti[keep].tolist(), ei[keep].tolist()):
            a, b = self._shingle_set(texts[t]), self._eval_shingles(e)
            jac = len(a & b) / len(a | b)
            if jac >= self.threshold:
                out[t].append((e, jac))
        return out


# ---- the evaluation index: built once, saved, memory-mapped by every shard job --------------------

INDEX_FORMAT = 1
# stats extras that are settings of the run, the same in every shard: copied, never summed, by the merge
SETTINGS = ("threshold", "num_perm", "shingle", "bands", "rows", "contain_min_chars", "eval_texts_long_enough")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate (JSON allows one) is a code point too


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(_encode(key), digest_size=8).digest(), "little")


class _Texts:
    """The evaluation texts as one UTF-8 blob and offsets (memory-mapped): ``texts[i]`` decodes one."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return bytes(self.blob[self.offsets[i] : self.offsets[i + 1]]).decode("utf-8", "surrogatepass")


class _Owners:
    """``owners[i]``: the evaluation task of text ``i`` (names and a code per text)."""

    def __init__(self, names: list[str], codes: np.ndarray):
        self.names, self.codes = names, codes

    def __getitem__(self, i: int) -> str:
        return self.names[int(self.codes[i])]


class EvalIndex:
    """Everything decontamination checks a training record against: the normalised evaluation texts
    (sorted per task, tasks sorted: index ``i`` is the same in every job), their 64-bit hashes for the
    exact check (a hash hit is confirmed by comparing the texts), and the containment and near-copy
    indexes when enabled. :meth:`build` gathers it (reading local task folders and MTEB data),
    :meth:`save` writes it to a folder, :meth:`load` memory-maps one."""

    def __init__(
        self,
        names: list[str],
        report: dict,
        stats_extra: dict,
        settings: dict,
        texts,
        codes: np.ndarray,
        exact_hash: np.ndarray,
        exact_ids: np.ndarray,
        near: NearIndex | None = None,
        contain=None,
    ):
        self.names, self.report, self.stats_extra, self.settings = names, report, stats_extra, settings
        self.texts, self.codes = texts, codes
        self.owners = _Owners(names, codes)
        self.exact_hash, self.exact_ids = exact_hash, exact_ids
        self.near, self.contain = near, contain

    @classmethod
    def build(
        cls,
        eval_tasks: dict[str, str],
        mteb_tasks: list[str | dict] | None = None,
        near: bool = False,
        threshold: float = 0.8,
        num_perm: int = 128,
        shingle: int = 5,
        contain_min_chars: int = 0,
    ) -> EvalIndex:
        """``eval_tasks`` maps task name -> local folder; ``mteb_tasks`` are registered MTEB tasks (names
        or ``kalm evaluate`` task specs, with their mirror) loaded from their mirror or the offline cache
        when available (skipped with a note otherwise)."""
        index = {name: eval_texts(path) for name, path in sorted(eval_tasks.items())}
        report: dict[str, dict] = {}
        specs = {s["name"]: s for s in ({"name": t} if isinstance(t, str) else t for t in mteb_tasks or ())}
        for name in sorted(set(specs) - set(index)):
            keys, why = mteb_eval_texts(specs[name])
            if keys is None:
                log.warning("decontaminate: skipping MTEB task %s: %s", name, why)
                report[name] = {"skipped": why}
            else:
                index[name] = keys
        index = dict(sorted(index.items()))
        names = list(index)
        extra = {
            "eval_tasks": names,
            "near": near,
            "skipped_eval_tasks": sorted(n for n, r in report.items() if "skipped" in r),
        }
        for name, keys in index.items():
            report[name] = {"texts": len(keys), "overlapping_records": 0, "examples": []}
            if near or contain_min_chars:
                report[name].update(exact_records=0, near_records=0, contained_records=0)
        texts: list[str] = []
        codes: list[int] = []
        for c, keys in enumerate(index.values()):
            texts.extend(sorted(keys))
            codes.extend([c] * len(keys))
        del index
        codes_arr = np.asarray(codes, dtype=np.int32)
        hashes = np.fromiter((_key_hash(t) for t in texts), dtype=np.uint64, count=len(texts))
        order = np.argsort(hashes, kind="stable")
        owners = _Owners(names, codes_arr)
        contain_index = near_index = None
        if contain_min_chars:
            from kalm.data.containment import ContainmentIndex

            contain_index = ContainmentIndex(texts, owners, contain_min_chars)
            extra.update(contain_min_chars=contain_min_chars, eval_texts_long_enough=len(contain_index))
        if near:
            near_index = NearIndex(texts, owners, threshold, num_perm, shingle)
            extra.update(
                threshold=threshold, num_perm=num_perm, shingle=shingle, bands=near_index.bands, rows=near_index.rows
            )
        settings = {
            "near": near,
            "threshold": threshold,
            "num_perm": num_perm,
            "shingle": shingle,
            "contain_min_chars": contain_min_chars,
        }
        log.info(
            "evaluation index: %d texts of %d tasks (%d skipped)",
            len(texts),
            len(names),
            len(extra["skipped_eval_tasks"]),
        )
        return cls(names, report, extra, settings, texts, codes_arr, hashes[order], order, near_index, contain_index)

    def save(self, folder: str | Path) -> None:
        """Write the index to ``folder`` (atomically: a finished folder is a complete index)."""
        with atomic_path(folder, is_dir=True) as tmp:
            offsets = np.zeros(len(self.texts) + 1, dtype=np.int64)
            with open(tmp / "texts.bin", "wb") as f:
                for i in range(len(self.texts)):
                    b = _encode(self.texts[i])
                    f.write(b)
                    offsets[i + 1] = offsets[i] + len(b)
            arrays = {
                "text_offsets": offsets,
                "owners": self.codes,
                "exact_hash": self.exact_hash,
                "exact_ids": self.exact_ids,
            }
            if self.near is not None:
                arrays.update({f"near_{k}": v for k, v in self.near.arrays().items()})
            if self.contain is not None:
                arrays.update({f"contain_{k}": v for k, v in self.contain.arrays().items()})
            for name, arr in arrays.items():
                np.save(tmp / f"{name}.npy", np.asarray(arr))
            write_json(
                tmp / "meta.json",
                {
                    "format": INDEX_FORMAT,
                    "names": self.names,
                    "report": self.report,
                    "stats": self.stats_extra,
                    "settings": self.settings,
                    "texts": len(self.texts),
                },
            )

    @classmethod
    def load(cls, folder: str | Path) -> EvalIndex:
        """Memory-map an index written by :meth:`save`."""
        folder = Path(folder)
        meta = read_json(folder / "meta.json")
        if meta.get("format") != INDEX_FORMAT:
            raise ValueError(f"{folder}: evaluation index format {meta.get('format')}, this kalm reads {INDEX_FORMAT}")

        def arr(name):
            return np.load(folder / f"{name}.npy", mmap_mode="r")

        offsets = arr("text_offsets")
        blob = np.memmap(folder / "texts.bin", dtype=np.uint8, mode="r") if offsets[-1] else np.zeros(0, np.uint8)
        texts = _Texts(blob, offsets)
        names, codes, st = meta["names"], arr("owners"), meta["settings"]
        owners = _Owners(names, codes)
        near = contain = None
        if st["near"]:
            near = NearIndex(
                texts,
                owners,
                st["threshold"],
                st["num_perm"],
                st["shingle"],
                arrays={k: arr(f"near_{k}") for k in ("sigs", "order", "sorted")},
            )
        if st["contain_min_chars"]:
            from kalm.data.containment import ContainmentIndex

            contain = ContainmentIndex(
                texts,
                owners,
                st["contain_min_chars"],
                arrays={k: arr(f"contain_{k}") for k in ("anchors", "anchor_ids")},
            )
        return cls(
            names, meta["report"], meta["stats"], st, texts, codes, arr("exact_hash"), arr("exact_ids"), near, contain
        )

    def exact_owners(self, keys: list[str]) -> list[set[str]]:
        """For each normalised text, the evaluation tasks that have exactly that text."""
        out: list[set[str]] = [set() for _ in keys]
        if not keys or not len(self.exact_hash):
            return out
        h = np.fromiter((_key_hash(k) for k in keys), dtype=np.uint64, count=len(keys))
        lo = np.searchsorted(self.exact_hash, h, side="left")
        hi = np.searchsorted(self.exact_hash, h, side="right")
        for i in np.flatnonzero(hi > lo).tolist():
            for e in np.asarray(self.exact_ids[lo[i] : hi[i]]).tolist():
                if self.texts[e] == keys[i]:  # a hash collision is never a hit
                    out[i].add(self.owners[e])
        return out


# ---- checking training records ---------------------------------------------------------------------


def _example_key(example: dict, position: int):
    return (example["id"], 0) if "id" in example else (float("inf"), position)


def apply_index(
    idx: EvalIndex, inputs: str | list[str], out_path: str, stats_path: str, report_path: str, batch: int = BATCH
) -> StageStats:
    """Drop the records of ``inputs`` (Parquet shards or JSON Lines, streamed ``batch`` records at a time)
    that overlap the evaluation index; write the kept records (Parquet when ``out_path`` ends with
    ``.parquet``), the stats and this shard's contamination report."""
    from kalm.data.shards import iter_records

    paths = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    stats = StageStats("decontaminate", **copy.deepcopy(idx.stats_extra))
    report = copy.deepcopy(idx.report)
    chosen: dict[str, list] = {name: [] for name in idx.names}  # (order key, example) of the smallest ids
    position = 0
    with record_writer(out_path) as out:
        it = iter_records(paths)
        while recs := list(itertools.islice(it, batch)):
            fields = [{"query": r["query"], **{f"pos[{i}]": p for i, p in enumerate(r["pos"])}} for r in recs]
            keyed = [{f: dedup_key(t) for f, t in fs.items()} for fs in fields]
            flat = [(i, f, k) for i, fs in enumerate(keyed) for f, k in fs.items()]
            exact: list[dict[str, set[str]]] = [{} for _ in recs]
            for (i, field, _), owners in zip(flat, idx.exact_owners([k for _, _, k in flat])):
                if owners:
                    exact[i][field] = owners
            near_hits = _matches_by_field(idx.near, flat, len(recs))
            contained = _matches_by_field(idx.contain, flat, len(recs))
            for rec, fs, ex, nh, ct in zip(recs, keyed, exact, near_hits, contained):
                _decide(rec, position, fs, ex, nh, ct, idx, stats, report, chosen, out)
                position += 1
    for name, picked in chosen.items():
        report[name]["examples"] = [ex for _, ex in sorted(picked, key=lambda p: p[0])]
    write_json(report_path, report)
    stats.write(stats_path)
    log.info(
        "decontaminated %s: %d in, %d kept, dropped %s",
        ", ".join(map(str, paths)),
        stats.n_in,
        stats.kept,
        stats.dropped,
    )
    return stats


def decontaminate(
    inputs: str | list[str],
    eval_tasks: dict[str, str],
    out_path: str,
    stats_path: str,
    report_path: str,
    near: bool = False,
    threshold: float = 0.8,
    num_perm: int = 128,
    shingle: int = 5,
    mteb_tasks: list[str | dict] | None = None,
    contain_min_chars: int = 0,
) -> StageStats:
    """Build the evaluation index and check ``inputs`` against it in one call (``--step all``); see
    :meth:`EvalIndex.build` for the evaluation tasks. ``contain_min_chars`` > 0 also drops records
    containing a whole evaluation text of at least that many (normalised) characters. The index goes
    through a temporary folder, as in the sharded workflow, so both paths run the same code."""
    idx = EvalIndex.build(eval_tasks, mteb_tasks, near, threshold, num_perm, shingle, contain_min_chars)
    with tempfile.TemporaryDirectory(prefix="kalm-eval-index-") as d:
        idx.save(Path(d) / "index")
        del idx
        return apply_index(EvalIndex.load(Path(d) / "index"), inputs, out_path, stats_path, report_path)


def _matches_by_field(index, flat: list[tuple[int, str, str]], n_records: int) -> list[dict[str, list]]:
    """Per record of a batch, {field: matches} from one ``index.query`` over all (record, field, text)
    of the batch (NearIndex or ContainmentIndex; none: no matches)."""
    out: list[dict[str, list]] = [{} for _ in range(n_records)]
    if index is not None:
        for (i, field, _), matches in zip(flat, index.query([text for _, _, text in flat])):
            if matches:
                out[i][field] = matches
    return out


def _decide(rec, position, keyed, exact, near_hits, contained, idx: EvalIndex, stats, report, chosen, out) -> None:
    """Keep or drop one record; ``exact``: {field: eval tasks with that text}; near_hits/contained hold
    indices into the index's texts."""
    task = rec.get("task")
    stats.seen(task=task)
    hits = [(name, field) for name in idx.names for field in keyed if name in exact.get(field, ())]
    near_by_task: dict[str, list[dict]] = {}
    for field, matches in near_hits.items():
        for e, jac in matches:
            name = idx.owners[e]
            if (name, field) in hits:
                continue  # an exact hit of the same field and task is reported as exact
            near_by_task.setdefault(name, []).append(
                {"field": field, "jaccard": round(jac, 3), "eval_text": idx.texts[e]}
            )
    contained_by_task: dict[str, list[dict]] = {}
    for field, matches in contained.items():
        for e in matches:
            contained_by_task.setdefault(idx.owners[e], []).append({"field": field, "eval_text": idx.texts[e]})
    if not hits and not near_by_task and not contained_by_task:
        out.write(rec)
        stats.keep(task=task)
        return
    stats.drop("overlaps_eval" if hits else "near_overlaps_eval" if near_by_task else "contains_eval", task=task)
    for name in sorted({h[0] for h in hits} | set(near_by_task) | set(contained_by_task)):
        entry = report[name]
        entry["overlapping_records"] += 1
        exact_fields = [f for n, f in hits if n == name]
        if "exact_records" in entry:
            kind = "exact_records" if exact_fields else "near_records" if name in near_by_task else "contained_records"
            entry[kind] += 1
        example = {"train_task": task, "fields": exact_fields, "query": rec["query"]}
        if name in near_by_task:
            example["near"] = near_by_task[name][:3]
        if name in contained_by_task:
            example["contains"] = contained_by_task[name][:3]
        if "id" in rec:
            example["id"] = rec["id"]
        picked = chosen[name]
        picked.append((_example_key(example, position), example))
        if len(picked) > N_EXAMPLES:  # keep the N_EXAMPLES smallest ids (input order): the same whatever the shards
            picked.sort(key=lambda p: p[0])
            picked.pop()


def merge_reports(paths: list[str]) -> dict:
    """The contamination reports of a stage's shards as one: counts summed, the examples of smallest id."""
    parts = [read_json(p) for p in paths]
    if not parts:
        raise ValueError("merge_reports: no shard reports")
    merged: dict[str, dict] = {}
    for name, first in parts[0].items():
        if any(set(p.get(name, {})) != set(first) or p[name].get("texts") != first.get("texts") for p in parts):
            raise ValueError(f"merge_reports: the shards disagree on evaluation task {name!r}: not one index's shards")
        if "skipped" in first:
            merged[name] = first
            continue
        entry = {k: (sum(p[name][k] for p in parts) if k.endswith("_records") else v) for k, v in first.items()}
        examples = [
            (_example_key(ex, (s, j)), ex) for s, p in enumerate(parts) for j, ex in enumerate(p[name]["examples"])
        ]
        entry["examples"] = [ex for _, ex in sorted(examples, key=lambda e: e[0])[:N_EXAMPLES]]
        merged[name] = entry
    return merged


def merge(stats_paths: list[str], report_paths: list[str], stats_out: str, report_out: str) -> dict:
    """Gather of the shard jobs: the stage's stats (counts summed, settings copied) and report."""
    report = merge_reports(report_paths)
    stats = merge_stats(stats_paths, settings=SETTINGS)
    write_json(report_out, report)
    write_json(stats_out, stats)
    return stats


def _config(args: argparse.Namespace) -> DecontaminateConfig:
    """DecontaminateConfig from ``--options`` (the config's data.decontaminate section) and the flags given."""
    return options.from_args(DecontaminateConfig, args, json.loads(args.options) if args.options else None)


def _index_from_args(args: argparse.Namespace) -> EvalIndex:
    c = _config(args)
    tasks = dict(spec.split("=", 1) for spec in args.eval_task)
    return EvalIndex.build(
        tasks,
        args.mteb_task + [json.loads(spec) for spec in args.mteb_task_json],
        near=c.near_dup,
        threshold=c.threshold,
        num_perm=c.num_perm,
        shingle=c.shingle,
        contain_min_chars=c.contain_min_chars,
    )


def _need(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if not getattr(args, n)]
    if missing:
        raise SystemExit(f"kalm decontaminate --step {args.step}: {', '.join(missing)} required")


def _run(args: argparse.Namespace) -> None:
    if args.step == "index":
        _need(args, "index_dir")
        _index_from_args(args).save(args.index_dir)
    elif args.step == "apply":
        _need(args, "index_dir", "input", "out", "stats", "report")
        apply_index(EvalIndex.load(args.index_dir), args.input, args.out, args.stats, args.report)
    elif args.step == "merge":
        _need(args, "part_stats", "part_reports", "stats", "report")
        if len(args.part_stats) != len(args.part_reports):
            raise SystemExit("kalm decontaminate --step merge: one --part-reports file per --part-stats file")
        merge(args.part_stats, args.part_reports, args.stats, args.report)
    else:
        _need(args, "input", "out", "stats", "report")
        c = _config(args)
        tasks = dict(spec.split("=", 1) for spec in args.eval_task)
        decontaminate(
            args.input,
            tasks,
            args.out,
            args.stats,
            args.report,
            near=c.near_dup,
            threshold=c.threshold,
            num_perm=c.num_perm,
            shingle=c.shingle,
            contain_min_chars=c.contain_min_chars,
            mteb_tasks=args.mteb_task + [json.loads(spec) for spec in args.mteb_task_json],
        )


def register(sub) -> None:
    p = sub.add_parser("decontaminate", help="drop training records that overlap evaluation texts")
    p.add_argument(
        "--step",
        choices=["all", "index", "apply", "merge"],
        default="all",
        help="all: index + check --input in one run; index: build the evaluation index into --index-dir "
        "(once); apply: check one shard against it; merge: add up the shards' --part-stats and "
        "--part-reports into --stats and --report",
    )
    p.add_argument("--input", nargs="+", help="training records (.parquet shards or .jsonl), streamed")
    p.add_argument("--index-dir", help="the evaluation index folder (--step index writes it, --step apply reads it)")
    p.add_argument("--eval-task", action="append", default=[], metavar="NAME=DIR", help="a local evaluation task")
    p.add_argument(
        "--mteb-task",
        action="append",
        default=[],
        metavar="NAME",
        help="a registered MTEB task, used when its data is in the offline cache",
    )
    p.add_argument(
        "--mteb-task-json",
        action="append",
        default=[],
        metavar="SPEC",
        help="a registered MTEB task as a `kalm evaluate` task spec (JSON: name, subsets, mirror_root, ...)",
    )
    p.add_argument(
        "--options", help="the config's data.decontaminate section as JSON (DecontaminateConfig's keys); flags win"
    )
    options.add_arguments(p, DecontaminateConfig)
    p.add_argument("--out", help="kept records (.parquet: a shard of kalm.data.shards.RECORD_SCHEMA; else JSON Lines)")
    p.add_argument("--stats")
    p.add_argument("--report")
    p.add_argument("--part-stats", nargs="+", help="--step merge: the shards' stats JSON")
    p.add_argument("--part-reports", nargs="+", help="--step merge: the shards' contamination reports, same order")
    p.set_defaults(func=_run)
