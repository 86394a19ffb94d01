"""The one configuration schema: YAML files, command-line overrides and the Python API are these dataclasses.

    config = Config.from_yaml("configs/sft-lora-default.yaml", overrides=["train.max_steps=10"])
    config = Config(finetune=FinetuneSection(r=32), train=TrainSection(max_steps=10))

The defaults are DESIGN §1's hyperparameter guide. Validation only rejects values that cannot work (a
negative rank, an unknown scheduler); values that work but leave the guide's recommended range are the
advisor's business (advisor.py), which explains them instead of refusing them. "null" values that have a
guide default (alpha, lr) stay null in the config; `resolved_*` gives the value training uses, so the
user's file is never rewritten behind their back.

Every section is frozen: derive a changed copy with `config.with_overrides([...])` or `dataclasses.replace`.
"""

import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path

import yaml

from .config_keys import did_you_mean, suggest_anywhere, suggest_key, suggest_section
from .errors import ConfigError
from .finetune import METHODS
from .lora import SAVABLE_MODULES, TARGET_GROUPS
from .models.loading import DTYPES

MODEL_DTYPES = ("auto", *DTYPES)
RECIPES = ("sft", "dpo", "grpo")
SCHEDULERS = ("linear", "cosine")
ACTIVATION_CHECKPOINTING = ("auto", "none", "layers", "offload")  # auto, then lorafit.nn.checkpointing.MODES
KERNELS = ("rms_norm", "rope", "swiglu", "lora_mlp", "lora_qkv", "cross_entropy", "cuda_graphs")  # lorafit.models.llama.CausalLM.KERNELS
DISTRIBUTED = ("auto", "ddp", "fsdp")  # lorafit.training.distributed.STRATEGIES
DPO_LOSSES = ("sigmoid", "ipo")  # lorafit.losses.dpo.LOSSES
GRPO_NORMALISATIONS = ("token", "sequence", "dr_grpo")  # lorafit.losses.grpo.NORMALISATIONS
ON_REWARD_ERROR = ("stop", "skip")
DATA_FORMATS = ("auto", "alpaca", "sharegpt", "messages", "qa", "text")  # what lorafit/data/formats.py reads

# DESIGN §1: LoRA and QLoRA SFT take 2e-4; full fine-tuning changes every weight, so 10x lower (2e-5);
# preference and RL training start from an already useful model and drift easily, so 5e-6 for any method.
DEFAULT_LR = {
    ("sft", "lora"): 2e-4,
    ("sft", "qlora"): 2e-4,
    ("sft", "full"): 2e-5,
    ("dpo", "lora"): 5e-6,
    ("dpo", "qlora"): 5e-6,
    ("dpo", "full"): 5e-6,
    ("grpo", "lora"): 5e-6,
    ("grpo", "qlora"): 5e-6,
    ("grpo", "full"): 5e-6,
}

# DESIGN §1: micro-batch 2 x accumulation 8 = an effective batch of 16, the guide's recommendation.
DEFAULT_GRAD_ACCUM = 8
DEFAULT_EFFECTIVE_BATCH = 16

# The demo dataset ships inside the package (lorafit/data/identity.json).
DEMO_DATA = ("data", "identity.json")

def default_lr(recipe: str, method: str) -> float:
    """The guide's learning rate for a recipe and a fine-tuning method."""
    return DEFAULT_LR[(recipe, method)]


# ------------------------------------------------------------------------------------------------ checks


