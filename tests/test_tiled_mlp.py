"""The sequence-tiled MLP (nn/tiled_mlp.py) against the MLP run over all tokens at once, and what the memory
and time estimates count for it.

On CPU in float32 on a tiny random Llama with LoRA, the threshold lowered to 8 tokens and chunks of 5: the 2 x 37
tokens below are 14 chunks of 5 and a ragged one of 4. @pytest.mark.gpu: the fused CUDA kernels in bf16."""

import math
from pathlib import Path

import pytest
import torch

import lorafit
from lorafit.models.config import ModelConfig
from lorafit.models.llama import MLP
from lorafit.models.loading import build_from_tensors
from lorafit.models.registry import model_config_from_hf
from tiny_models import tiny_hf_model

B, T, CHUNK = 2, 37, 5


def _lora_model(dropout=0.0, device="cpu", dtype=torch.float32, quantize=None):
    hf = tiny_hf_model("llama")
    model = build_from_tensors(model_config_from_hf(hf.config.to_dict()), hf.state_dict().items(), dtype,
                               torch.device(device), Path("tiny"), quantize)
    lorafit.apply_lora(model, r=4, alpha=8, dropout=dropout, verbose=False)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()  # float32 masters, as the SFT recipe keeps them
        if "lora_B" in name:
            p.data.normal_(0, 0.1)  # B = 0 at init would leave A without gradient
    return model.train()  # LoRA dropout draws only in training mode


def _tile(model, tokens, chunk=CHUNK):
    """Every MLP tiles from `tokens` (None: never) in chunks of `chunk`."""
    for m in model.modules():
        if isinstance(m, MLP):
            m.tile_tokens, m.tile_chunk_tokens = tokens, chunk


def _mlp_run(fn, mlp, x, dy, seed=0):
    """[fn(x), grad x, grads of the MLP's trainable parameters], from one seed."""
    torch.manual_seed(seed)
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    grads = torch.autograd.grad(y, [x] + [p for p in mlp.parameters() if p.requires_grad], dy)
    return [y.detach(), *grads]


