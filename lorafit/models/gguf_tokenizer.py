"""Rebuild a Hugging Face fast tokenizer (and its chat template) from GGUF metadata.

A GGUF file carries no tokenizer.json: llama.cpp stores the vocabulary, merges, scores, token types and
special ids as `tokenizer.*` metadata. We rebuild an equivalent `tokenizers.Tokenizer` from those parts.
Two vocabulary kinds cover the models lorafit supports:

- `gpt2`: byte-level BPE (SmolLM2, Qwen2/3, Llama 3). The merges are in the file; how text is split into
  words before BPE is not, only named by `tokenizer.ggml.pre`, so each name maps to its split rule here.
- `llama`: SentencePiece BPE (Llama 2, TinyLlama, stories260K). The file has no merges, only a score per
  token; SentencePiece merges the adjacent pair whose result has the highest score, so the merge list is
  every split of a token into two vocabulary tokens, ranked by the score of the token they make.
"""

from __future__ import annotations

import warnings
from typing import Any

from ..errors import LoadError

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Word-splitting rules for byte-level vocabularies, by `tokenizer.ggml.pre`. These are the split regexes
# of the models' own tokenizer.json files; the byte-level step then runs without its own regex.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3's rule differs only in keeping up to three digits together.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_NAMES = ("llama-bpe", "llama3", "llama-v3")
_GPT2_NAMES = ("gpt2", "default", None)
SUPPORTED_PRE = ("smollm", "qwen2", *_LLAMA3_NAMES, "gpt2", "default")