def _show(value) -> str:
    """A value as the user wrote it in YAML (null, true), so the message quotes their own text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


class _Checker:
    """Checks one section's fields in place. Each check has one description of what the key accepts,
    used both for a wrong type and for an out-of-range value, so every message names the allowed values."""

    def __init__(self, section: str, obj):
        self.section, self.obj = section, obj

    def fail(self, name: str, expected: str, value, hint: str = ""):
        raise ConfigError(f"{self.section}.{name} must be {expected}, got {_show(value)}{hint}")

    def _set(self, name: str, value):
        object.__setattr__(self.obj, name, value)  # the dataclass is frozen; normalising is part of building it

    def integer(self, name: str, minimum: int | None = None, below: int | None = None, nullable=False,
                alternative: str = ""):
        value = getattr(self.obj, name)
        if minimum is not None and below is not None:
            expected = f"an integer in [{minimum}, {below})"
        else:
            expected = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        expected += (" or null" if nullable else "") + alternative
        if value is None and nullable:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, expected, value)
        if (minimum is not None and value < minimum) or (below is not None and value >= below):
            self.fail(name, expected, value)

    def number(self, name: str, low=None, high=None, low_open=False, high_open=True, nullable=False):
        """A finite number in the interval [low, high) by default; `low_open`/`high_open` exclude an end."""
        value = getattr(self.obj, name)
        expected = "a number"
        if low is not None and high is not None:
            expected += f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            expected += f" {'>' if low_open else '>='} {low:g}"
        expected += " or null" if nullable else ""
        if value is None and nullable:
            return
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, where `2e-4` (no dot) is a string, not a number: accept what float() reads.
            try:
                value = float(value)
            except ValueError:
                self.fail(name, expected, value)
            self._set(name, value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(name, expected, getattr(self.obj, name))
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            self.fail(name, expected, value)

    def boolean(self, name: str):
        value = getattr(self.obj, name)
        if not isinstance(value, bool):
            self.fail(name, "true or false", value)

    def choice(self, name: str, choices: Iterable[str], alternative: str = ""):
        value, choices = getattr(self.obj, name), tuple(choices)
        if value not in choices or not isinstance(value, str):
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = did_you_mean(close[0] if close else None)
            self.fail(name, f"one of {', '.join(choices)}{alternative}", value, hint)

    def text(self, name: str, nullable=False):
        value = getattr(self.obj, name)
        if value is None and nullable:
            return
        if not isinstance(value, str) or not value.strip():
            self.fail(name, "a non-empty string" + (" or null" if nullable else ""), value)

    def names(self, name: str, allowed: Iterable[str] | None = None, allow_empty=True):
        """A list of names, stored as a tuple (the sections are immutable)."""
        value = getattr(self.obj, name)
        expected = "a list of names" + (f" from {', '.join(allowed)}" if allowed is not None else "")
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            self.fail(name, expected, value)
        if allowed is not None and any(v not in allowed for v in value):
            self.fail(name, expected, list(value))
        if not value and not allow_empty:
            self.fail(name, "a non-empty list of names", list(value))
        self._set(name, tuple(value))


# ---------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelSection:
    source: str = "default"  # a Hugging Face directory, a .gguf file, a cached hub id, or "default"
    dtype: str = "auto"  # auto: bfloat16 on GPUs that support it, else float32
    max_seq_length: int = 2048  # longer examples are truncated

    def __post_init__(self):
        check = _Checker("model", self)
        check.text("source")
        check.choice("dtype", MODEL_DTYPES)
        # 16 tokens hold little more than a chat template's markup: anything shorter cannot train.
        check.integer("max_seq_length", minimum=16)


@dataclass(frozen=True)
class FinetuneSection:
    method: str = "lora"  # lora, qlora (4-bit NF4 base) or full
    r: int = 16
    alpha: float | None = None  # null: alpha = r (scale 1)
    dropout: float = 0.0  # 0 keeps the fused LoRA kernels usable
    targets: str | tuple[str, ...] = "all-linear"  # a group name, or layer names such as [q_proj, v_proj]
    rslora: bool = False  # scale the update by alpha/sqrt(r) instead of alpha/r
    dora: bool = False  # weight-decomposed LoRA (a learned magnitude per output row)
    modules_to_save: tuple[str, ...] = ()  # layers trained in full beside the adapters: embed_tokens, lm_head

    def __post_init__(self):
        check = _Checker("finetune", self)
        check.choice("method", METHODS)
        check.integer("r", minimum=1)
        check.number("alpha", low=0, low_open=True, nullable=True)
        check.number("dropout", low=0, high=1)
        if isinstance(self.targets, str):
            check.choice("targets", TARGET_GROUPS, alternative=" (or a list of layer names such as [q_proj, v_proj])")
        elif isinstance(self.targets, (list, tuple)):
            check.names("targets", allow_empty=False)
        else:
            check.fail("targets", f"a group ({', '.join(TARGET_GROUPS)}) or a list of layer names", self.targets)
        check.boolean("rslora")
        check.boolean("dora")
        check.names("modules_to_save", allowed=SAVABLE_MODULES)

    @property
    def resolved_alpha(self) -> float:
        """alpha as training uses it: the user's value, or r when it is null (the guide's standard)."""
        return self.r if self.alpha is None else self.alpha

    @property
    def scaling(self) -> float:
        """The factor on the adapter update B·A: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return self.resolved_alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def adapter_options(self) -> dict:
        """Keyword arguments for `prepare_for_finetuning(model, method, **options)`: none for full
        fine-tuning (it trains every weight), apply_lora's for lora and qlora."""
        if self.method == "full":
            return {}
        targets = self.targets if isinstance(self.targets, str) else list(self.targets)
        return dict(r=self.r, alpha=self.resolved_alpha, dropout=self.dropout, targets=targets,
                    rslora=self.rslora, dora=self.dora, modules_to_save=list(self.modules_to_save))


