"""The GRPO recipe: sample G completions per prompt from the model being trained, reward them, and push
up the completions that beat their group's mean (lorafit/losses/grpo.py has the objective).

One optimizer step takes train.batch_size x grad_accum completions: batch_size x grad_accum / G prompts
are sampled together (training/rollout.py), then trained on in micro-batches of batch_size completions.
With grpo.num_iterations > 1 the same completions make that many optimizer steps; the ratio to the
policy that sampled them (its log-probabilities kept from before the first step) is then clipped, and
checkpoints are taken between rollouts only, so that resuming never needs the completions of a half-used
rollout. Sampling uses a generator seeded by (seed, rollout): a resumed run draws the same completions.

Evaluation: greedy completions of the held-out prompts (data.eval_fraction), their mean rewards; before
the first step, at every save and at the end.

Several ranks: a step's prompts are split into equal contiguous parts, one per rank, so a prompt's G
completions (its group, which its advantages compare) are all sampled, scored and trained on one rank.
Each rank samples its own completions (its generator seeded by rollout and rank); the step's totals
(completions, completion tokens) that normalise the loss are summed over the ranks.
"""

import math
import random
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ..advisor import advise, format_advice, training_plan
from ..data.prompts import load_prompt_dataset
from ..errors import LorafitError
from ..generate import Sampling, stop_token_ids
from ..lora import count_parameters
from ..losses.grpo import StepTotals, grpo_loss
from ..losses.logps import token_logps
from ..rewards import resolve_reward_functions, score_completions
from ..training.checkpoint import save_checkpoint
from ..training.distributed import SINGLE, Distributed, gradient_sync, unsharded
from ..training.loop import (OptimizerStep, TrainResult, finish_run, load_trainee, open_run, progress_bar,
                             stop_early, stop_requests)
from ..training.optim import build_optimizer
from ..training.rollout import build_rollout, decode, generate_completions, training_batches
from ..training.schedule import build_scheduler

EVAL_BATCH_PROMPTS = 32  # held-out prompts decoded together: one batch for the 64 of the chain_sum example


