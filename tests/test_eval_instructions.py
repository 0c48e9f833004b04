"""Per-task instructions (KaLM V1's published table, V2's from mteb), task lists, and the one rule
saying which sides of a task carry its instruction (kalm.evaluation.instructions.instruction_sides)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from kalm.evaluation import task_instructions as ti
from kalm.evaluation.evaluate import (
    TaskSpecError,
    build_prompts,
    prepare_task,
    resolve_task,
    task_sides,
)
from kalm.evaluation.instructions import SYMMETRIC_MTEB_TYPES, instruction_sides, is_symmetric, mteb_type

PREFIX = "Instruct: {} \n Query: "


@pytest.fixture
def no_data(monkeypatch):
    """prepare_task without loading data (nothing is cached here): only the prompts are checked."""
    import kalm.evaluation.evaluate

    monkeypatch.setattr(kalm.evaluation.evaluate, "load_task_data", lambda task, spec: {"source": "hub"})


def v2_table():
    from mteb.models.model_implementations.kalm_models import KaLM_v2_task_prompts

    return KaLM_v2_task_prompts


def test_table_is_kalms_and_matches_mtebs_copy_up_to_known_edits():
    """mteb ships the same table for the KaLM models (typos fixed); any other difference is ours."""
    from mteb.models.model_implementations.kalm_models import KaLM_task_prompts

    assert set(ti.KALM_TASK_INSTRUCTIONS) == set(KaLM_task_prompts)
    differ = {k for k, v in ti.KALM_TASK_INSTRUCTIONS.items() if KaLM_task_prompts[k] != v}
    # the published script's strings (KaLM evaluate/utils.py) where mteb's copy edited them
    assert differ == {
        "Banking77Classification",
        "MultilingualSentiment",
        "JDReview",
        "OnlineShopping",
        "RedditClustering",
        "StackExchangeClustering",
        "EightTagsClustering",
    }
    assert ti.KALM_TASK_INSTRUCTIONS["JDReview"].endswith("for iPhoneinto positive or negative")


@pytest.mark.parametrize("benchmark", ["MTEB(cmn, v1)", "MTEB(eng, v2)", "MTEB(eng, v1)", "KaLM-C-MTEB"])
def test_every_task_of_the_configured_lists_gets_kalms_instruction(benchmark):
    import mteb

    names = ti.benchmark_tasks(benchmark)
    for name in names:
        task_type = mteb.get_task(name).metadata.type
        instruction, source = ti.resolve_instruction({"name": name}, task_type, "kalm")
        if task_type in ("Retrieval", "Reranking"):
            assert (instruction, source) == (ti.KALM_RETRIEVAL_INSTRUCTION, "kalm:type"), name
        elif task_type in ("STS", "PairClassification", "Summarization"):
            assert (instruction, source) == (None, "kalm:type"), name
        else:
            assert instruction and source in ("kalm:task", "kalm:alias"), name
        assert ti.resolve_instruction({"name": name}, task_type, "none") == (None, "none")


def test_kalm_cmteb_list():
    import mteb

    names = ti.benchmark_tasks("KaLM-C-MTEB")
    assert len(names) == len(set(names)) == 35
    counts: dict[str, int] = {}
    for name in names:
        t = mteb.get_task(name).metadata.type
        counts[t] = counts.get(t, 0) + 1
    assert counts == {
        "Retrieval": 8,
        "Reranking": 4,
        "STS": 8,
        "PairClassification": 2,
        "Clustering": 4,
        "Classification": 9,
    }
    cmn = set(ti.benchmark_tasks("MTEB(cmn, v1)"))
    assert cmn < set(names) and set(names) - cmn == set(ti.KALM_CMTEB_SUBSETS)
    # the C-MTEB subsets, not STS22's zh-en pairs nor MASSIVE's traditional Chinese
    for name, subsets in ti.KALM_CMTEB_SUBSETS.items():
        spec = {"name": name, "lang": "zh", **ti.benchmark_task_defaults("KaLM-C-MTEB", name)}
        assert sorted(resolve_task(spec).hf_subsets) == subsets
    assert sorted(resolve_task({"name": "MassiveIntentClassification", "lang": "zh"}).hf_subsets) == ["zh-CN", "zh-TW"]


def test_mteb_benchmark_task_keeps_the_benchmarks_subsets():
    spec = {
        "name": "AmazonCounterfactualClassification",
        "lang": "en",
        **ti.benchmark_task_defaults("MTEB(eng, v2)", "AmazonCounterfactualClassification"),
    }
    assert spec["benchmark"] == "MTEB(eng, v2)"
    assert resolve_task(spec).hf_subsets == ["en"]  # the language filter alone would add 'en-ext'
    assert sorted(resolve_task({"name": "AmazonCounterfactualClassification", "lang": "en"}).hf_subsets) == [
        "en",
        "en-ext",
    ]
    with pytest.raises(TaskSpecError, match="not in mteb benchmark"):
        resolve_task({"name": "T2Retrieval", "benchmark": "MTEB(eng, v2)"})


def test_config_instruction_wins_and_local_tasks_take_only_the_configs():
    assert ti.resolve_instruction({"name": "TNews", "instruction": "Classify"}, "Classification") == (
        "Classify",
        "config",
    )
    assert ti.resolve_instruction({"name": "TNews", "instruction": ""}, "Classification") == (None, "config")
    assert ti.resolve_instruction({"name": "TNews"}, "Classification") == (
        "Categorizing the given news title",
        "kalm:task",
    )
    assert ti.resolve_instruction({"name": "TNews", "path": "x"}, "Classification") == (None, "none")
    assert ti.resolve_instruction({"name": "ArXivHierarchicalClusteringP2P"}, "Clustering")[1] == "kalm:alias"
    with pytest.raises(ti.InstructionError, match="NewClassification.*no instruction in KaLM's published table"):
        ti.resolve_instruction({"name": "NewClassification"}, "Classification")
    with pytest.raises(ti.InstructionError, match="unknown instruction set 'e5'"):
        ti.resolve_instruction({"name": "TNews"}, "Classification", "e5")


def test_prepared_mteb_task_gets_kalm_prompts_without_data(no_data):
    """The prompts mteb receives for registered tasks (data loading stubbed: nothing is cached here)."""
    prefix = PREFIX
    rr = prepare_task({"name": "T2Reranking", "lang": "zh"})
    assert rr.prompts == {"Reranking-query": prefix.format(ti.KALM_RETRIEVAL_INSTRUCTION)}
    assert (rr.instruction_set, rr.instruction_source) == ("kalm", "kalm:type")
    assert prepare_task({"name": "AFQMC", "lang": "zh"}).prompts == {}
    assert prepare_task({"name": "TNews", "lang": "zh"}).prompts == {
        "Classification": prefix.format("Categorizing the given news title")
    }
    assert prepare_task({"name": "CLSClusteringS2S", "lang": "zh"}).prompts == {
        "Clustering": prefix.format(ti.KALM_TASK_INSTRUCTIONS["CLSClusteringS2S"])
    }
    assert prepare_task({"name": "T2Retrieval", "lang": "zh", "instruction_set": "none"}).prompts == {}


def test_one_definition_of_symmetric():
    # data types of the config and MTEB types agree
    for data_type, mteb_name in [
        ("sts", "STS"),
        ("pair_classification", "PairClassification"),
        ("pair-classification", "PairClassification"),
        ("clustering", "Clustering"),
        ("retrieval", "Retrieval"),
        ("classification", "Classification"),
        ("reranking", "Reranking"),
        ("weak", "Retrieval"),
    ]:
        assert mteb_type(data_type) == mteb_name
        assert is_symmetric(data_type) == is_symmetric(mteb_name) == (mteb_name in SYMMETRIC_MTEB_TYPES)
        for instruction_set in ("kalm", "kalm_v2", "none"):
            assert instruction_sides(instruction_set, data_type) == instruction_sides(instruction_set, mteb_name)
    assert not is_symmetric(None) and not is_symmetric("Retrieval") and is_symmetric("STS")
    # kalm.evaluation.evaluate decides with the rule, unless the spec says otherwise
    assert task_sides({}, "STS", "kalm_v2") == (True, True) and task_sides({}, "Reranking") == (True, False)
    assert task_sides({"symmetric": True}, "Retrieval") == (True, True)
    assert task_sides({"symmetric": False}, "STS", "kalm_v2") == (True, False)
    p = build_prompts("Clustering", "Group", task_sides({}, "Clustering")[1])
    assert p == {"Clustering": "Instruct: Group \n Query: "}


def test_the_rule_per_instruction_set_and_type():
    """kalm.evaluation.instructions.instruction_sides: (query side, passage side), the module docstring's table."""
    expected = {
        # type: (kalm V1, kalm_v2, none)
        "STS": ((False, False), (True, True), (True, True)),
        "PairClassification": ((False, False), (True, True), (True, True)),
        "Summarization": ((False, False), (True, True), (True, True)),
        "BitextMining": ((False, False), (True, True), (True, True)),
        "Clustering": ((True, True), (True, True), (True, True)),
        "Retrieval": ((True, False), (True, False), (True, False)),
        "Reranking": ((True, False), (True, False), (True, False)),
        "Classification": ((True, False), (True, False), (True, False)),
        None: ((True, False), (True, False), (True, False)),  # weak pairs
    }
    for task_type, sides in expected.items():
        for instruction_set, want in zip(("kalm", "kalm_v2", "none"), sides):
            assert instruction_sides(instruction_set, task_type) == want, (instruction_set, task_type)
    assert instruction_sides(None, "STS") == (False, False)  # the default set is kalm
    # kalm_v2's per-task entries (evaluation knows the task's name): duplicate-question search on both sides
    assert instruction_sides("kalm_v2", "Retrieval", "QuoraRetrieval") == (True, True)
    assert instruction_sides("kalm_v2", "Retrieval", "T2Retrieval") == (True, False)
    assert instruction_sides("kalm", "Retrieval", "QuoraRetrieval") == (True, False)
    assert instruction_sides("kalm", "STS", symmetric=True) == (True, True)  # an explicit override
    with pytest.raises(ValueError, match="unknown instruction set 'e5'"):
        instruction_sides("e5", "STS")


