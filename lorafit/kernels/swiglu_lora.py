"""The LoRA MLP's SwiGLU stage as two Triton kernels, h = silu(gate) * up, y = down(h) with LoRA on down.

Forward: [h | h A_down^T] (N, I + r) in one kernel, so that down is one GEMM over [W_down | s B_down] (the
K-concatenation kernels/lora_mlp.py uses for gate and up): composed, h was written, read again for h A^T, and
y read and written again for the update. 8B's MLP forward from [gate | up] to y: 0.71 ms against 0.74
(0.52 of it the GEMM), 1B's 0.26 against 0.27 (H200, benchmarks/swiglu_lora.py, device call 37).

Backward: what it needs between its two big GEMMs (before it [grad h | dy_b] = dy [W_down | s B_down], after
it grad x = [dgate | dup] [W_gate; W_up]):

    grad h   = dy W_down + dy_b A_down           (N, I)   the down adapter's share added
    grad A_down = dy_b^T h                        (r, I)   h recomputed from gate and up, never kept
    dgate, dup  = the SwiGLU backward of grad h   (N, I) each
    grad B_gate = dgate^T (x A_gate^T), grad B_up = dup^T (x A_up^T)   (I, r) each, when gate and up are
                                                  LoRA layers of the same function (kernels/lora_mlp.py)

Composed, these are five passes over (N, I) tensors besides the SwiGLU backward's own: h written and read
again, grad h read and written by the adapter's add, dgate and dup read again by the grad B products (~0.9 GB
a layer at Llama-3.1-8B's 4096 tokens). Here one kernel reads gate, up and dy W_down once and writes dgate
and dup once; the small products ride along on the tensor cores (K = r or the block of rows). On an H200 the
MLP's backward from dy to [dgate | dup] then takes 0.87 ms instead of 1.08 at 8B's shape and 0.36 instead of
0.47 at 1B's (benchmarks/swiglu_lora.py, device call 36). With both kernels Llama-3.1-8B's speed mode went
from 1.06x Unsloth's tokens/s to 1.09x (LoRA) and 1.07x (QLoRA), each against Unsloth in its own call (24,
38). Each program owns a block of I columns over a range of rows, so the (r, I) and (I, r) sums need no
atomics: the row ranges' partial sums go to a float32 buffer and are added up after, in a fixed order (the
same grads on every run, as CUDA graph replays and the tests want).

Specification: reference_backward, which is also the CPU path's math (kernels/lora_mlp.py composes it from
cuBLAS/MKL products when this kernel does not apply: no CUDA, float32, or r > 64).
"""

import torch
import torch.nn.functional as F

from . import eager_cuda, product_in_float32

try:  # CUDA builds of torch bring Triton; CPU-only installs have just the reference path
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# Tiles of 16 rows x 64 columns, 4 warps, the compiler's loads 3 steps ahead, ~16 programs per SM: the best
# of 48 tilings on an H200 at both anchor shapes (benchmarks/swiglu_lora.py --sweep, device calls 33
# and 36): Llama-3.1-8B's MLP backward 0.87 ms against 1.08 composed (0.60 of it the dy W_down GEMM), 1B's
# 0.36 against 0.47. Ranks pad to 16, tl.dot's smallest side. Rank-1 updates on the CUDA cores instead of
# the tl.dot for the adapter's share of grad h were slower in every tiling. Where the backward kernel's time
# goes at 8B's shape (call 62): 250 us, against 152 for a plain SwiGLU backward of the same tensors (3.87 TB/s)
# and 162 for this kernel without its small products; the grad B products cost ~70 us of it, grad h's
# adapter share and grad A ~25. The tile transposed, (columns, rows), so that the three products take the
# big operand as A, ran 297-500 us (call 65); small products loaded transposed by tl.trans, 286-427.
_BLOCK_N, _BLOCK_I, _NUM_WARPS, _NUM_STAGES = 16, 64, 4, 3
_PROGRAMS_PER_SM = 16
_FORWARD_BLOCK_N, _FORWARD_BLOCK_I, _FORWARD_NUM_WARPS = 16, 128, 4
_MAX_RANK = 64