@dataclass(frozen=True)
class DataSection:
    path: str | None = None  # a data file; null: the demo set shipped with lorafit (identity.json)
    format: str = "auto"  # auto: recognised from the fields of the first rows
    train_on_responses_only: bool = True  # the loss covers the assistant's tokens, not the prompt's
    packing: bool = False  # concatenate short examples into full-length sequences
    eval_fraction: float = 0.0  # share of the rows held out for evaluation

    def __post_init__(self):
        check = _Checker("data", self)
        check.text("path", nullable=True)
        check.choice("format", DATA_FORMATS)
        check.boolean("train_on_responses_only")
        check.boolean("packing")
        check.number("eval_fraction", low=0, high=1)

    def resolved_path(self) -> Path:
        """The file to read. A relative path is relative to the current directory (where `lorafit` runs),
        as every other path on the command line. Resolved at use time: the package data may be absent in a
        source checkout that has not installed it, and that must not break importing lorafit."""
        if self.path is not None:
            return Path(self.path).expanduser()
        return Path(str(resources.files("lorafit").joinpath(*DEMO_DATA)))


@dataclass(frozen=True)
class TrainSection:
    recipe: str = "sft"
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; when set it wins over epochs
    lr: float | None = None  # null: the guide's default for the recipe and method (see Config.resolved_lr)
    # Micro-batch: examples per forward/backward on each device; auto: the largest that fits the memory
    # budget (estimated, then tried once on a GPU: training/batch_size.py), with grad_accum set to keep
    # effective_batch_size.
    batch_size: int | str = 2
    grad_accum: int | None = None  # micro-batches per optimizer step; null: 8, or what effective_batch_size needs
    # Examples per optimizer step over all ranks (micro-batch x grad_accum x ranks); null: that product, or
    # with batch_size auto the guide's 16. Set it or grad_accum, not both.
    effective_batch_size: int | None = None
    warmup_ratio: float = 0.05  # share of the optimizer steps that ramp the learning rate up from 0
    scheduler: str = "linear"
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0  # null: no gradient clipping
    seed: int = 3407
    output_dir: str = "runs/sft"
    save_every: int = 100  # optimizer steps between checkpoints; 0: only the final one
    log_every: int = 1  # optimizer steps between log lines
    # What decoder layers keep for backward: none (fastest), layers (recompute each layer: about a third
    # more compute, a fraction of the memory), offload (as layers, the kept inputs in CPU memory; GPU only),
    # auto (GPU: as few layers offloaded as memory_budget_gib needs, lorafit/memory.py; CPU: none).
    activation_checkpointing: str = "auto"
    memory_budget_gib: float | None = None  # auto's budget; null: the GPU's memory less 5%
    # Fused GPU kernels to switch off (CPU always runs plain PyTorch), for debugging or before/after numbers:
    # rms_norm, rope, swiglu, lora_mlp (the LoRA MLP as one function), lora_qkv (q, k, v as one function),
    # cross_entropy (chunked, with lm_head), cuda_graphs (micro-batches of one shape replayed from a CUDA
    # graph, training/cuda_graphs.py).
    disable_kernels: tuple[str, ...] = ()
    # Several processes (torchrun, or `lorafit train --nproc N`): ddp replicates the model on every rank,
    # fsdp shards it (FSDP2, per decoder layer); auto: ddp when weights, gradients and optimizer state fit
    # one device, else fsdp. One process ignores it.
    distributed: str = "auto"

    def __post_init__(self):
        check = _Checker("train", self)
        check.choice("recipe", RECIPES)
        check.integer("epochs", minimum=1)
        check.integer("max_steps", minimum=1, nullable=True)
        check.number("lr", low=0, low_open=True, nullable=True)
        if self.batch_size != "auto":
            check.integer("batch_size", minimum=1, alternative=" or auto")
        check.integer("grad_accum", minimum=1, nullable=True)
        check.integer("effective_batch_size", minimum=1, nullable=True)
        if self.grad_accum is not None and self.effective_batch_size is not None:
            check.fail("grad_accum", "null when effective_batch_size is set (one follows from the other)",
                       self.grad_accum)
        if self.grad_accum is not None and self.batch_size == "auto":
            check.fail("grad_accum", "null with batch_size: auto, which chooses it to keep effective_batch_size "
                       "(null: 16)",
                       self.grad_accum)
        check.number("warmup_ratio", low=0, high=1)
        check.choice("scheduler", SCHEDULERS)
        check.number("weight_decay", low=0)
        check.number("max_grad_norm", low=0, low_open=True, nullable=True)
        # torch accepts 64-bit seeds but numpy's legacy seeding and many data libraries take 32 bits only.
        check.integer("seed", minimum=0, below=2**32)
        check.text("output_dir")
        check.integer("save_every", minimum=0)
        check.integer("log_every", minimum=1)
        check.choice("activation_checkpointing", ACTIVATION_CHECKPOINTING)
        check.number("memory_budget_gib", low=0, low_open=True, nullable=True)
        check.names("disable_kernels", KERNELS)
        check.choice("distributed", DISTRIBUTED)

    def batch_split(self, world_size: int = 1, micro_batch: int | None = None) -> tuple[int, int]:
        """(micro-batch, accumulation) a run on world_size ranks trains with. micro_batch: what batch_size:
        auto chose (training/batch_size.py); a fixed batch_size needs none."""
        micro = self.batch_size if micro_batch is None else micro_batch
        if micro == "auto":
            raise ValueError("batch_size: auto needs the micro-batch it chose")
        effective = self.effective_batch_size
        if effective is None and self.batch_size == "auto":
            effective = DEFAULT_EFFECTIVE_BATCH
        if effective is None:
            return micro, self.grad_accum or DEFAULT_GRAD_ACCUM
        if effective % (micro * world_size):
            raise ConfigError(f"train.effective_batch_size {effective} is not a whole number of micro-batches "
                              f"of {micro} on {world_size} rank{'s' if world_size > 1 else ''}: make it a "
                              f"multiple of {micro * world_size}")
        return micro, effective // (micro * world_size)


