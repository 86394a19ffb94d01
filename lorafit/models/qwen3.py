"""Qwen3: the Llama decoder with an RMSNorm over each head of q and k (before RoPE) and no q/k/v bias."""

from .config import ModelConfig, base_config_from_hf


def config_from_hf(hf: dict) -> ModelConfig:
    if hf.get("attention_bias") or hf.get("use_sliding_window"):
        raise ValueError("Qwen3 configs with attention_bias or use_sliding_window are not supported")
    return base_config_from_hf(hf, qk_norm=True)
