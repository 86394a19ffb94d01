"""LoRA / rsLoRA / DoRA: PEFT-format round trips with the real PEFT library, merging, freezing, errors."""

import json

import pytest
import torch

import lorafit
from lorafit.lora import LoRALinear, count_parameters, set_adapters_enabled
from test_models import native_copy
from tiny_models import tiny_hf_model

peft = pytest.importorskip("peft")

VARIANTS = {"lora": {}, "rslora": {"rslora": True}, "dora": {"dora": True}}
IDS = torch.randint(0, 101, (2, 19), generator=torch.Generator().manual_seed(5))


def randomize_adapters(model, seed=0):
    """Non-zero A, B and magnitudes: a fresh adapter is a no-op and would prove nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.1)
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
                if m.lora_magnitude_vector is not None:
                    m.lora_magnitude_vector.mul_(1 + 0.1 * torch.rand(m.lora_magnitude_vector.shape, generator=g))


def relative_error(a, b) -> float:
    """|a - b| / |b| over the whole tensor: after 30 fp32 layers, logits of size ~15 differ by float order
    in the 4th decimal (seen: 2e-4 max abs), which the relative measure puts at ~1e-6."""
    return ((a - b).norm() / b.norm()).item()


def peft_config(variant, **kw):
    opts = VARIANTS[variant]
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=opts.get("rslora", False),
                           use_dora=opts.get("dora", False), init_lora_weights=False, task_type="CAUSAL_LM", **kw)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lorafit_adapter_loads_in_peft(family, variant, tmp_path):
    ours = lorafit.apply_lora(native_copy(tiny_hf_model(family)), r=4, alpha=8, verbose=False, **VARIANTS[variant])
    randomize_adapters(ours)
    lorafit.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_hf_model(family), tmp_path).eval()
    with torch.no_grad():
        assert (ours(IDS).logits - theirs(IDS).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_peft_adapter_loads_in_lorafit(family, variant, tmp_path):
    theirs = peft.get_peft_model(tiny_hf_model(family), peft_config(variant)).eval()
    theirs.save_pretrained(tmp_path)
    ours = lorafit.load_adapter(native_copy(tiny_hf_model(family)), tmp_path, verbose=False)
    with torch.no_grad():
        assert (ours(IDS).logits - theirs(IDS).logits).abs().max() <= 1e-5


def test_modules_to_save_round_trip(tmp_path):
    family = "llama-untied-headdim32"
    ours = lorafit.apply_lora(native_copy(tiny_hf_model(family)), r=4, targets=["q_proj", "v_proj"],
                              modules_to_save=["lm_head"], verbose=False)
    randomize_adapters(ours)
    with torch.no_grad():
        ours.lm_head.weight.add_(0.05)
    lorafit.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_hf_model(family), tmp_path).eval()
    with torch.no_grad():
        assert (ours(IDS).logits - theirs(IDS).logits).abs().max() <= 1e-5
    again = lorafit.load_adapter(native_copy(tiny_hf_model(family)), tmp_path, verbose=False)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, ours(IDS).logits)


@pytest.mark.parametrize("targets,peft_targets", [("all-linear", "all-linear"),
                                                  ("attention", ["q_proj", "k_proj", "v_proj", "o_proj"]),
                                                  ("mlp", ["gate_proj", "up_proj", "down_proj"])])
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_trainable_parameter_counts_equal_peft(targets, peft_targets, variant):
    ours = lorafit.apply_lora(native_copy(tiny_hf_model("qwen3")), r=8, targets=targets, verbose=False,
                              **VARIANTS[variant])
    config = peft.LoraConfig(r=8, target_modules=peft_targets, use_dora=variant == "dora")
    theirs = peft.get_peft_model(tiny_hf_model("qwen3"), config)
    assert count_parameters(ours) == tuple(theirs.get_nb_trainable_parameters())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_real_smollm2_round_trip_both_ways(smollm2_dir, variant, tmp_path):
    import transformers

    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(0))
    ours, _ = lorafit.load_model(smollm2_dir, dtype="float32", device="cpu")
    lorafit.apply_lora(ours, r=4, alpha=8, verbose=False, **VARIANTS[variant])
    randomize_adapters(ours)
    lorafit.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(smollm2_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    with torch.no_grad():
        assert relative_error(ours(ids).logits, theirs(ids).logits) <= 1e-5

    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    theirs = peft.get_peft_model(hf, peft_config(variant)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours, _ = lorafit.load_model(smollm2_dir, dtype="float32", device="cpu")
    lorafit.load_adapter(ours, tmp_path / "peft", verbose=False)
    with torch.no_grad():
        assert relative_error(ours(ids).logits, theirs(ids).logits) <= 1e-5


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_merged_model_equals_adapter_model(variant):
    model = lorafit.apply_lora(native_copy(tiny_hf_model("qwen2")), r=4, alpha=8, verbose=False, **VARIANTS[variant])
    randomize_adapters(model)
    with torch.no_grad():
        before = model(IDS).logits
        lorafit.merge_lora(model)
        after = model(IDS).logits
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (after - before).abs().max() <= 1e-5


def test_only_adapters_train_and_receive_gradients():
    model = lorafit.apply_lora(native_copy(tiny_hf_model("llama")), r=4, verbose=False)
    randomize_adapters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B on 7 projections in 2 layers
    model(IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_disabled_adapters_give_the_base_model():
    base = native_copy(tiny_hf_model("qwen3"))
    with torch.no_grad():
        expected = base(IDS).logits
    model = lorafit.apply_lora(base, r=4, dora=True, verbose=False)
    randomize_adapters(model)
    set_adapters_enabled(model, False)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, expected)
    set_adapters_enabled(model, True)
    with torch.no_grad():
        assert not torch.allclose(model(IDS).logits, expected)


def test_summary_line_and_alpha_default(capsys):
    model = lorafit.apply_lora(native_copy(tiny_hf_model("llama")), r=4)
    assert model.lora_config.alpha == 4 and model.lora_config.scaling == 1.0
    assert capsys.readouterr().out.startswith("trainable parameters: ")
    assert lorafit.apply_lora(native_copy(tiny_hf_model("llama")), r=4, alpha=8, rslora=True,
                              verbose=False).lora_config.scaling == 4.0  # alpha / sqrt(r)


def test_full_finetuning_trains_everything():
    model = lorafit.prepare_for_finetuning(native_copy(tiny_hf_model("llama")), "full", verbose=False)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="takes no LoRA options"):
        lorafit.prepare_for_finetuning(native_copy(tiny_hf_model("llama")), "full", r=8)
    with pytest.raises(ValueError, match="needs a 4-bit base"):
        lorafit.prepare_for_finetuning(native_copy(tiny_hf_model("llama")), "qlora")
    with pytest.raises(ValueError, match="supported: lora, qlora, full"):
        lorafit.prepare_for_finetuning(native_copy(tiny_hf_model("llama")), "adalora")


@pytest.mark.parametrize("kwargs,message", [
    ({"r": 0}, "r must be a positive integer"),
    ({"r": 8, "alpha": 0}, "alpha must be > 0"),
    ({"dropout": 1.0}, "dropout must be in \\[0, 1\\)"),
    ({"targets": ["qkv_proj"]}, "matches no linear layer \\(the model has: down_proj, gate_proj, k_proj, o_proj, "
                                "q_proj, up_proj, v_proj\\)"),
    ({"targets": "everything"}, "not a group"),
    ({"modules_to_save": ["norm"]}, "modules_to_save: 'norm' is not supported"),
])
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lorafit.apply_lora(native_copy(tiny_hf_model("llama")), verbose=False, **kwargs)


def test_adapter_for_another_model_is_refused(tmp_path):
    small = lorafit.apply_lora(native_copy(tiny_hf_model("llama")), r=4, verbose=False)
    lorafit.save_adapter(small, tmp_path)
    other = native_copy(tiny_hf_model("llama-untied-headdim32"))  # head_dim 32 there, 24 here
    with torch.no_grad():
        before = other(IDS).logits
    with pytest.raises(lorafit.LoadError, match="k_proj.lora_B.weight has shape \\(24, 4\\), the model needs \\(32, 4\\)"):
        lorafit.load_adapter(other, tmp_path, verbose=False)
    # Nothing is left behind: no adapters, the same trainable flags, the same outputs.
    assert other.lora_config is None and not any(isinstance(m, LoRALinear) for m in other.modules())
    assert all(p.requires_grad for p in other.parameters())
    with torch.no_grad():
        assert torch.equal(other(IDS).logits, before)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(lorafit.LoadError, match="peft_type 'IA3' is not supported"):
        lorafit.load_adapter(native_copy(tiny_hf_model("llama")), tmp_path, verbose=False)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_float32_adapters_on_a_bfloat16_base_run_without_autocast(variant):
    """After training, adapters are float32 over a bf16 base; generation runs without autocast."""
    model = native_copy(tiny_hf_model("llama")).to(torch.bfloat16)
    lorafit.apply_lora(model, r=4, verbose=False, **VARIANTS[variant])
    randomize_adapters(model)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    with torch.no_grad():
        logits = model(IDS).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_a_float32_model_trains_under_bfloat16_autocast():
    """The one-function LoRA path computes in x's dtype; under autocast to another dtype the layers take the
    composed path, which autocast casts op by op (it failed with a dtype mismatch before)."""
    model = native_copy(tiny_hf_model("llama"))
    lorafit.apply_lora(model, r=4, verbose=False)
    randomize_adapters(model)
    reference = model(IDS, labels=IDS).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(IDS, labels=IDS).loss
    loss.backward()
    assert abs(loss.item() - reference.item()) <= 0.02 * reference.item()  # bf16 rounding only
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
