"""Rotary position embeddings (RoPE) in the "rotate half" layout of Hugging Face checkpoints.

Supported scalings: none ("default"), "linear" (positions divided by a factor) and "llama3" (Llama 3.1's
frequency-dependent stretch). Frequencies are computed in float32 exactly as the reference code does, so
logits match transformers to float rounding.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    # llama3 only: the band of wavelengths between which frequencies are interpolated.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """(head_dim // 2,) float32: the angle per position of each rotated pair."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.type == "llama3":
        inv_freq = _llama3_scaled(inv_freq, rope)
    elif rope.type != "default":
        raise ValueError(f"rope scaling {rope.type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Llama 3.1: long wavelengths (low frequencies) are slowed by `factor`, short ones kept, and the band
    # in between is blended smoothly so that nearby tokens keep their original resolution.
    low_freq_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_freq_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Turns position ids into the (cos, sin) tables that `apply_rope` uses."""

    def __init__(self, rope: RopeConfig, head_dim: int):
        super().__init__()
        self.rope = rope
        self.head_dim = head_dim
        # Not persistent: derived from the config, never read from or written to a checkpoint.
        self.register_buffer("inv_freq", inverse_frequencies(rope, head_dim), persistent=False)

    def reset(self, device: torch.device | str | None = None) -> None:
        """Recompute the frequencies (after the model was built on the meta device)."""
        self.inv_freq = inverse_frequencies(self.rope, self.head_dim).to(device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: (B, T) -> cos, signed_sin: (B, 1, T, D), ready to broadcast over heads.

        signed_sin is (-sin, sin) over the two halves, so that apply_rope needs no negation."""
        angles = position_ids[:, None, :, None].float() * self.inv_freq  # (B, 1, T, D/2), float32 always
        cos, sin = angles.cos(), angles.sin()
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D). The "rotate half" form: x * cos + (-x2, x1) * sin, where (x1, x2) are the halves of
    x; rolling x by D/2 gives (x2, x1), and signed_sin carries the minus. Two products and a sum, each
    rounded, as transformers computes them: a fused multiply-add (addcmul) rounds once less, and that one
    rounding, carried through SmolLM2's 30 layers, moved its float32 logits by 4e-5 from transformers'."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
