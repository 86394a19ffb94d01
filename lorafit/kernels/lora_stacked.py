"""LoRA layers that read the same input (q, k and v; gate and up) as one autograd function over one matrix.

For k layers with frozen weights W_i (O_i, C), adapters A_i (r, C), B_i (O_i, r) and scaling s, the adapters
ride in the inner dimension of the base's matmul (K-concatenation). For q, k, v:

    [x | x A^T] @ [W | B]^T = [q | k | v],   W = [W_q; W_k; W_v] (O, C),   A = [A_q; A_k; A_v] (3r, C),
                                             B = blockdiag(s B_q, s B_k, s B_v) (O, 3r),   O = q_dim + 2 kv_dim

and backward's grad x is one matmul over the same weights:  [dy | dy B] @ [W; A] = grad x.

Both read one matrix M = [[W, B], [A, 0]] (O + kr, C + kr): the forward its first O rows, the backward its
first C columns. Why: K grows by kr, 1.2% more FLOPs for Llama-3.1-8B's q, k, v, where the update as a pass
of its own, y += (x A^T) B^T, reads and writes all of y (N, O), and grad x += (dy B) A all of grad x (N, C).
The input needs kr columns beside it: the RMSNorm before it leaves them (`rms_norm(spare_columns=...)`,
models/llama.py), else x is copied into a wider matrix. The backward's [dy | dy B] costs nothing when q, k
and v come out as separate outputs: their grads are copied into it where autograd would have concatenated
them anyway (`separate=True`); a packed output's grad would need a copy of its own, so there the backward
adds (dy B) A to grad x in place instead.

Three layers over one input are then one function and 2 GEMMs forward (x A^T, then [x | x A^T] M^T), 4
backward (dy B, grad x, grad A, grad B), where three autograd functions ran 9 forward and 15 backward:
mostly host time saved (a Llama-3.2-1B micro-batch waited on the launching CPU, 77 ms launched for 41 ms
of GPU work on an H200, and each fused LoRA function call cost 68-85 us of it).

A dense base: M is one buffer and the model's weights become views into it (names, values and state_dict
unchanged; the kr extra rows and columns, mostly the adapters themselves, take 0.9 MiB a layer for 8B's q,
k, v and 2.0 MiB for its gate and up). Its adapter blocks are copied from the float32 masters whenever these
changed (an optimizer step, a loaded adapter). An NF4 base (QLoRA) is dequantised into a new M in forward
and again in backward (the NF4 kernel writes rows of a wider matrix), never kept; its adapter blocks are
kept, as a dense M's are, except in a checkpointed layer (lora.py's keeps_adapter_copies). The same M serves
the MLP's gate and up (kernels/lora_mlp.py).

For q, k, v the function also applies RoPE (`rotary`): q and k rotated in place in its output, their grads
rotated back into [dy | dy B]. The adapters' grads come out of their GEMMs in float32 (product_in_float32).
"""

import torch
from torch import nn

from . import product_in_float32
from .rope import rope_into


