"""The trainer's data (kalm.training.train_data, issue 15): Parquet parts (or JSON Lines) memory-mapped through
an Arrow cache, batches built from an index of rows and task codes. The batches are those of the
former list-of-dicts batcher (kept here as the reference), and the memory per rank is the index
(a few bytes per record), not the texts."""

import gc
import json
import math
import os
import random
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kalm.data.shards import RECORD_SCHEMA, write_shard
from kalm.io import StageStats, read_jsonl
from kalm.training.batches import BatchSchedule, task_homogeneous_batches
from kalm.training.config import TrainConfig
from kalm.training.train import train
from kalm.training.train_data import TrainData, arrow_path, convert_parts, data_parts, open_data

# ---- the reference: the dict batcher as it was before the index (kalm/training/train.py at 3a4c62d) -------


def reference_batches(records: list[dict], batch_size: int, rng: random.Random, homogeneous_ratio: float = 1.0):
    by_task: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_task[rec["task"]].append(rec)
    batches, tails = [], []
    for task in sorted(by_task):
        recs = by_task[task][:]
        rng.shuffle(recs)
        full = len(recs) - len(recs) % batch_size
        batches += [recs[i : i + batch_size] for i in range(0, full, batch_size)]
        tails += recs[full:]
    rng.shuffle(tails)
    batches += [b for i in range(0, len(tails), batch_size) if len(b := tails[i : i + batch_size]) >= 2]
    rng.shuffle(batches)
    if homogeneous_ratio < 1.0:
        own = [math.floor(homogeneous_ratio * len(b) + 0.5) for b in batches]
        pool = [rec for b, k in zip(batches, own) for rec in b[k:]]
        rng.shuffle(pool)
        start = 0
        for i, (b, k) in enumerate(zip(batches, own)):
            take = len(b) - k
            batches[i] = b[:k] + pool[start : start + take]
            start += take
    return batches


def _records(sizes: list[int], seed: int) -> list[dict]:
    """Records of tasks named out of sorted order, interleaved, some short of negatives."""
    rng = random.Random(seed)
    names = [f"task-{'zyxwv'[t]}{t}" for t in range(len(sizes))]
    recs = [
        {"task": names[t], "query": f"{t}-{i}", "pos": [f"p{t}-{i}"], "neg": [f"n{t}-{i}"] * rng.randint(0, 2)}
        for t, n in enumerate(sizes)
        for i in range(n)
    ]
    rng.shuffle(recs)
    return recs


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=5),
    batch_size=st.integers(2, 9),
    ratio=st.sampled_from([1.0, 0.0, 0.5, 0.75, 0.9]),
    seed=st.integers(0, 99),
)
def test_row_batches_are_the_dict_batches(sizes, batch_size, ratio, seed):
    recs = _records(sizes, seed)
    data = TrainData.from_records(recs, rows_per_batch=7)
    data.apply_few_negatives(2, "drop", StageStats("t"))  # rows with gaps: the kept records' global rows
    kept = [r for r in recs if len(r["neg"]) >= 2]
    assert data.records(data.rows) == kept
    want = reference_batches(kept, batch_size, random.Random(seed), ratio)
    got = task_homogeneous_batches(data.rows, data.tasks, batch_size, random.Random(seed), ratio)
    assert [data.records(b) for b in got] == want
    if len(kept) >= 2 and want:  # the schedule: epoch e from Random(f"{seed}:epoch:{e}"), as before
        schedule = BatchSchedule(
            data.rows, data.tasks, TrainConfig(batch_size=batch_size, seed=seed, homogeneous_ratio=ratio)
        )
        n = schedule.steps_per_epoch
        ref = [reference_batches(kept, batch_size, random.Random(f"{seed}:epoch:{e}"), ratio) for e in (0, 1)]
        assert [data.records(schedule(s)) for s in range(2 * n)] == ref[0] + ref[1]


# ---- parts, the Arrow cache, records ---------------------------------------------------------------


def _write_jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return path


