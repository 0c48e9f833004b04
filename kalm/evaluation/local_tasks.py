"""MTEB tasks built from local files, so evaluation needs no network.

One mteb task class is created per configured task (class name and ``metadata.name`` are the
configured task name); its data is read from a folder and validated line by line. Formats:

- ``Retrieval``: ``corpus.jsonl`` (``{"id", "text"}``, optional ``"title"``), ``queries.jsonl``
  (``{"id", "text"}``), ``qrels.tsv`` with header ``query-id<TAB>corpus-id<TAB>score`` (integer
  relevance). Queries without any qrels line are not evaluated (mteb scores only judged
  queries); their number is logged.
- ``STS``: ``test.jsonl`` with ``{"sentence1", "sentence2", "score"}``, scores in [0, 5]
  (``min_score``/``max_score`` in the task spec override the range).
- ``PairClassification``: ``test.jsonl`` with ``{"sentence1", "sentence2", "label"}``, label 0 or 1.
- ``Classification``: ``train.jsonl`` and ``test.jsonl`` with ``{"text", "label"}`` (label a
  string or an integer); mteb trains a logistic regression on few-shot samples of ``train``.
- ``Reranking``: the retrieval files plus ``top_ranked.jsonl`` with ``{"query-id", "corpus-ids":
  [...]}``, the candidate list of each query; every judged query must have one (a reranking task
  without candidates would be scored as full-corpus retrieval). Main score MAP@1000, as mteb's
  reranking tasks.
- ``Clustering``: ``test.jsonl`` with ``{"text", "label"}``; mteb's clustering evaluation (k-means
  with as many clusters as labels, V-measure) over ``n_experiments`` samples (default 10) of
  ``cluster_size`` texts drawn with replacement (default: as many as the task has, at most
  mteb's 16,384); every text is embedded (mteb's registered tasks embed a fraction of theirs).

Bad input raises :class:`LocalTaskError` naming the file, the line and the field.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from pathlib import Path
from typing import Any

from kalm.evaluation.task_types import LOCAL_TYPES, TASK_TYPES

logger = logging.getLogger(__name__)

LANGS: dict[str, list[str]] = {"zh": ["cmn-Hans"], "en": ["eng-Latn"]}

# Files each local task type reads, in the order they are hashed into the dataset revision (the registry's)
TASK_FILES: dict[str, list[str]] = {name: list(TASK_TYPES[name].local_files) for name in LOCAL_TYPES}
SUPPORTED_TYPES = LOCAL_TYPES


class LocalTaskError(ValueError):
    """A local task folder or one of its files is malformed."""


def eval_langs(lang: str) -> list[str]:
    """Map a config language ("zh", "en") to mteb eval_langs; full codes ("deu-Latn") pass through."""
    if lang in LANGS:
        return list(LANGS[lang])
    if "-" in lang and len(lang.split("-")[0]) == 3:
        return [lang]
    raise LocalTaskError(
        f"unsupported task language {lang!r}: use one of {sorted(LANGS)} or an ISO code like 'eng-Latn'"
    )


# --------------------------------------------------------------------------------------------
# Reading and validating files
# --------------------------------------------------------------------------------------------


def _require(path: Path) -> Path:
    if not path.is_file():
        raise LocalTaskError(f"{path}: file not found")
    return path


def _iter_jsonl(path: Path):
    """Yield (line number, record) for each non-blank line; malformed JSON or a non-object is an error."""
    with open(_require(path), encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise LocalTaskError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise LocalTaskError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


def _field(path: Path, lineno: int, rec: dict, name: str, kinds: tuple[type, ...], allow_empty: bool = False) -> Any:
    if name not in rec:
        raise LocalTaskError(f"{path}:{lineno}: field {name!r} is missing")
    value = rec[name]
    # bool is an int subclass; a boolean is never a valid id, score or label here
    if isinstance(value, bool) or not isinstance(value, kinds):
        want = " or ".join(k.__name__ for k in kinds)
        raise LocalTaskError(
            f"{path}:{lineno}: field {name!r} must be {want}, got {type(value).__name__} ({value!r:.60})"
        )
    if isinstance(value, str) and not allow_empty and not value.strip():
        raise LocalTaskError(f"{path}:{lineno}: field {name!r} is empty")
    return value


def _id(path: Path, lineno: int, rec: dict, seen: dict[str, int]) -> str:
    value = str(_field(path, lineno, rec, "id", (str, int)))
    if value in seen:
        raise LocalTaskError(f"{path}:{lineno}: field 'id' {value!r} is a duplicate of line {seen[value]}")
    seen[value] = lineno
    return value


def _number(path: Path, lineno: int, rec: dict, name: str, lo: float, hi: float) -> float:
    value = float(_field(path, lineno, rec, name, (int, float)))
    if not lo <= value <= hi:  # also rejects NaN
        raise LocalTaskError(f"{path}:{lineno}: field {name!r} = {value} is outside [{lo}, {hi}]")
    return value


def read_retrieval(folder: str | Path) -> tuple[list[dict], list[dict], dict[str, dict[str, int]]]:
    """Read and validate a retrieval folder; return (queries, corpus, relevant_docs)."""
    folder = Path(folder)
    corpus_path, queries_path, qrels_path = (folder / n for n in TASK_FILES["Retrieval"])

    corpus, seen = [], {}
    has_title = False
    for lineno, rec in _iter_jsonl(corpus_path):
        doc_id = _id(corpus_path, lineno, rec, seen)
        text = _field(corpus_path, lineno, rec, "text", (str,), allow_empty=True)
        title = ""
        if rec.get("title") is not None:
            title = _field(corpus_path, lineno, rec, "title", (str,), allow_empty=True)
            has_title = has_title or bool(title)
        if not text.strip() and not title.strip():
            raise LocalTaskError(f"{corpus_path}:{lineno}: field 'text' is empty (and there is no title)")
        corpus.append({"id": doc_id, "title": title, "text": text})
    if not corpus:
        raise LocalTaskError(f"{corpus_path}: no documents")
    if not has_title:
        corpus = [{"id": d["id"], "text": d["text"]} for d in corpus]

    queries, qseen = [], {}
    for lineno, rec in _iter_jsonl(queries_path):
        qid = _id(queries_path, lineno, rec, qseen)
        queries.append({"id": qid, "text": _field(queries_path, lineno, rec, "text", (str,))})

    relevant: dict[str, dict[str, int]] = {}
    with open(_require(qrels_path), encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n")
        if header.split("\t") != ["query-id", "corpus-id", "score"]:
            raise LocalTaskError(
                f"{qrels_path}:1: header must be 'query-id<TAB>corpus-id<TAB>score', got {header!r:.80}"
            )
        for lineno, line in enumerate(f, 2):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 3:
                raise LocalTaskError(
                    f"{qrels_path}:{lineno}: expected 3 tab-separated fields (query-id, corpus-id, score), got {len(parts)}"
                )
            qid, did, score = (p.strip() for p in parts)
            if qid not in qseen:
                raise LocalTaskError(f"{qrels_path}:{lineno}: field 'query-id' {qid!r} is not in {queries_path.name}")
            if did not in seen:
                raise LocalTaskError(f"{qrels_path}:{lineno}: field 'corpus-id' {did!r} is not in {corpus_path.name}")
            try:
                value = int(score)
            except ValueError:
                raise LocalTaskError(
                    f"{qrels_path}:{lineno}: field 'score' must be an integer, got {score!r}"
                ) from None
            if did in relevant.get(qid, {}):
                raise LocalTaskError(f"{qrels_path}:{lineno}: duplicate pair ({qid!r}, {did!r})")
            relevant.setdefault(qid, {})[did] = value
    if not relevant:
        raise LocalTaskError(f"{qrels_path}: no relevance judgements")

    judged = [q for q in queries if q["id"] in relevant]
    if len(judged) < len(queries):
        logger.info(
            "%s: %d of %d queries have no qrels and are not evaluated", folder, len(queries) - len(judged), len(queries)
        )
    return judged, corpus, relevant


def read_top_ranked(folder: str | Path, queries: list[dict], corpus: list[dict]) -> dict[str, list[str]]:
    """Read ``top_ranked.jsonl``: the candidate documents of each judged query (reranking)."""
    path = Path(folder) / "top_ranked.jsonl"
    query_ids = {q["id"] for q in queries}
    doc_ids = {d["id"] for d in corpus}
    top_ranked: dict[str, list[str]] = {}
    seen: dict[str, int] = {}
    for lineno, rec in _iter_jsonl(path):
        qid = str(_field(path, lineno, rec, "query-id", (str, int)))
        if qid in seen:
            raise LocalTaskError(f"{path}:{lineno}: field 'query-id' {qid!r} is a duplicate of line {seen[qid]}")
        seen[qid] = lineno
        cands = _field(path, lineno, rec, "corpus-ids", (list,))
        if not cands:
            raise LocalTaskError(f"{path}:{lineno}: field 'corpus-ids' is empty")
        ids = []
        for i, c in enumerate(cands):
            if isinstance(c, bool) or not isinstance(c, (str, int)) or str(c) not in doc_ids:
                raise LocalTaskError(
                    f"{path}:{lineno}: field 'corpus-ids[{i}]' {c!r} is not a document of corpus.jsonl"
                )
            ids.append(str(c))
        if qid in query_ids:  # candidates of unjudged queries are not evaluated (like their queries)
            top_ranked[qid] = ids
    missing = sorted(query_ids - set(top_ranked))
    if missing:
        raise LocalTaskError(
            f"{path}: {len(missing)} judged queries have no candidate list (first: {missing[0]!r}); a reranking "
            "task must give each its candidates, or it would be scored as retrieval over the whole corpus"
        )
    return top_ranked


def read_clustering(folder: str | Path) -> dict[str, list]:
    """Read ``test.jsonl`` of a clustering task as mteb's columns ``sentences`` and ``labels`` (strings)."""
    path = Path(folder) / "test.jsonl"
    cols: dict[str, list] = {"sentences": [], "labels": []}
    for lineno, rec in _iter_jsonl(path):
        cols["sentences"].append(_field(path, lineno, rec, "text", (str,)))
        # v-measure only compares the partition, so labels can be strings whatever their type in the file
        cols["labels"].append(str(_field(path, lineno, rec, "label", (str, int))))
    if len(set(cols["labels"])) < 2:
        raise LocalTaskError(f"{path}: need at least 2 distinct labels to cluster, got {len(set(cols['labels']))}")
    return cols


