"""The anchor workload on a GPU, for lorafit: tokens/s, peak memory and MFU, beside Unsloth's and PEFT's.

    python benchmarks/gpu_anchor.py --model DIR [--checkpointing none|layers|offload | --memory-budget GiB]
                                    [--qlora] [--results FILE]

The workload is ../shared/bench's (run that harness in the same call for the competitors): a random-weight
model with a real Llama architecture saved by `anchor_bench.py make-model`, bf16, LoRA r=16 alpha=16
dropout 0 on q,k,v,o,gate,up,down, AdamW lr 2e-4 weight decay 0.01, micro-batch 2 x 2048 random tokens
(labels = inputs, no padding), gradient accumulation 8, the same seeded data, warm-up steps untimed. lorafit
trains as its SFT recipe does: float32 adapter weights, bf16 autocast, and micro-batches replayed from a CUDA
graph where the estimate's clocks say the host is the slower one (training/cuda_graphs.py;
`--disable-kernels cuda_graphs` turns that off; `--replay` replays wherever a graph can run, for measuring
what the clocks decide). The allocator counts a graph's pool as allocated only while
it is recorded, and what outlives the recording in it: peak_GiB is the whole pool beside the timed steps'
peak outside it (or the warm-up's peak when higher).

Model FLOPs per token = 4 N_frozen + 6 N_lora + 6 L d_attn s, as the harness counts them; MFU is against
--peak-tflops (default: a bf16 8192^3 matmul measured here, first).

--qlora: the base loaded as NF4 (QLoRA). The longest trainable context, beside Unsloth's: max_context.py.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

# As the lorafit command sets it (cli.py), and the anchor harness for Unsloth.
if "PYTORCH_ALLOC_CONF" not in os.environ and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
    os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))


def model_flops_per_token(cfg: dict, r: int, seq: int) -> float:
    d, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]  # q k v o gate up down
    frozen = layers * sum(i * o for i, o in shapes) + d * cfg["vocab_size"]
    lora = layers * sum(r * (i + o) for i, o in shapes)
    attention = 6 * layers * q * seq  # QK^T and PV, forward and backward, halved by causality
    return 4 * frozen + 6 * lora + attention


def matmul_tflops() -> float:
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * 20 / (time.perf_counter() - start) / 1e12


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a directory written by anchor_bench.py make-model")
    p.add_argument("--checkpointing", default="none", choices=["none", "layers", "offload"])
    p.add_argument("--memory-budget", type=float, default=None,
                   help="GiB: lorafit plans the checkpointing itself (train.activation_checkpointing: auto)")
    p.add_argument("--no-kernels", action="store_true", help="the plain PyTorch path (before/after)")
    p.add_argument("--disable-kernels", nargs="*", default=[], help="some of them off (CausalLM.KERNELS)")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--grad-accum", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--qlora", action="store_true", help="an NF4 base (QLoRA)")
    p.add_argument("--results", default=None, help="append here (default: benchmarks/results.jsonl)")
    p.add_argument("--replay", action="store_true",
                   help="replay from a CUDA graph wherever one can run, whatever the estimate's clocks say")
    args = p.parse_args()

    import lorafit
    from _record import RESULTS, record

    peak = args.peak_tflops or matmul_tflops()
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    started = time.perf_counter()
    model, _ = lorafit.load_model(args.model, dtype="bfloat16", device="cuda",
                                  quantize="nf4" if args.qlora else None)
    load_s = time.perf_counter() - started
    torch.manual_seed(args.seed)
    lorafit.apply_lora(model, r=16, alpha=16, dropout=0.0, targets="all-linear")
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # as the SFT recipe keeps them: float32 masters
        p.data = p.data.float()
    model.activation_checkpointing = args.checkpointing
    model.kernels = not args.no_kernels
    if args.disable_kernels:
        model.disable_kernels(args.disable_kernels)
    tokens = args.micro_batch * args.seq_len
    # As the SFT recipe decides (training/loop.py's choose_checkpointing): replay from a CUDA graph where the
    # estimate's clocks say the host is the slower one.
    from lorafit.estimate import DEVICES, card_named, plan_training
    from lorafit.memory import GiB, estimate_training_memory, mlp_tile_chunk
    from lorafit.training.cuda_graphs import GraphedMicroBatches, can_graph

    checkpointing = "auto" if args.memory_budget is not None else args.checkpointing
    budget = int(args.memory_budget * GiB) if args.memory_budget is not None else None
    modes, replay = plan_training(model, tokens, args.seq_len, checkpointing, budget, "qlora" if args.qlora else "lora",
                                  lambda modes: can_graph(model, torch.device("cuda"), False, modes),
                                  DEVICES.get(card_named(torch.cuda.get_device_name())))
    if args.replay:  # the plan's checkpointing, replayed even where the clocks say the GPU is the slower one
        replay = can_graph(model, torch.device("cuda"), False, modes)
    if args.memory_budget is not None:
        model.activation_checkpointing = modes
        estimate = estimate_training_memory(model, tokens, modes, graphed=replay)
        chunk = mlp_tile_chunk(model, tokens)
        print(f"plan for {args.memory_budget} GiB: {modes.count('offload')} layers offloaded, "
              f"{modes.count('layers')} recomputed" + (f", the MLPs {chunk:,} tokens at a time" if chunk else "")
              + f"; estimated {estimate.summary()}")
    model.train()

    g = torch.Generator().manual_seed(args.seed)
    n_micro = (args.warmup + args.steps) * args.grad_accum
    data = torch.randint(0, cfg["vocab_size"], (n_micro, args.micro_batch, args.seq_len), generator=g).cuda()
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.01, fused=True)
    graphs = GraphedMicroBatches(model, trainable, torch.bfloat16) if replay else None
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    warm_peak = 0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:  # a replay allocates nothing: the timed steps' peak is what lives outside the graph
            warm_peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        total = torch.zeros((), device="cuda")
        for m in range(args.grad_accum):
            x = data[step * args.grad_accum + m]
            if graphs is not None:
                total += graphs({"input_ids": x, "labels": x}, 1 / args.grad_accum) * args.grad_accum
                continue
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x, labels=x).loss
            (loss / args.grad_accum).backward()
            total += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(total.item() / args.grad_accum)
        print(f"step {step} {'warm-up' if step < args.warmup else 'timed'} {times[-1]:.3f}s loss {losses[-1]:.4f}",
              flush=True)

    timed_peak, pool = torch.cuda.max_memory_allocated(), graphs.pool_bytes() if graphs is not None else 0
    in_pool = graphs.pool_bytes(allocated=True) if graphs is not None else 0  # counted in timed_peak too
    if pool:
        print(f"graph pool {pool / 2**30:.3f} GiB, of it {in_pool / 2**30:.3f} GiB allocated between replays; "
              f"outside it at most {(timed_peak - in_pool) / 2**30:.3f} GiB")
    timed = times[args.warmup:]
    tokens_per_s = args.micro_batch * args.seq_len * args.grad_accum * len(timed) / sum(timed)
    mfu = model_flops_per_token(cfg, 16, args.seq_len) * tokens_per_s / (peak * 1e12)
    modes = model.activation_checkpointing
    if isinstance(modes, str):
        checkpointing = modes
    else:  # "J of N offloaded", "K of N recomputed" or both (estimate_check.py reads it back)
        counts = [(modes.count(m), word) for m, word in (("offload", "offloaded"), ("layers", "recomputed"))]
        checkpointing = ", ".join(f"{c} of {len(modes)} {word}" for c, word in counts if c) or f"0 of {len(modes)} offloaded"
    row = {
        "system": "lorafit", "model": Path(args.model).name, "checkpointing": checkpointing,
        "memory_budget_GiB": args.memory_budget,
        "kernels": not args.no_kernels, "disabled_kernels": args.disable_kernels,
        "tokens_per_s": round(tokens_per_s), "peak_alloc_GiB": round(max(warm_peak, timed_peak) / 2**30, 2),
        "peak_reserved_GiB": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "cuda_graph": pool > 0, "graph_pool_GiB": round(pool / 2**30, 2),
        # What the run holds at its peak: with a graph, its whole pool beside what lives outside it.
        "peak_GiB": round(max(warm_peak, timed_peak - in_pool + pool) / 2**30, 2),
        "mfu": round(mfu, 3), "peak_tflops": round(peak), "losses": [round(x, 4) for x in losses], "qlora": args.qlora,
        "load_s": round(load_s, 1),
    }
    row["mlp_chunk"] = mlp_tile_chunk(model, tokens)  # the MLPs this many tokens at a time (0: untiled)
    row["alloc_conf"] = os.environ.get("PYTORCH_ALLOC_CONF", os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
    row.update(what_estimate_says(args, cfg, modes, graphed=pool > 0, tiling=model.mlp_tiling))
    step_s = sum(timed) / len(timed)
    row["step_s"] = round(step_s, 3)
    print(f"estimate (lorafit estimate, issue 10): peak {row['estimate_peak_GiB']} GiB vs {row['peak_GiB']} "
          f"measured ({100 * (row['estimate_peak_GiB'] / row['peak_GiB'] - 1):+.1f}%); step "
          f"{row['estimate_step_s']} s vs {row['step_s']} s ({100 * (row['estimate_step_s'] / step_s - 1):+.1f}%)")
    label = f"{'QLoRA, ' if args.qlora else ''}{checkpointing}{'' if model.kernels else ', no kernels'}" + \
        "".join(f", no {name}" for name in args.disable_kernels)
    label += ", CUDA graph" if row["cuda_graph"] else ""
    print(f"| {row['model']} | lorafit ({label}) | {row['tokens_per_s']} | {row['peak_GiB']} GiB "
          f"(allocated {row['peak_alloc_GiB']}, reserved {row['peak_reserved_GiB']}) "
          f"| MFU {100 * mfu:.1f}% |")
    record("gpu_anchor", [row], results=args.results or RESULTS, micro_batch=args.micro_batch,
           seq_len=args.seq_len, grad_accum=args.grad_accum, lora_r=16)


def what_estimate_says(args, cfg: dict, modes, graphed: bool, tiling) -> dict:
    """`lorafit estimate` for this run, computed as the command computes it: the model built on the meta
    device from config.json, the peak memory of lorafit/memory.py for the checkpointing used here, and the
    step time of lorafit/estimate.py at this card's table rate."""
    from lorafit import Config
    from lorafit.estimate import DEVICES, build_meta_model, card_named, estimate
    from lorafit.memory import GiB

    config = Config.from_dict({
        "model": {"source": args.model, "dtype": "bfloat16", "max_seq_length": args.seq_len},
        "finetune": {"method": "qlora" if args.qlora else "lora", "r": 16, "alpha": 16},
        "train": {"batch_size": args.micro_batch, "grad_accum": args.grad_accum}})
    meta = build_meta_model(config, cfg)
    meta.mlp_tiling = tiling  # as the planner left the trained model's MLPs
    modes = [modes] * cfg["num_hidden_layers"] if isinstance(modes, str) else list(modes)
    card = card_named(torch.cuda.get_device_name())
    result = estimate(config, meta, args.micro_batch * args.seq_len, args.seq_len, modes, None, DEVICES[card],
                      graphed)
    return {"estimate_peak_GiB": round(result.memory.total / GiB, 2), "estimate_step_s": round(result.step_seconds, 3),
            "estimate_card": card}


if __name__ == "__main__":
    main()
