"""Plots and tables for the Snakemake report, drawn from the stats files the stages wrote.

``snakemake`` builds them (rule ``all``; workflow/rules/report.smk) and ``snakemake --report
report.html`` gathers them, with the captions of workflow/report/, into one HTML file:

- the data funnel: records in, kept and dropped by reason at each data step (validate, dedup,
  decontaminate, mine, the trainer's few-negatives policy), per stage and per task
  (``kalm report funnel``; a chart and a table);
- training curves per stage, one line per run: the loss and each of its terms, lr, gradient norm,
  throughput (``kalm report training``);
- MTEB: a per-type chart and a per-task table of the base model, each fine-tune run (when
  evaluated: config ``report.eval_runs``) and the soup (``kalm report mteb``);
- the rule graph, drawn from ``snakemake --rulegraph`` (``kalm report rulegraph``).

Every plot is matplotlib (Agg backend: no display needed), written as SVG (or PNG by suffix).
The functions that read files (``load_*``) are separate from those that draw, so both are tested on
small dicts.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from kalm.io import atomic_path, read_json, read_jsonl

log = logging.getLogger(__name__)

# data steps in pipeline order; the stats' "stage" field names the step
STEP_ORDER = ["validate", "dedup", "decontaminate", "mine", "train"]
STEP_LABELS = {
    "validate": "validated",
    "dedup": "deduplicated",
    "decontaminate": "decontaminated",
    "mine": "mined",
    "train": "trained on",
}
KEPT_COLOR = "#4c72b0"
DROP_COLORS = ["#dd8452", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd", "#55a868"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "svg.hashsalt": "kalm",
            "svg.fonttype": "none",
            "font.size": 9,
            "axes.titlesize": 10,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )
    return plt


def _save(fig, out: str | os.PathLike) -> None:
    """Write a figure atomically (SVG without a timestamp, so reruns give the same bytes)."""
    out = Path(out)
    fmt = out.suffix.lstrip(".") or "svg"
    metadata = {"Date": None} if fmt == "svg" else {}
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=fmt, bbox_inches="tight", dpi=110, metadata=metadata)
    import matplotlib.pyplot as plt

    plt.close(fig)


def _write_text(out: str | os.PathLike, text: str) -> None:
    with atomic_path(out) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def _page(title: str, body: str) -> str:
    """A small standalone HTML page (the report shows it in a frame)."""
    style = (
        "body{font-family:sans-serif;font-size:13px;margin:1em}table{border-collapse:collapse;margin:0 0 1.5em}"
        "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f2f2f2}"
        "td.l,th.l{text-align:left}tr.mean td{font-weight:bold;background:#fafafa}"
        ".pos{color:#1a7f37}.neg{color:#c0392b}caption{text-align:left;font-weight:bold;padding:4px 0}"
    )
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>\n<h2>{html.escape(title)}</h2>\n{body}</body></html>\n"
    )


def _table(
    caption: str,
    header: list[str],
    rows: list[list[Any]],
    left: int = 1,
    row_classes: list[str] | None = None,
    table_id: str | None = None,
) -> str:
    """An HTML table; the first ``left`` columns are left-aligned text, cells are escaped."""

    def cell(tag, i, v):
        cls = ' class="l"' if i < left else ""
        if isinstance(v, tuple):  # (text, css class)
            v, c = v
            cls = f' class="{c}"'
        return f"<{tag}{cls}>{html.escape(str(v))}</{tag}>"

    tid = f' id="{html.escape(table_id)}"' if table_id else ""
    out = [
        f"<table{tid}><caption>{html.escape(caption)}</caption>",
        "<tr>" + "".join(cell("th", i, h) for i, h in enumerate(header)) + "</tr>",
    ]
    for j, row in enumerate(rows):
        rc = f' class="{row_classes[j]}"' if row_classes and row_classes[j] else ""
        out.append(f"<tr{rc}>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>")
    return "\n".join(out) + "\n</table>\n"


# ---------------------------------------------------------------------------------------------
# data funnel


def _step_of(stats: dict) -> str:
    step = str(stats.get("stage", ""))
    return "train" if step.startswith("train") else step


def funnel(stats_by_stage: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """{data stage: [step, ...]} in pipeline order, each step ``{"step", "in", "kept", "dropped": {reason: n},
    "per_task": {task: {"in", "kept", "dropped"}}}``; the per-file validate stats of a stage are summed
    into one step. Raises ValueError when a step's counts do not add up (in = kept + dropped)."""
    out: dict[str, list[dict]] = {}
    for stage, stats_list in stats_by_stage.items():
        steps: dict[str, dict] = {}
        for s in stats_list:
            step = _step_of(s)
            if step not in STEP_ORDER:
                raise ValueError(f"{stage}: unknown step {s.get('stage')!r} in a stats file")
            agg = steps.setdefault(step, {"step": step, "in": 0, "kept": 0, "dropped": {}, "per_task": {}})
            if step != "validate" and agg["in"]:
                raise ValueError(f"{stage}: two stats files for step {step!r}")
            agg["in"] += s["in"]
            agg["kept"] += s["kept"]
            for reason, n in s.get("dropped", {}).items():
                agg["dropped"][reason] = agg["dropped"].get(reason, 0) + n
            per_task = s.get("per_task") or (
                {s["task"]: {k: s[k] for k in ("in", "kept", "dropped")}} if s.get("task") else {}
            )
            for task, t in per_task.items():
                at = agg["per_task"].setdefault(task, {"in": 0, "kept": 0, "dropped": {}})
                at["in"] += t["in"]
                at["kept"] += t["kept"]
                for reason, n in t.get("dropped", {}).items():
                    at["dropped"][reason] = at["dropped"].get(reason, 0) + n
        for step in steps.values():
            for where, c in [("all tasks", step), *step["per_task"].items()]:
                if c["in"] != c["kept"] + sum(c["dropped"].values()):
                    raise ValueError(
                        f"{stage}/{step['step']} ({where}): in={c['in']} but kept+dropped="
                        f"{c['kept'] + sum(c['dropped'].values())}"
                    )
        out[stage] = [steps[s] for s in STEP_ORDER if s in steps]
    return out


