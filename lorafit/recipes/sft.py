"""Supervised fine-tuning, top to bottom: load, prepare, read data, advise, then the optimizer-step loop.

The loss of one optimizer step is the sum of the token losses over its whole accumulation window divided
by the window's label-token count (DESIGN §4), so batch 4 x 1, 2 x 2 and 1 x 4 give the same step.
"""

import contextlib
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter_io import save_adapter
from ..advisor import advise, format_advice, training_plan
from ..data import load_sft_dataset
from ..errors import LorafitError
from ..finetune import prepare_for_finetuning
from ..lora import count_parameters
from ..models.loading import load_model
from ..models.llama import PackedDocuments
from ..training.checkpoint import load_checkpoint, require_latest, save_checkpoint
from ..training.metrics import MetricsLog
from ..training.optim import build_optimizer
from ..training.report import write_report
from ..training.schedule import build_scheduler

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


def run_sft(config, resume: bool = False, cache_dir=None, log=print, progress: bool = True,
            stop_at_step: int | None = None) -> TrainResult:
    """stop_at_step: end after that optimizer step with a checkpoint, exactly as an interrupt would."""
    t = config.train
    output_dir = Path(t.output_dir)
    torch.manual_seed(t.seed)
    random.seed(t.seed)

    model, tokenizer = load_model(config.model.source, dtype=config.model.dtype, quantize=config.quantize,
                                  cache_dir=cache_dir)
    prepare_for_finetuning(model, config.finetune.method, verbose=False, **config.finetune.adapter_options())
    model.activation_checkpointing = t.activation_checkpointing
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Trainable weights stay in float32 (updates of 2e-4 x a weight vanish in bf16's 8-bit mantissa); the
    # frozen base keeps the loaded dtype, and autocast runs the matmuls in it (for full fine-tuning too).
    base_dtype = model.model.embed_tokens.weight.dtype
    device = model.model.embed_tokens.weight.device
    for p in trainable:
        p.data = p.data.float()
    autocast = torch.autocast(device.type, dtype=base_dtype) if base_dtype != torch.float32 else contextlib.nullcontext()

    data = load_sft_dataset(config.data.resolved_path(), tokenizer, config.model.max_seq_length,
                            format=config.data.format, train_on_responses_only=config.data.train_on_responses_only,
                            packing=config.data.packing, eval_fraction=config.data.eval_fraction, seed=t.seed)
    log(data.stats.summary())
    plan = training_plan(config, len(data.train), 1, *count_parameters(model))
    advice_table = format_advice(advise(config, plan))
    log(advice_table)

    optimizer = build_optimizer(model, config.resolved_lr(), t.weight_decay)
    scheduler = build_scheduler(optimizer, plan.warmup_steps, plan.total_steps, t.scheduler)
    state = {"step": 0, "epoch": 0, "window": 0, "tokens": 0, "elapsed_s": 0.0}
    if resume:
        checkpoint = require_latest(output_dir)
        state = load_checkpoint(checkpoint, model, optimizer, scheduler)
        log(f"resumed from {checkpoint} (step {state['step']})")
    elif (output_dir / "checkpoints").exists():
        raise LorafitError(f"{output_dir} holds checkpoints of an earlier run: add --resume to continue it, "
                           f"or choose another train.output_dir")
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(config.to_yaml())
    metrics = MetricsLog(output_dir, resume_from_step=state["step"] if resume else None)

    losses, nonfinite_in_a_row = [], 0
    bar = _progress_bar(plan.total_steps, state["step"], progress)
    model.train()
    with _stop_requests() as stop:
        for epoch, window, micro_batches in _windows(data, t, state["epoch"], state["window"]):
            if state["step"] >= plan.total_steps:
                break
            started = time.perf_counter()
            window_tokens = sum(b["num_label_tokens"] for b in micro_batches)
            loss = torch.zeros((), device=device)
            for b in micro_batches:
                # The micro-batch's mean loss, weighted by its share of the window's label tokens: the
                # accumulated gradient is then that of the window's token mean.
                part = batch_loss(model, b, autocast, device) * (b["num_label_tokens"] / window_tokens)
                part.backward()
                loss += part.detach()
            max_norm = t.max_grad_norm if t.max_grad_norm is not None else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
            lr = scheduler.get_last_lr()[0]
            if torch.isfinite(loss) and torch.isfinite(grad_norm):
                optimizer.step()
                nonfinite_in_a_row = 0
            else:
                nonfinite_in_a_row += 1
                log(f"step {state['step'] + 1}: non-finite loss or gradient ({loss.item()}, {grad_norm.item()}); update skipped")
                if nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                    raise LorafitError(f"{nonfinite_in_a_row} non-finite steps in a row: the run diverged; "
                                       f"lower train.lr (now {lr:g}) or check the data")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            seconds = time.perf_counter() - started
            tokens = sum(b["num_tokens"] for b in micro_batches)
            state.update(step=state["step"] + 1, epoch=epoch, window=window + 1,
                         tokens=state["tokens"] + tokens, elapsed_s=state["elapsed_s"] + seconds)
            losses.append(loss.item())
            row = {"step": state["step"], "epoch": round(epoch + (window + 1) / plan.steps_per_epoch, 4),
                   "loss": losses[-1], "lr": lr, "grad_norm": grad_norm.item(), "tokens": state["tokens"],
                   "tokens_per_s": round(tokens / seconds, 1), "elapsed_s": round(state["elapsed_s"], 2)}
            metrics.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)

            last = state["step"] == plan.total_steps
            stopping = stop.requested or state["step"] == stop_at_step
            if last or stopping or (t.save_every and state["step"] % t.save_every == 0):
                if data.eval and not stopping:
                    metrics.write({"step": state["step"], "eval_loss": evaluate(model, data, t.batch_size, autocast, device)})
                save_checkpoint(output_dir, model, optimizer, scheduler, state)
            if stopping and not last:
                bar.close()
                message = (f"stopped after step {state['step']}; checkpoint saved. Resume with: "
                           f"lorafit train CONFIG --resume  (train.output_dir={output_dir})")
                if stop.requested:
                    raise TrainingInterrupted(message)
                log(message)
                break
    bar.close()

    eval_loss = evaluate(model, data, t.batch_size, autocast, device) if data.eval else None
    final = _save_final(model, tokenizer, output_dir)
    summary = {"steps": state["step"], "tokens": state["tokens"], "training time (s)": round(state["elapsed_s"], 1),
               "tokens per second": round(state["tokens"] / max(state["elapsed_s"], 1e-9), 1), "final output": final}
    write_report(output_dir, advice_table, summary)
    model.eval()
    return TrainResult(output_dir, final, state["step"], losses, eval_loss, model, tokenizer)


