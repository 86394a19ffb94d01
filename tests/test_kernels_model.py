"""The model with its fused kernels equals the model on the plain PyTorch path (CUDA; CPU always takes the
plain path)."""

from pathlib import Path

import pytest
import torch

import lorafit
from lorafit.models.loading import build_from_tensors
from lorafit.models.registry import model_config_from_hf
from tiny_models import tiny_hf_model


def _lora_model(family, device, dtype):
    hf = tiny_hf_model(family)
    model = build_from_tensors(model_config_from_hf(hf.config.to_dict()), hf.state_dict().items(), dtype,
                               torch.device(device), Path("tiny"))
    lorafit.apply_lora(model, r=4, alpha=8)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()  # float32 masters, as the SFT recipe keeps them
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    return model


def _loss_and_grads(model, kernels: bool, device, autocast_dtype=None):
    model.kernels = kernels
    ids = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(0)).to(device)
    labels = ids.clone()
    labels[:, :4] = -100  # a masked prompt
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = model(ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_kernels_switch_reaches_every_fused_module():
    model = _lora_model("llama", "cpu", torch.float32)
    model.kernels = False
    assert not model.kernels and not any(getattr(m, "fused", False) for m in model.modules())
    model.kernels = True
    assert all(m.fused for m in model.modules() if hasattr(type(m), "fused"))


def test_each_kernel_switches_off_alone():
    from lorafit.models.llama import MLP, Attention
    from lorafit.nn.norm import RMSNorm

    model = _lora_model("llama", "cpu", torch.float32)
    model.disable_kernels(["swiglu", "cross_entropy"])
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    assert not any(m.fused for m in mlps) and all(m.fused_lora for m in mlps) and not model.lm_head_fused
    assert all(m.fused for m in model.modules() if isinstance(m, (RMSNorm, Attention)))
    with pytest.raises(ValueError, match="unknown kernels"):
        model.disable_kernels(["swigloo"])
    config = lorafit.Config().with_overrides(["train.disable_kernels=[lora_mlp, rope]"])
    assert config.train.disable_kernels == ("lora_mlp", "rope")
    with pytest.raises(lorafit.ConfigError, match="disable_kernels"):
        lorafit.Config().with_overrides(["train.disable_kernels=[flash]"])


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_fused_model_equals_plain_model_float32(family):
    model = _lora_model(family, "cuda", torch.float32)
    loss, grads = _loss_and_grads(model, False, "cuda")
    loss2, grads2 = _loss_and_grads(model, True, "cuda")
    torch.testing.assert_close(loss2, loss, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_fused_model_close_to_plain_model_bfloat16_autocast():
    model = _lora_model("llama", "cuda", torch.bfloat16)
    loss, grads = _loss_and_grads(model, False, "cuda", torch.bfloat16)
    loss2, grads2 = _loss_and_grads(model, True, "cuda", torch.bfloat16)
    torch.testing.assert_close(loss2, loss, rtol=2e-2, atol=2e-2)
    for name in grads:
        assert (grads2[name] - grads[name]).norm() <= 0.05 * grads[name].norm() + 1e-6, name


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16_autocast"])
def test_training_mode_takes_the_fused_lora_functions_and_equals_the_plain_model(family, dtype):
    """In training mode q, k, v run as one function and the MLP as one (kernels/lora_stacked.py, lora_mlp.py),
    each reading [x | x A^T] from the norm's own output: the norm leaves the spare columns they fill."""
    model = _lora_model(family, "cuda", dtype).train()
    layer, C, r = model.model.layers[0], model.config.hidden_size, 4
    widths = {}
    for block in (layer.self_attn, layer.mlp):
        block.register_forward_pre_hook(lambda m, args: widths.__setitem__(type(m).__name__, args[0].shape[-1]))
    autocast = torch.bfloat16 if dtype == torch.bfloat16 else None
    loss, grads = _loss_and_grads(model, False, "cuda", autocast)
    assert widths == {"Attention": C, "MLP": C}
    loss2, grads2 = _loss_and_grads(model, True, "cuda", autocast)
    stacked = family != "qwen2"  # Qwen2's q, k, v biases take the separate layers' path
    assert widths == {"Attention": C + 3 * r if stacked else C, "MLP": C + 2 * r}
    assert (layer.self_attn.qkv_weights is not None) == stacked and layer.mlp.fused_weights is not None
    if dtype == torch.float32:
        torch.testing.assert_close(loss2, loss, rtol=1e-5, atol=1e-5)
        for name in grads:
            torch.testing.assert_close(grads2[name], grads[name], rtol=1e-4, atol=1e-5)
        return
    torch.testing.assert_close(loss2, loss, rtol=2e-2, atol=2e-2)
    for name in grads:
        assert (grads2[name] - grads[name]).norm() <= 0.05 * grads[name].norm() + 1e-6, name


@pytest.mark.gpu
def test_packed_documents_through_varlen_attention_equal_the_block_mask():
    from lorafit.data.packing import collate
    from lorafit.models.llama import PackedDocuments
    from lorafit.nn.attention import can_run_varlen
    from test_data import random_examples

    model = _lora_model("llama", "cuda", torch.bfloat16)
    docs = random_examples(5, vocab=101)
    batch = collate([docs[:3], docs[3:]], pad_id=0, packed=True)
    cuda = {k: v.cuda() for k, v in batch.items() if torch.is_tensor(v)}
    assert can_run_varlen(torch.device("cuda"), torch.bfloat16)  # PyTorch >= 2.10 has the kernel

    def loss_and_grads(documents):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(cuda["input_ids"], labels=cuda["labels"], attention_mask=cuda["attention_mask"],
                         position_ids=cuda["position_ids"], documents=documents).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = loss_and_grads(None)  # the dense block mask through SDPA
    loss2, grads2 = loss_and_grads(PackedDocuments(cuda["cu_seqlens"], batch["max_seqlen"]))
    torch.testing.assert_close(loss2, loss, rtol=2e-2, atol=2e-2)
    for name in grads:
        assert (grads2[name] - grads[name]).norm() <= 0.05 * grads[name].norm() + 1e-6, name
