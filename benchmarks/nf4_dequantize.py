"""NF4 dequantisation of one Llama-3.1-8B decoder layer, as QLoRA training runs it, in TB/s of memory traffic.

    python benchmarks/nf4_dequantize.py [--sweep] [--pairs]
    python benchmarks/nf4_dequantize.py --check     (the --pairs kernel bit-exact; CPU: TRITON_INTERPRET=1)

A QLoRA micro-batch dequantises every layer's seven weights twice (forward and backward, never kept): 218 M
values, 545 MB of traffic a layer in bf16, 64 times per 8B micro-batch. Between Llama-3.1-8B's LoRA and QLoRA
speed modes lie 12 ms of a 253 ms micro-batch (device call 38), about 0.19 ms a layer and pass: 2.9 TB/s,
against the H200's 4.8 peak. This times the kernel writing where the fused functions want the values: q, k,
v into the rows of their stacked matrix, gate and up into the MLP's M, down into D (kernels/lora_stacked.py,
kernels/lora_mlp.py), o alone. --sweep also tries other program sizes and warp counts
(kernels/nf4_dequantize.py's _BLOCKS_PER_PROGRAM, _LAUNCH_OPTIONS): 2.2-2.4 TB/s in all 20 (device call 42),
so the bound is inside the kernel. --pairs times an experiment beside it, both writing contiguous weights:
one gather a byte from a 256-entry table of (high, low) code pairs, whose (bytes, 2) tile is already in
memory order, where the shipped kernel gathers twice and interleaves through shared memory. A diagnostic: it
records nothing.
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent))

from _record import cuda_ms  # noqa: E402
from lorafit.kernels import nf4_dequantize  # noqa: E402
from lorafit.nn.nf4 import BLOCK_SIZE, NESTED_BLOCK_SIZE, NF4Linear, dequantize_nf4  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _pairs_kernel(packed_ptr, absmax_ptr, pairs_ptr, nested_scales_ptr, nested_code_ptr, nested_offset_ptr,
                      out_ptr, n_values, n_bytes, n_blocks,
                      BLOCKS: tl.constexpr, BLOCK_SIZE: tl.constexpr, NESTED_BLOCK_SIZE: tl.constexpr):
        """The shipped kernel's arithmetic (double quantisation only, contiguous output), but one gather a byte:
        pairs (256, 2) float32 holds (code[b >> 4], code[b & 15]) for byte b."""
        BYTES: tl.constexpr = BLOCK_SIZE // 2
        first_block = tl.program_id(0).to(tl.int64) * BLOCKS
        blocks = tl.arange(0, BLOCKS)
        absmax_code = tl.load(absmax_ptr + first_block + blocks, mask=blocks < n_blocks - first_block, other=0)
        tl.static_assert(NESTED_BLOCK_SIZE % BLOCKS == 0)
        absmax = tl.load(nested_code_ptr + absmax_code.to(tl.int32)) * tl.load(
            nested_scales_ptr + first_block // NESTED_BLOCK_SIZE)
        absmax = absmax + tl.load(nested_offset_ptr)  # two roundings, as the reference (no FMA at launch)
        bytes_ = tl.arange(0, BLOCKS * BYTES)
        packed = tl.load(packed_ptr + first_block * BYTES + bytes_, mask=bytes_ < n_bytes - first_block * BYTES,
                         other=0)
        halves = tl.arange(0, 2)
        values = tl.load(pairs_ptr + packed.to(tl.int32)[:, None] * 2 + halves[None, :])  # (B*32, 2)
        absmax = tl.reshape(tl.broadcast_to(absmax[:, None], (BLOCKS, BYTES)), (BLOCKS * BYTES,))
        values = values * absmax[:, None]
        offsets = bytes_[:, None] * 2 + halves[None, :]  # memory order: byte by byte, high value first
        first_value = first_block * BLOCK_SIZE
        tl.store(out_ptr + first_value + offsets, values.to(out_ptr.dtype.element_ty),
                 mask=offsets < n_values - first_value)


def code_pairs(code: torch.Tensor) -> torch.Tensor:
    """(256, 2) float32: row b is (code[b >> 4], code[b & 15]), the two values of byte b."""
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).contiguous()


def dequantize_pairs(w: NF4Linear, pairs: torch.Tensor, dtype=torch.bfloat16, blocks: int = 64, warps: int = 4):
    """w's dense weight through _pairs_kernel (a double-quantised layer)."""
    out = torch.empty(w.out_features, w.in_features, dtype=dtype, device=w.weight.device)
    n_blocks = w.absmax.numel()
    _pairs_kernel[(triton.cdiv(n_blocks, blocks),)](
        w.weight, w.absmax, pairs, w.nested_scales, w.nested_code, w.nested_offset, out, out.numel(),
        w.weight.numel(), n_blocks, BLOCKS=blocks, BLOCK_SIZE=BLOCK_SIZE, NESTED_BLOCK_SIZE=NESTED_BLOCK_SIZE,
        num_warps=warps, enable_fp_fusion=False)
    return out

C, I, Q, KV, R = 4096, 14336, 4096, 1024, 16  # Llama-3.1-8B, LoRA r = 16


