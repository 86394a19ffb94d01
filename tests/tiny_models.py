"""Tiny random Hugging Face models of every supported family, with deliberately odd sizes."""

import transformers

# hidden 72, 3 query heads sharing 1 KV head, head_dim 24: odd enough to catch transposed or mis-split shapes.
ODD = dict(vocab_size=101, hidden_size=72, intermediate_size=100, num_hidden_layers=2, num_attention_heads=3,
           num_key_value_heads=1, head_dim=24, max_position_embeddings=256, rms_norm_eps=1e-5)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}

FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**ODD, tie_word_embeddings=True),
    "llama-untied-headdim32": lambda: transformers.LlamaConfig(**{**ODD, "head_dim": 32}, tie_word_embeddings=False),
    "llama3-rope": lambda: transformers.LlamaConfig(**ODD, rope_parameters=LLAMA3_ROPE),
    "llama-linear-rope": lambda: transformers.LlamaConfig(
        **ODD, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    "mistral": lambda: transformers.MistralConfig(**ODD, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**ODD, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**ODD, tie_word_embeddings=False),
}


def tiny_hf_model(family: str, seed: int = 0, **config_overrides):
    """config_overrides: config fields to change (vocab_size=320, hidden_size=64, ...)."""
    import torch

    torch.manual_seed(seed)
    config = FAMILIES[family]()
    for key, value in config_overrides.items():
        setattr(config, key, value)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
    # Random init leaves norms at 1 and biases at 0: perturb them so that they matter in the comparison.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def tiny_model_directory(directory, tokenizer_dir, family: str = "llama", seed: int = 0):
    """A tiny random model saved in Hugging Face format with the real SmolLM2 tokenizer (so its vocabulary is
    SmolLM2's 49,152 tokens): what the trainer tests load through `lorafit.load_model`."""
    import shutil

    import torch

    torch.manual_seed(seed)
    config = FAMILIES[family]()
    config.vocab_size = 49152
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, directory / name)
    return directory
