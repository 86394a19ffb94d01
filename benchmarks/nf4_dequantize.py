"""NF4 dequantisation of one Llama-3.1-8B decoder layer, as QLoRA training runs it, in TB/s of memory traffic.

    python benchmarks/nf4_dequantize.py [--sweep] [--variants]
    python benchmarks/nf4_dequantize.py --check     (the variants bit-exact; CPU: TRITON_INTERPRET=1)

A QLoRA micro-batch dequantises every layer's seven weights twice (forward and backward, never kept): 218 M
values, 545 MB of traffic a layer in bf16, 64 times per 8B micro-batch. Between Llama-3.1-8B's LoRA and QLoRA
speed modes lie 12 ms of a 253 ms micro-batch (device call 38), about 0.19 ms a layer and pass: 2.9 TB/s,
against the H200's 4.8 peak. This times the kernel writing where the fused functions want the values: q, k,
v into the rows of their stacked matrix, gate and up into the MLP's M, down into D (kernels/lora_stacked.py,
kernels/lora_mlp.py), o alone; each layer's 7 launches recorded into a CUDA graph and replayed, so that the
GPU's time is what is timed (graph_ms). --sweep also tries other program sizes and warp counts
(kernels/nf4_dequantize.py's _BLOCKS_PER_PROGRAM, _LAUNCH_OPTIONS). --variants times an experiment beside
it (_variant_kernel): the values as a (bytes, 2) tile already in memory order where the shipped kernel
interleaves them through shared memory, from one gather a byte of a 256-entry table of (high, low) code
pairs or from two gathers joined; and into rows of a wider matrix, a compare for the row where the shipped
kernel divides every offset by the row length (as long as a program's values span two rows at most). A diagnostic: it
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
    def _variant_kernel(packed_ptr, absmax_ptr, code_ptr, pairs_ptr, nested_scales_ptr, nested_code_ptr,
                        nested_offset_ptr, out_ptr, n_values, n_bytes, n_blocks, n_cols, row_stride,
                        BLOCKS: tl.constexpr, BLOCK_SIZE: tl.constexpr, NESTED_BLOCK_SIZE: tl.constexpr,
                        PAIRS: tl.constexpr, ROW_STRIDED: tl.constexpr, TWO_ROWS: tl.constexpr):
        """The shipped kernel's arithmetic (double quantisation only), its values as a (bytes, 2) tile in memory
        order rather than interleaved: PAIRS, one gather a byte from pairs (256, 2) float32, row b holding
        (code[b >> 4], code[b & 15]); else two gathers from code joined. ROW_STRIDED: out's rows lie
        row_stride apart; TWO_ROWS: a program's values span at most two rows (n_cols >= its values), so a
        compare finds the row where the shipped kernel divides every offset by n_cols."""
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
        if PAIRS:
            values = tl.load(pairs_ptr + packed.to(tl.int32)[:, None] * 2 + halves[None, :])  # (B*32, 2)
        else:
            values = tl.join(tl.load(code_ptr + (packed >> 4).to(tl.int32)),
                             tl.load(code_ptr + (packed & 15).to(tl.int32)))  # (B*32, 2)
        absmax = tl.reshape(tl.broadcast_to(absmax[:, None], (BLOCKS, BYTES)), (BLOCKS * BYTES,))
        values = values * absmax[:, None]
        offsets = bytes_[:, None] * 2 + halves[None, :]  # memory order: byte by byte, high value first
        first_value = first_block * BLOCK_SIZE
        if ROW_STRIDED:
            first_row = first_value // n_cols
            local = (first_value - first_row * n_cols).to(tl.int32) + offsets  # from first_row's start
            if TWO_ROWS:
                rows = (local >= n_cols).to(tl.int32)
            else:
                rows = local // n_cols
            out_offsets = (first_row + rows) * row_stride + (local - rows * n_cols)
        else:
            out_offsets = first_value + offsets
        tl.store(out_ptr + out_offsets, values.to(out_ptr.dtype.element_ty), mask=offsets < n_values - first_value)


def code_pairs(code: torch.Tensor) -> torch.Tensor:
    """(256, 2) float32: row b is (code[b >> 4], code[b & 15]), the two values of byte b."""
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).contiguous()


# The experiment's variants: (gather from the pair table, find rows by a compare)
VARIANTS = {"join": (False, False), "join, compare": (False, True), "pairs": (True, False),
            "pairs, compare": (True, True)}


def variant_into(w: NF4Linear, out: torch.Tensor, variant: str, pairs: torch.Tensor, blocks: int = 64,
                 warps: int = 4) -> torch.Tensor:
    """w's dense weight written into out (contiguous, or rows of a wider matrix) by _variant_kernel."""
    use_pairs, compare = VARIANTS[variant]
    n_blocks = w.absmax.numel()
    n_cols, strided = out.shape[1], not out.is_contiguous()
    _variant_kernel[(triton.cdiv(n_blocks, blocks),)](
        w.weight, w.absmax, w.code, pairs, w.nested_scales, w.nested_code, w.nested_offset, out, out.numel(),
        w.weight.numel(), n_blocks, n_cols, out.stride(0), BLOCKS=blocks, BLOCK_SIZE=BLOCK_SIZE,
        NESTED_BLOCK_SIZE=NESTED_BLOCK_SIZE, PAIRS=use_pairs, ROW_STRIDED=strided,
        TWO_ROWS=compare and n_cols >= blocks * BLOCK_SIZE, num_warps=warps, enable_fp_fusion=False)
    return out


