"""What the SFT, DPO and GRPO loops share, as plain functions they call in order: the model made ready to
train, the run directory opened (or resumed), one guarded optimizer step, stopping on a signal, and the end
of the run. Each recipe keeps its own loop, readable top to bottom; only these steps are written once.
"""

import contextlib
import math
import signal
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..adapter_io import adapter_tensors, save_adapter
from ..errors import LorafitError
from ..finetune import prepare_for_finetuning
from ..memory import GiB, describe_modes, device_budget_bytes, estimate_training_memory, mlp_tile_chunk
from ..models.loading import load_model
from .batch_size import choose_micro_batch, fits_one_step
from .checkpoint import load_checkpoint, require_latest
from .cuda_graphs import can_graph
from .distributed import (SINGLE, Distributed, full_state, full_tensor, gathered, is_sharded, resolve_strategy,
                          wrap_model)
from .metrics import MetricsLog
from .reference import ReferenceModel
from .report import write_report

# A few non-finite steps can be a bad batch; this many in a row means the run has diverged.
MAX_NONFINITE_IN_A_ROW = 5


class TrainingInterrupted(LorafitError):
    """SIGINT / SIGTERM: a checkpoint was saved; the message says how to resume."""


@dataclass
class TrainResult:
    output_dir: Path
    final: Path  # OUTPUT_DIR/adapter (PEFT format) or OUTPUT_DIR/model
    steps: int
    losses: list[float]
    eval_loss: float | None
    model: torch.nn.Module
    tokenizer: object


@dataclass
class Trainee:
    """The model as a recipe trains it."""

    model: torch.nn.Module
    tokenizer: object
    trainable: list[torch.nn.Parameter]
    device: torch.device
    autocast: contextlib.AbstractContextManager  # enter it for every forward pass
    reference: ReferenceModel | None = None  # DPO's and GRPO's starting point, when asked for
    # What training forwards run through: the DDP wrapper, else the model itself (FSDP2 shards it in place).
    # Saving, evaluation and generation use `model`.
    wrapped: torch.nn.Module | None = None
    strategy: str = "none"  # none, ddp or fsdp (training/distributed.py)
    config: object = None  # the run's config, train.batch_size and grad_accum made the integers it trains with
    # To log: with batch_size auto, the micro-batch chosen and why; on a GPU, the checkpointing plan and peak.
    notes: tuple[str, ...] = ()
    # SFT micro-batches of one shape replayed from a CUDA graph (training/cuda_graphs.py), as the plan chose.
    replay: bool = False


