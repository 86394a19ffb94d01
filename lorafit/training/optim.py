"""AdamW over the trainable parameters, without weight decay on norms, biases and other vectors."""

import torch


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Decay shrinks weights toward zero; for norm gains (which sit around 1), biases and DoRA magnitudes that
    # pulls the function itself, not just the update size, so only matrices decay (the usual LLM practice).
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (apply_lora or prepare_for_finetuning first)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused=False, foreach=None: PyTorch picks the fastest implementation for the device.
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8)
