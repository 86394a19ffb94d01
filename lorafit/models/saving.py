"""`save_model`: a Hugging Face-format directory (sharded safetensors + index, config, tokenizer) that
transformers, vLLM and llama.cpp's converter read as they are."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..lora import LoRALinear

# 5 GB shards: the size the Hugging Face hub's own uploads use, under filesystem and upload limits.
MAX_SHARD_BYTES = 5 * 1024**3


def save_model(model, tokenizer, directory, max_shard_bytes: int = MAX_SHARD_BYTES, state: dict | None = None) -> Path:
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model has LoRA adapters: merge_lora(model) first, or save_adapter(model, dir)")
    if model.hf_config is None:
        raise ValueError("the model has no Hugging Face config to save (load it with lorafit.load_model)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # state: the weights by name when the model's own are not whole (gathered from FSDP2's shards).
    state = {n: _alone(p.detach()) for n, p in (model.state_dict() if state is None else state).items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # stored once, as the embedding
    dtype = next(iter(state.values())).dtype
    (directory / "config.json").write_text(
        json.dumps({**model.hf_config, "torch_dtype": str(dtype).removeprefix("torch.")}, indent=2) + "\n"
    )
    (directory / "generation_config.json").write_text(json.dumps(generation_config(model, tokenizer), indent=2) + "\n")
    tokenizer.save_pretrained(directory)  # tokenizer.json, tokenizer_config.json, the chat template

    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = tensor, size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
        return directory
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return directory


def _alone(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in memory of its own: safetensors refuses tensors that share it, and training makes views
    into stacked buffers (q, k and v in one weight: kernels/lora_stacked.py; gate and up: kernels/lora_mlp.py)."""
    whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor.contiguous() if whole else tensor.clone(memory_format=torch.contiguous_format)


def generation_config(model, tokenizer) -> dict:
    """bos / eos / pad ids for generation_config.json: the model config's, else the tokenizer's. Without an
    eos there, transformers' generate() would not stop at the end of an answer."""
    generation = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = model.hf_config.get(key)
        if value is None:
            value = getattr(tokenizer, key, None)
        if value is not None:
            generation[key] = value
    return generation
