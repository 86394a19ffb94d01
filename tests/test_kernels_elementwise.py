"""The fused RMSNorm, SwiGLU and RoPE kernels against their references (lorafit/kernels/reference.py).

On CPU the Triton kernels run in Triton's interpreter (tests/conftest.py) on small odd shapes, and the ops
run their reference path; @pytest.mark.gpu tests take realistic shapes through the ops on CUDA.

Tolerances. float32: 1e-5 relative to the largest expected value. bf16, the design's rule: the kernel's
largest error against the reference computed in float32 from the same bf16 values is at most 2x the
reference's own error when run in bf16, plus 1e-6. Under the interpreter a bf16 store truncates where the
GPU rounds to nearest (triton/runtime/interpreter.py casts float32 to bf16 without a rounding mode), which
adds up to one bf16 ulp: 2**-7 of the largest expected value.
"""

import functools

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from lorafit.kernels import reference  # noqa: E402
from lorafit.kernels.rms_norm import add_rms_norm, add_rms_norm_triton, rms_norm, rms_norm_triton  # noqa: E402
from lorafit.kernels.rope import _rotate, rope, rope_triton  # noqa: E402
from lorafit.kernels.swiglu import swiglu, swiglu_triton  # noqa: E402
from lorafit.nn.rope import RopeConfig, RotaryEmbedding  # noqa: E402

EPS = 1e-6
# The kernel tests' small odd shapes: compiled on a GPU when there is one, in the interpreter otherwise.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def run(fn, inputs, needs_grad, grad_outputs):
    """fn(*inputs) with the inputs as fresh leaves -> [outputs..., grads of the inputs that need them...]."""
    leaves = [t.detach().clone().requires_grad_(needed) for t, needed in zip(inputs, needs_grad)]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = torch.autograd.grad(outputs, [t for t in leaves if t.requires_grad], grad_outputs)
    return [o.detach() for o in outputs] + list(grads)


def check(kernel_fn, reference_fn, inputs, needs_grad, grad_outputs):
    """Compare kernel_fn with reference_fn, outputs and gradients. inputs and grad_outputs are in the dtype
    under test; the float32 oracle runs the reference on the same values upcast."""
    got = run(kernel_fn, inputs, needs_grad, grad_outputs)
    if inputs[0].dtype == torch.float32:
        expected = run(reference_fn, inputs, needs_grad, grad_outputs)
        for i, (g, e) in enumerate(zip(got, expected)):
            scale = e.abs().max().item()
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"result {i}: {m}")
        return
    oracle = run(reference_fn, [t.float() for t in inputs], needs_grad, [g.float() for g in grad_outputs])
    low_precision = run(reference_fn, inputs, needs_grad, grad_outputs)
    for i, (g, lp, e) in enumerate(zip(got, low_precision, oracle)):
        err_kernel = (g.float() - e).abs().max().item()
        err_reference = (lp.float() - e).abs().max().item()
        slack = 1e-6 + (2**-7 * e.abs().max().item() if g.device.type == "cpu" else 0.0)
        assert err_kernel <= 2 * err_reference + slack, (
            f"result {i}: kernel error {err_kernel:.3g} > 2 x reference bf16 error {err_reference:.3g} + {slack:.2g}"
        )


