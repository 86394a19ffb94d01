"""Qwen2 / Qwen2.5: the Llama decoder with a bias on the q, k and v projections."""

from .config import ModelConfig, base_config_from_hf


def config_from_hf(hf: dict) -> ModelConfig:
    # Qwen2's sliding-window option is off in every released checkpoint (use_sliding_window: false).
    if hf.get("use_sliding_window"):
        raise ValueError("Qwen2 configs with use_sliding_window: true are not supported")
    return base_config_from_hf(hf, attention_bias=True)
