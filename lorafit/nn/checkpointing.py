"""Activation checkpointing of decoder layers: what a layer keeps for backward, chosen by memory budget.

    "none"     every layer keeps its activations: fastest, most memory
    "layers"   a layer keeps only its input and runs its forward again in backward (torch.utils.checkpoint)
    "offload"  as "layers", and the kept input waits in pinned CPU memory: GPU memory then holds about one
               layer's activations whatever the depth. The copies run on a side stream, overlapping compute.

For Llama-3.1-8B at 2 x 2048 tokens a layer input is 32 MiB in bf16; 32 layers x 8 accumulation steps never
coexist (each micro-batch's backward frees its own), so "layers" holds 1 GiB of inputs and "offload" none.

Both can be recorded into a CUDA graph (training/cuda_graphs.py) for models without dropout: a recording reads
no RNG state on the CPU, offloading copies into pinned buffers that outlive the micro-batch (`PinnedBuffers`,
the addresses a graph replays), and every copy on the side stream is joined back to the compute stream by an
event, with GPU memory allocated on the compute stream only (no `record_stream`, whose frees a recording
defers to its end).
"""

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from .recomputation import recomputation

MODES = ("none", "layers", "offload")


class PinnedBuffers:
    """Pinned CPU buffers for offloaded layer inputs, kept from one micro-batch to the next: a CUDA graph
    copies into the addresses it was recorded with, and a recording may not allocate. A buffer in use is
    not handed out again (two forwards may be in flight before their backwards); one too small for what is
    asked gives way to a new one, so the store holds about as many buffers as ever were in use at once, each
    as large as the largest input asked of it (Llama-3.2-1B at 2 x 2048 tokens: 16 x 16 MiB)."""

    def __init__(self):
        self.free: list[torch.Tensor] = []  # flat uint8, pinned

    def take(self, shape: torch.Size, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (a pinned buffer, a view of it with this shape and dtype)."""
        nbytes = shape.numel() * dtype.itemsize
        fitting = [i for i, b in enumerate(self.free) if b.numel() >= nbytes]
        if fitting:
            buffer = self.free.pop(min(fitting, key=lambda i: self.free[i].numel()))
        else:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("an offloaded layer needs a new pinned buffer while a CUDA graph is recorded: "
                                   "record only shapes that ran eagerly before")
            if self.free:  # the smallest fits nothing asked now: make room for the larger one
                self.free.pop(min(range(len(self.free)), key=lambda i: self.free[i].numel()))
            buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return buffer, buffer[:nbytes].view(dtype).view(shape)

    def give_back(self, buffer: torch.Tensor) -> None:
        """After the copy back to the GPU is queued: later copies into it queue behind it on the copy stream."""
        self.free.append(buffer)


class OffloadChain:
    """The offloaded inputs of one forward pass's layers, in order. The backward of layer i starts bringing
    back layer i-1's input before it recomputes, so each copy (32 MiB for Llama-3.1-8B at 4k tokens, 0.6 ms
    over an H200's 55 GB/s host link) overlaps a layer's work instead of stalling it: 19 ms of a 390 ms
    micro-batch without this. pinned: where the inputs wait (the model's, kept between micro-batches)."""

    def __init__(self, pinned: PinnedBuffers | None = None):
        self.pinned = pinned or PinnedBuffers()
        self.slots: list[_OffloadSlot] = []


class _OffloadSlot:
    """One layer input: in pinned CPU memory after the forward; on the GPU again once fetched."""

    def __init__(self, buffer: torch.Tensor, cpu_x: torch.Tensor):
        self.buffer, self.cpu_x, self.gpu_x, self.arrived = buffer, cpu_x, None, None

    def fetch(self, device: torch.device) -> None:
        """Starts the copy back on the side stream (once); `arrived` marks its end. The GPU tensor is allocated
        on the compute stream, whose work before this point the copy waits for (that memory may have just
        been freed there)."""
        if self.gpu_x is None and self.cpu_x is not None:
            self.gpu_x = torch.empty(self.cpu_x.shape, dtype=self.cpu_x.dtype, device=device)
            copy = _copy_stream(device)
            copy.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(copy):
                self.gpu_x.copy_(self.cpu_x, non_blocking=True)
                self.arrived = torch.cuda.Event()
                self.arrived.record()


def run_layer(layer, mode: str, x: torch.Tensor, *args, chain: OffloadChain | None = None):
    """layer(x, *args) under the given checkpointing mode (no checkpointing when no gradient is recorded).
    "offload" takes the forward pass's OffloadChain, so that backward can fetch inputs ahead."""
    if mode not in MODES:
        raise ValueError(f"activation_checkpointing must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "none" or not torch.is_grad_enabled():
        return layer(x, *args)
    if mode == "offload" and x.is_cuda:
        # The function's output records a gradient only if an input requires one; the adapters inside the
        # layer are not inputs, and the first layer's input (a frozen embedding's output) requires none.
        if not x.requires_grad:
            x = x.detach().requires_grad_()
        return _OffloadedCheckpoint.apply(layer, chain or OffloadChain(), x, *args)
    # Recorded into a CUDA graph (training/cuda_graphs.py), the RNG state cannot be read on the CPU; graphs
    # take checkpointed layers only from models without dropout, whose recomputation draws nothing.
    preserve_rng = not (x.is_cuda and torch.cuda.is_current_stream_capturing())
    return checkpoint(layer, x, *args, use_reentrant=False, preserve_rng_state=preserve_rng)


_copy_streams: dict[torch.device, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device) -> "torch.cuda.Stream":
    if device not in _copy_streams:  # one per device, created on first use (a stream per call costs ~10 us)
        _copy_streams[device] = torch.cuda.Stream(device)
    return _copy_streams[device]


class _OffloadedCheckpoint(torch.autograd.Function):
    """Forward without recording; keep only x, in pinned CPU memory; in backward bring it back, recompute the
    layer with gradients and back-propagate through it (the reentrant form, which lets x leave the GPU)."""

    @staticmethod
    def forward(ctx, layer, chain, x, *args):
        ctx.layer, ctx.args, ctx.device = layer, args, x.device
        compute, copy = torch.cuda.current_stream(x.device), _copy_stream(x.device)
        ctx.slot = _OffloadSlot(*chain.pinned.take(x.shape, x.dtype))
        ctx.chain, ctx.index = chain, len(chain.slots)
        chain.slots.append(ctx.slot)
        copy.wait_stream(compute)  # x is complete before it is copied
        with torch.cuda.stream(copy):
            ctx.slot.cpu_x.copy_(x, non_blocking=True)
        # The recomputation must be the same computation: same dropout draws, same autocast. A CUDA graph's
        # recording cannot read the RNG state; it takes only models without dropout (cuda_graphs.can_graph).
        capturing = torch.cuda.is_current_stream_capturing()
        ctx.rng_state = None if capturing else torch.cuda.get_rng_state(x.device)
        ctx.draws = any(isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training for m in layer.modules())
        ctx.autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        with torch.no_grad():
            out = layer(x, *args)
        # x's memory may be reused once it is freed: the compute stream waits for its copy first. The copy
        # (16 MiB for Llama-3.2-1B at 2 x 2048 tokens, 0.3 ms) has run beside this layer's forward (~1 ms).
        compute.wait_stream(copy)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        compute, slot = torch.cuda.current_stream(ctx.device), ctx.slot
        slot.fetch(ctx.device)  # already on its way when the next layer's backward asked for it
        if ctx.index > 0:
            ctx.chain.slots[ctx.index - 1].fetch(ctx.device)  # the layer whose backward comes next
        compute.wait_event(slot.arrived)  # this input only, not the prefetch just queued behind it
        ctx.chain.pinned.give_back(slot.buffer)
        x = slot.gpu_x.detach().requires_grad_()
        enabled, dtype = ctx.autocast
        # Without dropout the recomputation only rebuilds the layer's graph: a tiled MLP skips its forward
        # there, the fused LoRA MLP its down projection (nn/recomputation.py).
        with (torch.random.fork_rng(devices=[ctx.device.index], enabled=ctx.rng_state is not None),
              torch.enable_grad(), torch.autocast("cuda", dtype=dtype, enabled=enabled),
              contextlib.nullcontext() if ctx.draws else recomputation()):
            if ctx.rng_state is not None:
                torch.cuda.set_rng_state(ctx.rng_state, ctx.device)
            out = ctx.layer(x, *ctx.args)
        torch.autograd.backward(out, grad_out)
        slot.buffer = slot.cpu_x = slot.gpu_x = None
        return (None, None, x.grad) + (None,) * len(ctx.args)