def load_trainee(config, cache_dir=None, with_reference: bool = False, dist: Distributed = SINGLE) -> Trainee:
    """Loads config.model, prepares config.finetune's method, keeps the trainable weights in float32, settles
    the micro-batch and accumulation (Trainee.config), plans checkpointing and, with several ranks, wraps the
    model for data parallelism (config.train.distributed)."""
    model, tokenizer = load_model(config.model.source, dtype=config.model.dtype, quantize=config.quantize,
                                  device=dist.device, cache_dir=cache_dir)
    prepare_for_finetuning(model, config.finetune.method, verbose=False, **config.finetune.adapter_options())
    model.disable_kernels(config.train.disable_kernels)
    # Before the float32 cast below: a frozen copy keeps the loaded dtype (half the memory in bf16).
    reference = ReferenceModel(model) if with_reference else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Trainable weights stay in float32 (updates of 2e-4 x a weight vanish in bf16's 8-bit mantissa); the
    # frozen base keeps the loaded dtype, and autocast runs the matmuls in it (for full fine-tuning too).
    base_dtype = model.model.embed_tokens.weight.dtype
    device = model.model.embed_tokens.weight.device
    for p in trainable:
        p.data = p.data.float()
    autocast = (torch.autocast(device.type, dtype=base_dtype) if base_dtype != torch.float32
                else contextlib.nullcontext())
    strategy = resolve_strategy(config.train.distributed, model, dist)
    micro, batch_choice = None, ""
    if config.train.batch_size == "auto":
        # Under FSDP2 the whole model is not meant to fit one device: the estimate alone decides there.
        # A CPU does not report running out of memory (the system kills): the estimate alone decides there.
        try_step = None
        if device.type == "cuda" and strategy != "fsdp":
            try_step = partial(fits_one_step, model, seq_len=config.model.max_seq_length, autocast=autocast,
                               device=device)
        budget = device_budget_bytes(device, config.train.memory_budget_gib)
        micro, batch_choice = choose_micro_batch(config, model, budget, dist.world_size, try_step)
        micro = -dist.max(-micro)  # every rank trains the same micro-batch: the smallest any could take
    config = config.with_batch(dist.world_size, micro)
    # Planned on the whole model: under FSDP2 each rank holds a share of the weights, so the plan is on
    # the safe side there.
    memory_plan, replay = choose_checkpointing(config, model, device, dist.enabled)
    wrapped = wrap_model(model, strategy, dist, base_dtype)
    if strategy == "fsdp":  # fully_shard replaced every parameter by a sharded one
        trainable = [p for p in model.parameters() if p.requires_grad]
    return Trainee(model, tokenizer, trainable, device, autocast, reference, wrapped, strategy, config,
                   tuple(line for line in (batch_choice, memory_plan) if line), replay)


def choose_checkpointing(config, model, device: torch.device, distributed: bool = False) -> tuple[str, bool]:
    """Sets what the model's layers keep for backward (train.activation_checkpointing; auto: from the memory
    budget) and decides whether SFT micro-batches replay from a CUDA graph (where the estimate's clocks say
    the host is the slower one: estimate.py). -> (what to log on a GPU, with the estimated peak; replay)."""
    t = config.train
    n_layers = model.config.num_layers
    # A micro-batch's tokens at most; DPO's holds each pair's two answers.
    tokens = t.batch_size * config.model.max_seq_length * (2 if t.recipe == "dpo" else 1)
    if device.type != "cuda":
        model.activation_checkpointing = [t.activation_checkpointing if t.activation_checkpointing != "auto"
                                          else "none"] * n_layers  # auto: nothing to offload to, nor to save
        return "", False
    from ..estimate import DEVICES, card_named, plan_training

    card = DEVICES.get(card_named(torch.cuda.get_device_name(device)))
    modes, graphed = plan_training(
        model, tokens, config.model.max_seq_length, t.activation_checkpointing,
        device_budget_bytes(device, t.memory_budget_gib), config.finetune.method,
        lambda modes: t.recipe == "sft" and can_graph(model, device, distributed, modes), card)  # SFT replays
    model.activation_checkpointing = modes
    estimate = estimate_training_memory(model, tokens, modes, graphed=graphed)
    budget = "" if t.memory_budget_gib is None else f" of a {t.memory_budget_gib:g} GiB budget"
    chunk = mlp_tile_chunk(model, tokens)
    tiled = f", the MLPs {chunk:,} tokens at a time" if chunk else ""
    graph = ", micro-batches of one shape replayed from a CUDA graph" if graphed else ""
    return (f"memory plan: {describe_modes(modes)}{tiled}{graph}; "
            f"estimated peak {estimate.total / GiB:.1f} GiB{budget} ({estimate.summary()})"), graphed


def open_run(config, model, optimizer, scheduler, state: dict, resume: bool, log,
             dist: Distributed = SINGLE) -> tuple[dict, MetricsLog]:
    """Resumes from the newest checkpoint (or refuses to overwrite an earlier run's), writes config.yaml and
    opens metrics.jsonl (rank 0 only: the others get a log that writes nothing). Returns the trainer state
    to start from: `state` itself for a new run."""
    output_dir = Path(config.train.output_dir)
    if resume:
        checkpoint = require_latest(output_dir)
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, dist)
        log(f"resumed from {checkpoint} (step {state['step']})")
    elif (output_dir / "checkpoints").exists():
        raise LorafitError(f"{output_dir} holds checkpoints of an earlier run: add --resume to continue it, "
                           f"or choose another train.output_dir")
    metrics = NoMetrics()
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(config.to_yaml())
        metrics = MetricsLog(output_dir, resume_from_step=state["step"] if resume else None)
    dist.barrier()  # no rank trains (and so none saves a checkpoint) before every rank has looked for one
    return state, metrics


class NoMetrics:
    """The metrics log of ranks other than 0: they compute the same numbers and write none."""

    def write(self, row: dict) -> None:
        pass


class OptimizerStep:
    """Clips the accumulated gradients, steps the optimizer unless the loss or the gradient norm is not
    finite (then the update is skipped; MAX_NONFINITE_IN_A_ROW in a row stop the run), steps the schedule
    and clears the gradients."""

    def __init__(self, trainable, optimizer, scheduler, max_grad_norm: float | None, log):
        self.trainable, self.optimizer, self.scheduler, self.log = trainable, optimizer, scheduler, log
        self.max_norm = max_grad_norm if max_grad_norm is not None else math.inf
        self.nonfinite_in_a_row = 0

    def __call__(self, loss: torch.Tensor, step: int) -> tuple[torch.Tensor, float]:
        """loss: the step's accumulated loss (detached); step: its number. -> (gradient norm, lr used)."""
        # Over all ranks: DDP's gradients are already reduced; FSDP2's norm is a DTensor, made whole here.
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.trainable, self.max_norm))
        lr = self.scheduler.get_last_lr()[0]
        if torch.isfinite(loss) and torch.isfinite(grad_norm):
            self.optimizer.step()
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            self.log(f"step {step}: non-finite loss or gradient ({loss.item()}, {grad_norm.item()}); update skipped")
            if self.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                raise LorafitError(f"{self.nonfinite_in_a_row} non-finite steps in a row: the run diverged; "
                                   f"lower train.lr (now {lr:g}) or check the data")
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, lr


