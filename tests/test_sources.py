"""Sources as the DAG's first step (issue 18): a data task's `source` fetched and converted file by file.

The hub is unreachable here: hub sources are tested against a local folder of the hub cache's layout
(`datasets--<org>--<name>/snapshots/<revision>/<path>`, what `hf_hub_download` reads), local sources against a
folder shaped like the repository. The files have several row groups, a column mapping and malformed rows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from kalm.data.fetch import SourceError, fetch, output_name, source_files

ROOT = Path(__file__).resolve().parents[1]
REVISION = "e3ec86c81294deae4c025b502e39b89d522adf5a"

# (q, p, n) rows: good ones, and the malformed ones the converter must count
ROWS = [
    ("what is a tower?", ["a tall building"], ["a river"]),
    ("塔是什么？", "一种高的建筑", None),  # a positive as a plain string, no negatives
    (None, ["orphan positive"], []),  # missing_query
    ("  ", ["blank query"], []),  # missing_query
    ("no positive", [], ["x"]),  # missing_pos
    ("how far is the sea?", ["twelve miles"], ["five apples", ""]),  # an empty negative is left out
]


def write_repo_file(path: Path, rows, row_group_size: int = 2) -> None:
    """A Parquet file of ``rows`` (q, p, n) in small row groups, with a column the mapping leaves out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "q": pa.array([r[0] for r in rows], pa.string()),
            "p": pa.array([r[1] if isinstance(r[1], list) else [r[1]] for r in rows], pa.list_(pa.string())),
            "n": pa.array([r[2] for r in rows], pa.list_(pa.string())),
            "extra": pa.array(range(len(rows))),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)


def read_rows(path) -> list[dict]:
    return pq.read_table(path).to_pylist()


COLUMNS = {"query": "q", "pos": "p", "neg": "n"}


def test_a_local_source_is_converted_row_group_by_row_group_and_its_counts_add_up(tmp_path):
    repo = tmp_path / "mirror"
    write_repo_file(repo / "paq/train-00000-of-00002.parquet", ROWS)
    write_repo_file(repo / "paq/train-00001-of-00002.parquet", ROWS[:2])
    spec = {"local": str(repo), "files": "paq/*.parquet", "columns": COLUMNS, "license": "mit"}
    files = source_files(spec)
    assert files == ["paq/train-00000-of-00002.parquet", "paq/train-00001-of-00002.parquet"]
    assert pq.ParquetFile(repo / files[0]).num_row_groups == 3
    out = tmp_path / "out" / output_name(files[0])
    stats = fetch(spec, files[0], str(out), str(tmp_path / "s.json"), task="paq")
    assert read_rows(out) == [
        {"query": "what is a tower?", "pos": ["a tall building"], "neg": ["a river"]},
        {"query": "塔是什么？", "pos": ["一种高的建筑"], "neg": []},
        {"query": "how far is the sea?", "pos": ["twelve miles"], "neg": ["five apples"]},
    ]
    assert stats["in"] == 6 and stats["kept"] == 3
    assert stats["dropped"] == {"missing_pos": 1, "missing_query": 2}
    assert stats["in"] == stats["kept"] + sum(stats["dropped"].values())
    assert stats["source"] == {"local": str(repo), "file": files[0], "license": "mit"}
    assert json.loads((tmp_path / "s.json").read_text())["kept"] == 3


@pytest.mark.parametrize("name", ["sets/train.jsonl", "sets/train.jsonl.gz"])
def test_a_json_lines_source_converts_as_the_parquet_one_does(tmp_path, name):
    """The same rows as JSON Lines (plain and gzipped, many public fine-tuning sets' format), in batches of 2
    lines, plus a line that is not a JSON object: the same records and counts, the bad line counted too."""
    import gzip

    lines = [json.dumps({"q": q, "p": p, "n": n, "extra": i}, ensure_ascii=False) for i, (q, p, n) in enumerate(ROWS)]
    lines.insert(3, '{"q": "cut off')
    text = "\n".join(lines) + "\n"
    path = tmp_path / "mirror" / name
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    write_repo_file(tmp_path / "mirror" / "sets/train.parquet", ROWS)
    spec = {"local": str(tmp_path / "mirror"), "files": [name], "columns": COLUMNS}
    from kalm.data.fetch import convert
    from kalm.io import StageStats

    stats = StageStats("fetch")
    convert(path, COLUMNS, tmp_path / "o.parquet", stats, batch_size=2)
    parquet = fetch(spec | {"files": ["sets/train.parquet"]}, "sets/train.parquet", str(tmp_path / "p.parquet"))
    assert read_rows(tmp_path / "o.parquet") == read_rows(tmp_path / "p.parquet")
    got = stats.as_dict()
    assert got["in"] == parquet["in"] + 1 and got["kept"] == parquet["kept"]
    assert got["dropped"] == {**parquet["dropped"], "malformed_json": 1}
    assert fetch(spec, name, str(tmp_path / "f.parquet"))["kept"] == parquet["kept"]  # through kalm fetch too
    bad = {**spec, "columns": {"query": "question", "pos": "p"}}
    with pytest.raises(SourceError, match=r"train\.jsonl(\.gz)?:1: column 'question' \(source.columns.query\).*'q'"):
        fetch(bad, name, str(tmp_path / "g.parquet"))


