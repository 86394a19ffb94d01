"""Group Relative Policy Optimisation (Shao et al., 2024, DeepSeekMath) with the later choices of
normalisation (Dr. GRPO, Liu et al., 2025; DAPO's token-level mean, Yu et al., 2025).

For each prompt, G completions o_1..o_G with rewards r_i. Advantage of every token of o_i:
    A_i = (r_i - mean(r)) / (std(r) + 1e-4)      (scale_rewards; without it, A_i = r_i - mean(r))
Per token t of o_i, with ratio ρ = π(o_i,t) / π_old(o_i,t):
    ℓ_i,t = -min(ρ A_i, clip(ρ, 1 - ε, 1 + ε) A_i) + β KL_i,t,
    KL_i,t = π_ref/π - log(π_ref/π) - 1          (Schulman's k3 estimator: unbiased, never negative)
Normalisation of the sum of ℓ over the N completions (and their tokens) of one optimizer step:
    "sequence": mean over completions of each completion's token mean (the paper's; long completions
                weigh less per token, which Dr. GRPO shows rewards long wrong answers)
    "token":    sum over all tokens / all completion tokens of the step (DAPO's; the default here: every
                token weighs the same)
    "dr_grpo":  sum over all tokens / (N x max_completion_length) (Dr. GRPO's: a constant, no length bias)
"""

from dataclasses import dataclass

import torch

NORMALISATIONS = ("sequence", "token", "dr_grpo")
# Added to the group's std: a group whose rewards are all equal has std 0 and advantages 0, and the 1e-4
# keeps a nearly equal group from being blown up to unit scale (the value TRL and the paper's code use).
STD_EPSILON = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: bool = True) -> torch.Tensor:
    """rewards (N,), N = prompts x group_size, the completions of a prompt side by side -> advantages (N,).
    The std is the sample std (n - 1), as TRL computes it."""
    groups = rewards.view(-1, group_size)  # (P, G)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if scale_rewards:
        advantages = advantages / (groups.std(dim=1, keepdim=True) + STD_EPSILON)
    return advantages.reshape(-1)


@dataclass
class StepTotals:
    """What normalises the loss of one optimizer step: counted over all its completions before the first
    micro-batch, so that micro-batches of any size add up to the same step."""

    completions: int
    completion_tokens: int
    max_completion_length: int


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    totals: StepTotals,
    epsilon: float = 0.2,
    normalisation: str = "token",
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """One micro-batch's share of its step's loss, and its metric sums.

    logps, old_logps, ref_logps, mask: (b, T) per token of each completion (mask 1 on completion tokens);
    advantages: (b,). Returns (loss (), {"clipped": tokens clipped, "kl": summed KL, "tokens": tokens}).
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {', '.join(NORMALISATIONS)}, not {normalisation!r}")
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)  # (b, T)
    a = advantages[:, None]
    unclipped, clipped = ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a
    per_token = -torch.minimum(unclipped, clipped)
    metrics = {"clipped": ((clipped < unclipped).to(logps.dtype) * mask).sum().detach(),
               "tokens": mask.sum().detach()}
    if beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probabilities")
        log_ratio = ref_logps - logps
        kl = torch.exp(log_ratio) - log_ratio - 1
        per_token = per_token + beta * kl
        metrics["kl"] = (kl * mask).sum().detach()
    if normalisation == "sequence":
        per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        loss = per_sequence.sum() / totals.completions
    elif normalisation == "token":
        loss = (per_token * mask).sum() / max(totals.completion_tokens, 1)
    else:
        loss = (per_token * mask).sum() / (totals.completions * totals.max_completion_length)
    return loss, metrics
