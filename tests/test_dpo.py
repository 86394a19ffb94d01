"""DPO: the loss against its formula, the reference by switched-off adapters, preference data, the recipe."""

import json
import math

import pytest
import torch

import lorafit
from lorafit.data.preference import collate_pairs, load_preference_dataset
from lorafit.errors import DataError
from lorafit.losses.dpo import SequenceLogps, dpo_loss, sequence_logps
from lorafit.training.reference import ReferenceModel


def _logps(values, counts=(3, 4, 5, 6)):
    return SequenceLogps(torch.tensor(values, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64))


def test_sigmoid_and_ipo_losses_and_rewards_equal_the_formulas():
    policy = _logps([-10.0, -12.0, -14.0, -11.0])  # chosen 1, chosen 2, rejected 1, rejected 2
    reference = _logps([-11.0, -12.5, -13.0, -12.0])
    beta = 0.1
    losses, m = dpo_loss(policy, reference, beta, "sigmoid")
    for i, (pc, pr, rc, rr) in enumerate([(-10, -14, -11, -13), (-12, -11, -12.5, -12)]):
        h = (pc - rc) - (pr - rr)
        assert losses[i].item() == pytest.approx(math.log1p(math.exp(-beta * h)), rel=1e-12)  # -log sigmoid
        assert m["rewards/chosen"][i].item() == pytest.approx(beta * (pc - rc))
        assert m["rewards/rejected"][i].item() == pytest.approx(beta * (pr - rr))
        assert m["rewards/margins"][i].item() == pytest.approx(beta * h)
        assert m["rewards/accuracy"][i].item() == float(h > 0)
    losses, _ = dpo_loss(policy, reference, beta, "ipo")
    counts = [3, 4, 5, 6]
    for i, (c, r) in enumerate([(0, 2), (1, 3)]):
        per_token = lambda k: (policy.total[k] - reference.total[k]).item() / counts[k]  # noqa: E731
        h = per_token(c) - per_token(r)
        assert losses[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-12)
    with pytest.raises(ValueError, match="sigmoid, ipo"):
        dpo_loss(policy, reference, beta, "hinge")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_and_metrics_equal_trls(loss_type):
    """TRL's DPOTrainer as the oracle, on fixed log-probabilities. TRL 1.x computes the loss inside
    `_compute_loss(model, inputs)`, so it runs there with a stand-in model that returns our per-token
    log-probabilities and a stand-in trainer holding the settings it reads."""
    pytest.importorskip("trl")
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import DPOTrainer

    g = torch.Generator().manual_seed(0)
    B, T = 3, 9
    completion_mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i, start in enumerate([3, 4, 2, 5, 3, 6]):
        completion_mask[i, start:] = 1
    per_token = -torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64) * 2 * completion_mask[:, 1:]
    reference = -torch.rand(2 * B, generator=g, dtype=torch.float64) * 10 - 5
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(2 * B, T - 1),
                              mean_logits=torch.zeros(2 * B, T - 1), is_top1=torch.zeros(2 * B, T - 1, dtype=torch.bool))
    accelerator = SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=0.1, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0,
        _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T),
              "completion_mask": completion_mask, "ref_chosen_logps": reference[:B], "ref_rejected_logps": reference[B:]}
    trl_loss = DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, False)

    counts = completion_mask.sum(1).to(torch.float64)
    losses, m = dpo_loss(SequenceLogps(per_token.sum(1), counts), SequenceLogps(reference, counts), 0.1, loss_type)
    assert losses.mean().item() == pytest.approx(trl_loss.item(), rel=1e-9)
    trl_metrics = trainer._metrics["train"]
    for ours, theirs in [("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                         ("rewards/margins", "rewards/margins"), ("rewards/accuracy", "rewards/accuracies")]:
        assert m[ours].mean().item() == pytest.approx(trl_metrics[theirs][0], rel=1e-9, abs=1e-12), ours


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rows = [
        {"conversations": [{"from": "human", "value": "Name a colour."}], "chosen": {"from": "gpt", "value": "Blue."},
         "rejected": {"from": "gpt", "value": "I cannot."}},
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
        {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}]},
        {"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."},  # identical answers: skipped
    ]
    path = tmp_path_factory.mktemp("dpo") / "pairs.json"
    path.write_text(json.dumps(rows))
    return path


def test_preference_layouts_are_read_and_identical_answers_skipped(pairs_file, smollm2):
    _, tokenizer = smollm2
    data = load_preference_dataset(pairs_file, tokenizer, max_seq_length=256)
    assert len(data.train) == 3 and data.skipped["with identical chosen and rejected answers"] == 1
    first = data.train[0]
    assert tokenizer.decode(first.chosen).startswith("Blue.") and "<|im_end|>" in tokenizer.decode(first.chosen)
    assert tokenizer.decode(first.prompt).rstrip().endswith("assistant")
    batch = collate_pairs(data.train[:2], data.pad_id)
    assert batch["input_ids"].shape[0] == 4  # chosen, chosen, rejected, rejected
    labelled = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert labelled == first.chosen and "identical" in data.summary()


def test_a_row_without_its_answers_names_the_row(tmp_path, smollm2):
    _, tokenizer = smollm2
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: a preference row needs prompt \(or conversations\), chosen, rejected"):
        load_preference_dataset(path, tokenizer, 256)


