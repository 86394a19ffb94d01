"""The DPO recipe: preference pairs, a reference that costs no second model, checkpoints and exact resume.

The reference is the policy's own starting point (training/reference.py): with LoRA or QLoRA, the same
model with its adapters switched off (no second copy in memory); with full fine-tuning, a frozen copy. With
dpo.precompute_reference the reference log-probabilities are computed once, before training, and the
reference model (or the switching) is not needed again.

Loss normalisation: each micro-batch's mean pair loss is weighted by its share of the window's pairs, so an
optimizer step follows the mean over all the pairs of its accumulation window (as SFT does with tokens).
"""

import contextlib
import math
import random
import time
from pathlib import Path

import torch

from ..advisor import advise, format_advice, training_plan
from ..data.preference import collate_pairs, load_preference_dataset
from ..errors import LorafitError
from ..finetune import prepare_for_finetuning
from ..lora import count_parameters
from ..losses.dpo import dpo_loss, sequence_logps
from ..models.loading import load_model
from ..training.checkpoint import load_checkpoint, require_latest, save_checkpoint
from ..training.metrics import MetricsLog
from ..training.optim import build_optimizer
from ..training.reference import ReferenceModel
from ..training.report import write_report
from ..training.schedule import build_scheduler
from .sft import (MAX_NONFINITE_IN_A_ROW, TrainingInterrupted, TrainResult, _progress_bar, _save_final,
                  _stop_requests, _windows)

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy")


def run_dpo(config, resume: bool = False, cache_dir=None, log=print, progress: bool = True,
            stop_at_step: int | None = None) -> TrainResult:
    t, d = config.train, config.dpo
    output_dir = Path(t.output_dir)
    torch.manual_seed(t.seed)
    random.seed(t.seed)

    model, tokenizer = load_model(config.model.source, dtype=config.model.dtype, quantize=config.quantize,
                                  cache_dir=cache_dir)
    prepare_for_finetuning(model, config.finetune.method, verbose=False, **config.finetune.adapter_options())
    reference = ReferenceModel(model)
    model.activation_checkpointing = t.activation_checkpointing
    trainable = [p for p in model.parameters() if p.requires_grad]
    base_dtype = model.model.embed_tokens.weight.dtype
    device = model.model.embed_tokens.weight.device
    for p in trainable:
        p.data = p.data.float()  # float32 masters, as in SFT
    autocast = (torch.autocast(device.type, dtype=base_dtype) if base_dtype != torch.float32
                else contextlib.nullcontext())

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

    losses_log, nonfinite_in_a_row, evaluations = [], 0, {}  # evaluations: step -> eval metrics
    bar = _progress_bar(plan.total_steps, state["step"], progress)
    model.train()
    with _stop_requests() as stop:
        for epoch, window, micro_batches in _windows(data, t, state["epoch"], state["window"]):
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
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm or math.inf)
            lr = scheduler.get_last_lr()[0]
            if torch.isfinite(loss) and torch.isfinite(grad_norm):
                optimizer.step()
                nonfinite_in_a_row = 0
            else:
                nonfinite_in_a_row += 1
                log(f"step {state['step'] + 1}: non-finite loss or gradient; update skipped")
                if nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                    raise LorafitError(f"{nonfinite_in_a_row} non-finite steps in a row: lower train.lr (now {lr:g})")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

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
                message = (f"stopped after step {state['step']}; checkpoint saved. Resume with: "
                           f"lorafit train CONFIG --resume  (train.output_dir={output_dir})")
                if stop.requested:
                    raise TrainingInterrupted(message)
                log(message)
                break
    bar.close()

    final_eval = (evaluations.get(state["step"]) or evaluate()) if data.eval else None
    final = _save_final(model, tokenizer, output_dir)
    summary = {"steps": state["step"], "training time (s)": round(state["elapsed_s"], 1), "final output": final}
    if final_eval:
        summary.update({k: round(v, 4) for k, v in final_eval.items()})
    write_report(output_dir, advice_table, summary)
    model.eval()
    return TrainResult(output_dir, final, state["step"], losses_log,
                       final_eval["eval_loss"] if final_eval else None, model, tokenizer)
