"""Per-task instructions (KaLM's published table), task lists, and the one definition of 'symmetric'."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from kalm import task_instructions as ti
from kalm.evaluate import (
    TaskSpecError,
    build_prompts,
    prepare_task,
    resolve_task,
    task_symmetric,
)
from kalm.instructions import SYMMETRIC_MTEB_TYPES, is_symmetric, mteb_type


def test_table_is_kalms_and_matches_mtebs_copy_up_to_known_edits():
    """mteb ships the same table for the KaLM models (typos fixed); any other difference is ours."""
    from mteb.models.model_implementations.kalm_models import KaLM_task_prompts

    assert set(ti.KALM_TASK_INSTRUCTIONS) == set(KaLM_task_prompts)
    differ = {k for k, v in ti.KALM_TASK_INSTRUCTIONS.items() if KaLM_task_prompts[k] != v}
    # the published script's strings (KaLM evaluate/utils.py) where mteb's copy edited them
    assert differ == {"Banking77Classification", "MultilingualSentiment", "JDReview", "OnlineShopping",
                      "RedditClustering", "StackExchangeClustering", "EightTagsClustering"}
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
    assert counts == {"Retrieval": 8, "Reranking": 4, "STS": 8, "PairClassification": 2, "Clustering": 4,
                      "Classification": 9}
    cmn = set(ti.benchmark_tasks("MTEB(cmn, v1)"))
    assert cmn < set(names) and set(names) - cmn == set(ti.KALM_CMTEB_SUBSETS)
    # the C-MTEB subsets, not STS22's zh-en pairs nor MASSIVE's traditional Chinese
    for name, subsets in ti.KALM_CMTEB_SUBSETS.items():
        spec = {"name": name, "lang": "zh", **ti.benchmark_task_defaults("KaLM-C-MTEB", name)}
        assert sorted(resolve_task(spec).hf_subsets) == subsets
    assert sorted(resolve_task({"name": "MassiveIntentClassification", "lang": "zh"}).hf_subsets) == ["zh-CN", "zh-TW"]


def test_mteb_benchmark_task_keeps_the_benchmarks_subsets():
    spec = {"name": "AmazonCounterfactualClassification", "lang": "en",
            **ti.benchmark_task_defaults("MTEB(eng, v2)", "AmazonCounterfactualClassification")}
    assert spec["benchmark"] == "MTEB(eng, v2)"
    assert resolve_task(spec).hf_subsets == ["en"]  # the language filter alone would add 'en-ext'
    assert sorted(resolve_task({"name": "AmazonCounterfactualClassification", "lang": "en"}).hf_subsets) == [
        "en", "en-ext"]
    with pytest.raises(TaskSpecError, match="not in mteb benchmark"):
        resolve_task({"name": "T2Retrieval", "benchmark": "MTEB(eng, v2)"})


def test_config_instruction_wins_and_local_tasks_take_only_the_configs():
    assert ti.resolve_instruction({"name": "TNews", "instruction": "Classify"}, "Classification") == ("Classify", "config")
    assert ti.resolve_instruction({"name": "TNews", "instruction": ""}, "Classification") == (None, "config")
    assert ti.resolve_instruction({"name": "TNews"}, "Classification") == ("Categorizing the given news title", "kalm:task")
    assert ti.resolve_instruction({"name": "TNews", "path": "x"}, "Classification") == (None, "none")
    assert ti.resolve_instruction({"name": "ArXivHierarchicalClusteringP2P"}, "Clustering")[1] == "kalm:alias"
    with pytest.raises(ti.InstructionError, match="NewClassification.*no instruction in KaLM's published table"):
        ti.resolve_instruction({"name": "NewClassification"}, "Classification")
    with pytest.raises(ti.InstructionError, match="unknown instruction set 'e5'"):
        ti.resolve_instruction({"name": "TNews"}, "Classification", "e5")


def test_prepared_mteb_task_gets_kalm_prompts_without_data(monkeypatch):
    """The prompts mteb receives for registered tasks (data loading stubbed: nothing is cached here)."""
    import kalm.evaluate

    monkeypatch.setattr(kalm.evaluate, "load_task_data", lambda task, spec: {"source": "hub"})
    prefix = "Instruct: {} \n Query: "
    rr = prepare_task({"name": "T2Reranking", "lang": "zh"})
    assert rr.prompts == {"Reranking-query": prefix.format(ti.KALM_RETRIEVAL_INSTRUCTION)}
    assert (rr.instruction_set, rr.instruction_source) == ("kalm", "kalm:type")
    assert prepare_task({"name": "AFQMC", "lang": "zh"}).prompts == {}
    assert prepare_task({"name": "TNews", "lang": "zh"}).prompts == {
        "Classification": prefix.format("Categorizing the given news title")}
    assert prepare_task({"name": "CLSClusteringS2S", "lang": "zh"}).prompts == {
        "Clustering": prefix.format(ti.KALM_TASK_INSTRUCTIONS["CLSClusteringS2S"])}
    assert prepare_task({"name": "T2Retrieval", "lang": "zh", "instruction_set": "none"}).prompts == {}


def test_one_definition_of_symmetric():
    # data types of the config and MTEB types agree
    for data_type, mteb_name in [("sts", "STS"), ("pair_classification", "PairClassification"),
                                 ("pair-classification", "PairClassification"), ("clustering", "Clustering"),
                                 ("retrieval", "Retrieval"), ("classification", "Classification"),
                                 ("reranking", "Reranking"), ("weak", "Retrieval")]:
        assert mteb_type(data_type) == mteb_name
        assert is_symmetric(data_type) == is_symmetric(mteb_name) == (mteb_name in SYMMETRIC_MTEB_TYPES)
    assert not is_symmetric(None) and not is_symmetric("Retrieval") and is_symmetric("STS")
    # kalm.evaluate decides with it, unless the spec says otherwise
    assert task_symmetric({}, "STS") and not task_symmetric({}, "Reranking")
    assert task_symmetric({"symmetric": True}, "Retrieval") and not task_symmetric({"symmetric": False}, "STS")
    p = build_prompts("Clustering", "Group", task_symmetric({}, "Clustering"))
    assert p == {"Clustering": "Instruct: Group \n Query: "}
