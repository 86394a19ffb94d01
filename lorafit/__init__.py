"""lorafit: fine-tune open LLMs with LoRA, QLoRA, full fine-tuning, DPO and GRPO on native PyTorch models."""

from .errors import LoadError, LorafitError
from .generate import generate
from .models.config import ModelConfig
from .models.llama import CausalLM
from .models.loading import load_model

__version__ = "0.1.0"

__all__ = ["CausalLM", "LoadError", "LorafitError", "ModelConfig", "generate", "load_model", "__version__"]