def _windows(data, t, start_epoch: int, start_window: int):
    """(epoch, window index, micro-batches) for every optimizer step from the given position on.

    A window is grad_accum consecutive micro-batches of one epoch (the last of an epoch may be shorter);
    epochs continue past train.epochs when max_steps asks for more steps.
    """
    epoch, window = start_epoch, start_window
    per_epoch = data.num_batches(t.batch_size)
    while True:
        if window * t.grad_accum >= per_epoch:
            epoch, window = epoch + 1, 0
        batches = data.batches(t.batch_size, epoch=epoch, seed=t.seed, start=window * t.grad_accum)
        while True:
            micro = [b for _, b in zip(range(t.grad_accum), batches)]
            if not micro:
                break
            yield epoch, window, micro
            window += 1


def batch_loss(model, batch: dict, autocast, device) -> torch.Tensor:
    """Mean loss over the label tokens of one collated micro-batch."""
    documents = None
    if "cu_seqlens" in batch:  # packed: the model runs varlen attention where it can, else the block mask
        documents = PackedDocuments(batch["cu_seqlens"].to(device), batch["max_seqlen"])
    with autocast:
        return model(batch["input_ids"].to(device), labels=batch["labels"].to(device),
                     attention_mask=batch["attention_mask"].to(device),
                     position_ids=batch["position_ids"].to(device), documents=documents).loss


@torch.no_grad()
def evaluate(model, data, batch_size: int, autocast, device) -> float:
    """Token-weighted mean loss over the eval split."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in data.batches(batch_size, split="eval"):
        total += batch_loss(model, b, autocast, device).item() * b["num_label_tokens"]
        count += b["num_label_tokens"]
    model.train(was_training)
    return total / max(count, 1)


def _save_final(model, tokenizer, output_dir: Path) -> Path:
    if getattr(model, "lora_config", None) is not None:
        path = save_adapter(model, output_dir / "adapter")
    else:
        from ..models.saving import save_model

        path = save_model(model, tokenizer, output_dir / "model")
    if getattr(tokenizer, "chat_template", None):
        tokenizer.save_pretrained(path)  # the template the model was trained with travels with it
    return path


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", disable=not enabled, dynamic_ncols=True)


class _StopFlag:
    requested = False


@contextlib.contextmanager
def _stop_requests():
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
