"""`lorafit estimate`: the breakdown, the verdict against a card, what fits, and the time, with no weights."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from lorafit.cli import main
from lorafit.config import Config
from lorafit.estimate import build_meta_model, largest_fitting, model_flops_per_token
from test_memory import LLAMA_3_1_8B


@pytest.fixture(scope="module")
def anchor_config(tmp_path_factory):
    """The anchor workload's config on Llama-3.1-8B's architecture: a config.json and nothing else."""
    root = tmp_path_factory.mktemp("estimate")
    model = root / "llama-3.1-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 128256,
                                                   "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                                                   "max_position_embeddings": 131072, **LLAMA_3_1_8B}))
    config = root / "anchor.yaml"
    config.write_text(f"model:\n  source: {model}\n  max_seq_length: 2048\n"
                      "train:\n  batch_size: 2\n  grad_accum: 8\n  max_steps: 100\n")
    return config


def test_at_unsloths_memory_mode_budget_every_layer_is_offloaded(anchor_config, capsys):
    assert main(["estimate", str(anchor_config), "--memory", "16.71"]) == 0
    out = capsys.readouterr().out
    assert "peak memory  16.62 GiB = weights 15.11" in out  # H200: 16.49-16.70 GiB measured with AdamW
    assert "0 of 32 layers keep their activations, 32 offloaded" in out and "fits in 16.7 GiB" in out
    assert "micro-batch up to 2 at 2048 tokens" in out and "host memory  1.00 GiB" in out


def test_on_an_h200_nothing_is_offloaded_and_the_time_is_given(anchor_config, capsys):
    assert main(["estimate", str(anchor_config), "--gpu", "H200"]) == 0
    out = capsys.readouterr().out
    assert "peak memory  29.75 GiB" in out and "32 of 32 layers keep their activations" in out  # 29.64 measured
    assert "about 1.92 s per optimizer step" in out and "100 steps" in out  # 1.99 s measured (16,454 tok/s)


def test_a_memory_budget_in_the_config_is_what_the_card_offers(anchor_config, capsys):
    # As training plans (memory.device_budget_bytes): train.memory_budget_gib, not the card's memory; --memory
    # still says what is available when given.
    assert main(["estimate", str(anchor_config), "train.memory_budget_gib=16.71", "--gpu", "H200"]) == 0
    out = capsys.readouterr().out
    assert "card:   H200 within train.memory_budget_gib, 16.7 GiB usable" in out
    assert "0 of 32 layers keep their activations, 32 offloaded" in out and "about " in out
    assert main(["estimate", str(anchor_config), "train.memory_budget_gib=16.71", "--memory", "40"]) == 0
    assert "32 of 32 layers keep their activations" in capsys.readouterr().out


def test_what_does_not_fit_says_what_to_change(anchor_config, capsys):
    assert main(["estimate", str(anchor_config), "train.activation_checkpointing=none", "--memory", "20"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit in 20.0 GiB" in out and "to fit: lower train.batch_size" in out
    assert main(["estimate", str(anchor_config), "--gpu", "B300"]) == 1
    assert "unknown --gpu 'B300'; known: H200, H100" in capsys.readouterr().err


def test_qlora_counts_4_bit_weights_and_the_longest_context(anchor_config, capsys):
    assert main(["estimate", str(anchor_config), "finetune.method=qlora", "--gpu", "L4"]) == 0
    out = capsys.readouterr().out
    assert "weights 5.47" in out and "workspace 0.54" in out and "fits in 20.9 GiB" in out
    # An H200 capped at 20.0 GiB trained 110,592 tokens and not 114,688 (device call 19).
    assert "at micro-batch 1, up to 121,700 tokens" in out


def test_flops_per_token_are_the_anchor_benchmarks(anchor_config):
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from gpu_anchor import model_flops_per_token as anchor_count

    hf = json.loads((anchor_config.parent / "llama-3.1-8b" / "config.json").read_text())
    model = build_meta_model(Config.from_yaml(anchor_config), hf)
    assert model_flops_per_token(model, 2048) == anchor_count(hf, 16, 2048)


def test_largest_fitting_doubles_then_bisects():
    assert largest_fitting(lambda n: n <= 37, 2, 4096) == 37
    assert largest_fitting(lambda n: n <= 5000, 2, 4096) == 4096
    assert largest_fitting(lambda n: False, 2, 4096) == 0


def test_an_offloaded_layer_recomputes_its_mlp_without_the_down_projection(anchor_config):
    """An offloaded layer's recomputation skips the fused LoRA MLP's down projection (nn/recomputation.py); a
    layer recomputed by torch.utils.checkpoint runs it: the 8B's micro-batch differs by its forward's FLOPs
    (2 a weight value of down and its adapter, 4096 tokens), at the checkpointed modes' shared efficiency."""
    from lorafit.estimate import DEVICES, GPU_MFU, micro_batch_seconds
    from lorafit.models.llama import MLP

    hf = json.loads((anchor_config.parent / "llama-3.1-8b" / "config.json").read_text())
    model = build_meta_model(Config.from_yaml(anchor_config), hf)
    h200 = DEVICES["H200"]
    seconds = {mode: micro_batch_seconds(model, 4096, 2048, [mode] * 32, "lora", h200) for mode in ("layers", "offload")}
    down_values = sum(m.weight.numel() for mlp in model.modules() if isinstance(mlp, MLP)
                      for m in mlp.down_proj.modules() if isinstance(m, torch.nn.Linear))
    assert GPU_MFU["layers"] == GPU_MFU["offload"]
    skipped = 4096 * 2 * down_values / (h200.tflops * 1e12 * GPU_MFU["offload"])
    assert seconds["layers"] - seconds["offload"] == pytest.approx(skipped, rel=1e-9)
    assert skipped == pytest.approx(0.045, abs=0.001)  # of 0.34 s: 13%


