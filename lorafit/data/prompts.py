"""Prompt-only data for GRPO: each row gives a prompt to sample completions for, plus the columns that reward
functions need to score them (a reference answer, test cases, ...).

Layouts, recognised by their keys:
    {"prompt": str | messages, ...other columns}     (TRL's)
    {"question": str, "answer": str, ...}            (GSM8K's and reasoning-gym's)
A string prompt becomes one user message, preceded by the system prompt when one is given and the row has
none. The messages are rendered through the tokenizer's chat template with the assistant's turn opened, the
same way `lorafit.generate` renders them, so that training rollouts and later generation see the same text;
a tokenizer without a template gets the fallback of data/chat.py, as in SFT.

    data = load_prompt_dataset("data/chain_sum.jsonl", tokenizer, max_prompt_length=256, eval_fraction=0.05)
    print(data.summary())
    for step, items in enumerate(data.batches(prompts_per_step=8, epoch=0, seed=3407, start=k), start=k):
        ...   # items[i].prompt_ids to generate from; items[i].prompt and items[i].columns for the rewards
"""

from dataclasses import dataclass, field

from ..errors import DataError
from .chat import ChatTemplate
from .dataset import batch_order, hold_out
from .files import read_rows

LAYOUTS = '{"prompt": text or messages, ...} (TRL) or {"question": text, "answer": text, ...} (GSM8K, reasoning-gym)'
ROLES = ("system", "user", "assistant")
# Reward functions are called as fn(prompts=..., completions=..., **columns): a column with one of these
# names could not be passed.
RESERVED_COLUMNS = ("prompts", "completions")


@dataclass
class PromptItem:
    prompt_ids: list[int]  # the rendered prompt, assistant turn opened
    prompt: list[dict]  # the chat messages (what reward functions receive as the prompt)
    columns: dict  # every other column of the row (e.g. "answer"), passed to reward functions
    where: str  # the row's place, for error messages ("train.jsonl:17")


@dataclass
class PromptDataset:
    train: list[PromptItem]
    eval: list[PromptItem]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in self.skipped.items() if n)
        return (f"prompt data: {len(self.train)} training prompts, {len(self.eval)} held out"
                + (f"; skipped {skipped}" if skipped else ""))

    def num_batches(self, prompts_per_step: int) -> int:
        """Full batches per epoch (0 when there are fewer prompts than one batch: the caller, which knows the
        settings that made prompts_per_step, says so). A last, smaller batch is left out, as every step samples
        the same number of prompts: group statistics and the step's token budget stay alike from step to step."""
        if isinstance(prompts_per_step, bool) or not isinstance(prompts_per_step, int) or prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be a positive integer, got {prompts_per_step!r}")
        return len(self.train) // prompts_per_step

    def batches(self, prompts_per_step: int, *, epoch: int = 0, seed: int = 0, start: int = 0):
        """Yields the batches of one epoch from the `start`-th on (resume), each a list of `prompts_per_step`
        training items. The order is a pure function of (seed, epoch), the same one SFT uses."""
        total = self.num_batches(prompts_per_step)  # checked now, not at the first next()
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        order = batch_order(len(self.train), epoch, seed)
        k = prompts_per_step
        return ([self.train[i] for i in order[b * k : (b + 1) * k]] for b in range(start, total))


def load_prompt_dataset(path, tokenizer, max_prompt_length: int, eval_fraction: float = 0.0, seed: int = 3407,
                        system_prompt: str | None = None) -> PromptDataset:
    """Reads a prompt file (any format `read_rows` reads) and renders its prompts. Rows with neither a prompt
    nor a question, and prompts longer than max_prompt_length tokens, are left out and counted in `skipped`;
    eval_fraction of the rest (chosen by `seed`) is held out."""
    if isinstance(max_prompt_length, bool) or not isinstance(max_prompt_length, int) or max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be a positive integer, got {max_prompt_length!r}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: the dataset is empty")
    template = ChatTemplate(tokenizer)  # the tokenizer's own, or (base models) lorafit's fallback, as SFT

    no_prompt = "rows without a prompt or question"
    too_long = f"prompts longer than max_prompt_length ({max_prompt_length} tokens)"
    skipped = {no_prompt: 0, too_long: 0}
    items = []
    for where, row in rows:
        key = "prompt" if "prompt" in row else "question" if "question" in row else None
        if key is None or _blank(row[key]):
            skipped[no_prompt] += 1
            continue
        messages = _messages(where, row[key], key, system_prompt)
        # The rendered text already holds any BOS the template writes: no special tokens added on top.
        prompt_ids = tokenizer.encode(template.render(messages, where, add_generation_prompt=True),
                                      add_special_tokens=False)
        if len(prompt_ids) > max_prompt_length:
            skipped[too_long] += 1
            continue
        columns = {k: v for k, v in row.items() if k != key}
        for reserved in RESERVED_COLUMNS:
            if reserved in columns:
                raise DataError(f"{where}: a column may not be named '{reserved}' (reward functions take that "
                                "argument themselves); rename it")
        items.append(PromptItem(prompt_ids, messages, columns, where))

    if not items:
        if skipped[no_prompt] == len(rows):
            found = ", ".join(map(str, rows[0][1])) or "no keys"
            raise DataError(f"{path}: no row has a prompt; its first row has {found}; accepted layouts: {LAYOUTS}")
        raise DataError(f"{path}: no usable prompt ({skipped[too_long]} {too_long}, {skipped[no_prompt]} "
                        f"{no_prompt}); raise max_prompt_length")
    train, held_out = hold_out(items, eval_fraction, seed, path, what="usable prompts")
    return PromptDataset(train, held_out, skipped)


def _blank(value) -> bool:
    """An empty cell (None, "", whitespace, []): CSV files and merged datasets leave such holes."""
    if isinstance(value, str):
        return not value.strip()
    return value is None or value == []


def _messages(where: str, prompt, key: str, system_prompt: str | None) -> list[dict]:
    """The prompt as chat messages, with the system prompt first unless the row brings its own."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and key == "prompt":
        messages = [_message(where, m) for m in prompt]
    else:
        expected = "text or a list of chat messages" if key == "prompt" else "text"
        raise DataError(f"{where}: '{key}' must be {expected}, got {type(prompt).__name__}")
    if system_prompt is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _message(where: str, message) -> dict:
    if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
        raise DataError(f"{where}: each message of 'prompt' needs a role ({', '.join(ROLES)}) and text content, "
                        f"got {message!r:.80}")
    return {"role": message["role"], "content": message["content"]}
