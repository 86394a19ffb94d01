"""A fused NF4 dequantise-GEMM in Triton: y = x Wᵀ and grad x = dy W with the 4-bit W never written densely.

The format is nn/nf4.py's (bitsandbytes'), read from the same state tensors as `dequantize_nf4`: the
(N, K) weight flattened row-major into blocks of 64 values, two 4-bit code indices a byte (the first value
in the high nibble), one absmax a block, float32 or, with double quantisation, a uint8 code into the
256-entry dynamic code times a float32 scale per 256 blocks plus a float32 offset. K must be a multiple of
64: then every block lies inside one row, a (rows, 64·j) tile of W has exactly one absmax per row and
64-column group, and its bytes are one contiguous run per row.

Inside the reduction loop each program loads a tile of code bytes, looks both nibbles up in the 16-entry
code table, multiplies by the block's absmax in float32 (the nested absmax is `code * scale` then
`+ offset`, two roundings, with enable_fp_fusion=False as in kernels/nf4_dequantize.py), casts to x's
dtype and feeds the tile to tl.dot, accumulating in float32. The W tile is therefore bit-identical to
`dequantize_nf4(..., x.dtype)`'s (on a GPU; the interpreter truncates float32 -> bf16): only the order of the
float32 sums differs from `x @ dequantize_nf4(...).T`. float32 inputs use input_precision="ieee" (no TF32),
as torch.matmul does by default.

Why it may win: at small M (decoding, M <= ~128) a linear layer is bound by memory traffic. Dequantise-then-
cuBLAS reads 0.52 bytes a weight, writes 2 bytes of bf16 and reads those 2 back: ~4.5 bytes a weight; the
fused kernel reads ~0.52. For Llama-3.1-8B's 4096 x 14336 MLP weight that is 264 MB against 30 MB, ~66 us
against ~8 us at 4 TB/s. Where it likely loses: at large M the GEMM is compute-bound; cuBLAS's Hopper
kernels (wgmma, TMA, warp specialisation) beat a tl.dot loop, and the fused kernel dequantises every W tile
once per M tile (32 times at M = 4096 with 128-row tiles) where the separate pass does it once. Hence opt-in:
nothing in the model path calls this until benchmarks/nf4_matmul.py has measured where it wins.

Tiles (`choose_tiles`; not measured yet, the benchmark's --sweep compares alternatives): tl.dot needs every
tile side >= 16, so small M takes 16-row tiles (15 of 16 MMA rows idle at M = 1 costs nothing when memory-
bound) and narrow 32-column tiles with 128-wide K steps (4 KB of codes a step) to spread a 4096-wide
weight over 128 programs; where that still gives fewer than two programs per SM, the reduction is split
(split-K) into float32 partial sums added by torch afterwards: deterministic, unlike atomics, at the cost of
one small extra kernel. Large M takes 128 x 128 output tiles and 64-wide K steps (one NF4 block per row),
the usual Triton GEMM shape for Hopper.
"""

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..nn.nf4 import BLOCK_SIZE, COMPUTE_DTYPES, NESTED_BLOCK_SIZE
from .nf4_dequantize import _check

try:  # CUDA builds of torch bring Triton; CPU-only installs have just the reference path
    import triton
    import triton.language as tl
except ImportError:
    triton = None


class Tiles(NamedTuple):
    """One launch's tiling. block_m: rows of x (or dy) a program; block_n x block_k: the W tile decoded a
    step (block_k a multiple of 64). Forward, block_n is the program's output width and block_k its reduction
    step; transposed (backward), the other way round. split: programs sharing one reduction."""
    block_m: int
    block_n: int
    block_k: int
    split: int = 1
    num_warps: int = 4
    num_stages: int = 3


def choose_tiles(m: int, shape: Sequence[int], transposed: bool, device: torch.device) -> Tiles:
    """The default tiling for m rows and the (N, K) weight `shape` (see the module docstring)."""
    if m <= 16:
        return with_split(Tiles(16, 32, 128, num_stages=4), m, shape, transposed, device)
    if m <= 128:
        return with_split(Tiles(64, 64, 64, num_stages=4), m, shape, transposed, device)
    return Tiles(128, 128, 64, num_warps=8, num_stages=3)


