"""Local mirrors of MTEB task datasets, for evaluating registered MTEB tasks with no network.

A mirror is the task's Hugging Face dataset repository, downloaded once (on a machine with network)
at the revision mteb pins for the task, into a folder; ``kalm evaluate`` then points the task's
``metadata.dataset["path"]`` at that folder and lets mteb's own loader read it. So the task class,
its splits and subsets, its data transforms and its evaluator are mteb's, unchanged: the score is
the one mteb gives for that dataset revision (tests/test_eval_mirror.py checks this).

Layout::

    <eval.mirror>/                      # the mirror root of the config
      mteb/T2Reranking/                 # = the task's dataset path (mteb metadata.dataset["path"])
        README.md                       # the dataset card; its YAML `configs:` names the configs
        corpus/dev-00000-of-00001.parquet    # (corpus, queries, default = qrels, top_ranked, ...)
        queries/...  data/...  top_ranked/...
        kalm-mirror.json                # {"task", "path", "revision"} written by `python -m kalm mteb-mirror`
      C-MTEB/CMNLI/ ...

Any folder that ``datasets.load_dataset(folder, config)`` reads the way the hub repository is read
works: a `huggingface-cli download --repo-type dataset <path> --revision <rev> --local-dir <folder>`
copy (its ``.cache/huggingface/download/*.metadata`` files hold the revision) or a plain folder of
``test.jsonl``-style split files for single-config datasets. A task can also point at its own
folder (``eval.tasks.<name>.mirror``).

The mirror's revision, when known (kalm-mirror.json or the download metadata), must equal the
revision mteb pins: a different revision is different data, and its scores would not be comparable.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from kalm.io import write_json

logger = logging.getLogger(__name__)

MIRROR_INFO = "kalm-mirror.json"


class MirrorError(RuntimeError):
    """A mirror folder that cannot be used for its task (missing, or another dataset revision)."""


def dataset_tasks(task) -> list:
    """The tasks whose datasets an mteb task reads: itself, or the subtasks of an aggregated task."""
    return list(getattr(task, "tasks", None) or [task])


def mirror_folder(root: str | Path, dataset_path: str) -> Path:
    """Where the mirror of the dataset ``dataset_path`` (``mteb/T2Reranking``) lives under ``root``."""
    return Path(root) / dataset_path


def mirror_revision(folder: str | Path) -> str | None:
    """The dataset revision a mirror holds, when it says: kalm-mirror.json, else huggingface_hub's
    local-dir download metadata (first line of each ``.metadata`` file is the commit hash)."""
    folder = Path(folder)
    info = folder / MIRROR_INFO
    if info.is_file():
        try:
            return json.loads(info.read_text(encoding="utf-8")).get("revision")
        except json.JSONDecodeError as e:
            raise MirrorError(f"{info}: invalid JSON ({e})") from None
    revisions = set()
    for meta in (folder / ".cache" / "huggingface" / "download").rglob("*.metadata"):
        first = meta.read_text(encoding="utf-8").splitlines()[:1]
        if first and first[0].strip():
            revisions.add(first[0].strip())
    if len(revisions) > 1:
        raise MirrorError(f"{folder}: files from several revisions {sorted(revisions)}; download the mirror again")
    return revisions.pop() if revisions else None


def use_mirror(task, folder: str | Path) -> dict[str, Any]:
    """Point ``task`` (and the subtasks of an aggregated task) at its mirror; return what was used.

    ``folder`` is the folder of a single-dataset task, or a mirror root for an aggregated task
    (each subtask then reads ``root/<its dataset path>``). The pinned revision stays in the
    metadata, so mteb records it in the result as usual.
    """
    folder = Path(folder)
    subtasks = dataset_tasks(task)
    used = {}
    for sub in subtasks:
        ds = dict(sub.metadata.dataset)
        target = folder if len(subtasks) == 1 else mirror_folder(folder, ds["path"])
        name = sub.metadata.name
        if not target.is_dir():
            raise MirrorError(f"MTEB task {name!r}: mirror folder {target} not found")
        have = mirror_revision(target)
        if have is not None and ds.get("revision") and have != ds["revision"]:
            raise MirrorError(
                f"MTEB task {name!r}: mirror {target} holds revision {have} of {ds['path']}, but mteb pins "
                f"{ds['revision']}; scores on other data are not comparable. Download it again: "
                f"python -m kalm mteb-mirror {name} --root <mirror root>"
            )
        if have is None:
            logger.warning(
                "%s: mirror %s does not say its revision (no %s); assuming %s",
                name,
                target,
                MIRROR_INFO,
                ds.get("revision"),
            )
        sub.metadata.dataset = {**ds, "path": str(target)}
        used[name] = {
            "path": str(target),
            "dataset": ds["path"],
            "revision": ds.get("revision"),
            "mirror_revision": have,
        }
    return used


def how_to_mirror(
    name: str, dataset_path: str | None, root: str | Path | None = None, revision: str | None = None
) -> str:
    """The instruction of an error message: how to make a task's data available offline."""
    where = str(mirror_folder(root, dataset_path)) if root and dataset_path else f"<mirror root>/{dataset_path}"
    return (
        f"To evaluate it offline, mirror it on a machine with network: "
        f"`python -m kalm mteb-mirror {name} --root <mirror root>` (= huggingface-cli download --repo-type dataset "
        f"{dataset_path} --revision {revision or '<pinned>'} --local-dir {where}), copy the folder here and set `eval.mirror: "
        f"<mirror root>` in the config (or `eval.tasks.{name}.mirror: <folder>`); see kalm/evaluation/mteb_mirror.py for "
        f"the layout. Alternatively copy a Hugging Face cache (HF_HOME) in which "
        f"`mteb.get_task('{name}').load_data()` has run, or give the task a 'path' in kalm's local-task format."
    )


def download(name: str, root: str | Path, revision: str | None = None) -> list[Path]:
    """Download the dataset(s) of MTEB task ``name`` at mteb's pinned revision into ``root`` (needs network)."""
    import mteb
    from huggingface_hub import snapshot_download

    task = mteb.get_task(name)
    out = []
    for sub in dataset_tasks(task):
        ds = sub.metadata.dataset
        rev = revision or ds.get("revision")
        folder = mirror_folder(root, ds["path"])
        logger.info("mirroring %s (%s@%s) into %s", sub.metadata.name, ds["path"], rev, folder)
        snapshot_download(repo_id=ds["path"], repo_type="dataset", revision=rev, local_dir=str(folder))
        write_json(folder / MIRROR_INFO, {"task": sub.metadata.name, "path": ds["path"], "revision": rev})
        out.append(folder)
    return out


def _run(args: argparse.Namespace) -> int:
    for name in args.tasks:
        for folder in download(name, args.root, args.revision):
            print(f"{name}\t{folder}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("mteb-mirror", help="download MTEB task datasets into a local mirror (needs network)")
    p.add_argument("tasks", nargs="+", metavar="TASK", help="registered MTEB task names")
    p.add_argument("--root", required=True, help="mirror root (config eval.mirror)")
    p.add_argument("--revision", default=None, help="dataset revision (default: the one mteb pins)")
    p.set_defaults(func=_run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kalm mteb-mirror", description=__doc__.splitlines()[0])
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["mteb-mirror", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
