"""The advisor: the plan's step arithmetic, one row per setting of DESIGN §1, and `lorafit advise`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorafit import cli
from lorafit.advisor import (Advice, advise, count_parameters_without_weights, format_advice, num,
                             training_plan)
from lorafit.config import Config
from lorafit.errors import LorafitError
from lorafit.models.llama import CausalLM
from lorafit.models.registry import model_config_from_hf

REPO = Path(__file__).parent.parent
GUIDE_SETTINGS = ["learning rate", "epochs", "LoRA rank r", "LoRA alpha", "LoRA dropout", "weight decay", "warmup",
                  "scheduler", "seed", "target modules", "micro-batch", "gradient accumulation", "effective batch"]
DERIVED = ["total optimizer steps", "warmup steps"]

# hidden 72, 3 query heads sharing 1 KV head (head_dim 24), MLP 100, 2 layers, tied embeddings.
TINY_HF = dict(model_type="llama", vocab_size=101, hidden_size=72, intermediate_size=100, num_hidden_layers=2,
               num_attention_heads=3, num_key_value_heads=1, head_dim=24, max_position_embeddings=256,
               rms_norm_eps=1e-5, tie_word_embeddings=True)


def config(*overrides):
    return Config().with_overrides(list(overrides))


def row(rows, setting) -> Advice:
    return next(r for r in rows if r.setting == setting)


# --------------------------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("overrides, n, world, expected", [
    # 91 examples / 2 per micro-batch = 46 micro-batches; / 8 accumulation = 6 steps; ceil(0.05 x 6) = 1.
    ((), 91, 1, dict(micro_batches_per_epoch=46, steps_per_epoch=6, total_steps=6, warmup_steps=1,
                     effective_batch=16, epochs=1.0)),
    # The demo: 46 micro-batches / 4 = 12 steps per epoch, x 3 epochs = 36, ceil(0.05 x 36) = 2.
    (("train.grad_accum=4", "train.epochs=3"), 91, 1,
     dict(micro_batches_per_epoch=46, steps_per_epoch=12, total_steps=36, warmup_steps=2, effective_batch=8)),
    # max_steps wins over epochs; 10 of 6 steps per epoch is 1.67 passes.
    (("train.max_steps=10", "train.epochs=3"), 91, 1,
     dict(steps_per_epoch=6, total_steps=10, warmup_steps=1)),
    # Two ranks: 100 / (2 x 2) = 25 micro-batches each, / 4 = 7 steps, x 3 = 21, ceil(0.1 x 21) = 3.
    (("train.grad_accum=4", "train.epochs=3", "train.warmup_ratio=0.1"), 100, 2,
     dict(micro_batches_per_epoch=25, steps_per_epoch=7, total_steps=21, warmup_steps=3, effective_batch=16)),
    # No warmup stays none.
    (("train.warmup_ratio=0",), 91, 1, dict(warmup_steps=0)),
    # Unknown data size: no step counts, unless max_steps fixes them.
    ((), None, 1, dict(micro_batches_per_epoch=None, steps_per_epoch=None, total_steps=None, warmup_steps=None)),
    (("train.max_steps=40",), None, 1, dict(steps_per_epoch=None, total_steps=40, warmup_steps=2, epochs=None)),
])
def test_training_plan(overrides, n, world, expected):
    plan = training_plan(config(*overrides), n, world_size=world)
    assert {k: getattr(plan, k) for k in expected} == expected


def test_training_plan_refuses_no_data():
    with pytest.raises(LorafitError, match="no examples"):
        training_plan(Config(), 0)
    assert training_plan(Config(), 10, trainable_params=5, total_params=50).to_dict()["trainable_params"] == 5


# ------------------------------------------------------------------------------------------- the advice


def test_every_guide_setting_has_a_row_with_a_reason():
    plan = training_plan(Config(), 91, trainable_params=1000, total_params=100_000)
    rows = advise(Config(), plan)
    assert [r.setting for r in rows] == GUIDE_SETTINGS + ["trainable parameters"] + DERIVED
    assert all(r.status == "ok" for r in rows), [r for r in rows if r.status != "ok"]  # the defaults ARE the guide
    assert all(r.why.endswith(".") and len(r.why) > 20 for r in rows)
    assert row(rows, "learning rate").key == "train.lr" and row(rows, "learning rate").value == 2e-4
    assert "unstable" in row(rows, "learning rate").why and "under-trains" in row(rows, "learning rate").why
    assert row(rows, "warmup steps").value == 1 and row(rows, "total optimizer steps").value == 6
    assert [r.setting for r in advise(Config())] == GUIDE_SETTINGS + DERIVED  # no plan: no parameter row
    assert row(advise(Config()), "total optimizer steps").value is None


@pytest.mark.parametrize("overrides, setting, status", [
    (["train.lr=5e-4"], "learning rate", "warn"),
    (["train.lr=1e-4"], "learning rate", "ok"),
    (["train.lr=1e-6"], "learning rate", "note"),
    (["finetune.method=full"], "learning rate", "ok"),
    (["finetune.method=full", "train.lr=1e-4"], "learning rate", "note"),
    (["finetune.method=full", "train.lr=3e-4"], "learning rate", "warn"),
    (["train.recipe=dpo"], "learning rate", "ok"),
    (["train.recipe=dpo", "train.lr=2e-4"], "learning rate", "note"),
    (["train.epochs=3"], "epochs", "ok"),
    (["train.epochs=4"], "epochs", "warn"),
    (["train.epochs=1", "train.max_steps=30"], "epochs", "warn"),  # 30 steps of 6 per epoch = 5 passes
    (["finetune.r=32"], "LoRA rank r", "ok"),
    (["finetune.r=8"], "LoRA rank r", "note"),
    (["finetune.r=128"], "LoRA rank r", "note"),
    (["finetune.r=4"], "LoRA rank r", "warn"),
    (["finetune.r=256"], "LoRA rank r", "warn"),
    (["finetune.method=full", "finetune.r=4"], "LoRA rank r", "ok"),  # not used
    (["finetune.alpha=32"], "LoRA alpha", "ok"),
    (["finetune.alpha=8"], "LoRA alpha", "note"),
    (["finetune.alpha=16", "finetune.rslora=true"], "LoRA alpha", "ok"),
    (["finetune.dropout=0.05"], "LoRA dropout", "note"),
    (["finetune.dropout=0.1"], "LoRA dropout", "note"),
    (["finetune.dropout=0.3"], "LoRA dropout", "warn"),
    (["train.weight_decay=0"], "weight decay", "note"),
    (["train.weight_decay=0.1"], "weight decay", "ok"),
    (["train.weight_decay=0.5"], "weight decay", "warn"),
    (["train.warmup_ratio=0.1"], "warmup", "ok"),
    (["train.warmup_ratio=0"], "warmup", "note"),
    (["train.warmup_ratio=0.3"], "warmup", "note"),
    (["train.scheduler=cosine"], "scheduler", "ok"),
    (["train.seed=1"], "seed", "ok"),
    (["finetune.targets=attention"], "target modules", "note"),
    (["finetune.targets=mlp"], "target modules", "note"),
    (["finetune.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"], "target modules", "ok"),
    (["finetune.targets=[q_proj,v_proj]"], "target modules", "note"),
    (["train.batch_size=1", "train.grad_accum=2"], "effective batch", "note"),
    (["train.batch_size=2", "train.grad_accum=2"], "effective batch", "ok"),
    (["train.batch_size=8", "train.grad_accum=8"], "effective batch", "note"),
])
def test_statuses(overrides, setting, status):
    cfg = config(*overrides)
    advice = row(advise(cfg, training_plan(cfg, 91)), setting)
    assert advice.status == status, advice


def test_reasons_carry_the_numbers():
    cfg = config("finetune.alpha=16", "finetune.rslora=true")
    assert "alpha/sqrt(r) = 4" in row(advise(cfg), "LoRA alpha").why
    assert "rsLoRA" in row(advise(cfg), "LoRA alpha").recommendation
    assert "fast" in row(advise(config("finetune.dropout=0.05")), "LoRA dropout").why  # kernels
    assert "memory" in row(advise(config("finetune.r=128")), "LoRA rank r").why
    assert "memory" in row(advise(Config()), "micro-batch").why
    assert "time per update" in row(advise(Config()), "gradient accumulation").why
    effective = row(advise(Config(), training_plan(Config(), 91, world_size=2)), "effective batch")
    assert effective.value == 32 and effective.status == "note" and "2 x 8 x 2 = 32" in effective.why
    assert "ranks" in effective.why
    assert "(1 of 6 steps)" in row(advise(Config(), training_plan(Config(), 91)), "warmup").why


def test_format_advice_is_an_aligned_table():
    cfg = config("train.lr=5e-4", "finetune.dropout=0.05")
    rows = advise(cfg, training_plan(cfg, 91))
    text = format_advice(rows)
    lines = text.splitlines()
    table = [line for line in lines if line and not line.startswith(" ") and not line[0].isdigit()]
    assert len(table) == 1 + len(rows)  # header + one line per setting; reasons are indented below
    status_column = lines[0].index("status")
    assert {line[status_column:].split()[0] for line in table[1:]} <= {"ok", "note", "warn"}
    assert "5e-4" in text and "unknown" not in text
    assert lines[-1] == "1 note, 1 warning"
    assert "unknown" in format_advice(advise(Config()))  # step counts without a data size
    assert max(len(line) for line in lines if line.startswith("    ")) <= 100


def test_advice_is_json_friendly():
    cfg = config("finetune.targets=[q_proj]")
    text = json.dumps([r.to_dict() for r in advise(cfg, training_plan(cfg, 9))])
    assert json.loads(text)[0]["setting"] == "learning rate"


def test_num_writes_hyperparameters_as_people_do():
    assert [num(2e-4), num(5e-6), num(1.5e-4), num(0.05), num(3407), num(134_515_008), num(0.0)] == [
        "2e-4", "5e-6", "1.5e-4", "0.05", "3407", "134,515,008", "0"]


# ------------------------------------------------------------------------------------ parameter counts


def test_parameter_counts_without_weights_match_the_lora_shapes():
    with torch.device("meta"):
        base = sum(p.numel() for p in CausalLM(model_config_from_hf(TINY_HF)).parameters())
    # r x (in + out) per adapted layer: q 72->72, k 72->24, v 72->24, o 72->72, gate/up 72->100, down 100->72.
    per_layer = 144 + 96 + 96 + 144 + 172 + 172 + 172
    assert count_parameters_without_weights(Config(), TINY_HF) == (16 * per_layer * 2, base + 16 * per_layer * 2)
    attention = config("finetune.targets=attention", "finetune.r=4")
    assert count_parameters_without_weights(attention, TINY_HF)[0] == 4 * (144 + 96 + 96 + 144) * 2
    assert count_parameters_without_weights(config("finetune.method=full"), TINY_HF) == (base, base)


# ------------------------------------------------------------------------------------------- the command


@pytest.fixture
def tiny_setup(tmp_path):
    """A model directory with only a config.json (advise reads no weights) and a 10-row JSONL file."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(TINY_HF))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(10)) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  source: {model_dir}\ndata:\n  path: {data}\ntrain:\n  grad_accum: 2\n")
    return cfg


