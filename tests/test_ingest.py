"""Ingestion: Parquet files and folders of shards; errors name file, row (or line) and field."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kalm.cli import main as kalm_main
from kalm.data.validate import ValidationError, validate_file
from kalm.io import read_json, read_jsonl


def write_parquet(path, rows, schema=None):
    table = pa.Table.from_pylist(rows, schema=schema) if rows or schema is None else schema.empty_table()
    pq.write_table(table, path)
    return str(path)


def run(tmp_path, src, **kw):
    return validate_file(str(src), "t", str(tmp_path / "o.jsonl"), str(tmp_path / "s.json"), **kw)


def test_parquet_is_validated_and_normalised_like_jsonl(tmp_path):
    src = write_parquet(
        tmp_path / "t.parquet",
        [
            {"query": "Ｑｕｅｒｙ  one", "pos": ["a\tb"], "neg": None, "instruction": None},
            {"query": "q2", "pos": ["p"], "neg": ["n"], "instruction": "Own instruction"},
        ],
    )
    stats = run(tmp_path, src, instruction="Default")
    out = list(read_jsonl(tmp_path / "o.jsonl"))
    assert out == [
        {"query": "Query one", "pos": ["a b"], "instruction": "Default", "task": "t"},
        {"query": "q2", "pos": ["p"], "neg": ["n"], "instruction": "Own instruction", "task": "t"},
    ]
    assert stats.n_in == stats.kept == 2


GOOD = {"query": "ok", "pos": ["fine"], "neg": ["n"]}


@pytest.mark.parametrize(
    "rows, row, field, reason",
    [
        ([{"pos": ["a"]}], 1, "query", "missing"),  # no query column
        ([{"query": 3, "pos": ["a"]}], 1, "query", "expected a string, got int"),  # int64 column
        ([{"query": "q", "pos": "a"}], 1, "pos", "list of strings"),  # string column
        ([GOOD, GOOD, {"query": "q", "pos": ["a", None]}], 3, "pos[1]", "expected a string"),
        ([GOOD, {"query": "q", "pos": [], "neg": None}], 2, "pos", "empty list"),
        ([GOOD, {"query": " \u3000 ", "pos": ["a"], "neg": None}], 2, "query", "empty text"),
        ([GOOD, GOOD, {"query": "q", "pos": ["a"], "neg": ["n", ""]}], 3, "neg[1]", "empty text"),
        ([GOOD, {"query": None, "pos": ["a"], "neg": None}], 2, "query", "expected a string, got NoneType"),
    ],
)
def test_bad_parquet_row_stops_with_file_row_and_field(tmp_path, rows, row, field, reason):
    src = write_parquet(tmp_path / "t.parquet", rows)
    with pytest.raises(ValidationError) as err:
        run(tmp_path, src)
    assert (err.value.path, err.value.line, err.value.field, err.value.unit) == (src, row, field, "row")
    assert reason in str(err.value) and f"{src}: row {row}: field '{field}'" in str(err.value)
    assert not (tmp_path / "o.jsonl").exists()


def test_parquet_quarantine_counts_rows(tmp_path):
    src = write_parquet(
        tmp_path / "t.parquet",
        [
            {"query": "a", "pos": ["x"]},
            {"query": "", "pos": ["x"]},
            {"query": "c", "pos": []},
            {"query": "d", "pos": ["y"]},
        ],
    )
    stats = run(tmp_path, src, on_error="quarantine", rejects_path=str(tmp_path / "r.jsonl"))
    rejects = list(read_jsonl(tmp_path / "r.jsonl"))
    assert [(r["row"], r["field"]) for r in rejects] == [(2, "query"), (3, "pos")]
    assert json.loads(rejects[0]["raw"]) == {"query": "", "pos": ["x"]}
    s = read_json(tmp_path / "s.json")
    assert s["in"] == 4 == stats.kept + sum(stats.dropped.values()) and stats.dropped == {
        "invalid:query": 1,
        "invalid:pos": 1,
    }


def test_unreadable_parquet_names_the_file(tmp_path):
    src = tmp_path / "t.parquet"
    src.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValidationError) as err:
        run(tmp_path, src, on_error="quarantine", rejects_path=str(tmp_path / "r.jsonl"))
    assert err.value.path == str(src) and err.value.field == "<file>" and "Parquet" in err.value.reason


def test_folder_of_shards_mixes_jsonl_and_parquet_in_sorted_order(tmp_path):
    folder = tmp_path / "task"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jsonl").write_text(
        '{"query": "q1", "pos": ["p1"]}\n\n{"query": "q2", "pos": ["p2"]}\n', encoding="utf-8"
    )
    write_parquet(folder / "b.parquet", [{"query": "q3", "pos": ["p3"]}])
    (folder / "sub" / "c.jsonl").write_text('{"query": "q4", "pos": ["p4"]}\n', encoding="utf-8")
    (folder / "README.md").write_text("not a shard", encoding="utf-8")
    (folder / ".hidden.jsonl").write_text("garbage\n", encoding="utf-8")
    stats = run(tmp_path, folder)
    assert [r["query"] for r in read_jsonl(tmp_path / "o.jsonl")] == ["q1", "q2", "q3", "q4"]
    assert stats.n_in == 4 and len(read_json(tmp_path / "s.json")["shards"]) == 3


def test_error_in_a_shard_names_the_shard_file_and_line(tmp_path):
    folder = tmp_path / "task"
    folder.mkdir()
    (folder / "0.jsonl").write_text('{"query": "q1", "pos": ["p1"]}\n', encoding="utf-8")
    (folder / "1.jsonl").write_text('{"query": "q1", "pos": ["p1"]}\n{"query": "q2"}\n', encoding="utf-8")
    with pytest.raises(ValidationError) as err:
        run(tmp_path, folder)
    assert (err.value.path, err.value.line, err.value.field) == (str(folder / "1.jsonl"), 2, "pos")
    assert f"{folder / '1.jsonl'}:2: field 'pos': missing" == str(err.value)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.mkdir(), "no .jsonl or .parquet shards"),
        (lambda p: p.with_suffix(".csv").write_text("q,p\n"), "unsupported format '.csv'"),
        (lambda p: None, "no such file or folder"),
    ],
)
def test_unusable_task_path(tmp_path, make, reason):
    path = tmp_path / "task"
    make(path)
    target = path.with_suffix(".csv") if "csv" in reason else path
    with pytest.raises(ValidationError, match=reason):
        run(tmp_path, target)


def test_cli_validates_a_folder_and_reports_parquet_rows(tmp_path, capsys):
    folder = tmp_path / "task"
    folder.mkdir()
    write_parquet(folder / "x.parquet", [{"query": "q", "pos": ["p"]}, {"query": "q", "pos": [""]}])
    args = [
        "validate",
        "--input",
        str(folder),
        "--task",
        "t",
        "--out",
        str(tmp_path / "o.jsonl"),
        "--stats",
        str(tmp_path / "s.json"),
    ]
    with pytest.raises(SystemExit) as err:
        kalm_main(args)
    assert f"{folder / 'x.parquet'}: row 2: field 'pos[0]': empty text" in str(err.value)
    assert kalm_main([*args, "--on-error", "quarantine", "--rejects", str(tmp_path / "r.jsonl")]) == 0
    assert read_json(tmp_path / "s.json")["kept"] == 1
