"""llama.cpp itself (through the llama-cpp-python package) runs what lorafit exports. Optional: skipped when
the package is absent; it builds llama.cpp from source (~10-30 min on 2 cores):

    CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python

On the fine-tuned default model (rsLoRA, random B; tests/finetuned_default.py):
- the f16 GGUF of the merged model gives lorafit's float32 greedy tokens (16 new tokens, three prompts);
- llama.cpp's tokenizer, reading the exported vocabulary, gives lorafit's ids on chat-formatted texts;
- the q8_0 GGUF's logits are close to lorafit's (the difference is printed);
- the rsLoRA adapter GGUF, loaded on the base model's GGUF, gives the adapter model's greedy tokens.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import lorafit
from finetuned_default import NEW_TOKENS, greedy, make_adapter, prompt_ids
from lorafit.export import load_adapter_model
from lorafit.export.gguf_vocab import round_trip_texts

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it builds llama.cpp: "
                                                    "CMAKE_ARGS=-DGGML_NATIVE=OFF pip install llama-cpp-python)")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(smollm2_dir, tmp_path_factory):
    """The adapter model, the merged model, their tokenizer and the three GGUF files."""
    out = tmp_path_factory.mktemp("llama_cpp")
    adapter, tokenizer = load_adapter_model(make_adapter(smollm2_dir, out / "adapter"))
    merged = lorafit.merge_lora(copy.deepcopy(adapter))
    base, _ = lorafit.load_model(smollm2_dir, dtype="float32", device="cpu")
    files = {
        "f16": lorafit.export_gguf(merged, tokenizer, out / "merged-f16.gguf", qtype="f16"),
        "q8_0": lorafit.export_gguf(merged, tokenizer, out / "merged-q8_0.gguf", qtype="q8_0"),
        "base": lorafit.export_gguf(base, tokenizer, out / "base-f16.gguf", qtype="f16"),
        "lora": lorafit.export_lora_gguf(adapter, out / "adapter.gguf"),
    }
    return adapter, merged, tokenizer, files


def open_llama(path, lora=None):
    kwargs = {"lora_path": str(lora)} if lora is not None else {}
    # logits_all: llama-cpp-python 0.3 keeps `scores` only then (otherwise they stay zeros, and argmax is 0).
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False, **kwargs)


def llama_greedy(llm, prompt: list[int]) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    tokens = []
    for _ in range(NEW_TOKENS):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(token)
        llm.eval([token])
    return tokens


def test_f16_gguf_greedy_tokens_and_tokenizer_equal_lorafit(exported):
    _, merged, tokenizer, files = exported
    llm = open_llama(files["f16"])
    prompts = prompt_ids(tokenizer)
    ours = greedy(merged, prompts)
    theirs = [llama_greedy(llm, p) for p in prompts]
    for a, b in zip(ours, theirs, strict=True):
        print(f"lorafit   {tokenizer.decode(a)!r}\nllama.cpp {tokenizer.decode(b)!r}")
    assert theirs == ours
    for text in round_trip_texts(tokenizer):
        # add_bos=True: llama.cpp adds BOS only if the file asks for it (SmolLM2's does not).
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text).input_ids, text


def test_q8_0_gguf_logits_are_close(exported):
    _, merged, tokenizer, files = exported
    prompt = prompt_ids(tokenizer)[0]
    with torch.no_grad():
        ours = merged(torch.tensor([prompt])).logits[0].numpy()  # (T, V)
    # Bounds on the mean: llama.cpp's CPU kernels also round the activations (to Q8 blocks for Q8_0 weights),
    # so single logits can move by a few units while the ranking stays.
    for qtype, mean_bound in (("f16", 0.05), ("q8_0", 0.5)):
        llm = open_llama(files[qtype])
        llm.reset()
        llm.eval(prompt)
        theirs = np.asarray(llm.scores[: len(prompt)])
        diff = np.abs(theirs - ours)
        top1 = float(np.mean(theirs.argmax(-1) == ours.argmax(-1)))
        print(f"llama.cpp {qtype} vs lorafit float32 over {len(prompt)} positions: max |diff| {diff.max():.3f}, "
              f"mean {diff.mean():.4f}, top-1 agreement {top1:.3f}")
        assert diff.mean() < mean_bound and top1 >= 0.95


def test_rslora_adapter_gguf_on_the_base_gguf_equals_the_adapter_model(exported):
    adapter, _, tokenizer, files = exported
    llm = open_llama(files["base"], lora=files["lora"])
    prompts = prompt_ids(tokenizer)
    ours, theirs = greedy(adapter, prompts), [llama_greedy(llm, p) for p in prompts]
    for a, b in zip(ours, theirs, strict=True):
        print(f"lorafit adapter    {tokenizer.decode(a)!r}\nllama.cpp + LoRA  {tokenizer.decode(b)!r}")
    assert theirs == ours
    # The adapter matters: the base alone answers differently.
    base = open_llama(files["base"])
    assert [llama_greedy(base, p) for p in prompts] != ours