def load_funnel(files_by_stage: dict[str, list[str]]) -> dict[str, list[dict]]:
    return funnel({stage: [read_json(f) for f in files] for stage, files in files_by_stage.items()})


def plot_funnel(fun: dict[str, list[dict]], out: str | os.PathLike) -> None:
    """One row per data stage: the funnel (records left after each step), the records each step dropped,
    stacked by reason, and each task's share of its raw records left after each step."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    stages = [s for s in fun if fun[s]]
    reasons = sorted({r for s in stages for st in fun[s] for r in st["dropped"]})
    colors = {r: DROP_COLORS[i % len(DROP_COLORS)] for i, r in enumerate(reasons)}
    n_rows = max(len(fun[s]) for s in stages) + 1
    fig, axes = plt.subplots(
        len(stages),
        3,
        figsize=(13, (0.42 * n_rows + 1.3) * len(stages)),
        squeeze=False,
        gridspec_kw={"width_ratios": [1.25, 1, 1]},
    )
    for row, stage in enumerate(stages):
        steps = fun[stage]
        labels = ["raw"] + [STEP_LABELS.get(s["step"], s["step"]) for s in steps]
        counts = [steps[0]["in"]] + [s["kept"] for s in steps]
        y = list(range(len(labels)))[::-1]
        top = max(counts) or 1

        ax = axes[row][0]  # the funnel: centred bars, one per step
        ax.barh(y, counts, left=[(top - c) / 2 for c in counts], color=KEPT_COLOR, height=0.7)
        for yi, c in zip(y, counts):
            ax.text(top / 2, yi, f"{c:,}", ha="center", va="center", color="white", fontsize=8, fontweight="bold")
        ax.set_yticks(y, labels)
        ax.set_xticks([])
        ax.spines["bottom"].set_visible(False)
        ax.set_title(f"{stage}: {counts[0]:,} raw records \u2192 {counts[-1]:,} {labels[-1]}")

        ax = axes[row][1]  # what each step dropped, by reason
        sy = y[1:]
        left = [0] * len(steps)
        for r in reasons:
            vals = [s["dropped"].get(r, 0) for s in steps]
            if any(vals):
                ax.barh(sy, vals, left=left, color=colors[r], height=0.6, label=r)
                left = [a + b for a, b in zip(left, vals)]
        for yi, s, total in zip(sy, steps, left):
            share = f" ({100 * total / s['in']:.1f}%)" if s["in"] else ""
            ax.text(total, yi, f" {total:,}{share}" if total else " none", va="center", fontsize=8)
        ax.set_yticks(sy, [s["step"] for s in steps])
        ax.set_ylim(min(y) - 0.5, max(y) + 0.5)
        ax.set_xlim(0, max(max(left), 1) * 1.45)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("records dropped")
        ax.set_title(f"{stage}: dropped at each step, by reason")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=7, frameon=False)

        ax = axes[row][2]  # per task: share of its raw records left
        tasks = sorted({t for s in steps for t in s["per_task"]})
        for task in tasks:
            raw = next((s["per_task"][task]["in"] for s in steps if task in s["per_task"]), 0) or 1
            ys = [100.0] + [
                100 * s["per_task"][task]["kept"] / raw if task in s["per_task"] else math.nan for s in steps
            ]
            ax.plot(range(len(labels)), ys, marker="o", ms=3, label=f"{task} ({raw:,})")
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
        ax.set_ylabel("% of the task's raw records")
        ax.set_title(f"{stage}: per task (raw records)")
        ax.legend(fontsize=7, frameon=False, ncol=2 if len(tasks) > 6 else 1, loc="lower left")
    fig.tight_layout()
    _save(fig, out)


def funnel_table(fun: dict[str, list[dict]], contamination: dict[str, dict] | None = None) -> str:
    """The funnel as HTML tables: one per data stage (step x task, in / kept / dropped by reason), and the
    decontamination report (training records overlapping each evaluation task)."""
    body = []
    for stage, steps in fun.items():
        reasons = sorted({r for s in steps for r in s["dropped"]})
        header = ["step", "task", "in", "kept", *[f"dropped: {r}" for r in reasons]]
        rows, classes = [], []
        for s in steps:
            for task, c in [*sorted(s["per_task"].items()), ("all tasks", s)]:
                rows.append([s["step"], task, c["in"], c["kept"], *[c["dropped"].get(r, 0) for r in reasons]])
                classes.append("mean" if task == "all tasks" else "")
        body.append(_table(f"{stage} data", header, rows, left=2, row_classes=classes, table_id=f"funnel-{stage}"))
    for stage, report in (contamination or {}).items():
        rows = []
        for name, r in sorted(report.items()):
            if "skipped" in r:
                rows.append([name, "skipped", "", "", "", "", r["skipped"]])
            else:
                ex = "; ".join(e.get("query", "")[:60] for e in r.get("examples", [])[:2])
                rows.append(
                    [
                        name,
                        r.get("texts", ""),
                        r.get("overlapping_records", 0),
                        r.get("exact_records", ""),
                        r.get("near_records", ""),
                        r.get("contained_records", ""),
                        ex,
                    ]
                )
        body.append(
            _table(
                f"{stage} data vs the evaluation tasks (decontamination)",
                ["eval task", "eval texts", "overlapping records", "exact", "near", "contained", "examples"],
                rows,
                table_id=f"contamination-{stage}",
            )
        )
    return _page("Data funnel: records in, kept and dropped at each step", "".join(body))


# ---------------------------------------------------------------------------------------------
# training curves

CURVES = [
    ("loss", "loss"),
    ("terms", "loss terms"),
    ("lr", "learning rate"),
    ("grad_norm", "gradient norm (before clipping)"),
    ("samples_per_s", "samples / s"),
    ("tokens_per_s", "tokens / s"),
    ("evals", "held-out scores (finetune.eval_every)"),
]


def load_metrics(path: str | os.PathLike) -> list[dict]:
    return list(read_jsonl(path))


def _smooth(ys: list[float], n: int) -> list[float]:
    """Trailing moving average over ``n`` steps (n <= 1: unchanged)."""
    if n <= 1:
        return ys
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= n:
            acc -= ys[i - n]
        out.append(acc / min(i + 1, n))
    return out


def plot_training(runs: dict[str, list[dict]], out: str | os.PathLike, title: str = "training") -> None:
    """A grid of curves against the step, one line per run: loss, each loss term (loss_*: InfoNCE, focal,
    distillation, one per Matryoshka dimension...), lr, gradient norm, samples/s, tokens/s and the held-out
    scores of periodic evaluation (eval_*). Long runs get a moving average over the raw (faint) line."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(15.5, 6.2))
    axes.flat[-1].axis("off")  # 7 panels
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for i, (label, rows) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        steps = [r["step"] for r in rows]
        window = max(1, len(rows) // 25)
        for ax, (key, name) in zip(axes.flat, CURVES):
            ax.set_title(name)
            if key in ("terms", "evals"):  # one line per loss term / per held-out task
                prefix = "loss_" if key == "terms" else "eval_"
                terms = sorted({k for r in rows for k in r if k.startswith(prefix)})
                for j, term in enumerate(terms):
                    pts = [(r["step"], r[term]) for r in rows if r.get(term) is not None]
                    if pts:
                        ax.plot(
                            [p[0] for p in pts],
                            _smooth([p[1] for p in pts], window if key == "terms" else 1),
                            color=color,
                            ls=styles[j % len(styles)],
                            lw=1.2,
                            label=f"{label} {term.removeprefix(prefix)}",
                            marker="o" if key == "evals" else None,
                            ms=3,
                        )
                continue
            ys = [r.get(key) for r in rows]
            if not any(v is not None for v in ys):
                continue
            xs, ys = zip(*[(s, v) for s, v in zip(steps, ys) if v is not None])
            if window > 1 and key != "lr":
                ax.plot(xs, ys, color=color, alpha=0.25, lw=0.8)
                ax.plot(xs, _smooth(list(ys), window), color=color, lw=1.4, label=label)
            else:
                ax.plot(xs, ys, color=color, lw=1.4, marker="o" if len(xs) < 15 else None, ms=3, label=label)
    from matplotlib.ticker import MaxNLocator

    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, frameon=False)
    axes[0][2].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, out)


