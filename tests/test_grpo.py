"""GRPO: advantages and the clipped objective against their formulas, micro-batching that adds up to the
step, and the recipe end to end on small real models."""

import json
import math
from pathlib import Path

import pytest
import torch

from lorafit.losses.grpo import StepTotals, group_advantages, grpo_loss


def test_group_advantages_follow_the_formula():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])  # two groups of 4
    a = group_advantages(rewards, 4)
    first = rewards[:4]
    expected = (first - first.mean()) / (first.std() + 1e-4)  # the sample std, as TRL
    torch.testing.assert_close(a[:4], expected)
    assert torch.equal(a[4:], torch.zeros(4))  # equal rewards: no signal, and no division by zero
    torch.testing.assert_close(group_advantages(rewards, 4, scale_rewards=False)[:4], first - 0.5)


def _inputs(seed=0, b=4, T=7):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(b, T, generator=g) * 3).requires_grad_(True)
    old = logps.detach() + torch.randn(b, T, generator=g) * 0.3
    ref = logps.detach() + torch.randn(b, T, generator=g) * 0.2
    mask = torch.ones(b, T, dtype=torch.bool)
    mask[0, 5:] = False  # completions of different lengths
    mask[2, 2:] = False
    advantages = torch.randn(b, generator=g)
    return logps, old, ref, mask, advantages


def _reference_loss(logps, old, ref, mask, advantages, eps, beta, normalisation, max_len):
    """The formulas of lorafit/losses/grpo.py's docstring, written out per completion."""
    per_completion, total_tokens = [], int(mask.sum())
    for i in range(logps.shape[0]):
        n = int(mask[i].sum())
        ratio = torch.exp(logps[i, :n] - old[i, :n])
        a = advantages[i]
        ell = -torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
        log_r = ref[i, :n] - logps[i, :n]
        ell = ell + beta * (torch.exp(log_r) - log_r - 1)
        per_completion.append((ell.sum(), n))
    if normalisation == "sequence":
        return sum(s / n for s, n in per_completion) / len(per_completion)
    if normalisation == "token":
        return sum(s for s, _ in per_completion) / total_tokens
    return sum(s for s, _ in per_completion) / (len(per_completion) * max_len)