def layer_weights() -> dict[str, NF4Linear]:
    """The seven projections of one decoder layer as double-quantised NF4, random weights."""
    shapes = {"q": (Q, C), "k": (KV, C), "v": (KV, C), "o": (C, Q), "gate": (I, C), "up": (I, C), "down": (C, I)}
    return {name: NF4Linear.from_weight(torch.randn(shape, device="cuda") * 0.02, compute_dtype=torch.bfloat16)
            for name, shape in shapes.items()}


def dequantize_layer(w: dict[str, NF4Linear]):
    """What one pass of a QLoRA layer writes: the destinations as the fused functions lay them out."""
    qkv = torch.empty(Q + 2 * KV + 3 * R, C + 3 * R, dtype=torch.bfloat16, device="cuda")
    w["q"].dequantize_into(qkv[:Q, :C])
    w["k"].dequantize_into(qkv[Q:Q + KV, :C])
    w["v"].dequantize_into(qkv[Q + KV:Q + 2 * KV, :C])
    w["o"].dequantized_weight(torch.bfloat16)
    m = torch.empty(2 * I + 2 * R, C + 2 * R, dtype=torch.bfloat16, device="cuda")
    w["gate"].dequantize_into(m[:I, :C])
    w["up"].dequantize_into(m[I:2 * I, :C])
    d = torch.empty(C, I + R, dtype=torch.bfloat16, device="cuda")
    w["down"].dequantize_into(d[:, :I])


def traffic(w: dict[str, NF4Linear]) -> int:
    """Bytes a layer's dequantisation moves: bf16 out, 4-bit codes and 1-byte absmax codes in."""
    values = sum(m.in_features * m.out_features for m in w.values())
    return values * 2 + values // 2 + values // 64


def report(label: str, w: dict[str, NF4Linear]) -> None:
    moved = traffic(w)
    ms = cuda_ms(lambda: dequantize_layer(w))
    print(f"{label}: {ms * 1e3:.1f} us a layer, {moved / ms / 1e9:.2f} TB/s ({moved / 1e6:.0f} MB)")


def compare_pairs(w: dict[str, NF4Linear]) -> None:
    """The shipped kernel and the pairs experiment, each writing the seven weights as contiguous tensors."""
    moved = traffic(w)
    pairs = code_pairs(w["q"].code)
    for label, fn in (("shipped, contiguous", lambda: [m.dequantized_weight(torch.bfloat16) for m in w.values()]),
                      ("pairs, contiguous", lambda: [dequantize_pairs(m, pairs) for m in w.values()])):
        ms = cuda_ms(fn)
        print(f"{label}: {ms * 1e3:.1f} us a layer, {moved / ms / 1e9:.2f} TB/s")
    for n_blocks, warps in itertools.product((32, 64, 128), (2, 4, 8)):
        ms = cuda_ms(lambda: [dequantize_pairs(m, pairs, blocks=n_blocks, warps=warps) for m in w.values()])
        print(f"  pairs, {n_blocks} blocks, {warps} warps: {ms * 1e3:.1f} us a layer, {moved / ms / 1e9:.2f} TB/s")


def check_pairs() -> None:
    """Bit-exact against the reference on odd shapes (a partial last block, one nested scale group and more).
    On the CPU the interpreter casts float32 to bf16 by truncation, not rounding (as tests/test_kernels_nf4.py
    says): there bf16 is compared with the reference's float32 values truncated."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for shape in ((37, 67), (300, 128), (129, 257)):
        w = NF4Linear.from_weight(torch.randn(shape, device=device) * 0.02, compute_dtype=torch.bfloat16)
        for dtype in (torch.bfloat16, torch.float32):
            expected = dequantize_nf4(*w._state(), shape, dtype)
            if dtype == torch.bfloat16 and not w.weight.is_cuda:
                exact = dequantize_nf4(*w._state(), shape, torch.float32)
                expected = (exact.view(torch.int32) & -65536).view(torch.float32).bfloat16()
            got = dequantize_pairs(w, code_pairs(w.code), dtype)
            assert torch.equal(got, expected), (shape, dtype)
    print("pairs kernel: bit-exact against dequantize_nf4 on 3 shapes, bf16 and float32")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="also time other program sizes and warp counts")
    p.add_argument("--pairs", action="store_true", help="also time the pair-table experiment")
    p.add_argument("--check", action="store_true", help="only check the pairs kernel (CPU: TRITON_INTERPRET=1)")
    args = p.parse_args()
    if args.check:
        return check_pairs()
    torch.manual_seed(0)
    w = layer_weights()
    report("as shipped", w)
    if args.pairs:
        compare_pairs(w)
    if not args.sweep:
        return
    blocks, options = nf4_dequantize._BLOCKS_PER_PROGRAM, nf4_dequantize._LAUNCH_OPTIONS
    # Program sizes must divide the 256 blocks of a nested scale (the kernel's static assert).
    for n_blocks, warps in itertools.product((16, 32, 64, 128, 256), (2, 4, 8, 16)):
        nf4_dequantize._BLOCKS_PER_PROGRAM = n_blocks
        nf4_dequantize._LAUNCH_OPTIONS = options | {"num_warps": warps}
        try:
            report(f"  {n_blocks} blocks, {warps} warps", w)
        except Exception as e:  # out of registers at this size
            print(f"  {n_blocks} blocks, {warps} warps: {type(e).__name__}")
    nf4_dequantize._BLOCKS_PER_PROGRAM, nf4_dequantize._LAUNCH_OPTIONS = blocks, options


if __name__ == "__main__":
    main()