# ---------------------------------------------------------------------------------------------
# MTEB


def load_mteb(models_by_lang: dict[str, dict[str, str]]) -> dict[str, dict[str, dict]]:
    """{lang: {model label: aggregate}} from results/.../mteb_<lang>.json files (kalm.evaluation.aggregate)."""
    return {lang: {label: read_json(p) for label, p in models.items()} for lang, models in models_by_lang.items()}


def _means(agg: dict) -> dict[str, float]:
    return {**agg["by_type"], "mean (type)": agg["mean_type"], "mean (task)": agg["mean_task"]}


def plot_mteb(results: dict[str, dict[str, dict]], out: str | os.PathLike) -> None:
    """One panel per language: grouped bars per task type and the two means, one bar per model
    (base, each fine-tune run, soup); scores x100."""
    plt = _pyplot()
    langs = sorted(results)
    fig, axes = plt.subplots(1, len(langs), figsize=(max(6.0, 5.2 * len(langs)), 4.0), squeeze=False)
    colors = {"base": "#8c8c8c", "soup": "#c44e52"}
    cycle = ["#4c72b0", "#55a868", "#8172b3", "#ccb974", "#64b5cd", "#dd8452"]
    for ax, lang in zip(axes[0], langs):
        models = results[lang]
        groups = list(dict.fromkeys(g for agg in models.values() for g in agg["by_type"])) + [
            "mean (type)",
            "mean (task)",
        ]
        width = 0.8 / max(1, len(models))
        for i, (label, agg) in enumerate(models.items()):
            vals = _means(agg)
            xs = [g + (i - (len(models) - 1) / 2) * width for g in range(len(groups))]
            ys = [100 * vals[g] if g in vals else math.nan for g in groups]
            color = colors.get(label, cycle[i % len(cycle)])
            bars = ax.bar(xs, ys, width=width * 0.95, color=color, label=label)
            ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
        ax.set_xticks(range(len(groups)), groups, rotation=15, ha="right")
        ax.axvline(len(groups) - 2.5, color="#ccc", lw=0.8)
        ax.set_ylabel("main score x100")
        ax.set_title(f"MTEB {lang}: {sum(len(a['tasks']) for a in list(models.values())[:1])} tasks")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.08)
        ax.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(models))
    fig.tight_layout()
    _save(fig, out)


