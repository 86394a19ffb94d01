"""Per-token log-probabilities of a batch's labelled tokens: what DPO sums per answer and GRPO weighs per token."""

import torch


def token_logps(model, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (log-probability (B, T-1) of each next token, 0 where the label is -100; label mask (B, T-1)).
    Only the labelled positions reach the output layer: never the (B, T, V) logits of prompts and padding."""
    labels = batch["labels"].to(device)
    token_losses = model(batch["input_ids"].to(device), labels=labels,
                         attention_mask=batch["attention_mask"].to(device), loss_reduction="none").loss  # -log p
    return -token_losses, labels[:, 1:] != -100