@dataclass(frozen=True)
class DPOSection:
    beta: float = 0.1  # how far the policy may move from the reference (the DPO paper's and TRL's default)
    loss: str = "sigmoid"  # sigmoid (DPO) or ipo
    precompute_reference: bool = False  # reference log-probs once before training: no reference passes after

    def __post_init__(self):
        check = _Checker("dpo", self)
        check.number("beta", low=0, low_open=True)
        check.choice("loss", DPO_LOSSES)
        check.boolean("precompute_reference")


@dataclass(frozen=True)
class GRPOSection:
    # Reward functions: built-in names (lorafit/rewards.py) or "module:function" / "file.py:function".
    rewards: tuple[str, ...] = ("numeric_answer",)
    reward_weights: tuple[float, ...] | None = None  # null: 1 each; the total reward is the weighted sum
    # Completions per prompt (G). The advantage compares completions of one prompt, so G sets how finely
    # rewards are told apart: 8 is the paper's choice (and TRL's default). train.batch_size x grad_accum
    # completions make one optimizer step, so that product must be a multiple of G.
    num_generations: int = 8
    max_prompt_length: int = 512  # longer prompts are skipped (and counted)
    max_completion_length: int = 256  # new tokens per completion (TRL's default)
    temperature: float = 1.0  # sampling of completions: 1 = the model's own distribution
    top_p: float = 1.0
    top_k: int = 0
    system_prompt: str | None = None  # a system message put before every prompt (e.g. the answer layout)
    epsilon: float = 0.2  # PPO's clip range of the probability ratio (the paper's 0.2)
    beta: float = 0.0  # KL to the reference model; 0 (DAPO, Dr. GRPO, TRL's default) skips the reference
    scale_rewards: bool = True  # divide advantages by the group's std; false: Dr. GRPO's unscaled advantages
    normalisation: str = "token"  # token | sequence | dr_grpo: see lorafit/losses/grpo.py
    num_iterations: int = 1  # optimizer steps per generated batch (the paper's mu); > 1 reuses completions
    on_reward_error: str = "stop"  # a reward function that raises or returns NaN: stop, or skip the prompt

    def __post_init__(self):
        check = _Checker("grpo", self)
        check.names("rewards", allow_empty=False)
        if self.reward_weights is not None:
            weights = self.reward_weights
            if (not isinstance(weights, (list, tuple)) or len(weights) != len(self.rewards)
                    or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
                               for w in weights)):
                check.fail("reward_weights", f"null or a list of {len(self.rewards)} numbers (one per reward)",
                           weights)
            object.__setattr__(self, "reward_weights", tuple(float(w) for w in weights))
        check.integer("num_generations", minimum=2)
        check.integer("max_prompt_length", minimum=1)
        check.integer("max_completion_length", minimum=1)
        check.number("temperature", low=0, low_open=True)
        check.number("top_p", low=0, high=1, low_open=True, high_open=False)
        check.integer("top_k", minimum=0)
        check.text("system_prompt", nullable=True)
        check.number("epsilon", low=0, low_open=True)
        check.number("beta", low=0)
        check.boolean("scale_rewards")
        check.choice("normalisation", GRPO_NORMALISATIONS)
        check.integer("num_iterations", minimum=1)
        check.choice("on_reward_error", ON_REWARD_ERROR)


