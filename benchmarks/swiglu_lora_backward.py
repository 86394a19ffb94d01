"""The LoRA MLP's backward from dy to grad [gate | up]: the composed ops against kernels/swiglu_lora.py.

    python benchmarks/swiglu_lora_backward.py [--tokens 4096] [--sweep]

At Llama-3.1-8B's and Llama-3.2-1B's MLP shapes (r = 16, bf16), times what kernels/lora_mlp.py's backward
runs between dy and [dgate | dup]: composed (h recomputed, dy W_down, the adapter's share added in place,
grad A_down from h, the SwiGLU backward, gate and up's grad B from the stored grads) and fused (dy W_down,
then one kernel). --sweep also tries other tile shapes. A diagnostic: it records nothing.
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))

from lorafit.kernels import swiglu_lora  # noqa: E402
from lorafit.kernels.lora_linear import _lora_backward  # noqa: E402
from lorafit.kernels.swiglu import swiglu_grads_packed, swiglu_values  # noqa: E402

SHAPES = {"llama-3.1-8b": (4096, 14336), "llama-3.2-1b": (2048, 8192)}  # (C, I)


def timed_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args()
    N, r, kw = args.tokens, 16, dict(dtype=torch.bfloat16, device="cuda")
    for name, (C, I) in SHAPES.items():
        torch.manual_seed(0)
        gate_up = torch.randn(N, 2 * I, **kw)
        w_down, a_w, b_w = torch.randn(C, I, **kw) * 0.02, torch.randn(r, I, **kw) * 0.02, torch.randn(C, r, **kw)
        dy, down_a = torch.randn(N, C, **kw), torch.randn(N, r, **kw)
        low = torch.randn(N, 2 * r, **kw)
        d_cat = torch.empty(N, 2 * I + 2 * r, **kw)
        dtypes = (torch.float32, torch.float32)

        def composed():
            h = swiglu_values(gate_up[:, :I], gate_up[:, I:])
            grad_h, _, _ = _lora_backward(dy, h, w_down, a_w, b_w, down_a, 1.0, True, dtypes)
            del h
            swiglu_grads_packed(grad_h, gate_up, d_cat)
            d_cat[:, :I].t() @ low[:, :r], d_cat[:, I:2 * I].t() @ low[:, r:]

        def fused():
            swiglu_lora.down_and_swiglu_backward(dy, w_down, a_w, b_w, down_a, 1.0, gate_up[:, :I], gate_up[:, I:],
                                                 d_cat[:, :I], d_cat[:, I:2 * I], low[:, :r], low[:, r:])

        def gemm_only():
            dy @ w_down

        base = timed_ms(gemm_only)
        print(f"{name} (N={N}, C={C}, I={I}, r={r}): dy W_down alone {base:.3f} ms; "
              f"composed {timed_ms(composed):.3f} ms; "
              f"fused {timed_ms(fused):.3f} ms (tiles {swiglu_lora._BLOCK_N}x{swiglu_lora._BLOCK_I}, "
              f"{swiglu_lora._NUM_WARPS} warps)")
        if args.sweep:
            knobs = ("_BLOCK_N", "_BLOCK_I", "_NUM_WARPS", "_NUM_STAGES", "_PROGRAMS_PER_SM")
            default = [getattr(swiglu_lora, k) for k in knobs]

            def fused_without_b():
                swiglu_lora.down_and_swiglu_backward(dy, w_down, a_w, b_w, down_a, 1.0, gate_up[:, :I],
                                                     gate_up[:, I:], d_cat[:, :I], d_cat[:, I:2 * I])

            for config in itertools.product((16, 32), (64, 128), (4, 8), (1, 3), (4, 16)):
                for k, v in zip(knobs, config):
                    setattr(swiglu_lora, k, v)
                try:
                    print(f"   tiles {config[0]}x{config[1]}, {config[2]} warps, {config[3]} stages, "
                          f"{config[4]} programs/SM: fused {timed_ms(fused):.3f} ms, without grad B "
                          f"{timed_ms(fused_without_b):.3f} ms")
                except Exception as e:  # out of shared memory or registers at this shape
                    print(f"   {config}: {type(e).__name__}")
            for k, v in zip(knobs, default):
                setattr(swiglu_lora, k, v)

if __name__ == "__main__":
    main()
