"""LoRA layers over one input as one stacked function (kernels/lora_stacked.py), here q, k and v, against the
three LoRA layers it replaces.

Its math is plain PyTorch, so CPU tensors check it; @pytest.mark.gpu takes the model's own path on CUDA."""

import pytest
import torch

from lorafit.kernels.lora_stacked import StackedWeights, can_stack, lora_stacked
from lorafit.lora import LoRAConfig, LoRALinear
from lorafit.models.config import ModelConfig
from lorafit.models.llama import Attention
from lorafit.nn.nf4 import NF4Linear
from lorafit.nn.rope import RopeConfig, RotaryEmbedding

C, HEADS, KV_HEADS, HEAD_DIM = 72, 3, 1, 20  # odd sizes: q 60, k and v 20 each


def _attention(dtype, r=4, nf4=False, seed=0):
    """An attention block with LoRA on q, k, v (non-zero B, float32 adapter masters)."""
    torch.manual_seed(seed)
    config = ModelConfig(model_type="llama", vocab_size=11, hidden_size=C, intermediate_size=8, num_layers=1,
                         num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    attn = Attention(config).to(dtype)
    for p in attn.parameters():
        p.requires_grad_(False)
    lora = LoRAConfig(r=r, alpha=2 * r)
    for name in ("q_proj", "k_proj", "v_proj"):
        base = getattr(attn, name)
        if nf4:
            base = NF4Linear.from_weight(base.weight.float(), compute_dtype=dtype)
        layer = LoRALinear(base, lora)
        layer.lora_A.weight.data = layer.lora_A.weight.data.float()
        layer.lora_B.weight.data = torch.randn_like(layer.lora_B.weight, dtype=torch.float32) * 0.1
        setattr(attn, name, layer)
    return attn


def _layers(attn):
    return attn.q_proj, attn.k_proj, attn.v_proj


def _adapters(attn):
    return [p for m in _layers(attn) for p in (m.lora_A.weight, m.lora_B.weight)]


def _run(fn, attn, x, dy):
    x = x.detach().clone().requires_grad_()
    params = _adapters(attn)
    y = fn(x)
    grads = torch.autograd.grad(y, [x] + params, dy)
    return [y.detach()] + [g.float() for g in grads]


def _composed(attn):
    return lambda x: torch.cat([m(x) for m in _layers(attn)], dim=-1)


def _stacked(attn, weights, separate=False, spare_columns=0):
    """The stacked function, its outputs joined as the three layers' are; spare_columns: x arrives as the norm
    leaves it, with that many unset (NaN) columns."""
    def run(x):
        if spare_columns:
            x = torch.cat([x, torch.full((*x.shape[:-1], spare_columns), float("nan"), dtype=x.dtype)], dim=-1)
        y = lora_stacked(x, weights, _layers(attn), separate=separate)
        return torch.cat(y, dim=-1) if separate else y
    return run


NAMES = ["y", "grad x", "grad A q", "grad B q", "grad A k", "grad B k", "grad A v", "grad B v"]


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("separate", [False, True], ids=["packed", "separate"])
@pytest.mark.parametrize("spare_columns", [0, 12], ids=["x", "x_with_spare_columns"])
def test_float32_equals_the_three_layers(nf4, separate, spare_columns):
    # 12 = 3r: the columns input_layernorm leaves beside x (models/llama.py).
    attn = _attention(torch.float32, nf4=nf4)
    x, dy = torch.randn(2, 13, C), torch.randn(2, 13, HEADS * HEAD_DIM + 2 * KV_HEADS * HEAD_DIM)
    expected = _run(_composed(attn), attn, x, dy)
    assert can_stack(_layers(attn), x)
    got = _run(_stacked(attn, StackedWeights(_layers(attn)), separate, spare_columns), attn, x, dy)
    for name, g, e in zip(NAMES, got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item(), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("table_batch", [1, 2])
def test_rotary_float32_equals_the_three_layers_then_rope(nf4, table_batch):
    """With rotary tables the function rotates q and k in its output (and their grads back): the three
    layers followed by the reference RoPE, outputs and grads."""
    from lorafit.kernels import reference

    attn = _attention(torch.float32, nf4=nf4)
    positions = torch.randint(0, 500, (table_batch, 13), generator=torch.Generator().manual_seed(1))
    cos, sin = (t[:, 0] for t in RotaryEmbedding(RopeConfig(), HEAD_DIM)(positions, torch.float32))  # (Bt, T, D)
    x, dy = torch.randn(2, 13, C), torch.randn(2, 13, HEADS * HEAD_DIM + 2 * KV_HEADS * HEAD_DIM)

    def composed(x):
        q, k, v = (m(x).unflatten(-1, (-1, HEAD_DIM)) for m in _layers(attn))
        q, k = reference.rope(q, k, cos, sin)
        return torch.cat([t.flatten(2) for t in (q, k, v)], dim=-1)

    def stacked(x):
        x = torch.cat([x, torch.full((2, 13, 12), float("nan"))], dim=-1)  # the norm's 3r spare columns
        q, k, v = lora_stacked(x, weights, _layers(attn), separate=True, rotary=(cos, sin))
        assert q.shape == (2, 13, HEADS, HEAD_DIM) and v.shape == (2, 13, KV_HEADS, HEAD_DIM)
        return torch.cat([t.flatten(2) for t in (q, k, v)], dim=-1)

    weights = StackedWeights(_layers(attn))
    expected, got = _run(composed, attn, x, dy), _run(stacked, attn, x, dy)
    for name, g, e in zip(NAMES, got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item(), msg=lambda m: f"{name}: {m}")


def test_bfloat16_error_is_within_twice_the_three_layers():
    """Against float32 layers on the same values, the stacked bf16 path errs at most 2x as much as three
    bf16 layers do."""
    attn32, attn16, attn16b = _attention(torch.float32), _attention(torch.bfloat16), _attention(torch.bfloat16)
    x = torch.randn(3, 17, C).bfloat16()
    dy = torch.randn(3, 17, HEADS * HEAD_DIM + 2 * KV_HEADS * HEAD_DIM).bfloat16()
    oracle = _run(_composed(attn32), attn32, x.float(), dy.float())
    composed = _run(_composed(attn16), attn16, x, dy)
    stacked = _run(_stacked(attn16b, StackedWeights(_layers(attn16b)), separate=True), attn16b, x, dy)
    for name, s, c, o in zip(NAMES, stacked, composed, oracle):
        err_stacked, err_composed = (s.float() - o).abs().max().item(), (c.float() - o).abs().max().item()
        assert err_stacked <= 2 * err_composed + 1e-6, f"{name}: {err_stacked:.3g} > 2 x {err_composed:.3g}"


def test_dense_weights_become_views_with_the_same_names_and_values():
    attn = _attention(torch.float32)
    before = {k: v.clone() for k, v in attn.state_dict().items()}
    weights = StackedWeights(_layers(attn))
    after = attn.state_dict()
    assert list(after) == list(before)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    assert attn.q_proj.base_layer.weight.data_ptr() == weights.M.data_ptr()
    assert not attn.k_proj.base_layer.weight.requires_grad
    assert weights.holds(_layers(attn))
    attn.to(torch.float64)  # a moved model has new weight tensors: the stacked weight knows it is stale
    assert not weights.holds(_layers(attn))


def test_an_nf4_base_is_dequantised_on_demand_and_not_kept():
    attn = _attention(torch.float32, nf4=True)
    weights = StackedWeights(_layers(attn))
    assert weights.M is None and weights.holds(_layers(attn))
    x = torch.randn(1, 5, C, requires_grad=True)
    y = lora_stacked(x, weights, _layers(attn))
    O = HEADS * HEAD_DIM + 2 * KV_HEADS * HEAD_DIM
    assert all(t.shape[0] < O for t in y.grad_fn.saved_tensors)  # no dense (O + 3r, C + 3r) matrix saved


@pytest.mark.parametrize("checkpointed", [False, True], ids=["kept", "checkpointed"])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_changed_adapters_reach_the_stacked_weights(nf4, checkpointed):
    """After an optimizer step (in place) or a reload (new tensors) the next pass uses the new values (a dense
    base's M holds them, an NF4 base's cached blocks). In a checkpointed layer an NF4 base's blocks are made
    at every call and not kept (lora.py's keeps_adapter_copies)."""
    attn = _attention(torch.float32, nf4=nf4)
    for m in _layers(attn):
        m.in_checkpointed_layer = checkpointed
    weights = StackedWeights(_layers(attn))
    x, dy = torch.randn(1, 9, C), torch.randn(1, 9, HEADS * HEAD_DIM + 2 * KV_HEADS * HEAD_DIM)
    _run(_stacked(attn, weights), attn, x, dy)
    assert (weights._adapters is not None) == (nf4 and not checkpointed)
    with torch.no_grad():
        attn.k_proj.lora_B.weight.add_(0.5)  # in place, as AdamW steps
    attn.v_proj.lora_A.weight.data = torch.randn_like(attn.v_proj.lora_A.weight)  # replaced, as a load may
    got = _run(_stacked(attn, weights), attn, x, dy)
    expected = _run(_composed(attn), attn, x, dy)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


def test_what_the_stacked_path_does_not_take():
    x = torch.randn(1, 3, C)
    attn = _attention(torch.float32)
    attn.k_proj.disabled = True  # adapters off (DPO's reference): the plain layers
    assert not can_stack(_layers(attn), x)
    attn = _attention(torch.float32)
    assert not can_stack(_layers(attn), x.bfloat16())  # dtype differs from the base
    attn.k_proj.scaling = 0.5  # one scaling for all three
    assert not can_stack(_layers(attn), x)
    attn = _attention(torch.float32)
    attn.v_proj = attn.v_proj.base_layer  # no adapter on v
    assert not can_stack(_layers(attn), x)


@pytest.mark.gpu
@pytest.mark.parametrize("nf4", [False, True], ids=["lora", "qlora"])
def test_the_model_takes_the_stacked_projections_on_cuda_and_equals_the_three_layers(nf4):
    attn = _attention(torch.bfloat16, nf4=nf4).cuda()
    attn.train()
    x = torch.randn(2, 64, C, device="cuda").bfloat16()
    O = HEADS * HEAD_DIM + 2 * KV_HEADS * HEAD_DIM

    tables = RotaryEmbedding(RopeConfig(), HEAD_DIM).cuda()(torch.arange(64, device="cuda")[None], torch.bfloat16)

    def project(t):  # q and k rotated: in the stacked function's output, or by the kernel after the layers
        return torch.cat([p.flatten(2) for p in attn.project(t, *tables)], dim=-1)

    dy = torch.randn(2, 64, O, device="cuda").bfloat16()
    got = _run(project, attn, x, dy)
    assert attn.qkv_weights is not None  # the stacked path ran
    attn.fused_lora = False
    expected = _run(project, attn, x, dy)
    for name, g, e in zip(NAMES, got, expected):
        assert (g.float() - e.float()).norm() <= 0.02 * e.float().norm() + 1e-6, name


def _qlora_mlp(dtype, C=72, I=37, r=4, seed=0):
    """A Llama MLP over NF4 bases with LoRA on gate, up and down (non-zero B, float32 adapter masters)."""
    from lorafit.models.llama import MLP

    torch.manual_seed(seed)
    config = ModelConfig(model_type="llama", vocab_size=11, hidden_size=C, intermediate_size=I, num_layers=1,
                         num_heads=1, num_kv_heads=1, head_dim=C)
    mlp = MLP(config)
    lora = LoRAConfig(r=r, alpha=2 * r)
    for name in ("gate_proj", "up_proj", "down_proj"):
        base = NF4Linear.from_weight(getattr(mlp, name).weight.detach().float(), compute_dtype=dtype)
        layer = LoRALinear(base, lora)
        layer.lora_A.weight.data = layer.lora_A.weight.data.float()
        layer.lora_B.weight.data = torch.randn_like(layer.lora_B.weight, dtype=torch.float32) * 0.1
        setattr(mlp, name, layer)
    return mlp


def test_a_qlora_mlp_stacks_gate_and_up_and_passes_them_packed_to_down():
    """The QLoRA MLP's path: [gate | up] from one stacked function, into down's SwiGLU packed (up None)."""
    mlp = _qlora_mlp(torch.float32)
    layers = (mlp.gate_proj, mlp.up_proj)
    params = [p for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj) for p in (m.lora_A.weight, m.lora_B.weight)]
    x, dy = torch.randn(2, 9, 72), torch.randn(2, 9, 72)

    def run(fn):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        return [y.detach()] + list(torch.autograd.grad(y, [xi] + params, dy))

    assert can_stack(layers, x)
    weights = StackedWeights(layers)
    got = run(lambda t: mlp.down_proj.forward_swiglu(lora_stacked(t, weights, layers), None))
    mlp.fused = mlp.fused_lora = False
    expected = run(mlp)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["lora_mlp", "stacked"])