SECTIONS = {"model": ModelSection, "finetune": FinetuneSection, "data": DataSection, "train": TrainSection,
            "dpo": DPOSection, "grpo": GRPOSection}


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)

    def __post_init__(self):
        # The Python API may pass plain dicts for sections, exactly as a YAML file would hold them.
        for name, cls in SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, _section_from_dict(name, value))
            elif not isinstance(value, cls):
                raise ConfigError(f"{name} must be a mapping of settings or a {cls.__name__}, got {_show(value)}")
        budget = self.grpo.max_prompt_length + self.grpo.max_completion_length
        if self.train.recipe == "grpo" and budget > self.model.max_seq_length:
            raise ConfigError(f"grpo: max_prompt_length + max_completion_length = {budget} tokens exceed "
                              f"model.max_seq_length = {self.model.max_seq_length}; raise it or lower them")
        if self.train.recipe == "grpo" and self.train.batch_size == "auto":
            raise ConfigError("train.batch_size: auto is for sft and dpo; GRPO's micro-batches are completions "
                              "of generated groups: set an integer")
        if self.train.recipe != "grpo":
            return
        completions = math.prod(self.train.batch_split())
        if completions % self.grpo.num_generations:
            accum = math.lcm(completions, self.grpo.num_generations) // self.train.batch_size
            raise ConfigError(
                f"grpo: an optimizer step takes train.batch_size x grad_accum = {completions} completions, which "
                f"must be whole groups of grpo.num_generations = {self.grpo.num_generations} (e.g. batch_size "
                f"{self.train.batch_size} and grad_accum {accum})")

    # --- building

    @classmethod
    def from_dict(cls, data) -> "Config":
        """Builds and validates a config from nested plain data (what yaml.safe_load returns)."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config is a mapping of sections ({', '.join(SECTIONS)}), got {_show(data)}")
        for key in data:
            if key not in SECTIONS:
                raise ConfigError(f"unknown key {key}{did_you_mean(suggest_section(SECTIONS, str(key)))}")
        return cls(**{name: _section_from_dict(name, data[name]) for name in data})

    @classmethod
    def from_yaml(cls, path, overrides: Iterable[str] = ()) -> "Config":
        """Reads a YAML file (through yaml.safe_load: a config is data, never code) and applies dotted
        overrides such as "train.max_steps=10". Errors name the file or the override they come from."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config ({e.strerror or e})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{where} ({getattr(e, 'problem', None) or e})") from None
        try:
            config = cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        return config.with_overrides(overrides)

    def with_overrides(self, overrides: Iterable[str]) -> "Config":
        """A copy with dotted overrides applied in order ("finetune.targets=[q_proj,v_proj]"); each value is
        read as YAML, so numbers, lists, true/false and null work as in a file."""
        if isinstance(overrides, str):
            overrides = [overrides]  # a lone string would otherwise be iterated character by character
        data = self.to_dict()
        parsed = [(override, parse_override(override)) for override in overrides]
        for _, (section, key, value) in parsed:
            data.setdefault(section, {})[key] = value
        try:
            return Config.from_dict(data)  # together: train.batch_size=auto train.grad_accum=null is valid
        except ConfigError:
            pass
        data = self.to_dict()  # one at a time, to name the first override that makes the config invalid
        for override, (section, key, value) in parsed:
            data.setdefault(section, {})[key] = value
            try:
                Config.from_dict(data)
            except ConfigError as e:
                raise ConfigError(f"override {override!r}: {e}") from None
        raise AssertionError("overrides that fail together fail one at a time")  # unreachable

    # --- writing

    def to_dict(self) -> dict:
        """Nested plain data (lists, not tuples), ready for yaml or json."""
        def plain(value):
            return list(value) if isinstance(value, tuple) else value

        return {name: {k: plain(v) for k, v in asdict(getattr(self, name)).items()} for name in SECTIONS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # --- values derived from more than one section

    def resolved_lr(self) -> float:
        """The learning rate training uses: the user's, or the guide's default for the recipe and method."""
        return default_lr(self.train.recipe, self.finetune.method) if self.train.lr is None else self.train.lr

    def with_batch(self, world_size: int = 1, micro_batch: int | None = None) -> "Config":
        """A copy whose train.batch_size and grad_accum are the integers a run on world_size ranks uses
        (TrainSection.batch_split), for the recipes and the run's config.yaml."""
        micro, accumulation = self.train.batch_split(world_size, micro_batch)
        return replace(self, train=replace(self.train, batch_size=micro, grad_accum=accumulation,
                                           effective_batch_size=None))

    @property
    def quantize(self) -> str | None:
        """What load_model's `quantize` takes for this method: QLoRA is LoRA on an NF4 base."""
        return "nf4" if self.finetune.method == "qlora" else None


def parse_override(override: str) -> tuple[str, str, object]:
    """"section.key=value" -> (section, key, value read as YAML)."""
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value, e.g. train.max_steps=10")
    dotted, _, text = override.partition("=")
    dotted = dotted.strip()
    parts = dotted.split(".")
    if len(parts) != 2 or not all(parts):
        suggestion = suggest_anywhere(SECTIONS, parts[0]) if len(parts) == 1 else None
        example = f" (did you mean {suggestion}?)" if suggestion else ", e.g. train.lr"
        raise ConfigError(f"override {override!r}: the key must be section.key{example}")
    if not text.strip():
        raise ConfigError(f"override {override!r} has no value (write {dotted}=null to unset it)")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None
    return parts[0], parts[1], value


def _section_from_dict(name: str, data):
    cls = SECTIONS[name]
    if data is None:  # `train:` with every line below it commented out
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{name} must be a mapping of settings, got {_show(data)}")
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown key {name}.{key}{did_you_mean(suggest_key(SECTIONS, name, str(key)))}")
    return cls(**data)
