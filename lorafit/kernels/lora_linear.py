"""The LoRA linear layer as one autograd function: y = x W^T + b + s (x A^T) B^T, frozen W.

What it saves compared with composing F.linear calls under autograd (what PEFT does):
- the adapters run in the activations' dtype (bf16 on GPU), so no float32 copy of x is made or saved for
  backward: x itself is the only (N, C_in) tensor kept, and it is the tensor the layer was given;
- the low-rank update is added into the base output in place (one addmm_), and in backward the adapter's
  share of grad x is added into the base's grad x in place: no (N, C_out) or (N, C_in) temporaries;
- backward computes the small dy B product once and uses it for both grad x and grad A.
Adapter weights may be float32 masters (they are cast per call: (r, C) is tiny), their grads come back in
their own dtype. The math is plain PyTorch, so this is the CPU path and the GPU path alike: the GEMMs are
cuBLAS/MKL's, which no hand-written kernel beats at these shapes.
"""

import torch

from . import swiglu as _swiglu_ops  # noqa: F401  (registers lorafit::swiglu and its backward)


def _lora_forward(x2, weight, bias, lora_a, lora_b, scaling):
    """x2 (N, C_in) -> (y (N, C_out), down (N, r)), computed in x2's dtype."""
    a_w = lora_a.to(x2.dtype)  # (r, C_in)
    b_w = lora_b.to(x2.dtype) * scaling  # (C_out, r): the scaling goes on the small matrix
    down = x2 @ a_w.t()  # (N, r)
    y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())  # (N, C_out)
    y.addmm_(down, b_w.t())
    return y, down


def _lora_backward(dy, x2, weight, lora_a, lora_b, down, scaling, need_grad_x: bool):
    """dy (N, C_out), x2 (N, C_in) -> (grad x2 or None, grad A, grad B)."""
    dtype = x2.dtype
    a_w = lora_a.to(dtype)
    b_w = lora_b.to(dtype) * scaling
    dy = dy.to(dtype)
    dy_b = dy @ b_w  # (N, r)
    grad_x = None
    if need_grad_x:
        grad_x = dy @ weight.to(dtype)  # (N, C_in)
        grad_x.addmm_(dy_b, a_w)
    grad_a = (dy_b.t() @ x2).to(lora_a.dtype)  # (r, C_in)
    grad_b = (dy.t() @ down * scaling).to(lora_b.dtype)  # (C_out, r)
    return grad_x, grad_a, grad_b


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        y, down = _lora_forward(x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b, scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, down)
        ctx.scaling = scaling
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_a, lora_b, down = ctx.saved_tensors
        grad_x, grad_a, grad_b = _lora_backward(grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1]),
                                                weight, lora_a, lora_b, down, ctx.scaling, ctx.needs_input_grad[0])
        return None if grad_x is None else grad_x.view(x.shape), None, None, grad_a, grad_b, None


class _SwiGLULoRALinear(torch.autograd.Function):
    """lora_linear(silu(gate) * up): the (N, I) product, the largest activation of a Llama layer (117 MiB
    for 8B at 4k tokens), is not kept for backward but recomputed there from gate and up, which the SwiGLU
    backward needs anyway: one elementwise pass instead of 3.7 GiB held over 32 layers."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, lora_a, lora_b, scaling):
        h = torch.ops.lorafit.swiglu(gate, up)  # (..., I): Triton on CUDA, the reference elsewhere
        y, down = _lora_forward(h.reshape(-1, h.shape[-1]), weight, bias, lora_a, lora_b, scaling)
        ctx.save_for_backward(gate, up, weight, lora_a, lora_b, down)
        ctx.scaling = scaling
        return y.view(*h.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_y):
        gate, up, weight, lora_a, lora_b, down = ctx.saved_tensors
        h = torch.ops.lorafit.swiglu(gate, up)
        grad_h, grad_a, grad_b = _lora_backward(grad_y.reshape(-1, grad_y.shape[-1]), h.reshape(-1, h.shape[-1]),
                                                weight, lora_a, lora_b, down, ctx.scaling, True)
        del h
        grad_gate, grad_up = torch.ops.lorafit.swiglu_backward(grad_h.view(gate.shape), gate, up)
        return grad_gate, grad_up, None, None, grad_a, grad_b, None


def lora_linear(x, weight, bias, lora_a, lora_b, scaling: float) -> torch.Tensor:
    """x (..., C_in); weight (C_out, C_in) and bias frozen; lora_a (r, C_in), lora_b (C_out, r) trainable.
    Equals reference.lora_linear (computed in x's dtype)."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("lora_linear trains the adapters only: the base weight and bias must be frozen")
    return _LoRALinear.apply(x, weight, bias, lora_a, lora_b, scaling)


def swiglu_lora_linear(gate, up, weight, bias, lora_a, lora_b, scaling: float) -> torch.Tensor:
    """lora_linear(silu(gate) * up, ...) keeping gate and up for backward, not their product."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("lora_linear trains the adapters only: the base weight and bias must be frozen")
    return _SwiGLULoRALinear.apply(gate, up, weight, bias, lora_a, lora_b, scaling)
