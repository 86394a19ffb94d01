"""Rotary position embedding of q and k in one launch, as a Triton kernel.

One program per token rotates all of that token's query and key heads, so each (cos, signed_sin) row is
read once for both. With (x1, x2) the halves of a head and (c1, c2), (s1, s2) those of the tables:

    forward:   out1 = x1 * c1 + x2 * s1        out2 = x2 * c2 + x1 * s2
    backward:  grad1 = g1 * c1 + g2 * s2       grad2 = g2 * c2 + g1 * s1

The backward is the transpose of the forward, the same kernel with the sine halves swapped; for the model's
tables (c1 = c2 = cos, s1 = -sin, s2 = sin) that is the rotation by -angle. The tables get no gradient:
they are functions of the positions only. Computed in float32, rounded once on store.

Specification: reference.rope. Entry points: `rope` runs the op lorafit::rope (Triton on CUDA, the
reference elsewhere); `rope_triton` runs the Triton kernel, forward and backward, on any device (CPU
tensors need TRITON_INTERPRET=1): the tests' way in; `rope_into` rotates without autograd into given
outputs, in place or into rows of a wider matrix (kernels/lora_stacked.py's q, k, v function, forward and
backward).
"""

import torch

from . import eager_cuda, reference

try:  # CUDA builds of torch bring Triton; CPU-only installs have just the reference path
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:

    @triton.jit
    def _rotate_heads(
        src_ptr, dst_ptr, src_head_stride, n_heads, cos1, cos2, sin1, sin2,
        HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):
        """One token's (n_heads, D) heads: src (any head stride) -> dst (heads side by side; src itself for a
        rotation in place: every value is loaded before any is stored). Tables: (1, BLOCK_HALF)."""
        heads = tl.arange(0, BLOCK_HEADS)[:, None]  # (BH, 1)
        dims = tl.arange(0, BLOCK_HALF)[None, :]  # (1, BHALF)
        mask = (heads < n_heads) & (dims < HALF)
        src = src_ptr + heads * src_head_stride + dims
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        dst = dst_ptr + heads * (2 * HALF) + dims
        tl.store(dst, (x1 * cos1 + x2 * sin1).to(dst_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, (x2 * cos2 + x1 * sin2).to(dst_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
        n_tokens, n_q_heads, n_k_heads, q_out_token_stride, k_out_token_stride,
        q_batch_stride, q_token_stride, q_head_stride,
        k_batch_stride, k_token_stride, k_head_stride,
        table_batch_stride, table_token_stride,
        TRANSPOSE: tl.constexpr, HALF: tl.constexpr,
        BLOCK_Q_HEADS: tl.constexpr, BLOCK_K_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):
        pid = tl.program_id(0)  # one token: batch * n_tokens + token
        batch, token = (pid // n_tokens).to(tl.int64), (pid % n_tokens).to(tl.int64)
        q_src = q_ptr + batch * q_batch_stride + token * q_token_stride
        k_src = k_ptr + batch * k_batch_stride + token * k_token_stride
        # Outputs: (B, T, H, D) with a token's heads side by side and tokens a stride apart (B * T rows).
        q_dst = q_out_ptr + pid.to(tl.int64) * q_out_token_stride
        k_dst = k_out_ptr + pid.to(tl.int64) * k_out_token_stride
        dims = tl.arange(0, BLOCK_HALF)[None, :]  # (1, BHALF)
        dim_ok = dims < HALF
        table = batch * table_batch_stride + token * table_token_stride + dims
        cos1 = tl.load(cos_ptr + table, mask=dim_ok, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + table + HALF, mask=dim_ok, other=0.0).to(tl.float32)
        sin_first = tl.load(sin_ptr + table, mask=dim_ok, other=0.0).to(tl.float32)
        sin_second = tl.load(sin_ptr + table + HALF, mask=dim_ok, other=0.0).to(tl.float32)
        if TRANSPOSE:
            sin1, sin2 = sin_second, sin_first
        else:
            sin1, sin2 = sin_first, sin_second
        _rotate_heads(q_src, q_dst, q_head_stride, n_q_heads, cos1, cos2, sin1, sin2, HALF, BLOCK_Q_HEADS, BLOCK_HALF)
        _rotate_heads(k_src, k_dst, k_head_stride, n_k_heads, cos1, cos2, sin1, sin2, HALF, BLOCK_K_HEADS, BLOCK_HALF)


def _heads(t: torch.Tensor) -> torch.Tensor:
    """Unit stride along D, which the kernel assumes; any other strides are passed to it."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    if q.dim() != 4:
        raise ValueError(f"rope expects q of shape (B, T, H, D), got {tuple(q.shape)}")
    B, T, _, D = q.shape
    if k.dim() != 4 or k.shape[:2] != (B, T) or k.shape[3] != D or D % 2:
        raise ValueError(f"rope expects q (B, T, H, D) and k (B, T, Hkv, D), D even; got {q.shape} and {k.shape}")
    for name, table in (("cos", cos), ("signed_sin", signed_sin)):
        if table.dim() != 3 or table.shape[0] not in (1, B) or table.shape[1:] != (T, D):
            raise ValueError(f"rope expects {name} of shape ({B} or 1, {T}, {D}), got {tuple(table.shape)}")
    if len({q.dtype, k.dtype, cos.dtype, signed_sin.dtype}) != 1:
        raise ValueError("rope expects q, k, cos and signed_sin in one dtype (the activation dtype)")


def _rotate(q, k, cos, signed_sin, transpose: bool, q_out=None, k_out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: the forward rotation of q and k (B, T, H|Hkv, D), or its transpose for the backward, into new
    contiguous tensors or into q_out and k_out (see `rope_into`)."""
    if triton is None:
        raise RuntimeError("the Triton path needs the triton package (pip install triton)")
    _check(q, k, cos, signed_sin)
    q, k, cos, signed_sin = _heads(q), _heads(k), _heads(cos), _heads(signed_sin)
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if q_out is None else _rows(q_out, q)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k_out is None else _rows(k_out, k)
    if B * T == 0:
        return q_out, k_out
    if cos.stride() != signed_sin.stride():
        cos, signed_sin = cos.contiguous(), signed_sin.contiguous()
    block_q_heads, block_k_heads = triton.next_power_of_2(H), triton.next_power_of_2(Hkv)
    block_half = triton.next_power_of_2(D // 2)
    # At most 16 to 32 values per thread: Llama 3 8B's 32 + 8 heads of 128 (5120 a token) take 8 warps.
    values = (block_q_heads + block_k_heads) * 2 * block_half
    num_warps = 4 if values <= 2048 else 8 if values <= 8192 else 16
    _rope_kernel[(B * T,)](
        q, k, cos, signed_sin, q_out, k_out,
        T, H, Hkv, q_out.stride(1), k_out.stride(1),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1),
        TRANSPOSE=transpose, HALF=D // 2,
        BLOCK_Q_HEADS=block_q_heads, BLOCK_K_HEADS=block_k_heads, BLOCK_HALF=block_half,
        num_warps=num_warps,
    )
    return q_out, k_out


def _rows(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """out, checked to be what the kernel writes: like's shape and dtype, (B, T, H, D) with a token's heads side
    by side (strides (T s, s, D, 1) for some token stride s, e.g. columns of a (B * T, s) matrix)."""
    _, T, H, D = like.shape
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"rope: an output must be {like.dtype} {tuple(like.shape)} on {like.device}, not "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    s = out.stride(1)
    if out.stride() != (T * s, s, D, 1) or s < H * D:
        raise ValueError(f"rope: an output's rows must hold a token's heads side by side, not strides {out.stride()}")
    return out


def rope_into(q, k, cos, signed_sin, q_out, k_out, transpose: bool = False) -> None:
    """q (B, T, H, D) and k (B, T, Hkv, D) rotated into q_out and k_out: (B, T, H|Hkv, D) views whose tokens are
    rows of a wider matrix (kernels/lora_stacked.py's [q | k | v]), or q and k themselves, in place. transpose:
    the inverse rotation, the backward's. No autograd. The Triton kernel on CUDA, the reference elsewhere."""
    if eager_cuda(q):
        _rotate(q, k, cos, signed_sin, transpose, q_out, k_out)
        return
    _check(q, k, cos, signed_sin)
    rotated = _backward_op(q, k, cos, signed_sin) if transpose else reference.rope(q, k, cos, signed_sin)
    q_out.copy_(rotated[0])
    k_out.copy_(rotated[1])


class _RopeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, signed_sin):
        ctx.save_for_backward(cos, signed_sin)
        return _rotate(q, k, cos, signed_sin, transpose=False)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        return *_rotate(grad_q, grad_k, *ctx.saved_tensors, transpose=True), None, None


def rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor):
    """reference.rope through the Triton kernel, forward and backward, on any device."""
    return _RopeTriton.apply(q, k, cos, signed_sin)


# ---- the ops: torch.compile, the meta device and FSDP2 see through them ----


@torch.library.custom_op("lorafit::rope", mutates_args=())
def _rope_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-CUDA devices run the reference."""
    return reference.rope(q, k, cos, signed_sin)


@_rope_op.register_kernel("cuda")
def _(q, k, cos, signed_sin):
    return _rotate(q, k, cos, signed_sin, transpose=False)


def _fake_rotate(q, k, cos, signed_sin):
    _check(q, k, cos, signed_sin)
    return q.new_empty(q.shape), k.new_empty(k.shape)


_rope_op.register_fake(_fake_rotate)


@torch.library.custom_op("lorafit::rope_backward", mutates_args=())
def _backward_op(
    grad_q: torch.Tensor, grad_k: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (grad_q, grad_k). Non-CUDA devices run the reference's autograd, written out op for op in the
    same dtypes (autograd cannot run inside an op): the gradient of x.roll(D/2) * signed_sin is
    (g * signed_sin).roll(-D/2)."""
    cos, signed_sin = cos[:, :, None, :], signed_sin[:, :, None, :]  # (B, T, 1, D)

    def transpose(grad):
        return grad * cos + (grad * signed_sin).roll(-(grad.shape[-1] // 2), dims=-1)

    return transpose(grad_q), transpose(grad_k)


@_backward_op.register_kernel("cuda")
def _(grad_q, grad_k, cos, signed_sin):
    return _rotate(grad_q, grad_k, cos, signed_sin, transpose=True)


_backward_op.register_fake(_fake_rotate)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[2], inputs[3])  # cos, signed_sin


def _rope_backward(ctx, grad_q, grad_k):
    cos, signed_sin = ctx.saved_tensors
    return *_backward_op(grad_q, grad_k, cos, signed_sin), None, None


_rope_op.register_autograd(_rope_backward, setup_context=_setup_context)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor):
    """reference.rope as the op lorafit::rope: q (B, T, H, D), k (B, T, Hkv, D), cos and signed_sin
    (B or 1, T, D) in the activation dtype -> the rotated (q, k), new contiguous tensors."""
    _check(q, k, cos, signed_sin)
    if eager_cuda(q):
        return _RopeTriton.apply(q, k, cos, signed_sin)
    return _rope_op(q, k, cos, signed_sin)
