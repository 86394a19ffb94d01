"""GGUF export on tiny random models of every family: written by lorafit, read back by lorafit's own GGUF
loader (an independent path: names, shapes, rotary rows and tokenizer are undone by the reader), then
compared with the source model and tokenizer.

The tokenizers are small byte-level BPEs trained here, built the way the real models' tokenizer.json files
are (SmolLM2's digit split, Qwen2's and Llama 3's regex splits, Llama 3's added BOS), so that finding the
pre-tokenizer's llama.cpp name is tested on each kind. The model's vocabulary (320) is larger than the
tokenizer's (~300), as Qwen's padded embeddings are: the gap becomes unused [PAD] tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import lorafit
from lorafit.errors import ExportError
from lorafit.export.gguf_vocab import round_trip_texts
from lorafit.export.modelfile import modelfile_text
from lorafit.models.gguf_file import read_directory

from tiny_models import FAMILIES, tiny_hf_model

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package")

VOCAB = 320
# The split rules of the models' own tokenizer.json files (Qwen2/2.5/3 and Llama 3).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_SPLIT = QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are tiny."
          "<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
TRAINING_TEXT = [
    "Once upon a time, there was a little girl named Lily. She liked 123 red apples and 4567 green pears.",
    "The capital of France is Paris. It's 2024's best city, isn't it? Naïve café, 日本語 and 🙂 too.",
    "def add(a, b):\n    return a + b  # adds 2 numbers\n\n\tTabs\tand  double  spaces.",
] * 20
CHATS = [
    [{"role": "user", "content": "Hi! What is 12 + 345?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a city."},
     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Another, in 日本?"}],
]


def byte_level_tokenizer(pre: str):
    """A ~300-token byte-level BPE with the word-splitting of SmolLM2 ("smollm"), Qwen2 ("qwen2") or Llama 3
    ("llama-bpe", which also adds <|begin_of_text|> and uses Llama 3's chat format)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        split = QWEN2_SPLIT if pre == "qwen2" else LLAMA3_SPLIT
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"), byte_level])
        if pre == "qwen2":
            tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    llama3 = pre == "llama-bpe"
    special = (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
               if llama3 else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAINING_TEXT, trainer)
    tok.add_tokens(["<think>"])  # a user-defined token: one id, not special
    if llama3:
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 0)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                       chat_template=LLAMA3_CHAT)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=CHATML)


PRE_BY_FAMILY = {"llama3-rope": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2"}


def tiny_lorafit_model(family: str, directory: Path, config_overrides=None):
    """A tiny random HF model of `family` with a trained tokenizer, saved and loaded through lorafit."""
    hf = tiny_hf_model(family, vocab_size=VOCAB, **(config_overrides or {}))
    tokenizer = byte_level_tokenizer(PRE_BY_FAMILY.get(family, "smollm"))
    hf.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return lorafit.load_model(directory, dtype="float32", device="cpu")


def logits(model, tokenizer, messages=CHATS[1]):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_round_trips_through_gguf(family, tmp_path):
    model, tokenizer = tiny_lorafit_model(family, tmp_path / "hf")
    path = lorafit.export_gguf(model, tokenizer, tmp_path / "model.gguf", qtype="f32")
    meta = read_directory(path).metadata
    arch = "llama" if family.startswith(("llama", "mistral")) else family
    assert meta["general.architecture"] == arch and meta["general.type"] == "model"
    assert meta["tokenizer.ggml.pre"] == PRE_BY_FAMILY.get(family, "smollm")
    assert len(meta["tokenizer.ggml.tokens"]) == VOCAB and meta["tokenizer.ggml.tokens"][-1] == f"[PAD{VOCAB - 1}]"
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template

    back, back_tokenizer = lorafit.load_model(path, dtype="float32", device="cpu")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "tie_word_embeddings", "rms_norm_eps", "max_position_embeddings"):
        assert back.hf_config[key] == pytest.approx(model.hf_config[key]), key
    assert back.config.rope == model.config.rope  # llama3 and linear scaling survive the trip
    names = {n for n, _ in model.named_parameters()}
    source, read = model.state_dict(), back.state_dict()
    for name in names:
        assert torch.equal(source[name], read[name]), name  # f32: bit for bit, q/k rows back in HF order
    torch.testing.assert_close(logits(back, back_tokenizer), logits(model, tokenizer), atol=0, rtol=0)

    for text in round_trip_texts(tokenizer) + [tokenizer.apply_chat_template(c, tokenize=False) for c in CHATS]:
        assert back_tokenizer(text).input_ids == tokenizer(text).input_ids, text
    assert back_tokenizer("<think>x").input_ids[:1 + (family == "llama3-rope")][-1] == tokenizer.convert_tokens_to_ids("<think>")


