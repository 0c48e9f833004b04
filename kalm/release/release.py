"""``kalm release``: the folder a user publishes, ``release/<org>__<name>/`` (`snakemake release`).

- ``model/``: the model (the soup) with its prompts in ``config_sentence_transformers.json``
  (kalm.release.prompts) and its own card as ``README.md`` (kalm.release.card): what ``push_to_hub``
  uploads;
- ``model_meta.json``: mteb's ``ModelMeta`` of the model (``ModelMeta.from_sentence_transformer_model``, then
  name, revision, languages, licence, embedding dims including the Matryoshka dims, max tokens, training
  datasets, instructions);
- ``results/<org>__<name>/<revision>/<Task>.json`` (+ ``model_meta.json``): the evaluation jobs' mteb
  TaskResult files in the layout of mteb's results repository, written by mteb's own ``ResultCache``;
- ``release.json``: what was released, from which files, and which evaluated tasks mteb's runner alone
  scores with the same prompts.

``--push`` (config ``release.push``) is a second step, :func:`push`: it uploads ``model/`` with
huggingface_hub when a token and the network exist, and otherwise stops before the network with a message
naming the folder and the command that publishes it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

from kalm import options
from kalm.io import atomic_path, read_json, write_json
from kalm.release.config import ReleaseConfig, folder_name

ST_CONFIG = "config_sentence_transformers.json"
MTEB_LANGUAGES = {"en": "eng-Latn", "zh": "cmn-Hans"}  # eval language key -> mteb's ISO 639-3 + script


class ReleaseError(RuntimeError):
    """The release cannot be built or pushed as configured."""


def write_prompts(model_dir: str | Path, prompts: dict[str, str]) -> None:
    """Store ``prompts`` in a saved model's ``config_sentence_transformers.json`` (default prompt: none)."""
    path = Path(model_dir) / ST_CONFIG
    cfg = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    cfg["prompts"] = dict(prompts)
    cfg["default_prompt_name"] = None
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def prompt_check(prompts: dict[str, str], eval_specs: list[dict]) -> dict[str, dict]:
    """{task: {"kalm": what kalm evaluate applies per side, "mteb": what mteb's runner alone would,
    "reproduced"}} for every evaluated task (kalm.release.prompts.mteb_resolution)."""
    from kalm.release.prompts import DOCUMENT, QUERY, eval_task_prompts, mteb_resolution, mteb_valid_prompts

    valid = mteb_valid_prompts(prompts)  # once: mteb looks every key it does not know up in its registry
    out = {}
    for spec in eval_specs:
        name, task_type, sides = eval_task_prompts(spec)
        # the sides the task is encoded with are the keys side_prompts wrote for it
        side_of = {f"{name}-{QUERY}": QUERY, f"{name}-{DOCUMENT}": DOCUMENT, name: "none"}
        wanted = {side_of[key]: prefix for key, prefix in sides.items()}
        got = mteb_resolution(prompts, valid, SimpleNamespace(name=name, type=task_type))
        out[name] = {
            "type": task_type,
            "kalm": wanted,
            "mteb": {side: got[side] for side in wanted},
            "reproduced": all(wanted[side] == got[side] for side in wanted),
        }
    return out