def _delta(d: float | None) -> tuple[str, str] | str:
    if d is None or (isinstance(d, float) and math.isnan(d)):
        return ""
    return (f"{100 * d:+.2f}", "pos" if d > 0 else "neg" if d < 0 else "")


def mteb_table(results: dict[str, dict[str, dict]]) -> str:
    """Per language: a row per task (type, metric, each model's score x100, soup - base) and the
    per-type and overall means."""
    body = []
    for lang in sorted(results):
        models = results[lang]
        labels = list(models)
        first = models[labels[-1]]
        compare = "soup" if "soup" in models else labels[-1]
        has_base = "base" in models and compare != "base"
        header = ["task", "type", "metric", *labels, *([f"{compare} − base"] if has_base else [])]
        rows, classes = [], []
        tasks = sorted(first["tasks"].items(), key=lambda kv: (kv[1]["type"], kv[0]))
        for name, t in tasks:
            scores = [models[m]["tasks"].get(name, {}).get("main_score") for m in labels]
            row = [name, t["type"], t["metric"], *["" if s is None else f"{100 * s:.2f}" for s in scores]]
            if has_base:
                b, f = models["base"]["tasks"].get(name), models[compare]["tasks"].get(name)
                row.append(_delta(f["main_score"] - b["main_score"]) if b and f else "")
            rows.append(row)
            classes.append("")
        for key in [*first["by_type"], "mean (type)", "mean (task)"]:
            vals = [_means(models[m]).get(key) for m in labels]
            row = [
                key if key.startswith("mean") else f"mean {key}",
                "",
                "",
                *["" if v is None else f"{100 * v:.2f}" for v in vals],
            ]
            if has_base:
                b, f = _means(models["base"]).get(key), _means(models[compare]).get(key)
                row.append(_delta(None if b is None or f is None else f - b))
            rows.append(row)
            classes.append("mean")
        names = ", ".join(f"{m}: {models[m].get('model')}" for m in labels)
        body.append(
            _table(
                f"MTEB {lang} (main score x100; {names})",
                header,
                rows,
                left=3,
                row_classes=classes,
                table_id=f"mteb-{lang}",
            )
        )
    return _page("MTEB results per task", "".join(body))


