"""A "fine-tuned" default model for the export tests: SmolLM2-135M-Instruct with an rsLoRA adapter whose B
matrices are random (a fresh adapter has B = 0 and would make every merge and export trivially right)."""

from pathlib import Path

import torch

import lorafit
from lorafit.generate import generate_ids

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Who are you?"]
NEW_TOKENS = 16
RANK, ALPHA = 8, 16  # rsLoRA: scaling 16 / sqrt(8) = 5.66, where plain LoRA would use 16 / 8 = 2


def make_adapter(base_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """Saves the adapter (PEFT format, naming `base_dir` as its base) and returns its directory."""
    model, _ = lorafit.load_model(base_dir, dtype="float32", device="cpu")
    torch.manual_seed(seed)  # A's Kaiming init draws from the global generator
    lorafit.apply_lora(model, r=RANK, alpha=ALPHA, rslora=True, verbose=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                # 0.01: enough to change the greedy answers of the base model, small enough to keep them fluent.
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return lorafit.save_adapter(model, out_dir)


def prompt_ids(tokenizer) -> list[list[int]]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def greedy(model, prompts: list[list[int]]) -> list[list[int]]:
    """NEW_TOKENS greedy tokens per prompt, never stopping early (so every engine is compared on all 16)."""
    return [generate_ids(model, [p], NEW_TOKENS)[0] for p in prompts]
