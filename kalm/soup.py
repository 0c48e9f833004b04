"""Model soups: average the parameters of fine-tuned checkpoints of one architecture.

- uniform: θ = 1/N Σ_i θ_i (Wortsman et al. 2022, "Model soups", arXiv 2203.05482; KaLM merges
  its fine-tune runs this way);
- weighted: θ = Σ_i w_i θ_i with Σ w_i = 1, the weights given, or derived from each ingredient's
  dev-set loss as w = softmax(-loss / T) (LM-Cocktail, Xiao et al. 2023, arXiv 2311.13534);
- greedy: ingredients sorted by dev score, each added to the soup only if the dev score of the
  uniform average does not drop (Wortsman et al. 2022, Recipe 1), so the soup never scores
  below its best ingredient on the dev task.

Ingredients are the R fine-tune runs (their final models) and, with ``last_k`` > 1, the k-1
snapshots each run kept before its end (``kalm.training.checkpoints.SnapshotKeeper``, written by the trainer), i.e. the
last k checkpoints of every run. All must share architecture and tokenizer (checked, with an error
naming the ingredient). Models are loaded one at a time (the average is a running float64 sum), so
memory is one model plus the sum, whatever the number of ingredients. Only floating-point tensors
are averaged; integer and bool ones (position ids, masks) are copied from the first ingredient
added (greedy: the best), with their dtype.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path

import torch

from kalm import options
from kalm.io import read_json, write_json
from kalm.training.checkpoints import SNAPSHOT_MANIFEST, weights_digest
from kalm.training.config import SoupConfig

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def _tokenizer_fingerprint(model_dir: str) -> str:
    """What makes two tokenizers give the same ids: vocabulary (added tokens included), special tokens,
    normalizer and pre-tokenizer. Not the files' bytes: a model saved by the trainer writes only
    tokenizer.json and a newer tokenizer_config.json, so it never matched the base model it came from
    (found by the soup with the base model as an ingredient, soup.include_base)."""
    from transformers import AutoTokenizer

    found = sorted(p.parent for p in Path(model_dir).rglob("*") if p.name in TOKENIZER_FILES and p.is_file())
    if not found:
        return ""
    tok = AutoTokenizer.from_pretrained(str(found[0]))
    backend = json.loads(tok.backend_tokenizer.to_str()) if getattr(tok, "is_fast", False) else {}
    key = {
        "vocab": sorted(tok.get_vocab().items()),
        "special": sorted(tok.all_special_tokens),
        "normalizer": backend.get("normalizer"),
        "pre_tokenizer": backend.get("pre_tokenizer"),
        "model": (backend.get("model") or {}).get("type"),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _architecture(model_dir: str) -> dict:
    """What must match between ingredients besides parameter names and shapes: the module stack and
    the backbone's model type (two backbones can share shapes and names yet compute differently)."""
    root = Path(model_dir)
    arch: dict = {}
    if (root / "modules.json").is_file():
        # class names: sentence-transformers 6 saves its modules under new import paths
        # (sentence_transformers.base.modules.transformer.Transformer for sentence_transformers.models.Transformer)
        arch["modules"] = [str(m.get("type")).rsplit(".", 1)[-1] for m in read_json(root / "modules.json")]
    if (root / "config.json").is_file():
        cfg = read_json(root / "config.json")
        arch["model_type"] = cfg.get("model_type")
        arch["architectures"] = cfg.get("architectures")
    return arch


def check_compatible(model_dirs: list[str]) -> None:
    """Refuse ingredients whose tokenizers or architectures (module stack, model type) differ."""
    if not model_dirs:
        raise ValueError("soup needs at least one model")
    first = model_dirs[0]
    tok, arch = _tokenizer_fingerprint(first), _architecture(first)
    for d in model_dirs[1:]:
        if _tokenizer_fingerprint(d) != tok:
            raise ValueError(f"soup ingredients have different tokenizers: {d} differs from {first}")
        other = _architecture(d)
        for key in sorted(set(arch) | set(other)):
            if arch.get(key) != other.get(key):
                raise ValueError(
                    f"soup ingredient {d} has a different architecture than {first}: "
                    f"{key} {other.get(key)!r} vs {arch.get(key)!r}"
                )


def _check_state(d: str, state: dict, ref: dict, ref_dir: str) -> None:
    if state.keys() != ref.keys():
        diff = sorted(set(state) ^ set(ref))[:3]
        raise ValueError(f"soup ingredient {d} has a different architecture than {ref_dir}: parameters {diff} differ")
    for k, v in state.items():
        if v.shape != ref[k].shape:
            raise ValueError(
                f"soup ingredient {d} has a different architecture than {ref_dir}: "
                f"{k} has shape {tuple(v.shape)} vs {tuple(ref[k].shape)}"
            )


