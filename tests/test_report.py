"""The Snakemake report: kalm/report.py's plots and tables on small stats dicts, the report rules'
DAG (dry runs), and the real report of the session's tiny run opened in headless Chromium."""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kalm import report as rep

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = str(ROOT / "workflow" / "Snakefile")
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "SNAKEMAKE_PROFILE": str(ROOT / "profiles/local"),
}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def stats(stage, n_in, kept, dropped=None, per_task=None, **extra):
    return {"stage": stage, "in": n_in, "kept": kept, "dropped": dropped or {}, "per_task": per_task or {}, **extra}


def task(n_in, kept, **dropped):
    return {"in": n_in, "kept": kept, "dropped": dropped}


FUNNEL_STATS = {
    "finetune": [
        stats("validate", 10, 9, {"missing_field": 1}, {"a": task(10, 9, missing_field=1)}, task="a"),
        stats("validate", 5, 5, {}, {"b": task(5, 5)}, task="b"),
        stats(
            "dedup",
            14,
            12,
            {"exact_duplicate": 1, "near_duplicate": 1},
            {"a": task(9, 8, exact_duplicate=1), "b": task(5, 4, near_duplicate=1)},
        ),
        stats("decontaminate", 12, 11, {"overlaps_eval": 1}, {"a": task(8, 7, overlaps_eval=1), "b": task(4, 4)}),
        stats("mine", 11, 10, {"no_negatives": 1}, {"a": task(7, 6, no_negatives=1), "b": task(4, 4)}),
        stats("train_finetune", 10, 10, {}, {"a": task(6, 6), "b": task(4, 4)}),
    ],
    "pretrain": [
        stats("validate", 3, 3, {}, {"w": task(3, 3)}),
        stats("dedup", 3, 2, {"exact_duplicate": 1}, {"w": task(3, 2, exact_duplicate=1)}),
    ],
}


def test_funnel_adds_up_per_step_and_task_and_sums_the_validate_files():
    fun = rep.funnel(FUNNEL_STATS)
    steps = {s["step"]: s for s in fun["finetune"]}
    assert list(steps) == ["validate", "dedup", "decontaminate", "mine", "train"]  # pipeline order
    assert steps["validate"]["in"] == 15 and steps["validate"]["kept"] == 14
    assert steps["validate"]["per_task"] == {"a": task(10, 9, missing_field=1), "b": task(5, 5)}
    for stage in fun.values():
        for s in stage:
            for c in [s, *s["per_task"].values()]:
                assert c["in"] == c["kept"] + sum(c["dropped"].values())
    # each step takes in what the step before kept
    chain = fun["finetune"]
    assert all(a["kept"] == b["in"] for a, b in itertools.pairwise(chain))
    assert [s["step"] for s in fun["pretrain"]] == ["validate", "dedup"]


def test_funnel_refuses_counts_that_do_not_add_up():
    bad = {"finetune": [stats("dedup", 10, 8, {"exact_duplicate": 1})]}
    with pytest.raises(ValueError, match="in=10 but kept\\+dropped=9"):
        rep.funnel(bad)
    bad = {"finetune": [stats("dedup", 2, 2, {}, {"a": task(2, 1)})]}
    with pytest.raises(ValueError, match=r"dedup \(a\)"):
        rep.funnel(bad)


def test_funnel_chart_and_table(tmp_path):
    fun = rep.funnel(FUNNEL_STATS)
    rep.plot_funnel(fun, tmp_path / "funnel.svg")
    svg = (tmp_path / "funnel.svg").read_text()
    for text in ["finetune: 15 raw records", "near_duplicate", "overlaps_eval", "decontaminated", "mined"]:
        assert text in svg, text
    contamination = {
        "finetune": {
            "EvalA": {
                "texts": 100,
                "overlapping_records": 1,
                "exact_records": 1,
                "near_records": 0,
                "examples": [{"query": "a leaked query"}],
            },
            "EvalB": {"skipped": "no offline data"},
        }
    }
    table = rep.funnel_table(fun, contamination)
    assert 'id="funnel-finetune"' in table and 'id="contamination-finetune"' in table
    assert "<td>near_duplicate</td>" not in table and "dropped: near_duplicate" in table
    assert "a leaked query" in table and "no offline data" in table
    rows = re.findall(
        r"<tr[^>]*><td class=\"l\">(\w+)</td><td class=\"l\">all tasks</td><td>(\d+)</td><td>(\d+)</td>(.*?)</tr>",
        table.split('id="funnel-pretrain"')[0],
    )
    for step, n_in, kept, rest in rows:  # the table's totals add up too
        assert int(n_in) == int(kept) + sum(map(int, re.findall(r"<td>(\d+)</td>", rest))), step