def read_sts(folder: str | Path, min_score: float = 0, max_score: float = 5) -> dict[str, list]:
    path = Path(folder) / "test.jsonl"
    cols: dict[str, list] = {"sentence1": [], "sentence2": [], "score": []}
    for lineno, rec in _iter_jsonl(path):
        cols["sentence1"].append(_field(path, lineno, rec, "sentence1", (str,)))
        cols["sentence2"].append(_field(path, lineno, rec, "sentence2", (str,)))
        cols["score"].append(_number(path, lineno, rec, "score", min_score, max_score))
    if len(cols["score"]) < 2:
        raise LocalTaskError(f"{path}: need at least 2 pairs to compute a correlation, got {len(cols['score'])}")
    return cols


def read_pair_classification(folder: str | Path) -> dict[str, list]:
    path = Path(folder) / "test.jsonl"
    cols: dict[str, list] = {"sentence1": [], "sentence2": [], "labels": []}
    for lineno, rec in _iter_jsonl(path):
        cols["sentence1"].append(_field(path, lineno, rec, "sentence1", (str,)))
        cols["sentence2"].append(_field(path, lineno, rec, "sentence2", (str,)))
        label = _field(path, lineno, rec, "label", (int,))
        if label not in (0, 1):
            raise LocalTaskError(f"{path}:{lineno}: field 'label' must be 0 or 1, got {label!r}")
        cols["labels"].append(label)
    if len(set(cols["labels"])) < 2:
        raise LocalTaskError(f"{path}: both labels 0 and 1 must occur")
    return cols


