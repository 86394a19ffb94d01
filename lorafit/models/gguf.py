"""Read a llama.cpp GGUF checkpoint in Hugging Face form: config, tokenizer and HF-named float tensors.

    ckpt = read_gguf("model.gguf")
    ckpt.hf_config               # what the model's config.json would hold
    for name, tensor in ckpt.tensors(): ...   # "model.layers.0.self_attn.q_proj.weight", float32, CPU
    gguf_to_hf_directory("model.gguf", "cache/model")   # config.json, model.safetensors, tokenizer files

Three things differ from a Hugging Face checkpoint and are undone here:
- names: llama.cpp's `blk.N.attn_q.weight` is HF's `model.layers.N.self_attn.q_proj.weight` (`_NAMES`);
- shapes: GGUF lists dims fastest-first, so a (out, in) PyTorch weight is stored as dims (in, out);
- rotary layout: for the `llama` architecture llama.cpp stores q_proj/k_proj rows in interleaved-pair
  order, while HF uses rotate-half order (see `gguf_to_hf_rotary_rows`).
Quantised tensors are dequantised one at a time with the `gguf` package (an optional dependency).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import LoadError
from .gguf_file import TensorEntry, read_directory
from .gguf_tokenizer import tokenizer_from_gguf_metadata

# GGUF architecture -> (HF model_type, HF architectures[0]).
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}

# llama.cpp tensor names -> HF names; `{}` is the layer index. `.weight` / `.bias` is appended.
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# A llama3-style rope is stored as per-frequency divisors, not as config; it becomes `rope_scaling`.
_ROPE_FREQS = "rope_freqs.weight"

_REQUIRED = object()  # marks metadata keys without a default

# Float types read without the gguf package: type id -> (name, torch dtype).
_PLAIN_FLOATS = {0: ("F32", torch.float32), 1: ("F16", torch.float16), 30: ("BF16", torch.bfloat16)}


@dataclass(frozen=True)
class _Tensor:
    """A GGUF tensor located and typed: where its bytes are and what they become."""

    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]  # PyTorch order
    type_id: int
    type_name: str
    offset: int
    nbytes: int
    unpermute_head_dim: int | None = None  # set for llama q/k rows stored interleaved


@dataclass
class GGUFCheckpoint:
    path: Path
    hf_config: dict  # exactly what a Hugging Face config.json for this model would hold
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    _tensors: list[_Tensor] = field(default_factory=list, repr=False)

    def tensor_names(self) -> list[str]:
        """HF parameter names, in file order (no lm_head when the embeddings are tied)."""
        return [t.hf_name for t in self._tensors]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 CPU tensor) pairs, dequantised one at a time so memory stays ~ one tensor."""
        with open(self.path, "rb") as f:
            for t in self._tensors:
                yield t.hf_name, _load_tensor(self.path, f, t)


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Open a GGUF file (versions 1-3) and describe it in Hugging Face terms; tensor data is read lazily."""
    path = Path(path)
    directory = read_directory(path)
    metadata = directory.metadata
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise LoadError(
            f"{path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    located = [_locate(path, entry, directory.file_size) for entry in directory.tensors]
    by_name = {t.gguf_name: t for t in located}
    rope_freqs = by_name.pop(_ROPE_FREQS, None)
    if rope_freqs is not None:
        with open(path, "rb") as f:
            rope_freqs = _load_tensor(path, f, rope_freqs).tolist()

    hf_config = _hf_config(path, metadata, by_name, rope_freqs)
    tensors = _hf_tensors(path, arch, hf_config, list(by_name.values()))
    tokenizer = tokenizer_from_gguf_metadata(metadata, source=str(path))
    return GGUFCheckpoint(path=path, hf_config=hf_config, tokenizer=tokenizer, _tensors=tensors)


# ----------------------------------------------------------------------------------------------- config


def _hf_config(path: Path, meta: dict, tensors: dict[str, _Tensor], rope_freqs: list[float] | None) -> dict:
    arch = meta["general.architecture"]

    def get(key: str, default: Any = _REQUIRED) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is _REQUIRED:
            raise LoadError(f"{path}: metadata key {arch}.{key} is missing")
        if isinstance(value, list):  # per-layer values: fine only when all layers agree
            if len(set(value)) != 1:
                raise LoadError(f"{path}: {arch}.{key} differs between layers ({value[:4]}...); not supported")
            value = value[0]
        return value

    if "token_embd.weight" not in tensors:
        raise LoadError(f"{path}: tensor token_embd.weight is missing")
    hidden = get("embedding_length")
    heads = get("attention.head_count")
    head_dim = get("attention.key_length", hidden // heads)
    if get("attention.value_length", head_dim) != head_dim:
        raise LoadError(f"{path}: key and value head sizes differ; not supported")
    if get("rope.dimension_count", head_dim) != head_dim:
        raise LoadError(f"{path}: rotary embedding covers only part of each head; not supported")
    rope_theta = float(get("rope.freq_base", 10000.0))
    model_type, architecture = ARCHITECTURES[arch]
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "max_position_embeddings": get("context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": arch == "qwen2" or "blk.0.attn_q.bias" in tensors,
        "torch_dtype": "float32",
    }
    if arch == "llama":
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    for role in ("bos", "eos", "pad"):
        key = "padding" if role == "pad" else role
        if f"tokenizer.ggml.{key}_token_id" in meta:
            config[f"{role}_token_id"] = meta[f"tokenizer.ggml.{key}_token_id"]
    rope_scaling = _rope_scaling(path, meta, arch, rope_freqs, rope_theta, head_dim)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _rope_scaling(path: Path, meta: dict, arch: str, rope_freqs, theta: float, head_dim: int) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind is None and meta.get(f"{arch}.rope.scale_linear", 1.0) != 1.0:  # the older spelling
        kind, factor = "linear", meta[f"{arch}.rope.scale_linear"]
    if rope_freqs is not None:
        if kind not in (None, "none"):
            raise LoadError(f"{path}: both rope_freqs.weight and rope scaling {kind!r}; cannot map to HF")
        original = meta.get(f"{arch}.rope.scaling.original_context_length", 8192)
        return _llama3_rope_scaling(path, rope_freqs, theta, head_dim, original)
    if kind in (None, "none"):
        return None
    if factor is None:
        raise LoadError(f"{path}: rope scaling {kind!r} without {arch}.rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor)}
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = original
        return scaling
    raise LoadError(f"{path}: rope scaling {kind!r} is not supported (supported: linear, yarn, llama3)")


def llama3_frequency_divisors(theta, head_dim, factor, low, high, original) -> list[float]:
    """What llama.cpp stores in rope_freqs.weight for HF's llama3 rope parameters."""
    divisors = []
    for i in range(head_dim // 2):
        wavelength = 2 * math.pi * theta ** (2 * i / head_dim)
        if wavelength < original / high:
            divisors.append(1.0)
        elif wavelength > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return divisors


def _llama3_rope_scaling(path: Path, divisors: list[float], theta: float, head_dim: int, original: int) -> dict:
    """Recover HF's llama3 rope parameters from the divisors llama.cpp stored.

    Between the two bands, 1/divisor = (1 - s)/factor + s with s = (original/wavelength - low)/(high - low),
    a straight line in 1/wavelength: two such frequencies give low and high. Only the ratios
    original/low and original/high matter, so `original` is taken from metadata (default 8192, Llama 3's).
    """
    factor = max(divisors)
    points = []
    for i, d in enumerate(divisors):
        if 1 + 1e-6 < d < factor * (1 - 1e-6):
            x = 1 / (2 * math.pi * theta ** (2 * i / head_dim))
            points.append((x, (1 / d - 1 / factor) / (1 - 1 / factor)))
    # The stored divisors are float32: prefer the round numbers they were made from when those reproduce
    # them. Llama 3.1/3.2's low/high (1, 4) cover files with fewer than two in-between frequencies.
    candidates = [(round(factor, 3), 1.0, 4.0)]
    if len(points) >= 2:
        (x0, s0), (x1, s1) = points[0], points[-1]
        slope = (s1 - s0) / (x1 - x0)  # = original / (high - low)
        low = (slope * x0 - s0) * original / slope  # from s = slope * x - low / (high - low)
        high = low + original / slope
        candidates = [(round(factor, 3), round(low, 3), round(high, 3)), (factor, low, high)] + candidates
    for f, lo, hi in candidates:
        expected = llama3_frequency_divisors(theta, head_dim, f, lo, hi, original)
        if len(expected) == len(divisors) and all(
            math.isclose(a, b, rel_tol=1e-4) for a, b in zip(expected, divisors, strict=True)
        ):
            return {
                "rope_type": "llama3",
                "factor": float(f),
                "low_freq_factor": float(lo),
                "high_freq_factor": float(hi),
                "original_max_position_embeddings": int(original),
            }
    raise LoadError(f"{path}: rope_freqs.weight does not follow llama3 rope scaling; cannot map to HF")


# ---------------------------------------------------------------------------------------------- tensors


def _locate(path: Path, entry: TensorEntry, file_size: int) -> _Tensor:
    """Work out a tensor's byte size and PyTorch shape, and check it lies inside the file."""
    type_name, block_size, type_size = _type_layout(path, entry)
    if entry.dims[0] % block_size:
        raise LoadError(f"{path}: corrupt GGUF file: tensor {entry.name} rows do not fit {type_name} blocks")
    nbytes = math.prod(entry.dims) // block_size * type_size
    if entry.offset + nbytes > file_size:
        raise LoadError(
            f"{path}: truncated GGUF file: tensor {entry.name} needs bytes up to {entry.offset + nbytes}, "
            f"the file has {file_size}"
        )
    shape = tuple(reversed(entry.dims))
    return _Tensor(entry.name, "", shape, entry.type_id, type_name, entry.offset, nbytes)


def _hf_tensors(path: Path, arch: str, config: dict, tensors: list[_Tensor]) -> list[_Tensor]:
    """Attach HF names to the tensors and check every expected tensor is there with its expected shape."""
    expected = _expected_shapes(arch, config)
    head_dim = config["head_dim"]
    named = []
    for t in tensors:
        hf_name = _hf_name(t.gguf_name)
        if hf_name is None:
            raise LoadError(f"{path}: tensor {t.gguf_name} has no Hugging Face equivalent (unknown name)")
        want = expected.get(hf_name)
        if want is None:
            raise LoadError(f"{path}: tensor {t.gguf_name} is not part of a {arch} model with this config")
        if t.shape != want:
            raise LoadError(f"{path}: tensor {t.gguf_name} has shape {list(t.shape)}, expected {list(want)}")
        rotary = arch == "llama" and re.search(r"\.self_attn\.[qk]_proj\.", hf_name)
        named.append(replace(t, hf_name=hf_name, unpermute_head_dim=head_dim if rotary else None))
    present = {t.hf_name for t in named}
    missing = [name for name in expected if name not in present and not _optional(name, arch, config)]
    if missing:
        raise LoadError(f"{path}: {len(missing)} tensors missing, e.g. the one for {missing[0]}")
    return named


def _hf_name(gguf_name: str) -> str | None:
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES and suffix == "weight":
        return f"{_GLOBAL_NAMES[stem]}.weight"
    m = _LAYER_TENSOR.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def hf_to_gguf_name(hf_name: str) -> str | None:
    """The inverse of `_hf_name`: "model.layers.3.mlp.up_proj.weight" -> "blk.3.ffn_up.weight" (the writer's
    names come from the same tables as the reader's, so the two cannot drift apart)."""
    stem, _, suffix = hf_name.rpartition(".")
    for gguf_stem, hf_stem in _GLOBAL_NAMES.items():
        if stem == hf_stem and suffix == "weight":
            return f"{gguf_stem}.weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
    if m and suffix in ("weight", "bias"):
        for gguf_part, hf_part in _LAYER_NAMES.items():
            if m.group(2) == hf_part:
                return f"blk.{m.group(1)}.{gguf_part}.{suffix}"
    return None


def _expected_shapes(arch: str, c: dict) -> dict[str, tuple[int, ...]]:
    hidden, inter, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q_out, kv_out = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {
        "model.embed_tokens.weight": (c["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (c["vocab_size"], hidden),
    }
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        layer = {
            "self_attn.q_proj": (q_out, hidden),
            "self_attn.k_proj": (kv_out, hidden),
            "self_attn.v_proj": (kv_out, hidden),
            "self_attn.o_proj": (hidden, q_out),
            "mlp.gate_proj": (inter, hidden),
            "mlp.up_proj": (inter, hidden),
            "mlp.down_proj": (hidden, inter),
        }
        for name, (out, inp) in layer.items():
            shapes[f"{p}{name}.weight"] = (out, inp)
            shapes[f"{p}{name}.bias"] = (out,)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
        if arch == "qwen3":
            shapes[f"{p}self_attn.q_norm.weight"] = (hd,)
            shapes[f"{p}self_attn.k_norm.weight"] = (hd,)
    return shapes


def _optional(hf_name: str, arch: str, config: dict) -> bool:
    """Names in `_expected_shapes` that a valid file may leave out."""
    if hf_name == "lm_head.weight":
        return config["tie_word_embeddings"]
    if hf_name.endswith(".bias"):
        # Qwen2 always has q/k/v biases; llama and qwen3 have them only when the config says so.
        qkv = re.search(r"\.self_attn\.[qkv]_proj\.", hf_name)
        if arch == "qwen2":
            return not qkv
        if qkv or ".o_proj." in hf_name:
            return not config["attention_bias"]
        return not config.get("mlp_bias", False)
    return False


def gguf_to_hf_rotary_rows(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder q_proj/k_proj rows (weight or bias) from llama.cpp's layout to Hugging Face's.

    Rotary embedding rotates pairs of features within each head. HF ("rotate half") pairs row i with
    row i + head_dim/2; llama.cpp (like Meta's original checkpoints) pairs rows 2i and 2i+1. So within a
    head, GGUF row 2i + j holds HF row j * head_dim/2 + i (i < head_dim/2, j in {0, 1}): view each head as
    (i, j), swap to (j, i), flatten.
    """
    return w.reshape(-1, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def hf_to_gguf_rotary_rows(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of `gguf_to_hf_rotary_rows` (what llama.cpp's converter does to HF weights)."""
    return w.reshape(-1, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


# ------------------------------------------------------------------------------------ dequantisation


def _type_layout(path: Path, entry: TensorEntry) -> tuple[str, int, int]:
    """(type name, elements per block, bytes per block) for a tensor's ggml type."""
    if entry.type_id in _PLAIN_FLOATS:
        name, dtype = _PLAIN_FLOATS[entry.type_id]
        return name, 1, dtype.itemsize
    gguf = _import_gguf(path, f"tensor {entry.name} is quantised (type id {entry.type_id}); reading it")
    try:
        qtype = gguf.GGMLQuantizationType(entry.type_id)
    except ValueError:
        raise LoadError(f"{path}: tensor {entry.name} has unknown ggml type id {entry.type_id}") from None
    if not _can_dequantize(entry.type_id):
        raise LoadError(
            f"{path}: tensor {entry.name} has type {qtype.name}, which cannot be dequantised "
            f"(supported: {', '.join(supported_types())})"
        )
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return qtype.name, block_size, type_size


def _import_gguf(path: Path, what: str):
    try:
        import gguf
    except ImportError:
        raise LoadError(f"{path}: {what} needs the gguf package: pip install gguf") from None
    return gguf


@lru_cache(maxsize=None)
def _can_dequantize(type_id: int) -> bool:
    """Whether gguf.quants can dequantise this type, found by trying one block of zeros."""
    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType(type_id)
    if qtype not in gguf.GGML_QUANT_SIZES:
        return False
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        out = gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return out.dtype == np.float32 and out.shape == (1, block_size)


def supported_types() -> list[str]:
    """Names of the ggml tensor types that can be read (all quantised ones need the gguf package)."""
    names = [name for name, _ in _PLAIN_FLOATS.values()]
    try:
        import gguf
    except ImportError:
        return names
    return names + [q.name for q in gguf.GGMLQuantizationType if q not in _PLAIN_FLOATS and _can_dequantize(q)]


def _load_tensor(path: Path, f, t: _Tensor) -> torch.Tensor:
    """Read one tensor's bytes and return it as float32 in PyTorch shape and HF row order."""
    f.seek(t.offset)
    raw = bytearray(t.nbytes)
    if f.readinto(raw) != t.nbytes:
        raise LoadError(f"{path}: truncated GGUF file: tensor {t.gguf_name} is cut short")
    if t.type_id in _PLAIN_FLOATS:
        tensor = torch.frombuffer(raw, dtype=_PLAIN_FLOATS[t.type_id][1]).to(torch.float32)
    else:
        import gguf
        import numpy as np

        rows = math.prod(t.shape[:-1])
        blocks = np.frombuffer(raw, dtype=np.uint8).reshape(rows, -1)
        tensor = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType(t.type_id)))
    tensor = tensor.reshape(t.shape)
    if t.unpermute_head_dim is not None:
        tensor = gguf_to_hf_rotary_rows(tensor, t.unpermute_head_dim)
    return tensor


# -------------------------------------------------------------------------------------------- export

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def gguf_to_hf_directory(
    path: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> Path:
    """Convert a GGUF file into a Hugging Face model directory at `out_dir` and return its path.

    Writes config.json, model.safetensors (`dtype`; no lm_head when tied), the tokenizer files and
    generation_config.json. Everything goes to a temporary directory beside `out_dir` that is renamed
    into place at the end, so an interrupted conversion never leaves a half-written directory.
    """
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, _SAFETENSORS_DTYPES))}, not {dtype}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LoadError(f"{out_dir}: already exists and is not an empty directory; remove it or choose another")
    ckpt = read_gguf(path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A hidden sibling on the same filesystem, so the final rename is atomic; mkdir keeps the usual umask.
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        config = dict(ckpt.hf_config, torch_dtype=str(dtype).removeprefix("torch."))
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        ckpt.tokenizer.save_pretrained(staging)
        _write_safetensors(ckpt, staging / "model.safetensors", dtype)
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        try:
            os.replace(staging, out_dir)
        except OSError:
            # Another process (say, another rank of the same job) finished the same conversion first.
            if not (out_dir / "config.json").is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _write_safetensors(ckpt: GGUFCheckpoint, target: Path, dtype: torch.dtype) -> None:
    """Stream tensors into a .safetensors file one at a time (the safetensors library wants all at once).

    Format: u64 little-endian header length, a JSON header giving each tensor's dtype, shape and byte range
    in the data section, then the data. Shapes are known before any data is read, so the header goes first.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    start = 0
    for t in ckpt._tensors:
        end = start + math.prod(t.shape) * itemsize
        header[t.hf_name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(t.shape), "data_offsets": [start, end]}
        start = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    with open(target, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for _, tensor in ckpt.tensors():
            f.write(tensor.to(dtype).reshape(-1).view(torch.uint8).numpy().data)
