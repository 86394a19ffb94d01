"""Data parallelism on the CPU: 2 processes under torchrun with the gloo backend, on the tiny Qwen2 model.

Tolerances: the 2-rank runs sum the same float32 numbers in another order than one process does (per rank,
then across ranks), so losses agree to rel 1e-6 and adapter weights to 1e-5 absolute, 1% of one step at
lr 1e-3. AdamW divides each gradient by its own running scale, so an element whose gradient is near zero
takes a step whose size the summation order decides: measured 1.7e-7 at most on an AMD EPYC, but 1.4e-6 and
2.0e-6 on one element in 1,152 and 1,600 (QLoRA, DPO) on an Intel Xeon, on weights of about 0.12.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafit import Config
from lorafit.config import TrainSection
from lorafit.data import load_sft_dataset
from lorafit.recipes import train
from lorafit.training.distributed import Distributed
from lorafit.training.loop import windows
from lorafit.training.metrics import read_metrics
from tiny_models import tiny_model_directory

ROOT = Path(__file__).parent.parent
WORKER = Path(__file__).parent / "distributed_worker.py"
# 9 steps of 8 examples cross the end of the first epoch of the 58 identity examples: its last window holds
# 2 examples, one micro-batch, so the second rank runs a stand-in there ("padding").
STEPS = 9
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    return tiny_model_directory(tmp_path_factory.mktemp("tiny"), smollm2_dir, "qwen2")


def config_for(tiny_dir, output_dir, *overrides):
    return Config.from_dict({"model": {"source": str(tiny_dir), "max_seq_length": 128}}).with_overrides(
        [f"train.output_dir={output_dir}", "train.lr=1.0e-3", f"train.max_steps={STEPS}", "train.save_every=0",
         *overrides])


def torchrun(config, tmp_path, *args, module=None) -> str:
    """Runs 2 ranks of tests/distributed_worker.py (or `-m lorafit train`) on `config`; returns stdout."""
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    path.write_text(config.to_yaml())
    target = ["-m", "lorafit", "train", str(path), "--no-progress"] if module else [str(WORKER), str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          *target, *args], capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return run.stdout


def losses(output_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(Path(output_dir) / "metrics.jsonl") if "loss" in r]


def adapter(output_dir) -> dict:
    return load_file(Path(output_dir) / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def one_process(tiny_dir, tmp_path_factory):
    """The reference: one process, micro-batch 2 x accumulation 4 = 8 examples a step."""
    out = tmp_path_factory.mktemp("single") / "run"
    train(config_for(tiny_dir, out, "train.batch_size=2", "train.grad_accum=4"), log=lambda *_: None, progress=False)
    return out


def test_rank_windows_hold_the_examples_of_one_process_windows(smollm2_dir):
    """Window w of ranks 0 and 1 (2 x 2 each) together = window w of one process with 2 x 4; the epoch's last
    micro-batch goes to rank 0 and rank 1 gets a stand-in marked padding. No process group is needed."""
    from lorafit.models.loading import load_model

    _, tokenizer = load_model(smollm2_dir, device="cpu")
    rows = [{"text": f"example {i} " * (1 + i % 5)} for i in range(10)]  # 10 rows: 5 micro-batches of 2
    data = load_sft_dataset(rows, tokenizer, 64)
    t, one = TrainSection(batch_size=2, grad_accum=2), TrainSection(batch_size=2, grad_accum=4)

    def examples(micro):
        return sorted(tuple(r[r != data.pad_id].tolist()) for b in micro if not b.get("padding")
                      for r in b["input_ids"])

    single = [(e, w, examples(m)) for (e, w, m), _ in zip(windows(data, one, 0, 0), range(4))]
    ranks = [[(e, w, m) for (e, w, m), _ in zip(windows(data, t, 0, 0, Distributed(r, 2)), range(4))] for r in (0, 1)]
    for (e, w, expected), (e0, w0, m0), (e1, w1, m1) in zip(single, *ranks, strict=True):
        assert (e0, w0) == (e1, w1) == (e, w) and len(m0) == len(m1)
        assert sorted(examples(m0) + examples(m1)) == expected
    assert [len(m) for _, _, m in ranks[1]] == [2, 1, 2, 1] and ranks[1][1][2][0].get("padding")
    assert ranks[1][3][2][0].get("padding") and not ranks[0][1][2][0].get("padding")
    # Resuming at window 1 gives the same micro-batches as running through it.
    again = next(windows(data, t, 0, 1, Distributed(1, 2)))
    assert again[:2] == (0, 1) and torch.equal(again[2][0]["input_ids"], ranks[1][1][2][0]["input_ids"])


@pytest.fixture(scope="module")
def fsdp_run(tiny_dir, tmp_path_factory):
    """2 ranks with FSDP2 through the test worker, which audits the file writes: (output dir, stdout)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    config = config_for(tiny_dir, tmp / "run", "train.batch_size=2", "train.grad_accum=2", "train.distributed=fsdp")
    return tmp / "run", torchrun(config, tmp, "--audit")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_give_the_losses_and_adapter_of_one_process(strategy, tiny_dir, one_process, fsdp_run, tmp_path):
    """2 ranks x micro-batch 2 x accumulation 2 = one process's 2 x 4: the same examples in the same steps,
    the same loss normalisation (label tokens summed over ranks), the same updates. DDP runs through the
    CLI (`lorafit train --nproc 2`); FSDP2 through the test worker, which also audits the file writes."""
    out = tmp_path / strategy
    if strategy == "ddp":
        path = tmp_path / "ddp.yaml"
        path.write_text(config_for(tiny_dir, out, "train.batch_size=2", "train.grad_accum=2",
                                   "train.distributed=ddp").to_yaml())
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        run = subprocess.run([sys.executable, "-m", "lorafit", "train", str(path), "--nproc", "2", "--no-progress"],
                             capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
        assert run.returncode == 0, run.stderr[-5000:]
        assert "torch.distributed.run --standalone --nproc-per-node=2 -m lorafit train" in run.stderr
        assert run.stdout.count("saved ") == 1  # rank 0 alone prints
        assert "micro-batch x accumulation x data-parallel ranks = 2 x 2 x 2 = 8" in run.stdout
        assert "data parallel: 2 ranks, ddp" in run.stdout
    else:
        out, stdout = fsdp_run
        assert "rank 1 wrote 0: []" in stdout and "rank 0 wrote 0" not in stdout
    expected = losses(one_process)
    assert len(expected) == STEPS
    assert losses(out) == pytest.approx(expected, rel=1e-6)  # one row per step: rank 0 alone wrote them
    assert_same_adapter(adapter(one_process), adapter(out))
    assert (out / "report.md").is_file() and (out / "config.yaml").is_file()


def test_resume_under_two_ranks_gives_the_same_losses(tiny_dir, fsdp_run, tmp_path):
    """FSDP2: stopped after step 4 (optimizer state gathered whole into the checkpoint, each rank's
    generators kept) and resumed by 2 ranks, the run gives the uninterrupted run's losses and adapter."""
    straight, _ = fsdp_run
    stopped = config_for(tiny_dir, tmp_path / "stopped", "train.batch_size=2", "train.grad_accum=2",
                         "train.distributed=fsdp")
    torchrun(stopped, tmp_path, "--stop-at-step", "4")
    rng = torch.load(tmp_path / "stopped" / "checkpoints" / "step-000004" / "rng.pt", weights_only=True)
    assert len(rng["ranks"]) == 2 and not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])
    torchrun(stopped, tmp_path, "--resume")
    assert losses(tmp_path / "stopped") == pytest.approx(losses(straight), rel=1e-6)
    assert_same_adapter(adapter(straight), adapter(tmp_path / "stopped"))
    # A checkpoint of 2 ranks is not resumed by another number of processes (data position, generators).
    with pytest.raises(Exception, match="written by a run of 2 process"):
        train(stopped, resume=True, log=lambda *_: None, progress=False)


