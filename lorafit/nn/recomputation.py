"""Recomputation: a forward run again only to rebuild the autograd graph for the backward that follows.

An offloaded layer's recomputation (nn/checkpointing.py) and a tiled MLP's backward (nn/tiled_mlp.py) run a
forward whose outputs nobody reads: the backward needs their grad_fn and what the forward saved, not their
values. What a module skips there:
- a tiled MLP its whole forward (its backward runs each chunk again anyway);
- the fused LoRA MLP its down projection (kernels/lora_mlp.py): y = [h | h A^T] D^T is the MLP's last matmul,
  and its backward reads only the saved [x | x A^T], gate and up and h A^T. 20 ms of an 8B memory-mode
  micro-batch on an H200, and an NF4 base's down weight is not dequantised.

It is entered only where nothing draws random numbers (layers without dropout), so that a skipped forward
leaves the random state as the real one would. The MLP's skips hold because the MLP is a decoder layer's last
block, its output only added to the residual stream (models/llama.py's DecoderLayer); a layer that normed
the MLP's output (Gemma 2's post-feedforward norm) would read it, and must not enter this for its MLP.
"""

import threading
from contextlib import contextmanager

_state = threading.local()  # the autograd engine recomputes layers on its own threads, one per device


@contextmanager
def recomputation():
    """Marks a forward whose outputs' values are never read and which draws no random numbers."""
    before = getattr(_state, "recomputing", False)
    _state.recomputing = True
    try:
        yield
    finally:
        _state.recomputing = before


def recomputing() -> bool:
    """Whether the forward running now is inside recomputation() (on this thread)."""
    return getattr(_state, "recomputing", False)
