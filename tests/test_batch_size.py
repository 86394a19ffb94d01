"""`train.batch_size: auto` (issue 10): the largest micro-batch that fits, with the accumulation that keeps
the configured effective batch; and the effective batch as a setting of its own."""

import pytest
import torch

from lorafit import Config
from lorafit.errors import ConfigError
from lorafit.memory import GiB, estimate_training_memory
from lorafit.recipes.sft import run_sft
from lorafit.training.batch_size import candidates, choose_micro_batch, fits_one_step
from lorafit.training.loop import load_trainee
from tiny_models import tiny_model_directory

SEQ = 128


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    return tiny_model_directory(tmp_path_factory.mktemp("tiny"), smollm2_dir, "qwen2")


def config_for(tiny_dir, output_dir, *overrides):
    return Config.from_dict({"model": {"source": str(tiny_dir), "max_seq_length": SEQ}}).with_overrides(
        [f"train.output_dir={output_dir}", "train.lr=1.0e-3", "train.save_every=0", *overrides])


def test_the_effective_batch_is_micro_batch_times_accumulation_times_ranks():
    train = Config().train
    assert train.batch_split() == (2, 8)  # the guide's 2 x 8 = 16
    assert train.batch_split(world_size=2) == (2, 8)  # a fixed accumulation: two ranks make 32
    fixed = Config.from_dict({"train": {"batch_size": 2, "effective_batch_size": 16}}).train
    assert fixed.batch_split() == (2, 8) and fixed.batch_split(world_size=2) == (2, 4)
    auto = Config.from_dict({"train": {"batch_size": "auto"}}).train
    assert auto.batch_split(micro_batch=4) == (4, 4) and auto.batch_split(2, micro_batch=4) == (4, 2)
    resolved = Config.from_dict({"train": {"batch_size": "auto", "effective_batch_size": 32}}).with_batch(2, 4)
    assert (resolved.train.batch_size, resolved.train.grad_accum, resolved.train.effective_batch_size) == (4, 4, None)


@pytest.mark.parametrize("train, message", [
    ({"batch_size": "auto", "grad_accum": 4}, "train.grad_accum must be null with batch_size: auto"),
    ({"grad_accum": 4, "effective_batch_size": 16}, "train.grad_accum must be null when effective_batch_size"),
    ({"batch_size": "big"}, "train.batch_size must be an integer >= 1 or auto, got 'big'"),
    ({"effective_batch_size": 0}, "train.effective_batch_size must be an integer >= 1 or null, got 0"),
    ({"recipe": "grpo", "batch_size": "auto"}, "train.batch_size: auto is for sft and dpo"),
])
def test_batch_settings_that_cannot_work_are_refused(train, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({"train": train})


def test_an_effective_batch_that_ranks_cannot_split_is_refused():
    train = Config.from_dict({"train": {"batch_size": 3, "effective_batch_size": 16}}).train
    with pytest.raises(ConfigError, match="effective_batch_size 16 is not a whole number of micro-batches of 3"):
        train.batch_split()


def test_auto_and_a_null_accumulation_given_together_override_a_file_that_sets_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_size: 2\n  grad_accum: 8\n")
    config = Config.from_yaml(path, ["train.batch_size=auto", "train.grad_accum=null"])
    assert config.train.batch_size == "auto" and config.train.grad_accum is None
    with pytest.raises(ConfigError, match="override 'train.batch_size=auto': train.grad_accum must be null"):
        Config.from_yaml(path, ["train.batch_size=auto"])


def test_candidates_divide_each_ranks_share():
    assert candidates(16) == [16, 8, 4, 2, 1]
    assert candidates(12) == [12, 6, 4, 3, 2, 1]


def test_a_smaller_micro_batch_is_taken_while_a_real_step_runs_out_of_memory(tiny_dir, tmp_path):
    """The estimate allows all 16; a real step (simulated) runs out of memory above 2 sequences."""
    trainee = load_trainee(config_for(tiny_dir, tmp_path / "t", "train.batch_size=auto"))
    tried = []

    def try_step(rows):
        tried.append(rows)
        return rows <= 2

    config = config_for(tiny_dir, tmp_path / "t", "train.batch_size=auto")
    micro, line = choose_micro_batch(config, trainee.model, budget=64 * GiB, try_step=try_step)
    assert (micro, tried) == (2, [16, 8, 4, 2])
    assert "micro-batch auto: 2" in line and "accumulation 8: effective batch 2 x 8 x 1 = 16" in line


class _OutOfMemoryAbove:
    """A model stand-in that runs out of memory, as a GPU would, on more than `rows` sequences."""

    def __init__(self, model, rows):
        self.model, self.rows = model, rows

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, tokens, labels):
        if tokens.shape[0] > self.rows:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return self.model(tokens, labels=labels)


def test_one_step_try_leaves_no_gradients_and_the_random_state_as_it_was(tiny_dir, tmp_path):
    trainee = load_trainee(config_for(tiny_dir, tmp_path / "t"))
    model, device = trainee.model, trainee.device
    before = torch.get_rng_state()
    assert fits_one_step(model, 2, SEQ, trainee.autocast, device)
    assert not fits_one_step(_OutOfMemoryAbove(model, rows=1), 2, SEQ, trainee.autocast, device)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(p.grad is None for p in model.parameters())


def test_auto_under_a_memory_limit_keeps_the_effective_batch(tiny_dir, tmp_path):
    """Issue 10, on CPU: a budget (train.memory_budget_gib) that the estimate fits 4 sequences into and
    not 8 gives micro-batch 4 x accumulation 4 = 16, and the same losses as a run configured so; and, up to
    float order, as the guide's 2 x 8."""
    model = load_trainee(config_for(tiny_dir, tmp_path / "m")).model
    layers = ["none"] * model.config.num_layers
    size = model.model.embed_tokens.weight.element_size()
    four, eight = (estimate_training_memory(model, b * SEQ, layers, element_size=size).total for b in (4, 8))
    budget = (four + eight) / 2 / GiB
    logged = []
    auto = run_sft(config_for(tiny_dir, tmp_path / "auto", "train.max_steps=3", "train.batch_size=auto",
                              f"train.memory_budget_gib={budget}"), log=logged.append, progress=False)
    assert any(line.startswith("micro-batch auto: 4 (the largest of 16, 8, 4, 2, 1 that fits") and
               line.endswith("accumulation 4: effective batch 4 x 4 x 1 = 16") for line in logged)
    written = Config.from_yaml(tmp_path / "auto" / "config.yaml").train
    assert (written.batch_size, written.grad_accum) == (4, 4)
    fixed = run_sft(config_for(tiny_dir, tmp_path / "fixed", "train.max_steps=3", "train.batch_size=4",
                               "train.grad_accum=4"), log=lambda *_: None, progress=False)
    guide = run_sft(config_for(tiny_dir, tmp_path / "guide", "train.max_steps=3"), log=lambda *_: None,
                    progress=False)
    assert auto.losses == fixed.losses
    assert auto.losses == pytest.approx(guide.losses, rel=1e-5)
