"""`lorafit estimate`: will a config fit on a GPU, and about how long will it take, before a weight is read.

The model is built on the meta device (shapes only) and prepared as training prepares it, so the weights,
adapters and optimizer states counted are the run's own; activations and workspace come from
lorafit/memory.py. Time is the step's model FLOPs over the card's bf16 matmul rate times the share of it
lorafit reached on the anchor workload (MEASURED_MFU): a rough figure until more shapes are measured.
"""

from dataclasses import dataclass

import torch

from .memory import estimate_training_memory

# name: (memory in GiB as torch reports it, dense bf16 matmul TFLOP/s). H200 and H100: 8192^3 bf16 matmuls
# measured (benchmarks/gpu_anchor.py on an H200, 2026-11-30: 787-800; ../shared/bench on an H100: 707).
# A100 and L4: their datasheets' dense bf16 rate, which measured rates fall 10-20% short of.
DEVICES = {
    "H200": (140.4, 790.0),
    "H100": (79.1, 707.0),
    "A100-80GB": (79.2, 312.0),
    "A100-40GB": (39.4, 312.0),
    "L4": (22.0, 121.0),
}
# The share of that rate lorafit's LoRA training reached on the anchor workload (2 x 2048 tokens, H200,
# 2026-11-30, benchmarks/results.jsonl): by model size, without and with every layer offloaded. A 1B model
# is held back by the CPU launching ~2,400 kernels per micro-batch, not by the GPU.
MEASURED_MFU = {  # parameters at least: (none, offload)
    4e9: (0.668, 0.431),
    0: (0.217, 0.169),
}


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
             budget_bytes: int | None, tflops: float | None) -> Estimate:
    from .lora import count_parameters

    memory = estimate_training_memory(model, tokens_per_micro_batch, modes)
    seconds = None
    if tflops is not None:
        flops = model_flops_per_token(model, seq_len)
        n_params = count_parameters(model)[1]  # a 4-bit weight by its shape, not its packed bytes
        none_mfu, offload_mfu = next(v for size, v in MEASURED_MFU.items() if n_params >= size)
        mfu = none_mfu + (offload_mfu - none_mfu) * modes.count("offload") / len(modes)
        seconds = config.train.grad_accum * tokens_per_micro_batch * flops / (tflops * 1e12 * mfu)
    return Estimate(modes, memory, budget_bytes, seconds)


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

