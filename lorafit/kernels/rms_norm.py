"""Fused RMSNorm, and the residual add fused with the next RMSNorm, as Triton kernels.

Specification: reference.rms_norm / reference.add_rms_norm (normalise in float32, cast to x's dtype, then
multiply by the weight, in x's dtype too). The forward saves the per-row 1/rms in float32; the backward
computes grad_x and, only when the weight trains (full fine-tuning; LoRA freezes norms), grad_weight from
per-program float32 partial sums reduced once.

Entry points: `rms_norm` / `add_rms_norm` run the ops lorafit::rms_norm / lorafit::add_rms_norm (Triton on
CUDA, the reference elsewhere; in eager mode on CUDA the same Triton autograd function without the op's
dispatch, see kernels.eager_cuda); `rms_norm_triton` / `add_rms_norm_triton` run the Triton kernels, forward
and backward, on any device (CPU tensors need TRITON_INTERPRET=1): the tests' way in.
"""

import functools

import torch
from torch import Tensor

from . import eager_cuda, reference

try:  # CUDA builds of torch bring Triton; CPU-only installs have just the reference path
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# The widest row one program holds in registers: Llama 3.1 405B's hidden size. At 32 warps that is 16
# float32 values per thread per live tensor, and the backward already spills a little (136 bytes a thread,
# compiled for sm_90); wider rows would need a two-pass kernel.
MAX_COLUMNS = 16384
# Short rows share a program until its tile holds this many values: q/k norms have C = 128, and one such
# row per program would leave most lanes of its warps idle.
_TILE_VALUES = 4096
# Backward programs per SM when the weight needs a gradient, each looping over rows and writing one float32
# partial row: as many as fit at once (a 16-warp program at 64 registers a thread takes half of an SM's
# 64k). At C = 4096 on 132 SMs: 264 partial rows, 4.3 MB, against 100 MB of activations for N = 4096.
_WEIGHT_GRAD_PROGRAMS_PER_SM = 2
# Off CUDA (Triton's interpreter) 2 programs are enough to exercise the partial sums and their reduction.
_OTHER_DEVICE_PROGRAMS = 2


