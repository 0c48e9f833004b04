"""Model soup: the uniform parameter average of fine-tuned checkpoints.

θ_soup = 1/R Σ_r θ_r  (Wortsman et al. 2022, "Model soups", arXiv 2203.05482; KaLM merges
its fine-tune runs this way). All ingredients must share architecture and tokenizer.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def _tokenizer_fingerprint(model_dir: str) -> str:
    h = hashlib.sha256()
    for path in sorted(Path(model_dir).rglob("*")):
        if path.name in TOKENIZER_FILES and path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def uniform_soup(model_dirs: list[str], out_dir: str) -> None:
    from kalm.modeling import load_embedding_model, save_model

    if not model_dirs:
        raise ValueError("soup needs at least one model")
    fingerprints = {d: _tokenizer_fingerprint(d) for d in model_dirs}
    if len(set(fingerprints.values())) > 1:
        raise ValueError(f"soup ingredients have different tokenizers: {sorted(fingerprints)}")
    base = load_embedding_model(model_dirs[0])
    total = {k: v.detach().clone().double() for k, v in base.state_dict().items()}
    for d in model_dirs[1:]:
        state = load_embedding_model(d).state_dict()
        if state.keys() != total.keys() or any(state[k].shape != total[k].shape for k in total):
            raise ValueError(f"soup ingredient {d} has a different architecture than {model_dirs[0]}")
        for k, v in state.items():
            total[k] += v.double()
    ref = base.state_dict()
    averaged = {k: (v / len(model_dirs)).to(ref[k].dtype) if ref[k].is_floating_point() else ref[k]
                for k, v in total.items()}
    base.load_state_dict(averaged)
    save_model(base, out_dir)
    log.info("souped %d models into %s", len(model_dirs), out_dir)


def _run(args: argparse.Namespace) -> None:
    uniform_soup(args.models, args.out)


def register(sub) -> None:
    p = sub.add_parser("soup", help="average fine-tuned models (uniform soup)")
    p.add_argument("models", nargs="+")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_run)
