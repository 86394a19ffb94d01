"""Pure-PyTorch specifications of the fused ops: the CPU path, and the oracle every kernel is tested against.

Shapes: N rows (tokens), C hidden size, B batch, T tokens per sequence, H query heads, Hkv key/value heads,
D head_dim, V vocabulary, I intermediate size.
"""

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., C). Normalised in float32, cast back to x's dtype, then scaled by weight (Llama's order)."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """The residual add fused with the next norm: returns (rms_norm(x + residual), x + residual)."""
    total = x + residual
    return rms_norm(total, weight, eps), total


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(..., I) each -> silu(gate) * up, the input of Llama's down projection."""
    return F.silu(gate) * up


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor):
    """Rotary embedding on q (B, T, H, D) and k (B, T, Hkv, D), the layout the projections produce.

    cos, signed_sin: (B, T, D) or (1, T, D), from lorafit.nn.rope.RotaryEmbedding (the sine carries the
    sign of the "rotate half" form: (-sin, sin) over the two halves). Packed sequences just pass their
    per-token positions' tables. Returns the rotated (q, k), same shapes and dtypes.
    """
    cos, signed_sin = cos[:, :, None, :], signed_sin[:, :, None, :]  # (B, T, 1, D): broadcast over heads

    def rotate(x):
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin

    return rotate(q), rotate(k)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """x: (..., C_in); weight (C_out, C_in) frozen; lora_a (r, C_in); lora_b (C_out, r).
    y = x W^T + b + scaling * (x A^T) B^T."""
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x, lora_a), lora_b)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """hidden (N, C), weight (V, C), targets (N,) -> the mean cross-entropy over the targets that are not
    ignore_index (a zero connected to the graph when there are none), computed in float32. The fused
    kernel gives the same value and gradients without ever holding the (N, V) logits."""
    logits = F.linear(hidden, weight).float()  # (N, V)
    keep = targets != ignore_index
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)
