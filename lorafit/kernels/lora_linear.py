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


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, C_in)
        a_w = lora_a.to(x.dtype)  # (r, C_in)
        b_w = lora_b.to(x.dtype) * scaling  # (C_out, r): the scaling goes on the small matrix
        down = x2 @ a_w.t()  # (N, r)
        y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())  # (N, C_out)
        y.addmm_(down, b_w.t())
        ctx.save_for_backward(x, weight, lora_a, lora_b, down)
        ctx.scaling = scaling
        return y.view(*shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_a, lora_b, down = ctx.saved_tensors
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])  # (N, C_in)
        dy = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)  # (N, C_out)
        a_w = lora_a.to(dtype)
        b_w = lora_b.to(dtype) * ctx.scaling
        dy_b = dy @ b_w  # (N, r)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = dy @ weight.to(dtype)  # (N, C_in)
            grad_x.addmm_(dy_b, a_w)
            grad_x = grad_x.view(x.shape)
        grad_a = (dy_b.t() @ x2).to(lora_a.dtype)  # (r, C_in)
        grad_b = (dy.t() @ down * ctx.scaling).to(lora_b.dtype)  # (C_out, r)
        return grad_x, None, None, grad_a, grad_b, None


def lora_linear(x, weight, bias, lora_a, lora_b, scaling: float) -> torch.Tensor:
    """x (..., C_in); weight (C_out, C_in) and bias frozen; lora_a (r, C_in), lora_b (C_out, r) trainable.
    Equals reference.lora_linear (computed in x's dtype)."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("lora_linear trains the adapters only: the base weight and bias must be frozen")
    return _LoRALinear.apply(x, weight, bias, lora_a, lora_b, scaling)
