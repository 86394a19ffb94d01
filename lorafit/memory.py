"""What training holds in GPU memory, estimated from the model's shapes, and the checkpointing plan that fits
a memory budget (`train.activation_checkpointing: auto`, `train.memory_budget_gib`).

The activation figures are what lorafit's own layers save for backward with the GPU kernels on, per token
and decoder layer, and what a layer's backward holds besides. Checked against the H200
(benchmarks/estimate_check.py): the 28 anchor-workload runs of Llama-3.2-1B and Llama-3.1-8B, LoRA and QLoRA,
every checkpointing mode, eager and replayed from CUDA graphs, within 4.1%; and one Llama-3.1-8B QLoRA sequence of 8K to 110K tokens with every
layer offloaded, within 0.4% (the peaks its backward term was counted from; tests/test_memory.py keeps
some of these).
"""

import os
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .kernels.cross_entropy import LOGITS_CHUNK_BYTES
from .lora import LoRALinear
from .models.llama import MLP, Attention
from .nn.nf4 import NF4Linear

GiB = 2**30


def saved_bytes_per_token(config, lora_r: int = 0, element_size: int = 2, tiled_mlp: bool = False) -> int:
    """Bytes one decoder layer keeps for backward per token when it is not checkpointed. tiled_mlp: the MLP
    runs a chunk of tokens at a time (models/llama.py's MLP.tile_tokens) and keeps only its input."""
    C, I, r = config.hidden_size, config.intermediate_size, lora_r
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    values = (
        C  # the layer input (the first norm's backward)
        + C  # the normalised input (the q, k, v projections' backward)
        + q + 2 * kv  # rotated q and k, and v (attention's backward)
        + q  # attention's output (its own backward and o_proj's)
        + C  # the residual sum (the second norm's backward)
        + C  # the normalised MLP input
        + 4 * r  # the attention adapters' x A^T
    )
    if not tiled_mlp:  # what the MLP keeps of all tokens at once; tiled, it makes them a chunk at a time
        values += (2 * r  # the fused LoRA MLP's adapter columns beside its input
                   + 2 * I  # gate and up; silu(gate) * up is recomputed, never kept
                   + 3 * r)  # the MLP adapters' x A^T
    return values * element_size + 4 * (2 + config.num_heads)  # float32: two norms' 1/rms, a logsumexp per head


