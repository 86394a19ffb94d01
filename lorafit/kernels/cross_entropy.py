"""Fused linear + cross-entropy: the LM head and its loss without ever holding the (N, V) logits.

Specification: reference.linear_cross_entropy. At N = 16k tokens and V = 128k the full logits are 4 GiB
in bf16, and the plain PyTorch loss keeps several float32 copies of them alive (8 GiB each); here the rows
go through in chunks, and for each chunk, in forward:
  1. logits = hidden_chunk @ weight^T (cuBLAS), in the input dtype;
  2. one Triton program per row finds max and sum-exp online over V, writes the row's loss, and
     overwrites the logits in place with d(loss)/d(logits) = (softmax - onehot) / n_valid;
  3. grad_hidden_chunk = grad_logits @ weight, and grad_weight += grad_logits^T @ hidden_chunk when the
     LM head trains (full fine-tuning; LoRA leaves it frozen).
The autograd backward then only scales the stored gradients by the incoming scalar. Nothing syncs the GPU:
n_valid stays a device tensor and the chunking depends only on shapes.

Entry points: `linear_cross_entropy` (the autograd-aware loss, through the op lorafit::linear_cross_entropy:
Triton on CUDA, PyTorch elsewhere), and `linear_cross_entropy_triton` / `linear_cross_entropy_torch`, the
two paths called directly; they return (loss, grad_hidden, grad_weight), the tests' way in.
"""

import functools

import torch
from torch import Tensor

try:  # CUDA builds of torch bring Triton; CPU-only installs have just the PyTorch path
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# 256 MiB of logits per chunk: 1024 rows at V = 128,256 in bf16 (768 rows at Qwen's 151,936). A
# (1024 x 4096) @ (4096 x 128k) GEMM does ~1000 FLOP per byte of weight it reads, far above an H200's
# ~200 FLOP/byte balance point, so chunking costs no GEMM throughput and the few launches per chunk are
# noise next to its ~1.5 ms; and it is 1/16 of the 4 GiB of full bf16 logits at N = 16k.
LOGITS_CHUNK_BYTES = 256 * 2**20
# Chunks of whole 128-row GEMM tiles: 1046 rows would leave a 22-row tile costing a full one (~10%).
GEMM_TILE_ROWS = 128
# 8192 columns per step (16 steps over a 128k vocabulary), 16 values per thread (16 warps): ptxas gives that 64
# registers (sm_90, no spills), so two programs share an SM and one loads while the other reduces; 16384
# columns take 128 registers and leave one program per SM. Chosen from ptxas, not timed on the GPU.
MAX_BLOCK_V = 8192
VALUES_PER_THREAD = 16


def rows_per_chunk(n_rows: int, vocab_size: int, element_size: int, chunk_bytes: int = LOGITS_CHUNK_BYTES) -> int:
    """Rows whose (rows, V) logits fit in chunk_bytes: whole GEMM tiles when there are that many, at
    least 1, at most n_rows."""
    rows = chunk_bytes // (vocab_size * element_size)
    if rows >= GEMM_TILE_ROWS:
        rows -= rows % GEMM_TILE_ROWS
    return max(1, min(rows, n_rows))


