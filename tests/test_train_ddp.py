"""Data parallel training with torchrun on CPU (gloo): the same run as one process.

Two ranks split each global batch of 5 (3 + 2 queries), all-gather the embeddings (cross-device
negatives) and sum their gradients; rank 1 also uses GradCache chunks of 2. The two ranks read the
data as two Parquet parts through one Arrow cache in the checkpoint folder (local rank 0 converts,
the other waits), the single process reads it as JSON Lines. The per-step losses,
each loss term and the gradient norm must equal those of one process with the same global batch,
and the final weights must agree within 1e-5. The weights alone would not catch a gradient off
by a constant factor (AdamW and clipping are scale-invariant): the gradient norm does.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kalm.io import read_jsonl
from kalm.training.config import TrainConfig
from kalm.training.distributed import rank_slices
from kalm.training.train import train


def _torchrun() -> list[str]:
    exe = Path(sys.executable).parent / "torchrun"
    return [str(exe)] if exe.exists() else [shutil.which("torchrun") or "torchrun"]


def test_rank_slices_split_a_batch_contiguously():
    assert rank_slices(5, 2) == [(0, 3), (3, 5)]
    assert rank_slices(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]  # a small batch leaves ranks empty
    assert [b - a for a, b in rank_slices(17, 8)] == [3] + [2] * 7


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # train(threads=1) sets it for the whole test process


def test_torchrun_two_ranks_match_one_process(tmp_path, tiny_qwen_dir, restore_threads):
    from safetensors.torch import load_file

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
    recs[3]["neg"] = recs[3]["neg"][:1]  # kept short: one step has a ragged negative count to gather
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    # τ = 0.05: at τ = 0.01 logits amplify float noise 100x (the gradients still agree to ~1e-4 relative)
    cfg = TrainConfig(
        stage="finetune",
        batch_size=5,
        group_size=3,
        lr=2e-4,
        temperature=0.05,
        max_steps=2,
        threads=1,
        few_negatives="keep",
        focal_gamma=0.5,
        mix_negatives=2,
        matryoshka_dims=(64, 16),
        matryoshka_weights=(1.0, 0.3),
    )
    train(tiny_qwen_dir, str(data), str(tmp_path / "single"), cfg, {})

    from kalm.data.shards import write_shard

    parts = [tmp_path / "p0.parquet", tmp_path / "p1.parquet"]
    write_shard(parts[0], recs[:4])
    write_shard(parts[1], recs[4:])
    args = [
        "--stage",
        "finetune",
        "--model",
        tiny_qwen_dir,
        "--data",
        *parts,
        "--out",
        tmp_path / "ddp",
        "--checkpoint-dir",
        tmp_path / "ckpt",
        "--batch-size",
        5,
        "--group-size",
        3,
        "--lr",
        "2e-4",
        "--temperature",
        0.05,
        "--max-steps",
        2,
        "--threads",
        1,
        "--few-negatives",
        "keep",
        "--focal-gamma",
        0.5,
        "--mix-negatives",
        2,
        "--matryoshka-dims",
        64,
        16,
        "--matryoshka-weights",
        1.0,
        0.3,
        "--mini-batch-size",
        2,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [*_torchrun(), "--standalone", "--nproc-per-node", "2", "-m", "kalm", "train", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert "batch 5 over 2 process(es)" in res.stderr

    single, ddp = list(read_jsonl(tmp_path / "single.metrics.jsonl")), list(read_jsonl(tmp_path / "ddp.metrics.jsonl"))
    assert len(ddp) == len(single) == 2 and [m["short_records"] for m in ddp] == [m["short_records"] for m in single]
    for a, b in zip(single, ddp):
        assert a["task"] == b["task"] and a["passages"] == b["passages"]  # the same batches
        for key in ("loss", "loss_infonce", "loss_focal", "loss_dim64", "loss_dim16"):
            assert abs(a[key] - b[key]) < 1e-5, (key, a[key], b[key])
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * a["grad_norm"]
    assert json.loads((tmp_path / "ddp.stats.json").read_text())["world_size"] == 2
    assert not (tmp_path / "ckpt" / "arrow").exists()  # the Arrow cache goes with the checkpoint

    w0 = load_file(Path(tiny_qwen_dir) / "model.safetensors")
    w1 = load_file(next((tmp_path / "single").rglob("model.safetensors")))
    w2 = load_file(next((tmp_path / "ddp").rglob("model.safetensors")))
    assert w1.keys() == w2.keys() <= w0.keys()
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    assert max((w1[k] - w0[k]).abs().max().item() for k in w1) > 1e-4  # and both did train