def backward_transient_bytes_per_token(config, element_size: int = 2, tiled_mlp: bool = False) -> int:
    """Bytes per token a decoder layer's backward holds beyond what it saved: attention's grads of q, k, v and
    its float32 accumulator for q (2 q + 2 kv), the layer's input and output and their grads, the residual's,
    the next layer's input already fetched (7 C), and unless the MLP is tiled the MLP's grads (1.5 I).
    Counted from, and checked against, the H200: Llama-3.1-8B QLoRA, every layer offloaded, one sequence of
    8K to 110K tokens (benchmarks/max_context.py, device call 19), peaks rise by 230 KB a token untiled and 132
    KB tiled, the saved bytes plus these within 10%; and the 2 x 2048 anchor runs (benchmarks/estimate_check.py)."""
    C, I = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    values = 2 * q + 2 * kv + 7 * C + (0 if tiled_mlp else 3 * I // 2)
    return values * element_size


# The rest of a layer's backward peak, whatever the length: fitted, 80 MiB on the H200 (the same call's line).
WORKSPACE_BASE_BYTES = 80 * 2**20


def mlp_tile_chunk(model, micro_batch_tokens: int, tiled: bool | None = None) -> int:
    """The tokens of one MLP chunk when the model's MLPs tile a micro-batch of this many tokens, else 0.
    tiled: None as the MLPs would decide, True or False whatever they would."""
    mlp = next((m for m in model.modules() if isinstance(m, MLP)), None)
    if mlp is None or not (mlp.tiles(micro_batch_tokens) if tiled is None else tiled):
        return 0
    return min(mlp.tile_chunk_tokens, micro_batch_tokens)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak GPU bytes of a training step, by kind."""

    weights: int  # the model's parameters as loaded (frozen and trainable alike)
    training_state: int  # float32 grads and AdamW's two moments of the trainable ones, their bf16 copies
    activations: int  # what the layers that are not checkpointed keep between forward and backward
    workspace: int  # the peak's moment: one decoder layer's backward (what it saved, recomputed if it is
    # checkpointed, and its backward's own tensors), or for short micro-batches a chunk of logits at the loss

    @property
    def total(self) -> int:
        return self.weights + self.training_state + self.activations + self.workspace

    def summary(self) -> str:
        parts = [("weights", self.weights), ("grads + optimizer", self.training_state),
                 ("activations", self.activations), ("workspace", self.workspace)]
        return f"{self.total / GiB:.2f} GiB = " + " + ".join(f"{name} {b / GiB:.2f}" for name, b in parts)


# A CUDA graph (training/cuda_graphs.py) holds its whole private pool, used or not, where the eager path is
# charged for what it has allocated. Over the activations and workspace, the pools of the anchor runs held
# -1% to +6% at Llama-3.2-1B's 3.8-4.0 GiB (device calls 23, 25) and 9.6% at Llama-3.1-8B's (call 24), and a
# constant besides, which shows where they are small: with every layer offloaded, 0.67 and 0.70 GiB against
# 0.56 (LoRA, QLoRA, expandable segments, call 27), and 40-64 MiB more outside the pool (the recording
# stream's cuBLAS workspaces among them).
GRAPH_POOL_SLACK = 0.05
GRAPH_POOL_BASE_BYTES = 192 * 2**20


def estimate_training_memory(model, micro_batch_tokens: int, modes: list[str], optimizer_states: bool = True,
                             element_size: int = 2, tiled: bool | None = None, graphed: bool = False) -> MemoryEstimate:
    """model: a prepared CausalLM (adapters applied, trainable weights in float32); modes: one checkpointing
    mode per decoder layer ("none" keeps its activations, "layers" its input, "offload" nothing); tiled: the
    MLPs a chunk of tokens at a time, or not (None: as the model's MLPs decide for this length)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = [p for p in model.parameters() if p.requires_grad]
    # float32 grad (4) + AdamW's exp_avg and exp_avg_sq (8), and a compute-dtype copy: autocast's of a fully
    # trained weight, or the one LoRA layers keep of their adapters where their layer is not checkpointed
    training_state = sum(p.numel() for p in trainable) * (4 + (8 if optimizer_states else 0))
    adapters = {id(p) for m in _lora_layers(model) for p in (m.lora_A.weight, m.lora_B.weight)}
    training_state += sum(p.numel() for p in trainable if id(p) not in adapters) * element_size
    training_state += _kept_adapter_copies(model, modes, element_size)
    lora_r = model.lora_config.r if model.lora_config is not None else 0
    chunk = mlp_tile_chunk(model, micro_batch_tokens, tiled)
    per_layer = micro_batch_tokens * saved_bytes_per_token(model.config, lora_r, element_size, tiled_mlp=chunk > 0)
    layer_input = micro_batch_tokens * model.config.hidden_size * element_size
    kept = {"none": per_layer, "layers": layer_input, "offload": 0}
    activations = sum(kept[m] for m in modes)
    # A 4-bit base multiplies through one dequantised weight at a time, or one stacked from the layers that
    # share an input (kernels/lora_stacked.py): gate and up together are the largest, 235 MB for 8B in bf16.
    dequantized = max((sum(m.in_features * m.out_features for m in group) * element_size
                       for group in _dequantized_together(model)), default=0)
    # The peak comes in a decoder layer's backward: what it saved (recomputed first when it is checkpointed)
    # and its backward's own tensors; or, for short micro-batches, at the loss: a chunk of logits.
    recomputed = per_layer if any(m != "none" for m in modes) else 0
    transient = micro_batch_tokens * backward_transient_bytes_per_token(model.config, element_size, chunk > 0)
    workspace = max(recomputed + transient + WORKSPACE_BASE_BYTES, LOGITS_CHUNK_BYTES + dequantized)
    if graphed:  # micro-batches replayed from a CUDA graph: its pool holds these, and more
        activations = int(activations * (1 + GRAPH_POOL_SLACK))
        workspace = int(workspace * (1 + GRAPH_POOL_SLACK)) + GRAPH_POOL_BASE_BYTES
    return MemoryEstimate(weights, training_state, activations, workspace)


def _lora_layers(module) -> list[LoRALinear]:
    return [m for m in module.modules() if isinstance(m, LoRALinear)]


def _kept_adapter_copies(model, modes: list[str], element_size: int) -> int:
    """The compute-dtype copies of their adapters that LoRA layers keep between calls (lora.py's
    keeps_adapter_copies): a 4-bit base's none in a checkpointed decoder layer, where a dense base's stay in
    the stacked weights whatever the checkpointing (kernels/lora_stacked.py's M, lora_mlp.py's D: counted
    for every dense layer, o_proj's too, 27 MB for Llama-3.1-8B). Where a 4-bit base's layers are stacked the
    blocks hold zeros besides (_stacked_adapter_padding)."""
    layers = model.model.layers
    checkpointed = {id(m) for layer, mode in zip(layers, modes, strict=True) if mode != "none"
                    for m in _lora_layers(layer) if isinstance(m.base_layer, NF4Linear)}
    total = sum((m.lora_A.weight.numel() + m.lora_B.weight.numel()) * element_size
                for m in _lora_layers(model) if id(m) not in checkpointed)
    return total + sum(_stacked_adapter_padding(layer, element_size)
                       for layer, mode in zip(layers, modes) if mode == "none")


def _stacked_adapter_padding(module, element_size: int) -> int:
    """The zeros in the adapter blocks that a 4-bit base's stacked LoRA layers keep beside their compute-dtype
    copies (kernels/lora_stacked.py: blockdiag(s B_1, ..., s B_k), (O, kr), holds (k - 1) O r zeros): 42 MB for
    Llama-3.1-8B's q, k, v and gate, up (QLoRA's measured peak rose by the whole blocks, 0.09 GiB, device
    calls 41 and 46)."""
    total = 0
    for block in module.modules():
        names = ("q_proj", "k_proj", "v_proj") if isinstance(block, Attention) else (
            ("gate_proj", "up_proj") if isinstance(block, MLP) else ())
        layers = [getattr(block, name) for name in names]
        if layers and all(isinstance(getattr(m, "base_layer", None), NF4Linear) for m in layers):
            rows, r = sum(m.out_features for m in layers), layers[0].lora_A.weight.shape[0]
            total += (len(layers) - 1) * rows * r * element_size
    return total


def _dequantized_together(model) -> list[list[NF4Linear]]:
    """The 4-bit layers, grouped as training dequantises them: an MLP's gate and up as one, others alone."""
    groups = []
    for mlp in (m for m in model.modules() if isinstance(m, MLP)):
        bases = [getattr(getattr(mlp, name), "base_layer", None) for name in ("gate_proj", "up_proj")]
        if all(isinstance(b, NF4Linear) for b in bases):
            groups.append(bases)
    together = {id(m) for group in groups for m in group}
    return groups + [[m] for m in model.modules() if isinstance(m, NF4Linear) and id(m) not in together]


def plan_checkpointing(model, micro_batch_tokens: int, budget_bytes: int, on_gpu: bool,
                       graphed: bool = False) -> list[str]:
    """The fewest checkpointed layers that fit the budget: the first k layers offloaded (their copies have the
    whole forward pass to finish, and their backward comes last), the others keeping their activations.
    graphed: for micro-batches replayed from a CUDA graph (training/cuda_graphs.py), beside the graph's pool:
    the fewest checkpointed layers again, and of them the fewest offloaded (first) where recomputing the rest
    from kept inputs fits; ConfigError when none fit (estimate.py's `plan_training` then plans without a
    graph).
    When even every layer offloaded does not fit, the MLPs tiled as well: the model's MLPs are set to run a
    chunk of tokens at a time from this length on (nn/tiled_mlp.py; for 8B at 32K tokens 1.15x the time,
    and a layer's backward 132 KB a token instead of 230). Without a GPU there is nothing to offload to and
    the time per token matters more: no checkpointing."""
    n = model.config.num_layers
    if not on_gpu:
        return ["none"] * n
    if graphed:
        def fits(modes):
            return estimate_training_memory(model, micro_batch_tokens, modes, graphed=True).total <= budget_bytes

        for k in range(n + 1):  # checkpointed layers
            if fits(["offload"] * k + ["none"] * (n - k)):
                for j in range(k + 1):  # of them offloaded; fits at j = k
                    if fits(modes := ["offload"] * j + ["layers"] * (k - j) + ["none"] * (n - k)):
                        return modes
        # Beside a graph's pool, the layer whose backward runs is what is left to shrink: its MLP half the
        # tokens at a time, whose forward an offloaded layer's recomputation skips (nn/tiled_mlp.py). Llama-3.2-1B
        # at 2 x 2048 tokens, every layer offloaded, replayed (H200, device call 28): in quarters, 2.94 GiB
        # (estimated 3.02) at 55,280 tokens/s against 60,989 untiled (call 27) for 3.22; QLoRA 1.64 GiB
        # (1.68) at 49,404 against 57,690 for 1.89. Halves hold 56 MiB more and run fewer, larger GEMMs.
        before = model.mlp_tiling
        chunk = max(micro_batch_tokens // 2, 1)
        model.tile_mlp_from(micro_batch_tokens, chunk)
        if not fits(["offload"] * n):
            model.mlp_tiling = before
            raise ConfigError(f"a CUDA graph does not fit {budget_bytes / GiB:.1f} GiB even with every layer offloaded "
                              "and the MLPs tiled")
        return ["offload"] * n
    for k in range(n + 1):
        modes = ["offload"] * k + ["none"] * (n - k)
        if estimate_training_memory(model, micro_batch_tokens, modes).total <= budget_bytes:
            return modes
    least = estimate_training_memory(model, micro_batch_tokens, ["offload"] * n, tiled=True)
    if least.total <= budget_bytes:
        model.tile_mlp_from(micro_batch_tokens)
        return ["offload"] * n
    raise ConfigError(
        f"training needs about {least.total / GiB:.1f} GiB even with every layer offloaded and the MLP tiled "
        f"({least.summary()}), over the budget of {budget_bytes / GiB:.1f} GiB: lower train.batch_size or "
        f"model.max_seq_length, or train a 4-bit base (quantize: nf4)"
    )


def describe_modes(modes: list[str]) -> str:
    """"14 of 16 layers keep their activations, 1 offloaded, 1 recomputed"."""
    kept = modes.count("none")
    checkpointed = [f"{modes.count(m)} {word}" for m, word in (("offload", "offloaded"), ("layers", "recomputed"))
                    if m in modes]
    return f"{kept} of {len(modes)} layers keep their activations, " + (", ".join(checkpointed) or "0 recomputed")


def device_budget_bytes(device: torch.device, budget_gib: float | None) -> int:
    """The configured budget, else the GPU's memory less 5% for the CUDA context and fragmentation, else (a
    CPU) the machine's memory less 10%."""
    if budget_gib is not None:
        return int(budget_gib * GiB)
    if device.type == "cuda":
        return int(0.95 * torch.cuda.get_device_properties(device).total_memory)
    return int(0.9 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