def with_split(tiles: Tiles, m: int, shape: Sequence[int], transposed: bool, device: torch.device) -> Tiles:
    """tiles, the reduction split where they give fewer than 2 programs per SM (a CPU counts as one SM);
    each share keeps at least 4 steps to amortise its partial-sum store (m x width float32, small here)."""
    n, k = shape
    (width, tile), (reduce, step) = ((k, tiles.block_k), (n, tiles.block_n)) if transposed else \
        ((n, tiles.block_n), (k, tiles.block_k))
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    programs = math.ceil(m / tiles.block_m) * math.ceil(width / tile)
    return tiles._replace(split=max(1, min(math.ceil(2 * sms / programs), math.ceil(reduce / step) // 4)))


if triton is not None:

    @triton.jit
    def _weight_tile(packed_ptr, absmax_ptr, code_ptr, nested_scales_ptr, nested_code_ptr, nested_offset_ptr,
                     rows, row_ok, k0, K, NESTED: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr, NESTED_BLOCK_SIZE: tl.constexpr):
        """W[rows, k0 : k0 + BLOCK_K] in float32, (R, BLOCK_K); rows (R,) int64. Columns past K and rows
        where row_ok is False come out finite (code 0 times an absmax), to be masked by the caller."""
        BYTES: tl.constexpr = BLOCK_K // 2  # code bytes a row
        GROUPS: tl.constexpr = BLOCK_K // BLOCK_SIZE  # NF4 blocks a row
        byte_cols = k0 // 2 + tl.arange(0, BYTES)  # (BYTES,)
        ok = row_ok[:, None] & (byte_cols < K // 2)[None, :]
        packed = tl.load(packed_ptr + rows[:, None] * (K // 2) + byte_cols[None, :], mask=ok, other=0)  # (R, BYTES)
        # Block index of W[r, k]: (r K + k) / 64 = r (K / 64) + k / 64, as K is a multiple of 64.
        group_cols = k0 // BLOCK_SIZE + tl.arange(0, GROUPS)  # (GROUPS,)
        block_ok = row_ok[:, None] & (group_cols < K // BLOCK_SIZE)[None, :]
        blocks = rows[:, None] * (K // BLOCK_SIZE) + group_cols[None, :]  # (R, GROUPS)
        if NESTED:
            absmax_code = tl.load(absmax_ptr + blocks, mask=block_ok, other=0).to(tl.int32)
            nested_scale = tl.load(nested_scales_ptr + blocks // NESTED_BLOCK_SIZE, mask=block_ok, other=0.0)
            # Two statements, two roundings, as the reference (enable_fp_fusion=False at launch: no FMA).
            absmax = tl.load(nested_code_ptr + absmax_code) * nested_scale
            absmax = absmax + tl.load(nested_offset_ptr)
        else:
            absmax = tl.load(absmax_ptr + blocks, mask=block_ok, other=0.0)  # (R, GROUPS)
        # Each block's absmax over its 32 bytes: (R, GROUPS) -> (R, GROUPS, 32) -> (R, BYTES).
        absmax = tl.reshape(tl.broadcast_to(absmax[:, :, None], (absmax.shape[0], GROUPS, BLOCK_SIZE // 2)),
                            (absmax.shape[0], BYTES))
        # Both values of a byte share its block. The 64-byte code table stays in L1 after the first touch.
        high = tl.load(code_ptr + (packed >> 4).to(tl.int32)) * absmax  # (R, BYTES): even columns k
        low = tl.load(code_ptr + (packed & 15).to(tl.int32)) * absmax  # (R, BYTES): odd columns k + 1
        return tl.interleave(high, low)  # (R, BLOCK_K) in column order

    @triton.jit
    def _matmul_kernel(
        a_ptr, packed_ptr, absmax_ptr, code_ptr, nested_scales_ptr, nested_code_ptr, nested_offset_ptr, out_ptr,
        M, N, K, stride_am, stride_ak, stride_os, stride_om, stride_on, reduce_per_split,
        TRANSPOSED: tl.constexpr, NESTED: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, NESTED_BLOCK_SIZE: tl.constexpr,
    ):
        """TRANSPOSED False: out (M, N) = a (M, K) Wᵀ, BLOCK_N output columns (rows of W) a program, the loop
        over K. TRANSPOSED True: out (M, K) = a (M, N) W, BLOCK_K output columns (columns of W) a program, the
        loop over N in steps of BLOCK_N. W is (N, K) NF4. Program axis 2 picks the share of the reduction
        (reduce_per_split long) and the (M, ·) slice of out it writes (stride_os apart)."""
        # Axis 0 over M tiles: programs that decode the same W tile are launched together, so W's codes
        # come from L2 after the first of them.
        pid_m, pid_out, pid_split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        m_ok = m < M
        reduce_start = pid_split * reduce_per_split
        if TRANSPOSED:
            k = pid_out * BLOCK_K + tl.arange(0, BLOCK_K)  # (BK,) output columns: fixed
            acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for n0 in range(reduce_start, tl.minimum(reduce_start + reduce_per_split, N), BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)  # (BN,)
                n_ok = n < N
                # Masked columns of dy load as 0, which zeroes W's (finite) rows past N in the product.
                a = tl.load(a_ptr + m[:, None] * stride_am + n[None, :] * stride_ak,
                            mask=m_ok[:, None] & n_ok[None, :], other=0.0)  # (BM, BN)
                w = _weight_tile(packed_ptr, absmax_ptr, code_ptr, nested_scales_ptr, nested_code_ptr,
                                 nested_offset_ptr, n.to(tl.int64), n_ok, pid_out * BLOCK_K, K, NESTED, BLOCK_K,
                                 BLOCK_SIZE, NESTED_BLOCK_SIZE)  # (BN, BK)
                # W in a's dtype, exactly dequantize_nf4(..., dtype)'s values, then both in the dot's dtype.
                w = w.to(a_ptr.dtype.element_ty).to(DOT_DTYPE)
                acc = tl.dot(a.to(DOT_DTYPE), w, acc, input_precision=INPUT_PRECISION)
            cols, cols_ok = k, k < K
        else:
            n = pid_out * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) output columns: fixed
            n_ok = n < N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(reduce_start, tl.minimum(reduce_start + reduce_per_split, K), BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
                a = tl.load(a_ptr + m[:, None] * stride_am + k[None, :] * stride_ak,
                            mask=m_ok[:, None] & (k < K)[None, :], other=0.0)  # (BM, BK)
                w = _weight_tile(packed_ptr, absmax_ptr, code_ptr, nested_scales_ptr, nested_code_ptr,
                                 nested_offset_ptr, n.to(tl.int64), n_ok, k0, K, NESTED, BLOCK_K,
                                 BLOCK_SIZE, NESTED_BLOCK_SIZE)  # (BN, BK)
                w = w.to(a_ptr.dtype.element_ty).to(DOT_DTYPE)
                acc = tl.dot(a.to(DOT_DTYPE), tl.trans(w), acc, input_precision=INPUT_PRECISION)
            cols, cols_ok = n, n_ok
        out = out_ptr + pid_split * stride_os + m[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & cols_ok[None, :])


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32} if triton else {}
# Compile options of every launch. enable_fp_fusion=False: no FMA in the nested absmax (see above).
_LAUNCH_OPTIONS = {"enable_fp_fusion": False}


def _launch(a, state, shape, transposed: bool, tiles: Tiles | None) -> torch.Tensor:
    """Checks, then runs the kernel on a (..., K) (or (..., N) when transposed) for the (N, K) weight."""
    if triton is None:
        raise RuntimeError("the fused NF4 matmul needs the triton package (pip install triton)")
    name = "nf4_matmul_t" if transposed else "nf4_matmul"
    if len(shape) != 2:
        raise ValueError(f"{name}: the weight shape must be (out_features, in_features), not {tuple(shape)}")
    n, k = shape
    if k % BLOCK_SIZE:
        raise ValueError(f"{name}: in_features K={k} must be a multiple of {BLOCK_SIZE} (the NF4 block size), "
                         "so that every block lies within one row of W; dequantise, then matmul instead")
    reduce, width = (n, k) if transposed else (k, n)
    if a.shape[-1] != reduce:
        raise ValueError(f"{name}: the input's last dimension is {a.shape[-1]}, the weight {tuple(shape)} needs "
                         f"{reduce}")
    if a.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"{name}: the input must be bfloat16, float16 or float32, not {a.dtype}")
    _check(*state, n * k, a.dtype)
    if state[0].device != a.device:
        raise ValueError(f"{name}: the input is on {a.device}, the weight on {state[0].device}")
    a2 = a.reshape(-1, reduce)  # (M, reduce), any strides
    m = a2.shape[0]
    out = torch.empty(m, width, dtype=a.dtype, device=a.device)
    if out.numel() == 0 or reduce == 0:
        return out.zero_().view(*a.shape[:-1], width)
    packed, absmax, code, nested_scales, nested_code, nested_offset = (
        None if t is None else t.contiguous() for t in state)
    nested = nested_scales is not None
    # Without double quantisation the kernel never reads the nested pointers; any tensor fills them.
    extra = (nested_scales, nested_code, nested_offset) if nested else (absmax, absmax, absmax)
    tiles = tiles or choose_tiles(m, shape, transposed, a.device)
    step = tiles.block_n if transposed else tiles.block_k
    if tiles.block_k % BLOCK_SIZE or min(tiles.block_m, tiles.block_n, tiles.block_k) < 16:
        raise ValueError(f"{name}: block_k must be a multiple of {BLOCK_SIZE} and every tile side >= 16: {tiles}")
    # Each share of the reduction a whole number of steps; `split` may shrink so that none is empty.
    per_split = math.ceil(math.ceil(reduce / step) / tiles.split) * step
    split = math.ceil(reduce / per_split)
    target = out if split == 1 else torch.empty(split, m, width, dtype=torch.float32, device=a.device)
    # Triton runs on CPU tensors only in its interpreter, and Triton 3.9's interpreter multiplies bfloat16
    # tensors as their raw uint16 bits (interpreter.py, create_dot). There the bf16 operands are widened to
    # float32 first: exact, and the same exact products and float32 sums that a bf16 MMA makes.
    dot_dtype = torch.float32 if a.dtype == torch.bfloat16 and a.device.type == "cpu" else a.dtype
    grid = (triton.cdiv(m, tiles.block_m), triton.cdiv(width, tiles.block_k if transposed else tiles.block_n), split)
    _matmul_kernel[grid](
        a2, packed, absmax, code, *extra, target, m, n, k, a2.stride(0), a2.stride(1),
        target.stride(0) if split > 1 else 0, target.stride(-2), target.stride(-1), per_split,
        TRANSPOSED=transposed, NESTED=nested, DOT_DTYPE=_TL_DTYPES[dot_dtype],
        INPUT_PRECISION="ieee" if dot_dtype == torch.float32 else "tf32",
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, BLOCK_SIZE=BLOCK_SIZE,
        NESTED_BLOCK_SIZE=NESTED_BLOCK_SIZE, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        **_LAUNCH_OPTIONS,
    )
    if split > 1:
        out.copy_(target.sum(dim=0))  # float32 partials, summed in a fixed order: one rounding to a's dtype
    return out.view(*a.shape[:-1], width)


def nf4_matmul_triton(x: torch.Tensor, packed, absmax, code, nested_scales, nested_code, nested_offset,
                      shape: Sequence[int], tiles: Tiles | None = None) -> torch.Tensor:
    """x (..., K) @ Wᵀ -> (..., N) in x's dtype, W the (N, K) NF4 weight of the state (dequantize_nf4's
    arguments). K % 64 == 0. Any device (CPU tensors need TRITON_INTERPRET=1). tiles: choose_tiles' by default."""
    return _launch(x, (packed, absmax, code, nested_scales, nested_code, nested_offset), shape, False, tiles)


def nf4_matmul_t_triton(dy: torch.Tensor, packed, absmax, code, nested_scales, nested_code, nested_offset,
                        shape: Sequence[int], tiles: Tiles | None = None) -> torch.Tensor:
    """dy (..., N) @ W -> (..., K) in dy's dtype: the input gradient of nf4_matmul_triton."""
    return _launch(dy, (packed, absmax, code, nested_scales, nested_code, nested_offset), shape, True, tiles)


class NF4MatmulFused(torch.autograd.Function):
    """y = x Wᵀ through the fused kernels, forward and backward; a drop-in for nn/nf4.py's _NF4Matmul:
    `NF4MatmulFused.apply(x, shape, *state)`. W is frozen: only x gets a gradient. Like _NF4Matmul it saves
    just the 4-bit state for backward, and unlike it never holds a dense W at all. Opt-in (module docstring)."""

    @staticmethod
    def forward(ctx, x, shape, *state):
        ctx.shape, ctx.dtype = shape, x.dtype
        ctx.save_for_backward(*state)
        return nf4_matmul_triton(x, *state, shape)

    @staticmethod
    def backward(ctx, grad_out):
        state = ctx.saved_tensors
        grad_x = nf4_matmul_t_triton(grad_out.to(ctx.dtype), *state, ctx.shape) if ctx.needs_input_grad[0] else None
        return grad_x, None, *(None for _ in state)
