"""Fused SwiGLU, silu(gate) * up, as Triton kernels.

Specification: reference.swiglu. The forward writes only the product; the backward recomputes silu from
gate, so autograd keeps gate and up (which the projections' backward holds anyway) and never an (N, I)
silu or product, and one kernel returns both gradients. Computed in float32, rounded once on store.

Entry points: `swiglu` runs the op lorafit::swiglu (Triton on CUDA, the reference elsewhere);
`swiglu_triton` runs the Triton kernels, forward and backward, on any device (CPU tensors need
TRITON_INTERPRET=1): the tests' way in.
"""

import torch
import torch.nn.functional as F

from . import eager_cuda, reference

try:  # CUDA builds of torch bring Triton; CPU-only installs have just the reference path
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# Values per program: 1024 over 4 warps is 8 per thread, one 16-byte vector of bf16 per tensor; Llama 3
# 8B's I = 14336 is then 14 programs per row.
_BLOCK = 1024
_NUM_WARPS = 4


if triton is not None:

    @triton.jit
    def _forward_kernel(gate_ptr, up_ptr, out_ptr, n_cols, gate_stride, up_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # N * I passes 2**31 at long contexts
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(gate_ptr + row * gate_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + row * up_stride + cols, mask=mask, other=0.0).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + row * n_cols + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_kernel(
        grad_out_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr,
        n_cols, grad_out_stride, gate_stride, up_stride, grad_gate_stride, grad_up_stride,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        grad_out = tl.load(grad_out_ptr + row * grad_out_stride + cols, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + row * gate_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + row * up_stride + cols, mask=mask, other=0.0).to(tl.float32)
        sigmoid = tl.sigmoid(gate)
        # d silu / d gate = sigmoid * (1 + gate * (1 - sigmoid))
        grad_gate = grad_out * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))
        grad_up = grad_out * gate * sigmoid
        tl.store(grad_gate_ptr + row * grad_gate_stride + cols, grad_gate.to(grad_gate_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(grad_up_ptr + row * grad_up_stride + cols, grad_up.to(grad_up_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., I) -> (N, I) with unit column stride: a view when the layout allows it (e.g. one half of a
    fused gate/up projection's output), else a copy."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"swiglu expects gate and up of one shape and dtype, got {tuple(gate.shape)} {gate.dtype} "
            f"and {tuple(up.shape)} {up.dtype}"
        )


def _grid(n_rows: int, n_cols: int) -> tuple[int, int]:
    # Rows on the first axis (up to 2**31 - 1 programs); the second allows 65535, ample for I / 1024.
    return n_rows, triton.cdiv(n_cols, _BLOCK)


def _forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton. gate, up (..., I) -> silu(gate) * up, a new contiguous tensor."""
    if triton is None:
        raise RuntimeError("the Triton path needs the triton package (pip install triton)")
    _check(gate, up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    gate2, up2 = _rows(gate), _rows(up)  # (N, I)
    if gate2.numel() > 0:
        _forward_kernel[_grid(*gate2.shape)](
            gate2, up2, out, gate2.shape[1], gate2.stride(0), up2.stride(0), BLOCK=_BLOCK, num_warps=_NUM_WARPS
        )
    return out


def _backward(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton. -> (grad_gate, grad_up), new contiguous tensors."""
    grad_gate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    grad_up = torch.empty_like(grad_gate)
    _backward_into(grad_out, gate, up, grad_gate.view(-1, gate.shape[-1]), grad_up.view(-1, gate.shape[-1]))
    return grad_gate, grad_up


def _backward_into(grad_out, gate, up, grad_gate: torch.Tensor, grad_up: torch.Tensor) -> None:
    """Triton. Writes the gradients into (N, I) views with unit column stride (two halves of one buffer)."""
    grad_out2, gate2, up2 = _rows(grad_out), _rows(gate), _rows(up)  # (N, I)
    if gate2.numel() > 0:
        _backward_kernel[_grid(*gate2.shape)](
            grad_out2, gate2, up2, grad_gate, grad_up,
            gate2.shape[1], grad_out2.stride(0), gate2.stride(0), up2.stride(0), grad_gate.stride(0),
            grad_up.stride(0), BLOCK=_BLOCK, num_warps=_NUM_WARPS,
        )


class _SwiGLUTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _forward(gate, up)

    @staticmethod
    def backward(ctx, grad_out):
        return _backward(grad_out, *ctx.saved_tensors)


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """reference.swiglu through the Triton kernels, forward and backward, on any device."""
    return _SwiGLUTriton.apply(gate, up)


# ---- the ops: torch.compile, the meta device and FSDP2 see through them ----


@torch.library.custom_op("lorafit::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Non-CUDA devices run the reference."""
    return reference.swiglu(gate, up)


@_swiglu_op.register_kernel("cuda")
def _(gate, up):
    return _forward(gate, up)


@_swiglu_op.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("lorafit::swiglu_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (grad_gate, grad_up). Non-CUDA devices run the reference's autograd, written out op for op in the
    same dtypes (autograd cannot run inside an op)."""
    return torch.ops.aten.silu_backward(grad_out * up, gate), grad_out * F.silu(gate)


@_backward_op.register_kernel("cuda")
def _(grad_out, gate, up):
    return _backward(grad_out, gate, up)


@_backward_op.register_fake
def _(grad_out, gate, up):
    grad_gate = torch.empty_like(gate, memory_format=torch.contiguous_format)
    return grad_gate, torch.empty_like(grad_gate)


@torch.library.custom_op("lorafit::swiglu_backward_packed", mutates_args=("out",))
def _backward_packed_op(grad_out: torch.Tensor, gate_up: torch.Tensor, out: torch.Tensor) -> None:
    """gate_up (N, 2I) = [gate | up], grad_out (N, I) -> out[:, :I] = grad gate, out[:, I:2I] = grad up; out
    (N, >= 2I) may be wider (the fused LoRA MLP keeps its adapters' columns after them). Non-CUDA: reference."""
    I = grad_out.shape[-1]
    grad_gate, grad_up = _backward_op(grad_out, gate_up[:, :I], gate_up[:, I:2 * I])
    out[:, :I].copy_(grad_gate)
    out[:, I:2 * I].copy_(grad_up)


@_backward_packed_op.register_kernel("cuda")
def _backward_packed_into(grad_out, gate_up, out):
    I = grad_out.shape[-1]
    _backward_into(grad_out, gate_up[:, :I], gate_up[:, I:2 * I], out[:, :I], out[:, I:2 * I])


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # gate, up: silu is recomputed, never saved


def _swiglu_backward(ctx, grad_out):
    return _backward_op(grad_out, *ctx.saved_tensors)


_swiglu_op.register_autograd(_swiglu_backward, setup_context=_setup_context)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """reference.swiglu as the op lorafit::swiglu: gate, up (..., I) -> silu(gate) * up (..., I)."""
    _check(gate, up)
    if eager_cuda(gate):
        return _SwiGLUTriton.apply(gate, up)
    return _swiglu_op(gate, up)


# What the fused LoRA functions call inside their own autograd (kernels/lora_linear.py, lora_mlp.py): the
# Triton launch in eager mode on CUDA, else the op (kernels.eager_cuda).


def swiglu_values(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, no autograd."""
    return _forward(gate, up) if eager_cuda(gate) else _swiglu_op(gate, up)


def swiglu_grads(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad gate, grad up) of swiglu_values."""
    return _backward(grad_out, gate, up) if eager_cuda(gate) else _backward_op(grad_out, gate, up)


def swiglu_grads_packed(grad_out: torch.Tensor, gate_up: torch.Tensor, out: torch.Tensor) -> None:
    """lorafit::swiglu_backward_packed: the gradients of gate_up (N, 2I) = [gate | up] written into out."""
    (_backward_packed_into if eager_cuda(gate_up) else _backward_packed_op)(grad_out, gate_up, out)