class StackedWeights:
    """M = [[W, blockdiag(s B_i)], [A, 0]] (O + kr, C + kr) of k LoRA layers that share an input."""

    def __init__(self, layers):
        base = layers[0].base_layer
        self.sizes = [m.out_features for m in layers]
        self.O, self.C, self.k = sum(self.sizes), base.in_features, len(layers)
        self.r = layers[0].lora_A.weight.shape[0]
        self.quantized = not isinstance(base, nn.Linear)
        self.M = None
        self._bases = tuple(m.base_layer for m in layers)
        if not self.quantized:
            kr = self.k * self.r
            self.M = base.weight.new_zeros(self.O + kr, self.C + kr)
            for m, start, size in self._blocks(layers):
                with torch.no_grad():
                    self.M[start:start + size, :self.C].copy_(m.base_layer.weight)
                m.base_layer.weight = nn.Parameter(self.M[start:start + size, :self.C], requires_grad=False)
        self._seen = None  # what the adapter blocks were written from (_write_adapters)
        self._adapters = None  # an NF4 base's (blockdiag(s B_i), A): kept, unlike its M

    def _blocks(self, layers):
        """(layer, first row, rows) of each layer's block of M."""
        starts = [sum(self.sizes[:i]) for i in range(self.k)]
        return zip(layers, starts, self.sizes)

    def holds(self, layers) -> bool:
        """False once the model's weights were moved or replaced (model.to(...), a reload): M is stale."""
        if {m.lora_A.weight.shape[0] for m in layers} != {self.r}:
            return False
        if self.quantized:
            return tuple(m.base_layer for m in layers) == self._bases
        return all(m.base_layer.weight.data_ptr() == self.M[start].data_ptr() for m, start, _ in self._blocks(layers))

    def matrix(self, layers, dtype: torch.dtype) -> torch.Tensor:
        """M with the adapters' current values, in dtype (an NF4 base: dequantised into a new M)."""
        if not self.quantized:
            self._write_adapters(layers, dtype)
            return self.M
        C, O = self.C, self.O
        M = torch.empty(O + self.k * self.r, C + self.k * self.r, dtype=dtype, device=layers[0].lora_A.weight.device)
        for m, start, size in self._blocks(layers):
            m.base_layer.dequantize_into(M[start:start + size, :C])
        if all(m.keeps_adapter_copies for m in layers):
            self._write_adapters(layers, dtype)
            B, A = self._adapters
            M[:O, C:].copy_(B)  # M[O:, C:] is never read
            M[O:, :C].copy_(A)
        else:  # a checkpointed layer's blocks: written straight into this M, none kept (lora.py)
            self._adapters = self._seen = None
            M[:O, C:].zero_()
            self._fill_blocks(layers, M[:O, C:], M[O:, :C])
        return M

    def _write_adapters(self, layers, dtype: torch.dtype) -> None:
        """blockdiag(s B_i) (O, kr) and [A_1; ...; A_k] (kr, C) in dtype, written from the float32 masters when
        these changed (adapter_versions: an optimizer step, one in 8 micro-batches at the anchor workload)
        into a dense base's M, or into blocks of their own that an NF4 base's M, made at every call, copies:
        2 copies where casting the masters each time took 3k + 1 small kernels, 4 calls a layer and
        micro-batch (an 8B QLoRA micro-batch ran 736 such casts, 2.1 ms on an H200, device call 43)."""
        seen = (adapter_versions(layers), dtype)
        if seen == self._seen and all(m.keep_compute_adapters for m in layers):
            return
        C, O, kr = self.C, self.O, self.k * self.r
        if not self.quantized:
            B, A = self.M[:O, C:], self.M[O:, :C]
        else:
            if self._adapters is None or self._adapters[0].dtype != dtype:
                device = layers[0].lora_A.weight.device
                self._adapters = (torch.zeros(O, kr, dtype=dtype, device=device),
                                  torch.empty(kr, C, dtype=dtype, device=device))
            B, A = self._adapters
        self._fill_blocks(layers, B, A)
        self._seen = seen

    def _fill_blocks(self, layers, B: torch.Tensor, A: torch.Tensor) -> None:
        """The adapters into B's diagonal blocks (s B_i) and A's rows (A_i); B's other blocks stay as they are."""
        r = self.r
        with torch.no_grad():
            for i, (m, start, size) in enumerate(self._blocks(layers)):
                B[start:start + size, i * r:(i + 1) * r].copy_(m.lora_B.weight * m.scaling)
                A[i * r:(i + 1) * r].copy_(m.lora_A.weight)


def adapter_versions(layers) -> tuple:
    """What a matrix made from these layers' adapters was made from: the adapters' storage and in-place
    versions (an optimizer step or a load changes them) and the scalings. Layers that keep no copies between
    calls (keep_compute_adapters off: FSDP2, CUDA graphs, lora.py) have theirs written on every call anyway."""
    params = [p for m in layers for p in (m.lora_A.weight, m.lora_B.weight)]
    return tuple((p.data_ptr(), p._version) for p in params) + tuple(m.scaling for m in layers)


def can_stack(layers, x: torch.Tensor) -> bool:
    """Plain LoRA (no dropout, no DoRA, adapters on) on every layer, one rank and scaling, bases of one kind
    (all dense or all NF4), no biases (Qwen2's q, k, v biases take the separate layers' path)."""
    return (all(hasattr(m, "lora_A") and not m.disabled and m._fused_path_applies(x) for m in layers)
            and len({type(m.base_layer) for m in layers}) == 1
            and all(m.base_layer.bias is None for m in layers)
            and len({m.lora_A.weight.shape[0] for m in layers}) == 1 and len({m.scaling for m in layers}) == 1)


