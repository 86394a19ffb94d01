"""The SFT dataset: file -> rows -> samples -> tokenised examples -> (packed) rows -> deterministic batches.

`SFTDataset.batches(batch_size, epoch, seed, start)` is a pure function of its arguments: the order of an
epoch depends only on (seed, epoch), and `start` skips micro-batches without building them. A trainer that
records (epoch, micro-batches done) can therefore resume at exactly the next batch.
"""

import random
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from .chat import tokenize_samples
from .files import read_rows
from .formats import to_samples
from .packing import Example, collate, pack_greedy

OVERFLOW = ("truncate", "drop")


@dataclass
class DataStats:
    """What became of the data, for the log. Counts are of examples unless they say tokens."""

    format: str = ""
    rows: int = 0  # rows read (a self-instruct row with several instances gives several examples)
    examples: int = 0  # kept for training and evaluation
    tokens: int = 0  # input tokens of the kept examples
    label_tokens: int = 0  # tokens the loss counts (after the shift)
    truncated: int = 0  # longer than max_seq_length, cut to it (overflow="truncate")
    dropped: int = 0  # longer than max_seq_length, left out (overflow="drop")
    unlabelled: int = 0  # left out: nothing to learn once truncated (the answer lay past max_seq_length)
    train_examples: int = 0
    eval_examples: int = 0
    train_rows: int = 0  # batch rows: packed rows when packing, else = train_examples
    eval_rows: int = 0

    def summary(self) -> str:
        share = self.label_tokens / self.tokens if self.tokens else 0.0
        text = (
            f"{self.rows:,} rows ({self.format}) -> {self.examples:,} examples, {self.tokens:,} tokens "
            f"({share:.0%} labelled); {self.truncated:,} truncated, {self.dropped:,} dropped as too long, "
            f"{self.unlabelled:,} dropped with no label left; "
            f"{self.train_examples:,} train / {self.eval_examples:,} eval"
        )
        if self.train_rows != self.train_examples:
            text += f"; packed into {self.train_rows:,} train rows"
        return text


