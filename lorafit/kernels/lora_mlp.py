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
kernels/lora_stacked.py's StackedWeights over gate and up, which says what it costs and how a 4-bit base
(QLoRA) is dequantised into it. The post-attention norm leaves the 2r columns beside x (models/llama.py), so [x | x A^T]
is x's own buffer: before, copying x into it took 1.5 ms of the 8B's micro-batch (device call 37).

D = [W_down | s B_down] (C, I + r) does for down what M does for gate and up: forward, [h | h A_down^T] @ D^T
is y with the update; backward, dy @ D = [grad h from W_down | dy s B_down]. Down's weight is a view into D
(or, over NF4, dequantised into a new D). h = silu(gate) * up is not kept: on CUDA in 16 bits one kernel
writes [h | h A_down^T], and one takes [grad h | dy s B_down] to [dgate | dup] with down's grad A and gate
and up's grad B (kernels/swiglu_lora.py), written over the saved [gate | up]: a second backward through the
same graph (retain_graph=True) is refused.
"""

import torch
from torch import nn

from ..nn.recomputation import recomputing
from . import product_in_float32, swiglu_lora
from .lora_stacked import StackedWeights, adapter_versions, can_stack, input_grad, product_beside, with_adapter_input
from .swiglu import swiglu_grads_packed, swiglu_values


class FusedMLPWeights:
    """M for one MLP's gate and up projections (kernels/lora_stacked.py's StackedWeights over the two) and
    D = [W_down | s B_down] (C, I + r_down) for down. Dense bases now hold views into them; 4-bit (NF4) bases
    are dequantised into a new M or D at every forward and again in backward, never kept: 235 MB at a time for
    Llama-3.1-8B."""

    def __init__(self, gate, up, down):
        self.gate_up = StackedWeights((gate, up))
        self.I, self.C, self.r = gate.out_features, gate.in_features, self.gate_up.r
        self.r_down = down.lora_A.weight.shape[0]
        self.quantized = self.gate_up.quantized
        self.D = None
        self._down_base = down.base_layer
        if not self.quantized:
            self.D = down.base_layer.weight.new_zeros(self.C, self.I + self.r_down)
            with torch.no_grad():
                self.D[:, :self.I].copy_(down.base_layer.weight)
            down.base_layer.weight = nn.Parameter(self.D[:, :self.I], requires_grad=False)
        self._seen_down = None

    def holds(self, gate, up, down) -> bool:
        """False once the model's weights were moved or replaced (model.to(...), a reload): M and D are stale."""
        if not self.gate_up.holds((gate, up)) or down.lora_A.weight.shape[0] != self.r_down:
            return False
        if self.quantized:
            return down.base_layer is self._down_base
        return down.base_layer.weight.data_ptr() == self.D.data_ptr()

    def down(self, down, dtype: torch.dtype) -> torch.Tensor:
        """D = [W_down | s B_down] with the adapter's current values, in dtype."""
        I, D = self.I, self.D
        if self.quantized:  # s B_down from the layer's compute-dtype copy (lora_mlp casts A_down there too)
            D = torch.empty(self.C, I + self.r_down, dtype=dtype, device=down.lora_A.weight.device)
            down.base_layer.dequantize_into(D[:, :I])
            D[:, I:].copy_(down.compute_adapters(dtype)[1])
            return D
        seen = adapter_versions((down,))  # as StackedWeights.matrix
        if seen != self._seen_down or not down.keep_compute_adapters:
            with torch.no_grad():
                D[:, I:].copy_(down.lora_B.weight * down.scaling)
            self._seen_down = seen
        return D


def can_fuse(gate, up, down, x: torch.Tensor) -> bool:
    """Plain LoRA (no dropout, no DoRA, adapters on) over frozen bias-free bases in x's dtype, gate and up of
    one kind (dense or NF4) and rank."""
    return can_stack((gate, up), x) and can_stack((down,), x)


def lora_mlp(x: torch.Tensor, weights: FusedMLPWeights, gate, up, down) -> torch.Tensor:
    """x (..., C) -> down(silu(gate(x)) * up(x)) (..., C); gate, up, down are LoRA layers (see can_fuse). x may
    come with 2r spare columns, (..., C + 2r), which it fills with x [A_g; A_u]^T (lora_stacked.spare_columns)."""
    a_down = down.compute_adapters(x.dtype)[0]
    return _LoRAMLP.apply(x, weights, (gate, up, down), gate.lora_A.weight, gate.lora_B.weight, up.lora_A.weight,
                          up.lora_B.weight, down.lora_A.weight, down.lora_B.weight, a_down)


