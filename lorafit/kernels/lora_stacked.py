"""LoRA layers that read the same input (q, k and v; gate and up) as one autograd function over one stacked
weight. For q, k, v:

    [q | k | v] = x W^T + (x A^T) B^T,   W = [W_q; W_k; W_v] (O, C),   A = [A_q; A_k; A_v] (3r, C),
                                          B = blockdiag(s B_q, s B_k, s B_v) (O, 3r),   O = q_dim + 2 kv_dim

Why: three LoRA layers over the same input are three autograd functions and 9 GEMMs forward, 15 backward;
stacked they are one function and 3 GEMMs forward (x A^T, x W^T, then the update added in place), 5 backward
(dy B, dy W, the update's share of grad x added in place, grad A, grad B), each over 3x the rows. What that
saves is mostly host time: a Llama-3.2-1B micro-batch (2 x 2048 tokens) waited on the launching CPU, 77 ms
launched for 41 ms of GPU work on an H200, and each fused LoRA function call cost 68-85 us of it.

A dense base: W is one buffer and the model's weights become views into it (names, values and state_dict
unchanged, no memory added), as kernels/lora_mlp.py does for gate and up. An NF4 base (QLoRA): the layers are
dequantised into one (O, C) buffer in forward and again in backward, never kept (kernels/lora_mlp.py does
the same for gate and up).
The math is kernels/lora_linear.py's with B block-diagonal; grad B keeps only its diagonal blocks.
"""

import torch
from torch import nn

from .lora_linear import _lora_backward, _lora_forward


class StackedWeights:
    """The stacked W (dense bases), A and B of LoRA layers that share an input."""

    def __init__(self, layers):
        self.sizes = [m.out_features for m in layers]
        self.r = layers[0].lora_A.weight.shape[0]
        self.W, self._pointers = None, None
        if isinstance(layers[0].base_layer, nn.Linear):
            self.W = torch.cat([m.base_layer.weight.detach() for m in layers])  # (O, C)
            start = 0
            for m, size in zip(layers, self.sizes):
                m.base_layer.weight = nn.Parameter(self.W[start:start + size], requires_grad=False)
                start += size
            self._pointers = self._weight_pointers(layers)
        self._adapters_seen, self._adapters = None, None

    @staticmethod
    def _weight_pointers(layers) -> tuple:
        return tuple(m.base_layer.weight.data_ptr() if isinstance(m.base_layer, nn.Linear) else None for m in layers)

    def holds(self, layers) -> bool:
        """False once the model's weights were moved or replaced (model.to(...), a reload): W is stale."""
        if layers[0].lora_A.weight.shape[0] != self.r:
            return False
        if self.W is None:
            return not isinstance(layers[0].base_layer, nn.Linear)
        return self._weight_pointers(layers) == self._pointers

    def weight(self, layers, dtype: torch.dtype) -> torch.Tensor:
        """W (O, C): the stacked dense weights, or the NF4 layers dequantised into one new buffer."""
        if self.W is not None:
            return self.W
        W = torch.empty(sum(self.sizes), layers[0].in_features, dtype=dtype, device=layers[0].lora_A.weight.device)
        start = 0
        for m, size in zip(layers, self.sizes):
            m.base_layer.dequantize_into(W[start:start + size])
            start += size
        return W

    def adapters(self, layers, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (kr, C), blockdiag(s B) (O, kr)) for k layers, in dtype, made again only when the adapters changed."""
        params = [p for m in layers for p in (m.lora_A.weight, m.lora_B.weight)]
        seen = (dtype,) + tuple((p.data_ptr(), p._version) for p in params) + tuple(m.scaling for m in layers)
        if seen != self._adapters_seen or not all(m.keep_compute_adapters for m in layers):
            r = self.r
            with torch.no_grad():
                a_w = torch.cat([m.lora_A.weight for m in layers]).to(dtype)
                b_w = torch.zeros(sum(self.sizes), len(layers) * r, dtype=dtype, device=a_w.device)
                start = 0
                for i, (m, size) in enumerate(zip(layers, self.sizes)):
                    b_w[start:start + size, i * r:(i + 1) * r] = m.lora_B.weight * m.scaling
                    start += size
            self._adapters, self._adapters_seen = (a_w, b_w), seen
        return self._adapters


def can_stack(layers, x: torch.Tensor) -> bool:
    """Plain LoRA (no dropout, no DoRA, adapters on) on every layer, one rank and scaling, bases of one kind
    (all dense or all NF4), no biases (Qwen2's q, k, v biases take the separate layers' path)."""
    return (all(hasattr(m, "lora_A") and not m.disabled and m._fused_path_applies(x) for m in layers)
            and len({type(m.base_layer) for m in layers}) == 1
            and all(m.base_layer.bias is None for m in layers)
            and len({m.lora_A.weight.shape[0] for m in layers}) == 1 and len({m.scaling for m in layers}) == 1)


def lora_stacked(x: torch.Tensor, weights: StackedWeights, layers) -> torch.Tensor:
    """x (..., C) -> [y_1 | ... | y_k] (..., O), y_i = layers[i](x) (LoRA layers, see can_stack). Split it with
    .split(weights.sizes, -1): autograd then joins their grads into one (N, O) for the backward here."""
    a_w, b_w = weights.adapters(layers, x.dtype)
    params = [p for m in layers for p in (m.lora_A.weight, m.lora_B.weight)]
    return _StackedLoRA.apply(x, weights, tuple(layers), a_w, b_w, *params)


class _StackedLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, layers, a_w, b_w, *params):
        W = weights.weight(layers, x.dtype)
        y, down = _lora_forward(x.reshape(-1, x.shape[-1]), W, None, a_w, b_w)  # (N, O), (N, kr)
        ctx.save_for_backward(x, a_w, b_w, down, *([W] if weights.W is not None else []))
        ctx.weights, ctx.layers = weights, layers  # an NF4 base is dequantised again in backward
        ctx.param_dtypes = tuple(p.dtype for p in params)
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_y):
        x, a_w, b_w, down, *saved = ctx.saved_tensors
        weights, r = ctx.weights, ctx.weights.r
        W = (saved[0] if saved else weights.weight(ctx.layers, x.dtype)) if ctx.needs_input_grad[0] else None
        # grad B_i = s dy_i^T (x A_i^T): the diagonal blocks of dy^T (x A^T), computed whole (k times the
        # needed blocks: 1.2% of dy W's FLOPs for 8B's q, k, v, against 0.4% for the blocks alone), scaled below.
        grad_x, grad_a, grad_b = _lora_backward(grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1]),
                                                W, a_w, b_w, down, 1.0, ctx.needs_input_grad[0],
                                                (torch.float32, torch.float32))
        grads, start = [], 0
        for i, (m, size) in enumerate(zip(ctx.layers, weights.sizes)):
            grads.append(grad_a[i * r:(i + 1) * r].to(ctx.param_dtypes[2 * i]))  # (r, C)
            block = grad_b[start:start + size, i * r:(i + 1) * r] * m.scaling  # (size, r)
            grads.append(block.to(ctx.param_dtypes[2 * i + 1]))
            start += size
        return (None if grad_x is None else grad_x.view(x.shape), None, None, None, None, *grads)
