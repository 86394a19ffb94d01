"""The DPO recipe: preference pairs, a reference that costs no second model, checkpoints and exact resume.

The reference is the policy's own starting point (training/reference.py): with LoRA or QLoRA, the same
model with its adapters switched off (no second copy in memory); with full fine-tuning, a frozen copy. With
dpo.precompute_reference the reference log-probabilities are computed once, before training, and the
reference model (or the switching) is not needed again.

Loss normalisation: each micro-batch's mean pair loss is weighted by its share of the window's pairs, so an
optimizer step follows the mean over all the pairs of its accumulation window (as SFT does with tokens).
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
from ..training.loop import (OptimizerStep, TrainResult, finish_run, load_trainee, open_run, progress_bar,
                             stop_early, stop_requests, windows)
from ..training.optim import build_optimizer
from ..training.schedule import build_scheduler

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy")


def run_dpo(config, resume: bool = False, cache_dir=None, log=print, progress: bool = True,
            stop_at_step: int | None = None) -> TrainResult:
    t, d = config.train, config.dpo
    output_dir = Path(t.output_dir)
    torch.manual_seed(t.seed)
    random.seed(t.seed)

    trainee = load_trainee(config, cache_dir, with_reference=True)
    model, tokenizer, device, autocast = trainee.model, trainee.tokenizer, trainee.device, trainee.autocast
    reference = trainee.reference
    if trainee.memory_plan:
        log(trainee.memory_plan)

    data = load_preference_dataset(config.data.resolved_path(), tokenizer, config.model.max_seq_length,
                                   eval_fraction=config.data.eval_fraction, seed=t.seed)
    log(data.summary())
    plan = training_plan(config, len(data.train), 1, *count_parameters(model))
    advice_table = format_advice(advise(config, plan))
    log(advice_table)
    log(reference.describe())

    def reference_logps(batch):
        with reference.active() as reference_model, autocast:
            return sequence_logps(reference_model, batch, device)

    precomputed = {}
    if d.precompute_reference:  # once, in a fixed order; looked up by the pair's position in the data
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
    state, metrics = open_run(config, model, optimizer, scheduler, state, resume, log)
    optimizer_step = OptimizerStep(trainee.trainable, optimizer, scheduler, t.max_grad_norm, log)

    def evaluate() -> dict:
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
        for epoch, window, micro_batches in windows(data, t, state["epoch"], state["window"]):
            if state["step"] >= plan.total_steps:
                break
            started = time.perf_counter()
            window_pairs = sum(b["num_pairs"] for b in micro_batches)
            loss = torch.zeros((), device=device)
            sums = {k: 0.0 for k in METRICS}
            for b in micro_batches:
                with autocast:
                    pair_losses, m = dpo_loss(sequence_logps(model, b, device), batch_reference(b, "train"),
                                              d.beta, d.loss)
                part = pair_losses.sum() / window_pairs
                part.backward()
                loss += part.detach()
                for k in METRICS:
                    sums[k] += m[k].sum().item()
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
            stopping = stop.requested or state["step"] == stop_at_step
            if last or stopping or (t.save_every and state["step"] % t.save_every == 0):
                if data.eval and not stopping:
                    evaluations[state["step"]] = evaluate()
                    metrics.write({"step": state["step"], **evaluations[state["step"]]})
                save_checkpoint(output_dir, model, optimizer, scheduler, state)
            if stopping and not last:
                bar.close()
                stop_early(stop, output_dir, state["step"], log)
                break
    bar.close()

    final_eval = (evaluations.get(state["step"]) or evaluate()) if data.eval else None
    summary = {"steps": state["step"], "training time (s)": round(state["elapsed_s"], 1)}
    if final_eval:
        summary.update({k: round(v, 4) for k, v in final_eval.items()})
    final = finish_run(model, tokenizer, output_dir, advice_table, summary)
    return TrainResult(output_dir, final, state["step"], losses_log,
                       final_eval["eval_loss"] if final_eval else None, model, tokenizer)
