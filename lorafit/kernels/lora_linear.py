"""The LoRA linear layer as one autograd function: y = x W^T + b + s (x A^T) B^T, frozen W.

What it saves compared with composing F.linear calls under autograd (what PEFT does):
- the adapters run in the activations' dtype (bf16 on GPU), so no float32 copy of x is made or saved for
  backward: x itself is the only (N, C_in) tensor kept, and it is the tensor the layer was given;
- the low-rank update is added into the base output in place (one addmm_), and in backward the adapter's
  share of grad x is added into the base's grad x in place: no (N, C_out) or (N, C_in) temporaries;
- backward computes the small dy B product once and uses it for both grad x and grad A.
The frozen base may be a 4-bit NF4 layer (QLoRA): it is dequantised in forward and again in backward, and
the dense copy is dropped in between, so it takes what a dense base takes plus one dequantised weight at a
time (117 MB for Llama-3.1-8B's largest in bf16) instead of a float32 copy of x kept per layer.
Adapter weights may be float32 masters: LoRALinear keeps their compute-dtype copies (with the scaling on B)
until an optimizer step changes them, rather than casting on every call (about 960 small kernel launches
per micro-batch of Llama-3.1-8B, when the GPU waits on the launching CPU). Their grads come back in their
own dtype. The math is plain PyTorch, so this is the CPU path and the GPU path alike: the GEMMs are
cuBLAS/MKL's, which no hand-written kernel beats at these shapes.
"""

import torch

from . import product_in_float32, swiglu_lora
from .swiglu import swiglu_grads, swiglu_grads_packed, swiglu_values


def _lora_forward(x2, weight, bias, a_w, b_w):
    """x2 (N, C_in) -> (y (N, C_out), down (N, r)), computed in x2's dtype. a_w (r, C_in) and b_w (C_out, r)
    are the adapters in that dtype with the scaling already on B (the small matrix)."""
    down = x2 @ a_w.t()  # (N, r)
    y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())  # (N, C_out)
    y.addmm_(down, b_w.t())
    return y, down


def _lora_backward(dy, x2, weight, a_w, b_w, down, scaling, need_grad_x: bool, param_dtypes):
    """dy (N, C_out), x2 (N, C_in) -> (grad x2 or None, grad A, grad B), the grads in param_dtypes."""
    dy = dy.to(x2.dtype)
    dy_b = dy @ b_w  # (N, r)
    grad_x = None
    if need_grad_x:
        grad_x = dy @ weight.to(x2.dtype)  # (N, C_in)
        grad_x.addmm_(dy_b, a_w)
    grad_a = product_in_float32(dy_b.t(), x2).to(param_dtypes[0])  # (r, C_in)
    grad_b = product_in_float32(dy.t(), down).mul_(scaling).to(param_dtypes[1])  # (C_out, r)
    return grad_x, grad_a, grad_b


def _dense(weight, dtype):
    """A frozen base weight as a dense (C_out, C_in) tensor: itself, or an NF4 layer's dequantised in dtype."""
    return weight if isinstance(weight, torch.Tensor) else weight.dequantized_weight(dtype)


def _save_weight(ctx, weight) -> list:
    """A dense weight is saved with the tensors; an NF4 layer is kept by reference (its 4-bit state is
    frozen) and dequantised again in backward. -> what to add to save_for_backward."""
    ctx.quantized = None if isinstance(weight, torch.Tensor) else weight
    return [weight] if ctx.quantized is None else []


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, a_w, b_w, scaling):
        y, down = _lora_forward(x.reshape(-1, x.shape[-1]), _dense(weight, x.dtype), bias, a_w, b_w)
        ctx.save_for_backward(x, a_w, b_w, down, *_save_weight(ctx, weight))
        ctx.scaling, ctx.param_dtypes = scaling, (lora_a.dtype, lora_b.dtype)
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_y):
        x, a_w, b_w, down, *saved = ctx.saved_tensors
        weight = _dense(ctx.quantized or saved[0], x.dtype) if ctx.needs_input_grad[0] else None
        grad_x, grad_a, grad_b = _lora_backward(grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1]),
                                                weight, a_w, b_w, down, ctx.scaling, ctx.needs_input_grad[0],
                                                ctx.param_dtypes)
        return None if grad_x is None else grad_x.view(x.shape), None, None, grad_a, grad_b, None, None, None