def test_parquet_parts_and_json_lines_give_the_same_records(tmp_path):
    recs = [
        {
            "task": "b" if i % 3 else "a",
            "query": f"q{i}",
            "pos": [f"p{i}"],
            "neg": [f"n{i}", f"m{i}"][: i % 3],
            "instruction": "Find it" if i % 2 else None,
        }
        for i in range(40)
    ]
    recs = [{k: v for k, v in r.items() if v is not None and v != []} for r in recs]
    folder = tmp_path / "mined"
    folder.mkdir()
    # p2 before p10 (natural order); ids and mining columns are not training columns
    write_shard(
        folder / "p10.parquet",
        [dict(r, id=i, neg_scores=[0.5] * len(r.get("neg", []))) for i, r in enumerate(recs[25:])],
    )
    write_shard(folder / "p2.parquet", recs[:25])
    assert [p.name for p in data_parts(folder)] == ["p2.parquet", "p10.parquet"]
    jsonl = _write_jsonl(tmp_path / "d.jsonl", recs)
    a = open_data(data_parts(folder), tmp_path / "cache")
    b = open_data(data_parts(jsonl), tmp_path / "cache")
    assert a.records(range(40)) == b.records(range(40)) == recs  # null fields left out, as in JSON Lines
    assert a.records([39, 0, 26, 24]) == [recs[39], recs[0], recs[26], recs[24]]
    assert a.task_names == ["a", "b"] and a.tasks.tolist() == b.tasks.tolist() == [int(r["task"] == "b") for r in recs]
    # a Parquet part of other columns (hand-made: no neg, no instruction) reads as null ones
    pq.write_table(pa.table({"task": ["t"], "query": ["q"], "pos": [["p"]]}), tmp_path / "plain.parquet")
    assert open_data([tmp_path / "plain.parquet"], tmp_path / "cache").records([0]) == [
        {"task": "t", "query": "q", "pos": ["p"]}
    ]


def test_the_arrow_cache_is_reused_and_follows_a_changed_part(tmp_path):
    part = tmp_path / "p0.parquet"
    write_shard(part, [{"task": "t", "query": "q", "pos": ["p"]}])
    (first,) = convert_parts([part], tmp_path / "cache")
    mtime = first.stat().st_mtime_ns
    assert convert_parts([part], tmp_path / "cache") == [first] and first.stat().st_mtime_ns == mtime  # not rewritten
    write_shard(part, [{"task": "t", "query": "changed", "pos": ["p"]}, {"task": "t", "query": "q2", "pos": ["p"]}])
    (second,) = convert_parts([part], tmp_path / "cache")
    assert second != first and second == arrow_path(part, tmp_path / "cache")
    assert [r["query"] for r in open_data([part], tmp_path / "cache").records([0, 1])] == ["changed", "q2"]


def test_few_negatives_counts_come_from_the_list_lengths(tmp_path):
    recs = [
        {"task": "t", "query": f"q{i}", "pos": ["p"], **({"neg": ["n"] * (i % 4)} if i % 5 else {})} for i in range(20)
    ]
    write_shard(tmp_path / "p0.parquet", recs)
    data = open_data([tmp_path / "p0.parquet"], tmp_path / "cache")
    assert np.concatenate(list(data.negative_counts())).tolist() == [len(r.get("neg", [])) for r in recs]
    stats = StageStats("train_finetune")
    assert data.apply_few_negatives(2, "keep", stats) == sum(len(r.get("neg", [])) < 2 for r in recs)
    assert stats.as_dict()["kept"] == 20 and len(data) == 20
    pre = open_data([tmp_path / "p0.parquet"], tmp_path / "cache")
    assert pre.apply_few_negatives(0, "pad_random", StageStats("train_pretrain")) == 0
    assert "neg" not in pre.records([1])[0]  # pretraining does not read negatives


