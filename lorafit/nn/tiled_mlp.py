"""A sequence-tiled MLP: the MLP's per-token intermediates exist for one chunk of tokens at a time.

At long context the largest tensors of a decoder layer are its MLP's: gate and up, (N, 2I), kept for backward
(57 KB a token in bf16 for Llama-3.1-8B, I = 14336: 7.5 GB a layer at 128K tokens), and in backward their
gradients and silu(gate) * up besides. Every row of an MLP is independent of the others, so

    forward   runs the MLP chunk by chunk without recording, into one (N, C) output; only x is kept;
    backward  runs each chunk's forward again, with grad, and back-propagates through it at once: grad x for
              the chunk's rows, and the chunk's share of the parameters' grads, summed over the chunks.

The parameters are inputs of the autograd function and their grads its outputs, so they reach the
parameters through ordinary autograd (DDP's and FSDP2's hooks see them as from any other layer), never by a
nested backward that accumulates into .grad. The cost: the MLP's forward once more per pass (its
recomputation), and one dequantisation of a 4-bit base weight per chunk instead of per pass.

The recomputation is the forward's computation: each chunk replays the random state it first drew from
(LoRA dropout) and the autocast state of the forward, as an offloaded layer's recomputation does
(nn/checkpointing.py); the caller's random state is left as it was.

Inside an offloaded layer's recomputation (nn/recomputation.py) the forward computes nothing: that pass only
rebuilds the layer's autograd graph, nothing reads the MLP's output there (the last operation of a decoder
layer, added into the residual), and this backward runs every chunk's forward again anyway. The tiled MLP
then costs no more FLOPs than the untiled one in an offloaded layer.
"""

import contextlib
from collections.abc import Callable, Sequence

import torch

from .recomputation import recomputation, recomputing


def tiled_mlp(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, params: Sequence[torch.Tensor],
              chunk_tokens: int) -> torch.Tensor:
    """forward(x) computed over `chunk_tokens` rows of x at a time. x (..., C); forward maps rows (n, C) to
    (n, C_out) independently of each other; params: the trainable parameters it uses (their grads come back
    through this function). Without grad recording the chunks run as they are and nothing is kept."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, not {chunk_tokens}")
    if not torch.is_grad_enabled():  # e.g. an offloaded layer's first forward: still one chunk at a time
        return _chunked_forward(forward, x, chunk_tokens)
    return _TiledMLP.apply(forward, chunk_tokens, x, *params)


def _chunk_starts(rows: int, chunk_tokens: int) -> range:
    return range(0, max(rows, 1), chunk_tokens)  # an empty x is one empty chunk: forward sets the output dtype


def _chunked_forward(forward, x, chunk_tokens, rng_states: list | None = None) -> torch.Tensor:
    """x (..., C) -> forward(x) (..., C_out), chunk by chunk into one output; appends each chunk's random
    state before its forward to rng_states, when given."""
    rows = x.reshape(-1, x.shape[-1])  # (N, C)
    out = None
    for start in _chunk_starts(rows.shape[0], chunk_tokens):
        if rng_states is not None:
            rng_states.append(_rng_state(x.device))
        y = forward(rows[start:start + chunk_tokens])  # (n, C_out)
        if out is None:  # the output's dtype is the MLP's (autocast's, under autocast), not necessarily x's
            out = y.new_empty(rows.shape[0], y.shape[-1])  # (N, C_out)
        out[start:start + chunk_tokens] = y
    return out.view(*x.shape[:-1], out.shape[-1])


def _rng_state(device: torch.device) -> tuple:
    """What dropout may draw from: the CPU generator, and x's GPU's when x is on one."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, forward, chunk_tokens, x, *params):
        ctx.mlp_forward, ctx.chunk_tokens, ctx.params, ctx.device = forward, chunk_tokens, params, x.device
        # The recomputation must be the same computation: same dropout draws, same autocast.
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        ctx.rng_states = []  # one per chunk: the CPU's 5 KB state and a GPU's 16 bytes, ~16 chunks a layer
        ctx.save_for_backward(x)
        ctx.recomputing = recomputing()
        if ctx.recomputing:  # values never read (module docstring); nothing is drawn (recomputation() is
            # entered only for layers without dropout), so every chunk has the same state
            state = _rng_state(x.device)
            ctx.rng_states = [state for _ in _chunk_starts(x.numel() // x.shape[-1], chunk_tokens)]
            enabled, dtype = ctx.autocast
            return x.new_empty(x.shape, dtype=dtype if enabled else x.dtype)  # an MLP's C_out is its C
        return _chunked_forward(forward, x, chunk_tokens, ctx.rng_states)  # runs without recording (a Function)

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        rows = x.reshape(-1, x.shape[-1])  # (N, C)
        dy = grad_y.reshape(-1, grad_y.shape[-1])  # (N, C_out)
        need_x, need_params = ctx.needs_input_grad[2], ctx.needs_input_grad[3:]
        wanted = [p for p, need in zip(ctx.params, need_params) if need]
        grad_rows = torch.zeros_like(rows) if need_x else None  # (N, C); a memset, 0.2 ms at 8B's 128K tokens
        sums: list[torch.Tensor | None] = [None] * len(wanted)
        devices = [ctx.device.index] if ctx.device.type == "cuda" else []
        enabled, dtype = ctx.autocast
        n = ctx.chunk_tokens
        for start, (cpu_state, gpu_state) in zip(_chunk_starts(rows.shape[0], n), ctx.rng_states):
            chunk = rows[start:start + n].detach().requires_grad_(need_x)  # (n, C)
            # A chunk's output is only the root of its backward: where the layer's forward was a recomputation
            # (nothing drawn), the chunk's is one too, and the fused LoRA MLP skips its down projection.
            with (torch.random.fork_rng(devices=devices, device_type="cuda"), torch.enable_grad(),
                  torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled),
                  recomputation() if ctx.recomputing else contextlib.nullcontext()):
                torch.set_rng_state(cpu_state)
                if gpu_state is not None:
                    torch.cuda.set_rng_state(gpu_state, ctx.device)
                y = ctx.mlp_forward(chunk)  # (n, C_out), and this chunk's intermediates, freed below
            if not y.requires_grad:  # nothing wanted reaches this chunk's output
                continue
            inputs = ([chunk] if need_x else []) + wanted
            grads = list(torch.autograd.grad(y, inputs, dy[start:start + n].to(y.dtype), allow_unused=True))
            if need_x:
                g = grads.pop(0)
                if g is not None:
                    grad_rows[start:start + n] = g
            for i, g in enumerate(grads):  # a parameter this chunk did not use has None
                if g is not None:  # a copy first: autograd may hand out a broadcast (stride 0) grad
                    sums[i] = g.clone() if sums[i] is None else sums[i].add_(g)
            del y, grads
        summed = iter(sums)
        param_grads = [next(summed) if need else None for need in need_params]
        return (None, None, None if grad_rows is None else grad_rows.view(x.shape), *param_grads)
