"""On a GPU, the fused kernels keep the SFT recipe's per-step losses within bf16 noise of the plain PyTorch
path: a 30-step LoRA run of stories260K (a real 260K-parameter Llama; the default SmolLM2 model's 98 MB file
cannot be sent to the GPU machine, whose uploads are capped at 64 MiB)."""

import json
import warnings
from pathlib import Path

import pytest

from lorafit import Config
from lorafit.models.llama import CausalLM
from lorafit.recipes import train

STORIES = Path(__file__).parent / "assets" / "stories260K-v1.gguf"


def _losses(tmp_path, name, dtype, disabled, method="lora"):
    data = tmp_path / "stories.json"
    animals = ("cat", "dog", "bird", "fish", "frog", "bear", "duck", "cow")
    places = ("park", "garden", "house", "forest")
    rows = [{"instruction": f"Tell a story about a {a} in the {p}.",
             "output": f"Once upon a time, a little {a} went to the {p}. The {a} was happy and played all day."}
            for a in animals for p in places]
    data.write_text(json.dumps(rows))
    config = Config.from_dict({"model": {"source": str(STORIES), "dtype": dtype, "max_seq_length": 96}})
    config = config.with_overrides([
        f"data.path={data}", "train.max_steps=30", "train.batch_size=4", "train.grad_accum=2", "train.lr=2e-3",
        f"train.output_dir={tmp_path / name}", "train.save_every=0", "data.eval_fraction=0",
        f"train.disable_kernels=[{', '.join(disabled)}]", f"finetune.method={method}"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback chat template's warning
        return train(config, log=lambda *_: None, progress=False).losses


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_the_kernels_keep_30_sft_steps_within_bf16_noise(tmp_path, method):
    """Against the plain path in float32, the bf16 run with every kernel on errs at most 2x as much, step by
    step, as the bf16 run without them (DESIGN §4's rule for kernels, over a whole run). QLoRA: the same NF4
    codes in every run (quantised from the same weights), dequantised by the Triton kernel or not."""
    oracle = _losses(tmp_path, "fp32", "float32", CausalLM.KERNELS, method)
    plain = _losses(tmp_path, "plain", "bfloat16", CausalLM.KERNELS, method)
    fused = _losses(tmp_path, "fused", "bfloat16", (), method)
    err_plain = max(abs(p - o) for p, o in zip(plain, oracle))
    err_fused = max(abs(f - o) for f, o in zip(fused, oracle))
    print("step  fp32 plain   bf16 plain   bf16 kernels")
    for step, (o, p, f) in enumerate(zip(oracle, plain, fused), 1):
        print(f"{step:4d}  {o:.5f}      {p:.5f}      {f:.5f}")
    print(f"largest difference from fp32: plain bf16 {err_plain:.4g}, kernels bf16 {err_fused:.4g}")
    assert len(fused) == len(plain) == 30 and fused[-1] < fused[0]
    assert err_fused <= 2 * err_plain + 1e-3


@pytest.mark.gpu
def test_auto_micro_batch_is_estimated_then_tried_on_the_gpu(tmp_path):
    """Issue 10 on the GPU: a budget the estimate fits 4 sequences into and not 8 gives micro-batch 4, after
    one real step of 4 full-length sequences, and accumulation 4 for the guide's 16."""
    from lorafit.memory import GiB, estimate_training_memory
    from lorafit.training.loop import load_trainee

    config = Config.from_dict({"model": {"source": str(STORIES), "dtype": "bfloat16", "max_seq_length": 96}})
    model = load_trainee(config).model
    layers = ["none"] * model.config.num_layers
    four, eight = (estimate_training_memory(model, b * 96, layers).total for b in (4, 8))
    logged = []
    data = tmp_path / "stories.json"
    data.write_text(json.dumps([{"instruction": f"Story {i}.", "output": "Once upon a time."} for i in range(64)]))
    config = config.with_overrides([f"data.path={data}", "train.max_steps=2", "train.batch_size=auto",
                                    f"train.memory_budget_gib={(four + eight) / 2 / GiB}",
                                    f"train.output_dir={tmp_path / 'auto'}", "train.save_every=0"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(config, log=logged.append, progress=False)
    line = next(x for x in logged if x.startswith("micro-batch auto:"))
    print(line)
    assert line.startswith("micro-batch auto: 4 ") and "and one step tried" in line and result.steps == 2