def model_meta(model, name: str, revision: str, recipe: dict, opts: ReleaseConfig, languages: list[str]):
    """mteb's ``ModelMeta`` of the released model."""
    from mteb.models import ModelMeta
    from mteb.models.model_meta import ScoringFunction

    meta = ModelMeta.from_sentence_transformer_model(model)
    dim = model.get_sentence_embedding_dimension()
    dims = sorted({dim, *((recipe.get("finetune") or {}).get("matryoshka", {}).get("dims") or [])}, reverse=True)
    train_tasks = set((recipe.get("data") or {}).get("finetune", {})) | set(
        (recipe.get("data") or {}).get("pretrain", {})
    )
    registered = _registered_tasks(train_tasks)
    n_params = sum(p.numel() for p in model.parameters())
    bytes_per = next(model.parameters()).element_size()
    update = {
        "name": name,
        "n_parameters": n_params,
        "memory_usage_mb": round(n_params * bytes_per / 2**20, 1),
        "revision": revision,
        "release_date": datetime.date.today().isoformat(),
        "languages": [MTEB_LANGUAGES.get(lang, lang) for lang in languages],
        "license": opts.license,
        "open_weights": True,
        "max_tokens": model.max_seq_length,
        "embed_dim": dims if len(dims) > 1 else dim,
        "similarity_fn_name": ScoringFunction.COSINE,
        "use_instructions": True,
        "framework": ["Sentence Transformers", "PyTorch"],
        "training_datasets": registered or None,
        "adapted_from": recipe.get("base_model_id"),
        "public_training_code": "https://github.com/kalm-pipeline/kalm-pipeline",
        "loader": None,
    }
    return meta.model_copy(update=update)


def _registered_tasks(names) -> set[str]:
    """The training task names that are registered MTEB tasks (their training data is an MTEB task's)."""
    import mteb

    out = set()
    for n in names:
        try:
            mteb.get_task(n)
            out.add(n)
        except KeyError:
            pass
    return out


def build_release(
    model_dir: str,
    out_dir: str,
    *,
    opts: ReleaseConfig,
    recipe: dict,
    aggregates: list[str],
    task_results: list[str],
    funnel: dict[str, list[dict]],
    contamination: dict[str, dict],
    eval_specs: list[dict],
    prompts: dict[str, str] | None = None,
) -> dict:
    """Write the release folder (atomically); return its ``release.json``."""
    import mteb
    from mteb.cache import ResultCache

    from kalm.models.modeling import load_embedding_model
    from kalm.release.card import base_card_license, build_card
    from kalm.training.checkpoints import weights_digest

    results = {}
    for path in aggregates:
        agg = read_json(path)
        results[agg.get("lang") or Path(path).stem.rsplit("_", 1)[-1]] = agg
    if opts.license is None:
        from kalm.models.modeling import resolve_model_path

        base = recipe.get("base_model")
        opts.license = base_card_license(resolve_model_path(base)) if base else None
    digest = weights_digest(model_dir)
    revision = opts.revision or digest[:12]
    with atomic_path(out_dir, is_dir=True) as tmp:
        model_out = tmp / "model"
        shutil.copytree(model_dir, model_out, ignore=shutil.ignore_patterns(".snakemake_timestamp"))
        if prompts is not None:
            write_prompts(model_out, prompts)
        prompts = json.loads((model_out / ST_CONFIG).read_text(encoding="utf-8")).get("prompts") or {}
        check = prompt_check(prompts, eval_specs)
        card = build_card(
            name=opts.name,
            recipe=recipe,
            prompts=prompts,
            results=results,
            funnel=funnel,
            contamination=contamination,
            license=opts.license,
            base_model_id=recipe.get("base_model_id"),
            prompt_check=check,
        )
        card.save(model_out / "README.md")
        model = load_embedding_model(str(model_out), device="cpu")
        meta = model_meta(model, opts.name, revision, recipe, opts, sorted(results))
        write_json(tmp / "model_meta.json", json.loads(json.dumps(meta.to_dict(), default=str)))
        cache = ResultCache(tmp)
        for path in task_results:
            cache.save_to_cache(mteb.TaskResult.from_disk(Path(path)), meta)
        summary = {
            "name": opts.name,
            "revision": revision,
            "model": model_dir,
            "weights_sha256": digest,
            "results": sorted(str(Path(p)) for p in task_results),
            "results_dir": f"results/{folder_name(opts.name)}/{revision}",
            "prompts": prompts,
            "mteb_prompt_check": check,
            "push": opts.push,
        }
        write_json(tmp / "release.json", summary)
    return summary