@dataclass
class SFTDataset:
    """Rows of tokenised examples (one example per row unless packed) and how they were made."""

    train: list[list[Example]]
    eval: list[list[Example]]
    stats: DataStats
    pad_id: int
    packing: bool
    max_seq_length: int
    source: str = field(default="", repr=False)

    def num_batches(self, batch_size: int, split: str = "train", num_shards: int = 1) -> int:
        """Micro-batches per epoch for each shard (every shard gets the same number: see `batches`)."""
        rows = len(self._split(split))
        total = -(-rows // _positive(batch_size, "batch_size"))  # a last, smaller batch is kept
        return total if num_shards == 1 else total // num_shards

    def batches(self, batch_size: int, epoch: int = 0, seed: int = 3407, start: int = 0, split: str = "train",
                shard: int = 0, num_shards: int = 1):
        """Yields the collated micro-batches of one epoch from the `start`-th on.

        The train split is shuffled by (seed, epoch); eval keeps its order. With num_shards > 1 (data-parallel
        ranks) micro-batch j of the epoch goes to shard j % num_shards, and the few batches that would leave
        the shards with unequal counts are left out (ranks must take the same number of steps).
        """
        rows = self._split(split)
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard must be in 0..{num_shards - 1}, got {shard}")
        order = batch_order(len(rows), epoch, seed) if split == "train" else list(range(len(rows)))
        per_shard = self.num_batches(batch_size, split, num_shards)  # checked here, not at the first next()

        def batch(j: int) -> dict:
            b = j * num_shards + shard
            return collate([rows[i] for i in order[b * batch_size : (b + 1) * batch_size]], self.pad_id, self.packing)

        return (batch(j) for j in range(start, per_shard))

    def _split(self, split: str) -> list[list[Example]]:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        return self.train if split == "train" else self.eval


def batch_order(n: int, epoch: int, seed: int) -> list[int]:
    """The permutation of n rows for one epoch: a pure function of (n, epoch, seed). A string seed makes
    Python hash it with SHA-512, so the order is the same on every machine and Python version >= 3.2."""
    order = list(range(n))
    random.Random(f"lorafit-batches:{seed}:{epoch}").shuffle(order)
    return order


def load_sft_dataset(
    source,
    tokenizer,
    max_seq_length: int,
    format: str = "auto",
    train_on_responses_only: bool = True,
    packing: bool = False,
    eval_fraction: float = 0.0,
    seed: int = 3407,
    overflow: str = "truncate",
) -> SFTDataset:
    """Reads, normalises and tokenises a dataset for supervised fine-tuning.

    source: a data file (.json, .jsonl, .csv, .tsv, .parquet), a datasets.save_to_disk folder, or a list of
    row dicts. overflow: what to do with examples longer than max_seq_length, "truncate" (the default: a
    long answer still teaches its beginning) or "drop". eval_fraction: share of examples held out for
    evaluation, chosen by `seed`.
    """
    max_seq_length = _positive(max_seq_length, "max_seq_length")
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {', '.join(OVERFLOW)}, got {overflow!r}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if isinstance(source, (str, Path)):
        name, rows = str(source), read_rows(source)
    else:
        name, rows = "rows", [(f"row {i}", row) for i, row in enumerate(source, start=1)]
    if not rows:
        raise DataError(f"{name}: the dataset is empty")

    samples, used_format = to_samples(rows, format)
    stats = DataStats(format=used_format, rows=len(rows))
    examples = []
    for ids, labels in tokenize_samples(tokenizer, samples, train_on_responses_only):
        if len(ids) > max_seq_length:
            if overflow == "drop":
                stats.dropped += 1
                continue
            stats.truncated += 1
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        example = Example.from_lists(ids, labels)
        if example.num_label_tokens() == 0:
            stats.unlabelled += 1
            continue
        examples.append(example)
        stats.tokens += len(example)
        stats.label_tokens += example.num_label_tokens()
    stats.examples = len(examples)
    if not examples:
        raise DataError(
            f"{name}: no example left to train on ({stats.dropped} longer than max_seq_length={max_seq_length}, "
            f"{stats.unlabelled} with no label left after truncation); raise max_seq_length"
        )

    train, held_out = hold_out(examples, eval_fraction, seed, name)
    stats.train_examples, stats.eval_examples = len(train), len(held_out)
    train_rows, eval_rows = _rows(train, max_seq_length, packing), _rows(held_out, max_seq_length, packing)
    stats.train_rows, stats.eval_rows = len(train_rows), len(eval_rows)
    return SFTDataset(train_rows, eval_rows, stats, pad_id(tokenizer), packing, max_seq_length, name)


def pad_id(tokenizer) -> int:
    """Padding is masked by position, so the id only has to be a valid one: pad, else EOS, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def hold_out(items: list, eval_fraction: float, seed: int, name, what: str = "examples") -> tuple[list, list]:
    """(train, held out): eval_fraction of the items (at least one when it is > 0), chosen by `seed`. Both
    splits keep file order, so packing (in order) stays deterministic and neighbours stay together."""
    if eval_fraction == 0:
        return items, []
    n_eval = max(1, round(len(items) * eval_fraction))
    if n_eval >= len(items):
        raise DataError(f"{name}: {len(items)} {what} are too few to hold out eval_fraction={eval_fraction}")
    held = set(random.Random(f"lorafit-eval-split:{seed}").sample(range(len(items)), n_eval))
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def _rows(examples: list[Example], max_seq_length: int, packing: bool) -> list[list[Example]]:
    if not packing:
        return [[e] for e in examples]
    return [[examples[i] for i in row] for row in pack_greedy([len(e) for e in examples], max_seq_length)]


def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value
