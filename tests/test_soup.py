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


@pytest.fixture(scope="module")
def dev_task(tmp_path_factory):
    """A small local retrieval task (the first 40 demo questions) as the soup's dev set."""
    import json
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "data/demo/eval/DemoRetrievalEn"
    dst = tmp_path_factory.mktemp("dev") / "DevRetrieval"
    dst.mkdir()
    queries = [json.loads(line) for line in (src / "queries.jsonl").read_text(encoding="utf-8").splitlines()[:40]]
    keep = {q["id"] for q in queries}
    qrels = [line for line in (src / "qrels.tsv").read_text(encoding="utf-8").splitlines()[1:] if line.split("\t")[0] in keep]
    (dst / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    (dst / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(qrels) + "\n", encoding="utf-8")
    (dst / "corpus.jsonl").write_text((src / "corpus.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    return {"name": "DevRetrieval", "type": "Retrieval", "lang": "en", "path": str(dst)}


def test_weighted_soup_with_given_weights(two_models, tmp_path):
    from kalm.soup import make_soup

    report = make_soup([str(two_models / "a"), str(two_models / "b")], str(tmp_path / "s"), "weighted", [0.25, 0.75])
    a = load_embedding_model(str(two_models / "a")).state_dict()
    b = load_embedding_model(str(two_models / "b")).state_dict()
    s = load_embedding_model(str(tmp_path / "s")).state_dict()
    assert report["weights"] == [0.25, 0.75]
    assert all(torch.allclose(s[k], 0.25 * a[k] + 0.75 * b[k], atol=1e-6) for k in a if a[k].is_floating_point())
    with pytest.raises(ValueError, match="summing to 1"):
        make_soup([str(two_models / "a"), str(two_models / "b")], str(tmp_path / "t"), "weighted", [0.5, 0.6])


def test_loss_weights_favour_the_lower_dev_loss(two_models, tmp_path, dev_task):
    from kalm.soup import loss_weights, make_soup

    assert loss_weights([1.0, 2.0], 1.0)[0] > 0.7 and sum(loss_weights([3.0, 1.0, 2.0], 5.0)) == pytest.approx(1)
    report = make_soup([str(two_models / "a"), str(two_models / "b")], str(tmp_path / "s"), "weighted",
                       dev_task=dev_task, temperature=0.1)
    losses, weights = report["dev_losses"], report["weights"]
    assert (weights[0] > weights[1]) == (losses[0] < losses[1]) and sum(weights) == pytest.approx(1)


def test_greedy_soup_never_scores_below_its_best_ingredient(two_models, tmp_path, dev_task):
    from kalm.modeling import load_embedding_model as load
    from kalm.soup import dev_score, make_soup

    dirs = [str(two_models / "a"), str(two_models / "b"), str(two_models / "a")]
    report = make_soup(dirs, str(tmp_path / "s"), "greedy", dev_task=dev_task, report_path=str(tmp_path / "r.json"))
    best = max(report["dev_scores"])
    assert report["soup_dev_score"] >= best
    assert dev_score(load(str(tmp_path / "s")), dev_task) == pytest.approx(report["soup_dev_score"], abs=1e-6)
    assert report["chosen"][0] == dirs[report["dev_scores"].index(best)]
