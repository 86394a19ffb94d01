"""How the LoRA layer's GEMMs can be arranged, timed at Llama-3.1-8B's shapes (2 x 2048 tokens, r = 16).

    python benchmarks/lora_gemm_variants.py [--tokens 4096] [--iters 20]

For each of the decoder's stacked projections (q|k|v, o, gate|up, down) it times one forward and one
backward of y = x W^T + (x A^T) (sB)^T, arranged four ways:
    current   y = x W^T, then y += down (sB)^T            (kernels/lora_linear.py today)
    swap      y = down (sB)^T, then y += x W^T             (the big GEMM reads y in its epilogue)
    k-concat  y = [x | down] [W | sB]^T                    (one GEMM over C + r columns; x's producer
                                                            writes into a (N, C + r) buffer)
    base      y = x W^T alone                              (the floor)
and the backward's grad x likewise (current: dx = dy W, += dy_b A; swap; n-concat: [dy W | dy sB] = dy [W | sB]
in one GEMM). A diagnostic: it records nothing. On an H200 (device call 31) the four arrangements were
within 1% of one another per decoder layer (5.53-5.56 ms forward and backward against 5.01 for the GEMMs
alone): what the adapters cost is their own passes over the activations, not the order of the products.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _record import cuda_ms  # noqa: E402

SHAPES = {  # name: (C_in, C_out, stacked rank)
    "q|k|v": (4096, 6144, 48),
    "o": (4096, 4096, 16),
    "gate|up": (4096, 28672, 32),
    "down": (14336, 4096, 16),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    N, dt = args.tokens, torch.bfloat16
    torch.manual_seed(0)
    totals = {}
    print(f"{'projection':10s} {'variant':10s} {'forward ms':>11s} {'backward ms':>12s}")
    for name, (C, O, r) in SHAPES.items():
        W_ext = torch.randn(O, C + r, device="cuda", dtype=dt) * 0.02  # [W | sB]
        W, B = W_ext[:, :C], W_ext[:, C:]
        A = torch.randn(r, C, device="cuda", dtype=dt) * 0.02
        X_ext = torch.randn(N, C + r, device="cuda", dtype=dt)  # [x | down]
        x = X_ext[:, :C].contiguous()
        down = x @ A.t()
        dy = torch.randn(N, O, device="cuda", dtype=dt)
        Wc, Bc = W.contiguous(), B.contiguous()

        def f_current():
            d = x @ A.t()
            y = x @ Wc.t()
            y.addmm_(d, Bc.t())

        def f_swap():
            d = x @ A.t()
            y = d @ Bc.t()
            y.addmm_(x, Wc.t())

        def f_kconcat():
            torch.mm(X_ext[:, :C], A.t(), out=X_ext[:, C:])
            X_ext @ W_ext.t()

        def f_base():
            x @ Wc.t()

        def b_current():
            dy_b = dy @ Bc
            dx = dy @ Wc
            dx.addmm_(dy_b, A)
            dy_b.t() @ x
            dy.t() @ down

        def b_swap():
            dy_b = dy @ Bc
            dx = dy_b @ A
            dx.addmm_(dy, Wc)
            dy_b.t() @ x
            dy.t() @ down

        def b_nconcat():
            G = dy @ W_ext  # (N, C + r): [dy W | dy sB]
            dx, dy_b = G[:, :C], G[:, C:]
            dx.addmm_(dy_b, A)
            dy_b.t() @ x
            dy.t() @ down

        def b_base():
            dy @ Wc

        thin = {
            "x A^T": lambda: x @ A.t(), "dy B": lambda: dy @ Bc, "y += d B^T": lambda: dy.addmm_(down, Bc.t()),
            "dx += dyb A": lambda: x.addmm_(down, A), "dyb^T x": lambda: down.t() @ x,
            "dy^T down": lambda: dy.t() @ down,
        }
        for variant, (f, b) in {"current": (f_current, b_current), "swap": (f_swap, b_swap),
                                "k/n-concat": (f_kconcat, b_nconcat), "base": (f_base, b_base)}.items():
            fm, bm = cuda_ms(f, args.iters), cuda_ms(b, args.iters)
            totals[variant] = totals.get(variant, 0.0) + fm + bm
            print(f"{name:10s} {variant:10s} {fm:11.3f} {bm:12.3f}")
        print("  thin ops (ms): " + ", ".join(f"{k} {cuda_ms(v, args.iters):.3f}" for k, v in thin.items()))
    print("\nper decoder layer (forward + backward), x32 for Llama-3.1-8B:")
    for variant, ms in totals.items():
        print(f"  {variant:10s} {ms:7.3f} ms   {32 * ms:7.1f} ms per micro-batch")


if __name__ == "__main__":
    main()
