"""The memory estimate against peaks measured on a GPU, and the checkpointing plan chosen from a budget."""

import pytest
import torch

import lorafit
from lorafit.errors import ConfigError
from lorafit.memory import GiB, estimate_training_memory, mlp_tile_chunk, plan_checkpointing
from lorafit.models.llama import CausalLM
from lorafit.models.registry import model_config_from_hf

_LLAMA3_ROPE = {"rope_type": "llama3", "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192}
LLAMA_3_1_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                    rope_scaling={**_LLAMA3_ROPE, "factor": 8.0})


def _meta_lora_model(shape: dict, r=16) -> CausalLM:
    """The architecture on the meta device (no memory, no time), LoRA on all 7 projections, float32 adapters."""
    hf = {"model_type": "llama", "vocab_size": 128256, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
          "max_position_embeddings": 131072, **shape}
    with torch.device("meta"):
        model = CausalLM(model_config_from_hf(hf)).to(torch.bfloat16)
        for p in model.parameters():
            p.requires_grad_(False)
        lorafit.apply_lora(model, r=r, alpha=r, targets="all-linear", verbose=False)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


# Peaks of torch.cuda.max_memory_allocated measured on an H200 at the anchor workload (2 x 2048 tokens,
# LoRA r=16): benchmarks/gpu_profile.py (no optimizer) and benchmarks/gpu_anchor.py (AdamW), results.jsonl.
MEASURED_8B = [("none", False, 29.32), ("offload", False, 16.22), ("none", True, 29.64), ("offload", True, 16.49),
               ("layers", True, 17.40)]


@pytest.mark.parametrize("mode, adam, measured_gib", MEASURED_8B)
def test_the_8b_estimate_is_within_3_percent_of_the_measured_peak(mode, adam, measured_gib):
    model = _meta_lora_model(LLAMA_3_1_8B)
    estimate = estimate_training_memory(model, 4096, [mode] * 32, optimizer_states=adam)
    assert abs(estimate.total / GiB - measured_gib) <= 0.03 * measured_gib, estimate.summary()


# Llama-3.1-8B QLoRA, one sequence, every layer offloaded, before AdamW's moments exist: the longest-context
# probes of benchmarks/max_context.py on an H200 (device call 19); from 65,536 tokens the MLP is tiled.
MEASURED_8B_QLORA_LONG = [(8192, 7.55), (32768, 12.82), (65536, 13.85), (110592, 19.39)]


