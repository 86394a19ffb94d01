"""Training recipes: plain loops, one file each."""

from ..errors import ConfigError


def train(config, resume: bool = False, **options):
    """Runs the recipe the config names and returns its result (paths, metrics)."""
    if config.train.recipe == "sft":
        from .sft import run_sft

        return run_sft(config, resume=resume, **options)
    if config.train.recipe == "dpo":
        from .dpo import run_dpo

        return run_dpo(config, resume=resume, **options)
    if config.train.recipe == "grpo":
        from .grpo import run_grpo

        return run_grpo(config, resume=resume, **options)
    raise ConfigError(f"train.recipe {config.train.recipe!r} is not implemented (implemented: sft, dpo, grpo)")