C, I, Q, KV, R = 4096, 14336, 4096, 1024, 16  # Llama-3.1-8B, LoRA r = 16


def layer_weights() -> dict[str, NF4Linear]:
    """The seven projections of one decoder layer as double-quantised NF4, random weights."""
    shapes = {"q": (Q, C), "k": (KV, C), "v": (KV, C), "o": (C, Q), "gate": (I, C), "up": (I, C), "down": (C, I)}
    return {name: NF4Linear.from_weight(torch.randn(shape, device="cuda") * 0.02, compute_dtype=torch.bfloat16)
            for name, shape in shapes.items()}


def shipped_into(w: NF4Linear, out: torch.Tensor) -> torch.Tensor:
    w.dequantize_into(out)
    return out


def dequantize_layer(w: dict[str, NF4Linear], into=shipped_into):
    """What one pass of a QLoRA layer writes: the destinations as the fused functions lay them out."""
    qkv = torch.empty(Q + 2 * KV + 3 * R, C + 3 * R, dtype=torch.bfloat16, device="cuda")
    into(w["q"], qkv[:Q, :C])
    into(w["k"], qkv[Q:Q + KV, :C])
    into(w["v"], qkv[Q + KV:Q + 2 * KV, :C])
    into(w["o"], torch.empty(C, Q, dtype=torch.bfloat16, device="cuda"))
    m = torch.empty(2 * I + 2 * R, C + 2 * R, dtype=torch.bfloat16, device="cuda")
    into(w["gate"], m[:I, :C])
    into(w["up"], m[I:2 * I, :C])
    d = torch.empty(C, I + R, dtype=torch.bfloat16, device="cuda")
    into(w["down"], d[:, :I])


def graph_ms(fn, calls: int = 10, replays: int = 5) -> float:
    """Milliseconds a call of fn() takes on the GPU alone: `calls` calls recorded into one CUDA graph, replayed
    `replays` times, the fastest replay over calls. Launching from the host (7 Triton launches and 3
    allocations a layer, ~250 us of GPU work) took about as long as the kernels: timed eagerly, the same
    configuration moved between 277 and 448 us a layer within one call (device call 50)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    best = float("inf")
    for _ in range(replays):
        best = min(best, cuda_ms(graph.replay, iters=1) / calls)
    return best


def traffic(w: dict[str, NF4Linear]) -> int:
    """Bytes a layer's dequantisation moves: bf16 out, 4-bit codes and 1-byte absmax codes in."""
    values = sum(m.in_features * m.out_features for m in w.values())
    return values * 2 + values // 2 + values // 64


