"""A micro-batch's forward and backward recorded once as a CUDA graph and replayed for the next micro-batches
of the same shape: the CPU then launches one graph instead of a few thousand kernels.

Why: a small model waits on the CPU that launches its kernels. Llama-3.2-1B at 2 x 2048 tokens on an H200
launched 77 ms of work for 41 ms of GPU time (kernels/lora_stacked.py); replayed, it trains at 80-84K
tokens/s against 41-63K eager (device calls 22-25). A replay costs the CPU ~10 us whatever the graph holds.
Llama-3.1-8B, GPU-bound, gains nothing (call 24): estimate.plan_training decides where replaying pays.

What must hold for a replay to be the same computation:
- the same shapes (the graph's kernels and buffers are fixed): one graph, for the shape of the last two
  micro-batches, is kept; a new shape runs eagerly until it repeats (MAX_CAPTURES bounds the re-recordings);
- nothing decided on the CPU from the data: no packed documents (varlen attention takes the longest
  document as a CPU integer) and no padding mask (a right-padded batch runs without one: recipes/sft.py's `batch_inputs`);
- checkpointed layers ("layers", "offload") only without dropout: a recomputation's RNG state is read on
  the CPU, which a recording cannot do (nn/checkpointing.py records none while capturing); offloaded inputs
  wait in the model's pinned buffers, which outlive the micro-batch;
- weights derived from the adapters (compute-dtype copies, stacked q/k/v adapters) are made inside the
  graph, on every replay: `keep_compute_adapters` goes False, as under FSDP2;
- gradients accumulate into the same tensors: the graph adds into the `.grad` buffers that existed when it
  was recorded, so those buffers stay the parameters' gradients across optimizer steps (`_own_gradients`).

Memory: the graph keeps a private pool as large as the micro-batch's activation peak, which the eager path
would free after backward and use again; the optimizer step then runs beside it (fused AdamW: no
temporaries of note). The allocator counts the pool as allocated only while recording; what a replay holds
is the whole pool (`pool_bytes`) beside everything allocated outside it.
"""

import torch

# Model inputs a graph can take; packed documents and padding masks run eagerly (see the module).
GRAPHABLE = {"input_ids", "labels", "position_ids"}
# A run whose shapes keep changing gains nothing from recording each (a recording costs about one eager
# micro-batch of CPU time and its pool); after this many it stays eager.
MAX_CAPTURES = 4


def can_graph(model, device: torch.device, distributed: bool, modes=None) -> bool:
    """Whether this model's training micro-batches can be replayed from graphs (see the module) under its
    checkpointing, or under `modes` (one per layer) when given."""
    modes = model.activation_checkpointing if modes is None else modes
    modes = [modes] if isinstance(modes, str) else modes
    if device.type != "cuda" or distributed or not getattr(model, "cuda_graphs", False):
        return False
    checkpointed = any(m != "none" for m in modes)
    return not checkpointed or not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