@pytest.mark.parametrize("benchmark", ["MTEB(cmn, v1)", "MTEB(eng, v2)", "MTEB(eng, v1)", "KaLM-C-MTEB"])
def test_kalm_v2_gives_every_task_mtebs_v2_instruction(benchmark):
    """Under kalm_v2 every task of the lists has KaLM V2's instruction, the entry of mteb's
    KaLM_v2_task_prompts (of its alias for tasks newer than the table), on both sides exactly where the
    table has '-query' and '-document' keys: every STS, PairClassification and Summarization task."""
    import mteb

    table = v2_table()
    for name in ti.benchmark_tasks(benchmark):
        task_type = mteb.get_task(name).metadata.type
        instruction, source = ti.resolve_instruction({"name": name}, task_type, "kalm_v2")
        key = name if source == "kalm_v2:task" else ti.KALM_V2_TASK_ALIASES[name]
        assert source in ("kalm_v2:task", "kalm_v2:alias"), name
        both = f"{key}-query" in table
        assert instruction == table[f"{key}-query" if both else key], name
        # (a clustering task has one input: its type is symmetric, its table key single)
        assert instruction_sides("kalm_v2", task_type, name) == (True, both or task_type == "Clustering"), name
        if task_type in ("STS", "PairClassification", "Summarization"):
            assert both and table[f"{key}-document"] == instruction, name


