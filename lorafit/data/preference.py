"""Preference data for DPO: a prompt, a chosen answer and a rejected one, tokenised through the chat template.

Layouts, recognised by their keys:
    {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}     (TRL's)
    {"conversations": [{"from", "value"}...], "chosen": {"from", "value"}, "rejected": {...}}  (LLaMA-Factory's)
A string prompt becomes one user message; a string answer one assistant message; answers given as message
lists keep their assistant messages. The answer's tokens are the rendered conversation with the answer
minus the rendered prompt with the assistant turn opened: its content and the template's end-of-turn.
"""

import math
import random
from dataclasses import dataclass, field

import torch

from ..errors import DataError
from .chat import ChatTemplate
from .dataset import hold_out
from .files import read_rows

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class PreferencePair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


@dataclass
class PreferenceDataset:
    train: list[PreferencePair]
    eval: list[PreferencePair]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    pad_id: int = 0
    truncated: dict[str, int] = field(default_factory=dict)  # "prompts" / "answers" -> pairs cut to fit

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in self.skipped.items() if n)
        cut = ", ".join(f"{n} pairs' {what}" for what, n in self.truncated.items() if n)
        return (f"preference data: {len(self.train)} training pairs, {len(self.eval)} held out"
                + (f"; skipped {skipped}" if skipped else "") + (f"; cut to max_seq_length: {cut}" if cut else ""))

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self.train) / batch_size)

    def batches(self, batch_size: int, *, epoch: int = 0, seed: int = 0, start: int = 0, split: str = "train",
                shard: int = 0, num_shards: int = 1):
        """Collated micro-batches; training pairs in a shuffled order fixed by (seed, epoch), from batch
        `start` on (resume), held-out pairs in file order. Shards (data-parallel ranks) as SFTDataset.batches:
        micro-batch j of the epoch goes to shard j % num_shards; the last round, where the shards would
        have unequal counts, is left out (training/loop.rank_batches takes it)."""
        pairs = self.train if split == "train" else self.eval
        order = list(range(len(pairs)))
        if split == "train":
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
        total = math.ceil(len(order) / batch_size)
        for j in range(start, total if num_shards == 1 else total // num_shards):
            i = (j * num_shards + shard) * batch_size
            yield collate_pairs([pairs[k] for k in order[i : i + batch_size]], self.pad_id)


def collate_pairs(pairs: list[PreferencePair], pad_id: int) -> dict:
    """-> {"input_ids", "attention_mask", "labels"}: (2B, S), the B chosen sequences then the B rejected,
    right-padded; labels on the answer tokens only (-100 elsewhere); "num_pairs"; "pairs" (the inputs)."""
    sequences = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    S = max(len(a) + len(b) for a, b in sequences)
    input_ids = torch.full((len(sequences), S), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), S), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), S), dtype=torch.long)
    for i, (prompt, answer) in enumerate(sequences):
        n = len(prompt) + len(answer)
        input_ids[i, :n] = torch.tensor(prompt + answer)
        labels[i, len(prompt) : n] = torch.tensor(answer)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "num_pairs": len(pairs),
            "pairs": pairs}


def load_preference_dataset(path, tokenizer, max_seq_length: int, eval_fraction: float = 0.0,
                            seed: int = 0) -> PreferenceDataset:
    template = ChatTemplate(tokenizer)
    pairs, skipped = [], {"with identical chosen and rejected answers": 0}
    truncated = {"prompts": 0, "answers": 0}  # pairs cut to max_seq_length, reported in the summary
    for where, row in read_rows(path):
        prompt, chosen, rejected = _messages(where, row)
        if chosen == rejected:
            skipped["with identical chosen and rejected answers"] += 1
            continue
        prompt_text = template.render(prompt, where, add_generation_prompt=True)
        prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
        answers = []
        for answer in (chosen, rejected):
            full = template.render(prompt + answer, where)
            if not full.startswith(prompt_text):
                raise DataError(f"{where}: {template.name} renders the prompt differently once an answer follows")
            answers.append(tokenizer.encode(full[len(prompt_text) :], add_special_tokens=False))
        # Over the budget, a prompt keeps its last half-budget tokens (the latest turns, which the answers
        # reply to; TRL's "keep_end") and the answers are cut to the rest (their first tokens carry most of
        # the preference). Half and half: in dpo_en_demo at 256 tokens, 142 of 299 prompts are longer.
        if len(prompt_ids) + max(map(len, answers)) > max_seq_length:
            if len(prompt_ids) > max_seq_length // 2:
                prompt_ids = prompt_ids[-(max_seq_length // 2) :]
                truncated["prompts"] += 1
            truncated["answers"] += any(len(a) > max_seq_length - len(prompt_ids) for a in answers)
        room = max_seq_length - len(prompt_ids)
        pairs.append(PreferencePair(prompt_ids, answers[0][:room], answers[1][:room]))
    if not pairs:
        raise DataError(f"{path}: no usable preference pairs ({', '.join(f'{n} {w}' for w, n in skipped.items())})")
    train_pairs, eval_pairs = hold_out(pairs, eval_fraction, seed, path, what="usable pairs")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return PreferenceDataset(train_pairs, eval_pairs, skipped, pad, truncated)


def _messages(where: str, row: dict):
    """-> (prompt messages, chosen messages, rejected messages)."""
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if "prompt" in row and not missing:
        prompt = row["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _chat(where, prompt)
    elif "conversations" in row and not missing:
        prompt = _chat(where, row["conversations"])
    else:
        need = "prompt (or conversations), chosen, rejected"
        raise DataError(f"{where}: a preference row needs {need}; this one has {', '.join(map(str, row)) or 'no keys'}")
    return prompt, _answer(where, row["chosen"], "chosen"), _answer(where, row["rejected"], "rejected")


def _answer(where: str, value, key: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    messages = _chat(where, [value] if isinstance(value, dict) else value)
    if not messages or any(m["role"] != "assistant" for m in messages):
        raise DataError(f"{where}: '{key}' must be the assistant's answer (a string or assistant messages)")
    return messages


def _chat(where: str, turns) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: expected a non-empty list of messages, got {type(turns).__name__}")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise DataError(f"{where}: a message must be a mapping, got {type(turn).__name__}")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLES or not isinstance(content, str):
            raise DataError(f"{where}: a message needs a role ({', '.join(sorted(set(ROLES)))}) and text content")
        messages.append({"role": ROLES[role], "content": content})
    return messages
