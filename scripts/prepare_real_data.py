"""Turn ../shared/data (real, human-made data) into KaLM training tasks, held-out evaluation tasks
and a pipeline config: the proof that fine-tuning through the DAG improves a real model.

    python scripts/prepare_real_data.py --shared ../shared/data --out real
    snakemake results/mteb_zh.json results/mteb_en.json results/baseline/mteb_zh.json \\
        results/baseline/mteb_en.json -s workflow/Snakefile --directory real \\
        --configfile real/config.yaml                       # or: make real (targets first:
                                                            # --configfile takes several values)

What is trained on and what is held out (nothing evaluated is ever trained on):

- STS-B (stsb_multi_mt, English and its Chinese translation): the ``train`` split's pairs scored
  >= ``--sts-min-score`` (of 5) become symmetric training pairs (sentence1 -> sentence2, negatives
  mined); the ``dev`` split (1,500 pairs per language, never trained on) is the STS evaluation task.
- CSL title -> abstract (csl/ts, 1,000 Chinese papers): papers are split by a hash of their title
  into ``--csl-eval-share`` held out (a Retrieval task: titles as queries, the held-out abstracts as
  corpus) and the rest as retrieval training pairs (title -> abstract, negatives mined).

Records whose texts are empty or that repeat are left to the pipeline's own validation and dedup
stages; the counts of what this script wrote are in ``<out>/prepare.stats.json``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from pathlib import Path

from kalm.io import write_jsonl  # atomic, creates the folder

ROOT = Path(__file__).resolve().parents[1]

STS_INSTRUCTION = {"en": "Retrieve semantically similar text", "zh": "检索语义相似的文本"}
CSL_INSTRUCTION = "给定一篇论文的标题，检索该论文的摘要"


def read_sts(path: Path) -> list[tuple[str, str, float]]:
    """STS-B CSV without header: sentence1,sentence2,score (quoted where a sentence has commas)."""
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for line, row in enumerate(csv.reader(f), 1):
            if len(row) != 3:
                raise ValueError(f"{path}:{line}: expected 3 columns sentence1,sentence2,score, got {len(row)}")
            try:
                rows.append((row[0], row[1], float(row[2])))
            except ValueError:
                raise ValueError(f"{path}:{line}: field score: not a number: {row[2]!r}") from None
    return rows


def read_csl_ts(path: Path) -> list[tuple[str, str]]:
    """CSL ts: tab-separated task tag, abstract, title -> [(title, abstract)]."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line, raw in enumerate(f, 1):
            parts = raw.rstrip("\n").split("\t")
            if len(parts) != 3:
                raise ValueError(
                    f"{path}:{line}: expected 3 tab-separated columns (tag, abstract, title), got {len(parts)}"
                )
            out.append((parts[2].strip(), parts[1].strip()))
    return out


def held_out(text: str, share: float) -> bool:
    """A stable split: the same paper is on the same side whatever the file order."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF < share


def prepare(shared: Path, out: Path, sts_min_score: float = 4.0, csl_eval_share: float = 0.3) -> dict:
    out = out.resolve()
    counts: dict[str, dict] = {}
    train_tasks, eval_tasks, languages = {}, {}, {"en": [], "zh": []}
    for lang in ("en", "zh"):
        train = read_sts(shared / "stsb_multi_mt" / f"stsb-{lang}-train.csv")
        pairs = [{"query": a, "pos": [b]} for a, b, s in train if s >= sts_min_score]
        name = f"stsb_{lang}"
        write_jsonl(out / "data" / f"{name}.jsonl", pairs)
        train_tasks[name] = {
            "path": str(out / "data" / f"{name}.jsonl"),
            "type": "sts",
            "instruction": STS_INSTRUCTION[lang],
        }
        dev = read_sts(shared / "stsb_multi_mt" / f"stsb-{lang}-dev.csv")
        task = f"STSBDev{lang.capitalize()}"
        write_jsonl(
            out / "eval" / task / "test.jsonl", [{"sentence1": a, "sentence2": b, "score": s} for a, b, s in dev]
        )
        eval_tasks[task] = {"type": "STS", "path": str(out / "eval" / task), "instruction": STS_INSTRUCTION[lang]}
        languages[lang].append(task)
        counts[name] = {"train_pairs_in": len(train), "kept_score_ge_min": len(pairs), "eval_pairs": len(dev)}

    papers = read_csl_ts(shared / "csl" / "ts" / "dev.tsv")
    test = [(t, a) for t, a in papers if held_out(t, csl_eval_share)]
    train = [(t, a) for t, a in papers if not held_out(t, csl_eval_share)]
    write_jsonl(out / "data" / "csl_title_abstract.jsonl", [{"query": t, "pos": [a]} for t, a in train])
    train_tasks["csl_title_abstract"] = {
        "path": str(out / "data" / "csl_title_abstract.jsonl"),
        "type": "retrieval",
        "instruction": CSL_INSTRUCTION,
    }
    folder = out / "eval" / "CSLTitleAbstract"
    write_jsonl(folder / "queries.jsonl", [{"id": f"q{i}", "text": t} for i, (t, _) in enumerate(test)])
    write_jsonl(folder / "corpus.jsonl", [{"id": f"d{i}", "text": a} for i, (_, a) in enumerate(test)])
    (folder / "qrels.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(len(test))), encoding="utf-8"
    )
    eval_tasks["CSLTitleAbstract"] = {"type": "Retrieval", "path": str(folder), "instruction": CSL_INSTRUCTION}
    languages["zh"].insert(0, "CSLTitleAbstract")
    counts["csl_title_abstract"] = {"papers": len(papers), "train": len(train), "held_out": len(test)}

    config = real_data_config(train_tasks, eval_tasks, languages)
    (out / "config.yaml").write_text(config, encoding="utf-8")
    (out / "prepare.stats.json").write_text(json.dumps(counts, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return counts


def real_data_config(train_tasks: dict, eval_tasks: dict, languages: dict) -> str:
    """config/real_data.yaml (the recipe's settings for this data) with the prepared paths filled in."""
    import yaml

    cfg = yaml.safe_load((ROOT / "config" / "real_data.yaml").read_text(encoding="utf-8"))
    cfg["data"]["finetune"] = train_tasks
    cfg["eval"]["tasks"] = eval_tasks
    cfg["eval"]["languages"] = languages
    header = "# Written by scripts/prepare_real_data.py from config/real_data.yaml; paths point at the prepared data.\n"
    return header + yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=ROOT / "real")
    p.add_argument(
        "--sts-min-score", type=float, default=4.0, help="STS-B train pairs at or above this score are positives"
    )
    p.add_argument("--csl-eval-share", type=float, default=0.3, help="share of CSL papers held out for evaluation")
    args = p.parse_args(argv)
    if not (args.shared / "stsb_multi_mt").is_dir():
        print(f"{args.shared}: no stsb_multi_mt folder (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    counts = prepare(args.shared, args.out, args.sts_min_score, args.csl_eval_share)
    print(json.dumps(counts, ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