class _SwiGLULoRALinear(torch.autograd.Function):
    """lora_linear(silu(gate) * up): the (N, I) product, the largest activation of a Llama layer (117 MiB
    for 8B at 4k tokens), is not kept for backward but recomputed there from gate and up, which the SwiGLU
    backward needs anyway: one elementwise pass instead of 3.7 GiB held over 32 layers.
    up None: gate is [gate | up] packed (..., 2I), one stacked projection's output (kernels/lora_stacked.py),
    and its grad comes back packed too, written by the SwiGLU backward into one buffer (no join of two)."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, lora_a, lora_b, a_w, b_w, scaling):
        h = swiglu_values(*split_gate_up(gate, up))  # (..., I): Triton on CUDA, the reference elsewhere
        y, down = _lora_forward(h.reshape(-1, h.shape[-1]), _dense(weight, h.dtype), bias, a_w, b_w)
        ctx.save_for_backward(gate, up, a_w, b_w, down, *_save_weight(ctx, weight))
        ctx.scaling, ctx.param_dtypes = scaling, (lora_a.dtype, lora_b.dtype)
        return y.view(*h.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_y):
        gate, up, a_w, b_w, down, *saved = ctx.saved_tensors
        weight = _dense(ctx.quantized or saved[0], gate.dtype)
        if swiglu_lora.applies(gate, a_w.shape[0]):  # one kernel from grad h to grad gate and up
            return _SwiGLULoRALinear._fused_backward(ctx, grad_y, gate, up, weight, a_w, b_w, down)
        h = swiglu_values(*split_gate_up(gate, up))
        grad_h, grad_a, grad_b = _lora_backward(grad_y.reshape(-1, grad_y.shape[-1]), h.reshape(-1, h.shape[-1]),
                                                weight, a_w, b_w, down, ctx.scaling, True, ctx.param_dtypes)
        del h, weight
        if up is None:
            gate_up = gate.reshape(-1, gate.shape[-1])  # (N, 2I)
            grad_gate_up = torch.empty_like(gate_up)
            swiglu_grads_packed(grad_h, gate_up, grad_gate_up)
            return grad_gate_up.view(gate.shape), None, None, None, grad_a, grad_b, None, None, None
        grad_gate, grad_up = swiglu_grads(grad_h.view(gate.shape), gate, up)
        return grad_gate, grad_up, None, None, grad_a, grad_b, None, None, None

    @staticmethod
    def _fused_backward(ctx, grad_y, gate, up, weight, a_w, b_w, down):
        rows = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731  (N, I) views, unit column stride
        grad_gate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)  # packed: [dgate | dup]
        grad_up = None if up is None else torch.empty_like(grad_gate)
        g, u = split_gate_up(rows(gate), None if up is None else rows(up))
        dg, du = split_gate_up(rows(grad_gate), None if up is None else rows(grad_up))
        grad_a, grad_b = swiglu_lora.down_and_swiglu_backward(rows(grad_y), weight, a_w, b_w, down, ctx.scaling,
                                                              g, u, dg, du)
        grad_a, grad_b = grad_a.to(ctx.param_dtypes[0]), grad_b.to(ctx.param_dtypes[1])
        return grad_gate, grad_up, None, None, grad_a, grad_b, None, None, None


def split_gate_up(gate, up):
    """(gate, up), from a packed [gate | up] when up is None."""
    return (gate, up) if up is not None else gate.chunk(2, dim=-1)


def compute_adapters(lora_a, lora_b, scaling: float, dtype):
    """(A, scaling * B) in the compute dtype: what the functions below multiply by."""
    with torch.no_grad():
        return lora_a.to(dtype), (lora_b * scaling).to(dtype)


def _check_frozen(weight, bias) -> None:
    if getattr(weight, "requires_grad", False) or (bias is not None and bias.requires_grad):
        raise ValueError("lora_linear trains the adapters only: the base weight and bias must be frozen")


def lora_linear(x, weight, bias, lora_a, lora_b, scaling: float, adapters=None) -> torch.Tensor:
    """x (..., C_in); weight (C_out, C_in) and bias frozen (weight may be an NF4Linear, whose
    dequantized_weight(dtype) gives it); lora_a (r, C_in), lora_b (C_out, r) trainable.
    Equals reference.lora_linear (computed in x's dtype). adapters: compute_adapters(...) for x's dtype when
    the caller keeps them between calls (LoRALinear does); the grads still go to lora_a and lora_b."""
    _check_frozen(weight, bias)
    a_w, b_w = adapters or compute_adapters(lora_a, lora_b, scaling, x.dtype)
    return _LoRALinear.apply(x, weight, bias, lora_a, lora_b, a_w, b_w, scaling)


def swiglu_lora_linear(gate, up, weight, bias, lora_a, lora_b, scaling: float, adapters=None) -> torch.Tensor:
    """lora_linear(silu(gate) * up, ...) keeping gate and up for backward, not their product. up None: gate is
    [gate | up] packed along its last dimension."""
    _check_frozen(weight, bias)
    a_w, b_w = adapters or compute_adapters(lora_a, lora_b, scaling, gate.dtype)
    return _SwiGLULoRALinear.apply(gate, up, weight, bias, lora_a, lora_b, a_w, b_w, scaling)