@pytest.mark.parametrize("tokens, measured_gib", MEASURED_8B_QLORA_LONG)
def test_the_long_context_estimate_is_within_3_percent_of_the_measured_peak(tokens, measured_gib):
    from lorafit import Config
    from lorafit.estimate import build_meta_model

    config = Config.from_dict({"model": {"dtype": "bfloat16", "max_seq_length": tokens},
                               "finetune": {"method": "qlora", "r": 16, "alpha": 16}})
    model = build_meta_model(config, {"model_type": "llama", "vocab_size": 128256, "rope_theta": 500000.0,
                                      "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, **LLAMA_3_1_8B})
    estimate = estimate_training_memory(model, tokens, ["offload"] * 32, optimizer_states=False)
    assert abs(estimate.total / GiB - measured_gib) <= 0.03 * measured_gib, estimate.summary()


def test_when_every_layer_offloaded_does_not_fit_the_plan_tiles_the_mlp():
    from lorafit.models.llama import MLP

    model = _meta_lora_model(LLAMA_3_1_8B)
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    tokens, offloaded = 32768, ["offload"] * 32
    untiled = estimate_training_memory(model, tokens, offloaded).total
    tiled = estimate_training_memory(model, tokens, offloaded, tiled=True).total
    assert tiled < untiled  # at 32K tokens the default (from 65,536) does not tile
    assert plan_checkpointing(model, tokens, untiled, on_gpu=True) == offloaded
    assert all(m.tile_tokens == MLP.tile_tokens for m in mlps)  # it fits untiled: nothing changes
    with pytest.raises(ConfigError, match="even with every layer offloaded and the MLP tiled"):
        plan_checkpointing(model, tokens, tiled - 1, on_gpu=True)
    assert plan_checkpointing(model, tokens, (tiled + untiled) // 2, on_gpu=True) == offloaded
    assert all(m.tile_tokens == tokens for m in mlps)
    assert estimate_training_memory(model, tokens, offloaded).total == tiled


def test_the_plan_offloads_the_fewest_layers_that_fit():
    model = _meta_lora_model(LLAMA_3_1_8B)
    everything = estimate_training_memory(model, 4096, ["none"] * 32).total
    nothing = estimate_training_memory(model, 4096, ["offload"] * 32).total
    assert plan_checkpointing(model, 4096, everything, on_gpu=True) == ["none"] * 32
    assert plan_checkpointing(model, 4096, nothing, on_gpu=True) == ["offload"] * 32
    halfway = plan_checkpointing(model, 4096, (everything + nothing) // 2, on_gpu=True)
    k = halfway.count("offload")
    assert 0 < k < 32 and halfway == ["offload"] * k + ["none"] * (32 - k)  # the first layers go to CPU memory
    assert estimate_training_memory(model, 4096, halfway).total <= (everything + nothing) // 2
    fewer = ["offload"] * (k - 1) + ["none"] * (33 - k)
    assert estimate_training_memory(model, 4096, fewer).total > (everything + nothing) // 2
    assert plan_checkpointing(model, 4096, 1, on_gpu=False) == ["none"] * 32  # CPU: nothing to offload to


def test_a_budget_nothing_fits_says_what_to_change():
    model = _meta_lora_model(LLAMA_3_1_8B)
    with pytest.raises(ConfigError, match="even with every layer offloaded.*batch_size.*nf4"):
        plan_checkpointing(model, 4096, 10 * GiB, on_gpu=True)


def test_a_graphed_plan_recomputes_layers_beside_the_graphs_pool():
    # A CUDA graph holds its whole pool: GRAPH_POOL_SLACK more than the activations and workspace it was
    # recorded with. It recomputes the fewest layers that fit, and offloads some of them only where that is
    # not enough.
    from lorafit.memory import GRAPH_POOL_BASE_BYTES, GRAPH_POOL_SLACK

    model = _meta_lora_model(LLAMA_3_1_8B)
    eager, graphed = (estimate_training_memory(model, 4096, ["none"] * 32, graphed=g) for g in (False, True))
    slack = GRAPH_POOL_SLACK * (eager.activations + eager.workspace) + GRAPH_POOL_BASE_BYTES
    assert graphed.total - eager.total == pytest.approx(slack, rel=1e-6)
    plan = plan_checkpointing(model, 4096, eager.total, on_gpu=True, graphed=True)
    k = plan.count("layers")
    assert 0 < k < 32 and plan == ["layers"] * k + ["none"] * (32 - k)
    assert estimate_training_memory(model, 4096, plan, graphed=True).total <= eager.total
    all_recomputed = estimate_training_memory(model, 4096, ["layers"] * 32, graphed=True).total
    plan = plan_checkpointing(model, 4096, all_recomputed - 1, on_gpu=True, graphed=True)
    j, k = plan.count("offload"), 32 - plan.count("none")
    assert 0 < j <= k and plan == ["offload"] * j + ["layers"] * (k - j) + ["none"] * (32 - k)
    assert estimate_training_memory(model, 4096, plan, graphed=True).total < all_recomputed
    # Where every layer offloaded fits eagerly but not beside a graph's pool, the MLPs go half the
    # tokens at a time (an offloaded layer's recomputation skips their forward: nn/tiled_mlp.py).
    offloaded = estimate_training_memory(model, 4096, ["offload"] * 32)
    untiled = model.mlp_tiling
    assert plan_checkpointing(model, 4096, offloaded.total, True, True) == ["offload"] * 32
    assert mlp_tile_chunk(model, 4096) == 2048
    assert estimate_training_memory(model, 4096, ["offload"] * 32, graphed=True).total <= offloaded.total
    model.mlp_tiling = untiled
    with pytest.raises(ConfigError, match="CUDA graph does not fit"):
        plan_checkpointing(model, 4096, offloaded.weights + offloaded.training_state, True, True)
    assert model.mlp_tiling == untiled  # a plan that fails leaves the model as it was


def test_a_qlora_estimate_counts_the_zeros_of_the_stacked_adapter_blocks():
    """QLoRA's q, k, v and gate, up keep blockdiag(s B) beside A (kernels/lora_stacked.py): for Llama-3.1-8B
    (2 * 6144 + 28672) * 16 zeros a layer, 42 MB in bf16. The speed-mode peak with AdamW measured 20.14 GiB
    on an H200 (device call 49)."""
    from lorafit import Config
    from lorafit.estimate import build_meta_model
    from lorafit.memory import _stacked_adapter_padding

    config = Config.from_dict({"model": {"dtype": "bfloat16", "max_seq_length": 2048},
                               "finetune": {"method": "qlora", "r": 16, "alpha": 16}})
    model = build_meta_model(config, {"model_type": "llama", "vocab_size": 128256, "rope_theta": 500000.0,
                                      "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, **LLAMA_3_1_8B})
    assert _stacked_adapter_padding(model, 2) == 32 * (2 * 6144 + 28672) * 16 * 2
    assert _stacked_adapter_padding(_meta_lora_model(LLAMA_3_1_8B), 2) == 0  # a dense M holds its own blocks
    estimate = estimate_training_memory(model, 4096, ["none"] * 32)
    assert abs(estimate.total / GiB - 20.14) <= 0.03 * 20.14, estimate.summary()
    # Offloaded layers keep no adapter copies (lora.py's keeps_adapter_copies): 3.9 MB a layer fewer
    offloaded = estimate_training_memory(model, 4096, ["offload"] * 32)
    kept = estimate_training_memory(model, 4096, ["offload"] * 31 + ["none"])
    per_layer = (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336)) * 16 * 2  # q, o; k, v; gate, up, down
    assert kept.training_state - offloaded.training_state == per_layer + (2 * 6144 + 28672) * 16 * 2
