"""The fused LoRA MLP (kernels/lora_mlp.py) against the three LoRA layers it replaces, composed as usual.

On CPU its ops run their reference paths (the Triton SwiGLU backward that writes into a packed buffer is
checked in Triton's interpreter below); @pytest.mark.gpu takes the model's own path on CUDA."""

import pytest
import torch

from lorafit.kernels.lora_mlp import FusedMLPWeights, can_fuse, lora_mlp
from lorafit.lora import LoRAConfig, LoRALinear
from lorafit.models.config import ModelConfig
from lorafit.models.llama import MLP


def _lora_mlp_module(dtype, C=72, I=200, r=4, seed=0):
    """An MLP of odd sizes with LoRA on all three projections, non-zero B, float32 adapter masters."""
    torch.manual_seed(seed)
    config = ModelConfig(model_type="llama", vocab_size=11, hidden_size=C, intermediate_size=I, num_layers=1,
                         num_heads=1, num_kv_heads=1, head_dim=C)
    mlp = MLP(config).to(dtype)
    for p in mlp.parameters():
        p.requires_grad_(False)
    lora = LoRAConfig(r=r, alpha=2 * r)
    for name in ("gate_proj", "up_proj", "down_proj"):
        layer = LoRALinear(getattr(mlp, name), lora)
        layer.lora_A.weight.data = layer.lora_A.weight.data.float()
        layer.lora_B.weight.data = torch.randn_like(layer.lora_B.weight, dtype=torch.float32) * 0.1
        setattr(mlp, name, layer)
    return mlp


def _adapters(mlp):
    return [getattr(mlp, n).lora_A.weight for n in ("gate_proj", "up_proj", "down_proj")] + \
           [getattr(mlp, n).lora_B.weight for n in ("gate_proj", "up_proj", "down_proj")]


def _run(fn, mlp, x, dy):
    x = x.detach().clone().requires_grad_()
    params = _adapters(mlp)
    y = fn(x)
    grads = torch.autograd.grad(y, [x] + params, dy)
    return [y.detach()] + [g.float() for g in grads]


def _composed(mlp):
    mlp.fused = mlp.fused_lora = False
    return lambda x: mlp(x)


