"""Export of the real default model, fine-tuned (rsLoRA, random B): `lorafit merge` to a Hugging Face
directory that transformers loads, `lorafit export gguf` (f16, q8_0) read back by lorafit's GGUF loader, the
LoRA adapter GGUF, the tokenizer round trip and the Ollama Modelfile.

Oracles: PEFT's own merge (merge_and_unload) of the same adapter in transformers; the float32 merged model
with its weights rounded as the GGUF type rounds them; the adapter's own A, B and scaling.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import lorafit
from finetuned_default import NEW_TOKENS, RANK, greedy, make_adapter, prompt_ids
from lorafit.export import adapter_checks, load_adapter_model, write_modelfile
from lorafit.export.gguf_vocab import round_trip_texts
from lorafit.models.gguf import gguf_to_hf_rotary_rows
from lorafit.models.gguf_file import read_directory
from lorafit.models.loading import read_base_weights

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapter_dir(smollm2_dir, tmp_path_factory):
    return make_adapter(smollm2_dir, tmp_path_factory.mktemp("export") / "adapter")


@pytest.fixture(scope="module")
def adapter_model(adapter_dir):
    """(the default model with the adapter, tokenizer): what lorafit serves before merging."""
    return load_adapter_model(adapter_dir)


@pytest.fixture(scope="module")
def merged(adapter_model):
    model, tokenizer = adapter_model
    return lorafit.merge_lora(copy.deepcopy(model)), tokenizer


def chat_texts(tokenizer) -> list[str]:
    conversations = [[{"role": "user", "content": "Who are you?"}],
                     [{"role": "user", "content": "Add 17 and 25."}, {"role": "assistant", "content": "17 + 25 = 42."},
                      {"role": "user", "content": "Now in words, s'il vous plaît — 🙂"}]]
    return round_trip_texts(tokenizer) + [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]


def test_merged_directory_loads_in_transformers(merged, tmp_path):
    """Sharded with an index, as large models are saved; the CLI path is tested on a tiny model
    (test_export_gguf.py), here the API writes what `lorafit merge` writes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = merged
    out = lorafit.save_model(model, tokenizer, tmp_path / "merged", max_shard_bytes=150 * 1024**2)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2,
                                                                         "pad_token_id": 2}
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()

    hf_merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    for text in chat_texts(tokenizer):
        assert hf_tokenizer(text).input_ids == tokenizer(text).input_ids, text
    ours = model.state_dict()
    assert all(torch.equal(w, ours[n]) for n, w in hf_merged.state_dict().items())  # the merged weights, bit for bit
    ids = torch.tensor(prompt_ids(tokenizer)[:1])
    with torch.no_grad():
        difference = (hf_merged(ids).logits - model(ids).logits).abs().max().item()
    print(f"merged directory in transformers vs lorafit's merged model: max |logit diff| {difference:.2e}")
    # The bar. Both decoders do the same float32 operations in the same order (0.0 here, 2026-11-30),
    # and the weights equal PEFT's merge_and_unload bit for bit.
    assert difference <= 1e-5


def test_gguf_f16_of_the_finetuned_model(merged, tmp_path):
    model, tokenizer = merged
    out = lorafit.export_gguf(model, tokenizer, tmp_path / "model-f16.gguf")
    write_modelfile(tokenizer, out)
    back, back_tokenizer = lorafit.load_model(out, dtype="float32", device="cpu")

    # The file holds exactly the merged weights rounded to float16 (norms in float32).
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
    prompts = prompt_ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(back(torch.tensor(prompts[:1])).logits, rounded(torch.tensor(prompts[:1])).logits)
    f16_tokens, f32_tokens = greedy(back, prompts), greedy(model, prompts)
    for prompt, a, b in zip(prompts, f16_tokens, f32_tokens, strict=True):
        print(f"{tokenizer.decode(prompt[-8:])!r} -> f16 GGUF {tokenizer.decode(a)!r} | float32 {tokenizer.decode(b)!r}")
    assert f16_tokens == f32_tokens and all(len(t) == NEW_TOKENS for t in f16_tokens)

    for text in chat_texts(tokenizer):
        assert back_tokenizer(text).input_ids == tokenizer(text).input_ids, text
    assert back_tokenizer.chat_template == tokenizer.chat_template
    assert (tmp_path / "Modelfile").read_text() == MODELFILE