def test_llama_rows_are_stored_permuted_and_qwen_rows_are_not(tmp_path):
    """llama.cpp rotates interleaved pairs for "llama" and rotate-half for "qwen2"/"qwen3" (NEOX)."""
    from lorafit.models.gguf import hf_to_gguf_rotary_rows

    for family in ("llama", "qwen2"):
        model, tokenizer = tiny_lorafit_model(family, tmp_path / family)
        path = lorafit.export_gguf(model, tokenizer, tmp_path / f"{family}.gguf", qtype="f32")
        entry = next(t for t in read_directory(path).tensors if t.name == "blk.0.attn_k.weight")
        stored = torch.from_numpy(np.fromfile(path, np.float32, math.prod(entry.dims), offset=entry.offset))
        weight = model.model.layers[0].self_attn.k_proj.weight.detach()
        expected = hf_to_gguf_rotary_rows(weight, model.config.head_dim) if family == "llama" else weight
        assert torch.equal(stored.reshape(weight.shape), expected), family
        assert not torch.equal(hf_to_gguf_rotary_rows(weight, model.config.head_dim), weight)


# Sizes that are multiples of the 32-value quantisation blocks (the ODD config's 72 is not).
BLOCKS = dict(hidden_size=64, intermediate_size=128, head_dim=32, num_attention_heads=2, num_key_value_heads=1)


@pytest.mark.parametrize("qtype", ["f16", "bf16", "q8_0", "q4_0"])
def test_quantised_exports_equal_the_rounded_weights(qtype, tmp_path):
    """Each weight read back equals the source rounded the way the type rounds (gguf.quants is the oracle);
    the logit difference to the unrounded model is printed."""
    model, tokenizer = tiny_lorafit_model("llama-untied-headdim32", tmp_path / "hf", BLOCKS)
    path = lorafit.export_gguf(model, tokenizer, tmp_path / f"{qtype}.gguf", qtype=qtype)
    back, back_tokenizer = lorafit.load_model(path, dtype="float32", device="cpu")
    types = {t.name: gguf.GGMLQuantizationType(t.type_id).name for t in read_directory(path).tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"  # 1-D tensors stay F32
    main_type = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[qtype]
    assert types["blk.1.ffn_down.weight"] == main_type
    # q4_0 keeps the embedding and output head at Q8_0: their error goes straight into the logits.
    assert types["output.weight"] == ("Q8_0" if qtype == "q4_0" else main_type)
    read = back.state_dict()
    for name, weight in model.state_dict().items():
        if weight.ndim == 1:
            assert torch.equal(read[name], weight), name
            continue
        qt = gguf.GGMLQuantizationType[types[_gguf_name(name)]]
        rounded = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(weight.numpy(), qt), qt))
        assert torch.equal(read[name], rounded.reshape(weight.shape)), name
    diff = (logits(back, back_tokenizer) - logits(model, tokenizer)).abs().max().item()
    print(f"{qtype}: max |logit difference| to the float32 source {diff:.2e}")
    assert diff < {"f16": 1e-2, "bf16": 5e-2, "q8_0": 5e-2, "q4_0": 0.5}[qtype]


def _gguf_name(hf_name):
    from lorafit.models.gguf import hf_to_gguf_name

    return hf_to_gguf_name(hf_name)


def test_hf_to_gguf_name_inverts_the_reader():
    from lorafit.models.gguf import _hf_name, hf_to_gguf_name

    for name in ["token_embd.weight", "output.weight", "output_norm.weight", "blk.7.attn_q.weight",
                 "blk.0.attn_k.bias", "blk.3.attn_q_norm.weight", "blk.12.ffn_down.weight", "blk.1.ffn_norm.weight"]:
        assert hf_to_gguf_name(_hf_name(name)) == name
    assert hf_to_gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None


def test_modelfiles_for_chatml_and_llama3(tmp_path):
    chatml = modelfile_text(byte_level_tokenizer("smollm"), "m.gguf")
    assert 'SYSTEM """You are tiny."""' in chatml and "NOTE" not in chatml
    assert 'PARAMETER stop "<|im_end|>"' in chatml
    llama3 = modelfile_text(byte_level_tokenizer("llama-bpe"), "m.gguf")
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>" in llama3 and "NOTE" not in llama3
    assert "SYSTEM" not in llama3 and "<|begin_of_text|>" not in llama3  # llama.cpp adds BOS itself
    assert 'PARAMETER stop "<|eot_id|>"' in llama3
    odd = byte_level_tokenizer("smollm")
    odd.chat_template = odd.chat_template.replace("{{ m['content'] }}", "{{ m['content'] | upper }}")
    assert "NOTE: the model's chat template was approximated by the ChatML format" in modelfile_text(odd, "m.gguf")
    odd.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert "TEMPLATE" not in modelfile_text(odd, "m.gguf").replace("no TEMPLATE", "")