def load_ingredients(model_dirs: list[str]):
    """Load all models at once (small soups, tests); refuse mixed tokenizers or architectures.
    Returns (models, state dicts). ``make_soup`` itself loads one model at a time."""
    from kalm.models.modeling import load_embedding_model

    check_compatible(model_dirs)
    models = [load_embedding_model(d) for d in model_dirs]
    # copies: state_dict() shares storage with the model
    states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
    for d, state in zip(model_dirs[1:], states[1:]):
        _check_state(d, state, states[0], model_dirs[0])
    return models, states


def average(states: list[dict], weights: list[float] | None = None) -> dict:
    """Weighted parameter average (float64 accumulation); non-float buffers come from the first."""
    weights = _check_weights(weights, len(states))
    acc = _Accumulator()
    for w, s in zip(weights, states):
        acc.add(s, w)
    return acc.result()


def _check_weights(weights: list[float] | None, n: int) -> list[float]:
    weights = list(weights) if weights is not None else [1.0 / n] * n
    if len(weights) != n or abs(sum(weights) - 1) > 1e-6 or min(weights) < 0:
        raise ValueError(f"soup weights must be {n} non-negative numbers summing to 1, got {weights}")
    return weights


class _Accumulator:
    """Running Σ w_i θ_i in float64; ``result(scale)`` casts back to each parameter's dtype."""

    def __init__(self) -> None:
        self.sum: dict | None = None
        self.dtypes: dict = {}

    def add(self, state: dict, weight: float = 1.0) -> None:
        if self.sum is None:
            self.sum, self.dtypes = {}, {k: v.dtype for k, v in state.items()}
            for k, v in state.items():
                # non-float buffers (position ids) are not averaged: the first ingredient's are kept
                self.sum[k] = weight * v.detach().double() if v.is_floating_point() else v.detach().clone()
            return
        for k, v in state.items():
            if v.is_floating_point():
                self.sum[k] += weight * v.detach().double()

    def result(self, scale: float = 1.0, extra: dict | None = None) -> dict:
        """``scale * (sum [+ extra])`` as a state dict (``extra``: a trial ingredient, not kept)."""
        out = {}
        for k, v in self.sum.items():
            if not v.is_floating_point():
                out[k] = v
                continue
            total = v + extra[k].detach().double() if extra is not None else v
            out[k] = (total * scale if scale != 1.0 else total).to(self.dtypes[k])
        return out


# --------------------------------------------------------------------------------------------
# The last k checkpoints of a run: snapshots the trainer keeps, read back here
# --------------------------------------------------------------------------------------------


def last_k_ingredients(final_dir: str, snapshots: str | Path | None, k: int) -> list[str]:
    """The last ``k`` checkpoints of one run, oldest first: ``k - 1`` snapshots and the final model."""
    if k < 1:
        raise ValueError(f"last_k must be at least 1, got {k}")
    if k == 1:
        return [str(final_dir)]
    folder = Path(snapshots) if snapshots else None
    manifest_path = folder / SNAPSHOT_MANIFEST if folder else None
    if manifest_path is None or not manifest_path.is_file():
        raise ValueError(
            f"soup last_k={k}: run {final_dir} has no snapshots ({manifest_path} not found); the "
            f"trainer keeps them when started with --keep-snapshots and --snapshot-every"
        )
    manifest = read_json(manifest_path)
    if not manifest.get("finished"):
        raise ValueError(f"soup: the snapshots in {folder} belong to a run that did not finish ({manifest_path})")
    if manifest.get("final_weights") != weights_digest(final_dir):
        raise ValueError(
            f"soup: the snapshots in {folder} belong to another training run than {final_dir} "
            f"(its weights differ from those recorded in {manifest_path}); re-run the fine-tuning"
        )
    steps = [s for s in manifest.get("steps", []) if s < manifest.get("final_step", float("inf"))]
    dirs = [folder / f"step-{s:08d}" for s in steps]
    dirs = [d for d in dirs if d.is_dir()]
    if len(dirs) < k - 1:
        raise ValueError(
            f"soup last_k={k}: run {final_dir} kept {len(dirs)} snapshots before its final model in "
            f"{folder}, {k - 1} needed (lower soup.last_k or snapshot more often)"
        )
    return [str(d) for d in dirs[len(dirs) - (k - 1) :]] + [str(final_dir)]


def loss_weights(losses: list[float], temperature: float) -> list[float]:
    """LM-Cocktail weights: softmax(-loss / T); lower dev loss -> larger weight."""
    return torch.softmax(-torch.tensor(losses, dtype=torch.float64) / temperature, 0).tolist()


