"""The Triton NF4 dequantisation kernel (lorafit/kernels/nf4_dequantize.py) against its specification,
lorafit.nn.nf4.dequantize_nf4, bit for bit.

On CPU the kernel runs in Triton's interpreter (tests/conftest.py) on small odd shapes. The interpreter casts
float32 to bfloat16 by truncation where the GPU rounds to nearest even (triton/runtime/interpreter.py), so
on CPU a bf16 result is compared, still bit for bit, with the reference's float32 result truncated to bf16.
@pytest.mark.gpu tests take Llama-3-8B-sized weights on CUDA, where every dtype must match exactly.
"""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from lorafit.kernels.nf4_dequantize import dequantize_nf4_triton  # noqa: E402
from lorafit.nn.nf4 import NF4_CODE, NF4Linear, dequantize_nf4, dynamic_code, quantize_nf4  # noqa: E402

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]


def nf4_state(shape, double_quant=True, device="cpu", seed=0):
    """dequantize_nf4's tensor arguments for a random weight of `shape` quantised by quantize_nf4, with one
    row of zeros: all-zero blocks (absmax 0, values -0.0 and 0.0) wherever a row spans a whole block."""
    generator = torch.Generator(device).manual_seed(seed)
    weight = torch.randn(shape, generator=generator, device=device) * 0.02
    weight[shape[0] // 2] = 0
    state = quantize_nf4(weight, double_quant)
    nested_code = dynamic_code().to(device) if double_quant else None
    return (state["weight"], state["absmax"], NF4_CODE.to(device), state.get("nested_scales"), nested_code,
            state.get("nested_offset"))


def reference(*args):
    """The PyTorch specification on any device (the op with its CUDA kernel switched off)."""
    with dequantize_nf4.set_kernel_enabled("cuda", False):
        return dequantize_nf4(*args)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns: torch.equal would let -0.0 pass for 0.0."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def truncated_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 by dropping the low 16 bits: the interpreter's cast (exact for finite normals and
    zeros, all that NF4 values are)."""
    return (x.view(torch.int32) & -65536).view(torch.float32).bfloat16()


def assert_bit_equal(got, expected):
    assert got.shape == expected.shape and got.dtype == expected.dtype
    differ = bits(got) != bits(expected)
    if differ.any():
        first = differ.nonzero()[0].tolist()
        raise AssertionError(f"{int(differ.sum())} of {differ.numel()} values differ, first at {first}: "
                             f"{got[tuple(first)].item()} != {expected[tuple(first)].item()}")


# ---- small odd shapes: in Triton's interpreter on CPU, compiled on a GPU ------------------------------

# Triton compiles for CUDA tensors when a GPU is present (conftest.py sets TRITON_INTERPRET only without one).
SMALL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (37, 129): 4773 values, a partial last block and 2 programs; (5, 64): whole blocks; (3, 7): 21 values, a
# padding nibble; (129, 257): 519 blocks, 3 nested scales (the last partial) and 9 programs.
SHAPES = [(37, 129), (5, 64), (3, 7), (129, 257)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("double_quant", [True, False], ids=["double_quant", "plain"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_equals_the_reference_bit_for_bit(shape, double_quant, dtype):
    state = nf4_state(shape, double_quant, device=SMALL_DEVICE, seed=sum(shape))
    got = dequantize_nf4_triton(*state, shape, dtype)
    if dtype == torch.bfloat16 and got.device.type == "cpu":
        expected = truncated_to_bf16(reference(*state, shape, torch.float32))
    else:
        expected = reference(*state, shape, dtype)
    assert_bit_equal(got, expected)


@pytest.mark.parametrize("shape", [(37, 129), (129, 257), (70, 64), (3, 4160), (2, 8192)], ids=str)
def test_kernel_writes_into_a_block_of_a_wider_matrix(shape):
    """launch_dequantize into rows further apart (kernels/lora_mlp.py dequantises gate and up into its M):
    the block holds the reference's values bit for bit, whether a program's values span rows or not (rows of
    4,096 values or more: two at most, found by a compare), and nothing else changes."""
    from lorafit.kernels.nf4_dequantize import launch_dequantize

    state = nf4_state(shape, True, device=SMALL_DEVICE, seed=3)
    wide = torch.full((shape[0] + 5, shape[1] + 11), 7.0, dtype=torch.float16, device=SMALL_DEVICE)
    launch_dequantize(*state, shape, torch.float16, out=wide[2:2 + shape[0], 3:3 + shape[1]])
    assert_bit_equal(wide[2:2 + shape[0], 3:3 + shape[1]], reference(*state, shape, torch.float16))
    untouched = torch.ones_like(wide, dtype=torch.bool)
    untouched[2:2 + shape[0], 3:3 + shape[1]] = False
    assert (wide[untouched] == 7.0).all()


def test_empty_weight():
    empty = (torch.empty(0, dtype=torch.uint8), torch.empty(0), NF4_CODE, None, None, None)
    assert dequantize_nf4_triton(*empty, (0, 5), torch.bfloat16).shape == (0, 5)


def test_the_op_runs_the_kernel_on_cuda():
    # nn/nf4.py registers the Triton launcher for CUDA; other devices keep the reference body.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lorafit::nf4_dequantize", "CUDA")


def test_bad_state_gets_a_clear_error():
    packed, absmax, code, scales, nested_code, offset = nf4_state((5, 64))
    with pytest.raises(ValueError, match="packed must be torch.uint8 with 160 values"):
        dequantize_nf4_triton(packed[:-1], absmax, code, scales, nested_code, offset, (5, 64), torch.float32)
    with pytest.raises(ValueError, match="absmax must be torch.float32"):
        dequantize_nf4_triton(packed, absmax, code, None, None, None, (5, 64), torch.float32)
    with pytest.raises(ValueError, match="nested_code must be torch.float32 with 256 values, not None"):
        dequantize_nf4_triton(packed, absmax, code, scales, None, offset, (5, 64), torch.float32)
    with pytest.raises(ValueError, match="code must be torch.float32"):
        dequantize_nf4_triton(packed, absmax, code.double(), scales, nested_code, offset, (5, 64), torch.float32)
    with pytest.raises(ValueError, match="dtype must be"):
        dequantize_nf4_triton(packed, absmax, code, scales, nested_code, offset, (5, 64), torch.int32)


# Compiles the kernel for an H200 (sm_90) without a GPU and lists its float32 multiply / add / FMA
# instructions, with the launch's options and with Triton's default fp fusion. A separate process: under
# TRITON_INTERPRET=1 the kernel is not a compilable JITFunction.
_PTX_SCRIPT = """
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lorafit.kernels.nf4_dequantize import _BLOCKS_PER_PROGRAM, _LAUNCH_OPTIONS, _dequantize_kernel as kernel
pointers_and_sizes = ["*u8", "*u8", "*fp32", "*fp32", "*fp32", "*fp32", "*bf16", "i32", "i32", "i32", "i32", "i32"]
signature = dict(zip(kernel.arg_names, pointers_and_sizes + ["constexpr"] * 6))
constants = {"NESTED": True, "BLOCKS": _BLOCKS_PER_PROGRAM, "BLOCK_SIZE": 64, "NESTED_BLOCK_SIZE": 256,
             "ROW_STRIDED": True, "TWO_ROWS": True}
