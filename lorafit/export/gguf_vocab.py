"""A Hugging Face tokenizer as GGUF `tokenizer.*` metadata: the inverse of models/gguf_tokenizer.py.

llama.cpp tokenizes with its own code from what the file lists: the vocabulary, a type per token, the BPE
merges, the special ids, and a NAME for the rule that splits text into words before BPE
(`tokenizer.ggml.pre`). The rule itself is not in the file, so the name must be one llama.cpp knows and
must split exactly as the original tokenizer does. We find it by behaviour: the reader's rule for each
known name is run on probe texts next to the original pre-tokenizer, and the one that agrees wins. The
finished metadata is then read back into a tokenizer and must give the original's ids on chat-formatted
texts (`check_round_trip`), so a tokenizer that GGUF cannot express is refused instead of exported wrong.

Only byte-level BPE vocabularies (SmolLM2, Qwen2/2.5/3, Llama 3) are written; SentencePiece ones (Llama 2,
Mistral up to v0.3) are refused with a clear error: their GGUF form needs per-token scores that a
tokenizer.json does not carry.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import ExportError
from ..models.gguf_tokenizer import CONTROL, NORMAL, UNUSED, USER_DEFINED, tokenizer_from_gguf_metadata

# Names of pre-tokenizer rules that both llama.cpp and lorafit's reader implement, most specific first.
PRE_TOKENIZER_NAMES = ("smollm", "qwen2", "llama-bpe", "gpt2")

# Texts whose word splits tell the known rules apart: digit runs after spaces (smollm vs gpt2), three-digit
# groups (llama-bpe), contractions, punctuation runs before newlines, accents (qwen2's NFC), tabs.
_SPLIT_PROBES = (
    "It's 12345 cafés!\n\n  ok",
    "x = [1,    2]  a   1\t\tb",
    "I'LL BE THERE, won't you?  \r\n Naïve  café — 日本語 🙂 2024's",
    "def f(x):\n    return x * 2  # 3.14159\n",
)
# Plain texts for the id check, besides the chat-formatted ones.
_ID_PROBES = _SPLIT_PROBES + ("Once upon a time, there was a little girl named Lily.", " leading space", "")


def tokenizer_metadata(tokenizer, vocab_size: int, eos_token_id: int | None = None) -> dict[str, Any]:
    """The `tokenizer.*` metadata for `tokenizer`, a transformers fast tokenizer.

    vocab_size: rows of the model's embedding; ids the tokenizer does not use (Qwen pads its embedding to a
    multiple of 128) become unused "[PAD<id>]" tokens, as llama.cpp's converter names them.
    eos_token_id: the model's end-of-sequence id, when the tokenizer names none.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"{type(tokenizer).__name__} is not a fast tokenizer; GGUF export needs tokenizer.json")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style BPE (byte_fallback)" if model.get("byte_fallback") else model.get("type")
        raise ExportError(
            f"the tokenizer is {kind}; GGUF export supports byte-level BPE tokenizers (SmolLM2, Qwen2/2.5/3, "
            f"Llama 3) only"
        )
    if len(tokenizer) > vocab_size:
        raise ExportError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's {vocab_size} embeddings")

    tokens, types = _tokens_and_types(tokenizer, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    metadata: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _pre_tokenizer_name(backend),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    roles = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unknown": tokenizer.unk_token_id,
             "padding": tokenizer.pad_token_id}
    if roles["eos"] is None:
        roles["eos"] = eos_token_id
    for role, token_id in roles.items():
        if token_id is not None:
            metadata[f"tokenizer.ggml.{role}_token_id"] = int(token_id)
    # Stated, never left to llama.cpp's per-vocabulary defaults: whether encoding adds BOS / EOS itself.
    probe = tokenizer("a").input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    metadata["tokenizer.ggml.add_bos_token"] = bos is not None and bool(probe) and probe[0] == bos
    metadata["tokenizer.ggml.add_eos_token"] = eos is not None and bool(probe) and probe[-1] == eos
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: "default" is the one chat uses
        template = template.get("default")
    if template:
        metadata["tokenizer.chat_template"] = template
    return metadata


def _tokens_and_types(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(token)
            # Special added tokens (<|im_start|>) are control tokens; others (<think>) stay visible text.
            types.append(CONTROL if added[i].special else USER_DEFINED)
        else:
            tokens.append(token)
            types.append(NORMAL)
    return tokens, types


def _pre_tokenizer_name(backend) -> str:
    """The known rule that splits the probe texts exactly as `backend` does (normaliser included)."""
    original = [_split(backend, text) for text in _SPLIT_PROBES]
    for name in PRE_TOKENIZER_NAMES:
        stub = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": name, "tokenizer.ggml.tokens": ["a"],
                "tokenizer.ggml.merges": []}
        candidate = tokenizer_from_gguf_metadata(stub).backend_tokenizer
        if all(_split(candidate, text) == words for text, words in zip(_SPLIT_PROBES, original, strict=True)):
            return name
    raise ExportError(
        "the tokenizer splits text into words by a rule llama.cpp has no name for here "
        f"(known: {', '.join(PRE_TOKENIZER_NAMES)}); a GGUF of it would tokenize differently"
    )


def _split(backend, text: str) -> list[str]:
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    if backend.pre_tokenizer is None:
        return [text]
    return [word for word, _ in backend.pre_tokenizer.pre_tokenize_str(text)]


def round_trip_texts(tokenizer) -> list[str]:
    """Chat-formatted conversations (when the tokenizer has a chat template) and plain probe texts."""
    texts = list(_ID_PROBES)
    if getattr(tokenizer, "chat_template", None):
        conversations = [
            [{"role": "user", "content": "What is the capital of France?"}],
            [{"role": "system", "content": "You answer in one word."},
             {"role": "user", "content": "Name 3 colours, e.g. red (#ff0000)."},
             {"role": "assistant", "content": "Red, green and blue: 255 0 0 / 0 255 0."},
             {"role": "user", "content": "  And in   French?\n"}],
        ]
        for messages in conversations:
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return texts


def check_round_trip(tokenizer, metadata: dict[str, Any], texts: list[str]) -> None:
    """Raises ExportError unless the tokenizer rebuilt from `metadata` gives `tokenizer`'s ids on `texts`."""
    rebuilt = tokenizer_from_gguf_metadata(metadata, source="the GGUF metadata being written")
    for text in texts:
        want, got = tokenizer(text).input_ids, rebuilt(text).input_ids
        if want != got:
            at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            raise ExportError(
                f"the GGUF tokenizer would encode {text[:60]!r} differently from the original "
                f"(first difference at token {at}: {want[at:at + 3]} vs {got[at:at + 3]})"
            )
