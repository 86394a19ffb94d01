"""The LoRA MLP's fused SwiGLU kernels (kernels/swiglu_lora.py: forward to [h | h A^T], backward from grad h to
grad [gate | up]) against their specifications, and the LoRA functions that take them against their
composed paths.

Without a GPU the kernel runs in Triton's interpreter in float16: the interpreter's tl.dot gives garbage for
bfloat16 operands (Triton 3.9, checked on a 16 x 16 product), while the kernel's code is the same for both
16-bit types; bfloat16 runs on the GPU (@pytest.mark.gpu)."""

import pytest
import torch

from lorafit.kernels import lora_mlp, swiglu_lora

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _relative_error(got, expected) -> float:
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N, I, r, with_b", [(37, 70, 4, True), (100, 130, 16, False), (300, 64, 20, True),
                                              (1, 65, 1, True)])
def test_kernel_equals_the_specification(dtype, N, I, r, with_b):
    """Odd row and column counts, ranks padded to 16 or 32, inputs and outputs as views into wider buffers
    (gate and up are halves of a packed projection output, the grads land in a wider buffer, as lora_mlp
    lays them out), whose other columns stay untouched."""
    torch.manual_seed(0)
    kw = dict(dtype=dtype, device=DEVICE)
    gate_up = torch.randn(N, 2 * I + 3, **kw)
    gate, up = gate_up[:, :I], gate_up[:, I:2 * I]
    grad_h, dy_b, a = torch.randn(N, I, **kw), torch.randn(N, r, **kw), torch.randn(r, I, **kw) * 0.1
    low = torch.randn(N, 2 * r + 5, **kw)
    down_gate, down_up = (low[:, :r], low[:, r:2 * r]) if with_b else (None, None)
    out = torch.full((N, 2 * I + 1), 7.0, **kw)
    grad_a, grad_b = swiglu_lora.swiglu_lora_backward(grad_h, dy_b, a, gate, up, out[:, :I], out[:, I:2 * I],
                                                      down_gate, down_up)
    grad_gate, grad_up, grad_a_ref, grad_b_ref = swiglu_lora.reference_backward(grad_h, dy_b, a, gate, up,
                                                                                down_gate, down_up)
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
    assert _relative_error(out[:, :I], grad_gate) <= ulp
    assert _relative_error(out[:, I:2 * I], grad_up) <= ulp
    assert (out[:, 2 * I:] == 7.0).all()
    # h enters the small product rounded to the 16-bit type (as the composed path's stored h does)
    assert _relative_error(grad_a, grad_a_ref) <= 2 * ulp
    assert grad_a.dtype == torch.float32 and grad_a.shape == (r, I)
    if with_b:
        for got, expected in zip(grad_b, grad_b_ref):
            assert got.shape == (I, r) and _relative_error(got, expected) <= 2 * ulp
    else:
        assert grad_b is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N, I, r", [(37, 70, 4), (100, 130, 16), (300, 1100, 20), (1, 65, 1)])
def test_forward_kernel_equals_the_specification(dtype, N, I, r):
    """[h | h A^T] into a wider buffer (the columns after it untouched), odd sizes, column ranges split over
    programs (I = 1100), ranks padded."""
    torch.manual_seed(0)
    kw = dict(dtype=dtype, device=DEVICE)
    gate_up = torch.randn(N, 2 * I + 3, **kw)
    a = torch.randn(r, I, **kw) * 0.1
    out = torch.full((N, I + r + 2), 7.0, **kw)
    swiglu_lora.swiglu_lora_forward(gate_up[:, :I], gate_up[:, I:2 * I], a, out)
    expected = swiglu_lora.reference_forward(gate_up[:, :I], gate_up[:, I:2 * I], a)
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
    assert _relative_error(out[:, :I], expected[:, :I]) <= ulp
    assert _relative_error(out[:, I:I + r], expected[:, I:]) <= 2 * ulp
    assert (out[:, I + r:] == 7.0).all()


def test_kernel_sums_row_ranges_in_a_fixed_order():
    """Two runs give bit-identical grads (no atomics: CUDA graph replays equal eager runs)."""
    kw = dict(dtype=torch.float16, device=DEVICE)
    torch.manual_seed(1)
    N, I, r = 600, 64, 8
    args = [torch.randn(N, I, **kw), torch.randn(N, r, **kw), torch.randn(r, I, **kw), torch.randn(N, I, **kw),
            torch.randn(N, I, **kw)]
    runs = []
    for _ in range(2):
        out = torch.empty(N, 2 * I, **kw)
        grad_a, _ = swiglu_lora.swiglu_lora_backward(*args, out[:, :I], out[:, I:])
        runs.append((out, grad_a))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("with_b", [True, False], ids=["with_b", "without_b"])
