"""Shared pytest fixtures.

Model hubs are unreachable: every test runs offline (set before transformers is imported).
"""

from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _offline_hub():
    """Keep Hugging Face libraries offline for the whole session (also set at import time above)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    yield


def make_bilingual_sentences(n: int = 300, seed: int = 0) -> list[str]:
    """``n`` generated English and Chinese sentences (half each), deterministic for ``seed``."""
    rng = random.Random(seed)
    en_subjects = ["The cat", "A student", "My neighbour", "The old man", "Our team", "The robot", "A doctor", "She"]
    en_verbs = ["reads", "writes", "finds", "cooks", "repairs", "paints", "explains", "sells", "buys", "studies"]
    en_objects = [
        "a book about rivers", "the broken bicycle", "fresh bread", "a long letter", "the answer",
        "an old map", "green tea", "the search engine", "a small garden", "the weather report",
    ]
    en_tails = ["every morning.", "in the library.", "before dinner.", "with great care.", "on Sunday.", "quickly."]
    zh_subjects = ["我", "他们", "老师", "这个学生", "我的朋友", "小猫", "医生", "我们公司"]
    zh_verbs = ["喜欢", "正在读", "买了", "找到了", "介绍了", "研究", "修理", "写了"]
    zh_objects = ["一本新书", "中文文本", "天气预报", "绿茶", "一张旧地图", "搜索引擎", "北京的公园", "这个问题的答案"]
    zh_tails = ["。", "，非常有意思。", "，今天下午。", "，在图书馆里。", "，每天早上。"]
    out = []
    for i in range(n):
        if i % 2 == 0:
            out.append(f"{rng.choice(en_subjects)} {rng.choice(en_verbs)} {rng.choice(en_objects)} {rng.choice(en_tails)}")
        else:
            out.append(f"{rng.choice(zh_subjects)}{rng.choice(zh_verbs)}{rng.choice(zh_objects)}{rng.choice(zh_tails)}")
    return out


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> str:
    """A tiny random Qwen2 backbone (plain HF directory, causal config), built once per session.

    64 hidden, 2 layers, 4 heads / 2 kv heads, byte-level BPE tokenizer trained on generated
    English + Chinese text. Load it with ``kalm.modeling.load_embedding_model(tiny_qwen_dir)``
    to get the bidirectional mean-pooled embedding model.
    """
    from kalm.tiny_qwen import build_tiny_qwen2

    out = tmp_path_factory.mktemp("tiny_qwen") / "model"
    build_tiny_qwen2(out, make_bilingual_sentences(300), seed=0)
    return str(out)