def _loss_and_grads(model, mode, device="cpu", seed=0):
    model.activation_checkpointing = mode
    ids = torch.randint(0, 101, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(got, expected, rtol=1e-5):
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(g, e, rtol=rtol, atol=rtol * e.abs().max().item(), msg=lambda m: f"{i}: {m}")


def _rows_seen(model) -> tuple[list[int], list]:
    """The row counts every gate projection is called with, and the hooks' handles."""
    rows, handles = [], []
    for m in model.modules():
        if isinstance(m, MLP):
            handles.append(m.gate_proj.register_forward_pre_hook(
                lambda _, args: rows.append(args[0].numel() // args[0].shape[-1])))
    return rows, handles


def test_the_tiled_mlp_equals_the_untiled_one_a_chunk_at_a_time():
    model = _lora_model()
    mlp = model.model.layers[0].mlp
    x, dy = torch.randn(B, T, 72), torch.randn(B, T, 72)
    _tile(model, None)
    expected = _mlp_run(mlp, mlp, x, dy)
    _tile(model, 8)
    rows, handles = _rows_seen(model)
    got = _mlp_run(mlp, mlp, x, dy)
    for h in handles:
        h.remove()
    assert rows == [CHUNK] * 14 + [4] + [CHUNK] * 14 + [4]  # the forward, then each chunk again in backward
    assert len(got) == 2 + 6  # y, grad x and the three adapters' A and B
    _assert_same(got, expected)


def test_inside_a_recomputation_the_forward_is_skipped_and_the_grads_are_the_same():
    """An offloaded layer's recomputation (nn/checkpointing.py) only rebuilds the autograd graph: the tiled
    MLP computes nothing there, and its backward, which runs every chunk again, gives the same grads."""
    from lorafit.nn.recomputation import recomputation, recomputing

    model = _lora_model()
    mlp = model.model.layers[0].mlp
    x, dy = torch.randn(B, T, 72), torch.randn(B, T, 72)
    _tile(model, 8)
    expected = _mlp_run(mlp, mlp, x, dy)
    rows, handles = _rows_seen(model)
    recomputed = []  # backward's chunks run inside a recomputation too: their outputs are only roots
    handles.append(mlp.down_proj.register_forward_pre_hook(lambda m, args: recomputed.append(recomputing())))
    with recomputation():
        got = _mlp_run(mlp, mlp, x, dy)
    for h in handles:
        h.remove()
    assert rows == [CHUNK] * 14 + [4]  # only backward's chunks
    assert recomputed == [True] * 15
    assert got[0].shape == expected[0].shape and got[0].dtype == expected[0].dtype
    _assert_same(got[1:], expected[1:])


def _chunk_after_chunk(mlp):
    """x (B, T, C) -> mlp(x), its chunks run in the tiled forward's order and recorded by autograd as usual."""
    def run(x):
        rows = x.reshape(-1, x.shape[-1])
        return torch.cat([mlp(rows[s:s + CHUNK]) for s in range(0, rows.shape[0], CHUNK)]).view(*x.shape[:-1], -1)
    return run


def test_lora_dropout_draws_are_replayed_in_the_recomputation():
    """With dropout the chunks draw their masks in turn: the same as running the chunks one after another under
    plain autograd, from the same seed. Were the recomputation to draw new masks, the grads would differ."""
    model = _lora_model(dropout=0.2)
    mlp = model.model.layers[0].mlp
    x, dy = torch.randn(B, T, 72), torch.randn(B, T, 72)
    chunk_after_chunk = _chunk_after_chunk(mlp)
    _tile(model, None)
    expected = _mlp_run(chunk_after_chunk, mlp, x, dy)
    state_after = torch.get_rng_state()
    assert not torch.equal(_mlp_run(chunk_after_chunk, mlp, x, dy, seed=1)[0], expected[0])  # dropout acts
    _tile(model, 8)
    got = _mlp_run(mlp, mlp, x, dy)
    _assert_same(got, expected)
    assert torch.equal(torch.get_rng_state(), state_after)  # the recomputation left the caller's state alone


def test_the_recomputation_runs_under_the_forwards_autocast():
    """Full fine-tuning of a float32 MLP on bf16 activations, its forward under CPU autocast (bf16 matmuls),
    backward outside it: each chunk's recomputation runs under autocast again (without, its float32 weights
    would meet bf16 inputs), so y and grad x are those of the chunks under plain autograd. The weights' grads
    are sums of the chunks' bf16 products: autograd adds them in bf16, the tiled MLP in float32."""
    config = ModelConfig(model_type="llama", vocab_size=11, hidden_size=72, intermediate_size=100, num_layers=1,
                         num_heads=1, num_kv_heads=1, head_dim=72)
    torch.manual_seed(0)
    mlp = MLP(config).train()
    x, dy = torch.randn(B, T, 72).bfloat16(), torch.randn(B, T, 72).bfloat16()

    def under_autocast(fn):
        def run(t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(t)
        return run

    mlp.tile_tokens = None
    expected = _mlp_run(under_autocast(_chunk_after_chunk(mlp)), mlp, x, dy)
    mlp.tile_tokens, mlp.tile_chunk_tokens = 8, CHUNK
    got = _mlp_run(under_autocast(mlp), mlp, x, dy)
    assert len(got) == 2 + 3 and all(p.dtype == torch.float32 for p in mlp.parameters())
    _assert_same(got[:2], expected[:2], rtol=1e-6)
    _assert_same(got[2:], expected[2:], rtol=1e-2)


@pytest.mark.parametrize("mode", ["none", "layers", "offload"])  # CPU "offload" recomputes in place
def test_a_tiled_model_gives_the_untiled_loss_and_gradients(mode):
    model = _lora_model()
    _tile(model, None)
    loss, grads = _loss_and_grads(model, "none")
    _tile(model, 8)
    loss2, grads2 = _loss_and_grads(model, mode)
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=1e-6)
    _assert_same([grads2[n] for n in grads], list(grads.values()))


def test_with_dropout_every_checkpointing_mode_gives_the_same_tiled_result():
    model = _lora_model(dropout=0.2)
    _tile(model, 8)
    loss, grads = _loss_and_grads(model, "none")
    for mode in ("layers", "offload"):
        loss2, grads2 = _loss_and_grads(model, mode)
        torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=1e-6)
        _assert_same([grads2[n] for n in grads], list(grads.values()))


def test_without_grad_the_tiled_forward_runs_chunk_by_chunk_and_equals_the_untiled_one():
    model = _lora_model()
    ids = torch.randint(0, 101, (B, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _tile(model, None)
        expected = model(ids).logits
        _tile(model, 8)
        rows, handles = _rows_seen(model)
        got = model(ids).logits
    for h in handles:
        h.remove()
    assert rows == ([CHUNK] * 14 + [4]) * model.config.num_layers
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---- the estimates -------------------------------------------------------------------------------------


def test_the_memory_estimate_keeps_only_the_mlp_input_from_the_threshold():
    from lorafit.memory import estimate_training_memory
    from test_memory import LLAMA_3_1_8B, _meta_lora_model

    model = _meta_lora_model(LLAMA_3_1_8B, r=16)
    I, r, n = 14336, 16, 32
    threshold, chunk = MLP.tile_tokens, MLP.tile_chunk_tokens

    def untiled_and_tiled(tokens, modes):
        _tile(model, None)
        untiled = estimate_training_memory(model, tokens, modes)
        _tile(model, threshold, chunk)
        return untiled, estimate_training_memory(model, tokens, modes)

    for tokens in (4096, threshold - 1):
        untiled, tiled = untiled_and_tiled(tokens, ["none"] * n)
        assert tiled == untiled
    for tokens in (threshold, 2 * threshold + 3):
        for modes in (["none"] * n, ["offload"] * n, ["layers"] * n, ["offload"] * 10 + ["none"] * 22):
            untiled, tiled = untiled_and_tiled(tokens, modes)
            mlp_kept = tokens * (2 * I + 2 * r + 3 * r) * 2  # gate and up, adapter columns, x A^T of 3 adapters
            mlp_grads = tokens * (3 * I // 2) * 2  # the MLP's share of a layer's backward (memory.py)
            recomputed = any(m != "none" for m in modes)  # the layer whose backward runs saved all again
            assert (tiled.weights, tiled.training_state) == (untiled.weights, untiled.training_state)
            assert untiled.activations - tiled.activations == modes.count("none") * mlp_kept
            assert untiled.workspace - tiled.workspace == (mlp_kept if recomputed else 0) + mlp_grads
            assert tiled.total < untiled.total


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_the_time_estimate_adds_the_recomputed_mlp_forward(method):
    """The 8B at one 128K sequence, every layer recomputed: the MLP forward once more (2 FLOPs per weight value
    of its projections and adapters), and with a 4-bit base each pass dequantising its weights per chunk.
    Every layer offloaded: the recomputation skips the tiled MLP's forward, so only the dequantisations, less
    down's in the backward's chunks (as the untiled recomputation skips it once)."""
    from lorafit import Config
    from lorafit.estimate import (DEQUANT_BANDWIDTH_SHARE, DEQUANT_BYTES_PER_VALUE, DEVICES, GPU_MFU,
                                  build_meta_model, micro_batch_seconds)
    from lorafit.nn.nf4 import NF4Linear
    from test_memory import LLAMA_3_1_8B

    hf = {"model_type": "llama", "vocab_size": 128256, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
          "max_position_embeddings": 131072, **LLAMA_3_1_8B}
    model = build_meta_model(Config.from_dict({"model": {"dtype": "bfloat16"},
                                               "finetune": {"method": method, "r": 16, "alpha": 16}}), hf)
    tokens, h200 = 131072, DEVICES["H200"]
    for mode in ("layers", "offload"):
        modes = [mode] * 32
        _tile(model, None)
        untiled = micro_batch_seconds(model, tokens, tokens, modes, method, h200)
        _tile(model, MLP.tile_tokens, MLP.tile_chunk_tokens)
        tiled = micro_batch_seconds(model, tokens, tokens, modes, method, h200)
        layers = [m for mlp in model.modules() if isinstance(mlp, MLP) for m in mlp.modules()]
        values = sum(m.in_features * m.out_features if isinstance(m, NF4Linear) else m.weight.numel()
                     for m in layers if isinstance(m, (NF4Linear, torch.nn.Linear)))
        once_more = mode == "layers"
        extra = once_more * tokens * 2 * values / (h200.tflops * 1e12 * GPU_MFU[mode])
        if method == "qlora":
            nf4 = sum(m.in_features * m.out_features for m in layers if isinstance(m, NF4Linear))
            # 3 passes (forward, recompute, backward) and, recomputed, the tiled recompute, each per chunk,
            # for 3 untiled
            chunks = math.ceil(tokens / MLP.tile_chunk_tokens)
            dequantized = ((3 + once_more) * chunks - 3) * nf4
            if mode == "offload":  # the recomputation's down, skipped (nn/recomputation.py): once a chunk
                downs = [m for mlp in model.modules() if isinstance(mlp, MLP) for m in mlp.down_proj.modules()]
                dequantized -= (chunks - 1) * sum(m.in_features * m.out_features for m in downs
                                                  if isinstance(m, NF4Linear))
            extra += dequantized * DEQUANT_BYTES_PER_VALUE / (h200.bandwidth_tbs * 1e12 * DEQUANT_BANDWIDTH_SHARE)
        assert tiled - untiled == pytest.approx(extra, rel=1e-9, abs=1e-12)


# ---- CUDA ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["none", "offload"])
@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["lora", "qlora"])
def test_tiled_equals_untiled_with_the_cuda_kernels_in_bfloat16(quantize, mode):
    """bf16 base (or NF4), float32 adapters, autocast: the fused LoRA MLP per chunk, offloaded layers
    recomputing through the tiled MLP."""
    model = _lora_model(device="cuda", dtype=torch.bfloat16, quantize=quantize)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _tile(model, None)
        loss, grads = _loss_and_grads(model, "none", "cuda")
        _tile(model, 8)
        loss2, grads2 = _loss_and_grads(model, mode, "cuda")
    assert model.model.layers[0].mlp.fused_weights is not None  # the fused LoRA MLP ran
    torch.testing.assert_close(loss2, loss, rtol=2e-2, atol=2e-2)
    for name in grads:
        assert (grads2[name] - grads[name]).norm() <= 0.02 * grads[name].norm() + 1e-6, name


@pytest.mark.gpu
def test_lora_dropout_is_replayed_on_cuda_in_offloaded_layers():
    """The CUDA generator's state per chunk: offloaded layers (their first forward without grad, then the
    recomputation, then each chunk's) draw what a layer keeping its activations draws."""
    model = _lora_model(dropout=0.2, device="cuda")
    _tile(model, 8)
    loss, grads = _loss_and_grads(model, "none", "cuda")
    loss2, grads2 = _loss_and_grads(model, "offload", "cuda")
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=1e-6)
    _assert_same([grads2[n] for n in grads], list(grads.values()), rtol=1e-4)