def test_kernel_writes_the_grads_over_gate_and_up(with_b):
    """grad_gate and grad_up may be gate and up themselves (lora_mlp writes [dgate | dup] over the saved
    [gate | up]): each program reads a tile before it writes that tile's grads, so the results are the ones
    written into a buffer of their own, bit for bit; rows over several programs' ranges (N = 600)."""
    torch.manual_seed(3)
    kw = dict(dtype=torch.float16, device=DEVICE)
    N, I, r = 600, 130, 8
    gate_up = torch.randn(N, 2 * I + 6, **kw)
    grad_h, dy_b, a = torch.randn(N, I, **kw), torch.randn(N, r, **kw), torch.randn(r, I, **kw) * 0.1
    low = torch.randn(N, 2 * r, **kw)
    down = (low[:, :r], low[:, r:]) if with_b else (None, None)
    out = torch.empty(N, 2 * I, **kw)
    expected = swiglu_lora.swiglu_lora_backward(grad_h, dy_b, a, gate_up[:, :I], gate_up[:, I:2 * I], out[:, :I],
                                                out[:, I:], *down)
    spare = gate_up[:, 2 * I:].clone()
    got = swiglu_lora.swiglu_lora_backward(grad_h, dy_b, a, gate_up[:, :I], gate_up[:, I:2 * I], gate_up[:, :I],
                                           gate_up[:, I:2 * I], *down)
    assert torch.equal(gate_up[:, :2 * I], out) and torch.equal(gate_up[:, 2 * I:], spare)
    assert torch.equal(got[0], expected[0])
    if with_b:
        assert all(torch.equal(g, e) for g, e in zip(got[1], expected[1]))


def test_a_second_backward_through_the_fused_mlp_is_refused(monkeypatch):
    """The fused MLP's backward writes its grads over the activations it saved: a second backward through
    the same graph (retain_graph=True) raises rather than use them."""
    monkeypatch.setattr(swiglu_lora, "applies", lambda gate, r: swiglu_lora.can_run(gate, r))  # CPU: interpreted
    mlp = _mlp(torch.float16)
    weights = lora_mlp.FusedMLPWeights(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    x = torch.randn(2, 37, 72, dtype=torch.float16, device=DEVICE, requires_grad=True)
    y = lora_mlp.lora_mlp(x, weights, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        y.sum().backward()


def _mlp(dtype):
    from tests.test_kernels_lora_mlp import _lora_mlp_module

    return _lora_mlp_module(dtype).to(DEVICE)


def _grads(fn, mlp, x, dy):
    from tests.test_kernels_lora_mlp import _adapters

    x = x.detach().clone().requires_grad_()
    params = _adapters(mlp)
    y = fn(x)
    return [y.detach()] + [g.float() for g in torch.autograd.grad(y, [x] + params, dy)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["lora_mlp", "stacked gate|up", "separate gate, up"])
def test_lora_functions_with_the_kernel_equal_them_without(monkeypatch, dtype, path):
    """lora_mlp's backward and down's swiglu_lora_linear (the QLoRA MLP's path: gate and up packed from one
    stacked projection, or separate) give the same y and grads with the kernel as with the composed ops."""
    mlp = _mlp(dtype)
    torch.manual_seed(2)
    x = torch.randn(2, 37, 72, dtype=dtype, device=DEVICE)
    dy = torch.randn(2, 37, 72, dtype=dtype, device=DEVICE)
    weights = lora_mlp.FusedMLPWeights(mlp.gate_proj, mlp.up_proj, mlp.down_proj)

    def run(x):
        if path == "lora_mlp":
            return lora_mlp.lora_mlp(x, weights, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        if path == "stacked gate|up":
            return mlp.down_proj.forward_swiglu(torch.cat([gate, up], -1), None)
        return mlp.down_proj.forward_swiglu(gate, up)

    monkeypatch.setattr(swiglu_lora, "applies", lambda gate, r: False)
    expected = _grads(run, mlp, x, dy)
    monkeypatch.setattr(swiglu_lora, "applies", lambda gate, r: swiglu_lora.can_run(gate, r))
    taken = []
    for name in ("swiglu_lora_forward", "swiglu_lora_backward"):
        kernel = getattr(swiglu_lora, name)
        monkeypatch.setattr(swiglu_lora, name, lambda *a, name=name, kernel=kernel: taken.append(name) or kernel(*a))
    got = _grads(run, mlp, x, dy)
    assert set(taken) == ({"swiglu_lora_forward", "swiglu_lora_backward"} if path == "lora_mlp"
                          else {"swiglu_lora_backward"})
    names = ["y", "grad x", "grad A gate", "grad A up", "grad A down", "grad B gate", "grad B up", "grad B down"]
    for name, g, e in zip(names, got, expected):
        # the composed path rounds grad h to 16 bits before the SwiGLU backward, the kernel keeps it in float32
        tolerance = 0.02 if dtype == torch.bfloat16 else 0.003
        assert (g - e).norm() <= tolerance * e.norm() + 1e-6, name


@pytest.mark.gpu
def test_the_model_takes_the_kernel_on_cuda():
    mlp = _mlp(torch.bfloat16)
    x = torch.randn(2, 64, 72, device="cuda", dtype=torch.bfloat16)
    assert swiglu_lora.applies(x, mlp.down_proj.lora_A.weight.shape[0])