# ------------------------------------------------------------------------------------------- refusals


def test_what_cannot_be_exported_is_refused_clearly(tmp_path):
    from lorafit.models.gguf import read_gguf

    model, tokenizer = tiny_lorafit_model("llama", tmp_path / "hf")
    with pytest.raises(ExportError, match="qtype 'q3_k' is not supported"):
        lorafit.export_gguf(model, tokenizer, tmp_path / "x.gguf", qtype="q3_k")
    lorafit.apply_lora(model, r=2, verbose=False)
    with pytest.raises(ExportError, match=r"has LoRA adapters: lorafit.merge_lora\(model\) first"):
        lorafit.export_gguf(model, tokenizer, tmp_path / "x.gguf")
    # A SentencePiece vocabulary (stories260K's) has no byte-level GGUF form here.
    stories = read_gguf(Path(__file__).parent / "assets" / "stories260K-v1.gguf").tokenizer
    model, _ = tiny_lorafit_model("llama", tmp_path / "hf2")
    with pytest.raises(ExportError, match="supports byte-level BPE tokenizers"):
        lorafit.export_gguf(model, stories, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial*"))


def test_a_tokenizer_gguf_cannot_express_is_refused(tmp_path):
    """A pre-tokenizer llama.cpp has no name for (here: split on whitespace only) would tokenize differently."""
    from tokenizers import pre_tokenizers

    model, tokenizer = tiny_lorafit_model("llama", tmp_path / "hf")
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    with pytest.raises(ExportError, match="splits text into words by a rule llama.cpp has no name for"):
        lorafit.export_gguf(model, tokenizer, tmp_path / "x.gguf")


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_merge_and_export_from_an_adapter_directory(tmp_path, capsys):
    """`--adapter DIR` loads the base that adapter_config.json names, loads the adapter, merges, writes."""
    from transformers import AutoModelForCausalLM

    from lorafit.cli import main

    model, tokenizer = tiny_lorafit_model("qwen2", tmp_path / "base")
    lorafit.apply_lora(model, r=4, alpha=8, rslora=True, verbose=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.normal_(0, 0.1)
    lorafit.save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        adapter_logits = logits(model, tokenizer)

    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template(CHATS[1], tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        hf_logits = hf(torch.tensor([tokenizer(text).input_ids])).logits
    torch.testing.assert_close(hf_logits, adapter_logits, atol=1e-4, rtol=0)

    out = tmp_path / "gguf" / "model.gguf"
    assert main(["export", "gguf", "--adapter", str(tmp_path / "adapter"), "--out", str(out), "--qtype", "f32"]) == 0
    back, back_tokenizer = lorafit.load_model(out, dtype="float32", device="cpu")
    torch.testing.assert_close(logits(back, back_tokenizer), adapter_logits, atol=1e-4, rtol=0)
    assert (tmp_path / "gguf" / "Modelfile").read_text().startswith("# Ollama Modelfile")
    assert main(["export", "gguf-adapter", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "a.gguf")]) == 0
    printed = capsys.readouterr().out
    assert "note: rsLoRA" in printed and "wrote" in printed
    assert read_directory(tmp_path / "a.gguf").metadata["adapter.lora.alpha"] == pytest.approx(8 / 2 * 4)


def test_cli_refuses_a_dora_adapter_gguf(tmp_path, capsys):
    from lorafit.cli import main

    model, _ = tiny_lorafit_model("llama", tmp_path / "base")
    lorafit.apply_lora(model, r=4, dora=True, verbose=False)
    lorafit.save_adapter(model, tmp_path / "dora")
    assert main(["export", "gguf-adapter", "--adapter", str(tmp_path / "dora"), "--out", str(tmp_path / "a.gguf")]) == 1
    err = capsys.readouterr()
    assert "vLLM refuses DoRA adapters" in err.out
    assert "lorafit: error: DoRA adapters cannot be a llama.cpp LoRA GGUF" in err.err
    assert not (tmp_path / "a.gguf").exists()
    assert main(["export", "gguf", "--out", str(tmp_path / "b.gguf")]) == 1
    assert "needs --model SOURCE or --adapter DIR" in capsys.readouterr().err