def test_full_finetuning_under_fsdp_equals_one_process(tiny_dir, tmp_path):
    """Every weight sharded and trained (what FSDP2 is for: 8B does not fit one card): the model rank 0
    gathers and saves equals one process's."""
    common = ("finetune.method=full", "train.max_steps=3", "train.batch_size=2")
    single = train(config_for(tiny_dir, tmp_path / "one", *common, "train.grad_accum=4"), log=lambda *_: None,
                   progress=False)
    torchrun(config_for(tiny_dir, tmp_path / "two", *common, "train.grad_accum=2", "train.distributed=fsdp"),
             tmp_path)
    assert losses(tmp_path / "two") == pytest.approx(single.losses, rel=1e-6)
    a, b = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("one", "two"))
    assert_same_adapter(a, b)  # the whole model's weights, the same way


@pytest.fixture(scope="module")
def qlora_one_process(tiny_dir, tmp_path_factory):
    """The QLoRA reference: one process, 2 x 4, on the 4-bit base that every rank quantises identically."""
    out = tmp_path_factory.mktemp("qlora-single") / "run"
    train(config_for(tiny_dir, out, "finetune.method=qlora", "train.batch_size=2", "train.grad_accum=4"),
          log=lambda *_: None, progress=False)
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_qlora_under_two_ranks_equals_one_process_and_fsdp_shards_the_4_bit_base(strategy, tiny_dir,
                                                                                   qlora_one_process, tmp_path):
    """QLoRA, 2 ranks x 2 x 2 against one process's 2 x 4: the same losses and adapter. FSDP2 shards the NF4
    codes and scales (frozen parameters, nn/nf4.py): after training each rank holds half of their bytes, off
    by at most 2 bytes a tensor (an odd length puts the extra element on rank 0: half a float32 at most; a
    4-byte offset, a buffer, stays whole on both). The FSDP2 run stops after step 4 and resumes from its
    checkpoint. DDP: every rank holds the whole base, its uint8 parameters broadcast once, never bucketed."""
    out = tmp_path / strategy
    config = config_for(tiny_dir, out, "finetune.method=qlora", "train.batch_size=2", "train.grad_accum=2",
                        f"train.distributed={strategy}")
    if strategy == "fsdp":
        torchrun(config, tmp_path, "--stop-at-step", "4")
    stdout = torchrun(config, tmp_path, "--nf4-bytes", *(["--resume"] if strategy == "fsdp" else []))
    held = re.findall(r"rank (\d) holds (\d+) of (\d+) NF4 bytes in (\d+) tensors", stdout)
    assert sorted(rank for rank, *_ in held) == ["0", "1"], stdout
    for _, local, whole, tensors in held:
        local, whole, tensors = int(local), int(whole), int(tensors)
        assert tensors == 2 * 7 * 4 and whole > 30_000  # 2 layers x 7 projections x 4; 71 k weights in 36.6 kB
        if strategy == "fsdp":
            assert abs(local - whole / 2) <= 2 * tensors, (local, whole)
        else:
            assert local == whole
    assert losses(out) == pytest.approx(losses(qlora_one_process), rel=1e-6)
    assert_same_adapter(adapter(qlora_one_process), adapter(out))


