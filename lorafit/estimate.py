"""`lorafit estimate`: will a config fit on a GPU, and about how long will it take, before a weight is read.

The model is built on the meta device (shapes only) and prepared as training prepares it, so the weights,
adapters and optimizer states counted are the run's own; activations and workspace come from
lorafit/memory.py.

Time. A micro-batch takes the longer of two clocks (`micro_batch_seconds`):
- the GPU's: the model FLOPs at the share of the card's bf16 matmul rate that lorafit's kernels reach
  (GPU_MFU), plus, for a 4-bit base, reading and writing each weight dequantised once per pass; a tiled MLP
  (long micro-batches, models/llama.py's MLP.tile_tokens) adds its forward once more, and dequantises its
  weights once per chunk;
- the host's: eager PyTorch launches ~150-200 kernels per decoder layer forward and backward, one by one
  from Python, and the GPU cannot run ahead of them (LAUNCH_SECONDS_PER_LAYER). A 1B model at 2 x 2048
  tokens is bound by this clock (77 ms launched, 41 ms of GPU work); Llama-3.1-8B by the GPU's (153 ms
  launched, 240 ms of GPU work).
The constants were measured on one H200 and its host (benchmarks/results.jsonl, device calls 7-17); the
H200 rows of that file set the estimate beside each measurement (benchmarks/gpu_anchor.py).
"""

import math
import random
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .memory import estimate_training_memory, mlp_tile_chunk, plan_checkpointing


@dataclass(frozen=True)
class Device:
    memory_gib: float  # as torch reports it
    tflops: float  # dense bf16 matmul rate
    bandwidth_tbs: float  # memory bandwidth, TB/s (datasheet)


# H200 and H100: 8192^3 bf16 matmuls measured (benchmarks/gpu_anchor.py on an H200, 2026-11-30: 787-800;
# ../shared/bench on an H100: 707). A100 and L4: their datasheets' dense bf16 rate, which measured rates
# fall 10-20% short of.
DEVICES = {
    "H200": Device(140.4, 790.0, 4.8),
    "H100": Device(79.1, 707.0, 3.35),
    "A100-80GB": Device(79.2, 312.0, 2.0),
    "A100-40GB": Device(39.4, 312.0, 1.56),
    "L4": Device(22.0, 121.0, 0.3),
}


def card_named(device_name: str) -> str | None:
    """The DEVICES entry for a name torch reports ("NVIDIA H200" -> "H200"), or None."""
    return next((card for card in DEVICES if card.split("-")[0] in device_name), None)


# The share of the matmul rate the GPU keeps on lorafit's kernels, by checkpointing mode: Llama-3.1-8B LoRA,
# 2 x 2048 tokens, H200. none: 241 ms of kernels for 130.6 TFLOP (benchmarks/gpu_profile.py); offload and
# layers: 385 ms per micro-batch (device call 8), the recomputed forward and the copies included.
GPU_MFU = {"none": 0.69, "layers": 0.431, "offload": 0.431}
# Host seconds to launch one decoder layer's forward and backward: Llama-3.2-1B's eager 2 x 2048 runs on the
# H200's hosts (results.jsonl, device calls 16-25), whose GPU work is about half of it, each key the mean over
# the calls, because the host itself varies between calls by up to 1.46x (Unsloth's own 1B offloaded run
# took 24,450 tok/s in call 16, 35,666 in call 25). Per micro-batch of 16 layers: LoRA 76.6, 78.9, 64.6 ms
# without checkpointing (calls 16, 18, 22), 96.8, 70.4 offloaded (16, 25); QLoRA 92.3, 99.9 without (18, 22),
# 113.8, 126.4, 104.4 offloaded (17, 18, 25). "layers" launches as "offload". Full fine-tuning as LoRA.
LAUNCH_SECONDS_PER_LAYER = {
    ("lora", "none"): 4.59e-3, ("lora", "layers"): 5.22e-3, ("lora", "offload"): 5.22e-3,
    ("qlora", "none"): 6.00e-3, ("qlora", "layers"): 7.18e-3, ("qlora", "offload"): 7.18e-3,
}
# Bytes moved per 4-bit weight value and pass: its half byte read, the bf16 copy written and read back by the
# GEMM, at half the card's bandwidth: 1.9 ps per value per pass on the H200, which is Llama-3.1-8B QLoRA's
# time over LoRA's (268 vs 249 ms without checkpointing, 433 vs 385 offloaded; device calls 7, 8, 12).
DEQUANT_BYTES_PER_VALUE = 4.5
DEQUANT_BANDWIDTH_SHARE = 0.5