def dev_loss(model, task: dict, temperature: float = 0.05, max_pairs: int = 256) -> float:
    """InfoNCE of the model on (query, relevant passage) pairs of a local retrieval dev task."""
    from kalm.evaluation.instructions import format_query
    from kalm.evaluation.local_tasks import read_retrieval
    from kalm.losses import info_nce

    queries, corpus, qrels = read_retrieval(task["path"])
    text = {d["id"]: d["text"] for d in corpus}
    relevant = {q: [d for d, score in docs.items() if score > 0] for q, docs in qrels.items()}
    pairs = [(q["text"], text[relevant[q["id"]][0]]) for q in queries if relevant.get(q["id"])][:max_pairs]
    with torch.no_grad():
        q = model.encode(
            [format_query(a, task.get("instruction")) for a, _ in pairs],
            convert_to_tensor=True,
            normalize_embeddings=True,
        )
        p = model.encode([b for _, b in pairs], convert_to_tensor=True, normalize_embeddings=True)
        return float(info_nce(q, p, temperature))


def dev_score(model, task, batch_size: int = 64) -> float:
    """mteb's main score of the model on the dev task (same path as `kalm evaluate`).

    ``task`` is a task spec, or a :class:`kalm.evaluation.evaluate.PreparedTask` to score several models
    without loading the task's data again."""
    from kalm.evaluation.evaluate import PreparedTask, prepare_task, run_mteb

    prep = task if isinstance(task, PreparedTask) else prepare_task(task)
    return float(run_mteb(model, prep.task, prep.prompts, batch_size).get_score())


def _expand_weights(weights: list[float] | None, runs: int, k: int, base: int = 0) -> list[float] | None:
    """Weights per ingredient: given per ingredient (R*k), or per run (R) and split evenly over its k; with
    the start model as an ingredient (``base`` = 1), one more weight for it, last."""
    if weights is None or len(weights) == runs * k + base:
        return weights
    if len(weights) == runs + base:
        return [w / k for w in weights[:runs] for _ in range(k)] + list(weights[runs:])
    extra = " and one for the start model, last" if base else ""
    raise ValueError(
        f"soup weights: got {len(weights)}, need one per run ({runs}) or per ingredient ({runs * k}){extra}"
    )


def objective_tasks(dev_task: dict | None, guard_tasks: list[dict] | None) -> list[dict]:
    """The tasks the weighted and greedy soups decide on: the dev task, then the guard tasks."""
    return ([dev_task] if dev_task else []) + list(guard_tasks or [])


def _task_name(task: dict) -> str:
    return task.get("name") or str(task.get("path"))