def test_kalm_v2_instructs_sts_on_both_sides_and_kalm_v1_not_at_all(no_data):
    table = v2_table()
    sts = prepare_task({"name": "STSB", "lang": "zh", "instruction_set": "kalm_v2"})
    # both sides: the type key, which mteb applies to every input of the task
    assert sts.prompts == {"STS": PREFIX.format(table["STSB-query"])} and table["STSB-document"] == table["STSB-query"]
    assert (sts.instruction, sts.symmetric, sts.instruction_source) == (table["STSB-query"], True, "kalm_v2:task")
    pc = prepare_task({"name": "Cmnli", "lang": "zh", "instruction_set": "kalm_v2"})
    assert pc.prompts == {"PairClassification": PREFIX.format(table["Cmnli-query"])}
    assert prepare_task({"name": "STSB", "lang": "zh", "instruction_set": "kalm"}).prompts == {}
    # retrieval: queries only (V2's own string), except the tasks whose table entry has both sides
    assert prepare_task({"name": "T2Retrieval", "lang": "zh", "instruction_set": "kalm_v2"}).prompts == {
        "Retrieval-query": PREFIX.format(table["T2Retrieval"])
    }
    assert prepare_task({"name": "QuoraRetrieval", "lang": "en", "instruction_set": "kalm_v2"}).prompts == {
        "Retrieval": PREFIX.format(table["QuoraRetrieval-query"])
    }
    assert prepare_task({"name": "TNews", "lang": "zh", "instruction_set": "kalm_v2"}).prompts == {
        "Classification": PREFIX.format(table["TNews"])
    }
    # the aggregate CQADupstackRetrieval (MTEB(eng, v1)) takes its subtasks' one instruction, on both sides
    subtasks = {k: v for k, v in table.items() if k.startswith("CQADupstack")}
    assert len(subtasks) == 24 and len(set(subtasks.values())) == 1
    assert ti.resolve_instruction({"name": "CQADupstackRetrieval"}, "Retrieval", "kalm_v2") == (
        next(iter(subtasks.values())),
        "kalm_v2:alias",
    )


def test_a_configured_instruction_follows_the_rule_too(no_data, tmp_path, caplog):
    """A local STS task with its instruction in the config: none under kalm (V1 evaluates STS without
    instruction; training drops it too), both sides under kalm_v2 and none; a spec's symmetric overrides."""
    folder = tmp_path / "sts"
    folder.mkdir()
    (folder / "test.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n', encoding="utf-8")
    spec = {"name": "LocalSTS", "type": "STS", "lang": "en", "path": str(folder), "instruction": "Same meaning"}
    v1 = prepare_task({**spec, "instruction_set": "kalm"})
    assert (v1.prompts, v1.instruction, v1.instruction_source) == ({}, None, "kalm:type")
    assert "not used" in caplog.text
    for instruction_set in ("kalm_v2", "none"):
        p = prepare_task({**spec, "instruction_set": instruction_set})
        assert p.prompts == {"STS": PREFIX.format("Same meaning")}
        assert (p.instruction_source, p.symmetric) == ("config", True)
    forced = prepare_task({**spec, "instruction_set": "kalm", "symmetric": True})
    assert forced.prompts == {"STS": PREFIX.format("Same meaning")}