def _fused(mlp, weights, spare_columns=0):
    """The fused MLP; spare_columns: x arrives as the norm leaves it, with that many unset (NaN) columns."""
    if not spare_columns:
        return lambda x: lora_mlp(x, weights, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    return lambda x: lora_mlp(_with_spare_columns(x, spare_columns), weights, mlp.gate_proj, mlp.up_proj,
                              mlp.down_proj)


def _with_spare_columns(x, n):
    """x (..., C) -> (..., C + n), the n columns NaN: autograd then takes the wider input's grad back to x."""
    return torch.cat([x, torch.full((*x.shape[:-1], n), float("nan"), dtype=x.dtype)], dim=-1)


@pytest.mark.parametrize("spare_columns", [0, 8], ids=["x", "x_with_spare_columns"])
def test_float32_equals_the_composed_layers(spare_columns):
    # 8 = 2r: the columns the post-attention norm leaves beside x (models/llama.py), NaN until filled.
    mlp = _lora_mlp_module(torch.float32)
    x, dy = torch.randn(2, 13, 72), torch.randn(2, 13, 72)
    expected = _run(_composed(mlp), mlp, x, dy)
    assert can_fuse(mlp.gate_proj, mlp.up_proj, mlp.down_proj, x)
    weights = FusedMLPWeights(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    got = _run(_fused(mlp, weights, spare_columns), mlp, x, dy)
    names = ["y", "grad x", "grad A gate", "grad A up", "grad A down", "grad B gate", "grad B up", "grad B down"]
    for name, g, e in zip(names, got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item(), msg=lambda m: f"{name}: {m}")


def test_inside_a_recomputation_the_down_projection_is_skipped_and_the_grads_are_the_same():
    """An offloaded layer's recomputation reads none of the MLP's output values (nn/recomputation.py): the
    fused MLP computes no y there and asks for D (dequantised, for a 4-bit base) only in backward."""
    from lorafit.nn.recomputation import recomputation

    mlp = _lora_mlp_module(torch.float32)
    x, dy = torch.randn(2, 13, 72), torch.randn(2, 13, 72)
    weights = FusedMLPWeights(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    expected = _run(_fused(mlp, weights, 8), mlp, x, dy)
    asked, down = [], weights.down
    weights.down = lambda *args: asked.append(args) or down(*args)
    with recomputation():
        got = _run(_fused(mlp, weights, 8), mlp, x, dy)
    assert len(asked) == 1  # backward's dy D
    assert got[0].shape == expected[0].shape and got[0].dtype == expected[0].dtype
    for g, e in zip(got[1:], expected[1:]):
        assert torch.equal(g, e)


def test_bfloat16_error_is_within_twice_the_composed_layers():
    """Against float32 composed layers on the same values, the fused bf16 path errs at most 2x as much as
    the composed bf16 path (it rounds once where the composed layers round after each GEMM and add)."""
    mlp32 = _lora_mlp_module(torch.float32)
    mlp16 = _lora_mlp_module(torch.bfloat16)
    x, dy = torch.randn(3, 17, 72).bfloat16(), torch.randn(3, 17, 72).bfloat16()
    oracle = _run(_composed(mlp32), mlp32, x.float(), dy.float())
    composed = _run(_composed(mlp16), mlp16, x, dy)
    mlp16b = _lora_mlp_module(torch.bfloat16)
    fused = _run(_fused(mlp16b, FusedMLPWeights(mlp16b.gate_proj, mlp16b.up_proj, mlp16b.down_proj)), mlp16b, x, dy)
    for i, (f, c, o) in enumerate(zip(fused, composed, oracle)):
        err_fused, err_composed = (f.float() - o).abs().max().item(), (c.float() - o).abs().max().item()
        assert err_fused <= 2 * err_composed + 1e-6, f"result {i}: {err_fused:.3g} > 2 x {err_composed:.3g}"


def test_the_base_weights_become_views_with_the_same_names_and_values():
    mlp = _lora_mlp_module(torch.float32)
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    weights = FusedMLPWeights(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    after = mlp.state_dict()
    assert list(after) == list(before)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    assert mlp.gate_proj.base_layer.weight.data_ptr() == weights.gate_up.M.data_ptr()
    assert mlp.down_proj.base_layer.weight.data_ptr() == weights.D.data_ptr()
    assert not any(getattr(mlp, n).base_layer.weight.requires_grad for n in ("gate_proj", "up_proj", "down_proj"))
    assert weights.holds(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    mlp.to(torch.float64)  # a moved model has new weight tensors: the fused weights know they are stale
    assert not weights.holds(mlp.gate_proj, mlp.up_proj, mlp.down_proj)


def test_changed_adapters_reach_the_fused_weights():
    """After an optimizer step (in place) or a reload (new tensors) the next pass uses the new values."""
    mlp = _lora_mlp_module(torch.float32)
    weights = FusedMLPWeights(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    x, dy = torch.randn(1, 9, 72), torch.randn(1, 9, 72)
    _run(_fused(mlp, weights), mlp, x, dy)
    with torch.no_grad():
        mlp.gate_proj.lora_B.weight.add_(0.5)  # in place, as AdamW steps
        mlp.down_proj.lora_B.weight.add_(0.5)
    mlp.up_proj.lora_A.weight.data = torch.randn_like(mlp.up_proj.lora_A.weight)  # replaced, as a load may
    got = _run(_fused(mlp, weights), mlp, x, dy)
    expected = _run(_composed(mlp), mlp, x, dy)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


def test_a_4bit_base_equals_the_composed_layers_and_keeps_no_dense_copy():
    """QLoRA: gate and up dequantised into a new M at every forward and backward (down likewise), nothing
    dense kept between calls; equal to the composed LoRA layers over the same NF4 bases."""
    from lorafit.nn.nf4 import NF4Linear

    mlp = _lora_mlp_module(torch.float32)
    for name in ("gate_proj", "up_proj", "down_proj"):
        layer = getattr(mlp, name)
        layer.base_layer = NF4Linear.from_linear(layer.base_layer, torch.float32)
    x, dy = torch.randn(2, 13, 72), torch.randn(2, 13, 72)
    expected = _run(_composed(mlp), mlp, x, dy)
    assert can_fuse(mlp.gate_proj, mlp.up_proj, mlp.down_proj, x)
    weights = FusedMLPWeights(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    assert weights.quantized and weights.gate_up.M is None and weights.D is None
    assert weights.holds(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    got = _run(_fused(mlp, weights), mlp, x, dy)
    assert weights.gate_up.M is None and weights.D is None
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())
    mlp.up_proj.base_layer = NF4Linear.from_linear(torch.nn.Linear(72, 200, bias=False), torch.float32)  # reload
    assert not weights.holds(mlp.gate_proj, mlp.up_proj, mlp.down_proj)


def test_what_the_fused_path_does_not_take():
    x = torch.randn(1, 3, 72)
    mlp = _lora_mlp_module(torch.float32)
    mlp.down_proj.disabled = True  # adapters off (DPO's reference): the plain layers
    assert not can_fuse(mlp.gate_proj, mlp.up_proj, mlp.down_proj, x)
    mlp = _lora_mlp_module(torch.float32)
    assert not can_fuse(mlp.gate_proj, mlp.up_proj, mlp.down_proj, x.bfloat16())  # dtype differs from the base
    mlp.up_proj = mlp.up_proj.base_layer  # no adapter on up
    assert not can_fuse(mlp.gate_proj, mlp.up_proj, mlp.down_proj, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_swiglu_backward_into_a_packed_buffer_triton(dtype):
    """The Triton SwiGLU backward writing [dgate | dup] into the first 2I columns of a wider buffer (CPU:
    Triton's interpreter) equals the op's reference; the columns after them are left alone."""
    pytest.importorskip("triton")
    from lorafit.kernels.swiglu import _backward_into

    device = "cuda" if torch.cuda.is_available() else "cpu"
    N, I, extra = 5, 37, 6
    gate_up = torch.randn(N, 2 * I, dtype=dtype, device=device)
    grad_out = torch.randn(N, I, dtype=dtype, device=device)
    out = torch.full((N, 2 * I + extra), 7.0, dtype=dtype, device=device)
    _backward_into(grad_out, gate_up[:, :I], gate_up[:, I:], out[:, :I], out[:, I:2 * I])
    reference = torch.full((N, 2 * I + extra), 7.0, dtype=dtype)
    torch.ops.lorafit.swiglu_backward_packed(grad_out.cpu(), gate_up.cpu(), reference)
    ulp = 2**-7 * reference.abs().max().item() if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.cpu(), reference, rtol=0, atol=ulp)
    assert (out[:, 2 * I:] == 7.0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_the_model_takes_the_fused_mlp_on_cuda_and_equals_the_plain_path(base):
    mlp = _lora_mlp_module(torch.bfloat16).cuda()
    if base == "nf4":
        from lorafit.nn.nf4 import NF4Linear

        for name in ("gate_proj", "up_proj", "down_proj"):
            layer = getattr(mlp, name)
            layer.base_layer = NF4Linear.from_linear(layer.base_layer, torch.bfloat16)
    x, dy = torch.randn(2, 64, 72, device="cuda").bfloat16(), torch.randn(2, 64, 72, device="cuda").bfloat16()
    mlp.fused = mlp.fused_lora = True
    got = _run(lambda t: mlp(t), mlp, x, dy)
    assert mlp.fused_weights is not None  # the fused path ran
    expected = _run(_composed(mlp), mlp, x, dy)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert (g.float() - e.float()).norm() <= 0.02 * e.float().norm() + 1e-6, i