@pytest.mark.parametrize("normalisation", ["sequence", "token", "dr_grpo"])
def test_loss_and_gradient_equal_the_formula(normalisation):
    logps, old, ref, mask, advantages = _inputs()
    totals = StepTotals(4, int(mask.sum()), max_completion_length=9)
    loss, m = grpo_loss(logps, old, advantages, mask, totals, 0.2, normalisation, ref, beta=0.04)
    (grad,) = torch.autograd.grad(loss, logps)
    x = logps.detach().clone().requires_grad_(True)
    expected = _reference_loss(x, old, ref, mask, advantages, 0.2, 0.04, normalisation, 9)
    (expected_grad,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert m["tokens"] == mask.sum() and 0 < m["clipped"] < m["tokens"] and m["kl"] > 0


def test_one_pass_is_the_policy_gradient():
    """With old = logps (one optimizer step per rollout) the ratio is 1: nothing is clipped, and the token
    normalisation's gradient is -A_i / (all tokens) on every completion token."""
    logps, _, _, mask, advantages = _inputs(1)
    totals = StepTotals(4, int(mask.sum()), 9)
    loss, m = grpo_loss(logps, logps.detach(), advantages, mask, totals)
    (grad,) = torch.autograd.grad(loss, logps)
    torch.testing.assert_close(grad, (-advantages[:, None] / mask.sum()).expand_as(grad) * mask)
    assert m["clipped"] == 0 and "kl" not in m


@pytest.mark.parametrize("normalisation", ["sequence", "token", "dr_grpo"])
def test_micro_batches_add_up_to_the_step(normalisation):
    logps, old, ref, mask, advantages = _inputs(2)
    totals = StepTotals(4, int(mask.sum()), 9)
    whole, _ = grpo_loss(logps, old, advantages, mask, totals, normalisation=normalisation)
    parts = sum(grpo_loss(logps[s], old[s], advantages[s], mask[s], totals, normalisation=normalisation)[0]
                for s in (slice(0, 1), slice(1, 4)))
    torch.testing.assert_close(parts, whole)


def test_bad_settings_are_refused():
    logps, old, _, mask, advantages = _inputs()
    with pytest.raises(ValueError, match="normalisation must be one of sequence, token, dr_grpo"):
        grpo_loss(logps, old, advantages, mask, StepTotals(4, 10, 9), normalisation="mean")
    with pytest.raises(ValueError, match="beta > 0 needs the reference"):
        grpo_loss(logps, old, advantages, mask, StepTotals(4, 10, 9), beta=0.1)


# ------------------------------------------------------------------------------------------ the recipe

STORIES = Path(__file__).parent / "assets" / "stories260K-v1.gguf"  # the tiny real model (TinyStories)
CHAIN_SUM = Path(__file__).parent.parent / "data" / "chain_sum.jsonl"

# A user's reward function, named in the config as "file.py:function": rewards that vary on a story model's
# completions (their share of the letter "e"), so that groups carry a learning signal.
USER_REWARDS = '''
import math

def share_of_e(prompts, completions, **columns):
    assert len(prompts) == len(completions) == len(columns["answer"])
    return [c.count("e") / max(len(c), 1) for c in completions]

def nan_for_the_first(prompts, completions, **columns):
    return [math.nan] + [0.0] * (len(completions) - 1)
'''


def grpo_config(tmp_path, output, *overrides):
    from lorafit import Config

    rows = CHAIN_SUM.read_text().splitlines()[:40]
    (tmp_path / "prompts.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "user_rewards.py").write_text(USER_REWARDS)
    return Config.from_dict({"model": {"source": str(STORIES), "dtype": "float32"}}).with_overrides([
        "train.recipe=grpo", f"data.path={tmp_path / 'prompts.jsonl'}", f"train.output_dir={tmp_path / output}",
        "data.eval_fraction=0.1", "train.batch_size=2", "train.grad_accum=4", "grpo.num_generations=4",
        "grpo.max_completion_length=12", "train.lr=1e-3", "train.save_every=2",
        f"grpo.rewards=[numeric_answer, {tmp_path / 'user_rewards.py'}:share_of_e]", *overrides])


def run_recipe(config, **kw):
    import warnings

    from lorafit.recipes import train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stories260K has no chat template: the fallback's warning
        return train(config, log=lambda *_: None, progress=False, **kw)


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_grpo_recipe_trains_the_tiny_real_model_and_logs_everything(tmp_path):
    config = grpo_config(tmp_path, "grpo", "train.max_steps=4", "grpo.num_iterations=2", "grpo.beta=0.04")
    result = run_recipe(config)
    assert result.steps == 4 and all(math.isfinite(x) for x in result.losses)
    rows = read_rows(tmp_path / "grpo" / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_reward" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for key in ("reward", "reward_std", "rewards/numeric_answer/mean", "rewards/share_of_e/std", "kl",
                "clip_fraction", "completion_length", "generation_tokens_per_s", "training_tokens_per_s"):
        assert key in train_rows[0], key
    assert 0 < train_rows[0]["completion_length"] <= 12
    # Steps 1 and 2 train on one rollout: the second pass is off-policy, so its ratio can be clipped, and
    # the policy has moved from the reference.
    assert train_rows[0]["reward"] == train_rows[1]["reward"] and train_rows[1]["kl"] > 0
    assert [r["step"] for r in evals] == [0, 2, 4]  # before training, at each save (the last one too)
    assert {"eval_rewards/numeric_answer", "eval_rewards/share_of_e"} <= set(evals[0])
    assert (tmp_path / "grpo" / "adapter" / "adapter_model.safetensors").is_file()


def test_grpo_resume_gives_the_same_steps(tmp_path):
    straight = run_recipe(grpo_config(tmp_path, "a", "train.max_steps=4"))
    run_recipe(grpo_config(tmp_path, "b", "train.max_steps=4"), stop_at_step=2)
    resumed = run_recipe(grpo_config(tmp_path, "b", "train.max_steps=4"), resume=True)
    losses = [r["loss"] for r in read_rows(tmp_path / "b" / "metrics.jsonl") if "loss" in r]
    assert resumed.steps == 4 and losses == pytest.approx(straight.losses, abs=1e-6)


def test_a_reward_returning_nan_stops_or_skips_its_prompt(tmp_path):
    from lorafit.rewards import RewardError

    nan_reward = f"grpo.rewards=[{tmp_path / 'user_rewards.py'}:nan_for_the_first]"
    with pytest.raises(RewardError, match=r"nan_for_the_first .*nan.* completion 0"):
        run_recipe(grpo_config(tmp_path, "stop", "train.max_steps=1", nan_reward))
    result = run_recipe(grpo_config(tmp_path, "skip", "train.max_steps=1", nan_reward, "grpo.on_reward_error=skip",
                                    "data.eval_fraction=0"))
    row = read_rows(tmp_path / "skip" / "metrics.jsonl")[0]
    assert result.steps == 1 and row["skipped_prompts"] == 1  # the group of completion 0; the other trains


def test_example_configs_run_in_tiny_form(tmp_path):
    from lorafit import Config

    root = Path(__file__).parent.parent
    for name in ("grpo-chain-sum", "grpo-gsm8k"):
        path = root / "configs" / f"{name}.yaml"
        config = Config.from_yaml(path, [
            f"model.source={STORIES}", "model.dtype=float32", "train.max_steps=1", "train.batch_size=4",
            "train.grad_accum=2", "grpo.max_completion_length=8", f"train.output_dir={tmp_path / name}",
            "data.eval_fraction=0.01", f"data.path={root / Config.from_yaml(path).data.path}"])
        result = run_recipe(config)
        assert result.steps == 1 and math.isfinite(result.losses[0])