if triton is not None:

    @triton.jit
    def _kernel(
        grad_h_ptr, dy_b_ptr, a_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, down_gate_ptr, down_up_ptr,
        partial_a_ptr, partial_b_gate_ptr, partial_b_up_ptr,
        N, I, r, rows_per_program,
        stride_grad_h, stride_dy_b, stride_a, stride_gate, stride_up, stride_grad_gate, stride_grad_up,
        stride_down_gate, stride_down_up,
        HAS_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, R: tl.constexpr,
    ):
        block, split = tl.program_id(0), tl.program_id(1)
        cols = block * BLOCK_I + tl.arange(0, BLOCK_I)  # (BI,)
        ranks = tl.arange(0, R)  # (R,)
        col_ok, rank_ok = cols < I, ranks < r
        a = tl.load(a_ptr + ranks[:, None] * stride_a + cols[None, :],
                    mask=rank_ok[:, None] & col_ok[None, :], other=0.0)  # (R, BI): A_down's columns
        # The three (r, BI) sums, each a small matrix times a (BN, BI) tile that stays in its own layout (the
        # small ones are loaded transposed: no layout change of a large tile through shared memory).
        acc_a = tl.zeros((R, BLOCK_I), dtype=tl.float32)
        acc_b_gate = tl.zeros((R, BLOCK_I), dtype=tl.float32)
        acc_b_up = tl.zeros((R, BLOCK_I), dtype=tl.float32)
        first = split * rows_per_program
        last = tl.minimum(first + rows_per_program, N)
        # The large tiles are loaded one step ahead, by hand (the compiler's pipelining takes only the loads
        # that feed a tl.dot directly): 3% faster at Llama-3.1-8B's shape, 3% at 1B's (device call 36).
        rows = (first + tl.arange(0, BLOCK_N)).to(tl.int64)  # N * I passes 2**31 at long contexts
        tile_ok = (rows < last)[:, None] & col_ok[None, :]
        next_grad_h = tl.load(grad_h_ptr + rows[:, None] * stride_grad_h + cols[None, :], mask=tile_ok, other=0.0)
        next_gate = tl.load(gate_ptr + rows[:, None] * stride_gate + cols[None, :], mask=tile_ok, other=0.0)
        next_up = tl.load(up_ptr + rows[:, None] * stride_up + cols[None, :], mask=tile_ok, other=0.0)
        for start in range(first, last, BLOCK_N):
            rows = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
            row_ok = rows < last
            tile_ok = row_ok[:, None] & col_ok[None, :]
            grad_h, gate, up = next_grad_h, next_gate, next_up
            ahead = rows + BLOCK_N
            ahead_ok = (ahead < last)[:, None] & col_ok[None, :]
            next_grad_h = tl.load(grad_h_ptr + ahead[:, None] * stride_grad_h + cols[None, :], mask=ahead_ok,
                                  other=0.0)
            next_gate = tl.load(gate_ptr + ahead[:, None] * stride_gate + cols[None, :], mask=ahead_ok, other=0.0)
            next_up = tl.load(up_ptr + ahead[:, None] * stride_up + cols[None, :], mask=ahead_ok, other=0.0)

            low_ok = row_ok[:, None] & rank_ok[None, :]  # (BN, R)
            low_t_ok = rank_ok[:, None] & row_ok[None, :]  # (R, BN)
            dy_b = tl.load(dy_b_ptr + rows[:, None] * stride_dy_b + ranks[None, :], mask=low_ok, other=0.0)
            dy_b_t = tl.load(dy_b_ptr + ranks[:, None] + rows[None, :] * stride_dy_b, mask=low_t_ok, other=0.0)
            grad_h = grad_h.to(tl.float32) + tl.dot(dy_b, a)  # (BN, BI): the adapter's share added
            gate, up = gate.to(tl.float32), up.to(tl.float32)
            sigmoid = tl.sigmoid(gate)
            silu = gate * sigmoid
            acc_a += tl.dot(dy_b_t, (silu * up).to(dy_b_t.dtype))  # (R, BI): dy_b^T h
            # d silu / d gate = sigmoid * (1 + gate * (1 - sigmoid))
            grad_gate = (grad_h * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))).to(grad_gate_ptr.dtype.element_ty)
            grad_up = (grad_h * silu).to(grad_up_ptr.dtype.element_ty)
            tl.store(grad_gate_ptr + rows[:, None] * stride_grad_gate + cols[None, :], grad_gate, mask=tile_ok)
            tl.store(grad_up_ptr + rows[:, None] * stride_grad_up + cols[None, :], grad_up, mask=tile_ok)
            if HAS_B:  # (x A_gate^T)^T dgate and (x A_up^T)^T dup, from the rounded grads
                down_gate_t = tl.load(down_gate_ptr + ranks[:, None] + rows[None, :] * stride_down_gate,
                                      mask=low_t_ok, other=0.0)  # (R, BN)
                down_up_t = tl.load(down_up_ptr + ranks[:, None] + rows[None, :] * stride_down_up, mask=low_t_ok,
                                    other=0.0)
                acc_b_gate += tl.dot(down_gate_t, grad_gate)
                acc_b_up += tl.dot(down_up_t, grad_up)
        out = split * R * I + ranks[:, None] * I + cols[None, :]  # (splits, R, I) partial sums
        out_ok = rank_ok[:, None] & col_ok[None, :]
        tl.store(partial_a_ptr + out, acc_a, mask=out_ok)
        if HAS_B:
            tl.store(partial_b_gate_ptr + out, acc_b_gate, mask=out_ok)
            tl.store(partial_b_up_ptr + out, acc_b_up, mask=out_ok)


