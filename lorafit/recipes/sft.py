"""Supervised fine-tuning, top to bottom: load, prepare, read data, advise, then the optimizer-step loop.

The loss of one optimizer step is the sum of the token losses over its whole accumulation window divided
by the window's label-token count (DESIGN §4), so batch 4 x 1, 2 x 2 and 1 x 4 give the same step.
"""

import random
import time
from pathlib import Path

import torch

from ..advisor import advise, format_advice, training_plan
from ..data import load_sft_dataset
from ..lora import count_parameters
from ..models.llama import PackedDocuments
from ..training.checkpoint import save_checkpoint
from ..training.loop import (OptimizerStep, TrainResult, finish_run, load_trainee, open_run, progress_bar,
                             stop_early, stop_requests, windows)
from ..training.optim import build_optimizer
from ..training.schedule import build_scheduler


def run_sft(config, resume: bool = False, cache_dir=None, log=print, progress: bool = True,
            stop_at_step: int | None = None) -> TrainResult:
    """stop_at_step: end after that optimizer step with a checkpoint, exactly as an interrupt would."""
    t = config.train
    output_dir = Path(t.output_dir)
    torch.manual_seed(t.seed)
    random.seed(t.seed)

    trainee = load_trainee(config, cache_dir)
    model, tokenizer, device, autocast = trainee.model, trainee.tokenizer, trainee.device, trainee.autocast

    data = load_sft_dataset(config.data.resolved_path(), tokenizer, config.model.max_seq_length,
                            format=config.data.format, train_on_responses_only=config.data.train_on_responses_only,
                            packing=config.data.packing, eval_fraction=config.data.eval_fraction, seed=t.seed)
    log(data.stats.summary())
    if trainee.memory_plan:
        log(trainee.memory_plan)
    plan = training_plan(config, len(data.train), 1, *count_parameters(model))
    advice_table = format_advice(advise(config, plan))
    log(advice_table)

    optimizer = build_optimizer(model, config.resolved_lr(), t.weight_decay)
    scheduler = build_scheduler(optimizer, plan.warmup_steps, plan.total_steps, t.scheduler)
    state = {"step": 0, "epoch": 0, "window": 0, "tokens": 0, "elapsed_s": 0.0}
    state, metrics = open_run(config, model, optimizer, scheduler, state, resume, log)
    optimizer_step = OptimizerStep(trainee.trainable, optimizer, scheduler, t.max_grad_norm, log)

    losses = []
    bar = progress_bar(plan.total_steps, state["step"], progress)
    model.train()
    with stop_requests() as stop:
        for epoch, window, micro_batches in windows(data, t, state["epoch"], state["window"]):
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
            grad_norm, lr = optimizer_step(loss, state["step"] + 1)

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
                    eval_loss = evaluate(model, data, t.batch_size, autocast, device)
                    metrics.write({"step": state["step"], "eval_loss": eval_loss})
                save_checkpoint(output_dir, model, optimizer, scheduler, state)
            if stopping and not last:
                bar.close()
                stop_early(stop, output_dir, state["step"], log)
                break
    bar.close()

    eval_loss = evaluate(model, data, t.batch_size, autocast, device) if data.eval else None
    summary = {"steps": state["step"], "tokens": state["tokens"], "training time (s)": round(state["elapsed_s"], 1),
               "tokens per second": round(state["tokens"] / max(state["elapsed_s"], 1e-9), 1)}
    final = finish_run(model, tokenizer, output_dir, advice_table, summary)
    return TrainResult(output_dir, final, state["step"], losses, eval_loss, model, tokenizer)


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
