"""The hyperparameter guide (DESIGN §1) as code: each setting beside its recommendation, a status and why.

    plan = training_plan(config, num_examples=91)
    print(format_advice(advise(config, plan)))

Statuses: "ok" (inside the guide), "note" (works, but worth knowing: costs memory or time, or may learn
less), "warn" (likely to hurt the run: unstable, overfitting, or learning nothing). Advice never changes a
value; `lorafit advise` prints it and the trainer logs it at the start of every run.

`training_plan` computes the step counts the trainer uses too, so the numbers shown here are the run's.
"""

import math
import textwrap
from dataclasses import asdict, dataclass
from functools import partial

from .config import Config, default_lr
from .errors import LorafitError
from .lora import TARGET_GROUPS

STATUSES = ("ok", "note", "warn")
METHOD_NAMES = {"lora": "LoRA", "qlora": "QLoRA", "full": "full"}

# DESIGN §1's ranges; each check below says in its messages why leaving them matters.
LR_RANGE = (5e-6, 2e-4)  # the guide's span over every recipe and method
MAX_EPOCHS = 3  # beyond 3 passes: diminishing returns and overfitting
BEST_RANKS = (16, 32)
OTHER_GUIDE_RANKS = (8, 64, 128)
MAX_DROPOUT = 0.1
WEIGHT_DECAY_RANGE = (0.01, 0.1)
WARMUP_RANGE = (0.05, 0.10)
EFFECTIVE_BATCH_RANGE = (4, 16)
BEST_EFFECTIVE_BATCH = 16


@dataclass(frozen=True)
class Advice:
    setting: str  # the guide's name for it, e.g. "learning rate"
    value: object  # the value training uses (resolved: alpha null shows as r); None = unknown
    recommendation: str
    status: str  # ok, note or warn
    why: str  # one plain sentence
    key: str | None = None  # the config key, e.g. "train.lr"; None for derived numbers

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainingPlan:
    """Derived sizes of a run. Step counts are None when the number of examples is unknown (and max_steps
    is not set)."""

    num_examples: int | None  # sequences per epoch after the eval split (after packing, with packing on)
    world_size: int  # data-parallel ranks
    effective_batch: int  # examples per optimizer step, over all ranks
    micro_batches_per_epoch: int | None  # on each rank
    steps_per_epoch: int | None  # optimizer steps
    total_steps: int | None  # optimizer steps in the run
    warmup_steps: int | None
    epochs: float | None  # passes over the data the run makes (max_steps can end one part-way)
    trainable_params: int | None = None
    total_params: int | None = None  # every parameter of the prepared model, adapters included

    def to_dict(self) -> dict:
        return asdict(self)


