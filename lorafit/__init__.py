"""lorafit: fine-tune open LLMs with LoRA, QLoRA, full fine-tuning, DPO and GRPO on native PyTorch models."""

from .adapter_io import load_adapter, save_adapter
from .advisor import advise, training_plan
from .config import Config
from .errors import ConfigError, ExportError, LoadError, LorafitError
from .export import export_gguf, export_lora_gguf
from .finetune import prepare_for_finetuning
from .generate import generate
from .models.config import ModelConfig
from .models.llama import CausalLM
from .lora import LoRALinear, apply_lora, merge_lora
from .models.loading import load_model
from .models.saving import save_model
from .recipes import train

__version__ = "0.1.0"

__all__ = [
    "CausalLM",
    "Config",
    "ConfigError",
    "ExportError",
    "LoRALinear",
    "LoadError",
    "LorafitError",
    "ModelConfig",
    "__version__",
    "advise",
    "apply_lora",
    "export_gguf",
    "export_lora_gguf",
    "generate",
    "load_adapter",
    "load_model",
    "merge_lora",
    "prepare_for_finetuning",
    "save_adapter",
    "save_model",
    "train",
    "training_plan",
]
