"""`load_model`: a Hugging Face directory, a .gguf file, a hub id in the local cache, or "default".

The model is built on the meta device (no memory) and each parameter is filled from the checkpoint one
tensor at a time, already in the target dtype and device: loading never holds the model twice.
"""

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import LoadError
from ..nn.nf4 import BnbLayerCollector, NF4Linear, nf4_from_bnb
from .config import ModelConfig
from .llama import CausalLM
from .registry import model_config_from_hf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZE_CHOICES = (None, "nf4")


def load_model(source, dtype=None, quantize=None, device=None, cache_dir=None):
    """Returns (model, tokenizer). See DESIGN §3 for the sources. dtype: None/"auto" (bf16 on a GPU that
    supports it, else float32), "float32", "bfloat16", "float16" or a torch.dtype. quantize="nf4" stores
    the decoder layers' linear weights in 4 bits (QLoRA), computing in `dtype`."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={quantize!r} is not supported (supported: None, 'nf4')")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(dtype, device)
    path = resolve_source(source, cache_dir)
    checkpoint = open_checkpoint(path)
    config = _model_config(checkpoint.hf_config, checkpoint.config_path)
    model = build_from_tensors(config, checkpoint.tensors(), dtype, device, path, quantize)
    model.name_or_path, model.hf_config = str(source), checkpoint.hf_config
    return model, checkpoint.tokenizer()


@dataclass
class Checkpoint:
    """A resolved source, whatever its format: its config.json content, tensors and tokenizer, read lazily."""

    hf_config: dict
    config_path: Path  # what config errors name
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    tokenizer: Callable[[], object]


def open_checkpoint(path: Path) -> Checkpoint:
    """A Hugging Face directory or a .gguf file (the one place that tells the two apart)."""
    if path.suffix == ".gguf":
        from .gguf import read_gguf

        gguf = read_gguf(path)
        return Checkpoint(gguf.hf_config, path, gguf.tensors, lambda: gguf.tokenizer)
    return Checkpoint(read_hf_config(path), path / "config.json", lambda: iter_hf_tensors(path),
                      lambda: load_tokenizer(path))


def read_base_weights(source, names, cache_dir=None) -> dict[str, torch.Tensor]:
    """The checkpoint's own tensors `names` (e.g. the 16-bit weights under a QLoRA model, for merging)."""
    path = resolve_source(source, cache_dir)
    wanted = set(names)
    found = {name: t for name, t in open_checkpoint(path).tensors() if name in wanted}
    missing = sorted(wanted - set(found))
    if missing:
        raise LoadError(f"{path}: checkpoint lacks {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return found


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        # bf16 halves memory and runs on tensor cores; CPUs without native bf16 emulate it slowly, so fp32.
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported (supported: auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def resolve_source(source, cache_dir=None) -> Path:
    """A local directory or .gguf file, "default", or a hub id already in the local Hugging Face cache."""
    if str(source) == "default":
        from .default import default_model_directory

        return default_model_directory(cache_dir)
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file() and path.suffix != ".gguf":
            raise LoadError(f"{path}: a model source is a directory in Hugging Face format or a .gguf file")
        return path
    if str(source).count("/") == 1 and not str(source).startswith((".", "/", "~")):
        snapshot = _hub_cache_snapshot(str(source))
        if snapshot is not None:
            return snapshot
        raise LoadError(f"{source}: not a local path, and not in the local Hugging Face cache (lorafit never downloads)")
    raise LoadError(f"{path}: no such file or directory")


def _hub_cache_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # any failure means "not cached": the caller reports that clearly
        return None


def read_hf_config(directory: Path) -> dict:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise LoadError(f"{directory}: no config.json (expected a model directory in Hugging Face format)")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise LoadError(f"{config_path}: not valid JSON ({e})") from None


def _model_config(hf_config: dict, where: Path) -> ModelConfig:
    try:
        return model_config_from_hf(hf_config)
    except (ValueError, KeyError) as e:
        raise LoadError(f"{where}: {e if isinstance(e, ValueError) else f'missing key {e}'}") from None


def iter_hf_tensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a Hugging Face directory: one or sharded safetensors files, else a PyTorch .bin file."""
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
    elif single.is_file():
        files = [single]
    elif (directory / "pytorch_model.bin").is_file():
        # Untrusted pickles stay data: weights_only refuses anything but tensors and plain containers.
        state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
        yield from state.items()
        return
    else:
        raise LoadError(f"{directory}: no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)")
    for file in files:
        yield from _iter_safetensors(file)


def _iter_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    if not file.is_file():
        raise LoadError(f"{file}: listed in the index but missing")
    try:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        if isinstance(e, LoadError):
            raise
        raise LoadError(f"{file}: unreadable safetensors file, truncated or corrupt ({e})") from None


def build_from_tensors(config: ModelConfig, tensors, dtype, device, where: Path, quantize=None) -> CausalLM:
    """Builds the model on the meta device and fills it tensor by tensor. With quantize="nf4", each linear
    weight of the decoder layers is quantised as it arrives, so the dense weights never all exist at once."""
    with torch.device("meta"):
        model = CausalLM(config)
    expected = dict(model.named_parameters())  # a tied lm_head shares embed_tokens' entry and is absent
    filled = set()
    bnb_layers = BnbLayerCollector()
    for name, tensor in tensors:
        if name.endswith("rotary_emb.inv_freq"):  # some old checkpoints store this derived buffer
            continue
        bnb_piece = BnbLayerCollector.piece(name, tensor)
        if bnb_piece is not None:  # part of a layer stored in 4 bits by bitsandbytes ("-bnb-4bit" checkpoints)
            pieces = bnb_layers.add(*bnb_piece, tensor)
            if pieces is not None:
                _place_bnb_layer(model, bnb_piece[0], pieces, expected, dtype, device, quantize, where)
                filled.add(bnb_piece[0] + ".weight")
            continue
        if name not in expected:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # a tied model sometimes stores the shared matrix twice
            raise LoadError(f"{where}: unexpected tensor {name!r} for a {config.model_type} model")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise LoadError(
                f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {tuple(expected[name].shape)}"
            )
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if quantize == "nf4" and leaf == "weight" and _is_quantizable(module_name, module):
            _replace_with_nf4(model, module_name, module, tensor.to(device), dtype)
        else:  # keeps the placeholder's requires_grad: an NF4 layer's bias stays frozen
            placeholder = getattr(module, leaf)
            setattr(module, leaf, nn.Parameter(tensor.to(device=device, dtype=dtype), placeholder.requires_grad))
        filled.add(name)
    if bnb_layers.pending:
        incomplete = next(iter(bnb_layers.pending))
        raise LoadError(f"{where}: 4-bit layer {incomplete!r} lacks some of its bitsandbytes tensors")
    missing = sorted(set(expected) - filled)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise LoadError(f"{where}: checkpoint lacks {shown}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.reset(device)
    return model.eval()


# ---- quantize="nf4" ---------------------------------------------------------------------------------


def _is_quantizable(module_name: str, module: nn.Module) -> bool:
    """The linear projections of the decoder layers (q, k, v, o, gate, up, down); embeddings, norms and
    lm_head stay dense, as in QLoRA. The projections hold most of the weights (106 M of SmolLM2-135M's
    135 M; 0.97 B of Llama-3.2-1B's 1.24 B), the embeddings most of the rest."""
    return module_name.startswith("model.layers.") and isinstance(module, nn.Linear)


def _replace_with_nf4(model: nn.Module, module_name: str, linear: nn.Linear, weight: torch.Tensor, dtype) -> None:
    # Quantised from the checkpoint's own precision, not first rounded to dtype. The bias (Qwen2's q, k, v)
    # may have arrived already, or is still a meta placeholder that the loading loop fills later.
    _swap_module(model, module_name, NF4Linear.from_weight(weight, linear.bias, compute_dtype=dtype))


def _place_bnb_layer(model, module_name: str, pieces: dict, expected: dict, dtype, device, quantize, where) -> None:
    """A layer that bitsandbytes stored in 4 bits: kept in NF4 with quantize="nf4" where lorafit would
    quantise it, otherwise dequantised once into the dense layer."""
    name = f"{module_name}.weight"
    if name not in expected:
        raise LoadError(f"{where}: unexpected tensor {name!r}")
    linear = model.get_submodule(module_name)
    try:
        layer = nf4_from_bnb(pieces, linear.bias, dtype, device)
    except ValueError as e:
        raise LoadError(f"{where}: 4-bit layer {module_name!r}: {e}") from None
    if (layer.out_features, layer.in_features) != tuple(expected[name].shape):
        raise LoadError(f"{where}: 4-bit layer {module_name!r} has shape {(layer.out_features, layer.in_features)}, "
                        f"the config implies {tuple(expected[name].shape)}")
    if quantize == "nf4" and _is_quantizable(module_name, linear):
        _swap_module(model, module_name, layer)
    else:
        linear.weight = nn.Parameter(layer.dequantized_weight(dtype), linear.weight.requires_grad)


def _swap_module(model: nn.Module, module_name: str, new: nn.Module) -> None:
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)  # never trust_remote_code
    except Exception as e:
        raise LoadError(f"{directory}: could not load the tokenizer ({type(e).__name__}: {e})") from None