def spare_columns(layers) -> int:
    """The columns the stacked function writes beside its input (x A^T, kr): what the norm before it leaves."""
    return len(layers) * layers[0].lora_A.weight.shape[0]


def product_beside(cat: torch.Tensor, K: int, weight: torch.Tensor) -> None:
    """cat[:, K:] = cat[:, :K] @ weight: a product of a matrix's first K columns written beside them (x A^T
    beside x, dy B beside dy). On CUDA cuBLAS writes it there itself (rows C + kr apart): no product of its
    own copied over, one kernel fewer per call (128-192 in an 8B micro-batch). On the CPU those columns are
    zeroed first: PyTorch 2.13's bf16 matmul on an Intel Xeon (oneDNN's AMX kernel, uxlfoundation/oneDNN
    issue 5717: K not a multiple of 32) reads a column slice's rows past its K columns and multiplies the
    excess by zeros, so unset memory there that happens to hold a NaN turned the product NaN (a flaky CPU
    test). cuBLAS reads the slice only."""
    if cat.device.type == "cpu":
        cat[:, K:].zero_()
        cat[:, K:] = cat[:, :K] @ weight
    else:
        torch.mm(cat[:, :K], weight.to(cat.dtype), out=cat[:, K:])  # out= takes no autocast: cast here


