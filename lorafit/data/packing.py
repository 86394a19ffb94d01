"""Packing and collation: from tokenised examples to the tensors the model takes.

A batch row holds one or more documents (examples). Without packing each row is one document, right-padded
to the longest in the batch, with a (B, S) 0/1 padding mask. With packing, several documents share a row
with no padding between them ("padding-free"); a block-diagonal causal mask (B, 1, T, T) keeps each token
from attending outside its own document, and position ids restart at 0 for every document, so each
document is computed exactly as if it were alone.

Labels at document boundaries: the model shifts labels by one (the logits at token t are scored against the
label of token t + 1), so in a packed row the last token of a document is scored against the first label of
the next. Every example's first label is -100 (chat.tokenize_samples sees to it), which keeps that pair out of
the loss; `collate` checks it.
"""

import itertools
from dataclasses import dataclass

import torch

from .chat import IGNORE


@dataclass(frozen=True, eq=False)
class Example:
    """One tokenised document. int32 halves the memory of a large dataset; batches are int64."""

    input_ids: torch.Tensor  # (L,) int32
    labels: torch.Tensor  # (L,) int32, IGNORE where nothing is learned

    @staticmethod
    def from_lists(input_ids: list[int], labels: list[int]) -> "Example":
        return Example(torch.tensor(input_ids, dtype=torch.int32), torch.tensor(labels, dtype=torch.int32))

    def __len__(self) -> int:
        return self.input_ids.numel()

    def num_label_tokens(self) -> int:
        return int((self.labels[1:] != IGNORE).sum())  # after the shift: the first label is never predicted


def pack_greedy(lengths: list[int], max_seq_length: int) -> list[list[int]]:
    """Groups example indices into rows of at most max_seq_length tokens: in order, a row is closed when the
    next example does not fit (deterministic, and it keeps neighbouring examples together; a best-fit sort
    would fill rows a few percent better but reorder the data)."""
    rows: list[list[int]] = []
    used = max_seq_length + 1  # forces a first row
    for i, n in enumerate(lengths):
        if n > max_seq_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_seq_length={max_seq_length}: cut or drop it")
        if used + n > max_seq_length:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def collate(rows: list[list[Example]], pad_id: int, packed: bool) -> dict:
    """-> {"input_ids", "labels", "attention_mask", "position_ids", "num_label_tokens", "num_tokens"}, and
    for packed rows "cu_seqlens" and "max_seqlen" (the documents' boundaries, for varlen attention).

    input_ids, labels, position_ids: (B, S) int64, right-padded (padding: pad_id, label -100).
    attention_mask: (B, S) 0/1 when not packed; (B, 1, S, S) bool when packed (True = may attend).
    num_tokens: real tokens of the batch. num_label_tokens: labels the loss will count after the shift (an int), which the trainer sums over the
    accumulation window to normalise the loss (DESIGN §4). Padding is recognised by position, never by
    token id, so an EOS that is also the pad token is still learned.
    """
    if not rows or any(not row for row in rows):
        raise ValueError("collate needs at least one row, each with at least one example")
    if not packed and any(len(row) > 1 for row in rows):
        raise ValueError("rows of several examples need packed=True")
    B, S = len(rows), max(sum(len(e) for e in row) for row in rows)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    labels = torch.full((B, S), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, S), dtype=torch.long)
    document = torch.full((B, S), -1, dtype=torch.long)  # which document each position holds; -1 = padding
    for b, row in enumerate(rows):
        at = 0
        for d, example in enumerate(row):
            n = len(example)
            if example.labels[0] != IGNORE:
                raise ValueError("an example's first label must be -100 (else a packed document predicts the next one)")
            input_ids[b, at : at + n] = example.input_ids
            labels[b, at : at + n] = example.labels
            position_ids[b, at : at + n] = torch.arange(n)
            document[b, at : at + n] = d
            at += n
    real = document >= 0
    extra = {}
    if packed:
        attention_mask = block_causal_mask(document)
        # The same documents for varlen (flash) attention on GPUs: boundaries over the flattened (B * S)
        # tokens, each row's padding tail one more segment. Known here, on the CPU, so the model never
        # has to derive them from a device tensor (which would wait for the GPU).
        lengths = []
        for row in rows:
            lengths += [len(e) for e in row]
            if S > sum(len(e) for e in row):
                lengths.append(S - sum(len(e) for e in row))
        extra = {"cu_seqlens": torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32),
                 "max_seqlen": max(lengths)}
    else:
        attention_mask = real.long()
        position_ids = torch.arange(S).expand(B, S).clone()  # as the model would count them from the mask
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "num_label_tokens": int((labels[:, 1:] != IGNORE).sum()),
        "num_tokens": int(real.sum()),  # real (non-padding) tokens: what tokens/s counts
        "row_tokens": real.sum(1),  # (B,) the same per row, so that split_rows can count its halves
        **extra,  # packed: "cu_seqlens" (int32, segments + 1) and "max_seqlen"
    }


def split_rows(batch: dict) -> tuple[dict, dict]:
    """A collated micro-batch of B >= 2 rows -> two of about B / 2 rows, with their own counts and (packed)
    document boundaries: what a micro-batch that ran out of memory becomes. The halves keep the batch's
    padded length, so they hold the same tokens and labels: the step they give is the same up to float
    order."""
    B, S = batch["input_ids"].shape
    if B < 2:
        raise ValueError("a micro-batch of one row cannot be split")
    h = B // 2
    halves = []
    for rows in (slice(0, h), slice(h, B)):
        half = {k: batch[k][rows] for k in ("input_ids", "labels", "attention_mask", "position_ids", "row_tokens")}
        half["num_label_tokens"] = int((half["labels"][:, 1:] != IGNORE).sum())
        half["num_tokens"] = int(half["row_tokens"].sum())
        if "cu_seqlens" in batch:
            # Every row ends a segment (its padding tail is one), so row boundaries are among the offsets.
            cu = batch["cu_seqlens"]
            first, last = rows.start * S, rows.stop * S
            inside = cu[(cu >= first) & (cu <= last)] - first
            half["cu_seqlens"] = inside.to(torch.int32)
            half["max_seqlen"] = int((inside[1:] - inside[:-1]).max())
        halves.append(half)
    return halves[0], halves[1]


def block_causal_mask(document: torch.Tensor) -> torch.Tensor:
    """document: (B, S) document index per position (-1 for padding) -> (B, 1, S, S) bool mask where a
    query attends to the keys at or before it in the same document. Padding positions form one more
    "document", so that every query sees at least itself (an all-False row gives NaN in attention)."""
    S = document.shape[1]
    same = document[:, :, None] == document[:, None, :]  # (B, S, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=document.device).tril()
    return (same & causal)[:, None]


def split_micro_batches(batches: list[dict], times: int) -> list[dict]:
    """Each micro-batch halved `times` times (down to one row): the same examples in 2**times as many
    micro-batches, the accumulation window an out-of-memory step is redone with."""
    for _ in range(times):
        batches = [half for b in batches for half in (split_rows(b) if b["input_ids"].shape[0] > 1 else (b,))]
    return batches
