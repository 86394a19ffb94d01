"""Activation checkpointing of decoder layers: what a layer keeps for backward, chosen by memory budget.

    "none"     every layer keeps its activations: fastest, most memory
    "layers"   a layer keeps only its input and runs its forward again in backward (torch.utils.checkpoint)
    "offload"  as "layers", and the kept input waits in pinned CPU memory: GPU memory then holds about one
               layer's activations whatever the depth. The copies run on a side stream, overlapping compute.
               The input is two tensors, the stream and the previous layer's MLP output not yet added to it
               (see takes_delta): the add runs in the next norm's kernel, as between layers that keep theirs.

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
    as large as the largest input asked of it (Llama-3.2-1B at 2 x 2048 tokens: 31 x 16 MiB)."""

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
    back layer i-1's inputs before it recomputes, so each copy (2 x 32 MiB for Llama-3.1-8B at 4k tokens,
    1.2 ms over an H200's 55 GB/s host link) overlaps a layer's work instead of stalling it: 19 ms of a 390 ms
    micro-batch without this. pinned: where the inputs wait (the model's, kept between micro-batches)."""

    def __init__(self, pinned: PinnedBuffers | None = None):
        self.pinned = pinned or PinnedBuffers()
        self.slots: list[_OffloadSlot] = []


class _OffloadSlot:
    """One layer's inputs (x, and the previous layer's MLP output where it comes unadded): in pinned CPU memory
    after the forward; on the GPU again once fetched."""

    def __init__(self, pinned: PinnedBuffers, tensors: list[torch.Tensor]):
        taken = [pinned.take(t.shape, t.dtype) for t in tensors]
        self.buffers = [buffer for buffer, _ in taken]
        self.cpu = [view for _, view in taken]
        self.gpu, self.arrived = None, None

    def fetch(self, device: torch.device) -> None:
        """Starts the copies back on the side stream (once); `arrived` marks their end. The GPU tensors are
        allocated on the compute stream, whose work before this point the copies wait for (that memory may
        have just been freed there)."""
        if self.gpu is None and self.cpu is not None:
            self.gpu = [torch.empty(t.shape, dtype=t.dtype, device=device) for t in self.cpu]
            copy = _copy_stream(device)
            copy.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(copy):
                for gpu, cpu in zip(self.gpu, self.cpu):
                    gpu.copy_(cpu, non_blocking=True)
                self.arrived = torch.cuda.Event()
                self.arrived.record()


def run_layer(layer, mode: str, x: torch.Tensor, *args, chain: OffloadChain | None = None, delta=None,
              defer: bool = False):
    """layer(x, *args) under the given checkpointing mode (no checkpointing when no gradient is recorded).
    "offload" takes the forward pass's OffloadChain, so that backward can fetch inputs ahead.

    delta, defer: a decoder layer's residual add left to its neighbours (models/llama.py's DecoderLayer):
    delta the previous layer's MLP output, not yet added to x; defer: return (x, this layer's MLP output)
    unadded. Layers run as they are ("none", or without grad) and offloaded ones take them (`takes_delta`);
    "layers" takes its input whole, as torch.utils.checkpoint keeps it (x and delta would be twice the memory).
    """
    if mode not in MODES:
        raise ValueError(f"activation_checkpointing must be one of {', '.join(MODES)}, not {mode!r}")
    residual = _residual(delta, defer)
    if mode == "none" or not torch.is_grad_enabled():
        return layer(x, *args, **residual)
    if not takes_delta(mode, x):  # "layers", or "offload" with nowhere to offload to (no CUDA)
        if residual:
            raise ValueError(f"a layer checkpointed as {mode!r} takes its input whole: no delta, no defer")
        # Recorded into a CUDA graph (training/cuda_graphs.py), the RNG state cannot be read on the CPU; graphs
        # take checkpointed layers only from models without dropout, whose recomputation draws nothing.
        preserve_rng = not (x.is_cuda and torch.cuda.is_current_stream_capturing())
        return checkpoint(layer, x, *args, use_reentrant=False, preserve_rng_state=preserve_rng)
    # The function's output records a gradient only if an input requires one; the adapters inside the layer
    # are not inputs, and the first layer's input (a frozen embedding's output) requires none.
    if not x.requires_grad:
        x = x.detach().requires_grad_()
    return _OffloadedCheckpoint.apply(layer, chain or OffloadChain(), defer, x, delta, *args)


def takes_delta(mode: str, x: torch.Tensor) -> bool:
    """Whether a layer under this mode takes its input as x and an unadded delta (see run_layer): run as it is,
    or offloaded (on CUDA with grad), whose copies carry both (Llama-3.1-8B memory mode: 96 bf16 adds of a
    micro-batch, forward, recomputation and backward's sum of the stream's grad, 2.3 ms on an H200, gone for
    32 MiB more a layer over the host link, which runs beside the compute)."""
    if mode == "none" or not torch.is_grad_enabled():
        return True
    return mode == "offload" and x.is_cuda


_copy_streams: dict[torch.device, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device) -> "torch.cuda.Stream":
    if device not in _copy_streams:  # one per device, created on first use (a stream per call costs ~10 us)
        _copy_streams[device] = torch.cuda.Stream(device)
    return _copy_streams[device]


class _OffloadedCheckpoint(torch.autograd.Function):
    """Forward without recording; keep only the inputs (x, delta), in pinned CPU memory; in backward bring them
    back, recompute the layer with gradients and back-propagate through it (the reentrant form, which lets the
    inputs leave the GPU)."""

    @staticmethod
    def forward(ctx, layer, chain, defer, x, delta, *args):
        ctx.layer, ctx.args, ctx.device, ctx.defer = layer, args, x.device, defer
        compute, copy = torch.cuda.current_stream(x.device), _copy_stream(x.device)
        inputs = [x] if delta is None else [x, delta]
        ctx.slot = _OffloadSlot(chain.pinned, inputs)
        ctx.chain, ctx.index = chain, len(chain.slots)
        chain.slots.append(ctx.slot)
        copy.wait_stream(compute)  # the inputs are complete before they are copied
        with torch.cuda.stream(copy):
            for cpu, gpu in zip(ctx.slot.cpu, inputs):
                cpu.copy_(gpu, non_blocking=True)
        # The recomputation must be the same computation: same dropout draws, same autocast. A CUDA graph's
        # recording cannot read the RNG state; it takes only models without dropout (cuda_graphs.can_graph).
        capturing = torch.cuda.is_current_stream_capturing()
        ctx.rng_state = None if capturing else torch.cuda.get_rng_state(x.device)
        ctx.draws = any(isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training for m in layer.modules())
        ctx.autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        with torch.no_grad():
            out = layer(x, *args, **_residual(delta, defer))
        # The inputs' memory may be reused once they are freed: the compute stream waits for their copies
        # first. The copies (2 x 16 MiB for Llama-3.2-1B at 2 x 2048 tokens, 0.6 ms) have run beside this
        # layer's forward (~1 ms).
        compute.wait_stream(copy)
        return out

    @staticmethod
    def backward(ctx, *grads):
        compute, slot = torch.cuda.current_stream(ctx.device), ctx.slot
        slot.fetch(ctx.device)  # already on its way when the next layer's backward asked for it
        if ctx.index > 0:
            ctx.chain.slots[ctx.index - 1].fetch(ctx.device)  # the layer whose backward comes next
        compute.wait_event(slot.arrived)  # this layer's inputs only, not the prefetch just queued behind them
        for buffer in slot.buffers:
            ctx.chain.pinned.give_back(buffer)
        x, *delta = (t.detach().requires_grad_() for t in slot.gpu)
        enabled, dtype = ctx.autocast
        # Without dropout the recomputation only rebuilds the layer's graph: a tiled MLP skips its forward
        # there, the fused LoRA MLP its down projection (nn/recomputation.py).
        with (torch.random.fork_rng(devices=[ctx.device.index], enabled=ctx.rng_state is not None),
              torch.enable_grad(), torch.autocast("cuda", dtype=dtype, enabled=enabled),
              contextlib.nullcontext() if ctx.draws else recomputation()):
            if ctx.rng_state is not None:
                torch.cuda.set_rng_state(ctx.rng_state, ctx.device)
            out = ctx.layer(x, *ctx.args, **_residual(delta[0] if delta else None, ctx.defer))
        torch.autograd.backward(out, grads)
        slot.buffers = slot.cpu = slot.gpu = None
        return (None, None, None, x.grad, delta[0].grad if delta else None) + (None,) * len(ctx.args)


def _residual(delta, defer: bool) -> dict:
    """A decoder layer's delta and defer arguments, where they are given (see run_layer)."""
    return {"delta": delta, "defer": defer} if delta is not None or defer else {}
