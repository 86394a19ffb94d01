"""Text generation with a preallocated KV cache: greedy or sampled, batched prompts of any lengths.

`generate_ids` is the engine (token ids in, token ids out; GRPO's rollouts will use it); `generate` is the
user-facing wrapper that takes text or chat messages and returns text.
"""

import contextlib
from dataclasses import dataclass

import torch

from .nn.kv_cache import KVCache
from .nn.linear import prepacked_weights


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # 1 = no nucleus cut

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling settings {self}: need temperature >= 0, top_k >= 0, 0 < top_p <= 1")


@torch.inference_mode()
def generate_ids(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_ids=(),
    pad_id: int = 0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continues each prompt by up to `max_new_tokens` tokens; a sequence ends after its first stop token
    (which is included in its output). Prompts are left-padded so that all share one cache position."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.model.embed_tokens.weight.device
    B, L = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    padding = torch.zeros(B, L + max_new_tokens, dtype=torch.long, device=device)  # 1 = real token
    for i, p in enumerate(prompts):
        input_ids[i, L - len(p) :] = torch.tensor(p, device=device)
        padding[i, L - len(p) :] = 1
    # Unpadded batches skip the mask: SDPA then runs its fastest causal path.
    padded = any(len(p) < L for p in prompts)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)

    # A prompt repeated in the batch (GRPO samples G completions of each) is read once: its cache rows are
    # then copied to every sequence that continues it. For 2 prompts x 8 of 46 tokens this saves ~2 s of a
    # ~9 s rollout of SmolLM2 on 2 CPU cores: the prompt pass of 736 rows becomes one of 92.
    slot: dict[tuple, int] = {}  # prompt -> its row among the distinct ones
    distinct, copy_from = [], []
    for i, p in enumerate(prompts):
        if tuple(p) not in slot:
            slot[tuple(p)] = len(distinct)
            distinct.append(i)
        copy_from.append(slot[tuple(p)])
    distinct = torch.tensor(distinct, device=device)  # (U,) rows whose prompts are read
    copy_from = torch.tensor(copy_from, device=device)  # (B,) each sequence's row among those U

    cache = KVCache.for_model(model, len(distinct), L + max_new_tokens)
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    steps = 0
    # Every decoding step multiplies B rows by each weight: on CPU, weights packed for B rows do that ~2x
    # faster (nn/linear.py). The prompt's pass has U x L rows and takes the plain path.
    with prepacked_weights(model, rows=B) if max_new_tokens > 1 else contextlib.nullcontext():
        mask = padding[distinct, :L] if padded else None
        logits = model(input_ids[distinct], attention_mask=mask, cache=cache, last_logits_only=True).logits
        if len(distinct) < B:
            cache.select(copy_from)
            logits = logits[copy_from]
        for steps in range(1, max_new_tokens + 1):
            token = sample(logits[:, -1], sampling, generator)  # (B,)
            token = token.masked_fill(finished, pad_id)
            out[:, steps - 1] = token
            finished |= torch.isin(token, stop)
            if steps == max_new_tokens or bool(finished.all()):
                break
            mask = padding[:, : cache.length + 1] if padded else None
            logits = model(token[:, None], attention_mask=mask, cache=cache, last_logits_only=True).logits

    results = []
    for row in out[:, :steps].tolist():
        ends = [j for j, t in enumerate(row) if t in set(stop_ids)]
        results.append(row[: ends[0] + 1] if ends else row)
    return results


def sample(logits: torch.Tensor, sampling: Sampling, generator=None) -> torch.Tensor:
    """logits: (B, V) -> (B,) token ids."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays).
        drop_sorted = probs.cumsum(-1) - probs > sampling.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    # Inverse-CDF sampling: one uniform number per row against the running sum of the probabilities.
    # torch.multinomial draws an exponential per vocabulary entry: 20 ms of a 250 ms decoding step for 16
    # rows of SmolLM2's 49k vocabulary on 2 CPU cores, against ~1 ms for the cumsum and search.
    # side="right" picks the first token whose running sum passes u, so a token of probability 0 (cut by
    # top-k / top-p) is never picked, even for u = 0.
    cdf = logits.softmax(-1).cumsum(-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, side="right").clamp(max=cdf.shape[-1] - 1).squeeze(-1)


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids from the model config and the tokenizer, plus the chat template's end-of-turn token."""
    ids = set(model.config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    eot = end_of_turn_id(tokenizer)
    if eot is not None:
        ids.add(eot)
    return sorted(ids)


def end_of_turn_id(tokenizer) -> int | None:
    """The special token that the chat template puts right after an assistant's message (`<|im_end|>`,
    `<|eot_id|>`, ...), found by rendering a conversation rather than by a list of known names."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "LORAFIT_END_OF_TURN_PROBE"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that cannot render this conversation has no usable end-of-turn
        return None
    if marker not in text:
        return None
    ids = tokenizer.encode(text.split(marker, 1)[1].lstrip(" "), add_special_tokens=False)
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return ids[0] if ids and ids[0] in special else None


def encode_prompt(tokenizer, prompt) -> list[int]:
    """A string is encoded as is (with the tokenizer's BOS, if it adds one); a list of chat messages goes
    through the chat template with the assistant's turn opened."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)  # the template already holds any BOS


def _is_single(prompt) -> bool:
    return isinstance(prompt, str) or (len(prompt) > 0 and isinstance(prompt[0], dict))


def generate(
    model,
    tokenizer,
    prompt_or_messages,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
):
    """Text in, text out. Accepts a string, a list of chat messages, or a list of either (a batch, which
    returns a list of strings)."""
    single = _is_single(prompt_or_messages)
    prompts = [prompt_or_messages] if single else list(prompt_or_messages)
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    stop = stop_token_ids(model, tokenizer)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.model.embed_tokens.weight.device).manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
    outputs = generate_ids(model, ids, max_new_tokens, Sampling(temperature, top_k, top_p), stop, pad, generator)
    texts = [tokenizer.decode([t for t in out if t not in stop], skip_special_tokens=True) for out in outputs]
    return texts[0] if single else texts