if triton is not None:

    @triton.jit
    def _cross_entropy_rows_kernel(
        logits_ptr,  # (R, V), overwritten with the gradient when WRITE_GRAD
        logits_row_stride,
        targets_ptr,  # (R,)
        n_valid_ptr,  # () int64: targets != ignore_index over all N rows, not just this chunk's
        row_losses_ptr,  # (R,) float32
        ignore_index,
        # A compile-time constant: fixed per model, so one compilation, and the loops' trip counts known
        # (and Triton 3.6's CPU interpreter fails on a run-time loop bound under numpy 2.4).
        VOCAB_SIZE: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 in chunks over 2 G logits
        logits_row = logits_ptr + row * logits_row_stride
        target = tl.load(targets_ptr + row)
        valid = target != ignore_index
        columns = tl.arange(0, BLOCK_V)

        # Online log-sum-exp: one read of the row, a running max so exp never overflows, and the running
        # sum rescaled whenever the max grows. Always float32: bf16 would lose the sum's low bits.
        running_max = tl.full((), float("-inf"), tl.float32)
        running_sum = tl.zeros((), tl.float32)
        for start in range(0, VOCAB_SIZE, BLOCK_V):
            cols = start + columns
            x = tl.load(logits_row + cols, mask=cols < VOCAB_SIZE, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            running_max = new_max
        log_sum_exp = running_max + tl.log(running_sum)

        # Out-of-range targets are not checked (that would need a sync); masking them keeps the read in
        # bounds, and they read as a target logit of 0.
        target_is_column = valid & (target >= 0) & (target < VOCAB_SIZE)
        target_logit = tl.load(logits_row + target, mask=target_is_column, other=0.0).to(tl.float32)
        tl.store(row_losses_ptr + row, tl.where(valid, log_sum_exp - target_logit, 0.0))

        if WRITE_GRAD:
            # Ignored rows still run (scale 0 writes their zero gradient); the model drops them before the
            # LM head, so they are rare here.
            n_valid = tl.maximum(tl.load(n_valid_ptr), 1).to(tl.float32)
            scale = tl.where(valid, 1.0 / n_valid, 0.0)
            for start in range(0, VOCAB_SIZE, BLOCK_V):
                cols = start + columns
                in_row = cols < VOCAB_SIZE
                x = tl.load(logits_row + cols, mask=in_row, other=0.0).to(tl.float32)
                grad = (tl.exp(x - log_sum_exp) - tl.where(cols == target, 1.0, 0.0)) * scale
                tl.store(logits_row + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_row)


def _rows_triton(logits, targets, n_valid, ignore_index, row_losses, write_grad, block_v=None):
    """Triton: row_losses (R,) <- the rows' cross-entropy; logits (R, V) <- their gradient if write_grad."""
    n_rows, vocab_size = logits.shape
    block_v = block_v or min(triton.next_power_of_2(vocab_size), MAX_BLOCK_V)
    _cross_entropy_rows_kernel[(n_rows,)](
        logits, logits.stride(0), targets, n_valid, row_losses, ignore_index,
        VOCAB_SIZE=vocab_size, WRITE_GRAD=write_grad, BLOCK_V=block_v,
        num_warps=max(1, block_v // (32 * VALUES_PER_THREAD)),
    )


def _rows_torch(logits, targets, n_valid, ignore_index, row_losses, write_grad):
    """PyTorch, same contract as _rows_triton."""
    valid = targets != ignore_index  # (R,)
    safe_targets = torch.where(valid, targets, 0)[:, None]  # (R, 1): ignored rows read column 0, unused
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (R, V) float32, as the reference
    row_losses.copy_(torch.where(valid, -log_probs.gather(1, safe_targets).squeeze(1), 0.0))
    if write_grad:
        grad = log_probs.exp_()  # (R, V) softmax, in place of the log-probabilities
        grad.scatter_add_(1, safe_targets, -valid[:, None].to(grad.dtype))
        grad.mul_((valid / n_valid.clamp(min=1))[:, None])
        logits.copy_(grad)


def _add_weight_grad(grad_weight_sum, grad_logits, hidden_chunk, slice_rows):
    """grad_weight_sum (V, C) float32 += grad_logits^T (V, R) @ hidden_chunk (R, C).

    bf16 chunks are summed in float32: adding each chunk's product to a bf16 sum would round once per chunk
    (16 times at N = 16k), several times the error of the reference's single rounding. The bf16 product
    goes through a temporary, taken slice_rows vocabulary rows at a time to keep it within a chunk budget.
    """
    if grad_logits.dtype == torch.float32:
        grad_weight_sum.addmm_(grad_logits.T, hidden_chunk)
        return
    for start in range(0, grad_weight_sum.shape[0], slice_rows):
        grad_weight_sum[start : start + slice_rows] += grad_logits[:, start : start + slice_rows].T @ hidden_chunk


def _chunked(rows_fn, hidden, weight, targets, ignore_index, with_grad_hidden, with_grad_weight, chunk_bytes):
    """The chunk loop both paths share; rows_fn is _rows_triton or _rows_torch.

    Returns (loss () float32, grad_hidden (N, C) or empty, grad_weight (V, C) or empty), the gradients
    being those of the loss itself (scaled by an incoming gradient of 1).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"expected hidden (N, C), weight (V, C), targets (N,); got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    if hidden.shape[1] != weight.shape[1] or hidden.dtype != weight.dtype:
        raise ValueError(
            f"hidden {hidden.dtype} {tuple(hidden.shape)} does not match weight {weight.dtype} {tuple(weight.shape)}"
        )
    n_rows, vocab_size = hidden.shape[0], weight.shape[0]
    chunk_rows = rows_per_chunk(n_rows, vocab_size, hidden.element_size(), chunk_bytes)
    with_grad = with_grad_hidden or with_grad_weight
    n_valid = (targets != ignore_index).sum()  # () int64 on the device: no sync
    row_losses = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty(hidden.shape if with_grad_hidden else 0, dtype=hidden.dtype, device=hidden.device)
    grad_weight_sum = torch.zeros(weight.shape if with_grad_weight else 0, dtype=torch.float32, device=weight.device)
    slice_rows = max(1, chunk_bytes // (weight.shape[1] * weight.element_size()))

    for start in range(0, n_rows, chunk_rows):
        end = min(start + chunk_rows, n_rows)
        hidden_chunk = hidden[start:end]  # (R, C)
        # In the input dtype: cuBLAS accumulates in float32 and rounds each logit once to bf16 (relative
        # error 2^-9), exactly what the reference's F.linear(...).float() does; at half the bytes of float32
        # a chunk holds twice the rows, and the gradient written over it is the bf16 operand the two
        # gradient GEMMs need (the reference's backward rounds it to bf16 the same way).
        logits = hidden_chunk @ weight.T  # (R, V)
        rows_fn(logits, targets[start:end], n_valid, ignore_index, row_losses[start:end], with_grad)
        if with_grad_hidden:
            torch.mm(logits, weight, out=grad_hidden[start:end])  # (R, C)
        if with_grad_weight:
            _add_weight_grad(grad_weight_sum, logits, hidden_chunk, slice_rows)
        del logits  # freed before the next chunk's logits are allocated

    loss = row_losses.sum() / n_valid.clamp(min=1)  # all rows ignored: 0, and zero gradients
    return loss, grad_hidden, grad_weight_sum.to(weight.dtype)


def linear_cross_entropy_triton(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = -100,
    with_grad_hidden: bool = True,
    with_grad_weight: bool = True,
    chunk_bytes: int = LOGITS_CHUNK_BYTES,
    block_v: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The Triton path on any device (CPU tensors need TRITON_INTERPRET=1): (loss, grad_hidden,
    grad_weight), the gradients empty when not asked for. block_v: columns per kernel step (a power of 2)."""
    if triton is None:
        raise RuntimeError("the Triton path needs the triton package (pip install triton)")
    rows_fn = functools.partial(_rows_triton, block_v=block_v)
    return _chunked(rows_fn, hidden, weight, targets, ignore_index, with_grad_hidden, with_grad_weight, chunk_bytes)


def linear_cross_entropy_torch(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = -100,
    with_grad_hidden: bool = True,
    with_grad_weight: bool = True,
    chunk_bytes: int = LOGITS_CHUNK_BYTES,
) -> tuple[Tensor, Tensor, Tensor]:
    """The PyTorch path, same chunks and contract as linear_cross_entropy_triton."""
    return _chunked(_rows_torch, hidden, weight, targets, ignore_index, with_grad_hidden, with_grad_weight, chunk_bytes)


# ---- the op: torch.compile, the meta device and FSDP2 see through it ----------------------------------


@torch.library.custom_op("lorafit::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int,
    with_grad_hidden: bool,
    with_grad_weight: bool,
    chunk_bytes: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, grad_hidden, grad_weight): the gradients come out of forward, so they are outputs; autograd
    differentiates the loss only. Non-CUDA devices run the PyTorch path."""
    flags = (ignore_index, with_grad_hidden, with_grad_weight, chunk_bytes)
    return linear_cross_entropy_torch(hidden, weight, targets, *flags)


@_linear_cross_entropy_op.register_kernel("cuda")
def _(hidden, weight, targets, ignore_index, with_grad_hidden, with_grad_weight, chunk_bytes):
    flags = (ignore_index, with_grad_hidden, with_grad_weight, chunk_bytes)
    return linear_cross_entropy_triton(hidden, weight, targets, *flags)


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, targets, ignore_index, with_grad_hidden, with_grad_weight, chunk_bytes):
    loss = hidden.new_empty((), dtype=torch.float32)
    grad_hidden = hidden.new_empty(hidden.shape if with_grad_hidden else 0)
    grad_weight = weight.new_empty(weight.shape if with_grad_weight else 0)
    return loss, grad_hidden, grad_weight


def _setup_context(ctx, inputs, output):
    _, grad_hidden, grad_weight = output
    ctx.with_grad_hidden, ctx.with_grad_weight = inputs[4], inputs[5]
    ctx.save_for_backward(grad_hidden, grad_weight)
    ctx.mark_non_differentiable(grad_hidden, grad_weight)


def _backward(ctx, grad_loss, _grad_of_grad_hidden, _grad_of_grad_weight):
    # Out of place: scaling the saved tensors in place would scale them twice on a second backward
    # (retain_graph=True). The product keeps the input dtype: grad_loss is a 0-dim float32.
    grad_hidden, grad_weight = ctx.saved_tensors
    return (
        grad_hidden * grad_loss if ctx.with_grad_hidden else None,
        grad_weight * grad_loss if ctx.with_grad_weight else None,
        None, None, None, None, None,
    )


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = -100,
    chunk_bytes: int = LOGITS_CHUNK_BYTES,
) -> Tensor:
    """reference.linear_cross_entropy, fused: hidden (N, C), weight (V, C), targets (N,) -> the mean
    cross-entropy () float32 over targets != ignore_index. Gradients are computed in forward, only for
    the inputs that require them, and not at all under torch.no_grad."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # What autocast does for F.linear, which the op is not seen as: both operands in the autocast dtype.
        # Full fine-tuning keeps the LM head in float32; the cast's backward returns its gradient in float32.
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    grad_enabled = torch.is_grad_enabled()
    loss, _, _ = _linear_cross_entropy_op(
        hidden, weight, targets, ignore_index,
        grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad, chunk_bytes,
    )
    return loss