# ---------------------------------------------------------------------------------------------
# rule graph


def parse_rulegraph(dot: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """({node id: rule name}, [(from id, to id)]) from the DOT text ``snakemake --rulegraph`` prints."""
    nodes = {m[1]: m[2] for m in re.finditer(r'^\s*(\d+)\[label = "([^"]+)"', dot, re.M)}
    edges = [(m[1], m[2]) for m in re.finditer(r"^\s*(\d+) -> (\d+)", dot, re.M)]
    return nodes, edges


def plot_rulegraph(nodes: dict[str, str], edges: list[tuple[str, str]], out: str | os.PathLike) -> None:
    """The rule graph, top to bottom: a rule's row is its longest path from a source (no graphviz needed)."""
    plt = _pyplot()
    preds: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in edges:
        if a in nodes and b in nodes and a != b:
            preds[b].append(a)
    depth: dict[str, int] = {}

    def d(n: str, path: frozenset = frozenset()) -> int:
        if n not in depth:
            depth[n] = 1 + max((d(p, path | {n}) for p in preds[n] if p not in path), default=-1)
        return depth[n]

    for n in nodes:
        d(n)
    layers: dict[int, list[str]] = {}
    for n in sorted(nodes, key=lambda n: nodes[n]):
        layers.setdefault(depth[n], []).append(n)
    # order each layer by the mean position of its predecessors, so that edges cross less
    pos: dict[str, tuple[float, float]] = {}
    for k in sorted(layers):
        layer = layers[k]
        layer.sort(
            key=lambda n: (
                sum(pos[p][0] for p in preds[n] if p in pos) / max(1, sum(p in pos for p in preds[n])),
                nodes[n],
            )
        )
        for i, n in enumerate(layer):
            pos[n] = (i - (len(layer) - 1) / 2, -k)
    width = max(len(layer) for layer in layers.values())
    height = max(layers) + 1
    fig, ax = plt.subplots(figsize=(1.9 * width + 1.5, 0.5 * height + 0.8))
    for a, b in edges:
        if a in pos and b in pos and a != b:
            (x0, y0), (x1, y1) = pos[a], pos[b]
            ax.annotate(
                "",
                xy=(x1, y1 + 0.2),
                xytext=(x0, y0 - 0.2),
                arrowprops={
                    "arrowstyle": "-|>",
                    "color": "#888",
                    "lw": 0.8,
                    "shrinkA": 0,
                    "shrinkB": 0,
                    "connectionstyle": "arc3,rad=0.0" if y0 - y1 == 1 else "arc3,rad=-0.25",
                },
            )
    for n, (x, y) in pos.items():
        ax.text(
            x,
            y,
            nodes[n],
            ha="center",
            va="center",
            fontsize=8,
            bbox={"boxstyle": "round,pad=0.3", "fc": "#dde7f3", "ec": "#4c72b0", "lw": 0.9},
        )
    ax.set_xlim(-width / 2 - 0.1, width / 2 + 0.1)
    ax.set_ylim(-height + 0.5, 0.5)
    ax.axis("off")
    ax.set_title(f"rule graph: {len(nodes)} rules (data flows top to bottom)")
    _save(fig, out)


def rulegraph_dot(snakefile: str, config: dict, targets: list[str]) -> str:
    """``snakemake --rulegraph`` for ``targets`` under ``config`` (the running workflow's merged config)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
    try:
        env = {k: v for k, v in os.environ.items() if k != "SNAKEMAKE_PROFILE"}
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "snakemake",
                "-s",
                snakefile,
                "--configfile",
                f.name,
                "--rulegraph",
                "--nolock",
                "--cores",
                "1",
                *targets,
            ],
            env=env,
            capture_output=True,
            text=True,
        )
    finally:
        os.unlink(f.name)
    if res.returncode != 0:
        raise RuntimeError(f"snakemake --rulegraph failed: {res.stderr[-2000:]}")
    return res.stdout


# ---------------------------------------------------------------------------------------------
# CLI


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"kalm report: {what} {item!r} is not LABEL=PATH")
        out[label] = path
    return out


def _run_funnel(args: argparse.Namespace) -> int:
    files = {group[0]: group[1:] for group in args.stage}
    fun = load_funnel(files)
    plot_funnel(fun, args.out)
    contamination = {stage: read_json(p) for stage, p in _pairs(args.contamination or [], "--contamination").items()}
    _write_text(args.table, funnel_table(fun, contamination))
    for stage, steps in fun.items():
        log.info("%s: %s", stage, " -> ".join(f"{s['step']} {s['kept']}" for s in steps))
    return 0


def _run_training(args: argparse.Namespace) -> int:
    runs = {label: load_metrics(p) for label, p in _pairs(args.run, "--run").items()}
    plot_training(runs, args.out, title=args.title)
    return 0


def _run_mteb(args: argparse.Namespace) -> int:
    results = load_mteb({group[0]: _pairs(group[1:], "--lang model") for group in args.lang})
    plot_mteb(results, args.out)
    _write_text(args.table, mteb_table(results))
    return 0


def _run_rulegraph(args: argparse.Namespace) -> int:
    if args.dot:
        dot = Path(args.dot).read_text(encoding="utf-8")
    else:
        dot = rulegraph_dot(args.snakefile, json.loads(args.config_json), args.targets)
    nodes, edges = parse_rulegraph(dot)
    if not nodes:
        raise SystemExit("kalm report rulegraph: no rules in the graph")
    plot_rulegraph(nodes, edges, args.out)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("report", help="plots and tables of the Snakemake report, from the stages' stats files")
    sub = p.add_subparsers(dest="report_kind", required=True)

    f = sub.add_parser("funnel", help="records in/kept/dropped at each data step, per stage and task")
    f.add_argument(
        "--stage",
        nargs="+",
        action="append",
        required=True,
        metavar="STAGE_OR_STATS",
        help="a data stage name then its stats JSON files (validate, dedup, decontaminate, mine, train); repeatable",
    )
    f.add_argument("--contamination", nargs="*", metavar="STAGE=REPORT", help="contamination_report.json per stage")
    f.add_argument("--out", required=True, help="chart (.svg or .png)")
    f.add_argument("--table", required=True, help="HTML table")
    f.set_defaults(func=_run_funnel)

    t = sub.add_parser("training", help="training curves: loss and terms, lr, grad norm, throughput, one line per run")
    t.add_argument("--run", nargs="+", required=True, metavar="LABEL=METRICS_JSONL")
    t.add_argument("--title", default="training")
    t.add_argument("--out", required=True)
    t.set_defaults(func=_run_training)

    m = sub.add_parser("mteb", help="MTEB per-type chart and per-task table: base vs runs vs soup")
    m.add_argument(
        "--lang",
        nargs="+",
        action="append",
        required=True,
        metavar="LANG_OR_MODEL",
        help="a language then LABEL=results/.../mteb_<lang>.json per model; repeatable",
    )
    m.add_argument("--out", required=True)
    m.add_argument("--table", required=True)
    m.set_defaults(func=_run_mteb)

    r = sub.add_parser("rulegraph", help="the workflow's rule graph as a picture")
    r.add_argument("--dot", help="DOT text of snakemake --rulegraph (else run snakemake)")
    r.add_argument("--snakefile")
    r.add_argument("--config-json", default="{}")
    r.add_argument("--out", required=True)
    r.add_argument("targets", nargs="*")
    r.set_defaults(func=_run_rulegraph)
