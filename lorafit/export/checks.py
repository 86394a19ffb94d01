"""What each serving engine will refuse or serve differently, said before exporting (not after a failed
deployment). Each message names the engine, the problem and what to do instead.

Sources, as checked: vLLM's PEFTHelper refuses adapters with `use_dora` ("vLLM does not yet support DoRA")
and with `modules_to_save` ("vLLM only supports modules_to_save being None"), and adapters whose rank is
above the engine's `max_lora_rank` (16 unless `--max-lora-rank` says otherwise); it applies
alpha / sqrt(r) when `use_rslora` is set. llama.cpp's adapter loader (src/llama-adapter.cpp) accepts only
lora_a / lora_b pairs and always scales by alpha / r.
"""

from __future__ import annotations

import math

from ..lora import LoRAConfig

VLLM_DEFAULT_MAX_LORA_RANK = 16


def adapter_checks(config: LoRAConfig) -> list[str]:
    """Messages about serving this adapter as an adapter (vLLM, llama.cpp / Ollama). A merged export has
    none of these limits: merging serves every adapter lorafit trains exactly."""
    messages = []
    if config.dora:
        messages.append("vLLM refuses DoRA adapters ('vLLM does not yet support DoRA'): serve the merged model "
                        "(lorafit merge --adapter DIR --out DIR)")
        messages.append("llama.cpp / Ollama: a LoRA GGUF cannot hold DoRA's magnitudes, so `lorafit export "
                        "gguf-adapter` refuses it: export the merged model (lorafit export gguf --adapter DIR)")
    if config.modules_to_save:
        saved = ", ".join(config.modules_to_save)
        messages.append(f"vLLM refuses adapters with modules_to_save ({saved}): 'vLLM only supports "
                        f"modules_to_save being None'; serve the merged model")
        messages.append(f"llama.cpp / Ollama: a LoRA GGUF holds only A/B pairs, not the fully trained {saved}: "
                        f"export the merged model (lorafit export gguf --adapter DIR)")
    if config.r > VLLM_DEFAULT_MAX_LORA_RANK:
        messages.append(f"vLLM: rank {config.r} is above its default max_lora_rank {VLLM_DEFAULT_MAX_LORA_RANK}: "
                        f"start it with --max-lora-rank {config.r} or more")
    if config.rslora:
        factor = math.sqrt(config.r)
        messages.append(f"rsLoRA: an engine that ignores use_rslora scales the adapter by alpha/r instead of "
                        f"alpha/sqrt(r), {factor:g}x too weak (vLLM and PEFT read it; lorafit's GGUF adapter has "
                        f"the scaling folded into its alpha, so llama.cpp and Ollama serve it right)")
    return messages
