"""`export_lora_gguf`: a LoRA adapter as llama.cpp's adapter GGUF, to run on the base model's GGUF.

    llama-cli -m base.gguf --lora adapter.gguf        llama_cpp.Llama(model_path=..., lora_path=...)

The format (llama.cpp's convert_lora_to_gguf.py writes it; src/llama-adapter.cpp reads it):
- `general.type` "adapter", `adapter.type` "lora", `adapter.lora.alpha`, and the base's architecture
  metadata (llama.cpp refuses an adapter whose `general.architecture` differs from the model's);
- per adapted weight W (GGUF name `blk.N.attn_q.weight`), two tensors `blk.N.attn_q.weight.lora_a` with
  A's PyTorch shape (r, in) and `.lora_b` with B's (out, r), i.e. GGUF dims (in, r) and (r, out);
- llama.cpp computes W x + (alpha / r) · B A x, with r read from lora_a's shape.

Two things are folded in so that every engine that applies alpha / r serves the adapter as trained:
- rsLoRA scales by alpha / sqrt(r), which engines that ignore `use_rslora` get wrong; the file carries
  alpha' = scaling · r, so alpha' / r is the trained scaling whatever the engine knows about rsLoRA;
- for the "llama" architecture the base's q/k rows are permuted to llama.cpp's rotary layout, so B's rows
  (W's output rows) are permuted the same way; A acts on inputs and stays as it is.

DoRA (a per-row magnitude) and modules_to_save (whole replaced matrices) have no place in this format:
they are refused, and merging (`lorafit export gguf --adapter DIR`) serves them exactly instead.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ExportError
from ..lora import LoRALinear
from ..models.gguf import hf_to_gguf_name
from .gguf_writer import PlannedTensor, architecture_metadata, gguf_architecture, import_gguf, tensor_encoder, write_gguf

ADAPTER_QTYPES = ("f32", "f16")  # what llama.cpp's converter offers for adapters besides q8_0 (not needed: they are small)


def export_lora_gguf(model, path, qtype: str = "f16") -> Path:
    """Writes the LoRA adapters of `model` (from apply_lora or load_adapter) as a llama.cpp adapter GGUF."""
    gguf = import_gguf()
    if qtype not in ADAPTER_QTYPES:
        raise ExportError(f"adapter qtype {qtype!r} is not supported (supported: {', '.join(ADAPTER_QTYPES)})")
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ExportError("the model has no LoRA adapters to export (apply_lora or load_adapter first)")
    if config.dora:
        raise ExportError("DoRA adapters cannot be a llama.cpp LoRA GGUF (it has no magnitude vectors): export the "
                          "merged model instead (lorafit export gguf --adapter DIR)")
    if config.modules_to_save:
        raise ExportError(f"the adapter fully trains {', '.join(config.modules_to_save)} (modules_to_save), which a "
                          f"llama.cpp LoRA GGUF cannot carry: export the merged model instead")
    arch = gguf_architecture(model)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    scalings = {m.scaling for m in layers.values()}
    if len(scalings) != 1:
        raise ExportError(f"the adapter's layers use different scalings {sorted(scalings)}; one alpha per file only")
    alpha = scalings.pop() * config.r  # alpha' / r = the trained scaling, rsLoRA folded in

    ggml_type = gguf.GGMLQuantizationType.F32 if qtype == "f32" else gguf.GGMLQuantizationType.F16
    head_dim = model.config.head_dim
    planned = []
    for name, layer in layers.items():
        weight_name = hf_to_gguf_name(f"{name}.weight")
        if weight_name is None:
            raise ExportError(f"adapted layer {name} has no GGUF name")
        permute = arch == "llama" and name.endswith(("self_attn.q_proj", "self_attn.k_proj"))
        a = layer.lora_A.weight  # (r, in)
        b = layer.lora_B.weight  # (out, r)
        planned.append(PlannedTensor(f"{weight_name}.lora_a", tuple(a.shape), ggml_type, tensor_encoder(a, ggml_type, None, gguf)))
        planned.append(PlannedTensor(f"{weight_name}.lora_b", tuple(b.shape), ggml_type,
                                     tensor_encoder(b, ggml_type, head_dim if permute else None, gguf)))
    metadata = architecture_metadata(model, arch)
    metadata |= {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": float(alpha)}
    return write_gguf(path, arch, metadata, planned)