def tokenizer_from_gguf_metadata(metadata: dict[str, Any], source: str = "GGUF metadata"):
    """A `transformers.PreTrainedTokenizerFast` equivalent to the tokenizer the metadata describes.

    `source` names the file in error messages.
    """
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise LoadError(f"{source}: has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise LoadError(f"{source}: {len(tokens)} tokens but {len(types)} token types")

    if kind == "gpt2":
        tokenizer = _byte_level_bpe(metadata, tokens, source)
        add_bos_default = metadata.get("tokenizer.ggml.pre") in _LLAMA3_NAMES
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(metadata, tokens, types, source)
        add_bos_default = True  # llama.cpp adds BOS to SentencePiece vocabularies that do not say otherwise
    else:
        raise LoadError(f"{source}: tokenizer kind {kind!r} is not supported (supported: 'gpt2', 'llama')")

    _add_special_tokens(tokenizer, tokens, types)
    special = _special_tokens(metadata, tokens, source)
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    tokenizer.post_processor = _post_processor(special, add_bos, add_eos, byte_level=kind == "gpt2")
    return _wrap(tokenizer, metadata, special, add_bos, add_eos)


def _byte_level_bpe(metadata: dict[str, Any], tokens: list[str], source: str):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    merges = metadata.get("tokenizer.ggml.merges")
    if merges is None:
        raise LoadError(f"{source}: byte-level (gpt2) tokenizer without tokenizer.ggml.merges")
    pre = metadata.get("tokenizer.ggml.pre")
    # Llama 3's tokenizer.json looks a word up whole before merging (ignore_merges); the others do not.
    tokenizer = Tokenizer(
        models.BPE(
            vocab=_vocab(tokens),
            merges=[tuple(m.split(" ", 1)) for m in merges],
            ignore_merges=pre in _LLAMA3_NAMES,
        )
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre == "smollm":
        # SmolLM2's tokenizer.json: every digit is its own word, then the GPT-2 split.
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif pre == "qwen2" or pre in _LLAMA3_NAMES:
        split = _QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level]
        )
        if pre == "qwen2":
            tokenizer.normalizer = normalizers.NFC()
    else:
        if pre not in _GPT2_NAMES:
            warnings.warn(
                f"{source}: unknown pre-tokenizer {pre!r}; splitting words the GPT-2 way, so token ids may "
                f"differ from the original tokenizer (known: {', '.join(SUPPORTED_PRE)})",
                stacklevel=3,
            )
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(metadata: dict[str, Any], tokens: list[str], types: list[int], source: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    unk_id = metadata.get("tokenizer.ggml.unknown_token_id", 0)
    if "tokenizer.ggml.merges" in metadata:
        merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    else:
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise LoadError(f"{source}: SentencePiece (llama) tokenizer needs one tokenizer.ggml.scores per token")
        merges = merges_from_scores(tokens, scores, types)
    tokenizer = Tokenizer(
        models.BPE(
            vocab=_vocab(tokens),
            merges=merges,
            unk_token=tokens[unk_id] if 0 <= unk_id < len(tokens) else None,
            fuse_unk=True,
            byte_fallback=True,  # characters outside the vocabulary become <0xNN> byte tokens
        )
    )
    # SentencePiece writes spaces as "▁" and, unless told not to, puts one before the text.
    add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges implied by SentencePiece scores: (left, right) ranked by the score of left+right.

    Only NORMAL tokens are ever produced by merging; ties keep a fixed order (by the pieces' ids).
    """
    ids = _vocab(tokens)
    ranked = []
    for token, score, kind in zip(tokens, scores, types, strict=True):
        if kind != NORMAL or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                ranked.append((-score, ids[left], ids[right]))
    ranked.sort()
    return [(tokens[left], tokens[right]) for _, left, right in ranked]


def _vocab(tokens: list[str]) -> dict[str, int]:
    # A token spelled twice keeps its first id, as llama.cpp does when it looks text up.
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    return vocab


def _add_special_tokens(tokenizer, tokens: list[str], types: list[int]) -> None:
    """Control tokens (<|im_start|>, <s>) and user-defined ones (<think>) must encode as one id each.

    Control and unknown tokens are special (skipped by decode(skip_special_tokens=True)); user-defined ones
    are added but not special, as in the original tokenizer.json files (Qwen3's <think> stays visible).
    """
    from tokenizers import AddedToken

    typed = list(zip(tokens, types, strict=True))
    special = [AddedToken(t, special=True, normalized=False) for t, k in typed if k in (CONTROL, UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False) for t, k in typed if k == USER_DEFINED]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user)


def _special_tokens(metadata: dict[str, Any], tokens: list[str], source: str) -> dict[str, tuple[str, int]]:
    special = {}
    roles = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}
    for role, key in roles.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is None:
            continue
        if not 0 <= token_id < len(tokens):
            raise LoadError(f"{source}: tokenizer.ggml.{key} = {token_id} is outside the vocabulary of {len(tokens)}")
        special[role] = (tokens[token_id], token_id)
    return special


def _post_processor(special: dict[str, tuple[str, int]], add_bos: bool, add_eos: bool, byte_level: bool):
    from tokenizers import processors

    bos = special.get("bos") if add_bos else None
    eos = special.get("eos") if add_eos else None
    if bos is None and eos is None:
        return processors.ByteLevel(trim_offsets=False) if byte_level else None
    prefix = f"{bos[0]}:0 " if bos else ""
    suffix = f" {eos[0]}:0" if eos else ""
    pair_prefix = f" {bos[0]}:1" if bos else ""
    pair_suffix = f" {eos[0]}:1" if eos else ""
    return processors.TemplateProcessing(
        single=f"{prefix}$A:0{suffix}",
        pair=f"{prefix}$A:0{suffix}{pair_prefix} $B:1{pair_suffix}",
        special_tokens=[t for t in (bos, eos) if t is not None],
    )


def _wrap(tokenizer, metadata: dict[str, Any], special: dict[str, tuple[str, int]], add_bos: bool, add_eos: bool):
    from transformers import PreTrainedTokenizerFast

    kwargs = {f"{role}_token": token for role, (token, _) in special.items()}
    arch = metadata.get("general.architecture")
    context = metadata.get(f"{arch}.context_length")
    if isinstance(context, int):
        kwargs["model_max_length"] = context
    chat_template = metadata.get("tokenizer.chat_template")
    if chat_template:
        kwargs["chat_template"] = chat_template
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        # Stated explicitly so that transformers keeps (or rebuilds the same) BOS/EOS post-processor.
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