def run_grpo(config, resume: bool = False, cache_dir=None, log=print, progress: bool = True,
             stop_at_step: int | None = None, dist: Distributed = SINGLE) -> TrainResult:
    t, g = config.train, config.grpo
    output_dir = Path(t.output_dir)
    if not dist.is_main:
        log, progress = (lambda *_: None), False
    torch.manual_seed(t.seed)  # the same on every rank: the adapters start identical, as in one process
    random.seed(t.seed)

    # beta 0: the reference is never needed, and never made.
    trainee = load_trainee(config, cache_dir, with_reference=g.beta > 0, dist=dist)
    config, t = trainee.config, trainee.config.train  # batch_size and grad_accum as the run trains
    model, tokenizer, device, autocast = trainee.model, trainee.tokenizer, trainee.device, trainee.autocast
    reference, wrapped = trainee.reference, trainee.wrapped
    if dist.enabled:  # dropout differs between ranks, as between the micro-batches of one process
        torch.manual_seed(t.seed + dist.rank)
    for line in trainee.notes:
        log(line)
    stop_ids = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]

    data = load_prompt_dataset(config.data.resolved_path(), tokenizer, g.max_prompt_length,
                               eval_fraction=config.data.eval_fraction, seed=t.seed, system_prompt=g.system_prompt)
    log(data.summary())
    reward_functions = resolve_reward_functions(list(g.rewards))
    prompts_per_rank = t.batch_size * t.grad_accum // g.num_generations
    prompts_per_step = prompts_per_rank * dist.world_size
    rollouts_per_epoch = data.num_batches(prompts_per_step)
    if rollouts_per_epoch == 0:
        raise LorafitError(f"{len(data.train)} training prompts are fewer than the {prompts_per_step} one step "
                           f"samples (train.batch_size x grad_accum / grpo.num_generations x ranks)")
    # The plan counts completions: every rollout is batch_size x grad_accum of them per rank, used
    # num_iterations times.
    plan = training_plan(config, rollouts_per_epoch * t.batch_size * t.grad_accum * dist.world_size
                         * g.num_iterations, dist.world_size, *count_parameters(model))
    advice_table = format_advice(advise(config, plan))
    log(advice_table)
    log(f"GRPO: {prompts_per_step} prompts x {g.num_generations} completions per step, "
        f"rewards {', '.join(name for name, _ in reward_functions)}"
        + (f"; {reference.describe()}" if reference else "; no reference model (grpo.beta = 0)"))

    optimizer = build_optimizer(model, config.resolved_lr(), t.weight_decay)
    scheduler = build_scheduler(optimizer, plan.warmup_steps, plan.total_steps, t.scheduler)
    state = {"step": 0, "rollout": 0, "elapsed_s": 0.0}
    state, metrics = open_run(config, model, optimizer, scheduler, state, resume, log, dist)
    optimizer_step = OptimizerStep(trainee.trainable, optimizer, scheduler, t.max_grad_norm, log)

    def evaluate() -> dict:
        """Mean rewards of greedy completions of the held-out prompts (every rank answers them all, the same)."""
        sums, n = {}, 0
        for start in range(0, len(data.eval), EVAL_BATCH_PROMPTS):
            items = data.eval[start : start + EVAL_BATCH_PROMPTS]
            with unsharded(model):
                completions, _ = generate_completions(model, items, 1, g.max_completion_length, Sampling(),
                                                      stop_ids, pad_id, None, autocast)
            scores = score_completions(reward_functions, g.reward_weights, items,
                                       decode(tokenizer, completions, stop_ids), on_error="skip")
            columns = {"eval_reward": scores.total, **{f"eval_rewards/{k}": v for k, v in scores.per_function.items()}}
            for key, values in columns.items():
                sums[key] = sums.get(key, 0.0) + sum(v for v in values if math.isfinite(v))
            n += len(items)
        return {key: value / max(n, 1) for key, value in sums.items()}

    if data.eval and not resume:
        before = evaluate()
        metrics.write({"step": 0, **before})
        log(f"before training: held-out reward {before['eval_reward']:.4f} on {len(data.eval)} prompts")

    losses_log, evaluations = [], {}  # evaluations: step -> eval metrics
    bar = progress_bar(plan.total_steps, state["step"], progress)
    model.train()
    with stop_requests() as stop:
        while state["step"] < plan.total_steps and not dist.any(stop.requested):
            epoch, index = divmod(state["rollout"], rollouts_per_epoch)
            items = next(data.batches(prompts_per_step, epoch=epoch, seed=t.seed, start=index))
            items = items[dist.rank * prompts_per_rank : (dist.rank + 1) * prompts_per_rank]  # whole groups
            rollout_started = time.perf_counter()
            seed = (t.seed * 1_000_003 + state["rollout"]) * dist.world_size + dist.rank  # one process: as before
            generator = torch.Generator(device=device).manual_seed(seed)
            with unsharded(model):  # ranks stop sampling at different lengths: no collective in between
                rollout = build_rollout(model, tokenizer, items, g, reward_functions, stop_ids, pad_id, generator,
                                        autocast)
            for problem in dist.gather_objects(rollout.problems):
                for line in problem:
                    log(line)
            state["rollout"] += 1
            completions, completion_tokens = (int(x) for x in dist.sum(len(rollout.completions),
                                                                         rollout.completion_tokens))
            if not completions:
                log(f"rollout {state['rollout']}: every prompt was skipped (reward errors); no update")
                continue
            if not rollout.completions:
                raise LorafitError(f"rank {dist.rank}: every prompt of rollout {state['rollout']} was skipped "
                                   f"(reward errors); with several ranks that stops the run")
            batches = training_batches(rollout, t.batch_size, pad_id)
            # Every rank runs as many micro-batches (each forward is collective under FSDP2): a rank whose
            # groups were partly skipped repeats its first one, weighed by 0.
            batches += [{**batches[0], "padding": True}] * (dist.max(len(batches)) - len(batches))
            totals = StepTotals(completions, completion_tokens, g.max_completion_length)  # over all ranks
            if g.num_iterations > 1 or g.beta > 0:  # the sampling policy's and the reference's log-probs
                for b in batches:
                    with torch.no_grad(), autocast:
                        if g.num_iterations > 1:
                            b["old_logps"], _ = token_logps(model, b, device)
                    if reference is not None:
                        with reference.active() as reference_model, autocast:
                            b["ref_logps"], _ = token_logps(reference_model, b, device)

            saving = False
            for iteration in range(min(g.num_iterations, plan.total_steps - state["step"])):
                started = time.perf_counter()
                loss = torch.zeros((), device=device)
                sums, trained_tokens = {"clipped": 0.0, "kl": 0.0, "tokens": 0.0}, 0
                for i, b in enumerate(batches):
                    w = 0.0 if b.get("padding") else 1.0
                    with gradient_sync(wrapped, i == len(batches) - 1):
                        with autocast:
                            logps, mask = token_logps(wrapped, b, device)
                        old = b["old_logps"] if "old_logps" in b else logps.detach()  # one pass: the ratio is 1
                        part, m = grpo_loss(logps, old, b["advantages"].to(device), mask, totals, g.epsilon,
                                            g.normalisation, b.get("ref_logps"), g.beta)
                        part = part * w if dist.enabled else part
                        # Ranks average gradients: world_size x the share makes their sum.
                        (part * dist.world_size if dist.enabled else part).backward()
                    loss += part.detach()
                    for k, v in m.items():
                        sums[k] += v.item() * w
                    trained_tokens += int(b["attention_mask"].sum()) * w
                loss = dist.sum_tensor(loss)
                *values, trained_tokens = dist.sum(*sums.values(), trained_tokens)
                sums = dict(zip(sums, values))
                grad_norm, lr = optimizer_step(loss, state["step"] + 1)

                ended = time.perf_counter()
                seconds = ended - started
                # Wall-clock of the whole step: the first step of a rollout includes sampling and scoring it.
                step_seconds = ended - (rollout_started if iteration == 0 else started)
                state["step"] += 1
                state["elapsed_s"] += step_seconds
                losses_log.append(loss.item())
                row = {"step": state["step"], "loss": losses_log[-1], "lr": lr, "grad_norm": grad_norm.item(),
                       **rollout_metrics(all_ranks(rollout, dist), g.num_generations),
                       "clip_fraction": sums["clipped"] / max(sums["tokens"], 1),
                       "step_s": round(step_seconds, 3), "generation_s": round(rollout.generation_seconds, 3),
                       "training_s": round(seconds, 3),
                       "generation_tokens_per_s": round(completion_tokens / rollout.generation_seconds, 1),
                       "training_tokens_per_s": round(trained_tokens / seconds, 1)}
                if g.beta > 0:
                    row["kl"] = sums["kl"] / max(sums["tokens"], 1)
                metrics.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", reward=f"{row['reward']:.3f}")
                bar.update(1)
                saving |= bool(t.save_every) and state["step"] % t.save_every == 0

            last = state["step"] >= plan.total_steps
            stopping = dist.any(stop.requested) or (stop_at_step is not None and state["step"] >= stop_at_step)
            if last or stopping or saving:
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
    return TrainResult(output_dir, final, state["step"], losses_log, None, model, tokenizer)