def push(folder: str | Path, opts: ReleaseConfig, marker: str | None = None) -> dict:
    """Upload ``<folder>/model`` to the hub repository ``opts.name``; without a token or with the hub offline,
    stop before the network, naming the folder and how to publish it."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.constants import HF_HUB_OFFLINE

    model = Path(folder) / "model"
    how = f"publish it later with `huggingface-cli upload {opts.name} {model} .` (and open a pull request with {folder}/results on embeddings-benchmark/results)"
    if HF_HUB_OFFLINE:
        raise ReleaseError(
            f"release.push: the hub is offline (HF_HUB_OFFLINE=1); the release is ready in {folder}; {how}"
        )
    if not get_token():
        raise ReleaseError(
            f"release.push: no Hugging Face token (huggingface-cli login or HF_TOKEN); the release is ready in {folder}; {how}"
        )
    api = HfApi()
    api.create_repo(opts.name, private=opts.private, exist_ok=True)
    info = api.upload_folder(repo_id=opts.name, folder_path=str(model), commit_message="kalm-pipeline release")
    out = {"name": opts.name, "commit": getattr(info, "oid", None), "url": str(getattr(info, "commit_url", info))}
    if marker:
        write_json(marker, out)
    return out


def _run(args: argparse.Namespace) -> int:
    from kalm.report import load_funnel

    opts = options.from_args(ReleaseConfig, args, json.loads(args.options) if args.options else None)
    if args.step == "push":
        try:
            out = push(args.out, opts, args.marker)
        except ReleaseError as e:
            raise SystemExit(f"kalm release: {e}") from None
        print(json.dumps(out))
        return 0
    summary = build_release(
        args.model,
        args.out,
        opts=opts,
        recipe=json.loads(args.recipe) if args.recipe else {},
        aggregates=args.aggregates or [],
        task_results=args.task_results or [],
        funnel=load_funnel({stage: files for stage, *files in args.stage or []}),
        contamination={k: read_json(v) for k, v in (c.split("=", 1) for c in args.contamination or [])},
        eval_specs=json.loads(args.eval_tasks) if args.eval_tasks else [],
        prompts=read_json(args.prompts) if args.prompts else None,
    )
    bad = [t for t, c in summary["mteb_prompt_check"].items() if not c["reproduced"]]
    print(
        f"release {summary['name']} (revision {summary['revision']}) in {args.out}"
        + (f"; mteb alone differs on {bad}" if bad else "")
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser("release", help="the folder to publish a model from: model + card, mteb ModelMeta and results")
    p.add_argument("--step", choices=("build", "push"), default="build")
    p.add_argument("--model", help="the model folder to release (build)")
    p.add_argument("--out", required=True, help="release/<org>__<name>")
    p.add_argument("--options", help="the config's release section as JSON (ReleaseConfig's keys); flags win")
    options.add_arguments(p, ReleaseConfig)
    p.add_argument(
        "--recipe", help="JSON: base_model, base_model_id, max_seq_length, the training sections, data tasks"
    )
    p.add_argument("--aggregates", nargs="*", help="results/mteb_<lang>.json of the model (with the baseline)")
    p.add_argument("--task-results", nargs="*", help="the evaluation jobs' mteb TaskResult JSON files")
    p.add_argument(
        "--stage",
        nargs="+",
        action="append",
        metavar=("STAGE", "STATS"),
        help="a data stage and its funnel's stats files",
    )
    p.add_argument("--contamination", nargs="*", help="stage=work/data/<stage>/contamination_report.json")
    p.add_argument("--eval-tasks", help="JSON list of the evaluated task specs (kalm evaluate's), for the prompt check")
    p.add_argument("--prompts", help="prompts JSON (kalm prompts) to store in the released model")
    p.add_argument("--marker", help="push: JSON written after a successful upload")
    p.set_defaults(func=_run)
