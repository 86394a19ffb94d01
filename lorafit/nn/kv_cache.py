"""A preallocated key/value cache for generation: one tensor per layer, written in place.

Every sequence of a batch shares the same write position (prompts are left-padded to one length), so a
decoding step writes one column and reads a view: no concatenation, no reallocation per token.
"""

import torch


class KVCache:
    def __init__(self, num_layers, batch_size, num_kv_heads, max_length, head_dim, dtype, device):
        shape = (batch_size, num_kv_heads, max_length, head_dim)  # (B, Hkv, S_max, D)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_length = max_length
        self.length = 0  # tokens already stored (the same for every layer once a forward pass ends)

    @classmethod
    def for_model(cls, model, batch_size: int, max_length: int) -> "KVCache":
        c = model.config
        weight = model.model.embed_tokens.weight
        return cls(c.num_layers, batch_size, c.num_kv_heads, max_length, c.head_dim, weight.dtype, weight.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores k, v (B, Hkv, T, D) after the cached tokens; returns all keys and values (B, Hkv, S, D)."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} tokens; {end} requested")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def select(self, rows: torch.Tensor) -> None:
        """Keeps the batch rows `rows`, in that order; a row named twice is copied (one prompt's cache for
        several sampled continuations)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