def model_flops_per_token(model, seq_len: int) -> float:
    """Per token: 2 forward + 2 backward FLOPs for each frozen weight that multiplies activations (the grad of
    its input only), 6 for each trained one, and causal attention's 6 L d s (../shared/bench's count).
    Embedding lookups multiply nothing; a tied lm_head counts once."""
    from .nn.nf4 import NF4Linear

    flops = 6.0 * model.config.num_layers * model.config.num_heads * model.config.head_dim * seq_len
    for m in model.modules():
        if isinstance(m, NF4Linear):
            flops += 4 * m.in_features * m.out_features
        elif isinstance(m, torch.nn.Linear):
            flops += (6 if m.weight.requires_grad else 4) * m.weight.numel()
    return flops


def _weight_values(m) -> int:
    """Weight values a linear layer (dense or NF4; an adapter's A or B too) multiplies activations by, else 0."""
    from .nn.nf4 import NF4Linear

    if isinstance(m, NF4Linear):
        return m.in_features * m.out_features
    return m.weight.numel() if isinstance(m, torch.nn.Linear) else 0


@dataclass(frozen=True)
class Estimate:
    modes: list[str]
    memory: object  # memory.MemoryEstimate
    budget_bytes: int | None
    step_seconds: float | None

    @property
    def fits(self) -> bool:
        return self.budget_bytes is None or self.memory.total <= self.budget_bytes


def build_meta_model(config, hf_config: dict):
    """The model as training would prepare it, on the meta device: NF4 bases for QLoRA, adapters in float32."""
    from .finetune import prepare_for_finetuning
    from .models.llama import CausalLM
    from .models.loading import _is_quantizable, _swap_module
    from .models.registry import model_config_from_hf
    from .nn.nf4 import NF4Linear

    dtype = torch.bfloat16 if config.model.dtype in ("auto", "bfloat16") else getattr(torch, config.model.dtype)
    with torch.device("meta"):
        model = CausalLM(model_config_from_hf(hf_config)).to(dtype)
        if config.quantize == "nf4":
            for name, module in list(model.named_modules()):
                if _is_quantizable(name, module):
                    _swap_module(model, name, NF4Linear(module.in_features, module.out_features,
                                                        bias=module.bias is not None, compute_dtype=dtype))
        for p in model.parameters():
            p.requires_grad_(False)
        prepare_for_finetuning(model, config.finetune.method, verbose=False, **config.finetune.adapter_options())
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # as load_trainee keeps them
    return model


def estimate(config, model, tokens_per_micro_batch: int, seq_len: int, modes: list[str],
             budget_bytes: int | None, device: Device | None, graphed: bool = False) -> Estimate:
    """device: a DEVICES entry for the time; None: memory only. graphed: micro-batches replayed from a CUDA
    graph (`plan_training`)."""
    memory = estimate_training_memory(model, tokens_per_micro_batch, modes, graphed=graphed)
    seconds = None
    if device is not None:
        micro_batches = config.train.batch_split()[1]
        seconds = micro_batches * micro_batch_seconds(model, tokens_per_micro_batch, seq_len, modes,
                                                      config.finetune.method, device, graphed)
    return Estimate(modes, memory, budget_bytes, seconds)


def plan_training(model, tokens: int, seq_len: int, checkpointing: str, budget_bytes: int | None, method: str,
                  can_replay, device: Device | None) -> tuple[list[str], bool]:
    """-> (checkpointing modes, graphed): what training on this card does (training/loop.py, lorafit estimate,
    benchmarks/gpu_anchor.py). checkpointing: train.activation_checkpointing; can_replay(modes): whether
    micro-batches under those modes may be replayed from a CUDA graph (cuda_graphs.can_graph, SFT only).

    A fixed mode (or auto without a budget: none) replays where that is faster by the clocks above
    (`replay_pays`). auto: of the plans that fit the budget, the faster, eager (memory.plan_checkpointing:
    layers offloaded) or replayed (layers recomputed or offloaded, beside the graph's pool; no host clock). Replays win
    where the host's clock is the longer: Llama-3.2-1B at 2 x 2048 tokens on the H200 trained at 80-83K
    tokens/s replayed, 41-63K eager; Llama-3.1-8B alike either way (device calls 22-24), so there the eager
    plan, which needs no recomputation, wins. device None (a card not in DEVICES): the H100's."""
    n = model.config.num_layers
    if checkpointing != "auto" or budget_bytes is None:
        modes = [checkpointing if checkpointing != "auto" else "none"] * n
        return modes, can_replay(modes) and replay_pays(model, tokens, seq_len, modes, method, device)
    eager = plan_checkpointing(model, tokens, budget_bytes, on_gpu=True)  # may tile the MLPs
    if not can_replay(["layers"] * n):  # the same answer for "offload"
        return eager, False
    eager_tiling = model.mlp_tiling
    try:
        replayed = plan_checkpointing(model, tokens, budget_bytes, on_gpu=True, graphed=True)  # may tile them finer
    except ConfigError:
        return eager, False
    device = device or DEVICES["H100"]
    replayed_seconds = micro_batch_seconds(model, tokens, seq_len, replayed, method, device, graphed=True)
    replayed_tiling, model.mlp_tiling = model.mlp_tiling, eager_tiling
    if replayed_seconds < micro_batch_seconds(model, tokens, seq_len, eager, method, device):
        model.mlp_tiling = replayed_tiling
        return replayed, True
    return eager, False


