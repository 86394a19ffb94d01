"""Did you mean ...: the config key closest to an unknown one, for config.py's errors.

An unknown key is pointed at a key of that exact name in another section first (train.r -> finetune.r), then
at the closest key of its own section (a typo), then at the closest anywhere, names other fine-tuning tools
use for our keys among them (ALIASES: learning_rate -> train.lr). `sections` is config.SECTIONS.
"""

import difflib
from dataclasses import fields

# Names other fine-tuning tools use for our keys: an unknown key close to one of these is pointed at ours.
ALIASES = {
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "micro_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "lr_scheduler_type": "train.scheduler",
    "lr_scheduler": "train.scheduler",
    "warmup_steps": "train.warmup_ratio",
    "gradient_clipping": "train.max_grad_norm",
    "lora_r": "finetune.r",
    "rank": "finetune.r",
    "lora_alpha": "finetune.alpha",
    "lora_dropout": "finetune.dropout",
    "target_modules": "finetune.targets",
    "use_rslora": "finetune.rslora",
    "use_dora": "finetune.dora",
    "model_name_or_path": "model.source",
    "base_model": "model.source",
    "max_length": "model.max_seq_length",
    "sequence_len": "model.max_seq_length",
    "dataset": "data.path",
}


def did_you_mean(suggestion: str | None) -> str:
    return f" (did you mean {suggestion}?)" if suggestion else ""


def _all_names(sections) -> dict[str, list[str]]:
    """Every spelling we can point at -> the full keys it stands for ("r" -> ["finetune.r"])."""
    names: dict[str, list[str]] = {}
    for section, cls in sections.items():
        for f in fields(cls):
            names.setdefault(f.name, []).append(f"{section}.{f.name}")
    for alias, full in ALIASES.items():
        names.setdefault(alias, []).append(full)
    return names


def suggest_key(sections, section: str, key: str) -> str | None:
    """For an unknown key of a known section: the same name elsewhere, a typo of its own section, or anywhere."""
    names = _all_names(sections)
    if key in names:
        return names[key][0]
    own = {n: full for n, fulls in names.items() for full in fulls if full.startswith(section + ".")}
    match = difflib.get_close_matches(key, own, n=1)
    if match:
        return own[match[0]]
    return suggest_anywhere(sections, key)


def suggest_anywhere(sections, key: str) -> str | None:
    names = _all_names(sections)
    match = difflib.get_close_matches(key, names, n=1)
    return names[match[0]][0] if match else None


def suggest_section(sections, key: str) -> str | None:
    """For an unknown top-level key: the closest section name, else the closest key anywhere."""
    match = difflib.get_close_matches(key, sections, n=1)
    return match[0] if match else suggest_anywhere(sections, key)