def all_ranks(rollout, dist: Distributed):
    """What rollout_metrics reads, over the rollouts of every rank (the rollout itself with one process)."""
    if not dist.enabled:
        return rollout
    parts = dist.gather_objects((rollout.rewards.tolist(), rollout.per_function, rollout.completion_tokens,
                                 len(rollout.completions), rollout.skipped_prompts))
    return SimpleNamespace(
        rewards=torch.tensor([r for p in parts for r in p[0]]),
        per_function={name: [v for p in parts for v in p[1][name]] for name in parts[0][1]},
        completion_tokens=sum(p[2] for p in parts),
        completions=range(sum(p[3] for p in parts)),  # only its length is read
        skipped_prompts=sum(p[4] for p in parts))


def rollout_metrics(rollout, group_size: int) -> dict:
    """Reward mean and std (overall and per function), completion length, and the share of groups whose
    completions all scored the same (they have zero advantage: no learning signal)."""
    rewards = rollout.rewards
    groups = rewards.view(-1, group_size)
    row = {"reward": rewards.mean().item(), "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
           "groups_without_signal": (groups.std(dim=1) == 0).float().mean().item(),
           "completion_length": rollout.completion_tokens / len(rollout.completions)}
    for name, values in rollout.per_function.items():
        v = torch.tensor(values)
        row[f"rewards/{name}/mean"] = v.mean().item()
        row[f"rewards/{name}/std"] = v.std().item() if len(v) > 1 else 0.0
    if rollout.skipped_prompts:
        row["skipped_prompts"] = rollout.skipped_prompts
    return row
