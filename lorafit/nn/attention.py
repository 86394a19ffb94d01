"""The attention seam: every model calls `attention` and nothing else.

Today it is PyTorch's scaled_dot_product_attention (which picks flash / memory-efficient / math kernels by
itself); packed varlen attention and other backends plug in here later without touching the models.
"""

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """q: (B, H, T, D); k, v: (B, Hkv, S, D) with H a multiple of Hkv (grouped-query attention).

    mask: None, or a boolean (B, 1, T, S) tensor, True where a query may attend to a key. When a mask is
    given it carries causality itself. Returns (B, H, T, D).
    """
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    T, S = q.shape[-2], k.shape[-2]
    if not causal or T == 1:  # one new token sees every cached key
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    # T new tokens after S - T cached ones: SDPA's is_causal aligns the triangle top-left, we need it
    # bottom-right (query i sees keys up to S - T + i).
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
