"""The fused linear + cross-entropy (lorafit/kernels/cross_entropy.py) against its reference: the chunking,
the Triton path (in Triton's interpreter off the GPU), the registered op, and on a GPU a Llama 3-size LM head."""

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from lorafit.kernels import reference  # noqa: E402
from lorafit.kernels.cross_entropy import (  # noqa: E402
    LOGITS_CHUNK_BYTES,
    linear_cross_entropy,
    linear_cross_entropy_torch,
    linear_cross_entropy_triton,
    rows_per_chunk,
)

# Off the GPU the Triton path runs in Triton's interpreter (tests/conftest.py), so shapes are small and odd:
# 8-row chunks leave a 5-row last one, and 256-column kernel steps a 232-column last one.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, C, V = 37, 24, 1000
CHUNK_ROWS = 8
BLOCK_V = 256
# Slack for the bf16 rule on error norms; bf16 errors here are ~1e-3.
BF16_SLACK = 1e-6


def make_inputs(dtype, targets_kind="some_ignored", n=N, c=C, v=V, device=DEVICE, seed=0):
    generator = torch.Generator(device).manual_seed(seed)
    hidden = torch.randn(n, c, generator=generator, device=device)
    weight = torch.randn(v, c, generator=generator, device=device) * (3 / c**0.5)  # logits ~ N(0, 9): peaked
    targets = torch.randint(0, v, (n,), generator=generator, device=device)
    if targets_kind == "some_ignored":
        targets[::4] = -100  # rows 0, 4, ..., 36: ignored rows in the first and the last (partial) chunk
    elif targets_kind == "all_ignored":
        targets[:] = -100
    return hidden.to(dtype), weight.to(dtype), targets


def chunk_bytes_for(rows, dtype, v=V):
    return rows * v * dtype.itemsize


def reference_loss_and_grads(hidden, weight, targets, grad_scale=1.0):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = reference.linear_cross_entropy(hidden, weight, targets)
    (loss * grad_scale).backward()
    return loss.detach(), hidden.grad, weight.grad


def error(actual, expected):
    return (actual.double() - expected.double()).norm().item()


def assert_matches_reference(actual, hidden, weight, targets, grad_scale=1.0, names=("loss", "hidden", "weight")):
    """actual: the (loss, grad_hidden, grad_weight) to check (None to skip one).

    float32: 1e-5 relative to the reference, in norm. bf16, the design's rule: the error against the
    reference computed in float64 from the same bf16 values is at most 2x that of the reference run in bf16.
    """
    if hidden.dtype == torch.float32:
        expected = reference_loss_and_grads(hidden, weight, targets, grad_scale)
        for name, a, e in zip(names, actual, expected):
            if a is not None:
                assert error(a, e) <= 1e-5 * e.double().norm().item() + 1e-12, name
        return
    truth = reference_loss_and_grads(hidden.double(), weight.double(), targets, grad_scale)
    low = reference_loss_and_grads(hidden, weight, targets, grad_scale)
    for name, a, lo, t in zip(names, actual, low, truth):
        if a is not None:
            assert a.dtype == lo.dtype, name
            err_kernel, err_reference = error(a, t), error(lo, t)
            assert err_kernel <= 2 * err_reference + BF16_SLACK, f"{name}: {err_kernel:.3g} vs {err_reference:.3g}"


# ---- chunking -----------------------------------------------------------------------------------------


def test_rows_per_chunk_fills_the_budget_with_whole_gemm_tiles():
    assert rows_per_chunk(16384, 128256, 2) == 1024  # Llama 3, bf16
    assert rows_per_chunk(16384, 151936, 2) == 768  # Qwen, bf16: 883 rows fit, whole 128-row tiles
    for vocab_size in (32000, 49152, 128256, 151936):
        rows = rows_per_chunk(16384, vocab_size, 2)
        assert rows % 128 == 0 and rows * vocab_size * 2 <= LOGITS_CHUNK_BYTES
    assert rows_per_chunk(N, V, 4, chunk_bytes_for(CHUNK_ROWS, torch.float32)) == CHUNK_ROWS
    assert rows_per_chunk(5, V, 4) == 5  # never more than the rows there are
    assert rows_per_chunk(N, V, 4, chunk_bytes=100) == 1  # never less than one row
    assert rows_per_chunk(0, V, 4) == 1