if triton is not None:

    @triton.jit
    def _forward_kernel(
        x_ptr, residual_ptr, weight_ptr, out_ptr, total_ptr, rstd_ptr,
        n_rows, n_cols, x_stride, residual_stride, out_stride, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (R,)
        cols = tl.arange(0, BLOCK_C)  # (BC,)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & (cols < n_cols)[None, :]  # (R, BC)
        rows64 = rows.to(tl.int64)[:, None]  # N * C may pass 2**31
        x = tl.load(x_ptr + rows64 * x_stride + cols[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            residual = tl.load(residual_ptr + rows64 * residual_stride + cols[None, :], mask=mask, other=0.0)
            # Rounded to the activation dtype before normalising, as the reference's `x + residual` is.
            x = (x.to(tl.float32) + residual.to(tl.float32)).to(total_ptr.dtype.element_ty)
            tl.store(total_ptr + rows64 * n_cols + cols[None, :], x, mask=mask)
        x = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)  # (R,)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)
        weight = tl.load(weight_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        normed = (x * rstd[:, None]).to(out_ptr.dtype.element_ty).to(tl.float32)  # the reference's cast
        out = (normed * weight[None, :]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows64 * out_stride + cols[None, :], out, mask=mask)

    @triton.jit
    def _backward_kernel(
        grad_out_ptr, grad_total_ptr, x_ptr, weight_ptr, rstd_ptr, grad_x_ptr, weight_partial_ptr,
        n_rows, n_cols, n_blocks, grad_out_stride, grad_total_stride, x_stride,
        HAS_GRAD_TOTAL: tl.constexpr, WEIGHT_GRAD: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < n_cols
        weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        weight_grad = tl.zeros((BLOCK_C,), dtype=tl.float32)
        # Program p takes row blocks p, p + P, p + 2P, ... (a while loop: Triton's interpreter cannot run
        # a `for` over a runtime bound with NumPy 2).
        block = pid
        while block < n_blocks:
            rows = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
            row_ok = rows < n_rows
            mask = row_ok[:, None] & col_ok[None, :]
            rows64 = rows.to(tl.int64)[:, None]
            x = tl.load(x_ptr + rows64 * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            grad_out = tl.load(grad_out_ptr + rows64 * grad_out_stride + cols[None, :], mask=mask, other=0.0)
            grad_out = grad_out.to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            normed = x * rstd[:, None]
            grad_normed = grad_out * weight[None, :]
            # d(x * rstd)/dx applied to g: rstd * (g - normed * mean(g * normed)), per row.
            mean_dot = tl.sum(grad_normed * normed, axis=1) / n_cols
            grad_x = (grad_normed - normed * mean_dot[:, None]) * rstd[:, None]
            if HAS_GRAD_TOTAL:  # add_rms_norm: the residual stream's own gradient joins the normed path's
                grad_total = tl.load(grad_total_ptr + rows64 * grad_total_stride + cols[None, :], mask=mask, other=0.0)
                grad_x += grad_total.to(tl.float32)
            tl.store(grad_x_ptr + rows64 * n_cols + cols[None, :], grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
            if WEIGHT_GRAD:  # the weight multiplied the normed rows after their cast: use the cast values
                weight_grad += tl.sum(grad_out * normed.to(x_ptr.dtype.element_ty).to(tl.float32), axis=0)
            block += tl.num_programs(0)
        if WEIGHT_GRAD:
            tl.store(weight_partial_ptr + pid * n_cols + cols, weight_grad, mask=col_ok)


def _launch_config(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """-> (BLOCK_ROWS, BLOCK_C, num_warps) for an (n_rows, n_cols) input."""
    if n_cols > MAX_COLUMNS:
        raise ValueError(f"the rms_norm kernels take rows of at most {MAX_COLUMNS} values, got {n_cols}")
    block_c = triton.next_power_of_2(n_cols)
    block_rows = min(max(1, _TILE_VALUES // block_c), triton.next_power_of_2(n_rows))
    # 8 values per thread per live tensor (one 16-byte bf16 vector): 16 warps for a 4096-value tile. The
    # backward then needs 64 registers a thread (sm_90), against 124 at 16 values (8 warps): twice the
    # resident warps to hide memory latency.
    return block_rows, block_c, min(32, max(4, block_rows * block_c // 256))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _rows(t: Tensor) -> Tensor:
    """(..., C) -> (N, C) with unit column stride: a view when the layout allows it, else a copy."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(x: Tensor, weight: Tensor, residual: Tensor | None = None) -> None:
    if weight.dtype != x.dtype or (residual is not None and residual.dtype != x.dtype):
        raise ValueError(f"rms_norm expects x, residual and weight in one dtype, got {x.dtype} and {weight.dtype}")
    if weight.shape != x.shape[-1:] or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} or residual does not fit x {tuple(x.shape)}")


def _forward(x, residual, weight, eps, spare_columns: int = 0):
    """Triton. -> (normed (..., C + spare_columns), total or None, rstd (...,) float32), all new tensors; the
    spare columns are left unset."""
    if triton is None:
        raise RuntimeError("the Triton path needs the triton package (pip install triton)")
    _check(x, weight, residual)
    x2 = _rows(x)  # (N, C)
    n_rows, n_cols = x2.shape
    out = torch.empty(*x.shape[:-1], n_cols + spare_columns, dtype=x.dtype, device=x.device)
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return out, total, rstd
    residual2 = _rows(residual) if residual is not None else x2
    block_rows, block_c, num_warps = _launch_config(n_rows, n_cols)
    _forward_kernel[(triton.cdiv(n_rows, block_rows),)](
        x2, residual2, weight, out, total if total is not None else out, rstd,
        n_rows, n_cols, x2.stride(0), residual2.stride(0), n_cols + spare_columns, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=num_warps,
    )
    return out, total, rstd


def _backward(grad_out, grad_total, x, weight, rstd, weight_needs_grad: bool):
    """Triton. x is what was normalised (the total, for add_rms_norm); grad_out's rows may be wider than x's
    (spare columns, whose grads are not read). -> (grad_x, grad_weight or None)."""
    grad_out2, x2 = _rows(grad_out), _rows(x)  # (N, C)
    n_rows, n_cols = x2.shape
    grad_total2 = _rows(grad_total) if grad_total is not None else grad_out2
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return grad_x, torch.zeros_like(weight) if weight_needs_grad else None
    block_rows, block_c, num_warps = _launch_config(n_rows, n_cols)
    n_blocks = n_programs = triton.cdiv(n_rows, block_rows)
    if weight_needs_grad and x.device.type == "cuda":
        n_programs = min(n_blocks, _sm_count(x.device.index or 0) * _WEIGHT_GRAD_PROGRAMS_PER_SM)
    elif weight_needs_grad:
        n_programs = min(n_blocks, _OTHER_DEVICE_PROGRAMS)
    partials = torch.empty((n_programs if weight_needs_grad else 0, n_cols), dtype=torch.float32, device=x.device)
    _backward_kernel[(n_programs,)](
        grad_out2, grad_total2, x2, weight, rstd, grad_x, partials,
        n_rows, n_cols, n_blocks, grad_out2.stride(0), grad_total2.stride(0), x2.stride(0),
        HAS_GRAD_TOTAL=grad_total is not None, WEIGHT_GRAD=weight_needs_grad,
        BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=num_warps,
    )
    return grad_x, partials.sum(0).to(weight.dtype) if weight_needs_grad else None


class _AddRMSNormTriton(torch.autograd.Function):
    """The Triton path with autograd; residual None is plain rms_norm (its total output is then None)."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps, spare_columns):
        out, total, rstd = _forward(x, residual, weight, eps, spare_columns)
        ctx.save_for_backward(x if total is None else total, weight, rstd)
        return out, total

    @staticmethod
    def backward(ctx, grad_out, grad_total):
        normalised, weight, rstd = ctx.saved_tensors
        grad, grad_weight = _backward(grad_out, grad_total, normalised, weight, rstd, ctx.needs_input_grad[2])
        return grad, grad if ctx.needs_input_grad[1] else None, grad_weight, None, None


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float, spare_columns: int = 0) -> Tensor:
    """reference.rms_norm through the Triton kernels, forward and backward, on any device (spare_columns: see
    `rms_norm`)."""
    return _AddRMSNormTriton.apply(x, None, weight, eps, spare_columns)[0]


def add_rms_norm_triton(x: Tensor, residual: Tensor, weight: Tensor, eps: float, spare_columns: int = 0):
    """reference.add_rms_norm through the Triton kernels: -> (rms_norm(x + residual), x + residual)."""
    return _AddRMSNormTriton.apply(x, residual, weight, eps, spare_columns)


# ---- the ops: torch.compile, the meta device and FSDP2 see through them ----


def _reference_rstd(x: Tensor, eps: float) -> Tensor:
    return torch.rsqrt(x.float().pow(2).mean(-1) + eps)  # (...,) float32, as the reference computes it


@torch.library.custom_op("lorafit::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """-> (normed, rstd). Non-CUDA devices run the reference."""
    return reference.rms_norm(x, weight, eps), _reference_rstd(x, eps)


@_rms_norm_op.register_kernel("cuda")
def _(x, weight, eps):
    out, _, rstd = _forward(x, None, weight, eps)
    return out, rstd


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("lorafit::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> (normed, total, rstd). Non-CUDA devices run the reference."""
    out, total = reference.add_rms_norm(x, residual, weight, eps)
    return out, total, _reference_rstd(total, eps)


@_add_rms_norm_op.register_kernel("cuda")
def _(x, residual, weight, eps):
    return _forward(x, residual, weight, eps)


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return out, torch.empty_like(out), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("lorafit::rms_norm_backward", mutates_args=())
def _backward_op(
    grad_out: Tensor, grad_total: Tensor | None, x: Tensor, weight: Tensor, rstd: Tensor, weight_needs_grad: bool
) -> tuple[Tensor, Tensor]:
    """-> (grad_x, grad_weight), grad_weight empty when not needed (an op cannot return None). Non-CUDA
    devices run the reference's autograd, written out op for op in the same dtypes (autograd cannot run
    inside an op)."""
    normed32 = x.float() * rstd[..., None]
    grad_normed = (grad_out * weight).float()  # `weight * normed` backward, in the activation dtype
    mean_dot = (grad_normed * normed32).mean(-1, keepdim=True)
    grad_x = (rstd[..., None] * (grad_normed - normed32 * mean_dot)).to(x.dtype)
    if grad_total is not None:
        grad_x = grad_x + grad_total
    if not weight_needs_grad:
        return grad_x, weight.new_empty(0)
    return grad_x, (grad_out * normed32.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0)


@_backward_op.register_kernel("cuda")
def _(grad_out, grad_total, x, weight, rstd, weight_needs_grad):
    grad_x, grad_weight = _backward(grad_out, grad_total, x, weight, rstd, weight_needs_grad)
    return grad_x, grad_weight if grad_weight is not None else weight.new_empty(0)


@_backward_op.register_fake
def _(grad_out, grad_total, x, weight, rstd, weight_needs_grad):
    grad_weight = weight.new_empty(weight.shape if weight_needs_grad else (0,))
    return torch.empty_like(x, memory_format=torch.contiguous_format), grad_weight


def _setup_rms_norm(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], output[1])  # x, weight, rstd
    ctx.mark_non_differentiable(output[1])


def _rms_norm_backward(ctx, grad_out, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_weight = _backward_op(grad_out, None, x, weight, rstd, ctx.needs_input_grad[1])
    return grad_x, grad_weight if ctx.needs_input_grad[1] else None, None


def _setup_add_rms_norm(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[2], output[2])  # total, weight, rstd
    ctx.mark_non_differentiable(output[2])


def _add_rms_norm_backward(ctx, grad_out, grad_total, _grad_rstd):
    total, weight, rstd = ctx.saved_tensors
    grad, grad_weight = _backward_op(grad_out, grad_total, total, weight, rstd, ctx.needs_input_grad[2])
    return grad, grad, grad_weight if ctx.needs_input_grad[2] else None, None


_rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_setup_rms_norm)
_add_rms_norm_op.register_autograd(_add_rms_norm_backward, setup_context=_setup_add_rms_norm)


def rms_norm(x: Tensor, weight: Tensor, eps: float, spare_columns: int = 0) -> Tensor:
    """reference.rms_norm as the op lorafit::rms_norm. x: (..., C); weight: (C,) in x's dtype.

    spare_columns (eager CUDA only): the result is (..., C + spare_columns), the normed rows followed by that
    many unset columns, for the next function to fill without copying the rows into a wider matrix (the
    fused LoRA functions write x A^T there: kernels/lora_stacked.py); the grads of those columns are ignored."""
    _check(x, weight)
    if eager_cuda(x):
        return _AddRMSNormTriton.apply(x, None, weight, eps, spare_columns)[0]
    _no_spare_columns(spare_columns)
    return _rms_norm_op(x, weight, eps)[0]


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float, spare_columns: int = 0):
    """reference.add_rms_norm as the op lorafit::add_rms_norm: -> (rms_norm(x + residual), x + residual);
    spare_columns as in `rms_norm`."""
    _check(x, weight, residual)
    if eager_cuda(x):
        return _AddRMSNormTriton.apply(x, residual, weight, eps, spare_columns)
    _no_spare_columns(spare_columns)
    out, total, _ = _add_rms_norm_op(x, residual, weight, eps)
    return out, total


def _no_spare_columns(spare_columns: int) -> None:
    if spare_columns:
        raise ValueError("spare_columns needs the eager CUDA path (the ops return rows of C columns)")