def test_padding_from_the_memory_map_never_picks_an_own_positive_or_negative(tmp_path):
    recs = [{"task": "t", "query": f"q{i}", "pos": [f"p{i % 50}"], "neg": [f"p{(i + 1) % 50}"]} for i in range(300)]
    recs += [{"task": "u", "query": f"u{i}", "pos": [f"x{i}"]} for i in range(300)]
    write_shard(tmp_path / "p0.parquet", recs, row_group_rows=64)
    data = open_data([tmp_path / "p0.parquet"], tmp_path / "cache")
    rng = random.Random(0)
    for rec in recs[:100]:
        exclude = set(rec["pos"]) | set(rec["neg"])
        picked = data.random_passages("t", 5, exclude, rng)
        assert len(picked) == len(set(picked)) == 5 and not set(picked) & exclude
        assert all(p.startswith("p") for p in picked)  # the record's own task only


# ---- resume: the fingerprint covers every part -------------------------------------------------------


def test_a_checkpoint_is_ignored_when_any_part_changed(tmp_path):
    import torch

    from kalm.training.checkpoints import Checkpoint, _fingerprint

    parts = [tmp_path / f"p{j}.parquet" for j in range(3)]
    for j, part in enumerate(parts):
        write_shard(part, [{"task": "t", "query": f"q{j}", "pos": ["p"]}])
    cfg = TrainConfig()
    model = torch.nn.Linear(2, 2)
    Checkpoint(str(tmp_path / "ckpt"), _fingerprint("m", parts, cfg)).save(
        model, torch.optim.SGD(model.parameters(), lr=1.0), 3, [], 0
    )
    assert Checkpoint(str(tmp_path / "ckpt"), _fingerprint("m", parts, cfg)).load()["step"] == 3
    st_ = parts[2].stat()
    os.utime(parts[2], ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))  # the last part touched
    assert Checkpoint(str(tmp_path / "ckpt"), _fingerprint("m", parts, cfg)).load() is None
    assert Checkpoint(str(tmp_path / "ckpt"), _fingerprint("m", parts[:2], cfg)).load() is None  # a part fewer


# ---- the trainer on parts: the same run as on JSON Lines; --data takes several paths ---------------


def test_training_on_parquet_parts_is_the_run_on_json_lines(tmp_path, tiny_qwen_dir):
    from kalm.cli import build_parser

    words = ["river", "bridge", "tower", "harbour", "market", "garden", "castle", "forest", "mill", "well"]
    recs = [
        {
            "task": "toy" if i % 2 else "toy2",
            "query": f"where is the {w}",
            "pos": [f"the {w} is north"],
            "neg": [f"the {v} is north" for v in words if v != w][: 3 - 2 * (i == 4)],
        }
        for i, w in enumerate(words)
    ]
    write_shard(tmp_path / "p0.parquet", recs[:6])
    write_shard(tmp_path / "p1.parquet", recs[6:])
    args = build_parser(["kalm.training.train"]).parse_args(
        [
            "train",
            "--stage",
            "finetune",
            "--model",
            "m",
            "--out",
            "o",
            "--data",
            str(tmp_path / "p0.parquet"),
            str(tmp_path / "p1.parquet"),
        ]
    )
    assert args.data == [str(tmp_path / "p0.parquet"), str(tmp_path / "p1.parquet")]
    cfg = TrainConfig(stage="finetune", batch_size=4, group_size=3, lr=1e-3, max_steps=3, threads=1, seed=1)
    train(tiny_qwen_dir, str(_write_jsonl(tmp_path / "d.jsonl", recs)), str(tmp_path / "a"), cfg, {})
    ckpt = tmp_path / "ckpt"
    train(tiny_qwen_dir, args.data, str(tmp_path / "b"), cfg, {}, checkpoint_dir=str(ckpt), checkpoint_every=1)
    a, b = list(read_jsonl(tmp_path / "a.metrics.jsonl")), list(read_jsonl(tmp_path / "b.metrics.jsonl"))
    assert [m["loss"] for m in a] == [m["loss"] for m in b] and [m["task"] for m in a] == [m["task"] for m in b]
    assert sum(m["padded_negatives"] for m in b) == 1  # record 4 is short of a negative: padded once per epoch
    assert not (ckpt / "arrow").exists() and not (ckpt / "checkpoint.pt").exists()  # removed with the checkpoint


# ---- memory: the index, not the texts ------------------------------------------------------------


def _rss_kb() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