aligned = {(i,): [["tt.divisibility", 16]] for i in range(len(pointers_and_sizes))}
for name, options in (("launched", _LAUNCH_OPTIONS), ("fused", _LAUNCH_OPTIONS | {"enable_fp_fusion": True})):
    compiled = triton.compile(ASTSource(kernel, signature, constants, aligned), target=GPUTarget("cuda", 90, 32),
                              options=options)
    print(name, " ".join(sorted(set(re.findall(r"\\b(?:fma|mul|add)[.a-z]*\\.f32\\b", compiled.asm["ptx"])))))
"""


def test_compiled_for_the_h200_the_kernel_has_no_fused_multiply_add():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())
    # As launched: every float32 multiply and add carries .rn, which ptxas never contracts.
    assert set(lines["launched"].split()) == {"add.rn.f32", "mul.rn.f32"}, lines["launched"]
    # Triton's default fuses the nested absmax's `code * scale + offset` (emulated on a 4096 x 14336 weight,
    # an FMA changes 59 183 of its 917 504 absmax values): the check can see one.
    assert re.search(r"\bfma\.", lines["fused"]), lines["fused"]


# ---- GPU: bit-exactness at full size, NF4Linear, speed -----------------------------------------------

# Llama 3 8B's MLP weights (58.7 M values, 917 504 absmax values: an FMA in the nested absmax would change
# some of them) and an odd shape (a tail block, a partial nested block, unvectorised stores).
GPU_SHAPES = [(4096, 14336), (14336, 4096), (1023, 4097)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_exact_on_the_gpu(shape, dtype):
    state = nf4_state(shape, double_quant=True, device="cuda")
    expected = reference(*state, shape, dtype)
    assert_bit_equal(dequantize_nf4(*state, shape, dtype), expected)  # the op: the Triton kernel on CUDA
    assert_bit_equal(dequantize_nf4_triton(*state, shape, dtype), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_exact_on_the_gpu_without_double_quant(dtype):
    state = nf4_state((4096, 14336), double_quant=False, device="cuda")
    assert_bit_equal(dequantize_nf4(*state, (4096, 14336), dtype), reference(*state, (4096, 14336), dtype))


@pytest.mark.gpu
def test_nf4_linear_on_cuda_equals_the_reference_path():
    generator = torch.Generator("cuda").manual_seed(1)
    weight = torch.randn(1000, 4096, device="cuda", generator=generator, dtype=torch.bfloat16) * 0.02
    layer = NF4Linear.from_weight(weight, bias=torch.randn(1000, device="cuda", generator=generator))
    assert layer.compute_dtype == torch.bfloat16
    x = torch.randn(3, 37, 4096, device="cuda", generator=generator, dtype=torch.bfloat16)
    grad_y = torch.randn(3, 37, 1000, device="cuda", generator=generator, dtype=torch.bfloat16)

    def forward_backward():
        leaf = x.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            y = layer(leaf)
        y.backward(grad_y)
        assert 1000 * 4096 not in saved  # backward dequantises again; no dense W lives between the passes
        return y.detach(), leaf.grad

    y, grad_x = forward_backward()
    with dequantize_nf4.set_kernel_enabled("cuda", False):
        y_ref, grad_x_ref = forward_backward()
    # The dense weights are bit-identical (tested above); the matmuls may still differ by bf16 rounding.
    for got, expected in ((y, y_ref), (grad_x, grad_x_ref)):
        torch.testing.assert_close(got, expected, rtol=2**-7, atol=2**-7 * expected.abs().max().item())


@pytest.mark.gpu
def test_speed_on_a_llama_mlp_weight():
    import triton

    shape = (4096, 14336)
    state = nf4_state(shape, double_quant=True, device="cuda")
    kernel_ms = triton.testing.do_bench(lambda: dequantize_nf4(*state, shape, torch.bfloat16))
    with dequantize_nf4.set_kernel_enabled("cuda", False):
        reference_ms = triton.testing.do_bench(lambda: dequantize_nf4(*state, shape, torch.bfloat16))
    moved = sum(t.numel() * t.element_size() for t in state[:2]) + 2 * shape[0] * shape[1]  # codes in, bf16 out
    print(f"\nNF4 dequantize {shape[0]}x{shape[1]} -> bf16 ({moved / 1e6:.0f} MB moved): Triton "
          f"{kernel_ms * 1e3:.1f} us ({moved / kernel_ms / 1e9:.2f} TB/s), PyTorch reference "
          f"{reference_ms * 1e3:.1f} us; memory-bound estimate 37 us at 4 TB/s")
    assert kernel_ms < reference_ms


@pytest.mark.gpu
@pytest.mark.parametrize("double_quant", [True, False], ids=["double_quant", "plain"])
def test_the_op_is_well_formed_on_cuda(double_quant):
    args = (*nf4_state((7, 13), double_quant, device="cuda"), [7, 13], torch.bfloat16)
    results = torch.library.opcheck(torch.ops.lorafit.nf4_dequantize.default, args)
    assert set(results.values()) == {"SUCCESS"}, results
