"""Model soups: average the parameters of fine-tuned checkpoints of one architecture.

- uniform: θ = 1/R Σ_r θ_r (Wortsman et al. 2022, "Model soups", arXiv 2203.05482; KaLM merges
  its fine-tune runs this way);
- weighted: θ = Σ_r w_r θ_r with Σ w_r = 1, the weights given, or derived from each ingredient's
  dev-set loss as w = softmax(-loss / T) (LM-Cocktail, Xiao et al. 2023, arXiv 2311.13534);
- greedy: ingredients sorted by dev score, each added to the soup only if the dev score of the
  uniform average does not drop (Wortsman et al. 2022, Recipe 1), so the soup never scores
  below its best ingredient on the dev task.

All ingredients must share architecture and tokenizer (checked, with a clear error).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path

import torch

from kalm.io import write_json

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def _tokenizer_fingerprint(model_dir: str) -> str:
    h = hashlib.sha256()
    for path in sorted(Path(model_dir).rglob("*")):
        if path.name in TOKENIZER_FILES and path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def load_ingredients(model_dirs: list[str]):
    """Load the models; refuse mixed tokenizers or architectures. Returns (models, state dicts)."""
    from kalm.modeling import load_embedding_model

    if not model_dirs:
        raise ValueError("soup needs at least one model")
    fingerprints = {d: _tokenizer_fingerprint(d) for d in model_dirs}
    if len(set(fingerprints.values())) > 1:
        raise ValueError(f"soup ingredients have different tokenizers: {sorted(fingerprints)}")
    models = [load_embedding_model(d) for d in model_dirs]
    # copies: state_dict() shares storage with the model, which the greedy soup overwrites while it tries
    states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
    for d, state in zip(model_dirs[1:], states[1:]):
        if state.keys() != states[0].keys() or any(state[k].shape != states[0][k].shape for k in state):
            raise ValueError(f"soup ingredient {d} has a different architecture than {model_dirs[0]}")
    return models, states


def average(states: list[dict], weights: list[float] | None = None) -> dict:
    """Weighted parameter average (float64 accumulation); non-float buffers come from the first."""
    weights = weights or [1.0 / len(states)] * len(states)
    if len(weights) != len(states) or abs(sum(weights) - 1) > 1e-6 or min(weights) < 0:
        raise ValueError(f"soup weights must be {len(states)} non-negative numbers summing to 1, got {weights}")
    out = {}
    for k, ref in states[0].items():
        if ref.is_floating_point():
            out[k] = sum(w * s[k].double() for w, s in zip(weights, states)).to(ref.dtype)
        else:
            out[k] = ref
    return out


def loss_weights(losses: list[float], temperature: float) -> list[float]:
    """LM-Cocktail weights: softmax(-loss / T); lower dev loss -> larger weight."""
    return torch.softmax(-torch.tensor(losses, dtype=torch.float64) / temperature, 0).tolist()


def dev_loss(model, task: dict, temperature: float = 0.05, max_pairs: int = 256) -> float:
    """InfoNCE of the model on (query, relevant passage) pairs of a local retrieval dev task."""
    from kalm.instructions import format_query
    from kalm.local_tasks import read_retrieval
    from kalm.losses import info_nce

    queries, corpus, qrels = read_retrieval(task["path"])
    text = {d["id"]: d["text"] for d in corpus}
    relevant = {q: [d for d, score in docs.items() if score > 0] for q, docs in qrels.items()}
    pairs = [(q["text"], text[relevant[q["id"]][0]]) for q in queries if relevant.get(q["id"])][:max_pairs]
    with torch.no_grad():
        q = model.encode([format_query(a, task.get("instruction")) for a, _ in pairs], convert_to_tensor=True,
                         normalize_embeddings=True)
        p = model.encode([b for _, b in pairs], convert_to_tensor=True, normalize_embeddings=True)
        return float(info_nce(q, p, temperature))


def dev_score(model, task: dict, batch_size: int = 64) -> float:
    """mteb's main score of the model on the dev task (same path as `kalm evaluate`)."""
    from kalm.evaluate import prepare_task, run_mteb

    mteb_task, prompts, _, _ = prepare_task(task)
    return float(run_mteb(model, mteb_task, prompts, batch_size).get_score())


def make_soup(model_dirs: list[str], out_dir: str, method: str = "uniform", weights: list[float] | None = None,
              dev_task: dict | None = None, temperature: float = 5.0, report_path: str | None = None) -> dict:
    from kalm.modeling import save_model

    models, states = load_ingredients(model_dirs)
    report: dict = {"method": method, "ingredients": list(model_dirs)}
    base = models[0]
    if method == "uniform":
        soup = average(states)
    elif method == "weighted":
        if weights is None:
            if dev_task is None:
                raise ValueError("weighted soup needs weights or a dev task to derive them from")
            report["dev_losses"] = [dev_loss(m, dev_task) for m in models]
            weights = loss_weights(report["dev_losses"], temperature)
        report["weights"] = weights
        soup = average(states, weights)
    elif method == "greedy":
        if dev_task is None:
            raise ValueError("greedy soup needs a dev task")
        scores = [dev_score(m, dev_task) for m in models]
        order = sorted(range(len(models)), key=lambda i: -scores[i])
        chosen, best = [order[0]], scores[order[0]]
        for i in order[1:]:
            base.load_state_dict(average([states[j] for j in chosen + [i]]))
            score = dev_score(base, dev_task)
            log.info("greedy soup: + %s -> %.4f (best %.4f)", model_dirs[i], score, best)
            if score >= best:
                chosen, best = chosen + [i], score
        report.update(dev_scores=scores, chosen=[model_dirs[i] for i in chosen], soup_dev_score=best)
        soup = average([states[j] for j in chosen])
    else:
        raise ValueError(f"unknown soup method {method!r} (uniform, weighted, greedy)")
    base.load_state_dict(soup)
    save_model(base, out_dir)
    if report_path:
        write_json(report_path, report)
    log.info("souped %d models into %s (%s)", len(model_dirs), out_dir, method)
    return report


def uniform_soup(model_dirs: list[str], out_dir: str) -> dict:
    return make_soup(model_dirs, out_dir, "uniform")


def _run(args: argparse.Namespace) -> None:
    dev = json.loads(args.dev_task_json) if args.dev_task_json else None
    make_soup(args.models, args.out, args.method, args.weights, dev, args.temperature, args.report)


def register(sub) -> None:
    p = sub.add_parser("soup", help="average fine-tuned models (uniform, weighted or greedy soup)")
    p.add_argument("models", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--method", choices=["uniform", "weighted", "greedy"], default="uniform")
    p.add_argument("--weights", type=float, nargs="+", help="weighted soup: one weight per model, summing to 1")
    p.add_argument("--dev-task-json", help="dev task spec (a local task) for greedy / loss-weighted soups")
    p.add_argument("--temperature", type=float, default=5.0, help="loss-weighted soup: softmax temperature")
    p.add_argument("--report", help="JSON with the weights / dev scores / chosen ingredients")
    p.set_defaults(func=_run)