def randn(*shape, dtype, device="cpu", scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(device, dtype)


def norm_inputs(shape, dtype, device="cpu"):
    x = randn(*shape, dtype=dtype, device=device, seed=1)
    residual = randn(*shape, dtype=dtype, device=device, seed=2)
    weight = 1 + randn(shape[-1], dtype=torch.float32, scale=0.1, seed=3).to(device, dtype)
    return x, residual, weight, [randn(*shape, dtype=dtype, device=device, seed=s) for s in (4, 5)]


def rope_tables(batch, tokens, head_dim, dtype, device="cpu"):
    """(cos, signed_sin) (batch, tokens, D) as the model builds them, at scattered positions up to 4000."""
    positions = torch.randint(0, 4000, (batch, tokens), generator=torch.Generator().manual_seed(6))
    cos, signed_sin = RotaryEmbedding(RopeConfig(), head_dim)(positions, dtype)  # (B, 1, T, D)
    return cos[:, 0].to(device), signed_sin[:, 0].to(device)


# ---- the Triton kernels (in the interpreter on CPU) against the reference ----

# (37, 200): 16 rows per program, the last program half full; (2, 3, 4100): one 4100-column row per program.
NORM_SHAPES = [(37, 200), (2, 3, 4100)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("weight_trains", [True, False], ids=["full", "lora"])
def test_rms_norm_kernel(dtype, shape, weight_trains):
    x, _, weight, (grad, _) = norm_inputs(shape, dtype, KERNEL_DEVICE)
    check(
        lambda x, w: rms_norm_triton(x, w, EPS),
        lambda x, w: reference.rms_norm(x, w, EPS),
        [x, weight], [True, weight_trains], [grad],
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("weight_trains", [True, False], ids=["full", "lora"])
def test_add_rms_norm_kernel(dtype, shape, weight_trains):
    # Both outputs carry a gradient: the normed one into the next block, the total along the residual stream.
    x, residual, weight, grads = norm_inputs(shape, dtype, KERNEL_DEVICE)
    check(
        lambda x, r, w: add_rms_norm_triton(x, r, w, EPS),
        lambda x, r, w: reference.add_rms_norm(x, r, w, EPS),
        [x, residual, weight], [True, True, weight_trains], grads,
    )


@pytest.mark.parametrize("residual", [False, True], ids=["rms_norm", "add_rms_norm"])
def test_rms_norm_spare_columns_are_left_to_the_caller(residual):
    # The fused LoRA functions fill the spare columns (x A^T beside x) and hand back grads for them, which
    # the norm's backward must not read: they are NaN here, and the grads must equal those of the plain call.
    x, r, weight, (grad, grad_total) = norm_inputs((37, 200), torch.float32, KERNEL_DEVICE)
    norm = (lambda x, w, **kw: add_rms_norm_triton(x, r, w, EPS, **kw)) if residual else \
        (lambda x, w, **kw: (rms_norm_triton(x, w, EPS, **kw), None))
    leaves = [t.clone().requires_grad_() for t in (x, weight)]
    wide, total = norm(*leaves, spare_columns=7)
    assert wide.shape == (37, 207) and wide.stride() == (207, 1)
    wide_grad = torch.cat([grad, torch.full((37, 7), float("nan"), device=grad.device)], dim=1)
    got = torch.autograd.grad([wide] + ([total] if residual else []), leaves, [wide_grad] + [grad_total] * residual)
    plain, plain_total = norm(*leaves)
    expected = torch.autograd.grad([plain] + ([plain_total] if residual else []), leaves,
                                   [grad] + [grad_total] * residual)
    torch.testing.assert_close(wide[:, :200], plain, rtol=0, atol=0)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_spare_columns_need_the_eager_cuda_path():
    x, _, weight, _ = norm_inputs((3, 8), torch.float32)
    with pytest.raises(ValueError, match="spare_columns"):
        rms_norm(x, weight, EPS, spare_columns=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "halves_of_one_projection"])
def test_swiglu_kernel(dtype, fused):
    # (3, 13, 200): 39 rows of a 256-wide block. gate values up to ~±16 reach both of sigmoid's flat ends.
    grad = randn(3, 13, 200, dtype=dtype, device=KERNEL_DEVICE, seed=2)
    if fused:  # gate and up as the two halves of one (3, 13, 400) output: row stride 400, not 200

        def halves(fn):
            return lambda gate_up: fn(*gate_up.chunk(2, dim=-1))

        gate_up = randn(3, 13, 400, dtype=dtype, device=KERNEL_DEVICE, scale=4.0, seed=1)
        check(halves(swiglu_triton), halves(reference.swiglu), [gate_up], [True], [grad])
    else:
        gate = randn(3, 13, 200, dtype=dtype, device=KERNEL_DEVICE, scale=4.0, seed=1)
        up = randn(3, 13, 200, dtype=dtype, device=KERNEL_DEVICE, seed=3)
        check(swiglu_triton, reference.swiglu, [gate, up], [True, True], [grad])


B, T, H, HKV, D = 2, 7, 5, 3, 24  # D / 2 = 12 of a 16-wide block, 5 and 3 heads of 8- and 4-row blocks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["separate", "views_of_qkv"])
def test_rope_kernel(dtype, layout):
    cos, signed_sin = rope_tables(B, T, D, dtype, KERNEL_DEVICE)
    # Gradients as attention's backward hands them over: (B, H, T, D) memory seen as (B, T, H, D).
    grad_q = randn(B, H, T, D, dtype=dtype, device=KERNEL_DEVICE, seed=3).transpose(1, 2)
    grad_k = randn(B, HKV, T, D, dtype=dtype, device=KERNEL_DEVICE, seed=4).transpose(1, 2)
    if layout == "separate":
        q = randn(B, T, H, D, dtype=dtype, device=KERNEL_DEVICE, seed=1)
        k = randn(B, T, HKV, D, dtype=dtype, device=KERNEL_DEVICE, seed=2)
        check(
            lambda q, k: rope_triton(q, k, cos, signed_sin),
            lambda q, k: reference.rope(q, k, cos, signed_sin),
            [q, k], [True, True], [grad_q, grad_k],
        )
    else:  # q and k as views into one fused (B, T, (H + 2 Hkv) * D) projection output; tables of batch 1
        qkv = randn(B, T, H + 2 * HKV, D, dtype=dtype, device=KERNEL_DEVICE, seed=1)
        cos, signed_sin = cos[:1], signed_sin[:1]

        def split(fn):
            return lambda qkv: fn(qkv[:, :, :H], qkv[:, :, H : H + HKV], cos, signed_sin)

        check(split(rope_triton), split(reference.rope), [qkv], [True], [grad_q, grad_k])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_kernel_rotates_in_place_and_into_rows_of_a_wider_matrix(dtype):
    """As kernels/lora_stacked.py runs it: q and k rotated in place in one [q | k | v] output, and their grads
    rotated back into the columns of a wider [dq | dk | dv | ...] matrix. Bit for bit what the kernel writes
    into tensors of its own; the other columns untouched."""
    cos, signed_sin = rope_tables(B, T, D, dtype, KERNEL_DEVICE)
    width = (H + 2 * HKV) * D
    qkv = randn(B, T, width, dtype=dtype, device=KERNEL_DEVICE, seed=1)
    heads = lambda t, first, n: t[..., first * D:(first + n) * D].unflatten(-1, (n, D))  # noqa: E731
    q, k = heads(qkv, 0, H), heads(qkv, H, HKV)
    expected = _rotate(q, k, cos, signed_sin, transpose=False)
    untouched = qkv[..., (H + HKV) * D:].clone()
    _rotate(q, k, cos, signed_sin, False, q_out=q, k_out=k)
    assert torch.equal(q, expected[0]) and torch.equal(k, expected[1])
    assert torch.equal(qkv[..., (H + HKV) * D:], untouched)

    grad_q = randn(B, H, T, D, dtype=dtype, device=KERNEL_DEVICE, seed=3).transpose(1, 2)
    grad_k = randn(B, HKV, T, D, dtype=dtype, device=KERNEL_DEVICE, seed=4).transpose(1, 2)
    d_cat = torch.full((B * T, width + 5), 7.0, dtype=dtype, device=KERNEL_DEVICE)
    d_q, d_k = (heads(d_cat, first, n).view(B, T, n, D) for first, n in ((0, H), (H, HKV)))
    _rotate(grad_q, grad_k, cos, signed_sin, True, q_out=d_q, k_out=d_k)
    expected = _rotate(grad_q, grad_k, cos, signed_sin, transpose=True)
    assert torch.equal(d_q, expected[0]) and torch.equal(d_k, expected[1])
    assert bool((d_cat[:, (H + HKV) * D:] == 7).all())
    with pytest.raises(ValueError, match="side by side"):
        _rotate(grad_q, grad_k, cos, signed_sin, True, q_out=grad_q, k_out=grad_k)


def test_kernels_take_empty_inputs():
    x = torch.zeros(0, 3, 8, device=KERNEL_DEVICE, requires_grad=True)
    weight = torch.ones(8, device=KERNEL_DEVICE, requires_grad=True)
    out, total = add_rms_norm_triton(x, x, weight, EPS)
    (out.sum() + rms_norm_triton(x, weight, EPS).sum() + swiglu_triton(x, x).sum()).backward()
    assert total.shape == x.shape and x.grad.shape == x.shape and torch.equal(weight.grad, torch.zeros(8, device=KERNEL_DEVICE))
    q = torch.zeros(0, 5, 2, 8, device=KERNEL_DEVICE, requires_grad=True)
    ones, zeros = torch.ones(1, 5, 8, device=KERNEL_DEVICE), torch.zeros(1, 5, 8, device=KERNEL_DEVICE)
    q_rot, k_rot = rope_triton(q, q, ones, zeros)
    (q_rot.sum() + k_rot.sum()).backward()
    assert q.grad.shape == q.shape


# ---- the ops on CPU: their reference path, and their registrations ----


def op_cases(dtype):
    """(name, op, its reference, inputs, needs_grad, grad_outputs) for each op, on CPU."""
    x, residual, weight, grads = norm_inputs((37, 200), dtype)
    some = functools.partial(randn, dtype=dtype)
    gate, up = some(37, 200, scale=4.0, seed=7), some(37, 200, seed=8)
    q, k = some(B, T, H, D, seed=9), some(B, T, HKV, D, seed=10)
    grad_q, grad_k = some(B, T, H, D, seed=11), some(B, T, HKV, D, seed=12)
    cos, signed_sin = rope_tables(B, T, D, dtype)
    return [
        ("rms_norm", lambda x, w: rms_norm(x, w, EPS), lambda x, w: reference.rms_norm(x, w, EPS),
         [x, weight], [True, True], grads[:1]),
        ("add_rms_norm", lambda *a: add_rms_norm(*a, EPS), lambda *a: reference.add_rms_norm(*a, EPS),
         [x, residual, weight], [True, True, False], grads),
        ("swiglu", swiglu, reference.swiglu, [gate, up], [True, True], grads[:1]),
        ("rope", lambda q, k: rope(q, k, cos, signed_sin), lambda q, k: reference.rope(q, k, cos, signed_sin),
         [q, k], [True, True], [grad_q, grad_k]),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_on_cpu_are_the_reference(dtype):
    # Forward: the reference itself. Backward: its autograd written out, so equal up to summation order.
    for name, op, ref, inputs, needs_grad, grad_outputs in op_cases(dtype):
        got, expected = run(op, inputs, needs_grad, grad_outputs), run(ref, inputs, needs_grad, grad_outputs)
        n_outputs = len(got) - sum(needs_grad)
        for i, (g, e) in enumerate(zip(got, expected)):
            if i < n_outputs:
                assert torch.equal(g, e), f"{name} output {i}"
            else:
                torch.testing.assert_close(g, e, msg=lambda m: f"{name} gradient {i - n_outputs}: {m}")


def opcheck_cases(device):
    x, residual, weight, (grad, _) = norm_inputs((5, 3, 24), torch.float32, device)
    rstd = torch.rsqrt(x.pow(2).mean(-1) + EPS)
    some = functools.partial(randn, dtype=torch.float32, device=device)
    gate, up = some(5, 3, 40, seed=1), some(5, 3, 40, seed=2)
    q, k = some(B, T, H, D, seed=3), some(B, T, HKV, D, seed=4)
    cos, signed_sin = rope_tables(B, T, D, torch.float32, device)
    ops = torch.ops.lorafit
    return [
        (ops.rms_norm.default, (x.requires_grad_(), weight.requires_grad_(), EPS)),
        (ops.add_rms_norm.default, (x, residual.requires_grad_(), weight, EPS)),
        (ops.rms_norm_backward.default, (grad, grad, x.detach(), weight.detach(), rstd.detach(), True)),
        (ops.rms_norm_backward.default, (grad, None, x.detach(), weight.detach(), rstd.detach(), False)),
        (ops.swiglu.default, (gate.requires_grad_(), up.requires_grad_())),
        (ops.swiglu_backward.default, (grad[..., :1].expand(5, 3, 40), gate.detach(), up.detach())),
        (ops.rope.default, (q.requires_grad_(), k.requires_grad_(), cos, signed_sin)),
        (ops.rope_backward.default, (q.detach(), k.detach(), cos, signed_sin)),
    ]


def test_op_registrations_on_cpu():
    """Schemas, fake (meta) implementations, autograd registrations and AOT tracing, on the reference path."""
    for op, args in opcheck_cases("cpu"):
        torch.library.opcheck(op, args)


def test_ops_on_the_meta_device():
    x = torch.empty(4, 9, 64, device="meta", dtype=torch.bfloat16)
    weight = torch.empty(64, device="meta", dtype=torch.bfloat16)
    assert rms_norm(x, weight, EPS).shape == x.shape
    assert [t.shape for t in add_rms_norm(x, x, weight, EPS)] == [x.shape, x.shape]
    assert swiglu(x, x).device.type == "meta"
    q = torch.empty(4, 9, 8, 64, device="meta", dtype=torch.bfloat16)
    assert [t.shape for t in rope(q, q[:, :, :2], x, x)] == [q.shape, (4, 9, 2, 64)]


def test_mismatched_inputs_are_refused():
    x, residual, weight, _ = norm_inputs((3, 8), torch.bfloat16)
    with pytest.raises(ValueError, match="one dtype"):
        rms_norm(x, weight.float(), EPS)
    with pytest.raises(ValueError, match="one dtype"):
        add_rms_norm(x, residual.float(), weight, EPS)
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu(x, x[:, :4])
    with pytest.raises(ValueError, match="D even"):
        rope(torch.zeros(1, 2, 4, 6), torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 6), torch.zeros(1, 2, 6))


# ---- GPU: realistic shapes through the ops ----


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_trains", [True, False], ids=["full", "lora"])
def test_rms_norm_ops_on_gpu(dtype, weight_trains):
    x, residual, weight, grads = norm_inputs((4096, 4096), dtype, "cuda")
    check(
        lambda x, w: rms_norm(x, w, EPS), lambda x, w: reference.rms_norm(x, w, EPS),
        [x, weight], [True, weight_trains], grads[:1],
    )
    check(
        lambda x, r, w: add_rms_norm(x, r, w, EPS), lambda x, r, w: reference.add_rms_norm(x, r, w, EPS),
        [x, residual, weight], [True, True, weight_trains], grads,
    )
    x, _, weight, grads = norm_inputs((2, 2048, 32, 128), dtype, "cuda")  # Qwen3's per-head q norm, C = 128
    check(
        lambda x, w: rms_norm(x, w, EPS), lambda x, w: reference.rms_norm(x, w, EPS),
        [x, weight], [True, True], grads[:1],
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_op_on_gpu(dtype):
    some = functools.partial(randn, 4096, 14336, dtype=dtype, device="cuda")  # Llama 3 8B's I = 14336
    check(swiglu, reference.swiglu, [some(scale=4.0, seed=1), some(seed=2)], [True, True], [some(seed=3)])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_op_on_gpu(dtype):
    batch, tokens, heads, kv_heads, head_dim = 2, 2048, 32, 8, 128
    q = randn(batch, tokens, heads, head_dim, dtype=dtype, device="cuda", seed=1)
    k = randn(batch, tokens, kv_heads, head_dim, dtype=dtype, device="cuda", seed=2)
    cos, signed_sin = rope_tables(batch, tokens, head_dim, dtype, "cuda")
    grad_q = randn(batch, heads, tokens, head_dim, dtype=dtype, device="cuda", seed=3).transpose(1, 2)
    grad_k = randn(batch, kv_heads, tokens, head_dim, dtype=dtype, device="cuda", seed=4).transpose(1, 2)
    check(
        lambda q, k: rope(q, k, cos, signed_sin), lambda q, k: reference.rope(q, k, cos, signed_sin),
        [q, k], [True, True], [grad_q, grad_k],
    )


@pytest.mark.gpu
def test_op_registrations_on_gpu():
    for op, args in opcheck_cases("cuda"):
        torch.library.opcheck(op, args)
