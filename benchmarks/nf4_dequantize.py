"""NF4 dequantisation of one Llama-3.1-8B decoder layer, as QLoRA training runs it, in TB/s of memory traffic.

    python benchmarks/nf4_dequantize.py [--sweep]

A QLoRA micro-batch dequantises every layer's seven weights twice (forward and backward, never kept): 218 M
values, 549 MB of traffic a layer in bf16, 64 times per 8B micro-batch. This times the kernel writing where
the fused functions want the values: q, k, v into the rows of their stacked matrix, gate and up into the
MLP's M, down into D (kernels/lora_stacked.py, kernels/lora_mlp.py), o alone; each layer's 7 launches
recorded into a CUDA graph and replayed, so that the GPU's time is what is timed (graph_ms). --sweep also
tries other program sizes and warp counts (kernels/nf4_dequantize.py's _BLOCKS_PER_PROGRAM, _LAUNCH_OPTIONS).

Measured on an H200: 155.5 us a layer, 3.53 TB/s (device call 63; a plain copy of 587 MB ran at 4.15 TB/s in call
62), 10.4 ms of the 8B QLoRA micro-batch. The sweep's best, 64 blocks of 2 warps, was within 3% of the
shipped 4 warps (call 51). Tried and dropped: the values as a (bytes, 2) tile already in memory order instead of
interleaved through shared memory, from one gather a byte of a 256-entry table of (high, low) code pairs (269
us) or from two gathers joined (225); the latter with a compare for the row instead of a division of every
offset by the row length took 190, which is how the shipped kernel finds rows now (call 51). Each byte's two
bf16 values packed into one 32-bit word by bit operations and stored from the load's own layout, with no
interleave: 160 us against 155.5 (call 63; each thread then writes 64 contiguous bytes, a warp's store spread
over 2 KB). Dequantising the MLP's weights ahead on a second stream, beside the GEMMs, made the QLoRA
micro-batch slower (call 52: 16,502 tokens/s against 16,551, 0.1 GiB more), the GEMMs leaving no room on the
SMs. A diagnostic: it records nothing.
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent))

from _record import cuda_ms  # noqa: E402
from lorafit.kernels import nf4_dequantize  # noqa: E402
from lorafit.nn.nf4 import NF4Linear  # noqa: E402

C, I, Q, KV, R = 4096, 14336, 4096, 1024, 16  # Llama-3.1-8B, LoRA r = 16


def layer_weights() -> dict[str, NF4Linear]:
    """The seven projections of one decoder layer as double-quantised NF4, random weights."""
    shapes = {"q": (Q, C), "k": (KV, C), "v": (KV, C), "o": (C, Q), "gate": (I, C), "up": (I, C), "down": (C, I)}
    return {name: NF4Linear.from_weight(torch.randn(shape, device="cuda") * 0.02, compute_dtype=torch.bfloat16)
            for name, shape in shapes.items()}


def dequantize_layer(w: dict[str, NF4Linear]):
    """What one pass of a QLoRA layer writes: the destinations as the fused functions lay them out."""
    qkv = torch.empty(Q + 2 * KV + 3 * R, C + 3 * R, dtype=torch.bfloat16, device="cuda")
    w["q"].dequantize_into(qkv[:Q, :C])
    w["k"].dequantize_into(qkv[Q:Q + KV, :C])
    w["v"].dequantize_into(qkv[Q + KV:Q + 2 * KV, :C])
    w["o"].dequantized_weight(torch.bfloat16)
    m = torch.empty(2 * I + 2 * R, C + 2 * R, dtype=torch.bfloat16, device="cuda")
    w["gate"].dequantize_into(m[:I, :C])
    w["up"].dequantize_into(m[I:2 * I, :C])
    d = torch.empty(C, I + R, dtype=torch.bfloat16, device="cuda")
    w["down"].dequantize_into(d[:, :I])


def graph_ms(fn, calls: int = 10, replays: int = 5) -> float:
    """Milliseconds a call of fn() takes on the GPU alone: `calls` calls recorded into one CUDA graph, replayed
    `replays` times, the fastest replay over calls. Launching from the host (7 Triton launches and 3
    allocations a layer, ~250 us of GPU work) took about as long as the kernels: timed eagerly, the same
    configuration moved between 277 and 448 us a layer within one call (device call 50)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    best = float("inf")
    for _ in range(replays):
        best = min(best, cuda_ms(graph.replay, iters=1) / calls)
    return best


def traffic(w: dict[str, NF4Linear]) -> int:
    """Bytes a layer's dequantisation moves: bf16 out, 4-bit codes and 1-byte absmax codes in."""
    values = sum(m.in_features * m.out_features for m in w.values())
    return values * 2 + values // 2 + values // 64


def report(label: str, w: dict[str, NF4Linear]) -> None:
    moved = traffic(w)
    ms = graph_ms(lambda: dequantize_layer(w))
    print(f"{label}: {ms * 1e3:.1f} us a layer, {moved / ms / 1e9:.2f} TB/s ({moved / 1e6:.0f} MB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="also time other program sizes and warp counts")
    args = p.parse_args()
    torch.manual_seed(0)
    w = layer_weights()
    report("as shipped", w)
    if not args.sweep:
        return
    blocks, options = nf4_dequantize._BLOCKS_PER_PROGRAM, nf4_dequantize._LAUNCH_OPTIONS
    # Program sizes must divide the 256 blocks of a nested scale (the kernel's static assert).
    for n_blocks, warps in itertools.product((16, 32, 64, 128, 256), (2, 4, 8, 16)):
        nf4_dequantize._BLOCKS_PER_PROGRAM = n_blocks
        nf4_dequantize._LAUNCH_OPTIONS = options | {"num_warps": warps}
        try:
            report(f"  shipped, {n_blocks} blocks, {warps} warps", w)
        except Exception as e:  # out of registers at this size
            print(f"  {n_blocks} blocks, {warps} warps: {type(e).__name__}")
    nf4_dequantize._BLOCKS_PER_PROGRAM, nf4_dequantize._LAUNCH_OPTIONS = blocks, options


if __name__ == "__main__":
    main()
