"""The fused LoRA linear (kernels/lora_linear.py) against its specification, forward and backward."""

import pytest
import torch

from lorafit.kernels import product_in_float32, reference
from lorafit.kernels.lora_linear import lora_linear


def _inputs(dtype, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, 72, generator=g).to(dtype).requires_grad_()  # (B, T, C_in), odd sizes
    weight = (torch.randn(100, 72, generator=g) * 0.1).to(dtype)
    b = (torch.randn(100, generator=g) * 0.1).to(dtype) if bias else None
    a = (torch.randn(5, 72, generator=g) * 0.1).requires_grad_()  # float32 masters, as training keeps them
    lb = (torch.randn(100, 5, generator=g) * 0.1).requires_grad_()
    return x, weight, b, a, lb


def _run(fn, dtype, bias):
    x, weight, b, a, lb = _inputs(dtype, bias)
    y = fn(x, weight, b, a, lb, 1.7)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.float(), x.grad.float(), a.grad, lb.grad


def _reference_in(dtype):
    def fn(x, weight, b, a, lb, s):
        return reference.lora_linear(x, weight, b, a.to(dtype), lb.to(dtype), s)
    return fn


@pytest.mark.parametrize("bias", [False, True])
def test_float32_equals_reference(bias):
    for got, want in zip(_run(lora_linear, torch.float32, bias), _run(_reference_in(torch.float32), torch.float32, bias)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_error_is_within_twice_the_references():
    exact = _run(_reference_in(torch.float32), torch.float32, True)
    ours = _run(lora_linear, torch.bfloat16, True)
    theirs = _run(_reference_in(torch.bfloat16), torch.bfloat16, True)
    for name, e, o, t in zip(["y", "grad x", "grad A", "grad B"], exact, ours, theirs):
        err_ours, err_ref = (o - e).abs().max().item(), (t - e).abs().max().item()
        assert err_ours <= 2 * err_ref + 1e-3, f"{name}: {err_ours} vs reference {err_ref}"


def test_grads_keep_the_adapter_dtype_and_the_base_must_be_frozen():
    x, weight, b, a, lb = _inputs(torch.bfloat16, False)
    lora_linear(x, weight, b, a, lb, 1.0).sum().backward()
    assert a.grad.dtype == torch.float32 and lb.grad.dtype == torch.float32
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, weight.requires_grad_(), b, a, lb, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_input_recomputed_in_backward_gives_the_same_result(dtype):
    from lorafit.kernels.lora_linear import swiglu_lora_linear

    def run(fn):
        g = torch.Generator().manual_seed(3)
        gate = torch.randn(2, 11, 72, generator=g).to(dtype).requires_grad_()  # (B, T, I)
        up = torch.randn(2, 11, 72, generator=g).to(dtype).requires_grad_()
        weight = (torch.randn(40, 72, generator=g) * 0.1).to(dtype)
        a = (torch.randn(5, 72, generator=g) * 0.1).requires_grad_()
        lb = (torch.randn(40, 5, generator=g) * 0.1).requires_grad_()
        y = fn(gate, up, weight, a, lb)
        (y.float() * torch.linspace(-1, 1, 40)).sum().backward()
        return y, gate.grad, up.grad, a.grad, lb.grad

    fused = run(lambda gate, up, w, a, lb: swiglu_lora_linear(gate, up, w, None, a, lb, 0.5))
    plain = run(lambda gate, up, w, a, lb: lora_linear(reference.swiglu(gate, up), w, None, a, lb, 0.5))
    for got, want in zip(fused, plain):  # the same operations in the same order: equal
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_of_a_packed_gate_up_equals_the_two_halves(dtype):
    """A stacked projection's [gate | up] (up None) gives the result and grads of gate and up passed apart."""
    from lorafit.kernels.lora_linear import swiglu_lora_linear

    g = torch.Generator().manual_seed(4)
    gate_up = torch.randn(2, 11, 2 * 37, generator=g).to(dtype)  # (B, T, 2I), I odd
    weight = (torch.randn(40, 37, generator=g) * 0.1).to(dtype)
    a = (torch.randn(5, 37, generator=g) * 0.1).requires_grad_()
    lb = (torch.randn(40, 5, generator=g) * 0.1).requires_grad_()
    dy = torch.randn(2, 11, 40, generator=g).to(dtype)
    packed = gate_up.clone().requires_grad_()
    grads = torch.autograd.grad(swiglu_lora_linear(packed, None, weight, None, a, lb, 0.5), [packed, a, lb], dy)
    gate, up = (t.clone().requires_grad_() for t in gate_up.chunk(2, dim=-1))
    apart = torch.autograd.grad(swiglu_lora_linear(gate, up, weight, None, a, lb, 0.5), [gate, up, a, lb], dy)
    # The same math; the reference SwiGLU backward on strided halves may round a last float32 bit otherwise.
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 1e-3}
    torch.testing.assert_close(grads[0], torch.cat(apart[:2], dim=-1), **tolerance)
    for got, want in zip(grads[1:], apart[2:]):
        torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_nf4_base_gives_its_dequantised_weights_result_and_keeps_no_dense_copy(dtype):
    """QLoRA: the NF4 layer is dequantised in forward and again in backward; what backward keeps is x and
    the adapters' small tensors, never the (C_out, C_in) weight."""
    from lorafit.nn.nf4 import NF4Linear
    from lorafit.kernels.lora_linear import swiglu_lora_linear

    x, weight, b, a, lb = _inputs(dtype, True)
    base = NF4Linear.from_weight(weight.float(), b, compute_dtype=dtype)
    dense = base.dequantized_weight()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        quantized = _run(lambda x, _, b, a, lb, s: lora_linear(x, base, b, a, lb, s), dtype, True)
        gate = torch.randn(2, 5, 72).to(dtype).requires_grad_()
        swiglu_lora_linear(gate, gate.detach().clone().requires_grad_(), base, b, a, lb, 0.5).sum().backward()
    assert tuple(dense.shape) not in saved
    for got, want in zip(quantized, _run(lambda x, _, b, a, lb, s: lora_linear(x, dense, b, a, lb, s), dtype, True)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same operations on the same numbers


@pytest.mark.gpu
def test_adapter_grads_come_out_of_the_gemm_in_float32():
    """bf16 operands (one transposed, as dy^T x is) give the float32 product without a 16-bit rounding: within
    float32 summation-order error of the product of the same values in float32."""
    x = torch.randn(4096, 48, device="cuda").bfloat16()
    dy = torch.randn(4096, 1000, device="cuda").bfloat16()
    got = product_in_float32(dy.t(), x)  # (1000, 48)
    expected = dy.t().float() @ x.float()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    rounded = (dy.t() @ x).float()  # what the bf16 product cast back gave: ~2**-9 relative error
    assert (rounded - expected).abs().max() > 10 * (got - expected).abs().max()