def training_plan(config: Config, num_examples: int | None, world_size: int = 1,
                  trainable_params: int | None = None, total_params: int | None = None) -> TrainingPlan:
    """The step arithmetic of a run: the one place it is written, used by `advise` and by the trainer."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if num_examples is not None and num_examples < 1:
        raise LorafitError("the training data has no examples")
    t = config.train
    # batch_size: auto chooses its micro-batch when the run starts; the step count depends on the effective
    # batch alone (up to a short last window), so it is counted here with micro-batches of one.
    batch_size, grad_accum = t.batch_split(world_size, 1 if t.batch_size == "auto" else None)
    effective_batch = batch_size * grad_accum * world_size
    micro = steps_per_epoch = None
    if num_examples is not None:
        # Each rank takes every world_size-th batch; the last batch of an epoch may be short rather than
        # dropped (with 91 examples, dropping would lose up to batch_size*world_size - 1 of them every epoch).
        micro = math.ceil(num_examples / (batch_size * world_size))
        # The last optimizer step of an epoch may accumulate fewer micro-batches; the loss is normalised by
        # the tokens actually seen (DESIGN §4), so a short window is still a correct step.
        steps_per_epoch = math.ceil(micro / grad_accum)
    if t.max_steps is not None:
        total = t.max_steps
        epochs = total / steps_per_epoch if steps_per_epoch else None
    elif steps_per_epoch is not None:
        total, epochs = t.epochs * steps_per_epoch, float(t.epochs)
    else:
        total = epochs = None
    # ceil, not round or int: any warmup_ratio above 0 gets at least one warmup step even in a short run
    # (0.05 x 10 steps = 0.5 would otherwise become 0 and silently drop warmup).
    warmup = math.ceil(t.warmup_ratio * total) if total is not None else None
    return TrainingPlan(num_examples, world_size, effective_batch, micro, steps_per_epoch, total, warmup, epochs,
                        trainable_params, total_params)


# ------------------------------------------------------------------------------------------------ checks


def advise(config: Config, plan: TrainingPlan | None = None) -> list[Advice]:
    """One row per setting of the guide, then the derived numbers of the plan."""
    if plan is None:
        plan = training_plan(config, None)
    rows = [check(config, plan) for check in GUIDE_CHECKS]
    if plan.trainable_params is not None:
        rows.append(_trainable_parameters(plan))
    rows += [_total_steps(config, plan), _warmup_steps(config, plan)]
    return rows


def _learning_rate(config: Config, plan: TrainingPlan) -> Advice:
    t, method = config.train, config.finetune.method
    lr, default = config.resolved_lr(), default_lr(t.recipe, method)
    low, high = LR_RANGE
    rec = f"{num(default)} for {METHOD_NAMES[method]} {t.recipe.upper()}; range {num(low)} to {num(high)}"
    row = partial(Advice, "learning rate", lr, rec, key="train.lr")
    if lr > high:
        return row("warn", f"Above {num(high)} updates are big enough to make training unstable (loss spikes "
                           "or divergence); too low under-trains, so stay inside the range.")
    if lr < low:
        return row("note", f"Below {num(low)} the model may barely change (too low under-trains); watch that "
                           "the training loss falls.")
    if lr > default:
        reason = ("full fine-tuning changes every weight, so it needs a lower rate than LoRA" if t.recipe == "sft"
                  else f"{t.recipe.upper()} moves an already tuned model and drifts easily")
        return row("note", f"Higher than the {num(default)} default because {reason}; too high is unstable.")
    return row("ok", "Size of each update: too high is unstable, too low under-trains; this is in range.")


def _epochs(config: Config, plan: TrainingPlan) -> Advice:
    t = config.train
    row = partial(Advice, "epochs", t.epochs, f"1 to {MAX_EPOCHS}", key="train.epochs")
    passes, prefix = t.epochs, ""
    if t.max_steps is not None:
        if plan.epochs is None:
            return row("note", f"max_steps ({t.max_steps}) sets the run's length; how many passes over the data "
                               "that makes depends on the data size.")
        passes, prefix = plan.epochs, f"max_steps ({t.max_steps}) wins: {plan.epochs:.2g} passes. "
    if passes > MAX_EPOCHS:
        return row("warn", f"{prefix}More than {MAX_EPOCHS} passes gives diminishing returns and risks "
                           "overfitting (the model memorises the training set).")
    return row("ok", f"{prefix}Passes over the data: 1 to {MAX_EPOCHS} is usually enough.")


def _unused_by_full(setting: str, value, key: str) -> Advice:
    return Advice(setting, value, "not used by full fine-tuning", "ok",
                  "Full fine-tuning trains every weight; LoRA settings are ignored.", key)


def _rank(config: Config, plan: TrainingPlan) -> Advice:
    r = config.finetune.r
    if config.finetune.method == "full":
        return _unused_by_full("LoRA rank r", r, "finetune.r")
    rec = f"16 or 32 (also {', '.join(map(str, OTHER_GUIDE_RANKS))})"
    row = partial(Advice, "LoRA rank r", r, rec, key="finetune.r")
    if r in BEST_RANKS:
        return row("ok", "Adapter capacity: 16 or 32 suits most tasks; higher rank costs memory.")
    if r < BEST_RANKS[0]:
        return row("note" if r in OTHER_GUIDE_RANKS else "warn",
                   "A small rank is cheap but may lack the capacity to learn the task.")
    return row("note" if r in OTHER_GUIDE_RANKS else "warn",
               "Adapter memory grows linearly with r, and ranks above 32 rarely learn more.")


def _alpha(config: Config, plan: TrainingPlan) -> Advice:
    f = config.finetune
    alpha = f.resolved_alpha
    if f.method == "full":
        return _unused_by_full("LoRA alpha", alpha, "finetune.alpha")
    rec = f"r ({f.r}) or 2r ({2 * f.r})" + ("; rsLoRA scales by alpha/sqrt(r)" if f.rslora else "")
    formula = "alpha/sqrt(r)" if f.rslora else "alpha/r"
    row = partial(Advice, "LoRA alpha", alpha, rec, key="finetune.alpha")
    if alpha in (f.r, 2 * f.r):
        if f.rslora:
            return row("ok", f"rsLoRA scales the update by {formula} = {num(f.scaling)} instead of alpha/r, "
                             "so higher ranks keep learning.")
        return row("ok", f"Strength of the adapter update: scale {formula} = {num(f.scaling)}.")
    if alpha < f.r:
        compared = "a weaker update than the standard alpha = r gives"
    elif alpha > 2 * f.r:
        compared = "a stronger update than the common alpha = 2r gives"
    else:
        compared = "between the standard alpha = r and the common 2r"
    return row("note", f"Scale {formula} = {num(f.scaling)}: {compared}; alpha acts like a second learning "
                       "rate, so change one of the two at a time.")


def _dropout(config: Config, plan: TrainingPlan) -> Advice:
    d = config.finetune.dropout
    if config.finetune.method == "full":
        return _unused_by_full("LoRA dropout", d, "finetune.dropout")
    rec = f"0 (at most {num(MAX_DROPOUT)})"
    row = partial(Advice, "LoRA dropout", d, rec, key="finetune.dropout")
    if d == 0:
        return row("ok", "Regularisation that rarely helps LoRA; 0 keeps the fast fused kernels.")
    if d <= MAX_DROPOUT:
        return row("note", "Dropout disables the fast fused LoRA kernels and rarely helps.")
    return row("warn", f"Above {num(MAX_DROPOUT)} dropout slows learning, and it disables the fast kernels.")


def _weight_decay(config: Config, plan: TrainingPlan) -> Advice:
    wd = config.train.weight_decay
    low, high = WEIGHT_DECAY_RANGE
    row = partial(Advice, "weight decay", wd, f"{num(low)} to {num(high)}", key="train.weight_decay")
    if wd == 0:
        return row("note", f"No penalty on large weights: fine for short runs; the guide uses {num(low)}.")
    if wd < low:
        return row("note", f"Below {num(low)} the penalty on large weights barely acts.")
    if wd > high:
        return row("warn", "A large decay pulls every weight towards zero and fights what the run learns.")
    return row("ok", "Penalises large weights a little, which curbs overfitting.")


def _warmup(config: Config, plan: TrainingPlan) -> Advice:
    ratio = config.train.warmup_ratio
    low, high = WARMUP_RANGE
    rec = f"{low:.0%} to {high:.0%} of the optimizer steps"
    row = partial(Advice, "warmup", ratio, rec, key="train.warmup_ratio")
    steps = f" ({plan.warmup_steps} of {plan.total_steps} steps)" if plan.total_steps is not None else ""
    if ratio == 0:
        return row("note", "No warmup: the first updates run at the full rate and can spike the loss.")
    if ratio < low:
        return row("note", f"A shorter ramp than the guide's{steps}; the first updates may be rough.")
    if ratio > high:
        return row("note", f"A long ramp{steps} spends much of the run below the chosen rate.")
    return row("ok", f"Ramps the learning rate up from 0{steps} so the first updates are gentle.")


def _scheduler(config: Config, plan: TrainingPlan) -> Advice:
    kind = config.train.scheduler
    shape = "in a straight line" if kind == "linear" else "along a half cosine (slower at the start and end)"
    return Advice("scheduler", kind, "linear or cosine", "ok",
                  f"After warmup the learning rate decays to 0 {shape}.", "train.scheduler")


def _seed(config: Config, plan: TrainingPlan) -> Advice:
    return Advice("seed", config.train.seed, "any fixed integer (3407)", "ok",
                  "A fixed seed makes the run reproducible: same data order, same initial adapters.", "train.seed")


def _targets(config: Config, plan: TrainingPlan) -> Advice:
    f = config.finetune
    shown = f.targets if isinstance(f.targets, str) else list(f.targets)
    if f.method == "full":
        return _unused_by_full("target modules", shown, "finetune.targets")
    row = partial(Advice, "target modules", shown, "all-linear", key="finetune.targets")
    names = set(TARGET_GROUPS.get(f.targets, ())) if isinstance(f.targets, str) else set(f.targets)
    if names >= set(TARGET_GROUPS["all-linear"]):
        return row("ok", "Adapters on every linear layer (q, k, v, o, gate, up, down) learn the most per byte.")
    return row("note", "Adapters on only some layers are smaller but usually learn less than all-linear.")


def _micro_batch(config: Config, plan: TrainingPlan) -> Advice:
    why = "Examples per forward/backward on each device: the main driver of GPU memory."
    if config.train.batch_size == "auto":
        why += " auto: the largest that fits the memory budget, chosen when the run starts."
    return Advice("micro-batch", config.train.batch_size, "2; lower it first when memory runs out", "ok",
                  why, "train.batch_size")


def _grad_accum(config: Config, plan: TrainingPlan) -> Advice:
    t = config.train
    value = "auto" if t.batch_size == "auto" else t.batch_split(plan.world_size)[1]
    why = "Micro-batches summed per optimizer step: the main driver of time per update, not memory."
    if t.batch_size == "auto" or t.effective_batch_size is not None:
        why += " Set to keep the effective batch."
    return Advice("gradient accumulation", value, "8; raise it when lowering the micro-batch", "ok", why,
                  "train.grad_accum")


def _effective_batch(config: Config, plan: TrainingPlan) -> Advice:
    t, eb = config.train, plan.effective_batch
    low, high = EFFECTIVE_BATCH_RANGE
    row = partial(Advice, "effective batch", eb, f"{low} to {high} ({BEST_EFFECTIVE_BATCH} recommended)",
                  key="train.effective_batch_size" if t.effective_batch_size is not None else None)
    if t.batch_size == "auto":
        product = f"micro-batch x accumulation x data-parallel ranks, kept at {eb} whatever micro-batch fits"
    else:
        micro, accumulation = t.batch_split(plan.world_size)
        product = (f"micro-batch x accumulation x data-parallel ranks = {micro} x {accumulation} x "
                   f"{plan.world_size} = {eb}")
    if eb < low:
        return row("note", f"Examples per update: {product}; so few give noisy updates (raise grad_accum).")
    if eb > high:
        return row("note", f"Examples per update: {product}; more than {high} gives fewer, smoother updates "
                           "per epoch, which small datasets can't spare.")
    return row("ok", f"Examples per update: {product}.")


def _trainable_parameters(plan: TrainingPlan) -> Advice:
    n, total = plan.trainable_params, plan.total_params
    share = f"{100 * n / total:.2f}% of the model's {total:,}; " if total else ""
    return Advice("trainable parameters", n, "-", "ok",
                  f"{share}only these carry gradients and optimizer state.", None)


def _total_steps(config: Config, plan: TrainingPlan) -> Advice:
    if plan.total_steps is None:
        why = "Unknown until the data size is known; set train.max_steps to fix it."
    elif config.train.max_steps is not None:
        why = "Set by train.max_steps."
    else:
        t = config.train
        micro, accumulation = t.batch_split(plan.world_size, 1 if t.batch_size == "auto" else None)
        why = (f"epochs x ceil(ceil({plan.num_examples} examples / {micro * plan.world_size} per micro-batch) / "
               f"{accumulation} accumulation) = {plan.total_steps}"
               + (", counted with micro-batches of 1 (auto)." if t.batch_size == "auto" else "."))
    return Advice("total optimizer steps", plan.total_steps, "-", "ok", why, None)


def _warmup_steps(config: Config, plan: TrainingPlan) -> Advice:
    if plan.warmup_steps is None:
        why = "Unknown until the total number of steps is known."
    else:
        why = f"ceil(warmup_ratio {num(config.train.warmup_ratio)} x {plan.total_steps} steps)."
    return Advice("warmup steps", plan.warmup_steps, "-", "ok", why, None)


# In the order of DESIGN §1's table.
GUIDE_CHECKS = (_learning_rate, _epochs, _rank, _alpha, _dropout, _weight_decay, _warmup, _scheduler, _seed,
                _targets, _micro_batch, _grad_accum, _effective_batch)


# ---------------------------------------------------------------------------------------------- output


def num(x) -> str:
    """Numbers as people write hyperparameters: 2e-4 rather than 0.0002, 0.05 rather than 5e-02."""
    if isinstance(x, float) and x != 0 and abs(x) < 1e-3:
        mantissa, exponent = f"{x:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    if isinstance(x, float):
        return f"{x:g}"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}" if x >= 10_000 else str(x)
    return str(x)


def _shown(value) -> str:
    if value is None:
        return "unknown"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return num(value)


def format_advice(rows: list[Advice], width: int = 100) -> str:
    """An aligned plain-text table: one line per setting, its reason wrapped to `width` on the lines below
    it (a reason beside the columns would leave it ~30 characters wide), and a count of notes and warnings."""
    header = ("setting", "value", "recommended", "status")
    cells = [(r.setting, _shown(r.value), r.recommendation, r.status) for r in rows]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    for row, advice in zip(cells, rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        lines += textwrap.wrap(advice.why, width, initial_indent="    ", subsequent_indent="    ")
    notes, warns = (sum(r.status == s for r in rows) for s in ("note", "warn"))
    lines.append(f"\n{notes} note{'s' * (notes != 1)}, {warns} warning{'s' * (warns != 1)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- parameters, no weights


def count_parameters_without_weights(config: Config, hf_config: dict) -> tuple[int, int]:
    """(trainable, total) for the model a Hugging Face config.json describes, prepared as the config says,
    without reading any weight: the model is built on the meta device (shapes only, no memory) and
    prepared by the same code training uses, so the count is the run's, not a formula that could drift."""
    import torch

    from .lora import apply_lora, count_parameters
    from .models.llama import CausalLM
    from .models.registry import model_config_from_hf

    with torch.device("meta"):
        model = CausalLM(model_config_from_hf(hf_config))
    if config.finetune.method == "full":
        total = count_parameters(model)[1]
        return total, total
    apply_lora(model, verbose=False, **config.finetune.adapter_options())
    return count_parameters(model)
