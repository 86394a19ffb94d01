"""Model families by Hugging Face `model_type`. All build the same `CausalLM`; they differ in config."""

from collections.abc import Callable

from . import llama, qwen2, qwen3
from .config import ModelConfig

CONFIG_TRANSLATORS: dict[str, Callable[[dict], ModelConfig]] = {
    "llama": llama.config_from_hf,
    "mistral": llama.config_from_hf,  # same architecture; sliding window is handled in config_from_hf
    "qwen2": qwen2.config_from_hf,
    "qwen3": qwen3.config_from_hf,
}

SUPPORTED_MODEL_TYPES = tuple(CONFIG_TRANSLATORS)


def model_config_from_hf(hf: dict) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in CONFIG_TRANSLATORS:
        raise ValueError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return CONFIG_TRANSLATORS[model_type](hf)
