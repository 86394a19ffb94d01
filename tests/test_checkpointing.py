"""Activation checkpointing modes: the same loss and gradients as keeping every activation."""

from pathlib import Path

import pytest
import torch

import lorafit
from lorafit.models.llama import CausalLM
from lorafit.models.loading import build_from_tensors
from lorafit.models.registry import model_config_from_hf
from tiny_models import tiny_hf_model


def _lora_model(device="cpu", dtype=torch.float32):
    hf = tiny_hf_model("llama")
    model = build_from_tensors(model_config_from_hf(hf.config.to_dict()), hf.state_dict().items(), dtype, torch.device(device), Path("tiny"))
    lorafit.apply_lora(model, r=4, alpha=8)
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)  # B = 0 at init would leave A without gradient
    return model


def _loss_and_grads(model: CausalLM, mode: str, device="cpu"):
    model.activation_checkpointing = mode
    ids = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(0)).to(device)
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_recomputed_layers_give_the_same_loss_and_gradients():
    model = _lora_model()
    loss, grads = _loss_and_grads(model, "none")
    for mode in ("layers", "offload"):  # on CPU "offload" has nowhere to offload to: it checkpoints in place
        loss2, grads2 = _loss_and_grads(model, mode)
        torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
        for name in grads:
            torch.testing.assert_close(grads2[name], grads[name], rtol=1e-6, atol=1e-7)


def test_unknown_mode_is_refused():
    model = _lora_model()
    with pytest.raises(ValueError, match="none, layers, offload"):
        _loss_and_grads(model, "sometimes")
    with pytest.raises(ValueError, match="1 modes for 2 layers"):
        model.activation_checkpointing = ["none"]


@pytest.mark.gpu
@pytest.mark.parametrize("plan", ["all", "all_but_the_last"])
def test_offloaded_layers_give_the_same_loss_and_gradients_on_gpu(plan):
    """Offloaded layers, fetched one ahead in backward (OffloadChain), bit for bit as keeping everything: they
    take the previous layer's MLP output unadded and leave theirs so (nn/checkpointing.py's takes_delta), as
    layers that keep their activations do, the residual add inside the next norm's kernel. A layer recomputed
    from its whole input ("layers") adds it itself, and its backward rounds the stream's grad twice where the
    norm kernel's rounds it once: the same loss, the gradients within bf16 rounding (on an H200 the largest
    gap, in layer 0's q_proj.lora_B, was 1.1% of that gradient's largest value, 1.9e-5 of 1.7e-3, device
    call 55); a lost or doubled residual grad would be of the gradient's own size."""
    model = _lora_model("cuda", torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    n = model.config.num_layers

    def plan_of(mode):
        return mode if plan == "all" else [mode] * (n - 1) + ["none"]

    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(model, "none", "cuda")
        loss1, grads1 = _loss_and_grads(model, plan_of("layers"), "cuda")
        loss2, grads2 = _loss_and_grads(model, plan_of("offload"), "cuda")
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
    torch.testing.assert_close(loss1, loss, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], rtol=0, atol=0)
        assert (grads1[name] - grads[name]).abs().max() <= 3e-2 * grads[name].abs().max(), name


@pytest.mark.gpu
def test_offloaded_inputs_wait_in_buffers_kept_between_micro_batches():
    """A CUDA graph replays the copies into the addresses it recorded: the pinned buffers outlive a
    micro-batch, a longer input replaces a buffer too small, and two forwards in flight never share one. Each
    layer but the first offloads two inputs: the stream and the previous layer's MLP output, unadded."""
    model = _lora_model("cuda", torch.bfloat16)
    n, pinned = model.config.num_layers, model.pinned_buffers
    inputs = 2 * n - 1
    addresses, sizes = [], []
    model.activation_checkpointing = "offload"
    for T in (13, 13, 7, 29):
        ids = torch.randint(0, 101, (2, T), device="cuda")
        model(ids, labels=ids).loss.backward()
        addresses.append(sorted(b.data_ptr() for b in pinned.free))
        sizes.append({b.numel() for b in pinned.free})
        assert len(pinned.free) == inputs and all(b.is_pinned() for b in pinned.free)
    assert addresses[0] == addresses[1] == addresses[2]  # 7 tokens fit the 13-token buffers
    assert sizes[3] == {size * 29 // 13 for size in sizes[0]} and len(sizes[0]) == 1
    ids = torch.randint(0, 101, (2, 29), device="cuda")
    first, second = model(ids, labels=ids).loss, model(ids, labels=ids).loss  # both wait for backward
    assert len(pinned.free) == 0
    (first + second).backward()
    assert len(pinned.free) == 2 * inputs and len({b.data_ptr() for b in pinned.free}) == 2 * inputs


@pytest.mark.parametrize("first, rest", [("offload", "none"), ("none", "layers")])
def test_a_plan_per_layer_gives_the_same_loss_and_gradients(first, rest):
    """Mixed plans: a layer that keeps its activations hands its MLP output on unadded only to a layer that
    keeps them too (models/llama.py's deferred residual add); before a checkpointed layer it adds it itself."""
    model = _lora_model()
    loss, grads = _loss_and_grads(model, "none")
    n = model.config.num_layers
    loss2, grads2 = _loss_and_grads(model, [first] * (n - 1) + [rest])
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], rtol=1e-6, atol=1e-7)


def test_a_checkpointed_layer_keeps_no_copies_of_its_adapters():
    """A checkpointed layer is there to save memory: its LoRA layers make their compute-dtype adapter copies at
    each call instead of keeping them (3.9 MB a layer of Llama-3.1-8B QLoRA; lora.py's keeps_adapter_copies),
    whether the plan was set before or after the adapters were applied."""
    hf = tiny_hf_model("llama")
    model = build_from_tensors(model_config_from_hf(hf.config.to_dict()), hf.state_dict().items(), torch.float32,
                               torch.device("cpu"), Path("tiny"))
    model.activation_checkpointing = ["layers", "none"]
    lorafit.apply_lora(model, r=4, alpha=8)
    first, second = (layer.self_attn.o_proj for layer in model.model.layers)
    for m in (first, second):
        assert m.compute_adapters(torch.bfloat16)[0].dtype == torch.bfloat16
    assert first._compute_adapters is None and second._compute_adapters is not None
    model.activation_checkpointing = "none"
    first.compute_adapters(torch.bfloat16)
    assert first._compute_adapters is not None