if triton is not None:

    @triton.jit
    def _forward_kernel(
        gate_ptr, up_ptr, a_ptr, out_ptr, partial_ptr, N, I, r, cols_per_program,
        stride_gate, stride_up, stride_a, stride_out,
        BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, R: tl.constexpr,
    ):
        block, split = tl.program_id(0), tl.program_id(1)
        rows = (block * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BN,)
        ranks = tl.arange(0, R)
        row_ok, rank_ok = rows < N, ranks < r
        acc = tl.zeros((BLOCK_N, R), dtype=tl.float32)  # h A^T over this program's columns
        first = split * cols_per_program
        last = tl.minimum(first + cols_per_program, I)
        cols = first + tl.arange(0, BLOCK_I)
        tile_ok = row_ok[:, None] & (cols < last)[None, :]
        next_gate = tl.load(gate_ptr + rows[:, None] * stride_gate + cols[None, :], mask=tile_ok, other=0.0)
        next_up = tl.load(up_ptr + rows[:, None] * stride_up + cols[None, :], mask=tile_ok, other=0.0)
        for start in range(first, last, BLOCK_I):  # the large tiles loaded one step ahead, as in _kernel
            cols = start + tl.arange(0, BLOCK_I)
            col_ok = cols < last
            tile_ok = row_ok[:, None] & col_ok[None, :]
            gate, up = next_gate.to(tl.float32), next_up.to(tl.float32)
            ahead_ok = row_ok[:, None] & (cols + BLOCK_I < last)[None, :]
            next_gate = tl.load(gate_ptr + rows[:, None] * stride_gate + (cols + BLOCK_I)[None, :], mask=ahead_ok,
                                other=0.0)
            next_up = tl.load(up_ptr + rows[:, None] * stride_up + (cols + BLOCK_I)[None, :], mask=ahead_ok,
                              other=0.0)
            h = (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty)  # (BN, BI)
            tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], h, mask=tile_ok)
            a_t = tl.load(a_ptr + ranks[None, :] * stride_a + cols[:, None], mask=col_ok[:, None] & rank_ok[None, :],
                          other=0.0)  # (BI, R): A_down's columns, transposed
            acc += tl.dot(h, a_t)
        out = split * N * R + rows[:, None] * R + ranks[None, :]  # (splits, N, R) partial sums
        tl.store(partial_ptr + out, acc, mask=row_ok[:, None] & rank_ok[None, :])


