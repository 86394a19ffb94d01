"""NF4 dequantisation as a Triton kernel: the 4-bit weight of an NF4Linear read back as a dense tensor.

Specification: lorafit.nn.nf4.dequantize_nf4 (bitsandbytes' format: blocks of 64 values, two 4-bit code
indices a byte with the first in the high nibble, one absmax a block, stored as float32 or, with double
quantisation, as a uint8 code into the 256-entry dynamic code times a float32 scale per 256 blocks plus a
float32 offset). The kernel is bit-identical to it: float32 throughout, one rounding on store, and no fused
multiply-add. The nested absmax is `code * scale` then `+ offset`, two float32 roundings as in PyTorch; an
FMA would round once and change the last bit of some absmax values, hence of whole blocks of weights. The
launch passes enable_fp_fusion=False, which makes Triton's LLVM step emit mul.rn / add.rn (never contracted)
and ptxas run with --fmad=false, so no contraction can happen anywhere in this kernel.

Entry points: the op lorafit::nf4_dequantize runs `dequantize_nf4_triton` on CUDA tensors (nn/nf4.py
registers it, importing this module on first use: this module imports nn/nf4.py's constants);
`dequantize_nf4_triton` runs the kernel on any device (CPU tensors need TRITON_INTERPRET=1): the tests' way in.

Speed. The kernel is bound by memory traffic: per value it reads half a byte of codes (and 1/64 byte of
absmax code) and writes 2 (bf16 / fp16) or 4 (fp32) bytes. A 4096 x 14336 weight (58.7 M values) in bf16 is
29.4 MB + 0.9 MB read and 117.4 MB written: 148 MB, 37 us at 4 TB/s (31 us at the H200's 4.8 TB/s peak);
in fp32, 265 MB, 66 us.
"""

import math
from collections.abc import Sequence

import torch

from ..nn.nf4 import BLOCK_SIZE, COMPUTE_DTYPES, NESTED_BLOCK_SIZE

try:  # CUDA builds of torch bring Triton; CPU-only installs have just the reference path
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# NF4 blocks per program: 64 blocks = 2048 code bytes in, 4096 values out (8 KB of bf16). Over 4 warps each
# thread loads one 16-byte vector of codes and writes 32 values (four 16-byte vectors of bf16). A
# 4096 x 14336 weight then takes 14336 programs, ~109 per SM of the H200's 132: enough to keep loads in
# flight. 64 divides the 256 blocks of a nested scale, so a program never straddles two scales. Compiled
# for sm_90 (Triton 3.6): 40 registers a thread for bf16 output (48 for fp32), no spills.
_BLOCKS_PER_PROGRAM = 64
# Compile options of every launch. enable_fp_fusion=False: no FMA anywhere (see the module docstring).
_LAUNCH_OPTIONS = {"num_warps": 4, "enable_fp_fusion": False}
_CODE_SIZE, _NESTED_CODE_SIZE = 16, 256


