"""Where the anchor workload's GPU time goes, and how fast the host link is.

    python benchmarks/gpu_profile.py --preset llama-3.1-8b [--checkpointing none|layers|offload] [--no-kernels]
                                     [--qlora] [--mlp-chunk 2048]

Builds the preset's architecture with random weights straight on the GPU (no 16 GB checkpoint on disk),
applies LoRA r=16 to all 7 projections as gpu_anchor.py does, and profiles the forward and backward of one
micro-batch (2 x 2048 tokens). Prints the host's own cost of a micro-batch (timed at 2 x 128 tokens, where
the GPU has next to nothing to do), the time a micro-batch takes and when the host was done launching it,
device time by kind of kernel (GEMM, attention, Triton, elementwise, copies), where the GPU sat idle between
kernels (the host launching too slowly, under the profiler's own overhead), the largest matmuls by shape,
and the pinned host<->device copy rates that bound what offloading activations can hide. A diagnostic: it
records nothing.
"""

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

# The public config.json values of meta-llama/Llama-3.2-1B and Llama-3.1-8B (as ../shared/bench uses them).
_LLAMA3_ROPE = {"rope_type": "llama3", "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192}
PRESETS = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                         rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                         rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}),
}
KINDS = [  # first match wins
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|sm90_|cublas", re.I)),
    ("attention", re.compile(r"flash|fmha|cudnn|attention|sdpa", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy", re.I)),
    ("triton", re.compile(r"^_|triton", re.I)),
    ("reduction", re.compile(r"reduce", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled|foreach", re.I)),
]


def hf_config(preset: str) -> dict:
    """The preset's config.json, as ../shared/bench writes it."""
    return {"model_type": "llama", "vocab_size": 128256, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 131072, "bos_token_id": 128000, "eos_token_id": 128001, **PRESETS[preset]}


def build_model(preset: str, qlora: bool = False):
    import lorafit
    from lorafit.models.llama import CausalLM
    from lorafit.models.loading import _is_quantizable, _swap_module
    from lorafit.models.registry import model_config_from_hf
    from lorafit.nn.nf4 import NF4Linear

    hf = hf_config(preset)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = CausalLM(model_config_from_hf(hf)).to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
        p.requires_grad_(False)
    if qlora:  # the decoder's projections in NF4, as load_model(quantize="nf4") leaves them
        for name, module in list(model.named_modules()):
            if _is_quantizable(name, module):
                _swap_module(model, name, NF4Linear.from_linear(module))
        torch.cuda.empty_cache()
    lorafit.apply_lora(model, r=16, alpha=16, dropout=0.0, targets="all-linear")
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # float32 masters, as the SFT recipe keeps them
    return model, hf


def host_link_rates(gib: float = 1.0) -> dict:
    n = int(gib * 2**30)
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    host2, dev2 = torch.empty_like(host).pin_memory(), torch.empty_like(dev)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / 5

    h2d = timed(lambda: dev.copy_(host, non_blocking=True))
    d2h = timed(lambda: host.copy_(dev, non_blocking=True))

    def both():
        with torch.cuda.stream(s1):
            dev.copy_(host, non_blocking=True)
        with torch.cuda.stream(s2):
            host2.copy_(dev2, non_blocking=True)

    duplex = timed(both)
    return {"h2d_GBps": n / h2d / 1e9, "d2h_GBps": n / d2h / 1e9, "duplex_each_GBps": n / duplex / 1e9}


def print_idle_gaps(kernels, top: int, what: str, at_least_us: float = 5.0) -> None:
    """Where the GPU waits between kernels: the span from the first kernel's start to the last one's end
    against the time some kernel runs, and the longest gaps with the kernels either side and when they began
    (a gap after a short kernel is the host launching too slowly; one before a copy, a wait on the host)."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in kernels)
    busy, gaps, end = 0.0, [], spans[0][0]
    for i, (start, stop, _) in enumerate(spans):
        if start > end and start - end >= at_least_us:
            gaps.append((start - end, spans[i - 1][2], spans[i][2], end - spans[0][0]))
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    span = end - spans[0][0]
    print(f"\n{what}: GPU span {span / 1e3:.1f} ms, running {busy / 1e3:.1f} ms; {len(gaps)} gaps of "
          f">= {at_least_us:.0f} us take {sum(g[0] for g in gaps) / 1e3:.1f} ms, the longest:")
    for gap, before, after, at in sorted(gaps, reverse=True)[:top]:
        print(f"  {gap:8.1f} us at {at / 1e3:6.1f} ms  after {before[:45]}  before {after[:45]}")


def micro_step(model, x):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x, labels=x).loss
    loss.backward()


def host_cost(model, vocab_size: int, micro_batch: int, seq_len: int = 128, repeats: int = 4) -> tuple[float, float]:
    """-> (forward, backward) seconds of host time a micro-batch of micro_batch x seq_len tokens costs: at 128
    tokens a row the GPU's work is next to nothing, so the host's launching is all that is timed. Against
    the micro-batch's GPU time it says whether the GPU waits on the host (Llama-3.1-8B QLoRA, every layer
    offloaded: 326 ms of host to ~333 ms of GPU work, device call 73)."""
    x = torch.randint(0, vocab_size, (micro_batch, seq_len), device="cuda")
    forward = backward = 0.0
    for i in range(repeats + 2):  # two warm-ups: first calls compile and allocate
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, labels=x).loss
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        loss.backward()
        torch.cuda.synchronize()
        if i >= 2:
            forward, backward = forward + t1 - t0, backward + time.perf_counter() - t1
    return forward / repeats, backward / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-3.1-8b", choices=list(PRESETS))
    p.add_argument("--checkpointing", default="none")
    p.add_argument("--no-kernels", action="store_true")
    p.add_argument("--disable-kernels", nargs="*", default=[], help="names from CausalLM.KERNELS")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--timed", type=int, default=6, help="micro-batches timed without the profiler")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--skip-link", action="store_true")
    p.add_argument("--qlora", action="store_true", help="the projections in NF4")
    p.add_argument("--mlp-chunk", type=int, default=0,
                   help="tokens a tiled MLP runs at a time (nn/tiled_mlp.py; the memory modes' halves: 2048)")
    args = p.parse_args()

    if not args.skip_link:
        print("host link (pinned, 1 GiB):", {k: round(v, 1) for k, v in host_link_rates().items()})
    model, hf = build_model(args.preset, args.qlora)
    model.activation_checkpointing = args.checkpointing
    if args.mlp_chunk:
        model.tile_mlp_from(args.micro_batch * args.seq_len, args.mlp_chunk)
    model.kernels = not args.no_kernels
    if args.disable_kernels:
        model.disable_kernels(args.disable_kernels)
    model.train()
    x = torch.randint(0, hf["vocab_size"], (args.micro_batch, args.seq_len), device="cuda")
    for _ in range(2):
        micro_step(model, x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(args.timed):
        micro_step(model, x)
    host_s = time.perf_counter() - t  # the host's launching, less the queue it leaves behind at the end
    torch.cuda.synchronize()
    per_micro = (time.perf_counter() - t) / args.timed
    tokens = args.micro_batch * args.seq_len
    tiling = f" MLP {args.mlp_chunk} tokens at a time" if args.mlp_chunk else ""
    host_forward, host_backward = host_cost(model, hf["vocab_size"], args.micro_batch)
    print(f"host alone ({args.micro_batch} x 128 tokens, GPU work next to nothing): "
          f"forward {host_forward * 1e3:.1f} ms, backward {host_backward * 1e3:.1f} ms")
    print(f"{args.preset} checkpointing={args.checkpointing} kernels={not args.no_kernels} "
          f"off={args.disable_kernels}{tiling}: "
          f"{per_micro * 1e3:.1f} ms per micro-batch (fwd+bwd, no optimizer) = {tokens / per_micro:,.0f} tok/s, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB; the host returned after "
          f"{host_s / args.timed * 1e3:.1f} ms a micro-batch")

    from torch.profiler import ProfilerActivity, profile

    # verbose: without it the events of torch 2.11-2.13 carry no Python frames, and the copies below were
    # printed without their callers (device calls 43-46).
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True, with_stack=True,
                 experimental_config=torch.profiler._ExperimentalConfig(verbose=True)) as prof:
        micro_step(model, x)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_kind, by_name = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for e in kernels:
        kind = next((k for k, rx in KINDS if rx.search(e.name)), "other")
        by_kind[kind] += e.device_time
        by_name[e.name][0] += e.device_time
        by_name[e.name][1] += 1
    total = sum(by_kind.values())
    print(f"\ndevice time {total / 1e3:.1f} ms in {len(kernels)} kernels (one micro-batch, under the profiler)")
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:12s} {us / 1e3:8.1f} ms  {100 * us / total:5.1f}%")
    print_idle_gaps(kernels, args.top, "any kernel")
    # Offloading's copies run on a side stream: without them, the gaps are where the compute stream waits.
    compute = [e for e in kernels if not re.match(r"Memcpy [DH]to[DH]", e.name)]
    print_idle_gaps(compute, args.top, "compute kernels (no copies)")
    print(f"\ntop {args.top} kernels by device time")
    for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"  {us / 1e3:8.2f} ms  x{n:<4d} {name[:110]}")
    print("\nmatmul ops by input shapes (device time)")
    averages = prof.key_averages(group_by_input_shape=True)
    mm = [a for a in averages if a.key in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")]
    for a in sorted(mm, key=lambda a: -a.device_time_total)[: args.top]:
        print(f"  {a.device_time_total / 1e3:8.2f} ms  x{a.count:<4d} {a.key:12s} {a.input_shapes}")
    print("\nhost time by op (self CPU time: what launching costs; the GPU waits when this exceeds its work)")
    ops = [a for a in prof.key_averages() if a.self_cpu_time_total > 0]
    host = sum(a.self_cpu_time_total for a in ops)
    print(f"  {host / 1e3:.1f} ms of host time in {sum(a.count for a in ops)} op calls")
    for a in sorted(ops, key=lambda a: -a.self_cpu_time_total)[: args.top]:
        print(f"  {a.self_cpu_time_total / 1e3:8.2f} ms  x{a.count:<5d} {a.key[:90]}")
    print("\ncopies, casts, fills and elementwise ops by caller (device time; the Python frames that asked for them)")
    averages = prof.key_averages(group_by_input_shape=True, group_by_stack_n=4)
    small = ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::add", "aten::add_", "aten::mul", "aten::mul_",
             "aten::zero_", "aten::fill_")
    copies = [a for a in averages if a.key in small]
    for a in sorted(copies, key=lambda a: -a.device_time_total)[:12]:
        print(f"  {a.device_time_total / 1e3:8.2f} ms  x{a.count:<4d} {a.key:12s} {a.input_shapes}")
        for frame in a.stack[:4]:
            print(f"        {frame}")


if __name__ == "__main__":
    main()
