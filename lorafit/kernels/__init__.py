"""Fused GPU kernels (Triton), one file per op, each with its pure-PyTorch specification in reference.py.

The reference functions are the CPU path and the tests' oracle; the Triton versions run on CUDA tensors.
Every op keeps a switch back to its reference (see the `kernels` argument of the model), so any speed-up
can be measured against, and debugged with, the plain PyTorch code.
"""

import torch


def eager_cuda(t: torch.Tensor) -> bool:
    """Whether to call a kernel's Triton autograd function directly rather than through its torch.library
    op: a CUDA tensor outside torch.compile. The ops are what torch.compile and the meta device see; in eager
    mode their dispatch and their registered autograd cost host time on every call (H200 host, Llama-3.2-1B:
    100-350 us of self time a call, about a third of the 131 ms it takes to launch one micro-batch, which
    the GPU runs in 41 ms), while both paths run the same kernels and give the same numbers."""
    return t.is_cuda and not torch.compiler.is_compiling()


def product_in_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in float32: what the LoRA functions hand back as an adapter's gradient (to float32 masters). For
    16-bit CUDA tensors straight out of the GEMM (cuBLAS accumulates in float32 anyway, and out_dtype skips
    rounding the product to 16 bits and a cast kernel after it: 11 small kernels a layer of Llama-3.1-8B, with
    the scaling multiplied in place); elsewhere the product cast."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype:
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()
