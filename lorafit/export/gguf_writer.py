"""`export_gguf`: a model as one GGUF file for llama.cpp and Ollama, written with the `gguf` package only.

The file is the inverse of what models/gguf.py reads, in llama.cpp's conventions (its convert_hf_to_gguf.py):
- metadata: `general.architecture` ("llama" for Llama, Mistral and SmolLM2; "qwen2"; "qwen3"), the sizes
  under `{arch}.*`, RoPE (`rope.freq_base`, linear scaling as `rope.scaling.*`, Llama 3's scaling as a
  `rope_freqs.weight` tensor of per-frequency divisors), and the tokenizer (gguf_vocab.py);
- names: `model.layers.N.self_attn.q_proj.weight` -> `blk.N.attn_q.weight` (the reader's own tables);
- shapes: a PyTorch (out, in) weight is stored with GGUF dims (in, out): the same bytes, row-major;
- rotary layout: for "llama" llama.cpp rotates interleaved pairs, so q_proj / k_proj rows are permuted with
  `hf_to_gguf_rotary_rows`; Qwen2 / Qwen3 files keep Hugging Face's order (llama.cpp runs them in
  rotate-half "NEOX" mode), exactly as the reader treats them;
- types: 1-D tensors (norms, biases, rope_freqs) stay F32; a tied embedding is stored once, as
  token_embd, and llama.cpp reuses it as the output head when there is no `output` tensor.

Tensors are converted and written one at a time, so exporting holds at most one converted tensor besides
the model; the file is written beside its destination and renamed into place when complete.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ExportError
from ..lora import LoRALinear, is_quantized_linear
from ..models.gguf import hf_to_gguf_name, hf_to_gguf_rotary_rows, llama3_frequency_divisors
from .gguf_vocab import check_round_trip, round_trip_texts, tokenizer_metadata

# Hugging Face model_type -> GGUF architecture. Mistral is Llama's architecture in llama.cpp too.
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
QTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# general.file_type: the gguf.LlamaFileType member that says what most tensors are.
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q4_0": "MOSTLY_Q4_0"}
# Rows of quantised blocks: Q8_0 and Q4_0 pack 32 values per block, so a row must be a multiple of 32;
# narrower or odd rows (tiny test models) fall back to F16, as llama.cpp's own quantiser does.
_BLOCK = 32


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor as it will appear in the file, and how to produce its bytes when its turn comes."""

    name: str
    shape: tuple[int, ...]  # PyTorch order (the file lists it reversed)
    ggml_type: Any  # gguf.GGMLQuantizationType
    encode: Callable[[], np.ndarray]  # -> float32/float16 values or uint8 blocks, in PyTorch order


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError("GGUF export needs the gguf package: pip install 'lorafit[gguf]' (or pip install gguf)") from None
    return gguf


def export_gguf(model, tokenizer, path, qtype: str = "f16") -> Path:
    """Writes `model` (merged: no adapters) and its tokenizer as a GGUF file at `path` and returns the path.

    qtype: "f16" (default), "bf16", "f32", "q8_0" (8-bit, ~0.1% weight error) or "q4_0" (4-bit; the
    embedding / output matrix stays Q8_0: with tied embeddings it is also the output head, where 4-bit
    error goes straight into the logits, which is why llama.cpp's quantiser keeps it wider too).
    """
    gguf = import_gguf()
    if qtype not in QTYPES:
        raise ExportError(f"qtype {qtype!r} is not supported (supported: {', '.join(QTYPES)})")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ExportError("the model has LoRA adapters: lorafit.merge_lora(model) first, or export the adapter "
                          "alone with export_lora_gguf")
    if any(is_quantized_linear(m) for m in model.modules()):
        raise ExportError("the model holds 4-bit (NF4) layers: load the base without quantize='nf4', load the "
                          "adapter, merge, then export")
    arch = gguf_architecture(model)
    metadata = architecture_metadata(model, arch)
    metadata["general.type"] = "model"
    metadata["general.file_type"] = int(getattr(gguf.LlamaFileType, _FILE_TYPES[qtype]))
    if qtype in ("q8_0", "q4_0"):
        metadata["general.quantization_version"] = gguf.GGML_QUANT_VERSION
    vocab = tokenizer_metadata(tokenizer, model.config.vocab_size, _first_eos(model))
    check_round_trip(tokenizer, vocab, round_trip_texts(tokenizer))
    metadata |= vocab
    write_gguf(path, arch, metadata, _model_tensors(model, arch, qtype, gguf))
    return Path(path)


def gguf_architecture(model) -> str:
    model_type = model.config.model_type
    if model_type not in GGUF_ARCHITECTURES:
        raise ExportError(f"model_type {model_type!r} has no GGUF export (supported: {', '.join(GGUF_ARCHITECTURES)})")
    return GGUF_ARCHITECTURES[model_type]