def read_classification(folder: str | Path) -> dict[str, dict[str, list]]:
    """Return {"train": {"text", "label"}, "test": {...}} with labels mapped to integers (sorted label names)."""
    raw: dict[str, tuple[list[str], list[Any]]] = {}
    for split in ("train", "test"):
        path = Path(folder) / f"{split}.jsonl"
        texts, labels = [], []
        for lineno, rec in _iter_jsonl(path):
            texts.append(_field(path, lineno, rec, "text", (str,)))
            labels.append(_field(path, lineno, rec, "label", (str, int)))
        if not texts:
            raise LocalTaskError(f"{path}: no examples")
        raw[split] = (texts, labels)
    train_labels = set(raw["train"][1])
    if len(train_labels) < 2:
        raise LocalTaskError(f"{Path(folder) / 'train.jsonl'}: need at least 2 distinct labels")
    unseen = set(raw["test"][1]) - train_labels
    if unseen:
        raise LocalTaskError(
            f"{Path(folder) / 'test.jsonl'}: labels {sorted(map(str, unseen))} never occur in train.jsonl"
        )
    index = {lab: i for i, lab in enumerate(sorted(train_labels, key=lambda x: (isinstance(x, str), str(x))))}
    return {split: {"text": texts, "label": [index[lab] for lab in labels]} for split, (texts, labels) in raw.items()}


