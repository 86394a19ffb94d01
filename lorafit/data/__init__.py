"""Supervised fine-tuning data: files, formats, chat templates with response-only labels, packing, batches.

    data = load_sft_dataset("train.jsonl", tokenizer, max_seq_length=2048, packing=True, eval_fraction=0.05)
    print(data.stats.summary())
    for batch in data.batches(batch_size=2, epoch=0, seed=3407, start=k):
        loss = model(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"]).loss   # batch["num_label_tokens"]: for normalising

`demo_dataset_path()` is the shipped identity demo (alpaca format, from LLaMA-Factory, Apache-2.0).
"""

from pathlib import Path

from .chat import FALLBACK_CHAT_TEMPLATE, IGNORE, ChatTemplate, labelled_spans, tokenize_samples
from .dataset import DataStats, SFTDataset, batch_order, load_sft_dataset
from .files import read_rows
from .formats import FORMATS, Sample, detect_format, to_samples
from .packing import Example, block_causal_mask, collate, pack_greedy


def demo_dataset_path() -> Path:
    """identity.json: 91 questions about who the assistant is, answered as "Lora, by the lorafit developers"."""
    return Path(__file__).with_name("identity.json")


__all__ = [
    "FALLBACK_CHAT_TEMPLATE",
    "FORMATS",
    "IGNORE",
    "ChatTemplate",
    "DataStats",
    "Example",
    "SFTDataset",
    "Sample",
    "batch_order",
    "block_causal_mask",
    "collate",
    "demo_dataset_path",
    "detect_format",
    "labelled_spans",
    "load_sft_dataset",
    "pack_greedy",
    "read_rows",
    "to_samples",
    "tokenize_samples",
]
