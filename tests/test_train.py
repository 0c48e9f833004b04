"""Training loop: (semi-)homogeneous batching, too few negatives, instruction placement, loss terms,
learning on a tiny model, resume."""

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kalm.io import read_jsonl
from kalm.training.batches import batch_texts
from kalm.training.batches import task_homogeneous_batches as row_batches
from kalm.training.config import TrainConfig
from kalm.training.objective import lr_at
from kalm.training.train import train
from kalm.training.train_data import TrainData


def task_homogeneous_batches(records, batch_size, rng, ratio=1.0):
    """The batcher on dict records: task codes in sorted-name order, rows mapped back to records."""
    names = sorted({r["task"] for r in records})
    tasks = [names.index(r["task"]) for r in records]
    return [[records[i] for i in b] for b in row_batches(range(len(records)), tasks, batch_size, rng, ratio)]


def apply_few_negatives(records, n_neg, policy, stats):
    data = TrainData.from_records(records)
    data.apply_few_negatives(n_neg, policy, stats)
    return data, data.records(data.rows)


@settings(max_examples=80, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=4), batch_size=st.integers(2, 9), seed=st.integers(0, 99)
)
def test_batches_are_full_task_homogeneous_ones_and_the_pooled_tails(sizes, batch_size, seed):
    from kalm.training.batches import records_left_out_per_epoch

    records = [{"task": f"t{t}", "query": f"{t}-{i}"} for t, n in enumerate(sizes) for i in range(n)]
    batches = task_homogeneous_batches(records, batch_size, random.Random(seed))
    seen = [r["query"] for b in batches for r in b]
    assert len(seen) == len(set(seen))
    # every record is used, but for a single one left over when the pooled tails leave one
    left_out = records_left_out_per_epoch({f"t{t}": n for t, n in enumerate(sizes)}, batch_size)
    assert len(seen) == sum(sizes) - left_out and left_out == (sum(n % batch_size for n in sizes) % batch_size == 1)
    # every batch but (at most) one is full; a task's tail never makes a short batch of its own
    short = [b for b in batches if len(b) < batch_size]
    assert len(short) <= 1 and all(len(b) >= 2 for b in short)
    assert len(short) == (sum(n % batch_size for n in sizes) % batch_size >= 2)
    # full homogeneous batches: floor(n / batch_size) per task; the rest are the pooled tails
    homogeneous = [b for b in batches if len(b) == batch_size and len({r["task"] for r in b}) == 1]
    assert len(homogeneous) >= sum(n // batch_size for n in sizes)
    assert len(batches) == sum(n // batch_size for n in sizes) + -(
        -(sum(n % batch_size for n in sizes) - left_out) // batch_size
    )


@settings(max_examples=80, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    batch_size=st.integers(2, 9),
    ratio=st.floats(0.0, 1.0),
    seed=st.integers(0, 99),
)
def test_semi_homogeneous_batches_keep_their_task_share_and_cover_the_data(sizes, batch_size, ratio, seed):
    records = [{"task": f"t{t}", "query": f"{t}-{i}"} for t, n in enumerate(sizes) for i in range(n)]
    homogeneous = task_homogeneous_batches(records, batch_size, random.Random(seed))
    batches = task_homogeneous_batches(records, batch_size, random.Random(seed), ratio)
    # the same batch sizes and the same records as the homogeneous batches: only slots move
    assert [len(b) for b in batches] == [len(b) for b in homogeneous]
    assert sorted(r["query"] for b in batches for r in b) == sorted(r["query"] for b in homogeneous for r in b)
    for b, h in zip(batches, homogeneous):  # at least round(ratio * n) records of one task: the batch's own, which
        if len({r["task"] for r in h}) == 1:  # leads it (the pooled tails' batch has no task of its own)
            assert sum(r["task"] == b[0]["task"] for r in b) >= round(ratio * len(b))
    # a pure function of the seed (resume depends on it); ratio 1 is the task-homogeneous batching
    assert batches == task_homogeneous_batches(records, batch_size, random.Random(seed), ratio)
    assert task_homogeneous_batches(records, batch_size, random.Random(seed), 1.0) == homogeneous


def test_semi_homogeneous_batches_do_mix_tasks():
    records = [{"task": f"t{t}", "query": f"{t}-{i}"} for t in range(4) for i in range(64)]
    mixed = task_homogeneous_batches(records, 16, random.Random(0), 0.75)
    foreign = [sum(r["task"] != b[0]["task"] for r in b) for b in mixed]
    assert all(f <= 4 for f in foreign) and sum(foreign) > 2 * len(mixed)  # 4 pooled slots, ~3/4 of them foreign
    assert all(len({r["task"] for r in b}) == 1 for b in task_homogeneous_batches(records, 16, random.Random(0), 1.0))


def _short_records():
    from kalm.io import StageStats

    recs = [
        {"task": "cls", "query": f"q{i}", "pos": [f"label{i % 3}"], "neg": [f"label{(i + 1) % 3}"]} for i in range(6)
    ]
    recs += [
        {"task": "ret", "query": f"r{i}", "pos": [f"doc{i}"], "neg": [f"doc{i + 1}", f"doc{i + 2}", f"doc{i + 3}"]}
        for i in range(4)
    ]
    return recs, StageStats("train_finetune")


def test_few_negatives_drop_counts_what_it_drops():
    recs, stats = _short_records()
    data, kept = apply_few_negatives(recs, 3, "drop", stats)
    assert [r["task"] for r in kept] == ["ret"] * 4 and data.rows.tolist() == [6, 7, 8, 9]
    d = stats.as_dict()
    assert d["dropped"] == {"too_few_negatives": 6} and d["records_short_of_negatives"] == 6 and d["in"] == 10
    assert d["per_task"] == {
        "cls": {"in": 6, "kept": 0, "dropped": {"too_few_negatives": 6}},
        "ret": {"in": 4, "kept": 4, "dropped": {}},
    }


def test_few_negatives_pad_with_same_task_passages_never_an_own_positive():
    recs, stats = _short_records()
    data, kept = apply_few_negatives(recs, 3, "pad_random", stats)
    assert len(kept) == 10 and stats.as_dict()["records_short_of_negatives"] == 6 and kept == recs
    assert set(data.random_passages("cls", 9, set(), random.Random(0))) == {"label0", "label1", "label2"}
    pools = data.random_passages  # padding reads the task's passages from the data, not from pools
    texts = batch_texts(kept[:6], 3, {}, random.Random(1), pools)
    for rec, negs in zip(kept[:6], texts.negatives):
        # own negative first, then the one other label of the task; a task this small repeats to fill
        assert (
            len(negs) == 3
            and negs[0] == rec["neg"][0]
            and set(negs) == {"label0", "label1", "label2"} - set(rec["pos"])
        )
    assert texts.padded == 12 and texts.short == 0 and texts.negs_per_query() == 3
    assert batch_texts(kept[:6], 3, {}, random.Random(1), pools) == texts  # a function of the step's RNG
    _, kept_ = apply_few_negatives(recs, 3, "keep", stats)
    short = batch_texts(kept_[:6] + kept_[6:7], 3, {}, random.Random(1))  # keep: as many as they have
    assert [len(n) for n in short.negatives] == [1] * 6 + [3] and short.short == 6 and short.negs_per_query() == 0


def test_random_padding_from_a_large_task_is_distinct_and_avoids_the_excluded():
    recs = [{"task": "big", "query": f"q{i}", "pos": [f"p{i}"]} for i in range(1000)]
    recs += [{"task": "small", "query": f"s{i}", "pos": [f"p{i}"]} for i in range(10)]
    data = TrainData.from_records(recs, rows_per_batch=100)  # a task over many record batches
    exclude = {f"p{i}" for i in range(0, 1000, 4)}  # a quarter of a large task: the rejection-sampling branch
    picked = data.random_passages("big", 7, exclude, random.Random(3))
    assert len(set(picked)) == 7 and not set(picked) & exclude
    assert picked == data.random_passages("big", 7, exclude, random.Random(3))
    assert sorted(data.random_passages("small", 20, {"p0"}, random.Random(3))) == [
        f"p{i}" for i in range(1, 10)
    ]  # all it has
    # a large task with too few candidates gives what it finds within its draws (the caller repeats them)
    few = TrainData.from_records(
        [{"task": "t", "query": f"q{i}", "pos": ["same"] if i else ["other"]} for i in range(500)]
    )
    assert few.random_passages("t", 3, {"same"}, random.Random(0)) == ["other"]


def test_instructions_on_queries_and_on_both_sides_for_symmetric_tasks():
    batch = [
        {"task": "ret", "query": "q", "pos": ["p"], "neg": ["n1", "n2"], "instruction": "Find"},
        {"task": "ret", "query": "q2", "pos": ["p2"], "neg": ["n3", "n4"], "instruction": "Find"},
    ]
    texts = batch_texts(batch, 1, {"ret": False}, random.Random(0))
    assert texts.queries == ["Instruct: Find \n Query: q", "Instruct: Find \n Query: q2"]
    passages = texts.passages()
    assert passages[:2] == ["p", "p2"] and len(passages) == 4 and passages[2] in ("n1", "n2")
    sts = [dict(r, task="sts") for r in batch]
    assert batch_texts(sts, 0, {"sts": True}, random.Random(0)).passages() == [
        "Instruct: Find \n Query: p",
        "Instruct: Find \n Query: p2",
    ]


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 10, 2, 1.0) for s in range(10)]
    assert lrs[0] < lrs[1] == 1.0 and lrs[-1] < lrs[2] and min(lrs) > 0