if triton is not None:

    @triton.jit
    def _dequantize_kernel(
        packed_ptr, absmax_ptr, code_ptr, nested_scales_ptr, nested_code_ptr, nested_offset_ptr, out_ptr,
        n_values, n_bytes, n_blocks, n_cols, row_stride,
        NESTED: tl.constexpr, BLOCKS: tl.constexpr, BLOCK_SIZE: tl.constexpr, NESTED_BLOCK_SIZE: tl.constexpr,
        ROW_STRIDED: tl.constexpr, TWO_ROWS: tl.constexpr,
    ):
        BYTES: tl.constexpr = BLOCK_SIZE // 2  # code bytes per NF4 block
        # The program's first block, as a 64-bit scalar folded into the pointers (a weight may pass 2**31
        # values); offsets within the program stay 32-bit.
        first_block = tl.program_id(0).to(tl.int64) * BLOCKS
        blocks = tl.arange(0, BLOCKS)  # (B,) this program's NF4 blocks
        block_ok = blocks < n_blocks - first_block
        if NESTED:
            absmax_code = tl.load(absmax_ptr + first_block + blocks, mask=block_ok, other=0).to(tl.int32)
            # One nested scale covers the whole program (BLOCKS divides NESTED_BLOCK_SIZE): a scalar load.
            tl.static_assert(NESTED_BLOCK_SIZE % BLOCKS == 0)
            nested_scale = tl.load(nested_scales_ptr + first_block // NESTED_BLOCK_SIZE)
            # Two statements, two roundings, as the reference: enable_fp_fusion=False at launch keeps the
            # compiler from contracting them into one FMA.
            absmax = tl.load(nested_code_ptr + absmax_code) * nested_scale
            absmax = absmax + tl.load(nested_offset_ptr)
        else:
            absmax = tl.load(absmax_ptr + first_block + blocks, mask=block_ok, other=0.0)

        # The program's code bytes as one flat row (B*32,), not a (B, 32) tile: the byte load and the code
        # lookups then share one register layout (16 consecutive bytes a thread) and the absmax broadcast
        # stays in registers. Compiled for sm_90, a 2-D tile had 3 layout conversions through shared memory
        # (Triton laid the lookups out along the block axis); this has 1, the store's below.
        byte_offsets = tl.arange(0, BLOCKS * BYTES)
        packed = tl.load(packed_ptr + first_block * BYTES + byte_offsets,
                         mask=byte_offsets < n_bytes - first_block * BYTES, other=0)
        # The 16 code values are looked up by a gather from the 64-byte table, which stays in L1 after the
        # first touch: one L1 access per warp and nibble (~1.8 M warp loads for 58.7 M values, ~7 us of L1
        # time spread over 132 SMs, hidden under the ~37 us of memory traffic). A select network would
        # cost 15 selects per value (8 + 4 + 2 + 1), ~880 M for the same weight, about as long as the memory
        # traffic itself at the H200's ~34 T lane-ops/s. And the table is the layer's (an argument of the
        # op), not constants baked into the kernel.
        high = tl.load(code_ptr + (packed >> 4).to(tl.int32))  # (B*32,) float32: each byte's first value
        low = tl.load(code_ptr + (packed & 15).to(tl.int32))  # (B*32,): its second
        absmax = tl.reshape(tl.broadcast_to(absmax[:, None], (BLOCKS, BYTES)), (BLOCKS * BYTES,))
        values = tl.interleave(high * absmax, low * absmax)  # (B*64,) in memory order
        # Triton passes the values through shared memory (2 KB a program, in rounds) so that each warp's
        # store writes 16-byte vectors side by side.
        value_offsets = tl.arange(0, BLOCKS * BLOCK_SIZE)
        first_value = first_block * BLOCK_SIZE
        if ROW_STRIDED:  # out's rows of n_cols values lie row_stride apart (a block of a wider matrix)
            first_row = first_value // n_cols
            local = (first_value - first_row * n_cols).to(tl.int32) + value_offsets  # from first_row's start
            if TWO_ROWS:  # n_cols >= the program's values: they span two rows at most, and a compare tells
                # which, where a division of every offset by n_cols took 15% of the dequantisation's time (the
                # variants of benchmarks/nf4_dequantize.py, device call 51)
                rows = (local >= n_cols).to(tl.int32)
            else:  # a program's values may span several rows
                rows = local // n_cols
            out_offsets = (first_row + rows) * row_stride + (local - rows * n_cols)
        else:
            out_offsets = first_value + value_offsets
        tl.store(out_ptr + out_offsets, values.to(out_ptr.dtype.element_ty),
                 mask=value_offsets < n_values - first_value)


def _check(packed, absmax, code, nested_scales, nested_code, nested_offset, n_values: int, dtype) -> None:
    """Raises ValueError unless the tensors are one NF4 state of n_values values (see nn/nf4.py)."""
    def expect(name, tensor, tensor_dtype, numel):
        if tensor is None or tensor.dtype != tensor_dtype or tensor.numel() != numel:
            found = "None" if tensor is None else f"{tensor.dtype} with {tensor.numel()} values"
            raise ValueError(f"nf4 dequantize: {name} must be {tensor_dtype} with {numel} values, not {found}")

    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"nf4 dequantize: dtype must be bfloat16, float16 or float32, not {dtype}")
    n_blocks = -(-n_values // BLOCK_SIZE)
    nested = nested_scales is not None or nested_code is not None or nested_offset is not None
    expect("packed", packed, torch.uint8, (n_values + 1) // 2)
    expect("absmax", absmax, torch.uint8 if nested else torch.float32, n_blocks)
    expect("code", code, torch.float32, _CODE_SIZE)
    if nested:
        expect("nested_scales", nested_scales, torch.float32, -(-n_blocks // NESTED_BLOCK_SIZE))
        expect("nested_code", nested_code, torch.float32, _NESTED_CODE_SIZE)
        expect("nested_offset", nested_offset, torch.float32, 1)
    tensors = [t for t in (packed, absmax, code, nested_scales, nested_code, nested_offset) if t is not None]
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"nf4 dequantize: the state is spread over devices {sorted({str(t.device) for t in tensors})}")


def dequantize_nf4_triton(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_scales: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """nn.nf4.dequantize_nf4 through the Triton kernel, bit for bit, on any device: the dense tensor of
    `shape` in `dtype` from packed (ceil(n/2),) uint8, absmax (ceil(n/64),) float32 or uint8 codes, code
    (16,), and with double quantisation nested_scales (ceil(n/16384),), nested_code (256,), nested_offset ()."""
    if triton is None:
        raise RuntimeError("the Triton path needs the triton package (pip install triton)")
    _check(packed, absmax, code, nested_scales, nested_code, nested_offset, math.prod(shape), dtype)
    state = [None if t is None else t.contiguous() for t in (packed, absmax, code, nested_scales, nested_code,
                                                               nested_offset)]
    return launch_dequantize(*state, shape, dtype)


def launch_dequantize(packed, absmax, code, nested_scales, nested_code, nested_offset, shape: Sequence[int],
                      dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel launch alone, for a state already checked and contiguous (an NF4Linear's own, which
    nn/nf4.py dequantises 21 times per decoder layer and micro-batch when activations are offloaded).
    out: a tensor of `shape` and `dtype` to write into, contiguous (a block of rows of a stacked weight) or,
    for a 2-D shape, with rows further apart (a block of a wider matrix: kernels/lora_mlp.py's M)."""
    n_values = math.prod(shape)
    if out is None:
        out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    elif out.shape != tuple(shape) or out.dtype != dtype or not (
            out.is_contiguous() or (out.dim() == 2 and out.stride(1) == 1 and out.stride(0) >= out.shape[1])):
        raise ValueError(f"nf4 dequantize: out must be {dtype} of shape {tuple(shape)}, its rows contiguous")
    if n_values == 0:
        return out
    nested = nested_scales is not None
    # Without double quantisation the kernel never reads the nested pointers; any tensor fills them.
    extra = (nested_scales, nested_code, nested_offset) if nested else (absmax, absmax, absmax)
    n_blocks = absmax.numel()
    _dequantize_kernel[(triton.cdiv(n_blocks, _BLOCKS_PER_PROGRAM),)](
        packed, absmax, code, *extra, out, n_values, packed.numel(), n_blocks, out.shape[-1], out.stride(0),
        NESTED=nested, BLOCKS=_BLOCKS_PER_PROGRAM, BLOCK_SIZE=BLOCK_SIZE, NESTED_BLOCK_SIZE=NESTED_BLOCK_SIZE,
        ROW_STRIDED=not out.is_contiguous(), TWO_ROWS=out.shape[-1] >= _BLOCKS_PER_PROGRAM * BLOCK_SIZE,
        **_LAUNCH_OPTIONS,
    )
    return out
