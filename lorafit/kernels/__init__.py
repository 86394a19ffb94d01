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
