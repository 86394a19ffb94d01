"""The Llama MLP with LoRA on gate, up and down as one autograd function:

    y = down(silu(gate(x)) * up(x)),   each projection p(x) = x W^T + s (x A^T) B^T,   W frozen

Why: composed LoRA layers add each update to its output in a pass of its own (gate and up: read and write
2 x 112 MiB a layer at Llama-3.1-8B's 4096 tokens, 5.9 ms of a 254 ms micro-batch on an H200), and in
backward gate and up each compute a grad x, add their adapter's share to it, and autograd sums the two.

Here gate and up are ONE matmul whose inner dimension also carries the adapters (K-concatenation):

    [x | x A_g^T | x A_u^T] @ [[W_g, s B_g, 0], [W_u, 0, s B_u]]^T = [gate | up]          (N, 2I), K = C + 2r

and backward's grad x is one matmul over the same weights:

    [dgate | dup | dgate s B_g | dup s B_u] @ [[W_g], [W_u], [A_g], [A_u]] = grad x      (N, C), K = 2I + 2r

Both read one matrix M = [[W_g, sB_g, 0], [W_u, 0, sB_u], [A_g, 0, 0], [A_u, 0, 0]], (2I + 2r, C + 2r):
the forward its first 2I rows, the backward its first C columns. The model's gate and up weights become
views into M (names, values and state_dict unchanged), so M costs 2r extra rows and columns (1.8 MiB a
layer for 8B), and K grows by 2r (0.8% for 8B at r = 16). Its adapter blocks are copied from the float32
masters whenever these changed (an optimizer step, a loaded adapter). A 4-bit base (QLoRA) is dequantised
into a new M in forward and again in backward (nn/nf4.py's kernel writes into its rows), never kept: against
gate and up as a stacked projection (kernels/lora_stacked.py), the adapters' update then needs no pass of
its own either (6.0 ms of Llama-3.1-8B QLoRA's 259 ms micro-batch on an H200, device call 31). Down keeps
kernels/lora_linear.py's math; its input silu(gate) * up is not kept. On CUDA in 16 bits, the backward from
down's grad h to [dgate | dup], with down's adapter and gate and up's grad B, is one kernel
(kernels/swiglu_lora.py).
"""

import torch
from torch import nn

from . import swiglu_lora
from .swiglu import swiglu_grads_packed, swiglu_values
from .lora_linear import _dense, _lora_backward, _lora_forward
from .lora_stacked import can_stack


class GateUpWeights:
    """M for one MLP's gate and up projections. Dense bases now hold views into it; 4-bit (NF4) bases are
    dequantised into a new M at every forward and again in backward, never kept (as kernels/lora_stacked.py
    does for them): 235 MB at a time for Llama-3.1-8B."""

    def __init__(self, gate, up):
        base = gate.base_layer
        (I, C), r = (base.out_features, base.in_features), gate.lora_A.weight.shape[0]
        self.I, self.C, self.r = I, C, r
        self.quantized = not isinstance(base, nn.Linear)
        self.M, self._bases = None, (gate.base_layer, up.base_layer)
        if not self.quantized:
            self.M = base.weight.new_zeros(2 * I + 2 * r, C + 2 * r)
            with torch.no_grad():
                self.M[:I, :C].copy_(base.weight)
                self.M[I:2 * I, :C].copy_(up.base_layer.weight)
            gate.base_layer.weight = nn.Parameter(self.M[:I, :C], requires_grad=False)
            up.base_layer.weight = nn.Parameter(self.M[I:2 * I, :C], requires_grad=False)
        self._adapters_seen = None

    def holds(self, gate, up) -> bool:
        """False once the model's weights were moved or replaced (model.to(...), a reload): M is stale."""
        if gate.lora_A.weight.shape[0] != self.r:
            return False
        if self.quantized:
            return (gate.base_layer, up.base_layer) == self._bases
        return (gate.base_layer.weight.data_ptr() == self.M.data_ptr()
                and up.base_layer.weight.data_ptr() == self.M[self.I].data_ptr())

    def refresh(self, gate, up, dtype: torch.dtype) -> torch.Tensor:
        """M with the adapters' current values, in dtype. Dense: copied when they changed since the last call, or
        on every call when the layers' keep_compute_adapters is off (FSDP2, CUDA graphs: lora.py). NF4: a new M."""
        params = (gate.lora_A.weight, gate.lora_B.weight, up.lora_A.weight, up.lora_B.weight)
        seen = tuple((p.data_ptr(), p._version) for p in params) + (gate.scaling, up.scaling)
        I, C, r, M = self.I, self.C, self.r, self.M
        if self.quantized:
            M = torch.empty(2 * I + 2 * r, C + 2 * r, dtype=dtype, device=gate.lora_A.weight.device)
            gate.base_layer.dequantize_into(M[:I, :C])
            up.base_layer.dequantize_into(M[I:2 * I, :C])
            M[:I, C + r:].zero_()
            M[I:2 * I, C:C + r].zero_()  # M[2I:, C:] is never read
        elif seen == self._adapters_seen and gate.keep_compute_adapters and up.keep_compute_adapters:
            return M
        with torch.no_grad():
            M[:I, C:C + r].copy_(gate.lora_B.weight * gate.scaling)
            M[I:2 * I, C + r:].copy_(up.lora_B.weight * up.scaling)
            M[2 * I:2 * I + r, :C].copy_(gate.lora_A.weight)
            M[2 * I + r:, :C].copy_(up.lora_A.weight)
        self._adapters_seen = None if self.quantized else seen
        return M


