"""An adapter directory as something to export: its base model (named in adapter_config.json, or given),
the adapter loaded on it, and, for merged exports, the adapter folded in.

The base is loaded in float32 whatever it is stored in, so that W + scaling · B A is computed once at full
precision and rounded once, to the exported type (merging in bf16 rounds twice and is one of the ways a
merged model ends up answering worse than the adapter did).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..adapter_io import CONFIG_NAME, load_adapter
from ..errors import LoadError
from ..models.loading import load_model


def base_model_source(adapter_dir, base=None) -> str:
    """`base` when given, else the adapter's base_model_name_or_path."""
    if base is not None:
        return str(base)
    config_path = Path(adapter_dir) / CONFIG_NAME
    if not config_path.is_file():
        raise LoadError(f"{adapter_dir}: no {CONFIG_NAME} (not a PEFT adapter directory)")
    try:
        source = json.loads(config_path.read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as e:
        raise LoadError(f"{config_path}: not valid JSON ({e})") from None
    if not source:
        raise LoadError(f"{config_path}: names no base_model_name_or_path; give the base with --model")
    return source


def load_adapter_model(adapter_dir, base=None, cache_dir=None):
    """(model with the adapter, tokenizer), in float32 on the CPU. The tokenizer is the adapter directory's
    own when it has one (training may have changed the chat template), else the base's."""
    source = base_model_source(adapter_dir, base)
    model, tokenizer = load_model(source, dtype=torch.float32, device="cpu", cache_dir=cache_dir)
    load_adapter(model, adapter_dir, verbose=False)
    if (Path(adapter_dir) / "tokenizer_config.json").is_file() or (Path(adapter_dir) / "tokenizer.json").is_file():
        from ..models.loading import load_tokenizer

        tokenizer = load_tokenizer(Path(adapter_dir))
    return model, tokenizer


def merged_dtype(model) -> torch.dtype:
    """The dtype the base checkpoint was stored in (config.json's torch_dtype / dtype), float32 if unknown."""
    hf = model.hf_config or {}
    stored = hf.get("torch_dtype") or hf.get("dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(stored, torch.float32)

