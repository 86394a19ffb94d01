"""The fused NF4 dequantise-GEMM (lorafit/kernels/nf4_matmul.py) against its specification,
x @ dequantize_nf4(...).T and dy @ dequantize_nf4(...), forward, backward and through autograd.

On CPU the kernels run in Triton's interpreter (tests/conftest.py) on small odd shapes. Tolerances are
bounds, not guesses, written with S = |x| @ |W|ᵀ (the sum of the absolute products of each output):
- float32: the kernel's W tile equals the reference's W exactly, so only the order of the K float32 sums
  differs: |error| <= K · 2⁻²⁴ · S (the classic worst-case bound for a sum of K terms).
- bfloat16 (8 significant bits: a cast's relative error is < 2⁻⁸ rounding to nearest, as the GPU does, and
  < 2⁻⁷ truncating, as the interpreter does) against the reference in float32, cast once: the kernel casts W
  (< 2⁻⁷), sums in float32 (K · 2⁻²⁴ · S) and casts the result (< 2⁻⁷); the reference casts its result
  (< 2⁻⁸): |error| <= 2⁻⁶ · S + 2⁻⁶ · |expected|.
- bfloat16 against x @ W_bf16ᵀ in float32, with W_bf16 cast as the kernel casts it (truncated on CPU): only
  the sum order and the result's cast differ, |error| <= K · 2⁻²⁴ · S + 2⁻⁷ · |expected|, tight enough to
  see a single wrong weight value.
@pytest.mark.gpu tests take Llama-3.1-8B's shapes on CUDA against cuBLAS on the dequantised weight.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from lorafit.kernels.nf4_matmul import (NF4MatmulFused, Tiles, choose_tiles, nf4_matmul_t_triton,  # noqa: E402
                                        nf4_matmul_triton)
from lorafit.nn.nf4 import NF4_CODE, dequantize_nf4, dynamic_code, quantize_nf4  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # small shapes: compiled on a GPU, interpreted on CPU


def nf4_state(shape, double_quant=True, device=DEVICE, seed=0):
    """dequantize_nf4's tensor arguments for a random weight, with one row of zeros (absmax-0 blocks)."""
    generator = torch.Generator(device).manual_seed(seed)
    weight = torch.randn(shape, generator=generator, device=device) * 0.02
    weight[shape[0] // 2] = 0
    state = quantize_nf4(weight, double_quant)
    return (state["weight"], state["absmax"], NF4_CODE.to(device), state.get("nested_scales"),
            dynamic_code().to(device) if double_quant else None, state.get("nested_offset"))


def dense(state, shape):
    """The reference's float32 W (the op's PyTorch body on every device)."""
    with dequantize_nf4.set_kernel_enabled("cuda", False):
        return dequantize_nf4(*state, shape, torch.float32)


def as_the_kernel_rounds(w32: torch.Tensor, dtype) -> torch.Tensor:
    """W in `dtype` as the kernel's tile holds it: the interpreter casts float32 -> bf16 by truncation."""
    if dtype == torch.bfloat16 and w32.device.type == "cpu":
        return (w32.view(torch.int32) & -65536).view(torch.float32).bfloat16()
    return w32.to(dtype)


def assert_within(got, expected, bound):
    assert got.shape == expected.shape and got.dtype == expected.dtype, (got.shape, got.dtype, expected.shape)
    error = (got.float() - expected.float()).abs()
    over = error > bound
    if over.any():
        i = tuple(over.nonzero()[0].tolist())
        raise AssertionError(f"{int(over.sum())} of {over.numel()} values off, first at {i}: {got[i].item()} vs "
                             f"{expected[i].item()} (error {error[i].item():.3g} > bound {bound[i].item():.3g})")


def check_product(got, a, w32, transposed: bool):
    """got against a @ w32ᵀ (or a @ w32 when transposed) under the bounds of the module docstring."""
    w32 = w32 if transposed else w32.t()  # (reduce, out)
    a32, reduce = a.float(), w32.shape[0]
    sums = a32.abs() @ w32.abs()  # S
    exact = a32 @ w32
    if a.dtype == torch.float32:
        return assert_within(got, exact, reduce * 2**-24 * sums + 1e-30)
    assert_within(got, exact.to(a.dtype), 2**-6 * sums + 2**-6 * exact.abs())
    w_k = as_the_kernel_rounds(w32, a.dtype).float()
    expected = a32 @ w_k
    assert_within(got.float(), expected, reduce * 2**-24 * (a32.abs() @ w_k.abs()) + 2**-7 * expected.abs() + 1e-30)


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
DQ = pytest.mark.parametrize("double_quant", [True, False], ids=["double_quant", "plain"])


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("n", [5, 72, 100])
@pytest.mark.parametrize("k", [64, 192])
@DQ
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_transposed_match_the_reference(m, n, k, double_quant, dtype):
    state = nf4_state((n, k), double_quant, seed=m + n + k)
    w32 = dense(state, (n, k))
    generator = torch.Generator(DEVICE).manual_seed(m)
    x = torch.randn(m, k, generator=generator, device=DEVICE).to(dtype)
    dy = torch.randn(m, n, generator=generator, device=DEVICE).to(dtype)
    check_product(nf4_matmul_triton(x, *state, (n, k)), x, w32, transposed=False)
    check_product(nf4_matmul_t_triton(dy, *state, (n, k)), dy, w32, transposed=True)


# Every tiling the defaults use (choose_tiles: m <= 16, <= 128, larger), a 256-wide K step (4 NF4 blocks a
# row, past K's end here), and split reductions: 3 shares of K = 320 in 64-wide steps (2, 2, 1 steps), 2
# shares of N = 100 in 16-row steps.
TILES = [Tiles(16, 32, 128), Tiles(64, 64, 64), Tiles(128, 128, 64), Tiles(16, 16, 256), Tiles(16, 16, 64, split=3),
         Tiles(32, 16, 64, split=2)]


@pytest.mark.parametrize("tiles", TILES, ids=str)
@DQ
def test_every_tiling_and_split(tiles, double_quant):
    n, k = 100, 320
    state = nf4_state((n, k), double_quant, seed=5)
    w32 = dense(state, (n, k))
    x = torch.randn(2, 9, k, device=DEVICE).bfloat16()  # 3-D: the wrappers take (..., K)
    dy = torch.randn(2, 9, n, device=DEVICE).bfloat16()
    check_product(nf4_matmul_triton(x, *state, (n, k), tiles=tiles).flatten(0, 1), x.flatten(0, 1), w32, False)
    check_product(nf4_matmul_t_triton(dy, *state, (n, k), tiles=tiles).flatten(0, 1), dy.flatten(0, 1), w32, True)


def test_strided_inputs():
    state = nf4_state((72, 128))
    w32 = dense(state, (72, 128))
    x = torch.randn(128, 6, device=DEVICE).t()  # (6, 128), column-major
    dy = torch.randn(6, 144, device=DEVICE)[:, ::2]  # (6, 72), stride 2 along N
    check_product(nf4_matmul_triton(x, *state, (72, 128)), x, w32, transposed=False)
    check_product(nf4_matmul_t_triton(dy, *state, (72, 128)), dy, w32, transposed=True)


@DQ
@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_function(double_quant, dtype):
    n, k = 72, 192
    state = nf4_state((n, k), double_quant, seed=1)
    w32 = dense(state, (n, k))
    x = torch.randn(2, 5, k, device=DEVICE).to(dtype).requires_grad_()
    grad_y = torch.randn(2, 5, n, device=DEVICE).to(dtype)
    y = NF4MatmulFused.apply(x, (n, k), *state)
    y.backward(grad_y)
    assert y.shape == (2, 5, n) and x.grad.shape == x.shape and x.grad.dtype == dtype
    check_product(y.detach().flatten(0, 1), x.detach().flatten(0, 1), w32, transposed=False)
    check_product(x.grad.flatten(0, 1), grad_y.flatten(0, 1), w32, transposed=True)


def test_k_not_a_multiple_of_64_is_refused():
    state = nf4_state((8, 96))
    with pytest.raises(ValueError, match="in_features K=96 must be a multiple of 64"):
        nf4_matmul_triton(torch.randn(2, 96, device=DEVICE), *state, (8, 96))
    with pytest.raises(ValueError, match="in_features K=96 must be a multiple of 64"):
        nf4_matmul_t_triton(torch.randn(2, 8, device=DEVICE), *state, (8, 96))


def test_bad_arguments_get_clear_errors():
    state = nf4_state((8, 64))
    with pytest.raises(ValueError, match="last dimension is 63"):
        nf4_matmul_triton(torch.randn(2, 63, device=DEVICE), *state, (8, 64))
    with pytest.raises(ValueError, match="must be bfloat16, float16 or float32"):
        nf4_matmul_triton(torch.randn(2, 64, device=DEVICE).double(), *state, (8, 64))
    with pytest.raises(ValueError, match="packed must be torch.uint8 with 256 values"):
        nf4_matmul_triton(torch.randn(2, 64, device=DEVICE), state[0][:-1], *state[1:], (8, 64))
    with pytest.raises(ValueError, match="block_k must be a multiple of 64"):
        nf4_matmul_triton(torch.randn(2, 64, device=DEVICE), *state, (8, 64), tiles=Tiles(16, 16, 32))


def test_empty_inputs():
    state = nf4_state((8, 64))
    assert nf4_matmul_triton(torch.randn(0, 64, device=DEVICE), *state, (8, 64)).shape == (0, 8)
    assert nf4_matmul_t_triton(torch.randn(3, 0, 8, device=DEVICE), *state, (8, 64)).shape == (3, 0, 64)


def test_small_m_splits_the_reduction_only_where_programs_are_few():
    cpu = torch.device("cpu")  # one "SM": no split
    assert choose_tiles(1, (4096, 4096), False, cpu).split == 1
    assert choose_tiles(4096, (4096, 4096), True, cpu) == Tiles(128, 128, 64, 1, 8, 3)


@pytest.mark.gpu
def test_small_m_on_the_gpu_splits_the_reduction():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    # M = 1, k/v's 1024 x 4096: 32 programs of 32 output columns, 32 steps of 128 along K.
    tiles = choose_tiles(1, (1024, 4096), False, torch.device("cuda"))
    assert tiles.split == min(-(-2 * sms // 32), 8) > 1


# Compiles both kernels for an H200 (sm_90) without a GPU: the interpreter runs the Python, not Triton's
# compiler, which could still reject layouts or shapes. A separate process: under TRITON_INTERPRET=1 the
# kernel is not a compilable JITFunction.
_COMPILE_SCRIPT = """
import re, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lorafit.kernels.nf4_matmul import _LAUNCH_OPTIONS, _matmul_kernel as kernel
for transposed, nested, dt, (bm, bn, bk, warps, stages) in [
        (False, True, "bf16", (16, 32, 128, 4, 4)), (True, True, "bf16", (16, 32, 128, 4, 4)),
        (False, False, "bf16", (128, 128, 64, 8, 3)), (True, True, "fp16", (128, 128, 64, 8, 3))]:
    sig = dict(zip(kernel.arg_names, ["*" + dt, "*u8", "*u8", "*fp32", "*fp32", "*fp32", "*fp32", "*" + dt]
                   + ["i32"] * 9 + ["constexpr"] * 10))
    constants = dict(TRANSPOSED=transposed, NESTED=nested, DOT_DTYPE={"bf16": tl.bfloat16, "fp16": tl.float16}[dt],
                     INPUT_PRECISION="tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_SIZE=64, NESTED_BLOCK_SIZE=256)
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(8)}
    compiled = triton.compile(ASTSource(kernel, sig, constants, aligned), target=GPUTarget("cuda", 90, 32),
                              options=_LAUNCH_OPTIONS | {"num_warps": warps, "num_stages": stages})
    assert compiled.asm["cubin"]
    print(bm, bool(re.search(r"\\b(wgmma|mma)\\.", compiled.asm["ptx"])))
"""


def test_compiles_for_the_h200_with_tensor_cores():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["16", "True"] * 2 + ["128", "True"] * 2, result.stdout


# ---- GPU: Llama-3.1-8B's shapes against cuBLAS on the dequantised weight ------------------------------

GPU_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # q / o, gate / up, down


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 4096])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_llama_shapes_on_the_gpu(m, shape):
    n, k = shape
    state = nf4_state(shape, double_quant=True, device="cuda")
    w32 = dense(state, shape)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    check_product(nf4_matmul_triton(x, *state, shape), x, w32, transposed=False)
    check_product(nf4_matmul_t_triton(dy, *state, shape), dy, w32, transposed=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_other_dtypes_on_the_gpu(dtype):
    shape = (1024, 4096)
    state = nf4_state(shape, double_quant=False, device="cuda")
    w32 = dense(state, shape)
    x = torch.randn(37, 4096, device="cuda", dtype=dtype).requires_grad_()
    y = NF4MatmulFused.apply(x, shape, *state)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    # check_product's bf16 bounds hold for fp16 too (its casts are finer: < 2^-11).
    check_product(y.detach(), x.detach(), w32, transposed=False)
    check_product(x.grad, grad_y, w32, transposed=True)