def test_a_small_model_is_bound_by_the_host_launching_its_kernels():
    """Llama-3.2-1B at 2 x 2048 tokens: 41 ms of GPU work, 73 ms of launches (measured 64.6-78.9 ms on the
    H200's hosts); at 1 x 4096 the GPU's work halves and the launches stay."""
    from lorafit import Config
    from lorafit.estimate import DEVICES, build_meta_model, micro_batch_seconds

    hf = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
          "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
          "tie_word_embeddings": True, "rope_theta": 500000.0, "rms_norm_eps": 1e-5}
    config = Config.from_dict({"model": {"dtype": "bfloat16"}, "finetune": {"r": 16, "alpha": 16}})
    model = build_meta_model(config, hf)
    layers = ["none"] * 16
    for tokens, seq in ((4096, 2048), (4096, 4096)):
        assert micro_batch_seconds(model, tokens, seq, layers, "lora", DEVICES["H200"]) == pytest.approx(0.0734, abs=1e-4)
    assert micro_batch_seconds(model, 4096, 2048, layers, "lora", DEVICES["L4"]) > 0.2  # a slow card: GPU-bound


def test_the_time_follows_the_datas_lengths(anchor_config, smollm2_dir, tmp_path, capsys):
    """With a tokenizer beside the config, the SFT rows are made as training makes them: the bundled identity
    chats (about 100 tokens each) pad micro-batches far below max_seq_length, and the 8B's step shrinks from
    its GPU's time at full length to the host's launch time (32 layers x 4.59 ms x 8 micro-batches)."""
    import shutil

    model = tmp_path / "llama-3.1-8b"
    shutil.copytree(anchor_config.parent / "llama-3.1-8b", model)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, model / name)
    assert main(["estimate", str(anchor_config), f"model.source={model}", "--gpu", "H200"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("time"))
    at_data, at_full = (float(x) for x in re.findall(r"([\d.]+) s (?:per optimizer step|at full length)", line))
    assert "at the data's lengths" in line and at_data == pytest.approx(1.18, abs=0.01) and at_full == 1.92, line


def test_replaying_from_a_cuda_graph_is_chosen_where_the_host_is_the_slower_clock():
    """At Unsloth's peaks in speed mode (H200, device calls 23-24): Llama-3.2-1B replays (80-83K tokens/s
    against 41-63K eager, measured) with two layers recomputed to leave room for the graph's pool;
    Llama-3.1-8B, GPU-bound, trains eagerly and recomputes nothing. In memory mode the 1B replays too, every
    layer offloaded inside the graph and the MLPs tiled to leave room for the pool."""
    from lorafit.estimate import DEVICES, plan_training, replay_pays
    from lorafit.memory import GiB, mlp_tile_chunk
    from test_memory import _meta_lora_model

    one_b = _meta_lora_model({"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                              "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                              "tie_word_embeddings": True})
    eight_b = _meta_lora_model(LLAMA_3_1_8B)
    h200 = DEVICES["H200"]

    def auto(model, budget_gib, replayable):  # train.activation_checkpointing: auto, LoRA at 2 x 2048
        return plan_training(model, 4096, 2048, "auto", int(budget_gib * GiB), "lora", lambda _: replayable, h200)

    assert auto(one_b, 6.77, True) == (["layers"] * 2 + ["none"] * 14, True)
    assert auto(one_b, 6.77, False) == (["none"] * 16, False)
    untiled = one_b.mlp_tiling
    assert auto(one_b, 3.12, True) == (["offload"] * 16, True)  # and the MLPs tiled to fit beside the pool
    assert mlp_tile_chunk(one_b, 4096) == 2048
    one_b.mlp_tiling = untiled
    assert auto(one_b, 3.12, False) == (["offload"] * 16, False)
    assert one_b.mlp_tiling == untiled
    assert auto(eight_b, 30.81, True) == (["none"] * 32, False)
    # With the checkpointing fixed (train.activation_checkpointing: none), the same clocks decide; a fixed mode
    # stays as asked, with a budget or without one.
    no_checkpointing = lambda modes: "layers" not in modes and "offload" not in modes  # noqa: E731  (with dropout)
    assert plan_training(one_b, 4096, 2048, "offload", None, "lora", no_checkpointing, h200) == (["offload"] * 16, False)
    assert plan_training(one_b, 4096, 2048, "offload", None, "lora", lambda _: True, h200) == (["offload"] * 16, True)
    assert plan_training(one_b, 4096, 2048, "none", None, "lora", no_checkpointing, h200) == (["none"] * 16, True)
    assert replay_pays(one_b, 4096, 2048, ["none"] * 16, "qlora", h200)
    assert not replay_pays(eight_b, 4096, 2048, ["none"] * 32, "lora", h200)
