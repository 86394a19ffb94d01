"""Adapters on disk in PEFT's format, so that PEFT, vLLM and llama.cpp's converters read them as they are.

    adapter_config.json          peft_type LORA, r, lora_alpha, target_modules, use_rslora, use_dora, ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight / .lora_B.weight
                                 base_model.model.<module>.lora_magnitude_vector   (DoRA)
                                 base_model.model.<module>.weight                  (modules_to_save)
"""

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import LoadError
from .lora import LoRALinear, apply_lora, linear_layer_names, remove_lora

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT options that change what an adapter computes and that lorafit does not implement: loading an
# adapter that uses them would silently compute something else, so they are refused.
UNSUPPORTED_WHEN_SET = ("layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "layer_replication",
                        "exclude_modules", "target_parameters", "trainable_token_indices")


def save_adapter(model, directory, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Writes the adapter (only the trainable adapter tensors, not the base model) in PEFT's format.
    tensors: the adapter's tensors by file name when the model's own are not whole (gathered from FSDP2's
    shards); None: the model's."""
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("the model has no LoRA adapters to save (apply_lora or load_adapter first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(model) if tensors is None else tensors
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(model, "name_or_path", None),
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "use_dora": config.dora,
        "target_modules": list(config.target_modules),
        "modules_to_save": list(config.modules_to_save) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (directory / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2) + "\n")
    # Tied embeddings share storage with lm_head; safetensors refuses shared tensors, hence the clone.
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, directory / WEIGHTS_NAME,
              metadata={"format": "pt"})
    return directory


def adapter_tensors(model) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters under their PEFT file names."""
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            tensors[f"{PREFIX}{name}.lora_A.weight"] = module.lora_A.weight
            tensors[f"{PREFIX}{name}.lora_B.weight"] = module.lora_B.weight
            if module.lora_magnitude_vector is not None:
                tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = module.lora_magnitude_vector
    for name in model.lora_config.modules_to_save:
        module_name = "model.embed_tokens" if name == "embed_tokens" else "lm_head"
        tensors[f"{PREFIX}{module_name}.weight"] = model.get_submodule(module_name).weight
    return tensors


def load_adapter(model, directory, verbose: bool = True):
    """Adds the adapter saved in `directory` (by lorafit or PEFT) to `model` and returns the model."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file():
        raise LoadError(f"{directory}: no {CONFIG_NAME} (not a PEFT adapter directory)")
    if not weights_path.is_file():
        raise LoadError(f"{directory}: no {WEIGHTS_NAME} (adapters in .bin format are not read)")
    peft = json.loads(config_path.read_text())
    if peft.get("peft_type") != "LORA":
        raise LoadError(f"{config_path}: peft_type {peft.get('peft_type')!r} is not supported (supported: LORA)")
    for key in UNSUPPORTED_WHEN_SET:
        if peft.get(key):
            raise LoadError(f"{config_path}: {key} is set ({peft[key]!r}); lorafit does not support it")
    if peft.get("bias", "none") != "none":
        raise LoadError(f"{config_path}: bias {peft['bias']!r} is not supported (supported: 'none')")

    targets = _target_names(model, peft.get("target_modules"), config_path)
    trainable_before = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_lora(model, r=peft["r"], alpha=peft["lora_alpha"], dropout=peft.get("lora_dropout", 0.0),
               targets=targets, rslora=peft.get("use_rslora", False), dora=peft.get("use_dora", False),
               modules_to_save=tuple(peft.get("modules_to_save") or ()), verbose=False)
    try:
        load_adapter_weights(model, directory)
    except LoadError:
        remove_lora(model, trainable_before)  # a refused adapter leaves the model as it was
        raise
    if verbose:
        from .lora import parameter_summary

        print(parameter_summary(model))
    return model


def load_adapter_weights(model, directory) -> None:
    """Copies an adapter's tensors into a model that already has matching adapters (same names, shapes)."""
    weights_path = Path(directory) / WEIGHTS_NAME
    base_model = json.loads((Path(directory) / CONFIG_NAME).read_text()).get("base_model_name_or_path")
    try:
        tensors = load_file(weights_path)
    except Exception as e:  # safetensors' own error types: truncated or corrupt
        raise LoadError(f"{weights_path}: unreadable safetensors file ({e})") from None
    expected = adapter_tensors(model)
    unknown, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
    if unknown:
        raise LoadError(f"{weights_path}: tensors that match no adapted layer of this model, e.g. {unknown[0]}")
    if missing:
        raise LoadError(f"{weights_path}: adapter lacks {missing[0]} (made for another model or config?)")
    with torch.no_grad():
        for key, value in tensors.items():
            param = expected[key]
            if param.shape != value.shape:
                raise LoadError(
                    f"{weights_path}: {key} has shape {tuple(value.shape)}, the model needs {tuple(param.shape)} "
                    f"(adapter made for another base model? it names {base_model!r})"
                )
            param.copy_(value)


def _target_names(model, target_modules, where: Path) -> list[str]:
    """PEFT's target_modules: a list of module names or name suffixes, or a regex string (full match)."""
    layers = list(linear_layer_names(model))
    if target_modules == "all-linear":
        return "all-linear"
    if isinstance(target_modules, str):
        chosen = [n for n in layers if re.fullmatch(target_modules, n)]
    else:
        chosen = [n for n in layers if any(n == t or n.endswith(f".{t}") for t in target_modules)]
    if not chosen:
        short = sorted({n.rsplit(".", 1)[-1] for n in layers})
        raise LoadError(f"{where}: target_modules {target_modules!r} match no linear layer (the model has: {', '.join(short)})")
    return chosen
