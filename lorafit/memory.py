"""What training holds in GPU memory, estimated from the model's shapes, and the checkpointing plan that fits
a memory budget (`train.activation_checkpointing: auto`, `train.memory_budget_gib`).

The activation figures are what lorafit's own layers save for backward with the GPU kernels on, per token
and decoder layer. Checked against the H200 (benchmarks/gpu_profile.py, Llama-3.1-8B, 2 x 2048 tokens,
LoRA r=16 on all 7 projections, no optimizer states): 29.32 GiB measured without checkpointing against
29.65 estimated, 16.22 GiB with every layer offloaded against 16.09 (tests/test_memory.py keeps these).
"""

import os
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .kernels.cross_entropy import LOGITS_CHUNK_BYTES
from .nn.nf4 import NF4Linear

GiB = 2**30


def saved_bytes_per_token(config, lora_r: int = 0, element_size: int = 2) -> int:
    """Bytes one decoder layer keeps for backward per token when it is not checkpointed."""
    C, I, r = config.hidden_size, config.intermediate_size, lora_r
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    values = (
        C  # the layer input (the first norm's backward)
        + C  # the normalised input (the q, k, v projections' backward)
        + q + 2 * kv  # rotated q and k, and v (attention's backward)
        + q  # attention's output (its own backward and o_proj's)
        + C  # the residual sum (the second norm's backward)
        + C + 2 * r  # the normalised MLP input, with the fused LoRA MLP's adapter columns
        + 2 * I  # gate and up; silu(gate) * up is recomputed, never kept
        + 7 * r  # each adapter's x A^T
    )
    return values * element_size + 4 * (2 + config.num_heads)  # float32: two norms' 1/rms, a logsumexp per head


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak GPU bytes of a training step, by kind."""

    weights: int  # the model's parameters as loaded (frozen and trainable alike)
    training_state: int  # float32 grads and AdamW's two moments of the trainable ones, their bf16 copies
    activations: int  # what the layers that are not checkpointed keep between forward and backward
    workspace: int  # one layer's activations while its backward runs (or is recomputed), a logits chunk, and
    # with a 4-bit base one dequantised weight

    @property
    def total(self) -> int:
        return self.weights + self.training_state + self.activations + self.workspace

    def summary(self) -> str:
        parts = [("weights", self.weights), ("grads + optimizer", self.training_state),
                 ("activations", self.activations), ("workspace", self.workspace)]
        return f"{self.total / GiB:.2f} GiB = " + " + ".join(f"{name} {b / GiB:.2f}" for name, b in parts)


def estimate_training_memory(model, micro_batch_tokens: int, modes: list[str], optimizer_states: bool = True,
                             element_size: int = 2) -> MemoryEstimate:
    """model: a prepared CausalLM (adapters applied, trainable weights in float32); modes: one checkpointing
    mode per decoder layer ("none" keeps its activations, "layers" its input, "offload" nothing)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # float32 grad (4) + AdamW's exp_avg and exp_avg_sq (8) + the compute-dtype copy LoRA layers keep (2)
    training_state = trainable * (4 + (8 if optimizer_states else 0) + element_size)
    lora_r = model.lora_config.r if model.lora_config is not None else 0
    per_layer = micro_batch_tokens * saved_bytes_per_token(model.config, lora_r, element_size)
    layer_input = micro_batch_tokens * model.config.hidden_size * element_size
    kept = {"none": per_layer, "layers": layer_input, "offload": 0}
    activations = sum(kept[m] for m in modes)
    # A 4-bit base multiplies through one dequantised weight at a time (117 MB for 8B's largest, in bf16).
    dequantized = max((m.in_features * m.out_features * element_size for m in model.modules()
                       if isinstance(m, NF4Linear)), default=0)
    return MemoryEstimate(weights, training_state, activations, per_layer + LOGITS_CHUNK_BYTES + dequantized)


def plan_checkpointing(model, micro_batch_tokens: int, budget_bytes: int, on_gpu: bool) -> list[str]:
    """The fewest checkpointed layers that fit the budget: the first k layers offloaded (their copies have the
    whole forward pass to finish, and their backward comes last), the others keeping their activations.
    Without a GPU there is nothing to offload to and the time per token matters more: no checkpointing."""
    n = model.config.num_layers
    if not on_gpu:
        return ["none"] * n
    for k in range(n + 1):
        modes = ["offload"] * k + ["none"] * (n - k)
        if estimate_training_memory(model, micro_batch_tokens, modes).total <= budget_bytes:
            return modes
    least = estimate_training_memory(model, micro_batch_tokens, ["offload"] * n)
    raise ConfigError(
        f"training needs about {least.total / GiB:.1f} GiB even with every layer offloaded ({least.summary()}), "
        f"over the budget of {budget_bytes / GiB:.1f} GiB: lower train.batch_size or model.max_seq_length, "
        f"or train a 4-bit base (quantize: nf4)"
    )


def device_budget_bytes(device: torch.device, budget_gib: float | None) -> int:
    """The configured budget, else the GPU's memory less 5% for the CUDA context and fragmentation, else (a
    CPU) the machine's memory less 10%."""
    if budget_gib is not None:
        return int(budget_gib * GiB)
    if device.type == "cuda":
        return int(0.95 * torch.cuda.get_device_properties(device).total_memory)
    return int(0.9 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