def _qlora_logits_in_one_fsdp_process(tiny_dir, dtype: str, dist_device, inspect=None):
    """(logits of a tiny QLoRA model, the same model's logits wrapped by FSDP2 in a one-process gloo group,
    the wrapped model); inspect(model) runs on the wrapped model before its forward."""
    import torch.distributed as dist

    from lorafit.lora import apply_lora
    from lorafit.models.loading import load_model
    from lorafit.training.distributed import wrap_model

    def qlora_model():
        model, _ = load_model(tiny_dir, dtype=dtype, quantize="nf4", device="cpu")
        return apply_lora(model, verbose=False)

    x = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        expected = qlora_model()(x).logits
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = wrap_model(qlora_model(), "fsdp", Distributed(device=dist_device), getattr(torch, dtype))
        if inspect is not None:
            inspect(model)
        with torch.no_grad():
            logits = model(x).logits
    finally:
        dist.destroy_process_group()
    return expected, logits, model


def test_fsdp_gathers_4_bit_layers_in_their_own_dtypes(tiny_dir):
    """On GPUs FSDP2 gathers weights in the compute dtype (bf16), which would round the float32 NF4 scales
    too (measured: logits 0.008 off on this model): wrap_model gives layers holding NF4 weights a policy
    that keeps dtypes. Checked on the CPU in one gloo process with the policies a bf16 GPU job gets."""
    gathered = {}

    def watch(model):
        q_proj = model.model.layers[0].self_attn.q_proj  # the LoRA layer: its base is read, not called
        q_proj.register_forward_pre_hook(lambda m, _: gathered.update(scales=m.base_layer.nested_scales.dtype))

    expected, logits, _ = _qlora_logits_in_one_fsdp_process(tiny_dir, "bfloat16", torch.device("cuda", 0), watch)
    assert gathered == {"scales": torch.float32}
    assert torch.equal(logits, expected)


