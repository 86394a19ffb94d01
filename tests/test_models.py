"""Parity: lorafit's native models give transformers' logits on the same weights (DESIGN §4)."""

import pytest
import torch

import lorafit
from lorafit.models.llama import CausalLM
from lorafit.models.loading import build_from_tensors
from lorafit.models.registry import model_config_from_hf
from tiny_models import FAMILIES, tiny_hf_model


def native_copy(hf_model) -> CausalLM:
    config = model_config_from_hf(hf_model.config.to_dict())
    return build_from_tensors(config, hf_model.state_dict().items(), torch.float32, torch.device("cpu"), "test")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(family):
    hf = tiny_hf_model(family)
    ours = native_copy(hf)
    ids = torch.randint(0, 101, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids).logits
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_left_padded_batch_matches_unpadded_rows(family):
    hf = tiny_hf_model(family)
    ours = native_copy(hf)
    g = torch.Generator().manual_seed(2)
    long, short = torch.randint(0, 101, (1, 20), generator=g), torch.randint(0, 101, (1, 13), generator=g)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 7, dtype=torch.long), short], 1)])
    padding = torch.ones(2, 20, dtype=torch.long)
    padding[1, :7] = 0
    with torch.no_grad():
        both = ours(batch, attention_mask=padding).logits
        alone = ours(short).logits
        hf_both = hf(batch, attention_mask=padding).logits
    assert (both[1, 7:] - alone[0]).abs().max() <= 1e-4
    assert (both[:, -1] - hf_both[:, -1]).abs().max() <= 1e-4


def test_loss_is_mean_over_shifted_label_tokens():
    hf = tiny_hf_model("llama")
    ours = native_copy(hf)
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        ours_loss = ours(ids, labels=labels).loss
        hf_loss = hf(ids, labels=labels).loss
        logits = ours(ids).logits
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 101), labels[:, 1:].reshape(-1),
                                                  ignore_index=-100, reduction="sum")
    assert torch.allclose(ours_loss, per_token / (labels[:, 1:] != -100).sum(), atol=1e-6)
    assert torch.allclose(ours_loss, hf_loss, atol=1e-5)


def test_kv_cache_decoding_equals_full_forward():
    from lorafit.nn.kv_cache import KVCache

    ours = native_copy(tiny_hf_model("qwen3"))
    ids = torch.randint(0, 101, (3, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = ours(ids).logits
        cache = KVCache.for_model(ours, 3, 24)
        steps = [ours(ids[:, :10], cache=cache).logits]  # a prefix, then a chunk of 6, then one by one
        steps.append(ours(ids[:, 10:16], cache=cache).logits)
        steps += [ours(ids[:, t : t + 1], cache=cache).logits for t in range(16, 24)]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4


def test_load_model_from_sharded_directory(tmp_path, smollm2_dir):
    hf = tiny_hf_model("qwen2")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")  # forces several shards and an index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((smollm2_dir / name).read_bytes())
    model, tokenizer = lorafit.load_model(tmp_path, dtype="float32", device="cpu")
    ids = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() <= 1e-4
    assert tokenizer.encode("hello", add_special_tokens=False)
    assert model.model.embed_tokens.weight.device.type == "cpu"
    assert not any(p.is_meta for p in model.parameters())


def test_meta_init_allocates_nothing_before_loading():
    config = model_config_from_hf(FAMILIES["llama"]().to_dict())
    with torch.device("meta"):
        model = CausalLM(config)
    assert all(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_dtype_auto_is_float32_on_cpu():
    from lorafit.models.loading import resolve_dtype

    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="supported"):
        resolve_dtype("float8", torch.device("cpu"))


def test_loss_without_label_tokens_is_a_differentiable_zero():
    ours = native_copy(tiny_hf_model("llama"))
    ids = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(6))
    loss = ours(ids, labels=torch.full_like(ids, -100)).loss
    loss.backward()  # the accumulation loop weights it by 0 label tokens; it must not be NaN
    assert loss.item() == 0.0 and loss.requires_grad


def test_right_padded_batch_matches_unpadded_rows():
    """Training batches are right-padded and take the mask-free causal path: real tokens must not change."""
    hf = tiny_hf_model("qwen3")
    ours = native_copy(hf)
    g = torch.Generator().manual_seed(7)
    long, short = torch.randint(0, 101, (1, 20), generator=g), torch.randint(0, 101, (1, 13), generator=g)
    batch = torch.cat([long, torch.cat([short, torch.zeros(1, 7, dtype=torch.long)], 1)])
    padding = torch.ones(2, 20, dtype=torch.long)
    padding[1, 13:] = 0
    with torch.no_grad():
        both = ours(batch, attention_mask=padding).logits
        alone = ours(short).logits
        hf_both = hf(batch, attention_mask=padding).logits
    assert (both[1, :13] - alone[0]).abs().max() <= 1e-4
    assert (both[0] - hf_both[0]).abs().max() <= 1e-4 and (both[1, :13] - hf_both[1, :13]).abs().max() <= 1e-4