class _LoRAMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, layers, a_gate, b_gate, a_up, b_up, a_down, b_down, a_w_down):
        C, I, r_down = weights.C, weights.I, weights.r_down
        gate, up, down = layers
        M = weights.gate_up.matrix((gate, up), x.dtype)  # (2I + 2r, C + 2r)
        x_cat = with_adapter_input(x, C, M[2 * I:, :C])  # (N, C + 2r): [x | x A_g^T | x A_u^T]
        N = x_cat.shape[0]
        # [gate | up] (N, 2I), adapters included, in a buffer 2r columns wider: the backward writes [dgate | dup |
        # dgate s B_g | dup s B_u] over it (see backward), where a second (N, 2I + 2r) buffer stood at its peak
        gate_up_cat = torch.empty(N, 2 * I + 2 * weights.r, dtype=x.dtype, device=x.device)
        gate_up = torch.mm(x_cat, M[:2 * I].t(), out=gate_up_cat[:, :2 * I])
        del M  # an NF4 base's M is made again in backward
        h_cat = torch.empty(N, I + r_down, dtype=x.dtype, device=x.device)  # [h | h A_down^T]
        if swiglu_lora.applies(gate_up, r_down):  # one kernel: h and its adapter product
            swiglu_lora.swiglu_lora_forward(gate_up[:, :I], gate_up[:, I:], a_w_down, h_cat)
        else:
            h_cat[:, :I] = swiglu_values(gate_up[:, :I], gate_up[:, I:])
            product_beside(h_cat, I, a_w_down.t())
        if recomputing():  # y is never read, only its grad_fn (nn/recomputation.py): no D, no matmul
            y = x_cat.new_empty(N, C)
        else:
            y = h_cat @ weights.down(down, x.dtype).t()  # (N, C): [h | h A^T] [W_down | s B_down]^T
        down_a = h_cat[:, I:].clone()  # (N, r): kept without the (N, I) h it sits beside
        ctx.save_for_backward(x_cat, gate_up_cat, down_a, a_w_down)
        ctx.weights, ctx.layers, ctx.x_shape = weights, layers, x.shape  # an NF4 base is dequantised again
        ctx.overwritten = False  # gate_up_cat, once the backward wrote the grads over it
        ctx.param_dtypes = tuple(p.dtype for p in (a_gate, b_gate, a_up, b_up, a_down, b_down))
        return y.view(*x.shape[:-1], C)

    @staticmethod
    def backward(ctx, grad_y):
        if ctx.overwritten:
            raise RuntimeError(
                "the fused LoRA MLP's backward writes the gradients over the gate and up activations its forward "
                "saved, so a second backward through the same graph (retain_graph=True) cannot run; switch the "
                "fused MLP off for that (model.disable_kernels(['lora_mlp']))")
        x_cat, gate_up_cat, down_a, a_w_down = ctx.saved_tensors
        weights, dtypes = ctx.weights, ctx.param_dtypes
        gate, up, down = ctx.layers
        I, C, r = weights.I, weights.C, weights.r
        I2 = 2 * I
        gate_up = gate_up_cat[:, :I2]  # (N, 2I)
        dy = grad_y.reshape(-1, grad_y.shape[-1]).to(gate_up.dtype)  # (N, C)
        x2, down_gate, down_up = x_cat[:, :C], x_cat[:, C:C + r], x_cat[:, C + r:]

        # [dy W_down | dy s B_down]: the base's share of grad h and the adapter's dy_b, one matmul (N-concat)
        grad_h_cat = dy @ weights.down(down, gate_up.dtype)  # (N, I + r_down)
        grad_h, dy_b = grad_h_cat[:, :I], grad_h_cat[:, I:]
        # [dgate | dup | dgate s B_g | dup s B_u]: the swiglu backward writes the first 2I columns. The kernel
        # writes each tile's dgate and dup where it read that tile's gate and up, after reading it: over
        # gate_up_cat, 235 MB fewer at an 8B layer's backward peak (4096 tokens).
        if swiglu_lora.applies(gate_up, weights.r_down):  # one kernel from grad h to [dgate | dup]
            d_cat, ctx.overwritten = gate_up_cat, True
            grad_a_down, (grad_b_gate, grad_b_up) = swiglu_lora.swiglu_lora_backward(
                grad_h, dy_b, a_w_down, gate_up[:, :I], gate_up[:, I:], d_cat[:, :I], d_cat[:, I:I2], down_gate,
                down_up)
        else:  # the composed ops are not written to run in place: a buffer of its own
            d_cat = torch.empty_like(gate_up_cat)  # (N, 2I + 2r)
            grad_h.addmm_(dy_b, a_w_down)  # the adapter's share, in place
            h = swiglu_values(gate_up[:, :I], gate_up[:, I:])  # recomputed: (N, I)
            grad_a_down = product_in_float32(dy_b.t(), h)  # (r, I)
            del h
            swiglu_grads_packed(grad_h, gate_up, d_cat)
            grad_b_gate = product_in_float32(d_cat[:, :I].t(), down_gate)  # (I, r)
            grad_b_up = product_in_float32(d_cat[:, I:I2].t(), down_up)
        del grad_h_cat, grad_h, dy_b
        grad_b_down = product_in_float32(dy.t(), down_a).mul_(down.scaling)  # (C, r)
        M = weights.gate_up.matrix((gate, up), gate_up.dtype)
        product_beside(d_cat, I2, M[:I2, C:])  # (N, 2r); M's block diagonal of s B_g, s B_u
        grad_x = input_grad(ctx.x_shape, d_cat, M[:, :C])  # (N, C), or wider with the spare columns
        del M
        # (2r, C): s (dgate B_g)^T x over s (dup B_u)^T x (s is in M's B blocks)
        grad_a = product_in_float32(d_cat[:, I2:].t(), x2)
        grad_b_gate, grad_b_up = grad_b_gate.mul_(gate.scaling), grad_b_up.mul_(up.scaling)  # float32
        return (grad_x, None, None,
                grad_a[:r].to(dtypes[0]), grad_b_gate.to(dtypes[1]), grad_a[r:].to(dtypes[2]),
                grad_b_up.to(dtypes[3]), grad_a_down.to(dtypes[4]), grad_b_down.to(dtypes[5]), None)
