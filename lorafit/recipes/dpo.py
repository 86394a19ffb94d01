"""The DPO recipe: preference pairs, a reference that costs no second model, checkpoints and exact resume.

The reference is the policy's own starting point (training/reference.py): with LoRA or QLoRA, the same
model with its adapters switched off (no second copy in memory); with full fine-tuning, a frozen copy. With
dpo.precompute_reference the reference log-probabilities are computed once, before training, and the
reference model (or the switching) is not needed again.

Loss normalisation: each micro-batch's mean pair loss is weighted by its share of the window's pairs, so an
optimizer step follows the mean over all the pairs of its accumulation window (as SFT does with tokens);
with several ranks the window's pairs are counted over all of them.
"""

import random
import time
from pathlib import Path

import torch

from ..advisor import advise, format_advice, training_plan
from ..data.preference import collate_pairs, load_preference_dataset
from ..lora import count_parameters
from ..losses.dpo import dpo_loss, sequence_logps
from ..training.checkpoint import save_checkpoint
from ..training.distributed import SINGLE, Distributed, gradient_sync
from ..training.loop import (OptimizerStep, TrainResult, finish_run, load_trainee, open_run, progress_bar,
                             stop_early, stop_requests, windows)
from ..training.optim import build_optimizer
from ..training.schedule import build_scheduler

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy")