MODELFILE = '''# Ollama Modelfile written by lorafit. In this directory: ollama create NAME -f Modelfile
FROM ./model-f16.gguf
TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""
PARAMETER stop "<|im_end|>"
PARAMETER stop "<|im_start|>"
'''


def test_gguf_q8_0_logits_are_close(merged, tmp_path):
    model, tokenizer = merged
    path = lorafit.export_gguf(model, tokenizer, tmp_path / "model-q8_0.gguf", qtype="q8_0")
    back, _ = lorafit.load_model(path, dtype="float32", device="cpu")
    ids = torch.tensor(prompt_ids(tokenizer)[:1])
    with torch.no_grad():
        exact, quantised = model(ids).logits[0], back(ids).logits[0]  # (T, V)
    diff = (quantised - exact).abs()
    top1 = (quantised.argmax(-1) == exact.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(quantised.log_softmax(-1), exact.log_softmax(-1), log_target=True,
                                    reduction="batchmean").item()
    print(f"q8_0 vs float32 over {ids.shape[1]} positions: max |diff| {diff.max():.3f}, mean {diff.mean():.4f}, "
          f"top-1 agreement {top1:.3f}, KL {kl:.5f}, file {path.stat().st_size / 1e6:.0f} MB")
    # Measured (2026-11-30): max 1.41, mean 0.18, top-1 1.000, KL 0.0026 (logits span about +-38). The base was
    # itself 4-bit (Q4_1) and its values do not sit on Q8_0's grid, so every block is rounded again.
    assert top1 >= 0.95 and kl < 0.01 and diff.mean() < 0.3


def test_lora_adapter_gguf_carries_the_trained_update(adapter_model, merged, tmp_path):
    """What llama.cpp computes from the file, W + (alpha / r) · B A with r from lora_a's shape, equals lorafit's
    merged weight: rsLoRA's alpha / sqrt(r) is folded into alpha, and B's rows follow the base's q/k order."""
    model, _ = adapter_model
    path = lorafit.export_lora_gguf(model, tmp_path / "adapter.gguf", qtype="f32")
    directory = read_directory(path)
    meta = directory.metadata
    assert (meta["general.type"], meta["adapter.type"], meta["general.architecture"]) == ("adapter", "lora", "llama")
    alpha = meta["adapter.lora.alpha"]
    assert alpha / RANK == pytest.approx(16 / np.sqrt(RANK), rel=1e-6)  # not 16 / 8: the rsLoRA scaling
    tensors = {t.name: t for t in directory.tensors}
    assert len(tensors) == 2 * 7 * 30

    def read(name):  # PyTorch shape (GGUF dims reversed)
        t = tensors[name]
        return torch.from_numpy(np.fromfile(path, np.float32, int(np.prod(t.dims)), offset=t.offset)).reshape(t.dims[::-1])

    merged_model, _ = merged
    checked = [(0, "attn_q", "self_attn.q_proj"), (17, "attn_k", "self_attn.k_proj"),
               (29, "ffn_down", "mlp.down_proj"), (5, "attn_v", "self_attn.v_proj")]
    base = read_base_weights(model.name_or_path, [f"model.layers.{i}.{n}.weight" for i, _, n in checked])
    merged_weights = dict(merged_model.named_parameters())
    for layer, projection, hf_name in checked:
        a, b = read(f"blk.{layer}.{projection}.weight.lora_a"), read(f"blk.{layer}.{projection}.weight.lora_b")
        update = alpha / a.shape[0] * (b @ a)  # (out, in), in the GGUF's row order
        if projection in ("attn_q", "attn_k"):
            update = gguf_to_hf_rotary_rows(update, 64)
        name = f"model.layers.{layer}.{hf_name}.weight"
        torch.testing.assert_close(base[name] + update, merged_weights[name], atol=1e-6, rtol=0)


def test_serving_checks_say_who_refuses_what(adapter_model, tmp_path):
    model, _ = adapter_model
    messages = adapter_checks(model.lora_config)
    assert len(messages) == 1 and "rsLoRA" in messages[0] and "2.82843x too weak" in messages[0]
    config = lorafit.lora.LoRAConfig(r=32, alpha=32, dora=True, modules_to_save=("lm_head",))
    text = "\n".join(adapter_checks(config))
    assert "vLLM does not yet support DoRA" in text and "modules_to_save being None" in text
    assert "--max-lora-rank 32" in text and "rsLoRA" not in text
