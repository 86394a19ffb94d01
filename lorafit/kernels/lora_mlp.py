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
its own either (6.0 ms of Llama-3.1-8B QLoRA's 259 ms micro-batch on an H200, device call 31).

D = [W_down | s B_down] (C, I + r) does for down what M does for gate and up: forward, [h | h A_down^T] @ D^T
is y with the update; backward, dy @ D = [grad h from W_down | dy s B_down]. Down's weight is a view into D
(or, over NF4, dequantised into a new D). h = silu(gate) * up is not kept: on CUDA in 16 bits one kernel
writes [h | h A_down^T], and one takes [grad h | dy s B_down] to [dgate | dup] with down's grad A and gate
and up's grad B (kernels/swiglu_lora.py).
"""

import torch
from torch import nn

from . import swiglu_lora
from .lora_stacked import can_stack
from .swiglu import swiglu_grads_packed, swiglu_values


class FusedMLPWeights:
    """M for one MLP's gate and up projections and D = [W_down | s B_down] (C, I + r_down) for down. Dense bases
    now hold views into them; 4-bit (NF4) bases are dequantised into a new M or D at every forward and again in
    backward, never kept (as kernels/lora_stacked.py does for them): 235 MB at a time for Llama-3.1-8B."""

    def __init__(self, gate, up, down):
        base = gate.base_layer
        (I, C), r = (base.out_features, base.in_features), gate.lora_A.weight.shape[0]
        self.I, self.C, self.r, self.r_down = I, C, r, down.lora_A.weight.shape[0]
        self.quantized = not isinstance(base, nn.Linear)
        self.M = self.D = None
        self._bases = (gate.base_layer, up.base_layer, down.base_layer)
        if not self.quantized:
            self.M = base.weight.new_zeros(2 * I + 2 * r, C + 2 * r)
            self.D = base.weight.new_zeros(C, I + self.r_down)
            with torch.no_grad():
                self.M[:I, :C].copy_(base.weight)
                self.M[I:2 * I, :C].copy_(up.base_layer.weight)
                self.D[:, :I].copy_(down.base_layer.weight)
            gate.base_layer.weight = nn.Parameter(self.M[:I, :C], requires_grad=False)
            up.base_layer.weight = nn.Parameter(self.M[I:2 * I, :C], requires_grad=False)
            down.base_layer.weight = nn.Parameter(self.D[:, :I], requires_grad=False)
        self._seen_gate_up = self._seen_down = None

    def holds(self, gate, up, down) -> bool:
        """False once the model's weights were moved or replaced (model.to(...), a reload): M and D are stale."""
        if (gate.lora_A.weight.shape[0], down.lora_A.weight.shape[0]) != (self.r, self.r_down):
            return False
        if self.quantized:
            return (gate.base_layer, up.base_layer, down.base_layer) == self._bases
        return (gate.base_layer.weight.data_ptr() == self.M.data_ptr()
                and up.base_layer.weight.data_ptr() == self.M[self.I].data_ptr()
                and down.base_layer.weight.data_ptr() == self.D.data_ptr())

    @staticmethod
    def _seen(layers) -> tuple:
        return tuple((p.data_ptr(), p._version) for m in layers for p in (m.lora_A.weight, m.lora_B.weight)) + \
            tuple(m.scaling for m in layers)

    def _stale(self, seen, kept, layers) -> bool:
        """Whether the adapter blocks must be copied: a new matrix, changed adapters, or layers that do not keep
        copies between calls (keep_compute_adapters off: FSDP2, CUDA graphs, lora.py)."""
        return self.quantized or seen != kept or not all(m.keep_compute_adapters for m in layers)

    def gate_up(self, gate, up, dtype: torch.dtype) -> torch.Tensor:
        """M with the adapters' current values, in dtype."""
        I, C, r, M = self.I, self.C, self.r, self.M
        seen = self._seen((gate, up))
        if not self._stale(seen, self._seen_gate_up, (gate, up)):
            return M
        if self.quantized:
            M = torch.empty(2 * I + 2 * r, C + 2 * r, dtype=dtype, device=gate.lora_A.weight.device)
            gate.base_layer.dequantize_into(M[:I, :C])
            up.base_layer.dequantize_into(M[I:2 * I, :C])
            M[:I, C + r:].zero_()
            M[I:2 * I, C:C + r].zero_()  # M[2I:, C:] is never read
        with torch.no_grad():
            M[:I, C:C + r].copy_(gate.lora_B.weight * gate.scaling)
            M[I:2 * I, C + r:].copy_(up.lora_B.weight * up.scaling)
            M[2 * I:2 * I + r, :C].copy_(gate.lora_A.weight)
            M[2 * I + r:, :C].copy_(up.lora_A.weight)
        self._seen_gate_up = None if self.quantized else seen
        return M

    def down(self, down, dtype: torch.dtype) -> torch.Tensor:
        """D = [W_down | s B_down] with the adapter's current values, in dtype."""
        I, D = self.I, self.D
        seen = self._seen((down,))
        if not self._stale(seen, self._seen_down, (down,)):
            return D
        if self.quantized:
            D = torch.empty(self.C, I + self.r_down, dtype=dtype, device=down.lora_A.weight.device)
            down.base_layer.dequantize_into(D[:, :I])
        with torch.no_grad():
            D[:, I:].copy_(down.lora_B.weight * down.scaling)
        self._seen_down = None if self.quantized else seen
        return D


def product_beside(cat: torch.Tensor, K: int, weight: torch.Tensor) -> None:
    """cat[:, K:] = cat[:, :K] @ weight: a product of a matrix's first K columns written beside them (h A^T
    beside h, dy B beside dy). Those columns are zeroed first: PyTorch 2.13's CPU matmul in bf16 reads a
    column slice's rows past its K columns and multiplies the excess by zeros, so unset memory there that
    happens to hold a NaN turned the product NaN (a flaky CPU test); on a GPU the zeros are one (N, r) fill."""
    cat[:, K:].zero_()
    cat[:, K:] = cat[:, :K] @ weight


def can_fuse(gate, up, down, x: torch.Tensor) -> bool:
    """Plain LoRA (no dropout, no DoRA, adapters on) over frozen bias-free bases in x's dtype, gate and up of
    one kind (dense or NF4) and rank."""
    return can_stack((gate, up), x) and can_stack((down,), x)


def lora_mlp(x: torch.Tensor, weights: FusedMLPWeights, gate, up, down) -> torch.Tensor:
    """x (..., C) -> down(silu(gate(x)) * up(x)) (..., C); gate, up, down are LoRA layers (see can_fuse)."""
    a_down = down.compute_adapters(x.dtype)[0]
    return _LoRAMLP.apply(x, weights, (gate, up, down), gate.lora_A.weight, gate.lora_B.weight, up.lora_A.weight,
                          up.lora_B.weight, down.lora_A.weight, down.lora_B.weight, a_down)


class _LoRAMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, layers, a_gate, b_gate, a_up, b_up, a_down, b_down, a_w_down):
        C, I, r_down = weights.C, weights.I, weights.r_down
        gate, up, down = layers
        M = weights.gate_up(gate, up, x.dtype)  # (2I + 2r, C + 2r)
        x2 = x.reshape(-1, C)  # (N, C)
        N = x2.shape[0]
        x_cat = torch.empty(N, M.shape[1], dtype=x.dtype, device=x.device)  # [x | x A_g^T | x A_u^T]
        x_cat[:, :C] = x2
        x_cat[:, C:] = x2 @ M[2 * I:, :C].t()  # (N, 2r)
        gate_up = x_cat @ M[:2 * I].t()  # (N, 2I): [gate | up], adapters included
        del M  # an NF4 base's M is made again in backward
        h_cat = torch.empty(N, I + r_down, dtype=x.dtype, device=x.device)  # [h | h A_down^T]
        if swiglu_lora.applies(gate_up, r_down):  # one kernel: h and its adapter product
            swiglu_lora.swiglu_lora_forward(gate_up[:, :I], gate_up[:, I:], a_w_down, h_cat)
        else:
            h_cat[:, :I] = swiglu_values(gate_up[:, :I], gate_up[:, I:])
            product_beside(h_cat, I, a_w_down.t())
        y = h_cat @ weights.down(down, x.dtype).t()  # (N, C): [h | h A^T] [W_down | s B_down]^T
        down_a = h_cat[:, I:].clone()  # (N, r): kept without the (N, I) h it sits beside
        ctx.save_for_backward(x_cat, gate_up, down_a, a_w_down)
        ctx.weights, ctx.layers = weights, layers  # frozen weights: an NF4 base's are dequantised again
        ctx.param_dtypes = tuple(p.dtype for p in (a_gate, b_gate, a_up, b_up, a_down, b_down))
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_y):
        x_cat, gate_up, down_a, a_w_down = ctx.saved_tensors
        weights, dtypes = ctx.weights, ctx.param_dtypes
        gate, up, down = ctx.layers
        I, C, r = weights.I, weights.C, weights.r
        N, I2 = gate_up.shape
        dy = grad_y.reshape(-1, grad_y.shape[-1]).to(gate_up.dtype)  # (N, C)
        x2, down_gate, down_up = x_cat[:, :C], x_cat[:, C:C + r], x_cat[:, C + r:]

        # [dy W_down | dy s B_down]: the base's share of grad h and the adapter's dy_b, one matmul (N-concat)
        grad_h_cat = dy @ weights.down(down, gate_up.dtype)  # (N, I + r_down)
        grad_h, dy_b = grad_h_cat[:, :I], grad_h_cat[:, I:]
        # [dgate | dup | dgate s B_g | dup s B_u]: the swiglu backward writes the first 2I columns.
        d_cat = torch.empty(N, I2 + 2 * r, dtype=gate_up.dtype, device=gate_up.device)
        if swiglu_lora.applies(gate_up, weights.r_down):  # one kernel from grad h to [dgate | dup]
            grad_a_down, (grad_b_gate, grad_b_up) = swiglu_lora.swiglu_lora_backward(
                grad_h, dy_b, a_w_down, gate_up[:, :I], gate_up[:, I:], d_cat[:, :I], d_cat[:, I:I2], down_gate,
                down_up)
        else:
            grad_h.addmm_(dy_b, a_w_down)  # the adapter's share, in place
            h = swiglu_values(gate_up[:, :I], gate_up[:, I:])  # recomputed: (N, I)
            grad_a_down = dy_b.t() @ h  # (r, I)
            del h
            swiglu_grads_packed(grad_h, gate_up, d_cat)
            grad_b_gate = d_cat[:, :I].t() @ down_gate  # (I, r)
            grad_b_up = d_cat[:, I:I2].t() @ down_up
        del grad_h_cat, grad_h, dy_b
        grad_b_down = (dy.t() @ down_a) * down.scaling  # (C, r)
        M = weights.gate_up(gate, up, gate_up.dtype)
        product_beside(d_cat, I2, M[:I2, C:])  # (N, 2r); M's block diagonal of s B_g, s B_u
        grad_x = d_cat @ M[:, :C]  # (N, C)
        del M
        grad_a = d_cat[:, I2:].t() @ x2  # (2r, C): s (dgate B_g)^T x over s (dup B_u)^T x (s is in M's B blocks)
        grad_b_gate, grad_b_up = grad_b_gate * gate.scaling, grad_b_up * up.scaling
        return (grad_x.view(grad_y.shape[:-1] + (C,)), None, None,
                grad_a[:r].to(dtypes[0]), grad_b_gate.to(dtypes[1]), grad_a[r:].to(dtypes[2]),
                grad_b_up.to(dtypes[3]), grad_a_down.to(dtypes[4]), grad_b_down.to(dtypes[5]), None)