def metrics(n, terms=("loss_infonce", "loss_focal"), seed=0):
    return [
        {
            "step": i + 1,
            "loss": 3.0 - i * 0.01 + seed,
            **{t: 1.0 + seed for t in terms},
            "lr": 1e-5 * (1 - i / n),
            "grad_norm": 2.0,
            "samples_per_s": 50.0,
            "tokens_per_s": 4000.0,
            "batch": 8,
        }
        for i in range(n)
    ]


def test_training_curves_show_every_loss_term_and_run(tmp_path):
    evals = metrics(60)
    for row in evals[9::10]:  # periodic evaluation (finetune.eval_every 10): a few steps carry scores
        row.update(eval_DevRetrieval=0.5 + row["step"] / 1000, eval_Guard=0.4)
    rep.plot_training(
        {"run0": evals, "run1": metrics(60, seed=1), "run2": metrics(3, ("loss_dim64",))},
        tmp_path / "t.svg",
        title="finetune",
    )
    svg = (tmp_path / "t.svg").read_text()
    for text in [
        "finetune",
        "loss terms",
        "learning rate",
        "gradient norm",
        "samples / s",
        "tokens / s",
        "run0 infonce",
        "run1 focal",
        "run2 dim64",
        "held-out scores",
        "run0 DevRetrieval",
        "run0 Guard",
    ]:
        assert text in svg, text
    assert rep._smooth([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]


def aggregate(model, scores):
    tasks = {n: {"type": ty, "main_score": s, "metric": "m"} for n, (ty, s) in scores.items()}
    from kalm.evaluation.aggregate import summarize

    by_type, mean_task, mean_type = summarize(tasks)
    return {"model": model, "tasks": tasks, "by_type": by_type, "mean_task": mean_task, "mean_type": mean_type}


def test_mteb_chart_and_table_compare_base_runs_and_soup(tmp_path):
    results = {
        "en": {
            "base": aggregate("base-model", {"T1": ("STS", 0.5), "T2": ("Retrieval", 0.2)}),
            "run0": aggregate("models/finetune/run0", {"T1": ("STS", 0.55), "T2": ("Retrieval", 0.25)}),
            "soup": aggregate("models/soup", {"T1": ("STS", 0.6), "T2": ("Retrieval", 0.1)}),
        },
        "zh": {
            "base": aggregate("base-model", {"T3": ("STS", 0.4)}),
            "soup": aggregate("models/soup", {"T3": ("STS", 0.45)}),
        },
    }
    rep.plot_mteb(results, tmp_path / "m.svg")
    svg = (tmp_path / "m.svg").read_text()
    for text in ["MTEB en", "MTEB zh", "base", "run0", "soup", "mean (type)", "Retrieval"]:
        assert text in svg, text
    table = rep.mteb_table(results)
    en = table.split('id="mteb-en"')[1].split("</table>")[0]
    assert "<th>base</th><th>run0</th><th>soup</th><th>soup − base</th>" in en
    assert '<td>50.00</td><td>55.00</td><td>60.00</td><td class="pos">+10.00</td>' in en
    assert '<td class="neg">-10.00</td>' in en  # T2 got worse
    assert "mean (task)" in en and "<td>35.00</td>" in en  # base mean over tasks


def test_rulegraph_from_snakemake_dot(tmp_path):
    dot = (
        'digraph snakemake_dag {\n\t0[label = "aggregate", color = "0.1 0.6 0.85"];\n'
        '\t1[label = "evaluate", color = "0.2 0.6 0.85"];\n\t2[label = "soup", color = "0.3 0.6 0.85"];\n'
        "\t1 -> 0\n\t2 -> 1\n\t2 -> 0\n}\n"
    )
    nodes, edges = rep.parse_rulegraph(dot)
    assert nodes == {"0": "aggregate", "1": "evaluate", "2": "soup"} and ("2", "1") in edges
    rep.plot_rulegraph(nodes, edges, tmp_path / "g.svg")
    svg = (tmp_path / "g.svg").read_text()
    assert all(name in svg for name in nodes.values()) and "3 rules" in svg


def dry_run_output(*args, cwd=ROOT) -> str:
    """stdout of `snakemake -n --forceall` (add -p for the shell commands)."""
    env = {k: v for k, v in ENV.items() if k != "SNAKEMAKE_PROFILE"}
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--forceall", "-s", SNAKEFILE, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def dry_run(*args, cwd=ROOT):
    """{rule: job count} of a dry run."""
    table = dry_run_output(*args, cwd=cwd).split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_default_target_builds_the_plots_and_eval_runs_adds_one_evaluation_per_run(tmp_path):
    import yaml

    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text(encoding="utf-8"))
    runs, n_tasks = cfg["finetune"]["runs"], sum(len(t) for t in cfg["eval"]["languages"].values())
    counts = dry_run()
    assert counts["report_funnel"] == counts["report_mteb"] == counts["report_rulegraph"] == 1
    assert counts["report_training"] == 2  # pretrain and finetune
    n_langs = len(cfg["eval"]["languages"])
    assert counts["evaluate"] == 2 * n_tasks and counts["aggregate"] == n_langs  # base and soup
    cfg["report"] = {"eval_runs": True}
    for section in ("pretrain", "finetune"):  # absolute data paths: the config is read from tmp_path
        for spec in cfg["data"][section].values():
            spec["path"] = str(ROOT / spec["path"])
    for spec in cfg["eval"]["tasks"].values():
        spec["path"] = str(ROOT / spec["path"])
    (tmp_path / "runs.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    counts = dry_run("--configfile", str(tmp_path / "runs.yaml"), cwd=tmp_path)
    assert counts["evaluate"] == (2 + runs) * n_tasks and counts["aggregate"] == (1 + runs) * n_langs
    # the plots are never inputs of the results a user asks for
    counts = dry_run("results/mteb_zh.json", "--configfile", str(tmp_path / "runs.yaml"), cwd=tmp_path)
    assert not any(rule.startswith("report_") for rule in counts)
    assert counts["evaluate"] == 2 * len(cfg["eval"]["languages"]["zh"]) and counts["aggregate"] == 1  # no run
    # a run's jobs score that run's model, with the same command line as the soup's (pooling included)
    cfg["pooling"] = "mean"
    (tmp_path / "runs.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    out = dry_run_output(
        "-p", "results/runs/run0/mteb_zh.json", "--configfile", str(tmp_path / "runs.yaml"), cwd=tmp_path
    )
    run_evals = [line for line in out.splitlines() if "evaluate --model models/finetune/run0 " in line]
    assert len(run_evals) == len(cfg["eval"]["languages"]["zh"]) and all("--pooling mean" in c for c in run_evals)
    assert "aggregate --model models/finetune/run0 --baseline results/baseline/mteb_zh.json" in out


# ---------------------------------------------------------------------------------------------
# the real report, in a browser


def ensure_chromium() -> str:
    """Debian's chromium, installed with apt-get when missing and root (skip otherwise)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is missing (Debian: apt-get install chromium) and this user cannot install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:  # a stale package index: update once and retry
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    found = shutil.which("chromium")
    if not found:
        pytest.skip(f"apt-get install chromium failed: {res.stderr[-500:]}")
    return found


def chromium(exe: str, page: Path, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [exe, *CHROMIUM_FLAGS, "--virtual-time-budget=10000", *args, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def visible_text(dom: str) -> str:
    body = dom[dom.index('id="app"') :]
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", body, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body))


# Open one result as a reader would: show the image, then its category in the menu (the report is
# a React app without URLs per view: the test drives its `app` object once the page has loaded).
SHOW = """<script>window.addEventListener("load", function show() {{
  if (!app) return setTimeout(show, 50);  // React mounts the app after the load event
  const path = Object.keys(results).find(k => k.endsWith("{name}"));
  app.setView({{content: "img", contentPath: results[path].data_uri, resultPath: path}});
  setTimeout(() => app.showCategory("{category}"), 300);
}});</script>"""


def show_result(report: Path, out: Path, name: str, category: str) -> Path:
    text = report.read_text(encoding="utf-8")
    i = text.rindex("</body>")
    out.write_text(text[:i] + SHOW.format(name=name, category=category) + text[i:], encoding="utf-8")
    return out


def embedded_results(report: Path) -> dict[str, dict]:
    text = report.read_text(encoding="utf-8")
    return json.loads(re.search(r"var results = (\{.*?\});\s*</script>", text, re.S)[1])


def decode(data_uri: str) -> str:
    return base64.b64decode(data_uri.split("base64,", 1)[1]).decode("utf-8")


PLOTS = [
    "rulegraph.svg",
    "funnel.svg",
    "funnel.html",
    "training_pretrain.svg",
    "training_finetune.svg",
    "mteb.svg",
    "mteb.html",
]


@pytest.mark.slow
def test_report_of_the_tiny_run_opens_in_chromium(tiny_run, tmp_path):
    exe = ensure_chromium()
    work, _ = tiny_run
    sm = [sys.executable, "-m", "snakemake", "-s", SNAKEFILE, "--configfile", str(work / "tiny.yaml")]
    res = subprocess.run(sm, cwd=work, env=ENV, capture_output=True, text=True, timeout=600)  # rule all: the plots
    assert res.returncode == 0, res.stderr[-5000:]
    ran = set(re.findall(r"^(?:local)?rule (\w+):", res.stderr, re.M))
    # the plots only, and the gathers of the sharded stages' stats that the funnel reads: the run itself is done
    assert (
        {"report_funnel", "report_mteb"}
        <= ran
        <= {
            "report_rulegraph",
            "report_funnel",
            "report_training",
            "report_mteb",
            "validate_gather",
            "dedup_stats",
            "decontaminate_gather",
            "mine_gather",
            "all",
        }
    ), ran
    report = tmp_path / "report.html"
    res = subprocess.run([*sm, "--report", str(report)], cwd=work, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-5000:]
    assert report.stat().st_size > 100_000

    # every plot and table is embedded, with its caption
    results = embedded_results(report)
    by_name = {Path(p).name: r for p, r in results.items()}
    assert set(PLOTS) <= set(by_name), sorted(by_name)
    for name in PLOTS:
        assert by_name[name]["caption"].strip(), name
        content = decode(by_name[name]["data_uri"])
        assert ("<svg" if name.endswith(".svg") else "<table") in content, name
    assert "finetune: 362 raw records" in decode(by_name["funnel.svg"]["data_uri"])  # 6 x 60 + the planted pair
    assert "overlaps_eval" in decode(by_name["funnel.html"]["data_uri"])
    assert "DemoRetrievalZh" in decode(by_name["mteb.html"]["data_uri"])
    assert "loss terms" in decode(by_name["training_finetune.svg"]["data_uri"])

    # the start page, rendered: the menu's categories, the description listing every result, the rule graph
    dom = chromium(exe, report, "--dump-dom").stdout
    text = visible_text(dom)
    for category in ["1. Pipeline", "2. Data funnel", "3. Training", "4. MTEB"]:
        assert category in text, category
    for name in PLOTS:
        assert name in text, name
    assert 'aria-label="Vega visualization"' in dom  # the report's own (interactive) rule graph

    # a plot opened in its category: the <img> shows the SVG, the menu lists the category's results
    view = show_result(report, tmp_path / "view.html", "funnel.svg", "2. Data funnel")
    dom = chromium(exe, view, "--dump-dom").stdout
    assert re.search(r'<img src="data:image/svg\+xml;[^"]*filename=funnel\.svg', dom), "the funnel chart is not shown"
    text = visible_text(dom)
    assert "funnel chart" in text and "funnel table" in text

    # a table, as the report's frame renders it
    table_page = tmp_path / "mteb_table.html"
    table_page.write_text(decode(by_name["mteb.html"]["data_uri"]), encoding="utf-8")
    text = visible_text(chromium(exe, table_page, "--dump-dom").stdout.replace("<body>", '<body id="app">'))
    assert "MTEB en" in text and "MTEB zh" in text and "soup − base" in text and "mean (task)" in text

    shot = tmp_path / "report.png"
    chromium(exe, view, "--window-size=1500,950", f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