def stop_early(stop, output_dir, step: int, log) -> None:
    """After the checkpoint of a stop before the last step: raises TrainingInterrupted for a signal, else
    (stop_at_step) says how to resume."""
    message = (f"stopped after step {step}; checkpoint saved. Resume with: "
               f"lorafit train CONFIG --resume  (train.output_dir={output_dir})")
    if stop.requested:
        raise TrainingInterrupted(message)
    log(message)


def finish_run(model, tokenizer, output_dir, advice_table: str, summary: dict, dist: Distributed = SINGLE) -> Path:
    """Saves the final adapter (PEFT format) or model, writes report.md; returns the saved directory.
    Several ranks: every rank takes part in gathering sharded weights; rank 0 alone writes."""
    output_dir = Path(output_dir)
    lora = getattr(model, "lora_config", None) is not None
    final = output_dir / ("adapter" if lora else "model")
    if lora:
        tensors = gathered(adapter_tensors(model)) if is_sharded(model) else None
        if dist.is_main:
            save_adapter(model, final, tensors=tensors)
    else:
        from ..models.saving import save_model

        state = full_state(model, trainable_only=False) if is_sharded(model) else None
        if dist.is_main:
            save_model(model, tokenizer, final, state=state)
    if dist.is_main:
        if getattr(tokenizer, "chat_template", None):
            tokenizer.save_pretrained(final)  # the template the model was trained with travels with it
        write_report(output_dir, advice_table, {**summary, "final output": final})
    dist.barrier()  # the run's files are complete before any rank returns
    model.eval()
    return final


def windows(data, t, start_epoch: int, start_window: int, dist: Distributed = SINGLE):
    """(epoch, window index, micro-batches) for every optimizer step from the given position on.

    A window is grad_accum consecutive micro-batches of one epoch (the last of an epoch may be shorter);
    epochs continue past train.epochs when max_steps asks for more steps. With several ranks see
    `rank_batches`: window w of every rank together holds the examples of window w of one process whose
    micro-batch x accumulation is ranks times larger.
    """
    epoch, window = start_epoch, start_window
    per_epoch = -(-data.num_batches(t.batch_size) // dist.world_size)
    while True:
        if window * t.grad_accum >= per_epoch:
            epoch, window = epoch + 1, 0
        if dist.enabled:
            batches = rank_batches(data, t.batch_size, epoch, t.seed, window * t.grad_accum, dist)
        else:
            batches = data.batches(t.batch_size, epoch=epoch, seed=t.seed, start=window * t.grad_accum)
        while True:
            micro = [b for _, b in zip(range(t.grad_accum), batches)]
            if not micro:
                break
            yield epoch, window, micro
            window += 1


def rank_batches(data, batch_size: int, epoch: int, seed: int, start: int, dist: Distributed):
    """This rank's micro-batches of an epoch from its `start`-th on: micro-batch j of the epoch's order goes
    to rank j % world_size (`data.batches`' shards), so the first grad_accum of every rank are the epoch's
    first grad_accum x world_size micro-batches, and so on. Every rank must run as many micro-batches (each
    forward and backward is collective), so when the epoch's count is not a multiple of the ranks, the
    ranks left without a last one get a stand-in: a real micro-batch marked "padding", which the recipes
    weigh by 0 (it adds nothing to the loss, the gradients or the counts)."""
    total = data.num_batches(batch_size)
    whole_rounds = total // dist.world_size
    yield from data.batches(batch_size, epoch=epoch, seed=seed, start=min(start, whole_rounds),
                            shard=dist.rank, num_shards=dist.world_size)
    if total % dist.world_size and start <= whole_rounds:
        last = whole_rounds * dist.world_size + dist.rank
        if last < total:
            yield next(data.batches(batch_size, epoch=epoch, seed=seed, start=last))
        else:
            yield {**next(data.batches(batch_size, epoch=epoch, seed=seed, start=total - 1)), "padding": True}


class _StopFlag:
    requested = False


@contextlib.contextmanager
def stop_requests():
    """SIGINT / SIGTERM finish the current optimizer step, save and stop; a second SIGINT stops at once."""
    flag = _StopFlag()

    def handler(signum, frame):
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.requested = True

    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals cannot be caught here, nothing to restore
        previous = {}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", disable=not enabled, dynamic_ncols=True)