def test_reference_by_disabled_adapters_equals_a_frozen_copy(pairs_file, smollm2_dir):
    import copy

    model, tokenizer = lorafit.load_model(smollm2_dir, dtype="float32", device="cpu")
    frozen = copy.deepcopy(model)
    lorafit.apply_lora(model, r=8, alpha=16)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # trained adapters: the policy now differs from the reference
    data = load_preference_dataset(pairs_file, tokenizer, max_seq_length=256)
    batch = collate_pairs(data.train, data.pad_id)
    reference = ReferenceModel(model)
    assert reference.by_disabling_adapters and reference.frozen_copy is None  # no second model in memory
    with torch.no_grad():
        policy = sequence_logps(model, batch, "cpu")
        with reference.active() as reference_model:
            switched_off = sequence_logps(reference_model, batch, "cpu")
        copy_logps = sequence_logps(frozen, batch, "cpu")
        after = sequence_logps(model, batch, "cpu")
    torch.testing.assert_close(switched_off.total, copy_logps.total, rtol=1e-5, atol=1e-4)
    assert (policy.total - copy_logps.total).abs().max() > 1e-2
    torch.testing.assert_close(after.total, policy.total)  # the adapters are back on


def test_reference_is_a_frozen_copy_when_the_base_trains(smollm2_dir):
    model, _ = lorafit.load_model(smollm2_dir, dtype="float32", device="cpu")
    lorafit.apply_lora(model, r=8, alpha=16, modules_to_save=["lm_head"])  # trains a base weight in place
    reference = ReferenceModel(model)
    assert not reference.by_disabling_adapters and "frozen copy" in reference.describe()
    with reference.active() as reference_model:
        assert reference_model is reference.frozen_copy
        assert not any(p.requires_grad for p in reference_model.parameters())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    from tiny_models import tiny_model_directory

    return tiny_model_directory(tmp_path_factory.mktemp("tiny"), smollm2_dir, "qwen2")


def test_dpo_recipe_runs_and_logs_the_metrics(tiny_dir, tmp_path):
    from lorafit.recipes import train
    from test_sft import config_for

    def run(config):
        return train(config, log=lambda *_: None, progress=False)

    data = tmp_path / "pairs.json"
    rows = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"bad {i}"} for i in range(12)]
    data.write_text(json.dumps(rows))
    overrides = ["train.recipe=dpo", f"data.path={data}", "train.max_steps=3", "train.batch_size=2",
                 "train.grad_accum=2", "data.eval_fraction=0.25", "train.lr=1e-3", "dpo.precompute_reference=true"]
    result = run(config_for(tiny_dir, tmp_path / "dpo", *overrides))
    assert result.steps == 3 and len(result.losses) == 3
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy"} <= set(rows[0])
    assert any("eval_rewards/accuracy" in r for r in rows)
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-3)  # policy = reference at the start
    assert (tmp_path / "dpo" / "adapter" / "adapter_config.json").is_file()


def test_example_config_runs_in_tiny_form(tiny_dir, tmp_path):
    from pathlib import Path

    from lorafit import Config
    from lorafit.recipes import train

    root = Path(__file__).parent.parent
    config = Config.from_yaml(root / "configs" / "dpo-lora.yaml", [
        f"model.source={tiny_dir}", "model.max_seq_length=128", "train.max_steps=2",
        f"train.output_dir={tmp_path / 'dpo'}", f"data.path={root / 'data' / 'dpo_en_demo.json'}"])
    result = train(config, log=lambda *_: None, progress=False)
    assert result.steps == 2 and all(math.isfinite(x) for x in result.losses) and result.eval_loss is not None


def test_long_prompts_keep_their_end_and_answers_fill_the_rest(tmp_path, smollm2):
    _, tokenizer = smollm2
    path = tmp_path / "long.json"
    path.write_text(json.dumps([{"prompt": "word " * 300 + "FINAL QUESTION?", "chosen": "yes " * 200, "rejected": "no"}]))
    data = load_preference_dataset(path, tokenizer, max_seq_length=64)
    pair = data.train[0]
    assert len(pair.prompt) == 32 and "FINAL QUESTION" in tokenizer.decode(pair.prompt)
    assert len(pair.prompt) + len(pair.chosen) == 64 and data.truncated == {"prompts": 1, "answers": 1}


def test_dpo_trains_the_tiny_real_model(tmp_path):
    """stories260K (a real 260K-parameter Llama, no chat template: lorafit's fallback renders the pairs)
    learns to prefer the chosen answers of its own training pairs within a few steps."""
    import warnings
    from pathlib import Path

    from lorafit import Config
    from lorafit.recipes import train

    stories = Path(__file__).parent / "assets" / "stories260K-v1.gguf"
    data = tmp_path / "pairs.json"
    rows = [{"prompt": f"Tell me about the {animal}.", "chosen": f"The {animal} was happy and played all day.",
             "rejected": f"The {animal} was sad."} for animal in ("cat", "dog", "bird", "fish", "frog", "bear")]
    data.write_text(json.dumps(rows))
    model = {"source": str(stories), "dtype": "float32", "max_seq_length": 64}
    config = Config.from_dict({"model": model}).with_overrides([
        "train.recipe=dpo", f"data.path={data}", "train.max_steps=6", "train.batch_size=2", "train.grad_accum=1",
        "train.lr=5e-3", f"train.output_dir={tmp_path / 'dpo'}", "train.save_every=0"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback chat template's warning
        result = train(config, log=lambda *_: None, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-4)  # the policy starts as the reference
    assert result.losses[-1] < result.losses[0] and rows[-1]["rewards/margins"] > 0