def run_dpo(config, resume: bool = False, cache_dir=None, log=print, progress: bool = True,
            stop_at_step: int | None = None, dist: Distributed = SINGLE) -> TrainResult:
    t, d = config.train, config.dpo
    output_dir = Path(t.output_dir)
    if not dist.is_main:
        log, progress = (lambda *_: None), False
    torch.manual_seed(t.seed)  # the same on every rank: the adapters start identical, as in one process
    random.seed(t.seed)

    trainee = load_trainee(config, cache_dir, with_reference=True, dist=dist)
    config, t = trainee.config, trainee.config.train  # batch_size and grad_accum as the run trains
    model, tokenizer, device, autocast = trainee.model, trainee.tokenizer, trainee.device, trainee.autocast
    reference, wrapped = trainee.reference, trainee.wrapped
    if dist.enabled:  # dropout differs between ranks, as between the micro-batches of one process
        torch.manual_seed(t.seed + dist.rank)
    for line in trainee.notes:
        log(line)

    data = load_preference_dataset(config.data.resolved_path(), tokenizer, config.model.max_seq_length,
                                   eval_fraction=config.data.eval_fraction, seed=t.seed)
    log(data.summary())
    plan = training_plan(config, len(data.train), dist.world_size, *count_parameters(model))
    advice_table = format_advice(advise(config, plan))
    log(advice_table)
    log(reference.describe())

    def reference_logps(batch):
        with reference.active() as reference_model, autocast:
            return sequence_logps(reference_model, batch, device)

    precomputed = {}
    # Once, in a fixed order; looked up by the pair's position in the data. Every rank computes them all, in
    # the same order (FSDP2's forwards are collective).
    if d.precompute_reference:
        for split, pairs in (("train", data.train), ("eval", data.eval)):
            for pair in pairs:
                batch = collate_pairs([pair], data.pad_id)
                precomputed[(split, id(pair))] = reference_logps(batch)
        reference.frozen_copy = None  # full fine-tuning's copy is not needed again: free its memory

    def batch_reference(batch, split):
        if not precomputed:
            return reference_logps(batch)
        parts = [precomputed[(split, id(p))] for p in batch["pairs"]]
        chosen = [x.total[0] for x in parts] + [x.total[1] for x in parts]
        counts = [x.count[0] for x in parts] + [x.count[1] for x in parts]
        return type(parts[0])(torch.stack(chosen), torch.stack(counts))

    optimizer = build_optimizer(model, config.resolved_lr(), t.weight_decay)
    scheduler = build_scheduler(optimizer, plan.warmup_steps, plan.total_steps, t.scheduler)
    state = {"step": 0, "epoch": 0, "window": 0, "elapsed_s": 0.0}
    state, metrics = open_run(config, model, optimizer, scheduler, state, resume, log, dist)
    optimizer_step = OptimizerStep(trainee.trainable, optimizer, scheduler, t.max_grad_norm, log)

    def evaluate() -> dict:
        """Every rank evaluates the whole held-out split, in the same order, and gets the same numbers."""
        was_training = model.training
        model.eval()
        sums, n = {k: 0.0 for k in ("loss", *METRICS)}, 0
        with torch.no_grad():
            for batch in data.batches(t.batch_size, split="eval"):
                with autocast:
                    losses, m = dpo_loss(sequence_logps(model, batch, device), batch_reference(batch, "eval"),
                                         d.beta, d.loss)
                sums["loss"] += losses.sum().item()
                for k in METRICS:
                    sums[k] += m[k].sum().item()
                n += batch["num_pairs"]
        model.train(was_training)
        return {f"eval_{k}": v / max(n, 1) for k, v in sums.items()}

    losses_log, evaluations = [], {}  # evaluations: step -> eval metrics
    bar = progress_bar(plan.total_steps, state["step"], progress)
    model.train()
    with stop_requests() as stop:
        for epoch, window, micro_batches in windows(data, t, state["epoch"], state["window"], dist):
            if state["step"] >= plan.total_steps:
                break
            started = time.perf_counter()
            weights = [0.0 if b.get("padding") else 1.0 for b in micro_batches]  # a stand-in counts nothing
            window_pairs, = dist.sum(sum(b["num_pairs"] * w for b, w in zip(micro_batches, weights)))
            loss = torch.zeros((), device=device)
            sums = {k: 0.0 for k in METRICS}
            for i, (b, w) in enumerate(zip(micro_batches, weights)):
                with gradient_sync(wrapped, i == len(micro_batches) - 1):
                    with autocast:
                        pair_losses, m = dpo_loss(sequence_logps(wrapped, b, device), batch_reference(b, "train"),
                                                  d.beta, d.loss)
                    part = pair_losses.sum() * w / window_pairs
                    # Ranks average gradients: world_size x the share makes their sum (1x with one process).
                    (part * dist.world_size if dist.enabled else part).backward()
                loss += part.detach()
                for k in METRICS:
                    sums[k] += m[k].sum().item() * w
            loss = dist.sum_tensor(loss)
            sums = dict(zip(METRICS, dist.sum(*sums.values())))
            grad_norm, lr = optimizer_step(loss, state["step"] + 1)

            seconds = time.perf_counter() - started
            state.update(step=state["step"] + 1, epoch=epoch, window=window + 1, elapsed_s=state["elapsed_s"] + seconds)
            losses_log.append(loss.item())
            row = {"step": state["step"], "loss": losses_log[-1], "lr": lr, "grad_norm": grad_norm.item(),
                   **{k: v / window_pairs for k, v in sums.items()}, "pairs_per_s": round(window_pairs / seconds, 2)}
            metrics.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracy']:.2f}")
            bar.update(1)

            last = state["step"] == plan.total_steps
            stopping = dist.any(stop.requested) or state["step"] == stop_at_step  # all ranks stop together
            if last or stopping or (t.save_every and state["step"] % t.save_every == 0):
                if data.eval and not stopping:
                    evaluations[state["step"]] = evaluate()
                    metrics.write({"step": state["step"], **evaluations[state["step"]]})
                save_checkpoint(output_dir, model, optimizer, scheduler, state, dist=dist)
            if stopping and not last:
                bar.close()
                stop_early(stop, output_dir, state["step"], log)
                break
    bar.close()

    final_eval = (evaluations.get(state["step"]) or evaluate()) if data.eval else None
    summary = {"steps": state["step"], "training time (s)": round(state["elapsed_s"], 1)}
    if final_eval:
        summary.update({k: round(v, 4) for k, v in final_eval.items()})
    final = finish_run(model, tokenizer, output_dir, advice_table, summary, dist)
    return TrainResult(output_dir, final, state["step"], losses_log,
                       final_eval["eval_loss"] if final_eval else None, model, tokenizer)
