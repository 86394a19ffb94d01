"""Data-parallel training: the process group and what its ranks share.

torchrun starts one process per GPU (or per CPU slot with the gloo backend) and tells each its rank through
environment variables; the CLI reads them (the library never reads the environment) and passes a
`Distributed` down to the recipes. A single process is `SINGLE`, and every helper here is then a no-op, so
the one-process path computes exactly what it did before data parallelism existed.

Strategies (train.distributed):
    ddp   every rank holds the whole model; DistributedDataParallel all-reduces the trainable parameters'
          gradients (frozen base weights have no gradient and are never communicated).
    fsdp  FSDP2: `fully_shard` on every decoder layer, then on the root, so each rank keeps 1/N of every
          parameter and gathers a layer's weights just before using them. Needed when the weights plus the
          trainable weights' gradients and AdamW state do not fit one device (full fine-tuning of 8B).
          A QLoRA base is sharded too: NF4Linear keeps its 4-bit state as frozen parameters (nn/nf4.py),
          gathered with the rest of its layer (Llama-3.1-8B: 3.35 GiB of NF4 state, 1.68 GiB a rank on 2 GPUs;
          with torch 2.13 or later, see fsdp_shards_integer_parameters).
    auto  ddp when the model fits a device (see `fits_one_device`), else fsdp; nothing with one process.

Loss normalisation (DESIGN §4): a step's loss is the sum of token losses over all ranks and the whole
accumulation window divided by the total label-token count, so each rank divides by the all-reduced count.
DDP and FSDP2 average gradients over ranks; the recipes multiply the loss they backpropagate by the world
size so that the average becomes that sum (exact: a multiplication by a power of two for 2, 4, 8 ranks).
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

STRATEGIES = ("auto", "ddp", "fsdp")
# auto picks DDP when weights + gradients + AdamW state take at most this share of the device's memory: the
# rest is left for activations (2 x 2048 tokens of an 8B model need ~20 GiB without checkpointing).
DDP_MEMORY_SHARE = 0.6


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job. device None: load_model's default device (one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, writes metrics, reports, checkpoints and the final weights."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def sum(self, *values: float) -> tuple[float, ...]:
        """The sums over all ranks of a few numbers (label-token counts, metric sums), in one all-reduce.
        float64 holds integer counts exactly up to 2**53."""
        if not self.enabled:
            return tuple(float(v) for v in values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return tuple(t.tolist())

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor summed over ranks (a new tensor; the same one with one process)."""
        if not self.enabled:
            return t
        t = t.detach().clone()
        dist.all_reduce(t)
        return t

    def max(self, value: int) -> int:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one: a stop request must stop all ranks at the same step."""
        return bool(self.max(int(flag)))

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather_objects(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (small objects: RNG states)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _comm_device(self) -> torch.device:
        # NCCL communicates CUDA tensors only; gloo CPU tensors.
        return self.device if self.device is not None and self.device.type == "cuda" else torch.device("cpu")


SINGLE = Distributed()


def init_distributed(rank: int, world_size: int, local_rank: int, device_type: str | None = None) -> Distributed:
    """Joins torchrun's process group (rendezvous through MASTER_ADDR / MASTER_PORT, which torch reads).
    device_type: "cuda" or "cpu"; None: cuda when there is one. NCCL on GPUs, gloo on CPUs."""
    if world_size == 1:
        return Distributed(device=torch.device(device_type) if device_type else None)
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    return Distributed(rank, world_size, local_rank, device)


def shutdown(d: Distributed) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- models


def resolve_strategy(requested: str, model: torch.nn.Module, d: Distributed) -> str:
    """-> "none", "ddp" or "fsdp". One process trains unwrapped whatever was asked (fsdp on one rank would
    shard nothing), so a config written for a 2-GPU machine also runs on one."""
    if requested not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {requested!r}")
    if not d.enabled:
        return "none"
    if requested != "auto":
        return requested
    return "ddp" if fits_one_device(model, d.device) else "fsdp"


def fits_one_device(model: torch.nn.Module, device: torch.device | None) -> bool:
    """Whether weights, the trainable weights' float32 gradients and AdamW's two float32 moments take at
    most DDP_MEMORY_SHARE of the device. CPUs: always (the memory is the host's, shared by the ranks)."""
    if device is None or device.type != "cuda":
        return True
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    need = weights + trainable * 4 * 3  # gradient, exp_avg, exp_avg_sq: float32 each
    return need <= DDP_MEMORY_SHARE * torch.cuda.get_device_properties(device).total_memory


def wrap_model(model: torch.nn.Module, strategy: str, d: Distributed,
               compute_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """-> the module training forwards run through. ddp: a DistributedDataParallel wrapper (the model itself
    stays the one to save and evaluate); fsdp: the model itself, sharded in place (its parameters become
    DTensors: rebuild parameter lists and optimizers after this; a QLoRA base's NF4 state is sharded with
    them); none: the model. compute_dtype: what autocast computes in (the loaded dtype); FSDP2 on GPUs
    gathers weights in it, except those of layers holding 4-bit weights, which keep their own dtypes."""
    if strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [d.device] if d.device is not None and d.device.type == "cuda" else None
        # DDP buckets and all-reduces only parameters that require grad; frozen ones (a dense base, or an
        # NF4 base's codes and scales) are broadcast from rank 0 once, when it wraps, and never again. The
        # buffers (rotary tables, NF4 code books and offsets) are loaded identically on every rank and never
        # change: syncing them before each forward would only cost time. torch 2.13 renamed the switch.
        import inspect

        no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else "broadcast_buffers")
        return DistributedDataParallel(model, device_ids=ids, **{no_sync: False})
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from ..lora import is_quantized_linear

        keep_dtypes = cast = MixedPrecisionPolicy()
        kept_whole = set()  # 4-bit state this torch cannot shard (fsdp_shards_integer_parameters)
        if d.device is not None and d.device.type == "cuda" and compute_dtype != torch.float32:
            # Gather every weight in the compute dtype (bf16: half the traffic, and the matmuls run in it
            # under autocast anyway); reduce the trainable weights' gradients in float32, their own dtype.
            cast = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            # A QLoRA layer's NF4 codes and scales are gathered with its other weights, in one all-gather
            # (FSDP2 sends a group of mixed dtypes as bytes). param_dtype would spare the uint8 codes but
            # cast every floating-point parameter (FSDPParam.init_dtype_attrs), rounding the float32 scales
            # to bf16 and so shifting every weight: such a layer keeps its dtypes. The cost: its float32
            # adapters travel in float32 (8B, r=16: 5.2 MB a layer instead of 2.6, beside 113 MB of NF4
            # state, +2.3%), and the LoRA layers cast them for autocast themselves, as one process does.
            quantized = [m for m in layer.modules() if is_quantized_linear(m)]
            whole = set() if fsdp_shards_integer_parameters() else {
                p for m in quantized for p in m.parameters() if p is not m.bias}
            fully_shard(layer, mp_policy=keep_dtypes if quantized else cast, ignored_params=whole or None)
            kept_whole |= whole
        # The rest: embeddings, final norm, LM head (never 4-bit: loading quantises decoder layers only).
        fully_shard(model, mp_policy=cast, ignored_params=kept_whole or None)
        # FSDP2 gathers the weights afresh into the same tensors before every forward, unseen by what keeps
        # weights between forwards: the LoRA layers' compute-dtype adapter copies (keyed on tensor versions)
        # and the stacked weights of the fused LoRA MLP and q, k, v (kernels/lora_mlp.py, lora_stacked.py).
        for m in model.modules():
            if hasattr(m, "keep_compute_adapters"):
                m.keep_compute_adapters = False
            if hasattr(type(m), "fused_lora"):
                m.fused_lora = False
        return model
    raise ValueError(f"strategy must be none, ddp or fsdp, got {strategy!r}")


def fsdp_shards_integer_parameters() -> bool:
    """Whether FSDP2 can shard a uint8 parameter (an NF4 base's codes). Before torch 2.13 it made every
    sharded parameter require grad, which an integer tensor cannot (pytorch issue 177844; torch 2.11 on the
    H200 machine raised "only Tensors of floating point dtype can require gradients"): there the 4-bit state
    stays whole on every rank, outside FSDP2, and only the rest of the model is sharded."""
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 13)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(wrapped: torch.nn.Module, enabled: bool):
    """Around the forward and backward of a micro-batch: communicate gradients only for the last one of an
    accumulation window (the earlier ones accumulate locally)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(wrapped, DistributedDataParallel) and not enabled:
        with wrapped.no_sync():
            yield
        return
    if is_sharded(wrapped):
        wrapped.set_requires_gradient_sync(enabled)
    yield


@contextlib.contextmanager
def unsharded(model: torch.nn.Module):
    """FSDP2: every weight gathered for the duration (generation, whose length differs from rank to rank,
    must not all-gather layer by layer: the ranks would wait on each other's different step counts).
    Otherwise nothing."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            # fully_shard's defaults: layers reshard after forward; the root keeps its weights for backward.
            m.set_reshard_after_forward(m is not model, recurse=False)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective: every rank calls it, in the same order); else t."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def gathered(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached tensors by name (a few: an adapter's), each sharded one gathered whole and moved to the CPU
    (a collective: every rank calls it and gets them all)."""
    from torch.distributed.tensor import DTensor

    return {k: v.detach().full_tensor().cpu() if isinstance(v, DTensor) else v.detach() for k, v in tensors.items()}


def full_state(model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The model's weights by name (trainable_only: those that train), whole. Sharded: gathered one by one
    onto rank 0's CPU (a collective; the other ranks get {}: 8B's float32 weights are 32 GB)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                     ignore_frozen_params=trainable_only))
    else:
        state = {n: t.detach() for n, t in model.state_dict().items()}
    if trainable_only:  # named_parameters names a tied weight once (the embedding), as one process saves it
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {n: t for n, t in state.items() if n in names}
    return state


def load_full_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copies whole tensors (every rank has them, read from a checkpoint) into parameters by name, sharding
    them where the model is sharded."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def optimizer_state(model, optimizer, d: Distributed) -> dict:
    """The optimizer's state to save. Sharded: gathered whole onto rank 0's CPU (a collective; other ranks
    get an empty dict), keyed by parameter name. Otherwise optimizer.state_dict() (every rank holds the same)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
