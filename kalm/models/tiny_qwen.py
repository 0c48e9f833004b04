"""Build a tiny, randomly initialised Qwen2 backbone for tests and smoke runs.

KaLM-Embedding fine-tunes a Qwen2 decoder (with the causal mask removed) as an embedding
model. Tests cannot download Qwen2-0.5B, so this module builds a stand-in of the same
architecture in a few seconds on CPU:

* a byte-level BPE tokenizer trained locally (``tokenizers``) on the given texts, using the
  same normalizer / pre-tokenizer / decoder as the real Qwen2 tokenizer, wrapped as
  :class:`transformers.Qwen2Tokenizer` (``<|endoftext|>`` is eos and pad, as in Qwen2);
* a seeded, randomly initialised :class:`transformers.Qwen2Model` (no LM head: only the
  hidden states are needed for embeddings).

Both are saved as a plain Hugging Face directory (``config.json``, ``model.safetensors``,
tokenizer files), i.e. exactly what a real backbone checkpoint looks like, so the same code
path (:func:`kalm.models.modeling.load_embedding_model`) is exercised. The saved config is left
causal, like a real Qwen2 checkpoint; the conversion to bidirectional happens on load.

CLI: ``kalm tiny-qwen --out DIR --texts data.jsonl [more.jsonl notes.txt ...]``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

#: Special tokens of the real Qwen2 tokenizer (ids 0, 1, 2 here).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|endoftext|>"

#: JSONL fields whose string values (or lists of strings) are used as tokenizer training text.
TEXT_FIELDS = ("query", "pos", "neg", "text", "sentence1", "sentence2")


def _train_tokenizer(texts: list[str], vocab_size: int):
    """Train a Qwen2-style byte-level BPE on ``texts`` and wrap it as ``Qwen2Tokenizer``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is representable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)

    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # Qwen2Tokenizer rebuilds exactly this pipeline (NFC, Qwen regex split + byte level) from
    # vocab + merges, so the saved tokenizer has tokenizer_class "Qwen2Tokenizer".
    hf_tok = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token=None,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=None,
    )
    hf_tok.padding_side = "right"
    return hf_tok


def build_tiny_qwen2(
    out_dir: str | Path,
    texts: Iterable[str],
    vocab_size: int = 1000,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> Path:
    """Train a tokenizer on ``texts``, build a seeded random ``Qwen2Model``, save both to ``out_dir``.

    The directory is written atomically (a killed run leaves no half-written model) and is a
    plain Hugging Face backbone directory (safetensors), loadable with ``AutoModel`` /
    ``AutoTokenizer`` or :func:`kalm.models.modeling.load_embedding_model`. Returns ``out_dir``.
    """
    import torch
    from transformers import Qwen2Config, Qwen2Model

    from kalm.io import atomic_path

    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("build_tiny_qwen2 needs at least one non-empty text to train the tokenizer")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must be divisible by num_heads, and num_heads by num_kv_heads")

    tokenizer = _train_tokenizer(texts, vocab_size)
    tokenizer.model_max_length = max_position_embeddings
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=False,
        use_cache=False,
    )
    config.architectures = ["Qwen2Model"]

    # Seed a private generator state so the weights depend only on ``seed``, and leave the
    # caller's global RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2Model(config).eval()

    out_dir = Path(out_dir)
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("tiny Qwen2 (%d params, vocab %d) written to %s", n_params, len(tokenizer), out_dir)
    return out_dir


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def read_texts(paths: Iterable[str | Path]) -> list[str]:
    """Collect training text: string values of :data:`TEXT_FIELDS` in JSONL files, lines of .txt files."""
    texts: list[str] = []
    for path in paths:
        path = Path(path)
        with open(path, encoding="utf-8") as f:
            if path.suffix in (".jsonl", ".json"):
                for line in f:
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                    if isinstance(rec, dict):
                        for field in TEXT_FIELDS:
                            texts.extend(s for s in _strings(rec.get(field)) if s.strip())
            else:
                texts.extend(line.rstrip("\n") for line in f if line.strip())
    return texts


def register(subparsers) -> None:
    p = subparsers.add_parser("tiny-qwen", help="build a tiny random Qwen2 backbone + locally trained tokenizer")
    p.add_argument("--out", required=True, help="output directory (plain HF model directory)")
    p.add_argument("--texts", nargs="+", required=True, help="JSONL (query/pos/neg/text/sentence1/sentence2) or .txt")
    p.add_argument("--vocab-size", type=int, default=1000)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=128)
    p.add_argument("--max-position-embeddings", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)


def _run(args) -> int:
    texts = read_texts(args.texts)
    build_tiny_qwen2(
        args.out,
        texts,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        intermediate_size=args.intermediate_size,
        max_position_embeddings=args.max_position_embeddings,
        seed=args.seed,
    )
    return 0
