"""The model card of a trained model: what the pipeline knows, written as a hub ``README.md``.

sentence-transformers reuses the loaded model's card when a model was not trained by its own trainer, so
without this the soup's README is its base model's, byte for byte. The card is a
``huggingface_hub.ModelCard`` whose metadata (``ModelCardData``: language, license, library, base_model,
tags, datasets, and ``model-index`` from ``EvalResult`` entries with the MTEB scores) the hub validates,
and whose body says: the base model, the recipe's stages and hyper-parameters, the training tasks with
their record counts (the data funnel's stats), the decontamination report, the MTEB scores of the base
and of this model, the prompts it carries and how to load it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# the training options a card lists, in this order (TrainConfig names), where the stage sets them
CARD_TRAIN_KEYS = (
    "batch_size",
    "group_size",
    "lr",
    "temperature",
    "epochs",
    "max_steps",
    "warmup_ratio",
    "precision",
    "focal_gamma",
    "hard_negative_mixing",
    "matryoshka",
    "homogeneous_ratio",
)
LANGUAGE_CODES = {"zh": "zh", "en": "en"}  # eval language keys are ISO 639-1 already; others pass through


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v).replace("|", "\\|"))

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def eval_results(results: dict[str, dict]) -> list:
    """``EvalResult`` entries (the card's ``model-index``) of every task of every language's aggregate."""
    from huggingface_hub import EvalResult

    out = []
    for agg in results.values():
        for task, r in sorted(agg["tasks"].items()):
            out.append(
                EvalResult(
                    task_type=r["type"],
                    dataset_type=f"mteb/{task}",
                    dataset_name=f"MTEB {task}",
                    metric_type=r["metric"],
                    metric_value=round(float(r["main_score"]), 6),
                    source_name="MTEB (kalm-pipeline)",
                    source_url="https://github.com/embeddings-benchmark/mteb",
                )
            )
    return out


def funnel_rows(funnel: dict[str, list[dict]]) -> list[list[Any]]:
    """(stage, task, raw records, records trained on, dropped on the way by reason) from the data funnel
    (kalm.report.load_funnel: each step's per-task in / kept / dropped)."""
    rows = []
    for stage, steps in funnel.items():
        if not steps:
            continue
        for task in sorted({t for s in steps for t in s["per_task"]}):
            seen = [s["per_task"][task] for s in steps if task in s["per_task"]]
            dropped: dict[str, int] = {}
            for t in seen:
                for reason, n in t["dropped"].items():
                    dropped[reason] = dropped.get(reason, 0) + n
            why = ", ".join(f"{r} {n}" for r, n in sorted(dropped.items()) if n)
            rows.append([stage, task, seen[0]["in"], seen[-1]["kept"], why])
    return rows


def decontamination_lines(contamination: dict[str, dict]) -> list[str]:
    """One line per (stage, evaluation task) of the decontamination reports."""
    lines = []
    for stage, report in contamination.items():
        for task, r in sorted(report.items()):
            if "skipped" in r:
                lines.append(f"- {stage} vs {task}: not checked ({r['skipped']})")
            else:
                lines.append(
                    f"- {stage} vs {task}: {r.get('overlapping_records', 0)} overlapping training records removed "
                    f"(exact {r.get('exact_records', 0)}, near {r.get('near_records', 0)}, contained "
                    f"{r.get('contained_records', 0)}) against {r.get('texts', '?')} evaluation texts"
                )
    return lines


def source_rows(recipe: dict) -> list[list[Any]]:
    """(stage, task, hub repository or folder, is local, revision, licence) of the data tasks given as sources."""
    rows = []
    for stage, tasks in (recipe.get("data") or {}).items():
        for task, spec in sorted(tasks.items()):
            src = spec.get("source") if isinstance(spec, dict) else None
            if src:
                where = src.get("hf") or src.get("local")
                rows.append([stage, task, where, bool(src.get("local")), src.get("revision"), src.get("license")])
    return rows


def build_card(
    *,
    name: str,
    recipe: dict,
    prompts: dict[str, str],
    results: dict[str, dict],
    funnel: dict[str, list[dict]],
    contamination: dict[str, dict],
    license: str | None,
    base_model_id: str | None,
    prompt_check: dict[str, dict] | None = None,
    datasets: list[str] | None = None,
):
    """The ``huggingface_hub.ModelCard`` of model ``name`` (``<org>/<name>``)."""
    from huggingface_hub import ModelCard, ModelCardData

    languages = sorted({LANGUAGE_CODES.get(lang, lang) for lang in results})
    sources = source_rows(recipe)
    datasets = datasets or sorted({row[2] for row in sources if not row[3]}) or None
    data = ModelCardData(
        model_name=name,
        language=languages or None,
        license=license,
        library_name="sentence-transformers",
        pipeline_tag="sentence-similarity",
        base_model=base_model_id,
        datasets=datasets or None,
        tags=["sentence-transformers", "feature-extraction", "sentence-similarity", "mteb", "kalm-pipeline"],
        eval_results=eval_results(results) or None,
    )
    parts = [f"# {name.split('/', 1)[1]}", ""]
    parts.append(
        f"A text-embedding model trained with [kalm-pipeline](https://github.com/kalm-pipeline/kalm-pipeline) "
        f"on the KaLM-Embedding recipe, from `{base_model_id or recipe.get('base_model')}` "
        f"(pipeline spec `{recipe.get('base_model')}`). Mean pooling, cosine similarity, "
        f"max sequence length {recipe.get('max_seq_length')}."
    )
    parts += ["", "## Usage", "", "```python", "from sentence_transformers import SentenceTransformer", ""]
    parts += [
        f'model = SentenceTransformer("{name}")',
        'queries = model.encode_query(["how tall is the tower?"])  # applies the `query` prompt',
        'docs = model.encode_document(["The tower is 300 metres tall."])  # no prefix',
        "print(model.similarity(queries, docs))",
        "```",
        "",
        "Task-specific instructions are stored as named prompts (below): "
        '`model.encode(texts, prompt_name="<task or Task-query>")`. mteb picks them up by task name or type.',
    ]
    parts += ["", "## Training", ""]
    stages = [s for s in ("pretrain", "finetune") if recipe.get(s) and recipe[s].get("enabled", True)]
    rows = []
    for s in stages:
        section = recipe[s]
        rows.append([s, ", ".join(f"{k}={json.dumps(section[k])}" for k in CARD_TRAIN_KEYS if k in section)])
    if recipe.get("finetune_runs"):
        rows.append(["soup", f"{recipe.get('soup', {}).get('method', 'uniform')} over {recipe['finetune_runs']} runs"])
    parts.append(_table(["stage", "hyper-parameters"], rows))
    rows = funnel_rows(funnel)
    if rows:
        parts += ["", "### Training data", ""]
        parts.append(_table(["stage", "task", "raw records", "records trained on", "dropped (reason n)"], rows))
    if sources:
        parts += ["", "### Sources", ""]
        parts.append(_table(["stage", "task", "source", "local", "revision", "licence"], sources))
    decont = decontamination_lines(contamination)
    if decont:
        parts += ["", "### Decontamination", "", *decont]
    parts += ["", "## Evaluation (MTEB)", ""]
    rows = []
    for lang, agg in sorted(results.items()):
        base = agg.get("baseline", {}).get("tasks", {})
        for task, r in sorted(agg["tasks"].items()):
            b = base.get(task)
            b = b.get("main_score") if isinstance(b, dict) else b
            rows.append([lang, task, r["type"], r["metric"], b, r["main_score"]])
        rows.append([lang, "**mean (task)**", "", "", agg.get("baseline", {}).get("mean_task"), agg.get("mean_task")])
    parts.append(_table(["lang", "task", "type", "metric", "base model", "this model"], rows))
    if prompt_check:
        bad = sorted(t for t, c in prompt_check.items() if not c["reproduced"])
        parts += [
            "",
            "Scores come from `kalm evaluate` (mteb's evaluator with the prompts below). mteb's runner on this "
            "model alone applies the same prompts to "
            + (
                "every task above."
                if not bad
                else f"every task but {', '.join(bad)} (local tasks mteb does not know by name share "
                "their type's prompt, that of the first task of the type)."
            ),
        ]
    parts += ["", "## Prompts", "", "Stored in `config_sentence_transformers.json` (`prompts`):", ""]
    parts.append(_table(["name", "prefix"], [[k, json.dumps(v, ensure_ascii=False)] for k, v in prompts.items()]))
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(parts) + "\n")


def base_card_license(model_dir: str | Path) -> str | None:
    """The ``license`` of a model folder's card metadata, if it has one."""
    from huggingface_hub import ModelCard

    readme = Path(model_dir) / "README.md"
    if not readme.exists():
        return None
    try:
        return ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # a card without valid metadata: no licence to inherit
        return None