def test_advise_command_counts_rows_and_parameters(tiny_setup, capsys):
    assert cli.main(["advise", str(tiny_setup), "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "(10 rows)" in out
    assert "trainable" in out and "31,872" in out  # 16 x 996 x 2 layers
    # 10 rows / 2 = 5 micro-batches, / 2 = 3 steps per epoch, x 2 epochs = 6.
    assert any(line.startswith("total optimizer steps") and " 6 " in line for line in out.splitlines())


def test_advise_command_json_and_unknown_data(tiny_setup, tmp_path, capsys):
    assert cli.main(["advise", str(tiny_setup), f"data.path={tmp_path / 'nowhere.jsonl'}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plan"]["total_steps"] is None and report["plan"]["trainable_params"] == 31_872
    assert [a["setting"] for a in report["advice"]][:len(GUIDE_SETTINGS)] == GUIDE_SETTINGS


def test_advise_command_reports_config_errors(tiny_setup, capsys):
    assert cli.main(["advise", str(tiny_setup), "train.lerning_rate=1e-4"]) == 1
    assert "did you mean train.lr?" in capsys.readouterr().err


def test_lorafit_advise_on_the_demo_config():
    run = subprocess.run([sys.executable, "-m", "lorafit", "advise", "configs/sft-lora-default.yaml"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for setting in GUIDE_SETTINGS:
        assert setting in run.stdout
    assert run.stdout.splitlines()[-1] == "0 notes, 0 warnings"  # the demo stays inside the guide
