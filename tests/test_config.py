"""The config schema: the guide's defaults, YAML round trips, dotted overrides, and errors that name the key."""

import dataclasses
import inspect
from pathlib import Path

import pytest

from lorafit.config import Config, DataSection, FinetuneSection, ModelSection, TrainSection, default_lr
from lorafit.errors import ConfigError, LorafitError
from lorafit.finetune import prepare_for_finetuning
from lorafit.lora import apply_lora

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))

# DESIGN §1 and the public contract of the key names, written out so that any drift fails here.
GUIDE_DEFAULTS = {
    "model": {"source": "default", "dtype": "auto", "max_seq_length": 2048},
    "finetune": {"method": "lora", "r": 16, "alpha": None, "dropout": 0.0, "targets": "all-linear",
                 "rslora": False, "dora": False, "modules_to_save": []},
    "data": {"path": None, "format": "auto", "train_on_responses_only": True, "packing": False,
             "eval_fraction": 0.0},
    "train": {"recipe": "sft", "epochs": 1, "max_steps": None, "lr": None, "batch_size": 2, "grad_accum": None,
              "effective_batch_size": None, "warmup_ratio": 0.05, "scheduler": "linear", "weight_decay": 0.01, "max_grad_norm": 1.0,
              "seed": 3407, "output_dir": "runs/sft", "save_every": 100, "log_every": 1,
              "activation_checkpointing": "auto", "memory_budget_gib": None,
              "disable_kernels": [], "distributed": "auto"},
    "dpo": {"beta": 0.1, "loss": "sigmoid", "precompute_reference": False},
    "grpo": {"rewards": ["numeric_answer"], "reward_weights": None, "num_generations": 8, "max_prompt_length": 512,
             "max_completion_length": 256, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "system_prompt": None,
             "epsilon": 0.2, "beta": 0.0, "scale_rewards": True, "normalisation": "token", "num_iterations": 1,
             "on_reward_error": "stop"},
}


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*args, **kwargs)
    return str(e.value)


def test_defaults_are_the_guide():
    config = Config()
    assert config.to_dict() == GUIDE_DEFAULTS
    assert config.train.batch_split() == (2, 8)  # grad_accum null: the guide's 8, an effective batch of 16
    assert config.finetune.resolved_alpha == 16
    assert config.resolved_lr() == 2e-4
    assert Config.from_dict({}) == Config.from_dict(None) == config


def test_yaml_round_trip(tmp_path):
    config = Config().with_overrides(["finetune.targets=[q_proj, v_proj]", "finetune.alpha=32", "train.lr=1e-4",
                                      "data.path=data/train.jsonl", "train.max_steps=7", "finetune.rslora=true",
                                      "finetune.modules_to_save=[lm_head]", "train.max_grad_norm=null"])
    again = Config.from_yaml(write(tmp_path, config.to_yaml()))
    assert again == config
    assert again.to_dict() == config.to_dict()
    assert Config.from_yaml(write(tmp_path, Config().to_yaml(), "d.yaml")) == Config()


def test_partial_files_and_empty_sections_take_defaults(tmp_path):
    assert Config.from_yaml(write(tmp_path, "")) == Config()
    config = Config.from_yaml(write(tmp_path, "train:\n  # everything commented out\nfinetune:\n  r: 32\n"))
    assert config.train == TrainSection()
    assert config.finetune.r == 32 and config.finetune.resolved_alpha == 32


