"""GRPO's rollouts: G completions per prompt from the model being trained, their rewards and advantages,
and the micro-batches that train on them.

Generation runs on lorafit's own batched KV-cache engine (generate.generate_ids): all the completions of an
optimizer step in one batch, the prompts left-padded to a shared cache position. Training sequences are the
prompt followed by the completion, right-padded, with labels only on the completion's tokens.
"""

import time
from dataclasses import dataclass, field

import torch

from ..data.prompts import PromptItem
from ..generate import Sampling, generate_ids
from ..losses.grpo import StepTotals, group_advantages
from ..rewards import score_completions


@dataclass
class Rollout:
    items: list[PromptItem]  # (N,) the prompt each completion answers, G in a row per prompt
    completions: list[list[int]]  # (N,) token ids, the stop token included when one ended it
    texts: list[str]  # (N,) decoded, without special tokens: what reward functions read
    rewards: torch.Tensor  # (N,) weighted total
    per_function: dict[str, list[float]]
    advantages: torch.Tensor  # (N,)
    generation_seconds: float
    skipped_prompts: int = 0  # groups dropped because a reward function failed on them (on_reward_error=skip)
    problems: list[str] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c) for c in self.completions)

    def totals(self, max_completion_length: int) -> StepTotals:
        return StepTotals(len(self.completions), self.completion_tokens, max_completion_length)


def generate_completions(model, items: list[PromptItem], group_size: int, max_new_tokens: int,
                         sampling: Sampling, stop_ids, pad_id: int, generator, autocast):
    """-> (completions, seconds): group_size completions of every prompt, sampled in one batch."""
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    prompts = [item.prompt_ids for item in items for _ in range(group_size)]
    with autocast:
        completions = generate_ids(model, prompts, max_new_tokens, sampling, stop_ids, pad_id, generator)
    model.train(was_training)
    return completions, time.perf_counter() - started


def decode(tokenizer, completions: list[list[int]], stop_ids) -> list[str]:
    stop = set(stop_ids)
    return [tokenizer.decode([t for t in c if t not in stop], skip_special_tokens=True) for c in completions]


def build_rollout(model, tokenizer, items: list[PromptItem], grpo, reward_functions, stop_ids, pad_id: int,
                  generator, autocast) -> Rollout:
    """Samples, scores and normalises one optimizer step's completions. `grpo`: the config's GRPOSection."""
    G = grpo.num_generations
    sampling = Sampling(grpo.temperature, grpo.top_k, grpo.top_p)
    completions, seconds = generate_completions(model, items, G, grpo.max_completion_length, sampling, stop_ids,
                                                pad_id, generator, autocast)
    texts = decode(tokenizer, completions, stop_ids)
    repeated = [item for item in items for _ in range(G)]
    scores = score_completions(reward_functions, grpo.reward_weights, repeated, texts, on_error=grpo.on_reward_error)

    # A group with a failed reward is dropped whole: its advantages would be relative to a partial group.
    bad_groups = {i // G for i in scores.invalid}
    keep = [i for i in range(len(completions)) if i // G not in bad_groups]
    rewards = torch.tensor([scores.total[i] for i in keep], dtype=torch.float32)
    advantages = group_advantages(rewards, G, grpo.scale_rewards) if keep else rewards
    return Rollout(
        items=[repeated[i] for i in keep],
        completions=[completions[i] for i in keep],
        texts=[texts[i] for i in keep],
        rewards=rewards,
        per_function={name: [values[i] for i in keep] for name, values in scores.per_function.items()},
        advantages=advantages,
        generation_seconds=seconds,
        skipped_prompts=len(bad_groups),
        problems=scores.problems,
    )


def training_batches(rollout: Rollout, batch_size: int, pad_id: int) -> list[dict]:
    """Micro-batches of batch_size completions: input_ids, attention_mask, labels (B, T) with labels -100 on
    the prompt and the padding; advantages (B,)."""
    batches = []
    for start in range(0, len(rollout.completions), batch_size):
        rows = range(start, min(start + batch_size, len(rollout.completions)))
        sequences = [rollout.items[i].prompt_ids + rollout.completions[i] for i in rows]
        T = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
        labels = torch.full((len(sequences), T), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), T), dtype=torch.long)
        for b, i in enumerate(rows):
            n_prompt, sequence = len(rollout.items[i].prompt_ids), sequences[b]
            input_ids[b, : len(sequence)] = torch.tensor(sequence)
            labels[b, n_prompt : len(sequence)] = torch.tensor(rollout.completions[i])
            attention_mask[b, : len(sequence)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                        "advantages": rollout.advantages[list(rows)]})
    return batches
