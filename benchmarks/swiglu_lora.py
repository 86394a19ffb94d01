"""The LoRA MLP's SwiGLU stage, composed from PyTorch ops against kernels/swiglu_lora.py's two kernels.

    python benchmarks/swiglu_lora.py [--tokens 4096] [--sweep forward|backward|both]

At Llama-3.1-8B's and Llama-3.2-1B's MLP shapes (r = 16, bf16), times what kernels/lora_mlp.py runs:
  forward, from [gate | up] to y: composed (h = silu(gate) * up, h A^T, h W^T, the update added in place)
      against fused ([h | h A^T] in one kernel, then one GEMM over [W_down | s B_down]);
  backward, from dy to [dgate | dup]: composed (h recomputed, dy W_down, dy s B, the adapter's share added
      in place, grad A_down from h, the SwiGLU backward, gate and up's grad B from the stored grads) against
      fused (dy [W_down | s B_down] in one GEMM, then one kernel).
--sweep also tries other tilings of both kernels. A diagnostic: it records nothing.
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent))

from _record import cuda_ms  # noqa: E402
from lorafit.kernels import swiglu_lora  # noqa: E402
from lorafit.kernels.lora_linear import _lora_backward, _lora_forward  # noqa: E402
from lorafit.kernels.swiglu import swiglu_grads_packed, swiglu_values  # noqa: E402

SHAPES = {"llama-3.1-8b": (4096, 14336), "llama-3.2-1b": (2048, 8192)}  # (C, I)


def sweep(fn, knobs: tuple, values: tuple) -> None:
    default = [getattr(swiglu_lora, k) for k in knobs]
    for config in itertools.product(*values):
        for k, v in zip(knobs, config):
            setattr(swiglu_lora, k, v)
        try:
            print(f"   {dict(zip((k.strip('_').lower() for k in knobs), config))}: {cuda_ms(fn):.3f} ms")
        except Exception as e:  # out of shared memory or registers at this shape
            print(f"   {config}: {type(e).__name__}")
    for k, v in zip(knobs, default):
        setattr(swiglu_lora, k, v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--sweep", choices=["forward", "backward", "both"], help="also time other tilings")
    args = p.parse_args()
    N, r, kw = args.tokens, 16, dict(dtype=torch.bfloat16, device="cuda")
    for name, (C, I) in SHAPES.items():
        torch.manual_seed(0)
        gate_up = torch.randn(N, 2 * I, **kw)
        D = torch.randn(C, I + r, **kw) * 0.02  # [W_down | s B_down]
        w_down, b_w = D[:, :I], D[:, I:]
        a_w = torch.randn(r, I, **kw) * 0.02
        dy, down_a = torch.randn(N, C, **kw), torch.randn(N, r, **kw)
        low = torch.randn(N, 2 * r, **kw)
        h_cat = torch.empty(N, I + r, **kw)
        d_cat = torch.empty(N, 2 * I + 2 * r, **kw)
        dtypes = (torch.float32, torch.float32)

        def forward_composed():
            h = swiglu_values(gate_up[:, :I], gate_up[:, I:])
            _lora_forward(h, w_down, None, a_w, b_w)

        def forward_fused():
            swiglu_lora.swiglu_lora_forward(gate_up[:, :I], gate_up[:, I:], a_w, h_cat)
            h_cat @ D.t()

        def backward_composed():
            h = swiglu_values(gate_up[:, :I], gate_up[:, I:])
            grad_h, _, _ = _lora_backward(dy, h, w_down, a_w, b_w, down_a, 1.0, True, dtypes)
            del h
            swiglu_grads_packed(grad_h, gate_up, d_cat)
            d_cat[:, :I].t() @ low[:, :r], d_cat[:, I:2 * I].t() @ low[:, r:]

        def backward_fused():
            grad_h_cat = dy @ D
            swiglu_lora.swiglu_lora_backward(grad_h_cat[:, :I], grad_h_cat[:, I:], a_w, gate_up[:, :I],
                                             gate_up[:, I:], d_cat[:, :I], d_cat[:, I:2 * I], low[:, :r], low[:, r:])
            dy.t() @ down_a

        gemm_ms = cuda_ms(lambda: h_cat[:, :I] @ w_down.t())
        print(f"{name} (N={N}, C={C}, I={I}, r={r}), ms: h W^T alone {gemm_ms:.3f}, "
              f"forward composed {cuda_ms(forward_composed):.3f}, fused {cuda_ms(forward_fused):.3f}; "
              f"dy W_down alone {cuda_ms(lambda: dy @ w_down):.3f}, backward composed "
              f"{cuda_ms(backward_composed):.3f}, fused {cuda_ms(backward_fused):.3f}")
        if args.sweep in ("forward", "both"):
            print("  forward kernel tilings (with the GEMM):")
            sweep(forward_fused, ("_FORWARD_BLOCK_N", "_FORWARD_BLOCK_I", "_FORWARD_NUM_WARPS", "_PROGRAMS_PER_SM"),
                  ((16, 32, 64), (64, 128), (4, 8), (4, 16)))
        if args.sweep in ("backward", "both"):
            print("  backward kernel tilings (with the GEMM):")
            sweep(backward_fused, ("_BLOCK_N", "_BLOCK_I", "_NUM_WARPS"), ((16, 32), (64, 128), (4, 8)))


if __name__ == "__main__":
    main()