def architecture_metadata(model, arch: str) -> dict[str, Any]:
    """`general.name` and the `{arch}.*` keys llama.cpp builds the model from (the adapter file carries them
    too, as llama.cpp's converter writes them)."""
    c = model.config
    metadata: dict[str, Any] = {
        "general.name": Path(str(getattr(model, "name_or_path", None) or "model")).name,
        f"{arch}.vocab_size": c.vocab_size,
        f"{arch}.context_length": c.max_position_embeddings,
        f"{arch}.embedding_length": c.hidden_size,
        f"{arch}.block_count": c.num_layers,
        f"{arch}.feed_forward_length": c.intermediate_size,
        f"{arch}.attention.head_count": c.num_heads,
        f"{arch}.attention.head_count_kv": c.num_kv_heads,
        f"{arch}.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
        f"{arch}.rope.freq_base": float(c.rope.theta),
        f"{arch}.rope.dimension_count": c.head_dim,
    }
    if c.head_dim * c.num_heads != c.hidden_size or arch == "qwen3":
        # llama.cpp assumes head size = hidden / heads unless told (Qwen3 always tells).
        metadata[f"{arch}.attention.key_length"] = c.head_dim
        metadata[f"{arch}.attention.value_length"] = c.head_dim
    if c.rope.type == "linear":
        metadata[f"{arch}.rope.scaling.type"] = "linear"
        metadata[f"{arch}.rope.scaling.factor"] = float(c.rope.factor)
    elif c.rope.type == "llama3":
        # The scaling itself travels as rope_freqs.weight; the original context lets readers (ours) recover
        # HF's parameters from it when it is not Llama 3's 8192.
        metadata[f"{arch}.rope.scaling.original_context_length"] = c.rope.original_max_position_embeddings
    return metadata


def _first_eos(model) -> int | None:
    return model.config.eos_token_ids[0] if model.config.eos_token_ids else None


def _model_tensors(model, arch: str, qtype: str, gguf) -> list[PlannedTensor]:
    c = model.config
    planned = []
    if c.rope.type == "llama3":
        r = c.rope
        divisors = llama3_frequency_divisors(r.theta, c.head_dim, r.factor, r.low_freq_factor, r.high_freq_factor,
                                             r.original_max_position_embeddings)
        values = np.asarray(divisors, dtype=np.float32)  # (head_dim / 2,)
        planned.append(PlannedTensor("rope_freqs.weight", values.shape, gguf.GGMLQuantizationType.F32, lambda: values))
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # stored once, as token_embd
        gguf_name = hf_to_gguf_name(hf_name)
        if gguf_name is None:
            raise ExportError(f"tensor {hf_name} has no GGUF name (not part of a {arch} model)")
        permute = arch == "llama" and (".self_attn.q_proj." in hf_name or ".self_attn.k_proj." in hf_name)
        ggml_type = tensor_type(gguf_name, tuple(tensor.shape), qtype, gguf)
        planned.append(PlannedTensor(gguf_name, tuple(tensor.shape), ggml_type,
                                     tensor_encoder(tensor, ggml_type, c.head_dim if permute else None, gguf)))
    return planned


def tensor_type(gguf_name: str, shape: tuple[int, ...], qtype: str, gguf):
    """The ggml type a tensor is stored in for the asked qtype."""
    T = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return T.F32  # norms and biases: tiny, and llama.cpp computes them in F32
    plain = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16}
    if qtype in plain:
        return plain[qtype]
    if shape[-1] % _BLOCK:
        return T.F16
    if qtype == "q4_0" and gguf_name in ("token_embd.weight", "output.weight"):
        return T.Q8_0
    return T.Q8_0 if qtype == "q8_0" else T.Q4_0


def tensor_encoder(tensor: torch.Tensor, ggml_type, rotary_head_dim: int | None, gguf) -> Callable[[], np.ndarray]:
    """A deferred encoding of a PyTorch tensor, with q/k rows permuted to llama.cpp's rotary layout when
    rotary_head_dim is given."""

    def encode() -> np.ndarray:
        values = tensor.detach().to(device="cpu", dtype=torch.float32)
        if rotary_head_dim is not None:
            values = hf_to_gguf_rotary_rows(values, rotary_head_dim)
        return encode_values(values.numpy(), ggml_type, gguf)

    return encode


def encode_values(values: np.ndarray, ggml_type, gguf) -> np.ndarray:
    """float32 values (PyTorch order) -> what the file stores for `ggml_type`."""
    T = gguf.GGMLQuantizationType
    if ggml_type == T.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if ggml_type == T.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values, ggml_type)  # BF16 (round to nearest even), Q8_0, Q4_0: uint8 blocks


def write_gguf(path, arch: str, metadata: dict[str, Any], tensors: Iterable[PlannedTensor]) -> Path:
    """Streams a GGUF file: header, metadata and tensor directory first, then each tensor as it is encoded.
    Written to a hidden sibling and renamed, so an interrupted export never leaves a truncated file."""
    gguf = import_gguf()
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path}: is a directory; give the .gguf file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = list(tensors)
    staging = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:12]}"
    writer = gguf.GGUFWriter(staging, arch)
    try:
        for key, value in metadata.items():
            _add_metadata(writer, key, value)
        for t in tensors:
            block, type_size = gguf.GGML_QUANT_SIZES[t.ggml_type]
            nbytes = math.prod(t.shape) // block * type_size
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes, raw_dtype=t.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            data = t.encode()
            writer.write_tensor_data(data)
        writer.close()
        os.replace(staging, path)
    except BaseException:
        writer.close()
        staging.unlink(missing_ok=True)
        raise
    return path


def _add_metadata(writer, key: str, value: Any) -> None:
    """Python values in the GGUF types llama.cpp reads them as: ids and sizes u32, floats f32, token types
    i32 (the converter's choices)."""
    if key == "general.architecture":
        return  # written by GGUFWriter itself
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)
    else:
        raise TypeError(f"metadata {key}: unsupported value type {type(value).__name__}")