def test_the_qlora_mlp_takes_the_fused_paths_on_cuda_and_equal_the_plain_path(path):
    """The QLoRA MLP runs as one function (kernels/lora_mlp.py); with a down projection that function does not
    take (here: a dropout module, even of p = 0), gate and up still run as one stacked projection."""
    mlp = _qlora_mlp(torch.bfloat16).cuda()
    mlp.train()
    if path == "stacked":
        mlp.down_proj.lora_dropout = torch.nn.Dropout(0.0)
    params = [p for p in mlp.parameters() if p.requires_grad]
    x, dy = torch.randn(2, 64, 72, device="cuda").bfloat16(), torch.randn(2, 64, 72, device="cuda").bfloat16()

    def run():
        xi = x.clone().requires_grad_()
        y = mlp(xi)
        return [y.detach().float()] + [g.float() for g in torch.autograd.grad(y, [xi] + params, dy)]

    got = run()
    if path == "stacked":
        assert mlp.gate_up_stack is not None and mlp.fused_weights is None
    else:
        assert mlp.fused_weights is not None and mlp.fused_weights.quantized and mlp.gate_up_stack is None
    mlp.fused_lora = False
    for i, (g, e) in enumerate(zip(got, run())):
        assert (g - e).norm() <= 0.02 * e.norm() + 1e-6, i