def replay_pays(model, tokens: int, seq_len: int, modes: list[str], method: str, device: Device | None) -> bool:
    """Whether replaying these micro-batches from a CUDA graph is faster than launching them, by the clocks
    above: where the host's clock is the longer (device None: the H100's)."""
    device = device or DEVICES["H100"]
    return (micro_batch_seconds(model, tokens, seq_len, modes, method, device, graphed=True)
            < micro_batch_seconds(model, tokens, seq_len, modes, method, device))


def micro_batch_seconds(model, tokens: int, seq_len: int, modes: list[str], method: str, device: Device,
                        graphed: bool = False) -> float:
    """Forward and backward of one micro-batch: the longer of the GPU's time and the host's (module docstring);
    graphed: replayed from a CUDA graph, whose launch costs the host ~10 us, the GPU's alone."""
    from .models.llama import MLP
    from .nn.nf4 import NF4Linear

    mfu = sum(GPU_MFU[m] for m in modes) / len(modes)
    flops = model_flops_per_token(model, seq_len)
    passes = sum(3 if m != "none" else 2 for m in modes) / len(modes)  # forward, backward, and a recompute
    dequantized = passes * sum(_weight_values(m) for m in model.modules() if isinstance(m, NF4Linear))
    chunk = mlp_tile_chunk(model, tokens)
    if chunk:  # a tiled MLP runs its forward once more (nn/tiled_mlp.py), but in offloaded layers, whose
        # recomputation skips it; every pass over it dequantises a 4-bit base's weights once per chunk
        layers = [m for mlp in model.modules() if isinstance(mlp, MLP) for m in mlp.modules()]
        once_more = sum(m != "offload" for m in modes) / len(modes)
        flops += sum(2 * _weight_values(m) for m in layers) * once_more
        mlp_values = sum(_weight_values(m) for m in layers if isinstance(m, NF4Linear))
        dequantized += ((passes + once_more) * math.ceil(tokens / chunk) - passes) * mlp_values
    # An offloaded layer's recomputation (and a tiled MLP's backward in one) skips the fused LoRA MLP's down
    # projection, whose output it never reads (nn/recomputation.py): its forward FLOPs once less, and a
    # 4-bit base's dequantisation of it once less per chunk (8B memory mode: 11,899 -> 12,871 tok/s, call 69)
    offloaded = sum(m == "offload" for m in modes) / len(modes)
    downs = [m for mlp in model.modules() if isinstance(mlp, MLP) for m in mlp.down_proj.modules()]
    flops -= 2 * sum(_weight_values(m) for m in downs) * offloaded
    dequantized -= (offloaded * math.ceil(tokens / chunk) if chunk else offloaded) * sum(
        _weight_values(m) for m in downs if isinstance(m, NF4Linear))
    gpu = tokens * flops / (device.tflops * 1e12 * mfu)
    gpu += dequantized * DEQUANT_BYTES_PER_VALUE / (device.bandwidth_tbs * 1e12 * DEQUANT_BANDWIDTH_SHARE)
    kind = "qlora" if method == "qlora" else "lora"
    host = 0.0 if graphed else sum(LAUNCH_SECONDS_PER_LAYER[(kind, m)] for m in modes)
    return max(gpu, host)


def padded_micro_batches(row_lengths: list[int], rows_per_micro_batch: int, seed: int) -> tuple[float, float]:
    """-> (tokens, length) of a micro-batch on average as training makes them from rows of these lengths:
    shuffled, cut into micro-batches, each padded to its longest row."""
    order = random.Random(seed).sample(row_lengths, len(row_lengths))
    chunks = [order[i : i + rows_per_micro_batch] for i in range(0, len(order), rows_per_micro_batch)]
    return (sum(len(c) * max(c) for c in chunks) / len(chunks), sum(max(c) for c in chunks) / len(chunks))


def largest_fitting(fits, start: int, limit: int) -> int:
    """The largest n in [1, limit] with fits(n), by doubling from `start` then bisecting; 0 if none."""
    if not fits(1):
        return 0
    low, high = 1, None
    n = max(1, start)
    while n <= limit and fits(n):
        low, n = n, n * 2
    high = min(n, limit + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low