def report(label: str, w: dict[str, NF4Linear], into=shipped_into) -> None:
    moved = traffic(w)
    ms = graph_ms(lambda: dequantize_layer(w, into))
    print(f"{label}: {ms * 1e3:.1f} us a layer, {moved / ms / 1e9:.2f} TB/s ({moved / 1e6:.0f} MB)")


def compare_variants(w: dict[str, NF4Linear], sweep: bool) -> None:
    """The experiment's variants writing where the shipped kernel writes (dequantize_layer), then, with
    sweep, in other program sizes and warp counts."""
    pairs = code_pairs(w["q"].code)
    for variant in VARIANTS:
        report(f"{variant}", w, lambda m, out, v=variant: variant_into(m, out, v, pairs))
    if not sweep:
        return
    for variant, (n_blocks, warps) in itertools.product(VARIANTS, itertools.product((32, 64, 128), (2, 4, 8))):
        report(f"  {variant}, {n_blocks} blocks, {warps} warps", w,
               lambda m, out, v=variant, b=n_blocks, n=warps: variant_into(m, out, v, pairs, b, n))


def check_variants() -> None:
    """Bit-exact against the reference on odd shapes (a partial last block, one nested scale group and more),
    contiguous and into rows of a wider matrix. On the CPU the interpreter casts float32 to bf16 by
    truncation, not rounding (as tests/test_kernels_nf4.py says): there bf16 is compared with the reference's
    float32 values truncated."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for shape in ((37, 67), (300, 128), (129, 257), (9, 4096)):
        w = NF4Linear.from_weight(torch.randn(shape, device=device) * 0.02, compute_dtype=torch.bfloat16)
        for dtype, variant, strided in itertools.product((torch.bfloat16, torch.float32), VARIANTS, (False, True)):
            expected = dequantize_nf4(*w._state(), shape, dtype)
            if dtype == torch.bfloat16 and not w.weight.is_cuda:
                exact = dequantize_nf4(*w._state(), shape, torch.float32)
                expected = (exact.view(torch.int32) & -65536).view(torch.float32).bfloat16()
            wide = torch.full((shape[0], shape[1] + 5), 7.0, dtype=dtype, device=device)
            out = wide[:, :shape[1]] if strided else torch.empty(shape, dtype=dtype, device=device)
            got = variant_into(w, out, variant, code_pairs(w.code), blocks=32)
            assert torch.equal(got, expected), (shape, dtype, variant, strided)
            assert not strided or bool((wide[:, shape[1]:] == 7).all()), (shape, dtype, variant)
    print(f"variants {', '.join(VARIANTS)}: bit-exact against dequantize_nf4 on 4 shapes, bf16 and float32, "
          "contiguous and strided")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="also time other program sizes and warp counts")
    p.add_argument("--variants", action="store_true", help="also time the experiment's variants")
    p.add_argument("--check", action="store_true", help="only check the variants (CPU: TRITON_INTERPRET=1)")
    args = p.parse_args()
    if args.check:
        return check_variants()
    torch.manual_seed(0)
    w = layer_weights()
    report("as shipped", w)
    if args.variants:
        compare_variants(w, args.sweep)
    if not args.sweep:
        return
    blocks, options = nf4_dequantize._BLOCKS_PER_PROGRAM, nf4_dequantize._LAUNCH_OPTIONS
    # Program sizes must divide the 256 blocks of a nested scale (the kernel's static assert).
    for n_blocks, warps in itertools.product((16, 32, 64, 128, 256), (2, 4, 8, 16)):
        nf4_dequantize._BLOCKS_PER_PROGRAM = n_blocks
        nf4_dequantize._LAUNCH_OPTIONS = options | {"num_warps": warps}
        try:
            report(f"  shipped, {n_blocks} blocks, {warps} warps", w)
        except Exception as e:  # out of registers at this size
            print(f"  {n_blocks} blocks, {warps} warps: {type(e).__name__}")
    nf4_dequantize._BLOCKS_PER_PROGRAM, nf4_dequantize._LAUNCH_OPTIONS = blocks, options


if __name__ == "__main__":
    main()
