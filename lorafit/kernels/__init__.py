"""Fused GPU kernels (Triton), one file per op, each with its pure-PyTorch specification in reference.py.

The reference functions are the CPU path and the tests' oracle; the Triton versions run on CUDA tensors.
Every op keeps a switch back to its reference (see the `kernels` argument of the model), so any speed-up
can be measured against, and debugged with, the plain PyTorch code.
"""