def test_a_missing_column_names_the_file_the_column_and_what_the_file_has(tmp_path):
    write_repo_file(tmp_path / "r/a.parquet", ROWS)
    spec = {"local": str(tmp_path / "r"), "files": ["a.parquet"], "columns": {"query": "question", "pos": "p"}}
    with pytest.raises(
        SourceError, match=r"a\.parquet: column 'question' \(source.columns.query\).*it has \['q', 'p', 'n', 'extra'\]"
    ):
        fetch(spec, "a.parquet", str(tmp_path / "o.parquet"))
    assert not (tmp_path / "o.parquet").exists()  # atomic: nothing half-written


def test_a_hub_source_reads_the_pinned_revision_and_names_how_to_mirror_when_offline(tmp_path):
    """hf_hub_download against a local folder of the hub cache's layout; offline without the file: an error
    naming the source, the file and the mirror command."""
    cache = tmp_path / "hub"
    write_repo_file(cache / f"datasets--org--pretrain/snapshots/{REVISION}/paq/train-00000-of-00001.parquet", ROWS)
    spec = {
        "hf": "org/pretrain",
        "revision": REVISION,
        "files": ["paq/train-00000-of-00001.parquet"],
        "columns": COLUMNS,
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "kalm", "fetch", "--source", json.dumps(spec), "--task", "paq"]
    ok = subprocess.run(
        cmd + ["--file", spec["files"][0], "--out", str(tmp_path / "o.parquet"), "--stats", str(tmp_path / "s.json")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "s.json").read_text())["source"]["revision"] == REVISION
    assert len(read_rows(tmp_path / "o.parquet")) == 3
    missing = subprocess.run(
        cmd + ["--file", "paq/train-00009.parquet", "--out", str(tmp_path / "m.parquet")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0
    assert f"org/pretrain@{REVISION}: paq/train-00009.parquet is not in the local cache" in missing.stderr
    assert "huggingface-cli download org/pretrain paq/train-00009.parquet --repo-type dataset" in missing.stderr


def test_source_specs_are_checked():
    with pytest.raises(SourceError, match="needs a revision"):
        source_files({"hf": "a/b", "files": ["x.parquet"], "columns": COLUMNS})
    with pytest.raises(SourceError, match="no globs"):
        source_files({"hf": "a/b", "revision": REVISION, "files": ["*.parquet"], "columns": COLUMNS})
    with pytest.raises(SourceError, match="query and pos required"):
        source_files({"local": "x", "files": ["a.parquet"], "columns": {"query": "q"}})


@pytest.mark.slow
def test_the_dag_fetches_a_source_task_and_validates_its_files(tmp_path):
    """A demo task given as a source: the plan has one fetch job per file, and the fetched files validate."""
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text(encoding="utf-8"))
    repo = tmp_path / "mirror"
    src = [
        json.loads(line) for line in (ROOT / cfg["data"]["finetune"]["retrieval_en"]["path"]).read_text().splitlines()
    ]
    rows = [(r["query"], r["pos"], r.get("neg", [])) for r in src[:30]] + [(None, ["x"], [])]
    write_repo_file(repo / "en/train-00000-of-00002.parquet", rows[:16], row_group_size=5)
    write_repo_file(repo / "en/train-00001-of-00002.parquet", rows[16:], row_group_size=5)
    for stage in ("pretrain", "finetune"):
        for spec in cfg["data"][stage].values():
            spec["path"] = str(ROOT / spec["path"])
    del cfg["data"]["finetune"]["retrieval_en"]["path"]
    cfg["data"]["finetune"]["retrieval_en"]["source"] = {
        "local": str(repo),
        "files": ["en/*.parquet"],
        "columns": COLUMNS,
    }
    for task in cfg["eval"]["tasks"].values():
        task["path"] = str(ROOT / task["path"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    shutil.copytree(ROOT / "data", tmp_path / "data", dirs_exist_ok=True)
    env = {**os.environ, "SNAKEMAKE_PROFILE": str(ROOT / "profiles/local"), "HF_HUB_OFFLINE": "1"}
    targets = [f"work/data/finetune/validated/retrieval_en/part{i}.parquet" for i in (0, 1)]
    base = [
        sys.executable,
        "-m",
        "snakemake",
        *targets,
        "-s",
        str(ROOT / "workflow/Snakefile"),
        f"--configfile={tmp_path / 'c.yaml'}",
    ]
    dry = subprocess.run(base + ["-n"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "corpora/finetune/retrieval_en/en__train-00000-of-00002.parquet" in dry.stdout
    run = subprocess.run(base, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    fetched = [
        json.loads((tmp_path / f"corpora/finetune/retrieval_en/en__train-0000{i}-of-00002.stats.json").read_text())
        for i in (0, 1)
    ]
    assert [s["in"] for s in fetched] == [16, 15] and fetched[1]["dropped"] == {"missing_query": 1}
    validated = [json.loads((tmp_path / t.replace(".parquet", ".stats.json")).read_text()) for t in targets]
    assert sum(v["in"] for v in validated) == sum(s["kept"] for s in fetched) == 30