def folder_revision(folder: str | Path, task_type: str) -> str:
    """Content hash of the task's files: the 'dataset revision' recorded in mteb's result."""
    h = hashlib.sha256()
    for name in TASK_FILES[task_type]:
        path = _require(Path(folder) / name)
        h.update(name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Task classes
# --------------------------------------------------------------------------------------------


def _metadata(name: str, task_type: str, lang: str, folder: Path, main_score: str, revision: str):
    from mteb.abstasks.task_metadata import TaskMetadata

    return TaskMetadata(
        type=task_type,
        name=name,
        main_score=main_score,
        description=f"Local {task_type} task {name} read from {folder}.",
        reference="https://github.com/embeddings-benchmark/mteb",
        dataset={"path": f"local/{name}", "revision": revision},
        category="t2t",
        eval_splits=["test"],
        eval_langs=eval_langs(lang),
        date=("2024-01-01", "2024-12-31"),
        dialect=[],
        domains=[],
        task_subtypes=[],
        license="not specified",
        annotations_creators="derived",
        modalities=["text"],
        sample_creation="created",
        bibtex_citation="",
    )


def _retrieval_split(self, with_top_ranked: bool) -> None:
    """The task's test split as mteb's RetrievalSplitData; reranking adds each query's candidate list."""
    if self.data_loaded:
        return
    from datasets import Dataset
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    queries, corpus, relevant = read_retrieval(self.local_path)
    top_ranked = read_top_ranked(self.local_path, queries, corpus) if with_top_ranked else None
    split = RetrievalSplitData(
        queries=Dataset.from_list(queries),
        corpus=Dataset.from_list(corpus),
        relevant_docs=relevant,
        top_ranked=top_ranked,
    )
    self.dataset = {"default": {"test": split}}
    self.data_loaded = True


def _load_retrieval(self, num_proc=None, **kwargs) -> None:
    _retrieval_split(self, with_top_ranked=False)


def _load_reranking(self, num_proc=None, **kwargs) -> None:
    _retrieval_split(self, with_top_ranked=True)


def _load_clustering(self, num_proc=None, **kwargs) -> None:
    if self.data_loaded:
        return
    from datasets import Dataset, DatasetDict

    cols = read_clustering(self.local_path)
    if self.max_documents_per_cluster is None:
        # mteb samples cluster_size texts with replacement; its 16,384 default means "all of them"
        # for its registered tasks, so a small local task takes as many as it has
        self.max_documents_per_cluster = min(len(cols["sentences"]), 16_384)
    self.dataset = DatasetDict({"test": Dataset.from_dict(cols)})
    self.data_loaded = True


def _load_sts(self, num_proc=None, **kwargs) -> None:
    if self.data_loaded:
        return
    from datasets import Dataset, DatasetDict

    self.dataset = DatasetDict({"test": Dataset.from_dict(read_sts(self.local_path, self.min_score, self.max_score))})
    self.data_loaded = True


def _load_pair_classification(self, num_proc=None, **kwargs) -> None:
    if self.data_loaded:
        return
    from datasets import Dataset, DatasetDict

    cols = read_pair_classification(self.local_path)
    # mteb's own layout: one row holding the lists (a one-row split is always read this way).
    self.dataset = DatasetDict({"test": Dataset.from_dict({k: [v] for k, v in cols.items()})})
    self.data_loaded = True


def _load_classification(self, num_proc=None, **kwargs) -> None:
    if self.data_loaded:
        return
    from datasets import Dataset, DatasetDict

    splits = read_classification(self.local_path)
    self.dataset = DatasetDict({split: Dataset.from_dict(cols) for split, cols in splits.items()})
    self.data_loaded = True


def _base_class(task_type: str):
    """(mteb base class, main score, loader) of a local task type, from the registry."""
    t = TASK_TYPES.get(task_type)
    if t is None or not t.local_files:
        raise LocalTaskError(
            f"local tasks of type {task_type!r} are not supported (supported: {', '.join(SUPPORTED_TYPES)})"
        )
    module, name = t.mteb_base.split(":")
    return getattr(importlib.import_module(module), name), t.main_score, globals()[t.loader]


def make_task_class(spec: dict) -> type:
    """Create the mteb task class for a task spec with a local ``path``."""
    for key in ("name", "type", "lang", "path"):
        if not spec.get(key):
            raise LocalTaskError(f"local task spec {spec!r}: {key!r} is required")
    name, task_type, lang = spec["name"], spec["type"], spec["lang"]
    folder = Path(spec["path"])
    if not folder.is_dir():
        raise LocalTaskError(f"{folder}: task folder of {name!r} not found")
    base, main_score, loader = _base_class(task_type)
    attrs: dict[str, Any] = {
        "metadata": _metadata(name, task_type, lang, folder, main_score, folder_revision(folder, task_type)),
        "local_path": str(folder),
        "load_data": loader,
        "__module__": __name__,
    }
    if task_type == "STS":
        attrs["min_score"] = spec.get("min_score", 0)
        attrs["max_score"] = spec.get("max_score", 5)
    if task_type == "Clustering":
        attrs["max_fraction_of_documents_to_embed"] = None  # embed every text of the file
        attrs["max_documents_per_cluster"] = spec.get("cluster_size")  # None: set from the data on load
        attrs["n_clusters"] = spec.get("n_experiments", 10)
    return type(name, (base,), attrs)


def make_task(spec: dict):
    """Instantiate the local mteb task for ``spec`` (data is read on ``load_data``)."""
    return make_task_class(spec)()