def with_adapter_input(x: torch.Tensor, C: int, A: torch.Tensor) -> torch.Tensor:
    """x (..., C), or (..., C + kr) with kr unset columns (see spare_columns) -> [x | x A^T] (N, C + kr),
    A (kr, C): written into x's own spare columns, else into a new matrix that x is copied into."""
    kr = A.shape[0]
    if x.shape[-1] == C + kr:
        # A view of x detached: autograd forbids saving a view, made without grad, of an input it tracks and
        # writes into (the autograd functions here compute x's grad themselves).
        x_cat = x.detach().view(-1, C + kr)  # the norm's output is contiguous
    else:
        x_cat = torch.empty(x.numel() // C, C + kr, dtype=x.dtype, device=x.device)
        x_cat[:, :C] = x.reshape(-1, C)
    product_beside(x_cat, C, A.t())  # (N, kr)
    return x_cat


def input_grad(x_shape: torch.Size, d_cat: torch.Tensor, M_columns: torch.Tensor) -> torch.Tensor:
    """grad x = d_cat @ M_columns (N, C) in x's shape: for an input with spare columns, written into the first C
    columns of a wider grad whose spare columns are zero (the norm's backward reads only the first C)."""
    C = M_columns.shape[1]
    if x_shape[-1] == C:
        return (d_cat @ M_columns).view(x_shape)
    grad = torch.empty(d_cat.shape[0], x_shape[-1], dtype=d_cat.dtype, device=d_cat.device)
    torch.mm(d_cat, M_columns, out=grad[:, :C])
    grad[:, C:].zero_()
    return grad.view(x_shape)


def lora_stacked(x: torch.Tensor, weights: StackedWeights, layers, separate: bool = False, rotary=None):
    """x (..., C) or (..., C + kr) with spare columns -> [y_1 | ... | y_k] (..., O), y_i = layers[i](x) (LoRA
    layers, see can_stack); separate: the tuple (y_1, ..., y_k) of views into it, which makes backward's
    [dy | dy B] free (see the module docstring). Split a packed result with .split(weights.sizes, -1).

    rotary: (cos, signed_sin) (B or 1, T, D) for q, k, v (x (B, T, C), separate): q and k come out rotated
    (kernels/rope.py), all three as (B, T, heads, D) views into one (B, T, O) buffer. The rotation runs in
    place there, and backward rotates q's and k's grads back straight into [dy | dy B]: no q and k of their
    own, and no copies of their grads (q's alone 1.4 ms of an 8B micro-batch on an H200, device call 43); v
    needs no copy to keep it alone either, as attention keeps all three."""
    params = [p for m in layers for p in (m.lora_A.weight, m.lora_B.weight)]
    if rotary is not None and not separate:
        raise ValueError("lora_stacked: rotary needs separate outputs (q, k, v)")
    return _StackedLoRA.apply(x, weights, tuple(layers), separate, rotary, *params)


class _StackedLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, layers, separate, rotary, *params):
        C, O = weights.C, weights.O
        M = weights.matrix(layers, x.dtype)  # (O + kr, C + kr)
        x_cat = with_adapter_input(x, C, M[O:, :C])  # (N, C + kr): [x | x A^T]
        y = x_cat @ M[:O].t()  # (N, O), the update included
        ctx.save_for_backward(x_cat, *([] if weights.quantized else [M]))
        ctx.weights, ctx.layers, ctx.separate, ctx.x_shape = weights, layers, separate, x.shape
        ctx.param_dtypes = tuple(p.dtype for p in params)
        ctx.rotary = rotary
        y = y.view(*x.shape[:-1], O)
        if rotary is None:
            return y.split(weights.sizes, -1) if separate else y
        head_dim = rotary[0].shape[-1]
        q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in y.split(weights.sizes, -1))  # (B, T, heads, D)
        rope_into(q, k, *rotary, q_out=q, k_out=k)
        return q, k, v

    @staticmethod
    def backward(ctx, *grads):
        x_cat, *saved = ctx.saved_tensors
        weights, r = ctx.weights, ctx.weights.r
        C, O = weights.C, weights.O
        M = saved[0] if saved else weights.matrix(ctx.layers, x_cat.dtype)  # an NF4 base: dequantised again
        N, x_shape = x_cat.shape[0], ctx.x_shape
        if ctx.separate:  # [dy | dy B] (N, O + kr): the grads copied where autograd would have joined them
            d_cat = torch.empty(N, O + weights.k * r, dtype=x_cat.dtype, device=x_cat.device)
            blocks = [(start, size) for _, start, size in weights._blocks(ctx.layers)]
            if ctx.rotary is not None:  # q's and k's grads rotated back into their columns
                d_q, d_k = (d_cat[:, s:s + n].view(*grad.shape) for (s, n), grad in zip(blocks[:2], grads))
                rope_into(grads[0], grads[1], *ctx.rotary, q_out=d_q, k_out=d_k, transpose=True)
                blocks, grads = blocks[2:], grads[2:]
            for grad, (start, size) in zip(grads, blocks):  # unused outputs: zeros
                d_cat[:, start:start + size] = grad.reshape(N, size)
            product_beside(d_cat, O, M[:O, C:])  # (N, kr): dy blockdiag(s B_i)
            dy, dy_b = d_cat[:, :O], d_cat[:, O:]
            grad_x = input_grad(x_shape, d_cat, M[:, :C]) if ctx.needs_input_grad[0] else None
        else:  # one packed grad: (dy B) A added to dy W in place rather than dy copied beside dy B
            dy = grads[0].reshape(N, O).to(x_cat.dtype)
            dy_b = dy @ M[:O, C:]  # (N, kr)
            grad_x = None
            if ctx.needs_input_grad[0] and x_shape[-1] == C:
                grad_x = dy @ M[:O, :C]  # (N, C)
                grad_x = grad_x.addmm_(dy_b, M[O:, :C]).view(x_shape)
            elif ctx.needs_input_grad[0]:  # an input with spare columns
                grad_x = input_grad(x_shape, torch.cat([dy, dy_b], 1), M[:, :C])
        del M
        grad_a = product_in_float32(dy_b.t(), x_cat[:, :C])  # (kr, C): s (dy_i B_i)^T x (s is in M's B blocks)
        # grad B_i = s dy_i^T (x A_i^T): the diagonal blocks of dy^T (x A^T), computed whole (k times the
        # needed blocks: 1.2% of dy W's FLOPs for 8B's q, k, v, against 0.4% for the blocks alone).
        grad_b = product_in_float32(dy.t(), x_cat[:, C:]).mul_(ctx.layers[0].scaling)  # (O, kr); one scaling
        out = []
        for i, (m, start, size) in enumerate(weights._blocks(ctx.layers)):
            out.append(grad_a[i * r:(i + 1) * r].to(ctx.param_dtypes[2 * i]))  # (r, C)
            out.append(grad_b[start:start + size, i * r:(i + 1) * r].to(ctx.param_dtypes[2 * i + 1]))
        return (grad_x, None, None, None, None, *out)
