"""Learning-rate schedules: linear warmup, then linear or cosine decay to zero at the last step."""

import math

import torch


def lr_factor(step: int, warmup_steps: int, total_steps: int, kind: str) -> float:
    """The multiplier of the peak learning rate for optimizer step `step` (0-based).

    Warmup reaches the peak on its last step ((step + 1) / warmup), so no step is wasted at lr 0; decay
    then reaches zero one step after the last, so the last step still learns a little.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)  # 0 at the peak, < 1 at the end
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"scheduler {kind!r} is not supported (supported: linear, cosine)")


def build_scheduler(optimizer, warmup_steps: int, total_steps: int, kind: str):
    lr_factor(0, warmup_steps, total_steps, kind)  # fail now, not at step 1, on an unknown kind
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, kind))
