"""Uniform soup: of identical models equals the model; in general equals the parameter mean."""

import shutil

import pytest
import torch

from kalm.modeling import load_embedding_model, save_model
from kalm.soup import uniform_soup


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tiny_qwen_dir):
    root = tmp_path_factory.mktemp("soup")
    a = load_embedding_model(tiny_qwen_dir)
    save_model(a, str(root / "a"))
    b = load_embedding_model(tiny_qwen_dir)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_model(b, str(root / "b"))
    return root


def test_soup_of_identical_models_is_the_model(two_models, tmp_path):
    uniform_soup([str(two_models / "a"), str(two_models / "a")], str(tmp_path / "s"))
    a = load_embedding_model(str(two_models / "a")).state_dict()
    s = load_embedding_model(str(tmp_path / "s")).state_dict()
    assert all(torch.equal(a[k], s[k]) for k in a)


def test_uniform_soup_is_the_parameter_mean(two_models, tmp_path):
    uniform_soup([str(two_models / "a"), str(two_models / "b")], str(tmp_path / "s"))
    a = load_embedding_model(str(two_models / "a")).state_dict()
    b = load_embedding_model(str(two_models / "b")).state_dict()
    s = load_embedding_model(str(tmp_path / "s")).state_dict()
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(s[k], (a[k] + b[k]) / 2, atol=1e-6), k


def test_soup_refuses_different_tokenizers(two_models, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(two_models / "b", other)
    tok = next(other.rglob("tokenizer.json"))
    tok.write_text(tok.read_text().replace('"<|endoftext|>"', '"<|end|>"', 1))
    with pytest.raises(ValueError, match="different tokenizers"):
        uniform_soup([str(two_models / "a"), str(other)], str(tmp_path / "s"))
