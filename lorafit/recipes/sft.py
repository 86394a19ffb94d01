"""Supervised fine-tuning, top to bottom: load, prepare, read data, advise, then the optimizer-step loop.

The loss of one optimizer step is the sum of the token losses over its whole accumulation window divided
by the window's label-token count (DESIGN §4), so batch 4 x 1, 2 x 2 and 1 x 4 give the same step. With
several ranks (training/distributed.py) the window spans the ranks and its count is summed over them, so 2
ranks x 2 x 2 give the same step as one process with 2 x 4.
"""

import random
import time
from pathlib import Path

import torch

from ..advisor import advise, format_advice, training_plan
from ..data import load_sft_dataset
from ..data.packing import split_micro_batches
from ..errors import LorafitError
from ..lora import count_parameters
from ..models.llama import PackedDocuments, is_right_padded
from ..training.checkpoint import save_checkpoint
from ..training.cuda_graphs import GraphedMicroBatches
from ..training.distributed import SINGLE, Distributed, gradient_sync
from ..training.loop import (OptimizerStep, TrainResult, finish_run, load_trainee, open_run, progress_bar,
                             stop_early, stop_requests, windows)
from ..training.optim import build_optimizer
from ..training.schedule import build_scheduler


def run_sft(config, resume: bool = False, cache_dir=None, log=print, progress: bool = True,
            stop_at_step: int | None = None, dist: Distributed = SINGLE) -> TrainResult:
    """stop_at_step: end after that optimizer step with a checkpoint, exactly as an interrupt would.
    dist: this process's rank in a data-parallel job (rank 0 alone logs and writes files)."""
    t = config.train
    output_dir = Path(t.output_dir)
    if not dist.is_main:
        log, progress = (lambda *_: None), False
    torch.manual_seed(t.seed)  # the same on every rank: the adapters start identical, as in one process
    random.seed(t.seed)

    trainee = load_trainee(config, cache_dir, dist=dist)
    config, t = trainee.config, trainee.config.train  # batch_size and grad_accum as the run trains
    model, tokenizer, device, autocast = trainee.model, trainee.tokenizer, trainee.device, trainee.autocast
    wrapped = trainee.wrapped
    if dist.enabled:  # dropout differs between ranks, as between the micro-batches of one process
        torch.manual_seed(t.seed + dist.rank)

    data = load_sft_dataset(config.data.resolved_path(), tokenizer, config.model.max_seq_length,
                            format=config.data.format, train_on_responses_only=config.data.train_on_responses_only,
                            packing=config.data.packing, eval_fraction=config.data.eval_fraction, seed=t.seed)
    log(data.stats.summary())
    for line in trainee.notes:
        log(line)
    plan = training_plan(config, len(data.train), dist.world_size, *count_parameters(model))
    advice_table = format_advice(advise(config, plan))
    log(advice_table)
    if dist.enabled:
        log(f"data parallel: {dist.world_size} ranks, {trainee.strategy}")

    optimizer = build_optimizer(model, config.resolved_lr(), t.weight_decay)
    scheduler = build_scheduler(optimizer, plan.warmup_steps, plan.total_steps, t.scheduler)
    state = {"step": 0, "epoch": 0, "window": 0, "tokens": 0, "elapsed_s": 0.0}
    state, metrics = open_run(config, model, optimizer, scheduler, state, resume, log, dist)
    optimizer_step = OptimizerStep(trainee.trainable, optimizer, scheduler, t.max_grad_norm, log)
    graphs = None
    if trainee.replay:
        graphs = GraphedMicroBatches(model, trainee.trainable, model.model.embed_tokens.weight.dtype)

    losses = []
    halvings = 0  # times the micro-batches were halved after running out of memory
    bar = progress_bar(plan.total_steps, state["step"], progress)
    model.train()
    with stop_requests() as stop:
        for epoch, window, micro_batches in windows(data, t, state["epoch"], state["window"], dist):
            if state["step"] >= plan.total_steps:
                break
            started = time.perf_counter()
            counted = [0 if b.get("padding") else b["num_label_tokens"] for b in micro_batches]
            window_tokens, = dist.sum(sum(counted))  # over the ranks' windows too
            rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if device.type == "cuda" else None)
            while True:
                batches = split_micro_batches(micro_batches, halvings)
                try:
                    captures = graphs.captures if graphs is not None else 0
                    loss = accumulate(wrapped, batches, window_tokens, autocast, device, dist, graphs)
                    if graphs is not None and graphs.captures > captures:
                        rows, length = graphs.recorded_shape
                        log(f"micro-batches of {rows} x {length} tokens replay from a CUDA graph")
                    break
                except torch.OutOfMemoryError:
                    if graphs is not None:  # eager from here: no pool held beside it, no recording cut short
                        graphs.close()
                        graphs = None
                    # Free the window's partial gradients, halve the micro-batch (doubling the accumulation:
                    # the same examples, so the same step up to float order) and redo it from the same RNG.
                    model.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    rows = max(b["input_ids"].shape[0] for b in batches)
                    if dist.enabled or rows == 1:
                        raise LorafitError(
                            f"out of memory at step {state['step'] + 1} with a micro-batch of {rows} "
                            f"{'row' if rows == 1 else 'rows'}{' on one of several ranks' if dist.enabled else ''}:"
                            " lower model.max_seq_length, use train.activation_checkpointing: offload, or train a "
                            "4-bit base (finetune.method: qlora)") from None
                    halvings += 1
                    torch.set_rng_state(rng[0])
                    if rng[1] is not None:
                        torch.cuda.set_rng_state_all(rng[1])
                    log(f"out of memory at step {state['step'] + 1}: micro-batch {rows} -> {-(-rows // 2)}, "
                        f"accumulation x{2 ** halvings}; redoing the step")
                    metrics.write({"step": state["step"] + 1, "out_of_memory": True, "micro_batch": -(-rows // 2)})
            loss = dist.sum_tensor(loss)
            grad_norm, lr = optimizer_step(loss, state["step"] + 1)

            seconds = time.perf_counter() - started
            tokens = int(dist.sum(sum(b["num_tokens"] for b in micro_batches if not b.get("padding")))[0])
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
            stopping = dist.any(stop.requested) or state["step"] == stop_at_step  # all ranks stop together
            if last or stopping or (t.save_every and state["step"] % t.save_every == 0):
                if data.eval and not stopping:
                    eval_loss = evaluate(model, data, t.batch_size, autocast, device)
                    metrics.write({"step": state["step"], "eval_loss": eval_loss})
                save_checkpoint(output_dir, model, optimizer, scheduler, state, dist=dist)
            if stopping and not last:
                bar.close()
                stop_early(stop, output_dir, state["step"], log)
                break
    bar.close()
    if graphs is not None:
        graphs.close()

    eval_loss = evaluate(model, data, t.batch_size, autocast, device) if data.eval else None
    summary = {"steps": state["step"], "tokens": state["tokens"], "training time (s)": round(state["elapsed_s"], 1),
               "tokens per second": round(state["tokens"] / max(state["elapsed_s"], 1e-9), 1)}
    final = finish_run(model, tokenizer, output_dir, advice_table, summary, dist)
    return TrainResult(output_dir, final, state["step"], losses, eval_loss, model, tokenizer)


def accumulate(wrapped, micro_batches, window_tokens: int, autocast, device, dist,
               graphs: GraphedMicroBatches | None = None) -> torch.Tensor:
    """Forward and backward of one accumulation window; -> its loss (this rank's share). graphs: replays
    micro-batches of a repeated shape (one process only)."""
    loss = torch.zeros((), device=device)
    for i, b in enumerate(micro_batches):
        n = 0 if b.get("padding") else b["num_label_tokens"]
        # The micro-batch's mean loss, weighted by its share of the window's label tokens: the accumulated
        # gradient is then that of the window's token mean. Ranks average gradients, so each backpropagates
        # world_size times its share (1x with one process).
        if graphs is not None:
            loss += graphs(batch_inputs(b, device), n / window_tokens)
            continue
        with gradient_sync(wrapped, i == len(micro_batches) - 1):
            part = batch_loss(wrapped, b, autocast, device) * (n / window_tokens)
            (part * dist.world_size if dist.enabled else part).backward()
        loss += part.detach()
    return loss


def batch_loss(model, batch: dict, autocast, device) -> torch.Tensor:
    """Mean loss over the label tokens of one collated micro-batch."""
    with autocast:
        return model(**batch_inputs(batch, device)).loss


@torch.no_grad()
def evaluate(model, data, batch_size: int, autocast, device) -> float:
    """Token-weighted mean loss over the eval split. Several ranks: each evaluates the whole split, in the
    same order (FSDP2's forwards are collective), and gets the same number."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in data.batches(batch_size, split="eval"):
        total += batch_loss(model, b, autocast, device).item() * b["num_label_tokens"]
        count += b["num_label_tokens"]
    model.train(was_training)
    return total / max(count, 1)


def batch_inputs(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """A collated micro-batch (data/packing.py, on the CPU) as model inputs on `device`. A right-padded batch
    goes without its padding mask: causality alone keeps real tokens from seeing the padding after them,
    and deciding that here, on the CPU, spares the model a check that waits for the GPU."""
    inputs = {"input_ids": batch["input_ids"], "labels": batch["labels"], "position_ids": batch["position_ids"]}
    mask = batch["attention_mask"]
    if mask.dim() != 2 or not is_right_padded(mask):
        inputs["attention_mask"] = batch["attention_mask"]
    inputs = {name: t.to(device, non_blocking=True) for name, t in inputs.items()}
    if "cu_seqlens" in batch:  # packed: the model runs varlen attention where it can, else the block mask
        inputs["documents"] = PackedDocuments(batch["cu_seqlens"].to(device), batch["max_seqlen"])
    return inputs
