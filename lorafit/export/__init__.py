"""Export for serving: merged Hugging Face directories (models/saving.py), model and LoRA-adapter GGUF files
for llama.cpp and Ollama, Ollama Modelfiles, and the checks that say which engine will refuse what."""

from .adapter_source import load_adapter_model
from .checks import adapter_checks
from .gguf_adapter import export_lora_gguf
from .gguf_writer import export_gguf
from .modelfile import modelfile_text, write_modelfile

__all__ = ["adapter_checks", "export_gguf", "export_lora_gguf", "load_adapter_model", "modelfile_text",
           "write_modelfile"]