def test_a_torch_that_cannot_shard_uint8_keeps_the_4_bit_state_whole(tiny_dir, monkeypatch):
    """torch before 2.13 (the H200 machine's 2.11) cannot shard a uint8 parameter: the NF4 state then stays
    whole on every rank, outside FSDP2, and the rest is sharded; the numbers are the same."""
    from torch.distributed.tensor import DTensor

    import lorafit.training.distributed as distributed

    monkeypatch.setattr(distributed, "fsdp_shards_integer_parameters", lambda: False)
    expected, logits, model = _qlora_logits_in_one_fsdp_process(tiny_dir, "float32", None)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert not isinstance(q_proj.base_layer.weight, DTensor) and isinstance(q_proj.lora_A.weight, DTensor)
    assert torch.equal(logits, expected)


def test_dpo_under_two_ranks_equals_one_process(tiny_dir, tmp_path):
    """DDP; the loss is the mean over the window's pairs of both ranks; 10 pairs (5 micro-batches) make the
    second rank run a stand-in in the epoch's last window."""
    data = tmp_path / "pairs.json"
    rows = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"bad {i}"} for i in range(10)]
    data.write_text(json.dumps(rows))
    common = ("train.recipe=dpo", f"data.path={data}", "train.max_steps=4", "train.lr=1e-3", "train.batch_size=2")
    single = train(config_for(tiny_dir, tmp_path / "one", *common, "train.grad_accum=2"), log=lambda *_: None,
                   progress=False)
    torchrun(config_for(tiny_dir, tmp_path / "two", *common, "train.grad_accum=1", "train.distributed=ddp"),
             tmp_path)
    assert losses(tmp_path / "two") == pytest.approx(single.losses, rel=1e-6)
    rows = [r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if "loss" in r]
    one = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "loss" in r]
    assert [r["rewards/accuracy"] for r in rows] == pytest.approx([r["rewards/accuracy"] for r in one])
    assert_same_adapter(adapter(tmp_path / "one"), adapter(tmp_path / "two"))


def test_grpo_under_two_ranks_trains(tmp_path):
    """FSDP2 on the tiny real stories260K model: each rank samples the completions of its own prompts (whole
    groups) with every weight gathered, the token normalisation counts both ranks' tokens. Sampling differs
    from one process (each rank has its own generator), so only the run's soundness is checked here."""
    from test_grpo import grpo_config

    config = grpo_config(tmp_path, "grpo", "train.max_steps=2", "train.distributed=fsdp", "train.grad_accum=2",
                         "data.eval_fraction=0.1")
    stdout = torchrun(config, tmp_path)
    rows = read_metrics(tmp_path / "grpo" / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in train_rows)
    assert [r["step"] for r in rows if "eval_reward" in r] == [0, 2]
    assert "rank 0: 2 steps" in stdout and "rank 1: 2 steps" in stdout
    assert (tmp_path / "grpo" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_bad_strategy_is_a_config_error():
    with pytest.raises(Exception, match="train.distributed must be one of auto, ddp, fsdp"):
        Config().with_overrides(["train.distributed=zero3"])