def make_soup(
    model_dirs: list[str],
    out_dir: str,
    method: str = "uniform",
    weights: list[float] | None = None,
    dev_task: dict | None = None,
    temperature: float = 5.0,
    report_path: str | None = None,
    last_k: int = 1,
    snapshot_dirs: list[str] | None = None,
    prompts: dict[str, str] | None = None,
    base_model: str | None = None,
    guard_tasks: list[dict] | None = None,
) -> dict:
    """Soup the runs ``model_dirs`` (their final models and, with ``last_k`` > 1, the ``last_k - 1``
    snapshots each kept in the matching ``snapshot_dirs``) into a sentence-transformers model.

    ``base_model``: the model fine-tuning started from, one more ingredient (last), as LM-Cocktail (Xiao et
    al. 2023, arXiv 2311.13534) mixes the base model back in against forgetting. ``guard_tasks``: held-out
    tasks of what must not be forgotten; the loss-weighted soup's loss and the greedy soup's score of an
    ingredient are the means over ``dev_task`` and these (each task's values are in the report)."""
    from kalm.models.modeling import load_embedding_model, save_model

    if method not in ("uniform", "weighted", "greedy"):
        raise ValueError(f"unknown soup method {method!r} (uniform, weighted, greedy)")
    if last_k > 1 and (snapshot_dirs is None or len(snapshot_dirs) != len(model_dirs)):
        raise ValueError(
            f"soup last_k={last_k} needs one snapshot folder per run ({len(model_dirs)}), "
            f"got {0 if snapshot_dirs is None else len(snapshot_dirs)}"
        )
    ingredients = [
        d
        for i, run in enumerate(model_dirs)
        for d in last_k_ingredients(run, snapshot_dirs[i] if snapshot_dirs else None, last_k)
    ]
    if base_model:
        from kalm.models.modeling import resolve_model_path

        ingredients.append(str(resolve_model_path(base_model)))
    check_compatible(ingredients)
    report: dict = {"method": method, "runs": list(model_dirs), "last_k": last_k, "ingredients": ingredients}
    if base_model:
        report["base_model"] = base_model
    tasks = objective_tasks(dev_task, guard_tasks)
    if guard_tasks:
        report["guard_tasks"] = [_task_name(t) for t in guard_tasks]

    base = load_embedding_model(ingredients[0])
    ref = {k: v.detach().clone() for k, v in base.state_dict().items()}

    def state_of(i: int) -> dict:
        """Ingredient i's parameters (the first is kept as ``ref``: ``base`` is overwritten while trying)."""
        if i == 0:
            return ref
        state = load_embedding_model(ingredients[i]).state_dict()
        _check_state(ingredients[i], state, ref, ingredients[0])
        return state

    def with_model(i: int, fn):
        model = base if i == 0 else load_embedding_model(ingredients[i])
        if i == 0:
            base.load_state_dict(ref)
        return fn(model)

    acc = _Accumulator()
    if method in ("uniform", "weighted"):
        if method == "weighted":
            weights = _expand_weights(weights, len(model_dirs), last_k, int(bool(base_model)))
            if weights is None:
                if not tasks:
                    raise ValueError("weighted soup needs weights or a dev task to derive them from")
                per_task = [with_model(i, lambda m: [dev_loss(m, t) for t in tasks]) for i in range(len(ingredients))]
                report["task_losses"] = {_task_name(t): [row[j] for row in per_task] for j, t in enumerate(tasks)}
                report["dev_losses"] = [sum(row) / len(row) for row in per_task]
                weights = loss_weights(report["dev_losses"], temperature)
            report["weights"] = weights
        weights = _check_weights(weights if method == "weighted" else None, len(ingredients))
        for i, w in enumerate(weights):
            acc.add(state_of(i), w)
        soup = acc.result()
    else:
        if dev_task is None:
            raise ValueError("greedy soup needs a dev task")
        from kalm.evaluation.evaluate import prepare_task

        prepared_tasks = [prepare_task(t) for t in tasks]

        def objective(m) -> float:  # the mean main score over the dev task and the guards
            return sum(dev_score(m, p) for p in prepared_tasks) / len(prepared_tasks)

        scores = [with_model(i, objective) for i in range(len(ingredients))]
        order = sorted(range(len(ingredients)), key=lambda i: -scores[i])
        chosen, best = [order[0]], scores[order[0]]
        acc.add(state_of(order[0]))
        for i in order[1:]:
            state = state_of(i)
            base.load_state_dict(acc.result(1.0 / (len(chosen) + 1), extra=state))
            score = objective(base)
            log.info("greedy soup: + %s -> %.4f (best %.4f)", ingredients[i], score, best)
            if score >= best:
                acc.add(state)
                chosen, best = chosen + [i], score
        report.update(dev_scores=scores, chosen=[ingredients[i] for i in chosen], soup_dev_score=best)
        soup = acc.result(1.0 / len(chosen))
    base.load_state_dict(soup)
    save_model(base, out_dir, prompts)
    if report_path:
        write_json(report_path, report)
    log.info("souped %d checkpoints of %d runs into %s (%s)", len(ingredients), len(model_dirs), out_dir, method)
    return report


def uniform_soup(model_dirs: list[str], out_dir: str) -> dict:
    return make_soup(model_dirs, out_dir, "uniform")


def _run(args: argparse.Namespace) -> None:
    dev = json.loads(args.dev_task_json) if args.dev_task_json else None
    guards = json.loads(args.guard_task_json) if args.guard_task_json else None
    c = options.from_args(SoupConfig, args, json.loads(args.options) if args.options else None)
    make_soup(
        args.models,
        args.out,
        c.method,
        list(c.weights) or None,
        dev,
        c.temperature,
        args.report,
        last_k=c.last_k,
        snapshot_dirs=args.snapshots,
        prompts=read_json(args.prompts) if args.prompts else None,
        base_model=args.base_model if c.include_base else None,
        guard_tasks=guards,
    )


def register(sub) -> None:
    p = sub.add_parser("soup", help="average fine-tuned models (uniform, weighted or greedy soup)")
    p.add_argument("models", nargs="+", help="the fine-tune runs' final models")
    p.add_argument("--out", required=True)
    p.add_argument("--dev-task-json", help="dev task spec (a local task) for greedy / loss-weighted soups")
    p.add_argument("--guard-task-json", help="JSON list of guard task specs (local tasks), beside the dev task")
    p.add_argument("--base-model", help="with --include-base: the model fine-tuning started from")
    p.add_argument("--options", help="the config's soup section as JSON (SoupConfig's keys); flags win")
    options.add_arguments(p, SoupConfig)
    p.add_argument(
        "--snapshots", nargs="+", help="with --last-k > 1: each run's snapshot folder, in the order of the models"
    )
    p.add_argument("--prompts", help="prompts JSON (kalm prompts) the souped model carries")
    p.add_argument("--report", help="JSON with the ingredients, weights / dev scores / chosen ingredients")
    p.set_defaults(func=_run)