def _long_text_parts(folder: Path, n: int) -> list[Path]:
    """Two Parquet parts of ``n`` records of ~1 KB of distinct text, two tasks (1 in 8 "rare")."""
    filler = "lorem ipsum dolor sit amet " * 16  # 432 characters
    parts = []
    for j, (lo, hi) in enumerate(((0, n // 2), (n // 2, n))):
        row = pa.array(np.arange(lo, hi))
        ids = row.cast(pa.string())
        text = pc.binary_join_element_wise(ids, pa.scalar(filler), "")
        offsets = pa.array(np.arange(hi - lo + 1, dtype=np.int32))
        table = pa.table(
            {
                "id": row,
                "task": pc.if_else(pc.equal(pc.bit_wise_and(row, 7), 0), "rare", "common"),
                "query": pc.binary_join_element_wise("query ", ids, " ", filler[:100], ""),
                "pos": pa.ListArray.from_arrays(offsets, pc.binary_join_element_wise("positive ", text, "")),
                "neg": pa.ListArray.from_arrays(offsets, pc.binary_join_element_wise("negative ", text, "")),
            }
        )
        parts.append(folder / f"p{j}.parquet")
        pq.write_table(
            table.cast(pa.schema([RECORD_SCHEMA.field(c) for c in table.column_names])),
            parts[-1],
            row_group_size=8192,
            compression="zstd",
        )
    return parts


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RSS from /proc (Linux)")
def test_data_memory_per_rank_does_not_grow_with_the_text_volume(tmp_path):
    """200k records of ~1 KB of text (200 MB) in two Parquet parts. Building the index and the
    epoch's batches costs a few bytes per record of Python/numpy heap (tracemalloc: numpy's buffers
    included) and no Arrow memory; reading every record of an epoch, batch after batch, grows the
    process's anonymous memory by a batch's worth, and its file-backed pages (the memory map: the page
    cache, shared by the ranks of a node) by no more: each read's pages are unmapped after it."""
    n = 200_000
    parts = _long_text_parts(tmp_path, n)
    cache = tmp_path / "arrow"
    convert_parts(parts, cache)
    text_bytes = sum(arrow_path(p, cache).stat().st_size for p in parts)
    assert text_bytes > 190e6
    gc.collect()
    pa.default_memory_pool().release_unused()  # the generated tables' memory, before measuring

    arrow_before = pa.total_allocated_bytes()
    tracemalloc.start()
    t0 = time.time()
    data = open_data(parts, cache, convert=False)
    data.apply_few_negatives(1, "pad_random", StageStats("train_finetune"))
    data.random_passages("rare", 3, set(), random.Random(0))  # builds the by-task rows padding needs
    schedule = BatchSchedule(data.rows, data.tasks, TrainConfig(batch_size=512, homogeneous_ratio=0.9))
    seconds = time.time() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(data) == n and schedule.steps_per_epoch == -(-n // 512)
    index = data.rows.nbytes + data.tasks.nbytes
    assert index / n == 6  # int32 row + uint16 task code
    assert data.index_nbytes - index < 4 * n + 100  # + the rows grouped by task (int32), for padding
    epoch = sum(b.nbytes for b in schedule._batches)
    assert epoch / n == 4  # the current epoch's batches: one int32 row per record
    assert peak < 0.05 * text_bytes, f"heap peak {peak / 1e6:.1f} MB for {text_bytes / 1e6:.0f} MB of text"
    assert pa.total_allocated_bytes() - arrow_before < 1e6  # the buffers are the memory map's
    assert seconds < 20

    before = _rss_kb()
    for step in range(schedule.steps_per_epoch):
        batch = data.records(schedule(step))
        assert len(batch) >= 2
    after = _rss_kb()
    anon, file_backed = (after[k] - before[k] for k in ("RssAnon", "RssFile"))
    assert anon * 1024 < 0.05 * text_bytes, f"anonymous RSS grew by {anon / 1024:.0f} MB"
    # the pages read are the map's, and TrainData.release() unmaps them after each read: RSS does not
    # grow to the whole cache either (a job's VmHWM and a cluster's memory accounting count them)
    assert file_backed * 1024 < 0.05 * text_bytes, f"file-backed RSS grew by {file_backed / 1024:.0f} MB"
    print(
        f"index {index / n:.0f} B/record (+{(data.index_nbytes - index) / n:.0f} for padding), epoch batches "
        f"{epoch / n:.0f} B/record, heap peak {peak / 1e6:.1f} MB for {text_bytes / 1e6:.0f} MB of text, "
        f"built in {seconds:.1f} s; one epoch read: RssAnon +{anon / 1024:.1f} MB, RssFile +{file_backed / 1024:.0f} MB"
    )


# ---- the data mix: per-task sampling weights and caps (issue 19, part 3) ------------------------------


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    weights=st.lists(st.sampled_from([0.25, 0.5, 1.0, 1.5, 3.0]), min_size=4, max_size=4),
    caps=st.lists(st.one_of(st.none(), st.integers(1, 20)), min_size=4, max_size=4),
    seed=st.integers(0, 50),
)
def test_the_data_mix_gives_each_task_its_weighted_capped_share_every_epoch(sizes, weights, caps, seed):
    from kalm.training.batches import mix_rows

    tasks = np.repeat(np.arange(len(sizes)), sizes).astype(np.uint16)
    rows = np.arange(len(tasks), dtype=np.int64) * 3  # global rows with gaps
    mix = {t: (weights[t], caps[t]) for t in range(len(sizes))}
    for epoch in (0, 1):
        got_rows, got_tasks = mix_rows(rows, tasks, mix, random.Random(f"{seed}:mix:{epoch}"))
        for t, n in enumerate(sizes):
            mine = got_rows[got_tasks == t]
            kept = min(n, caps[t] or n)
            assert len(mine) == round(weights[t] * kept)
            assert set(mine.tolist()) <= set(rows[tasks == t].tolist())  # a task's rows only
            assert len(set(mine.tolist())) == min(len(mine), kept)  # repeats only once the subset is used up
    cfg = TrainConfig(batch_size=4, seed=seed)
    if sum(round(weights[t] * min(n, caps[t] or n)) for t, n in enumerate(sizes)) < 2:
        with pytest.raises(ValueError, match="fewer than two records"):
            BatchSchedule(rows, tasks, cfg, mix)
        return
    a, b = BatchSchedule(rows, tasks, cfg, mix), BatchSchedule(rows, tasks, cfg, mix)
    if a.steps_per_epoch:
        steps = range(2 * a.steps_per_epoch)
        assert [a(s).tolist() for s in steps] == [b(s).tolist() for s in steps]  # a pure function of the seed
        assert len(a._epoch_batches(1)) == a.steps_per_epoch  # the same number of steps every epoch
        assert a.task_counts.tolist() == [round(weights[t] * min(n, caps[t] or n)) for t, n in enumerate(sizes)]


def test_the_trainer_trains_on_the_data_mix_and_counts_it(tmp_path, tiny_qwen_dir):
    """--task-mix through the trainer: the stats say each task's records per epoch, and the steps follow."""
    recs = [
        {"task": "big" if i < 24 else "small", "query": f"q {i}", "pos": [f"p {i}"], "neg": [f"n {i}", f"m {i}"]}
        for i in range(30)
    ]
    data = str(_write_jsonl(tmp_path / "d.jsonl", recs))
    cfg = TrainConfig(stage="finetune", batch_size=4, group_size=3, lr=1e-3, epochs=1, threads=1, seed=3)
    mix = {"big": {"max_records": 8}, "small": {"weight": 2.0}}
    train(tiny_qwen_dir, data, str(tmp_path / "m"), cfg, {}, stats_path=str(tmp_path / "s.json"), task_mix=mix)
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["records_per_epoch"] == {"big": 8, "small": 12}
    metrics = list(read_jsonl(tmp_path / "m.metrics.jsonl"))
    assert len(metrics) == 5  # (8 + 12) / 4 steps in the epoch, not (24 + 6) / 4
    with pytest.raises(ValueError, match=r"task mix names \['nope'\]"):
        train(tiny_qwen_dir, data, str(tmp_path / "x"), cfg, {}, task_mix={"nope": {"weight": 2}})