def can_fuse(gate, up, down, x: torch.Tensor) -> bool:
    """Plain LoRA (no dropout, no DoRA, adapters on) over frozen bias-free bases in x's dtype, gate and up of
    one kind (dense or NF4)."""
    return can_stack((gate, up), x) and can_stack((down,), x)  # gate and up share M: one rank and scaling


def lora_mlp(x: torch.Tensor, weights: GateUpWeights, gate, up, down) -> torch.Tensor:
    """x (..., C) -> down(silu(gate(x)) * up(x)) (..., C); gate, up, down are LoRA layers (see can_fuse)."""
    a_down, b_down = down.compute_adapters(x.dtype)
    return _LoRAMLP.apply(x, weights, (gate, up), down._frozen_weight(), gate.lora_A.weight, gate.lora_B.weight,
                          up.lora_A.weight, up.lora_B.weight, down.lora_A.weight, down.lora_B.weight,
                          a_down, b_down, gate.scaling, down.scaling)


class _LoRAMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, gate_up_layers, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, a_w_down,
                b_w_down, s_gate_up, s_down):
        C, I = weights.C, weights.I
        M = weights.refresh(*gate_up_layers, x.dtype)  # (2I + 2r, C + 2r)
        x2 = x.reshape(-1, C)  # (N, C)
        x_cat = torch.empty(x2.shape[0], M.shape[1], dtype=x.dtype, device=x.device)  # [x | x A_g^T | x A_u^T]
        x_cat[:, :C] = x2
        x_cat[:, C:] = x2 @ M[2 * I:, :C].t()  # (N, 2r)
        gate_up = x_cat @ M[:2 * I].t()  # (N, 2I): [gate | up], adapters included
        del M  # an NF4 base's M is made again in backward
        h = swiglu_values(gate_up[:, :I], gate_up[:, I:])  # (N, I)
        y, down_a = _lora_forward(h, _dense(w_down, x.dtype), None, a_w_down, b_w_down)  # (N, C), (N, r)
        ctx.save_for_backward(x_cat, gate_up, down_a, a_w_down, b_w_down)
        # Frozen weights, kept as they are (autograd versions saved tensors): the dense ones, or the NF4 layers
        ctx.weights, ctx.gate_up_layers, ctx.w_down = weights, gate_up_layers, w_down
        ctx.s_gate_up, ctx.s_down = s_gate_up, s_down
        ctx.param_dtypes = tuple(p.dtype for p in (a_gate, b_gate, a_up, b_up, a_down, b_down))
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_y):
        x_cat, gate_up, down_a, a_w_down, b_w_down = ctx.saved_tensors
        weights, s_gate_up, dtypes = ctx.weights, ctx.s_gate_up, ctx.param_dtypes
        I, C, r = weights.I, weights.C, weights.r
        N, I2 = gate_up.shape
        dy = grad_y.reshape(-1, grad_y.shape[-1])  # (N, C)
        x2, down_gate, down_up = x_cat[:, :C], x_cat[:, C:C + r], x_cat[:, C + r:]

        # [dgate | dup | dgate s B_g | dup s B_u]: the swiglu backward writes the first 2I columns.
        d_cat = torch.empty(N, I2 + 2 * r, dtype=gate_up.dtype, device=gate_up.device)
        w_down = _dense(ctx.w_down, gate_up.dtype)
        if swiglu_lora.applies(gate_up, a_w_down.shape[0]):  # one kernel from grad h to [dgate | dup]
            grad_a_down, grad_b_down, (grad_b_gate, grad_b_up) = swiglu_lora.down_and_swiglu_backward(
                dy, w_down, a_w_down, b_w_down, down_a, ctx.s_down, gate_up[:, :I], gate_up[:, I:],
                d_cat[:, :I], d_cat[:, I:I2], down_gate, down_up)
            grad_a_down, grad_b_down = grad_a_down.to(dtypes[4]), grad_b_down.to(dtypes[5])
        else:
            h = swiglu_values(gate_up[:, :I], gate_up[:, I:])  # recomputed: (N, I)
            grad_h, grad_a_down, grad_b_down = _lora_backward(dy, h, w_down, a_w_down, b_w_down, down_a,
                                                              ctx.s_down, True, dtypes[4:])
            del h
            swiglu_grads_packed(grad_h, gate_up, d_cat)
            del grad_h
            grad_b_gate = d_cat[:, :I].t() @ down_gate  # (I, r)
            grad_b_up = d_cat[:, I:I2].t() @ down_up
        del w_down
        M = weights.refresh(*ctx.gate_up_layers, gate_up.dtype)
        d_cat[:, I2:] = d_cat[:, :I2] @ M[:I2, C:]  # (N, 2r); M's block diagonal of s B_g, s B_u
        grad_x = d_cat @ M[:, :C]  # (N, C)
        del M
        grad_a = d_cat[:, I2:].t() @ x2  # (2r, C): s (dgate B_g)^T x over s (dup B_u)^T x (s is in M's B blocks)
        grad_b_gate, grad_b_up = grad_b_gate * s_gate_up, grad_b_up * s_gate_up
        return (grad_x.view(grad_y.shape[:-1] + (C,)), None, None, None,
                grad_a[:r].to(dtypes[0]), grad_b_gate.to(dtypes[1]), grad_a[r:].to(dtypes[2]),
                grad_b_up.to(dtypes[3]), grad_a_down, grad_b_down, None, None, None, None)