class GraphedMicroBatches:
    """Forward and backward of `loss * weight` for micro-batches of model inputs (input_ids, labels,
    position_ids: CUDA tensors), from a graph when the shape repeats, else eagerly. Gradients accumulate into
    the trainable parameters' .grad either way."""

    def __init__(self, model, trainable: list[torch.nn.Parameter], dtype: torch.dtype):
        """dtype: the frozen weights' (autocast's, as the recipes run it; none for float32)."""
        self.model, self.trainable, self.dtype = model, trainable, dtype
        self.graph: torch.cuda.CUDAGraph | None = None
        self.signature = None  # of the recorded graph
        self.previous = None  # of the last micro-batch
        self.captures = 0
        self.static_inputs: dict[str, torch.Tensor] = {}
        self.static_weight = self.static_loss = None
        self.gradients: list[torch.Tensor] = []  # what the graph adds into
        for m in model.modules():
            if hasattr(m, "keep_compute_adapters"):
                m.keep_compute_adapters = False

    def __call__(self, inputs: dict[str, torch.Tensor], weight: float) -> torch.Tensor:
        """-> (loss * weight), detached."""
        if not inputs.keys() <= GRAPHABLE:
            self.previous = None
            return self._eager(inputs, weight)
        signature = tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(inputs.items()))
        repeated, self.previous = signature == self.previous, signature
        if signature != self.signature and repeated and self.captures < MAX_CAPTURES:
            self._record(inputs, signature)
        if signature != self.signature:
            return self._eager(inputs, weight)
        for name, t in inputs.items():
            self.static_inputs[name].copy_(t, non_blocking=True)
        self.static_weight.fill_(weight)
        self._own_gradients()
        self.graph.replay()
        return self.static_loss.clone()

    def _eager(self, inputs, weight: float) -> torch.Tensor:
        with torch.autocast("cuda", dtype=self.dtype, enabled=self.dtype != torch.float32):
            part = self.model(**inputs).loss * weight
        part.backward()
        return part.detach()

    def close(self) -> None:
        """After training: the LoRA layers keep their adapter copies between calls again (generation)."""
        self.graph = self.signature = self.static_loss = None
        for m in self.model.modules():
            if hasattr(m, "keep_compute_adapters"):
                m.keep_compute_adapters = True

    def _record(self, inputs, signature) -> None:
        # The previous graph's pool goes back first (its output is the last tensor in it held here).
        self.graph = self.signature = self.static_loss = None
        self.static_inputs = {name: t.clone() for name, t in inputs.items()}
        self.static_weight = torch.zeros((), device=self.trainable[0].device)
        if not self.gradients:
            self.gradients = [torch.zeros_like(p) for p in self.trainable]
        self._own_gradients()
        # Recording runs nothing: the gradients keep what they hold, and the caller replays this micro-batch.
        graph = torch.cuda.CUDAGraph()
        self.captures += 1
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            # No autocast cache: its casts would be made once while recording and never again.
            with torch.autocast("cuda", dtype=self.dtype, enabled=self.dtype != torch.float32, cache_enabled=False):
                part = self.model(**self.static_inputs).loss * self.static_weight
            part.backward()
            self.static_loss = part.detach()
        for p, g in zip(self.trainable, self.gradients):
            if p.grad is not g:  # autograd replaced a gradient instead of adding into it: not replayable
                raise RuntimeError("a gradient was not accumulated in place while recording the CUDA graph")
        self.graph, self.signature = graph, signature

    @property
    def recorded_shape(self) -> tuple[int, ...] | None:
        """The input_ids shape the graph replays, None without a graph."""
        return None if self.graph is None else tuple(self.static_inputs["input_ids"].shape)

    def pool_bytes(self, allocated: bool = False) -> int:
        """GPU memory the recorded graph holds (its pool's segments, used or not): 0 without one.
        allocated: only what is allocated in it now, between replays (tensors made while recording that
        outlive it, such as the loss or cuBLAS's workspace for the recording's stream), which the
        allocator's counters count as allocated beside the rest."""
        if self.graph is None:
            return 0
        pool, key = self.graph.pool(), "allocated_size" if allocated else "total_size"
        return sum(s[key] for s in torch.cuda.memory_snapshot() if tuple(s["segment_pool_id"]) == pool)

    def _own_gradients(self) -> None:
        """Makes every .grad the graph's buffer again, with the value it should have: zero after the
        optimizer cleared it (set to None), the eager micro-batches' sum when they made a new one."""
        cleared, replaced = [], []
        for p, g in zip(self.trainable, self.gradients):
            if p.grad is None:
                cleared.append(g)
            elif p.grad is not g:
                replaced.append((g, p.grad))
            p.grad = g
        if cleared:
            torch._foreach_zero_(cleared)
        if replaced:
            torch._foreach_copy_([g for g, _ in replaced], [old for _, old in replaced])

