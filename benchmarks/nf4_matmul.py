"""The fused NF4 dequantise-GEMM (lorafit/kernels/nf4_matmul.py) against dequantise-then-cuBLAS, on a GPU.

    python benchmarks/nf4_matmul.py [--m 1 16 128 1024 4096] [--repeats 50] [--sweep] [--results FILE]

For Llama-3.1-8B's projection shapes (N x K: q/o 4096 x 4096, k/v 1024 x 4096, gate/up 14336 x 4096, down
4096 x 14336; double-quantised NF4 as a QLoRA base holds them) and each M, in bf16, times:
- fused: nf4_matmul_triton(x, state) (forward, y = x Wᵀ) and nf4_matmul_t_triton(dy, state) (backward's
  grad x = dy W);
- dequant+mm: launch_dequantize into a preallocated bf16 buffer (what NF4Linear does), then x @ W.T
  (resp. dy @ W) by cuBLAS;
- dense mm: cuBLAS on an already dense bf16 W: the floor a bf16 (non-quantised) model pays.
Each time is the median of --repeats calls after --warmup calls, each call timed alone with CUDA events
after 256 MB are written to flush L2 (the H200's 60 MB L2 would otherwise hold a 30 MB NF4 weight between
calls and flatter the fused kernel). Before timing, the fused results are checked against dequant+mm.
--sweep also times the tilings in SWEEP (each with with_split's split of the reduction) and reports the
best, to choose choose_tiles' defaults from (the row's speed-up is always the default tiling's).
Prints a markdown table; appends to benchmarks/results.jsonl.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}
# Tilings --sweep tries beside the default: (block_m, block_n, block_k, num_warps, num_stages), each with
# with_split's split of the reduction.
SWEEP = [(16, 16, 256, 4, 4), (16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 64, 4, 4), (16, 32, 256, 4, 3),
         (32, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3)]


def time_us(fn, repeats: int, warmup: int, flush: torch.Tensor) -> float:
    """Median microseconds of fn() over `repeats` calls, each after an L2 flush, timed by CUDA events."""
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def check(got: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    """Largest error relative to the largest |expected|; raises above 2^-6 (bf16 roundings, see the tests)."""
    error = ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
    if error > 2**-6:
        raise AssertionError(f"{what}: fused result off by {error:.3g} of the largest value")
    return error


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 128, 1024, 4096], help="rows of x (tokens)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--sweep", action="store_true", help="also time the tilings in SWEEP; report the best")
    p.add_argument("--results", default=None, help="append here (default: benchmarks/results.jsonl)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/nf4_matmul.py needs a CUDA GPU")

    from _record import RESULTS, record
    from triton.runtime.errors import OutOfResources

    from lorafit.kernels.nf4_dequantize import launch_dequantize
    from lorafit.kernels.nf4_matmul import Tiles, choose_tiles, nf4_matmul_t_triton, nf4_matmul_triton, with_split
    from lorafit.nn.nf4 import NF4_CODE, dynamic_code, quantize_nf4

    device, dtype = torch.device("cuda"), torch.bfloat16
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    generator = torch.Generator(device).manual_seed(0)
    rows = []
    swept = " best fused us (tiles) |" if args.sweep else ""
    print(f"| shape (N x K) | M | pass | fused us | dequant+mm us | dense mm us | speed-up | tiles |{swept}")
    print("|---" * (9 if args.sweep else 8) + "|")
    for name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k, device=device, generator=generator, dtype=dtype) * 0.02
        quantized = quantize_nf4(weight, double_quant=True)
        state = (quantized["weight"], quantized["absmax"], NF4_CODE.to(device), quantized["nested_scales"],
                 dynamic_code().to(device), quantized["nested_offset"])
        buffer = torch.empty(n, k, device=device, dtype=dtype)  # dequant+mm writes W here, as NF4Linear does
        for m in args.m:
            x = torch.randn(m, k, device=device, generator=generator, dtype=dtype)
            dy = torch.randn(m, n, device=device, generator=generator, dtype=dtype)
            passes = {  # (input, fused, dequant+mm, dense mm)
                "forward": (x, nf4_matmul_triton, lambda: x @ launch_dequantize(*state, (n, k), dtype, out=buffer).T,
                            lambda: x @ weight.T),
                "backward": (dy, nf4_matmul_t_triton, lambda: dy @ launch_dequantize(*state, (n, k), dtype, out=buffer),
                             lambda: dy @ weight),
            }
            for pass_name, (a, fused, unfused, dense) in passes.items():
                transposed = pass_name == "backward"
                default = choose_tiles(m, (n, k), transposed, device)
                candidates = [default] + [
                    with_split(Tiles(bm, bn, bk, 1, warps, stages), m, (n, k), transposed, device)
                    for bm, bn, bk, warps, stages in (SWEEP if args.sweep else [])]
                error = check(fused(a, *state, (n, k), tiles=default), unfused(), f"{name} M={m} {pass_name}")
                fused_us = {}
                for t in dict.fromkeys(candidates):  # each tiling once, in order
                    try:
                        fused_us[t] = time_us(lambda t=t: fused(a, *state, (n, k), tiles=t), args.repeats,
                                              args.warmup, flush)
                    except OutOfResources as e:  # a swept tiling too large for shared memory: skipped
                        print(f"skipped {tuple(t)}: {e}", file=sys.stderr)
                best = min(fused_us, key=fused_us.get)
                unfused_us = time_us(unfused, args.repeats, args.warmup, flush)
                dense_us = time_us(dense, args.repeats, args.warmup, flush)
                row = {"shape": name, "N": n, "K": k, "M": m, "pass": pass_name,
                       "fused_us": round(fused_us[default], 1), "dequant_mm_us": round(unfused_us, 1),
                       "dense_mm_us": round(dense_us, 1), "speedup": round(unfused_us / fused_us[default], 2),
                       "tiles": list(default), "max_rel_error": float(f"{error:.3g}")}
                if args.sweep:
                    row |= {"best_fused_us": round(fused_us[best], 1), "best_tiles": list(best),
                            "sweep": [[list(t), round(us, 1)] for t, us in fused_us.items()]}
                rows.append(row)
                swept = f" {fused_us[best]:.1f} {tuple(best)} |" if args.sweep else ""
                print(f"| {name} {n} x {k} | {m} | {pass_name} | {fused_us[default]:.1f} | {unfused_us:.1f} | "
                      f"{dense_us:.1f} | {unfused_us / fused_us[default]:.2f}x | {tuple(default)} |{swept}", flush=True)
    record("nf4_matmul", rows, results=args.results or RESULTS, dtype="bfloat16", double_quant=True,
           repeats=args.repeats, warmup=args.warmup, l2_flush_MB=256, sweep=args.sweep)


if __name__ == "__main__":
    main()
