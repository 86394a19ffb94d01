"""The models' linear layer: `nn.Linear`, plus weights prepacked for CPU decoding.

A decoding step multiplies a few rows (one token per sequence) by every weight of the model, and on CPU
that step is mostly those matrix products. A weight laid out once for a fixed number of rows multiplies
faster than a plain one, and two libraries inside PyTorch can do it: MKL (`cblas_sgemm_pack`) and oneDNN
(its reordered linear weights). Which is faster depends on the CPU, so `prepacked_weights` measures both
once per process and row count on the model's weight shapes (`fastest_backend`) and keeps the winner.
Measured for SmolLM2-135M's float32 weights:
    2-core Xeon, 8 rows: MKL packed 40 ms a step for all weights, plain 78 ms (benchmarks/generation_cpu.py);
    2-core AMD EPYC, 16 rows: oneDNN packed 0.35 ms per 1536 x 576 weight, MKL plain 0.50, MKL packed 0.54,
    and the 49k x 576 LM head 15 ms with oneDNN against 30 ms with MKL.
Results equal `F.linear`'s up to the order of summation (a few float32 ulps); inputs with another number of
rows (the prompt) take the plain product on the layer's own weight.

The packed copy costs as much memory as the weight. It is made by `prepacked_weights` (generation on CPU
only) and kept with the layer while the weight stays the same tensor with the same contents, so repeated
generations (a chat) pack once: packing SmolLM2 takes 0.2 s, about five decoding steps' worth of the time it
saves. A changed weight is packed again at the next generation, which frees the stale copy.

A LoRA layer decodes through one packed W + s·BA in its base layer (lora.LoRALinear.pack_merged) instead of
the packed W plus two small adapter products: GRPO samples from a LoRA model at every step, and the adapter
products, 420 small matmuls per token for SmolLM2's 210 adapted layers, cost as much as the base products.
The merged copy is made again when the adapters changed (after every optimizer step): ~0.1 s for SmolLM2.
"""

import contextlib
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("mkl", "onednn")


def _pack(backend: str, weight: torch.Tensor, rows: int) -> torch.Tensor:
    if backend == "mkl":
        return torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def _packed_linear(backend: str, x, packed, weight, bias, rows: int):
    if backend == "mkl":
        return torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@dataclass
class PackedWeight:
    tensor: torch.Tensor  # the library's layout of the weight (or of a LoRA layer's merged weight)
    rows: int  # the input row count it was laid out for
    key: tuple  # what was packed: weight identity and version, rows, backend, extra (see Linear.pack)
    backend: str


class Linear(nn.Linear):
    """`nn.Linear` that, inside `prepacked_weights`, multiplies with a packed copy of its weight."""

    packed: PackedWeight | None = None
    use_packed: bool = False  # True only inside `prepacked_weights`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed
        if self.use_packed and x.numel() == packed.rows * self.in_features:
            return _packed_linear(packed.backend, x, packed.tensor, self.weight, self.bias, packed.rows)
        return F.linear(x, self.weight, self.bias)

    def pack(self, rows: int, backend: str = "mkl", weight_fn=None, key: tuple = ()) -> None:
        """Packs the weight for `rows`-row inputs, or the weight `weight_fn()` returns (a LoRA layer's merged
        W + s·BA, whose own tensors' versions the caller adds to `key`); repacks only when that key changed."""
        # The version counter moves with every in-place change (an optimizer step, load_state_dict).
        key = (self.weight.data_ptr(), self.weight._version, rows, backend, weight_fn is not None, *key)
        if self.packed is None or self.packed.key != key:
            self.packed = None  # free the stale copy before making the new one
            with torch.no_grad():
                weight = self.weight if weight_fn is None else weight_fn()
                self.packed = PackedWeight(_pack(backend, weight, rows), rows, key, backend)


_FASTEST: dict[tuple, str] = {}  # (rows, the model's weight shapes and counts) -> backend, once per process


def fastest_backend(rows: int, weights: list[torch.Tensor]) -> str:
    """The packing library that multiplies `rows` rows by all of `weights` faster on this CPU, measured on one
    weight of each shape, weighted by how often the shape occurs. Single shapes mislead: on a 2-core AMD EPYC
    MKL wins on SmolLM2's 192 x 576 k/v weights and oneDNN on the whole model (7.7 s against 11.7 s for
    16 x 48 sampled tokens). About 0.5 s for SmolLM2, most of it on the LM head."""
    shapes: dict[tuple, list[torch.Tensor]] = {}
    for w in weights:
        shapes.setdefault(tuple(w.shape), []).append(w)
    key = (rows, tuple(sorted((shape, len(ws)) for shape, ws in shapes.items())))
    if key not in _FASTEST:
        seconds = {}
        with torch.no_grad():
            for backend in BACKENDS:
                try:
                    seconds[backend] = sum(len(ws) * _seconds_per_product(backend, ws[0], rows)
                                           for ws in shapes.values())
                except RuntimeError:  # a PyTorch build without this library's packed ops
                    continue
        _FASTEST[key] = min(seconds, key=seconds.get) if seconds else "mkl"
    return _FASTEST[key]


def _seconds_per_product(backend: str, weight: torch.Tensor, rows: int) -> float:
    x = torch.randn(rows, weight.shape[1])
    packed = _pack(backend, weight, rows)
    _packed_linear(backend, x, packed, weight, None, rows)  # warm-up
    runs = []
    for _ in range(3):  # best of 3 runs of 3: the least disturbed measurement on a shared machine
        started = time.perf_counter()
        for _ in range(3):
            _packed_linear(backend, x, packed, weight, None, rows)
        runs.append((time.perf_counter() - started) / 3)
    return min(runs)


def can_prepack(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkl.is_available()


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: assume it is too small to pack
        return 0


@contextlib.contextmanager
def prepacked_weights(model: nn.Module, rows: int, backend: str | None = None):
    """Within the block, every float32 CPU `Linear` of `model` multiplies `rows`-row inputs with a packed
    copy of its weight (inputs with other row counts take the plain path), for `rows` >= 2. Skipped when the
    copies would take more than a quarter of the machine's memory: generation must never be what exhausts it.
    backend: "mkl" or "onednn"; None measures which is faster here (`fastest_backend`)."""
    layers = [m for m in model.modules() if isinstance(m, Linear) and can_prepack(m.weight)]
    # LoRA layers (lora.LoRALinear) that can decode through one packed W + s·BA in their base layer.
    adapters = [m for m in model.modules() if getattr(m, "can_pack_merged", lambda: False)()]
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    # One row is a matrix-vector product, already at memory speed without packing (27 ms vs 25 ms per
    # SmolLM2 step, measured), and packing it would change its rounding.
    if rows < 2 or not layers or 4 * weight_bytes > _physical_memory_bytes():
        yield
        return
    if backend is None:
        backend = fastest_backend(rows, [m.weight for m in layers])
    elif backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or None, not {backend!r}")
    merged = {id(m.base_layer) for m in adapters}
    try:
        for m in adapters:
            m.pack_merged(rows, backend)
        for m in layers:
            if id(m) not in merged:
                m.pack(rows, backend)
            m.use_packed = True
        yield
    finally:
        for m in adapters:
            m.decode_rows = 0
        for m in layers:
            m.use_packed = False
