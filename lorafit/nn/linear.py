"""The models' linear layer: `nn.Linear`, plus weights prepacked for CPU decoding.

A decoding step multiplies a few rows (one token per sequence) by every weight of the model, and on CPU
that step is mostly those matrix products. MKL can lay a weight out once for a fixed number of rows
(`cblas_sgemm_pack`); the packed product then runs about 2x faster than a plain one: 40 ms instead of 78 ms
for all of SmolLM2-135M's float32 weights at 8 rows (2-core Xeon, measured with benchmarks/
generation_cpu.py's shapes). Results equal `F.linear`'s up to the order of summation (a few float32 ulps), and
calls with another number of rows (the prompt) fall back to the plain product inside the same op.

The packed copy costs as much memory as the weight. It is made by `prepacked_weights` (generation on CPU
only) and kept with the layer while the weight stays the same tensor with the same contents, so repeated
generations (a chat, GRPO rollouts over a LoRA model's frozen base) pack once: packing SmolLM2 takes 0.2 s,
about five decoding steps' worth of the time it saves. A changed weight is packed again at the next
generation, which frees the stale copy.
"""

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """`nn.Linear` that, inside `prepacked_weights`, multiplies with an MKL-packed copy of its weight."""

    packed: tuple[torch.Tensor, int, tuple] | None = None  # (packed weight, rows, key of the weight packed)
    use_packed: bool = False  # True only inside `prepacked_weights`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_packed:
            packed, rows, _ = self.packed
            return torch.ops.mkl._mkl_linear(x, packed, self.weight, self.bias, rows)
        return F.linear(x, self.weight, self.bias)

    def pack(self, rows: int) -> None:
        # The version counter moves with every in-place change (an optimizer step, load_state_dict).
        key = (self.weight.data_ptr(), self.weight._version, rows)
        if self.packed is None or self.packed[2] != key:
            self.packed = None  # free the stale copy before making the new one
            with torch.no_grad():
                self.packed = (torch.ops.mkl._mkl_reorder_linear_weight(self.weight, rows), rows, key)


def can_prepack(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkl.is_available()


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: assume it is too small to pack
        return 0


@contextlib.contextmanager
def prepacked_weights(model: nn.Module, rows: int):
    """Within the block, every float32 CPU `Linear` of `model` multiplies `rows`-row inputs with a packed
    copy of its weight (inputs with other row counts take the plain path), for `rows` >= 2. Skipped when the copies would
    take more than a quarter of the machine's memory: generation must never be what exhausts it."""
    layers = [m for m in model.modules() if isinstance(m, Linear) and can_prepack(m.weight)]
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    # One row is a matrix-vector product, already at memory speed without packing (27 ms vs 25 ms per
    # SmolLM2 step, measured), and packing it would change its rounding.
    if rows < 2 or not layers or 4 * weight_bytes > _physical_memory_bytes():
        yield
        return
    try:
        for m in layers:
            m.pack(rows)
            m.use_packed = True
        yield
    finally:
        for m in layers:
            m.use_packed = False
