"""The attention seam: the models call `attention` (padded batches) and `varlen_attention` (packed ones).

`attention` is PyTorch's scaled_dot_product_attention, which picks the fastest exact kernel it has (cuDNN
or flash on Hopper, measured: cuDNN 0.66 ms vs flash 1.20 ms for a causal 2 x 2048 x 32 x 128 forward and
backward with 8 KV heads). `varlen_attention` runs packed documents through flash attention's
variable-length kernel: each token attends within its own document only, without the (S x S) mask that
the dense path needs.
"""

import functools
import inspect

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


@functools.cache
def _varlen_kernel():
    """torch.nn.attention.varlen.varlen_attn and how to ask it for causality, or None where PyTorch lacks it
    (before 2.10). Its causal flag changed between releases: `is_causal` (2.10, 2.11), `window_size` later."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    if "is_causal" in parameters:
        return functools.partial(varlen_attn, is_causal=True)
    options = {"window_size": (-1, 0)}  # (-1, 0): everything before, nothing after
    if "enable_gqa" in parameters:
        options["enable_gqa"] = True
    return functools.partial(varlen_attn, **options)


def can_run_varlen(device: torch.device, dtype: torch.dtype) -> bool:
    """Flash attention's varlen kernel: CUDA, 16-bit inputs, PyTorch >= 2.10."""
    return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and _varlen_kernel() is not None


def varlen_attention(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """q: (N, H, D), k, v: (N, Hkv, D) for N tokens of packed documents; cu_seqlens (documents + 1,) int32,
    their boundaries. Causal within each document. Returns (N, H, D)."""
    return _varlen_kernel()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
