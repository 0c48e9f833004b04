"""Training loop: task-homogeneous batching, instruction placement, learning on a tiny model."""

import json
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from kalm.io import read_jsonl
from kalm.train import TrainConfig, batch_texts, lr_at, task_homogeneous_batches, train


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=4), batch_size=st.integers(2, 9), seed=st.integers(0, 99))
def test_batches_are_task_homogeneous_and_cover_the_data(sizes, batch_size, seed):
    records = [{"task": f"t{t}", "query": f"{t}-{i}"} for t, n in enumerate(sizes) for i in range(n)]
    batches = task_homogeneous_batches(records, batch_size, random.Random(seed))
    assert all(len({r["task"] for r in b}) == 1 and 2 <= len(b) <= batch_size for b in batches)
    seen = [r["query"] for b in batches for r in b]
    assert len(seen) == len(set(seen))
    # only a task's final singleton can be left out (no in-batch negative for it)
    expected = sum(n - (1 if n % batch_size == 1 else 0) for n in sizes)
    assert len(seen) == expected


def test_instructions_on_queries_and_on_both_sides_for_symmetric_tasks():
    batch = [{"task": "ret", "query": "q", "pos": ["p"], "neg": ["n1", "n2"], "instruction": "Find"},
             {"task": "ret", "query": "q2", "pos": ["p2"], "neg": ["n3", "n4"], "instruction": "Find"}]
    queries, passages = batch_texts(batch, 1, {"ret": False}, random.Random(0))
    assert queries == ["Instruct: Find \n Query: q", "Instruct: Find \n Query: q2"]
    assert passages[:2] == ["p", "p2"] and len(passages) == 4 and passages[2] in ("n1", "n2")
    sts = [dict(r, task="sts") for r in batch]
    _, passages = batch_texts(sts, 0, {"sts": True}, random.Random(0))
    assert passages == ["Instruct: Find \n Query: p", "Instruct: Find \n Query: p2"]


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 10, 2, 1.0) for s in range(10)]
    assert lrs[0] < lrs[1] == 1.0 and lrs[-1] < lrs[2] and min(lrs) > 0


def test_training_lowers_the_loss_and_saves_a_loadable_model(tmp_path, tiny_qwen_dir):
    from sentence_transformers import SentenceTransformer

    words = ["river", "bridge", "tower", "harbour", "market", "garden", "castle", "forest"]
    recs = [{"task": "toy", "query": f"where is the {w}", "pos": [f"the {w} is north"],
             "neg": [f"the {v} is north" for v in words if v != w][:2]} for w in words]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    cfg = TrainConfig(stage="finetune", batch_size=8, group_size=2, lr=3e-3, temperature=0.05, max_steps=25,
                      warmup_ratio=0.0, seed=0, threads=1)
    train(tiny_qwen_dir, str(data), str(tmp_path / "m"), cfg, {}, str(tmp_path / "metrics.jsonl"))
    losses = [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert len(losses) == 25 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    model = SentenceTransformer(str(tmp_path / "m"))
    assert model.encode(["where is the river"]).shape[1] == model.get_embedding_dimension()


def test_contrastive_loss_combines_focal_mixing_and_matryoshka():
    import torch
    import torch.nn.functional as F

    from kalm.losses import info_nce
    from kalm.train import contrastive_loss

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
    want = info_nce(q, p, 0.05) + 0.5 * info_nce(F.normalize(q[:, :4], dim=-1), F.normalize(p[:, :4], dim=-1), 0.05)
    assert torch.allclose(contrastive_loss(q, p, mrl, 3), want)


def _toy_data(tmp_path):
    words = ["river", "bridge", "tower", "harbour", "market", "garden", "castle", "forest", "mill", "well"]
    recs = [{"task": "toy" if i % 2 else "toy2", "query": f"where is the {w}", "pos": [f"the {w} is north"],
             "neg": [f"the {v} is north" for v in words if v != w][:3]} for i, w in enumerate(words)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return data


def _train_cli(*args):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "kalm", "train", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, tiny_qwen_dir):
    import torch
    from safetensors.torch import load_file

    data = _toy_data(tmp_path)
    common = ["--stage", "finetune", "--model", tiny_qwen_dir, "--data", data, "--batch-size", 4, "--group-size", 3,
              "--lr", "3e-3", "--max-steps", 7, "--mix-negatives", -1, "--focal-gamma", 0.5, "--threads", 1, "--seed", 3]
    ref = _train_cli(*common, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    ckpt = tmp_path / "ckpt"
    killed = _train_cli(*common, "--out", tmp_path / "resumed", "--checkpoint-dir", ckpt, "--checkpoint-every", 2,
                        "--stop-after-steps", 5)
    assert killed.returncode == 137 and not (tmp_path / "resumed").exists()
    assert (ckpt / "checkpoint.pt").exists()
    resumed = _train_cli(*common, "--out", tmp_path / "resumed", "--checkpoint-dir", ckpt, "--checkpoint-every", 2)
    assert resumed.returncode == 0 and "resuming finetune from step 4" in resumed.stderr, resumed.stderr
    a = load_file(next((tmp_path / "ref").rglob("model.safetensors")))
    b = load_file(next((tmp_path / "resumed").rglob("model.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref_metrics = list(read_jsonl(tmp_path / "ref.metrics.jsonl"))
    res_metrics = list(read_jsonl(tmp_path / "resumed.metrics.jsonl"))
    assert [m["loss"] for m in ref_metrics] == [m["loss"] for m in res_metrics] and len(res_metrics) == 7
    assert not (ckpt / "checkpoint.pt").exists()  # removed once the model is saved


def test_a_checkpoint_of_another_configuration_is_ignored(tmp_path, tiny_qwen_dir):
    data = _toy_data(tmp_path)
    common = ["--stage", "finetune", "--model", tiny_qwen_dir, "--data", data, "--batch-size", 4, "--max-steps", 4,
              "--threads", 1, "--checkpoint-dir", tmp_path / "ckpt", "--checkpoint-every", 1]
    assert _train_cli(*common, "--out", tmp_path / "a", "--stop-after-steps", 2).returncode == 137
    other = _train_cli(*common, "--out", tmp_path / "b", "--lr", "1e-3")
    assert other.returncode == 0 and "ignoring checkpoint" in other.stderr and "resuming" not in other.stderr