def test_overrides_lists_null_numbers_and_order(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: 50\n  lr: 1.0e-4\n")
    config = Config.from_yaml(path, ["train.max_steps=10", "finetune.r=32", "finetune.targets=[q_proj,v_proj]",
                                     "train.lr=null", "data.packing=true", "finetune.r=8"])
    assert config.train.max_steps == 10
    assert config.finetune.r == 8  # applied in order: the last one wins
    assert config.finetune.targets == ("q_proj", "v_proj")
    assert config.train.lr is None and config.resolved_lr() == 2e-4
    assert config.data.packing is True
    base = Config()
    changed = base.with_overrides("train.epochs=2")  # a single string is one override
    assert changed.train.epochs == 2 and base.train.epochs == 1  # never mutated in place


def test_yaml_1_1_exponent_strings_are_numbers(tmp_path):
    # PyYAML reads `2e-4` (no dot) as a string; the schema still takes it as the number everyone means.
    config = Config.from_yaml(write(tmp_path, "train:\n  lr: 2e-4\nfinetune:\n  alpha: 3e1\n"))
    assert config.train.lr == 2e-4 and config.finetune.alpha == 30.0
    assert Config().with_overrides(["train.lr=5e-6"]).train.lr == 5e-6


@pytest.mark.parametrize("data, expected", [
    ({"train": {"lerning_rate": 1}}, "unknown key train.lerning_rate (did you mean train.lr?)"),
    ({"train": {"learning_rate": 1}}, "unknown key train.learning_rate (did you mean train.lr?)"),
    ({"train": {"r": 8}}, "unknown key train.r (did you mean finetune.r?)"),
    ({"finetune": {"lora_alpha": 8}}, "unknown key finetune.lora_alpha (did you mean finetune.alpha?)"),
    ({"trian": {}}, "unknown key trian (did you mean train?)"),
    ({"lr": 1e-4}, "unknown key lr (did you mean train.lr?)"),
    ({"train": {"zzz": 1}}, "unknown key train.zzz"),
])
def test_unknown_keys_suggest_the_right_one(data, expected):
    assert error_of(Config.from_dict, data) == expected


@pytest.mark.parametrize("key, value, expected", [
    ("train.batch_size", "two", "train.batch_size must be an integer >= 1 or auto, got 'two'"),
    ("train.batch_size", 0, "train.batch_size must be an integer >= 1 or auto, got 0"),
    ("train.batch_size", True, "train.batch_size must be an integer >= 1 or auto, got true"),
    ("train.epochs", 1.5, "train.epochs must be an integer >= 1, got 1.5"),
    ("train.epochs", 0, "train.epochs must be an integer >= 1, got 0"),
    ("train.grad_accum", 0, "train.grad_accum must be an integer >= 1 or null, got 0"),
    ("train.max_steps", 0, "train.max_steps must be an integer >= 1 or null, got 0"),
    ("train.lr", 0, "train.lr must be a number > 0 or null, got 0"),
    ("train.lr", "fast", "train.lr must be a number > 0 or null, got 'fast'"),
    ("train.warmup_ratio", 1.0, "train.warmup_ratio must be a number in [0, 1), got 1.0"),
    ("train.weight_decay", -0.1, "train.weight_decay must be a number >= 0, got -0.1"),
    ("train.seed", -1, "train.seed must be an integer in [0, 4294967296), got -1"),
    ("train.scheduler", "cosin", "train.scheduler must be one of linear, cosine, got 'cosin' (did you mean cosine?)"),
    ("train.recipe", "ppo", "train.recipe must be one of sft, dpo, grpo, got 'ppo'"),
    ("train.output_dir", None, "train.output_dir must be a non-empty string, got null"),
    ("finetune.r", 0, "finetune.r must be an integer >= 1, got 0"),
    ("finetune.alpha", -1, "finetune.alpha must be a number > 0 or null, got -1"),
    ("finetune.dropout", 1, "finetune.dropout must be a number in [0, 1), got 1"),
    ("finetune.method", "lorra", "finetune.method must be one of lora, qlora, full, got 'lorra' (did you mean lora?)"),
    ("finetune.targets", "everything", "finetune.targets must be one of all-linear, attention, mlp (or a list of"),
    ("finetune.targets", [], "finetune.targets must be a non-empty list of names, got []"),
    ("finetune.rslora", "yes", "finetune.rslora must be true or false, got 'yes'"),
    ("finetune.modules_to_save", ["head"], "finetune.modules_to_save must be a list of names from embed_tokens, "
                                           "lm_head, got ['head']"),
    ("model.dtype", "fp8", "model.dtype must be one of auto, float32, bfloat16, float16, got 'fp8'"),
    ("model.max_seq_length", 8, "model.max_seq_length must be an integer >= 16, got 8"),
    ("data.format", "csv", "data.format must be one of auto, alpaca, sharegpt, messages, qa, text, got 'csv'"),
    ("data.eval_fraction", 1, "data.eval_fraction must be a number in [0, 1), got 1"),
    ("data.packing", None, "data.packing must be true or false, got null"),
])
def test_type_and_domain_errors_name_the_key_and_what_it_accepts(key, value, expected):
    section, name = key.split(".")
    message = error_of(Config.from_dict, {section: {name: value}})
    assert message.startswith(expected)
    assert isinstance(ConfigError(message), LorafitError)


def test_file_and_override_errors_say_where(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: two\n")
    assert error_of(Config.from_yaml, path) == f"{path}: train.batch_size must be an integer >= 1 or auto, got 'two'"
    good = write(tmp_path, "train:\n  epochs: 2\n", "good.yaml")
    assert error_of(Config.from_yaml, good, ["train.lerning_rate=1e-4"]) == (
        "override 'train.lerning_rate=1e-4': unknown key train.lerning_rate (did you mean train.lr?)")
    assert "did you mean train.lr?" in error_of(Config.from_yaml, good, ["lr=1e-4"])
    assert "train.max_steps=null" in error_of(Config.from_yaml, good, ["train.max_steps="])
    assert "section.key=value" in error_of(Config.from_yaml, good, ["train.max_steps"])
    assert "line 2" in error_of(Config.from_yaml, write(tmp_path, "train:\n\tlr: 1\n", "bad.yaml"))
    assert "cannot read" in error_of(Config.from_yaml, tmp_path / "missing.yaml")
    assert "a mapping of sections" in error_of(Config.from_yaml, write(tmp_path, "- 1\n", "list.yaml"))
    assert "train must be a mapping" in error_of(Config.from_yaml, write(tmp_path, "train: 3\n", "s.yaml"))


def test_yaml_is_data_never_code(tmp_path):
    path = write(tmp_path, "train: !!python/object/apply:os.system ['echo hi']\n")
    assert "not valid YAML" in error_of(Config.from_yaml, path)


@pytest.mark.parametrize("recipe, method, lr", [
    ("sft", "lora", 2e-4), ("sft", "qlora", 2e-4), ("sft", "full", 2e-5),
    ("dpo", "lora", 5e-6), ("dpo", "full", 5e-6), ("grpo", "qlora", 5e-6),
])
def test_resolved_lr_per_recipe_and_method(recipe, method, lr):
    config = Config(finetune=FinetuneSection(method=method), train=TrainSection(recipe=recipe))
    assert config.resolved_lr() == default_lr(recipe, method) == lr
    assert config.train.lr is None  # the user's null stays null
    assert Config(train=TrainSection(recipe=recipe, lr=3e-5)).resolved_lr() == 3e-5


def test_resolved_alpha_and_scaling():
    assert FinetuneSection(r=32).resolved_alpha == 32
    assert FinetuneSection(r=32, alpha=64).resolved_alpha == 64
    assert FinetuneSection(r=16, alpha=32).scaling == 2
    assert FinetuneSection(r=16, alpha=16, rslora=True).scaling == 4  # alpha / sqrt(r)
    assert FinetuneSection(r=8).alpha is None


def test_python_api_is_the_same_schema():
    config = Config(train={"lr": 1e-4}, finetune=FinetuneSection(targets=["q_proj"]))
    assert config.train.lr == 1e-4 and config.finetune.targets == ("q_proj",)
    assert error_of(TrainSection, batch_size=0) == "train.batch_size must be an integer >= 1 or auto, got 0"
    assert "unknown key train.lerning_rate" in error_of(Config, train={"lerning_rate": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.lr = 1.0
    assert dataclasses.replace(config.train, epochs=2).epochs == 2


def test_adapter_options_fit_the_preparation_step():
    lora = FinetuneSection(r=8, targets=["q_proj"], modules_to_save=["lm_head"]).adapter_options()
    assert lora["alpha"] == 8 and lora["targets"] == ["q_proj"] and lora["modules_to_save"] == ["lm_head"]
    assert set(lora) <= set(inspect.signature(apply_lora).parameters)
    assert set(inspect.signature(prepare_for_finetuning).parameters) >= {"method"}
    assert FinetuneSection(method="full").adapter_options() == {}
    assert Config(finetune=FinetuneSection(method="qlora")).quantize == "nf4"
    assert Config().quantize is None


def test_data_path_resolution():
    demo = DataSection().resolved_path()
    assert demo.parts[-3:] == ("lorafit", "data", "identity.json")
    assert DataSection(path="my/train.jsonl").resolved_path() == Path("my/train.jsonl")  # relative to the cwd


def test_model_section_defaults():
    assert ModelSection() == Config().model


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_configs_validate(path):
    config = Config.from_yaml(path)
    assert Config.from_dict(config.to_dict()) == config


def test_example_configs_are_the_promised_ones():
    names = {p.name for p in CONFIGS}
    assert {"sft-lora-default.yaml", "sft-qlora.yaml", "sft-full.yaml"} <= names
    demo = Config.from_yaml(CONFIGS[0].parent / "sft-lora-default.yaml")
    assert demo.model.source == "default" and demo.data.path is None and demo.finetune.method == "lora"
    assert Config.from_yaml(CONFIGS[0].parent / "sft-qlora.yaml").quantize == "nf4"
    assert Config.from_yaml(CONFIGS[0].parent / "sft-full.yaml").resolved_lr() == 2e-5


def test_grpo_settings_that_cannot_work_together_are_refused():
    with pytest.raises(ConfigError, match=r"batch_size x grad_accum = 12 completions, which must be whole groups of "
                                          r"grpo.num_generations = 8 \(e.g. batch_size 2 and grad_accum 12\)"):
        Config.from_dict({"train": {"recipe": "grpo", "grad_accum": 6}})
    with pytest.raises(ConfigError, match=r"max_prompt_length \+ max_completion_length = 1280 tokens exceed "
                                          r"model.max_seq_length = 1024"):
        Config.from_dict({"train": {"recipe": "grpo"}, "model": {"max_seq_length": 1024},
                          "grpo": {"max_completion_length": 768}})
    with pytest.raises(ConfigError, match=r"grpo.reward_weights must be null or a list of 2 numbers"):
        Config.from_dict({"grpo": {"rewards": ["numeric_answer", "answer_format"], "reward_weights": [1.0]}})
    Config.from_dict({"train": {"recipe": "sft", "grad_accum": 6}})  # only GRPO counts completions