class LargestLogits(TorchDispatchMode):
    """Records the most rows of any freshly allocated (rows, V) tensor, and counts matrix products."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size, self.max_rows, self.products = vocab_size, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.products += 1
        inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        input_storages = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            fresh = isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in input_storages
            if fresh and t.dim() == 2 and t.shape[1] == self.vocab_size:  # not a view, nor written in place
                self.max_rows = max(self.max_rows, t.shape[0])
        return out


@pytest.mark.parametrize(
    "with_grad_hidden, with_grad_weight, products_per_chunk",
    [(False, False, 1), (True, False, 2), (True, True, 3)],
    ids=["no_grad", "lora", "full"],
)
def test_torch_path_holds_one_chunk_of_logits_and_skips_unneeded_products(
    with_grad_hidden, with_grad_weight, products_per_chunk
):
    hidden, weight, targets = make_inputs(torch.float32, device="cpu")
    with LargestLogits(V) as recorder:
        flags = (-100, with_grad_hidden, with_grad_weight, chunk_bytes_for(CHUNK_ROWS, torch.float32))
        loss, grad_hidden, grad_weight = linear_cross_entropy_torch(hidden, weight, targets, *flags)
    n_chunks = -(-N // CHUNK_ROWS)
    assert recorder.max_rows == CHUNK_ROWS
    assert recorder.products == products_per_chunk * n_chunks
    assert grad_hidden.numel() == (N * C if with_grad_hidden else 0)
    assert grad_weight.numel() == (V * C if with_grad_weight else 0)
    assert_matches_reference((loss, None, None), hidden, weight, targets)


# ---- the Triton path, called directly (the interpreter off the GPU) ------------------------------------


@pytest.mark.parametrize("targets_kind", ["some_ignored", "all_ignored"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_path_matches_reference(dtype, targets_kind):
    hidden, weight, targets = make_inputs(dtype, targets_kind)
    actual = linear_cross_entropy_triton(
        hidden, weight, targets, chunk_bytes=chunk_bytes_for(CHUNK_ROWS, dtype), block_v=BLOCK_V
    )
    assert actual[0].dtype == torch.float32 and actual[0].shape == ()
    assert_matches_reference(actual, hidden, weight, targets)
    if targets_kind == "all_ignored":
        assert all(bool((t == 0).all()) for t in actual)


def test_triton_path_without_gradients_gives_the_loss_only():
    hidden, weight, targets = make_inputs(torch.float32)
    loss, grad_hidden, grad_weight = linear_cross_entropy_triton(
        hidden, weight, targets, -100, False, False, chunk_bytes_for(CHUNK_ROWS, torch.float32), block_v=BLOCK_V
    )
    assert grad_hidden.numel() == 0 and grad_weight.numel() == 0
    assert_matches_reference((loss, None, None), hidden, weight, targets)


def test_triton_path_in_one_chunk_and_one_block():
    hidden, weight, targets = make_inputs(torch.float32)
    assert_matches_reference(linear_cross_entropy_triton(hidden, weight, targets), hidden, weight, targets)


# ---- the registered op: the PyTorch path on CPU, Triton on CUDA ----------------------------------------


@pytest.mark.parametrize("train_weight", [False, True], ids=["lora", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_op_matches_reference_through_autograd(dtype, train_weight):
    hidden, weight, targets = make_inputs(dtype)
    hidden_leaf = hidden.clone().requires_grad_()
    weight_leaf = weight.clone().requires_grad_(train_weight)
    loss = linear_cross_entropy(hidden_leaf, weight_leaf, targets, chunk_bytes=chunk_bytes_for(CHUNK_ROWS, dtype))
    (loss * 3.0).backward()  # the stored gradients are scaled by the incoming one
    assert hidden_leaf.grad.dtype == dtype
    actual = (loss.detach(), hidden_leaf.grad, weight_leaf.grad if train_weight else None)
    assert_matches_reference(actual, hidden, weight, targets, grad_scale=3.0)
    assert (weight_leaf.grad is not None) == train_weight


def test_op_under_autocast_casts_like_linear():
    # The training recipe's full fine-tuning: a float32 LM head, the matmuls in bf16 under autocast.
    hidden, weight, targets = make_inputs(torch.float32)
    hidden_leaf, weight_leaf = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        chunk_bytes = chunk_bytes_for(CHUNK_ROWS, torch.bfloat16)
        loss = linear_cross_entropy(hidden_leaf, weight_leaf, targets, chunk_bytes=chunk_bytes)
    loss.backward()
    assert weight_leaf.grad.dtype == torch.float32
    actual = (loss.detach(), hidden_leaf.grad.bfloat16(), weight_leaf.grad.bfloat16())  # bf16 values, exactly
    assert_matches_reference(actual, hidden.bfloat16(), weight.bfloat16(), targets)


def test_op_with_no_label_is_a_zero_connected_to_the_graph():
    hidden, weight, targets = make_inputs(torch.float32, "all_ignored")
    hidden = hidden.requires_grad_()
    loss = linear_cross_entropy(hidden, weight, targets)
    assert loss.requires_grad and loss.item() == 0.0
    loss.backward()
    assert bool((hidden.grad == 0).all())


def test_op_under_no_grad_builds_no_graph():
    hidden, weight, targets = make_inputs(torch.float32)
    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets)
    assert not loss.requires_grad
    assert_matches_reference((loss, None, None), hidden.detach(), weight.detach(), targets)


def test_op_rejects_mismatched_inputs():
    hidden, weight, targets = make_inputs(torch.float32)
    with pytest.raises(ValueError, match="does not match"):
        linear_cross_entropy(hidden[:, :-1], weight, targets)
    with pytest.raises(ValueError, match="expected hidden"):
        linear_cross_entropy(hidden, weight, targets[:-1])


def opcheck_args(dtype, device):
    hidden, weight, targets = make_inputs(dtype, device=device)
    chunk_bytes = chunk_bytes_for(CHUNK_ROWS, dtype)
    return (hidden.requires_grad_(), weight.requires_grad_(), targets, -100, True, True, chunk_bytes)


def test_opcheck_on_cpu():
    torch.library.opcheck(torch.ops.lorafit.linear_cross_entropy.default, opcheck_args(torch.float32, "cpu"))


# ---- GPU: the Triton path at a real model's size -------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck_on_gpu(dtype):
    torch.library.opcheck(torch.ops.lorafit.linear_cross_entropy.default, opcheck_args(dtype, "cuda"))


LLAMA3 = dict(n=4096, c=4096, v=128256, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("train_weight", [False, True], ids=["lora", "full"])
def test_llama3_size_matches_reference_on_gpu(train_weight):
    hidden, weight, targets = make_inputs(torch.bfloat16, **LLAMA3)  # 1024-row chunks: 4 of them
    hidden_leaf = hidden.clone().requires_grad_()
    weight_leaf = weight.clone().requires_grad_(train_weight)
    loss = linear_cross_entropy(hidden_leaf, weight_leaf, targets)
    (loss * 3.0).backward()
    actual = (loss.detach(), hidden_leaf.grad, weight_leaf.grad if train_weight else None)
    assert_matches_reference(actual, hidden, weight, targets, grad_scale=3.0)


def peak_memory_and_time(loss_fn, hidden, weight, targets):
    """Bytes allocated at peak above what was allocated before, and milliseconds, for forward + backward."""

    def forward_backward():
        hidden.grad = weight.grad = None
        loss_fn(hidden, weight, targets).backward()

    forward_backward()  # warm-up: Triton compilation, cuBLAS heuristics
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    forward_backward()
    end.record()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, start.elapsed_time(end)


@pytest.mark.gpu
@pytest.mark.parametrize("train_weight", [False, True], ids=["lora", "full"])
def test_llama3_size_peak_memory_far_below_reference_on_gpu(train_weight):
    hidden, weight, targets = make_inputs(torch.bfloat16, **LLAMA3)
    hidden, weight = hidden.requires_grad_(), weight.requires_grad_(train_weight)
    fused_bytes, fused_ms = peak_memory_and_time(linear_cross_entropy, hidden, weight, targets)
    reference_bytes, reference_ms = peak_memory_and_time(reference.linear_cross_entropy, hidden, weight, targets)
    print(
        f"\nN=4096 C=4096 V=128256 bf16, LM head {'trained' if train_weight else 'frozen'}, forward+backward: "
        f"fused {fused_bytes / 2**20:.0f} MiB {fused_ms:.1f} ms, reference {reference_bytes / 2**20:.0f} MiB "
        f"{reference_ms:.1f} ms"
    )
    if train_weight:
        # Adds the float32 gradient sum (2 GiB), a bf16 product slice (256 MiB), the bf16 gradient and its
        # scaled copy (1 GiB each, not all at once); the reference adds 1 GiB of gradient to its ~6 GiB.
        assert fused_bytes < reference_bytes
        return
    # One chunk of logits (250 MiB), grad_hidden and its scaled copy (32 MiB each), room for cuBLAS workspace.
    assert fused_bytes <= LOGITS_CHUNK_BYTES + 3 * hidden.nbytes + 64 * 2**20
    assert fused_bytes * 8 < reference_bytes  # the reference holds several (N, V) float32 tensors