def test_training_lowers_the_loss_and_saves_a_loadable_model(tmp_path, tiny_qwen_dir):
    from sentence_transformers import SentenceTransformer

    words = ["river", "bridge", "tower", "harbour", "market", "garden", "castle", "forest"]
    recs = [
        {
            "task": "toy",
            "query": f"where is the {w}",
            "pos": [f"the {w} is north"],
            "neg": [f"the {v} is north" for v in words if v != w][:2],
        }
        for w in words
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    cfg = TrainConfig(
        stage="finetune",
        batch_size=8,
        group_size=2,
        lr=3e-3,
        temperature=0.05,
        max_steps=25,
        warmup_ratio=0.0,
        seed=0,
        threads=1,
    )
    train(tiny_qwen_dir, str(data), str(tmp_path / "m"), cfg, {}, str(tmp_path / "metrics.jsonl"))
    losses = [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert len(losses) == 25 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    model = SentenceTransformer(str(tmp_path / "m"))
    assert model.encode(["where is the river"]).shape[1] == model.get_embedding_dimension()


def test_contrastive_loss_combines_focal_mixing_and_matryoshka():
    import torch
    import torch.nn.functional as F

    from kalm.losses import info_nce
    from kalm.training.objective import contrastive_loss

    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    p = F.normalize(torch.randn(4 + 4 * 3, 16, generator=g), dim=-1)
    plain = TrainConfig(temperature=0.05)
    assert torch.allclose(contrastive_loss(q, p, plain, 3), info_nce(q, p, 0.05))
    mixed = TrainConfig(temperature=0.05, mix_negatives=-1)
    assert contrastive_loss(q, p, mixed, 3, torch.Generator().manual_seed(1)) > info_nce(q, p, 0.05)
    assert torch.allclose(contrastive_loss(q, p, mixed, 0), info_nce(q, p, 0.05))  # ragged batch: no mixing
    focal = TrainConfig(temperature=0.05, focal_gamma=0.5)
    assert torch.allclose(contrastive_loss(q, p, focal, 3), info_nce(q, p, 0.05, focal_gamma=0.5))
    mrl = TrainConfig(temperature=0.05, matryoshka_dims=(16, 4), matryoshka_weights=(1.0, 0.5))
    small = info_nce(F.normalize(q[:, :4], dim=-1), F.normalize(p[:, :4], dim=-1), 0.05)
    want = info_nce(q, p, 0.05) + 0.5 * small
    assert torch.allclose(contrastive_loss(q, p, mrl, 3), want)
    # the per-term values come from the same forward pass
    terms = {}
    both = TrainConfig(temperature=0.05, focal_gamma=0.5, matryoshka_dims=(16, 4), matryoshka_weights=(1.0, 0.5))
    total = contrastive_loss(q, p, both, 3, terms=terms)
    assert set(terms) == {"loss_infonce", "loss_focal", "loss_dim16", "loss_dim4"}
    assert abs(terms["loss_infonce"] - info_nce(q, p, 0.05).item()) < 1e-6
    assert abs(terms["loss_focal"] - info_nce(q, p, 0.05, focal_gamma=0.5).item()) < 1e-6
    assert terms["loss_dim16"] == terms["loss_focal"]  # the full dim's optimised term is the focal one
    assert abs(total.item() - terms["loss_dim16"] - 0.5 * terms["loss_dim4"]) < 1e-6


def test_metrics_carry_every_loss_term_and_the_stats_count_padding(tmp_path, tiny_qwen_dir):
    recs = [
        {
            "task": "toy",
            "query": f"where is the {w}",
            "pos": [f"the {w} is north"],
            "neg": [f"the {v} is south" for v in ("river", "bridge", "tower", "mill") if v != w][:3],
        }
        for w in ("river", "bridge", "tower", "mill", "well", "gate")
    ]
    recs[4]["neg"] = recs[4]["neg"][:1]  # short of negatives: padded from the task's passages
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    cfg = TrainConfig(
        stage="finetune",
        batch_size=6,
        group_size=4,
        lr=1e-3,
        max_steps=2,
        threads=1,
        focal_gamma=0.5,
        mix_negatives=2,
        matryoshka_dims=(64, 16),
        matryoshka_weights=(1.0, 0.3),
    )
    train(tiny_qwen_dir, str(data), str(tmp_path / "m"), cfg, {}, str(tmp_path / "metrics.jsonl"))
    lines = list(read_jsonl(tmp_path / "metrics.jsonl"))
    assert len(lines) == 2
    for m in lines:
        for key in (
            "loss",
            "loss_infonce",
            "loss_focal",
            "loss_dim64",
            "loss_dim16",
            "lr",
            "samples_per_s",
            "tokens_per_s",
        ):
            assert isinstance(m[key], float) and m[key] > 0, key
        assert abs(m["loss"] - m["loss_dim64"] - 0.3 * m["loss_dim16"]) < 1e-5 and m["loss_focal"] < m["loss_infonce"]
        assert m["padded_negatives"] == 2 and m["short_records"] == 0
    # non-padding tokens encoded in a step (6 queries + 6 x 4 passages): what compute is counted in
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    texts = [r["query"] for r in recs] + [t for r in recs for t in r["pos"] + r["neg"]]
    assert min(m["tokens"] for m in lines) >= sum(len(tok(t)["input_ids"]) for t in texts)  # + the 2 pads
    stats = json.loads((tmp_path / "m.stats.json").read_text())
    assert stats["in"] == stats["kept"] == 6 and stats["records_short_of_negatives"] == 1
    assert stats["negatives_padded_random"] == 4 and stats["few_negatives"] == "pad_random" and stats["steps"] == 2


def _toy_data(tmp_path):
    words = ["river", "bridge", "tower", "harbour", "market", "garden", "castle", "forest", "mill", "well"]
    recs = [
        {
            "task": "toy" if i % 2 else "toy2",
            "query": f"where is the {w}",
            "pos": [f"the {w} is north"],
            "neg": [f"the {v} is north" for v in words if v != w][:3],
        }
        for i, w in enumerate(words)
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return data


def _train_cli(*args):
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "kalm", "train", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, tiny_qwen_dir):
    import torch
    from safetensors.torch import load_file

    data = _toy_data(tmp_path)
    common = [
        "--stage",
        "finetune",
        "--model",
        tiny_qwen_dir,
        "--data",
        data,
        "--batch-size",
        4,
        "--group-size",
        3,
        "--lr",
        "3e-3",
        "--max-steps",
        7,
        "--mix-negatives",
        -1,
        "--focal-gamma",
        0.5,
        "--threads",
        1,
        "--seed",
        3,
    ]
    ref = _train_cli(*common, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    ckpt = tmp_path / "ckpt"
    # soup snapshots every 3 steps, the last 2 kept: steps 3 (before the kill) and 6 (after the resume)
    snapshots = ["--keep-snapshots", 2, "--snapshot-every", 3]
    killed = _train_cli(
        *common,
        "--out",
        tmp_path / "resumed",
        "--checkpoint-dir",
        ckpt,
        "--checkpoint-every",
        2,
        "--stop-after-steps",
        5,
        *snapshots,
    )
    assert killed.returncode == 137 and not (tmp_path / "resumed").exists()
    assert (ckpt / "checkpoint.pt").exists()
    resumed = _train_cli(
        *common, "--out", tmp_path / "resumed", "--checkpoint-dir", ckpt, "--checkpoint-every", 2, *snapshots
    )
    assert resumed.returncode == 0 and "resuming finetune from step 4" in resumed.stderr, resumed.stderr
    a = load_file(next((tmp_path / "ref").rglob("model.safetensors")))
    b = load_file(next((tmp_path / "resumed").rglob("model.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref_metrics = list(read_jsonl(tmp_path / "ref.metrics.jsonl"))
    res_metrics = list(read_jsonl(tmp_path / "resumed.metrics.jsonl"))
    assert [m["loss"] for m in ref_metrics] == [m["loss"] for m in res_metrics] and len(res_metrics) == 7
    assert not (ckpt / "checkpoint.pt").exists()  # removed once the model is saved
    # the soup takes the final model and the snapshots the run kept (they survived the kill)
    from kalm.soup import last_k_ingredients
    from kalm.training.checkpoints import snapshot_dir

    snaps = snapshot_dir(ckpt)
    assert last_k_ingredients(str(tmp_path / "resumed"), snaps, 3) == [
        str(snaps / "step-00000003"),
        str(snaps / "step-00000006"),
        str(tmp_path / "resumed"),
    ]
    six = load_file(next((snaps / "step-00000006").rglob("model.safetensors")))
    assert six.keys() == a.keys() and not all(torch.equal(six[k], a[k]) for k in a)


def test_a_checkpoint_of_another_configuration_is_ignored(tmp_path, tiny_qwen_dir):
    data = _toy_data(tmp_path)
    common = [
        "--stage",
        "finetune",
        "--model",
        tiny_qwen_dir,
        "--data",
        data,
        "--batch-size",
        4,
        "--max-steps",
        4,
        "--threads",
        1,
        "--checkpoint-dir",
        tmp_path / "ckpt",
        "--checkpoint-every",
        1,
    ]
    assert _train_cli(*common, "--out", tmp_path / "a", "--stop-after-steps", 2).returncode == 137
    other = _train_cli(*common, "--out", tmp_path / "b", "--lr", "1e-3")
    assert other.returncode == 0 and "ignoring checkpoint" in other.stderr and "resuming" not in other.stderr


def test_the_pooling_option_is_the_saved_models_pooling(tmp_path, tiny_qwen_dir):
    from sentence_transformers import SentenceTransformer

    data = _toy_data(tmp_path)
    res = _train_cli(
        "--stage",
        "finetune",
        "--model",
        tiny_qwen_dir,
        "--data",
        data,
        "--batch-size",
        4,
        "--max-steps",
        1,
        "--threads",
        1,
        "--pooling",
        "cls",
        "--out",
        tmp_path / "m",
    )
    assert res.returncode == 0, res.stderr
    assert SentenceTransformer(str(tmp_path / "m"))[1].pooling_mode == "cls"


def test_progress_lines_come_at_the_interval_with_rate_and_eta():
    """A line on the first step, then at most one per interval (and on the last step), with steps/s and ETA."""
    from kalm.training.train import Progress

    now = [100.0]
    p = Progress(total=1000, start_step=0, every_s=30, clock=lambda: now[0])
    lines = []
    for step in range(1, 1001):
        now[0] += 0.5  # 2 steps/s
        if line := p.line(step):
            lines.append((step, line))
    assert [s for s, _ in lines] == [1, *range(61, 1000, 60), 1000]
    assert [s for s, _ in lines[1:3]] == [61, 121]  # every 30 s of 0.5 s steps
    assert lines[1][1] == "step 61/1000 (6.1%), 2 steps/s, ETA 0:07:50"
    resumed = Progress(total=100, start_step=90, every_s=0, clock=lambda: now[0])
    now[0] += 10
    assert resumed.line(91) == "step 91/100 (91.0%), 0.1 steps/s, ETA 0:01:30"  # the steps this process ran


def _dev_task(root):
    """A small local retrieval task: the first 40 demo questions and the demo corpus."""
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "data/demo/eval/DemoRetrievalEn"
    dst = root / "DevRetrieval"
    dst.mkdir()
    queries = [json.loads(line) for line in (src / "queries.jsonl").read_text(encoding="utf-8").splitlines()[:40]]
    keep = {q["id"] for q in queries}
    qrels = [x for x in (src / "qrels.tsv").read_text(encoding="utf-8").splitlines()[1:] if x.split("\t")[0] in keep]
    (dst / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    (dst / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(qrels) + "\n", encoding="utf-8")
    (dst / "corpus.jsonl").write_text((src / "corpus.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    return {"name": "DevRetrieval", "type": "Retrieval", "lang": "en", "path": str(dst)}


def test_periodic_evaluation_logs_scores_keeps_the_best_and_leaves_training_alone(tmp_path, tiny_qwen_dir):
    """eval_every 2 over 5 steps: eval_DevRetrieval at steps 2, 4 and 5; the exported best model scores what
    was logged for its step; the final weights equal a run without evaluation (it draws no random number)."""
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    from kalm.models.modeling import load_embedding_model
    from kalm.soup import dev_score

    src = Path(__file__).resolve().parents[1] / "data/demo/finetune/retrieval_en.jsonl"
    data = tmp_path / "train.jsonl"
    recs = [dict(json.loads(x), task="retrieval_en") for x in src.read_text(encoding="utf-8").splitlines()[:64]]
    data.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    task = _dev_task(tmp_path)
    base = dict(stage="finetune", batch_size=8, group_size=1, lr=1e-3, max_steps=5, warmup_ratio=0.0, seed=3)
    runs = {}
    for every in (0, 2):
        out = tmp_path / f"e{every}"
        train(
            tiny_qwen_dir, str(data), str(out), TrainConfig(**base, eval_every=every), {}, str(out) + ".metrics.jsonl",
            stats_path=str(out) + ".stats.json", eval_tasks=[task] if every else None,
            best_out=str(out) + ".best" if every else None, checkpoint_dir=str(tmp_path / f"ck{every}"),
        )  # fmt: skip
        runs[every] = [json.loads(x) for x in Path(str(out) + ".metrics.jsonl").read_text().splitlines()]
    logged = {m["step"]: m["eval_DevRetrieval"] for m in runs[2] if "eval_DevRetrieval" in m}
    assert sorted(logged) == [2, 4, 5]
    assert all("eval_DevRetrieval" not in m for m in runs[0])
    stats = json.loads(Path(str(tmp_path / "e2") + ".stats.json").read_text())
    best_step = max(logged, key=lambda s: (logged[s], -s))
    assert stats["eval_best_step"] == best_step and stats["eval_best_score"] == logged[best_step]
    best = load_embedding_model(str(tmp_path / "e2.best"))
    assert dev_score(best, task) == pytest.approx(logged[best_step], abs=1e-6)
    assert not (tmp_path / "ck2" / "best").exists()  # moved to --best-out
    a, b = (load_file(next((tmp_path / f"e{e}").rglob("model.safetensors"))) for e in (0, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in runs[0]] == [m["loss"] for m in runs[2]]