def can_run(gate: torch.Tensor, r: int) -> bool:
    """The kernel's cases: a 16-bit dtype (its small products run on the tensor cores in it), r <= 64."""
    return triton is not None and gate.dtype in (torch.bfloat16, torch.float16) and r <= _MAX_RANK


def _splits(N: int, col_blocks: int, device: torch.device) -> int:
    """Row ranges per column block: enough programs for _PROGRAMS_PER_SM per SM (memory-bound: many loads in
    flight; 8B's I = 14336 gives 224 column blocks, 1B's 8192 only 128 for 132 SMs), each >= 8 row blocks."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(triton.cdiv(_PROGRAMS_PER_SM * sms, col_blocks), N // (8 * _BLOCK_N)))


def swiglu_lora_backward(grad_h, dy_b, a_down, gate, up, grad_gate, grad_up, down_gate=None, down_up=None):
    """Triton (CPU tensors need TRITON_INTERPRET=1). (N, I) row-major views (unit column stride) for grad_h
    (= dy W_down), gate, up and the outputs grad_gate, grad_up (which may be halves of one buffer, and may be
    gate and up themselves: each program reads a tile before it writes that tile's grads); dy_b (N, r),
    a_down (r, I); down_gate, down_up (N, r) or None. Writes dgate and dup; returns grad A_down (r, I) and, with
    down_gate and down_up, (grad B_gate, grad B_up) (I, r) each, unscaled, all float32. See reference_backward."""
    N, I = gate.shape
    r = a_down.shape[0]
    has_b = down_gate is not None
    R = max(16, triton.next_power_of_2(r))
    col_blocks = triton.cdiv(I, _BLOCK_I)
    splits = _splits(N, col_blocks, gate.device)
    rows_per_program = triton.cdiv(triton.cdiv(N, splits), _BLOCK_N) * _BLOCK_N
    splits = max(1, triton.cdiv(N, rows_per_program))
    f32 = dict(dtype=torch.float32, device=gate.device)
    partial_a = torch.empty(splits, R, I, **f32)  # rows >= r stay unwritten, never read
    partial_b_gate = torch.empty(splits, R, I, **f32) if has_b else partial_a
    partial_b_up = torch.empty(splits, R, I, **f32) if has_b else partial_a
    low = (down_gate, down_up) if has_b else (dy_b, dy_b)  # placeholders the kernel never reads
    if N > 0:
        _kernel[(col_blocks, splits)](
            grad_h, dy_b, a_down, gate, up, grad_gate, grad_up, *low, partial_a, partial_b_gate, partial_b_up,
            N, I, r, rows_per_program,
            grad_h.stride(0), dy_b.stride(0), a_down.stride(0), gate.stride(0), up.stride(0), grad_gate.stride(0),
            grad_up.stride(0), low[0].stride(0), low[1].stride(0),
            HAS_B=has_b, BLOCK_N=_BLOCK_N, BLOCK_I=_BLOCK_I, R=R, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
        )
    else:
        partial_a.zero_(), partial_b_gate.zero_(), partial_b_up.zero_()
    grad_a = partial_a[:, :r].sum(0)  # (r, I)
    if not has_b:
        return grad_a, None
    return grad_a, (partial_b_gate[:, :r].sum(0).t(), partial_b_up[:, :r].sum(0).t())  # (I, r) each


def swiglu_lora_forward(gate, up, a_down, out) -> None:
    """Triton (CPU tensors need TRITON_INTERPRET=1). gate, up (N, I) row-major views, a_down (r, I), out
    (N, >= I + r): writes [h | h A_down^T] into out's first I + r columns, h = silu(gate) * up in out's dtype
    and the product from the rounded h, as the composed path multiplies the stored h. See reference_forward."""
    N, I = gate.shape
    r = a_down.shape[0]
    R = max(16, triton.next_power_of_2(r))
    row_blocks = triton.cdiv(N, _FORWARD_BLOCK_N)
    sms = torch.cuda.get_device_properties(gate.device).multi_processor_count if gate.is_cuda else 1
    # Column ranges per row block: ~_PROGRAMS_PER_SM programs per SM (4096 rows are only 256 row blocks)
    splits = max(1, min(triton.cdiv(_PROGRAMS_PER_SM * sms, row_blocks), I // (8 * _FORWARD_BLOCK_I)))
    cols_per_program = triton.cdiv(triton.cdiv(I, splits), _FORWARD_BLOCK_I) * _FORWARD_BLOCK_I
    splits = max(1, triton.cdiv(I, cols_per_program))
    partial = torch.zeros(splits, N, R, dtype=torch.float32, device=gate.device)
    if N > 0 and I > 0:
        _forward_kernel[(row_blocks, splits)](
            gate, up, a_down, out, partial, N, I, r, cols_per_program,
            gate.stride(0), up.stride(0), a_down.stride(0), out.stride(0),
            BLOCK_N=_FORWARD_BLOCK_N, BLOCK_I=_FORWARD_BLOCK_I, R=R, num_warps=_FORWARD_NUM_WARPS,
            num_stages=_NUM_STAGES,
        )
    out[:, I:I + r] = partial[:, :, :r].sum(0)  # (N, r), rounded once


def reference_forward(gate, up, a_down):
    """The specification: -> [h | h A_down^T] (N, I + r) in gate's dtype, h rounded before the product."""
    h = (F.silu(gate.float()) * up.float()).to(gate.dtype)
    return torch.cat([h, (h.float() @ a_down.float().t()).to(gate.dtype)], dim=-1)


def reference_backward(grad_h, dy_b, a_down, gate, up, down_gate=None, down_up=None):
    """The specification, in float32: -> (grad_gate, grad_up) in gate's dtype, grad A_down (r, I) and, with
    down_gate and down_up, (grad B_gate, grad B_up) (I, r), float32. The grad B products take the rounded
    dgate and dup, as the composed path (which multiplies the stored grads) does."""
    gate32, up32 = gate.float(), up.float()
    grad_h = grad_h.float() + dy_b.float() @ a_down.float()
    silu = F.silu(gate32)
    grad_a = dy_b.float().t() @ (silu * up32)
    grad_gate = torch.ops.aten.silu_backward(grad_h * up32, gate32).to(gate.dtype)
    grad_up = (grad_h * silu).to(gate.dtype)
    grad_b = None
    if down_gate is not None:
        grad_b = (grad_gate.float().t() @ down_gate.float(), grad_up.float().t() @ down_up.float())
    return grad_gate, grad_up, grad_a, grad_b


def applies(gate: torch.Tensor, r: int) -> bool:
    """Whether the LoRA functions take the kernel: CUDA outside torch.compile (kernels.eager_cuda), can_run."""
    return eager_cuda(gate) and can_run(gate, r)


def down_and_swiglu_backward(dy, weight, a_w, b_w, down_a, scaling: float, gate, up, grad_gate, grad_up):
    """The backward of y = lora_linear(silu(gate) * up) (the down projection, dense weight (C, I), a_w (r, I),
    b_w = s B (C, r), down_a = h A^T (N, r) from forward) through the SwiGLU: dy (N, C) -> writes dgate, dup
    into grad_gate, grad_up; returns (grad A_down, grad B_down), float32."""
    dy = dy.to(gate.dtype)
    dy_b = dy @ b_w  # (N, r)
    grad_h = dy @ weight  # (N, I): the base's share; the kernel adds the adapter's
    grad_a, _ = swiglu_lora_backward(grad_h, dy_b, a_w, gate, up, grad_gate, grad_up)
    del grad_h
    grad_b = product_in_float32(dy.t(), down_a).mul_(scaling)  # (C, r)
    return grad_a, grad_b
