"""Direct Preference Optimisation (Rafailov et al., 2023) and IPO (Azar et al., 2023).

With h = (log π(chosen) - log π_ref(chosen)) - (log π(rejected) - log π_ref(rejected)):
    sigmoid (DPO):  loss = -log σ(β h)
    ipo:            loss = (h - 1 / (2β))²,  with log-probabilities averaged over each answer's tokens
                    (IPO's per-token form, as TRL computes it)
Implicit rewards: β (log π - log π_ref) of each answer; the margin is chosen's minus rejected's, and the
accuracy the share of pairs whose chosen reward is the higher.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .logps import token_logps

LOSSES = ("sigmoid", "ipo")


@dataclass
class SequenceLogps:
    total: torch.Tensor  # (2B,) summed log-probabilities of each sequence's answer tokens
    count: torch.Tensor  # (2B,) answer tokens per sequence


def sequence_logps(model, batch: dict, device) -> SequenceLogps:
    """Log-probabilities of the labelled (answer) tokens of each sequence of a collated preference batch."""
    logps, mask = token_logps(model, batch, device)  # (2B, S-1)
    return SequenceLogps(logps.sum(-1), mask.sum(-1))


def dpo_loss(policy: SequenceLogps, reference: SequenceLogps, beta: float, loss_type: str = "sigmoid"):
    """-> (loss per pair (B,), metrics dict of (B,) tensors). Sequences are the B chosen then B rejected."""
    if loss_type not in LOSSES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSSES)}, not {loss_type!r}")
    B = policy.total.shape[0] // 2
    log_ratio = policy.total - reference.total  # (2B,)
    if loss_type == "ipo":
        h = (policy.total / policy.count - reference.total / reference.count)
        h = h[:B] - h[B:]
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * (log_ratio[:B] - log_ratio[B:]))
    chosen, rejected = beta * log_ratio[:B].detach(), beta * log_ratio[B:].detach()
    metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
               "rewards/accuracy": (chosen > rejected).float()}
    return losses, metrics
