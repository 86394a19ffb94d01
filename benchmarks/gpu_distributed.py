"""The anchor workload on several GPUs (issue "Many GPUs"): tokens/s over all ranks and peak memory per rank.

    torchrun --standalone --nproc-per-node 1 benchmarks/gpu_distributed.py --model DIR              # 1 GPU
    torchrun --standalone --nproc-per-node 2 benchmarks/gpu_distributed.py --model DIR --strategy ddp
    torchrun --standalone --nproc-per-node 2 benchmarks/gpu_distributed.py --model DIR --strategy fsdp
    torchrun --standalone --nproc-per-node 2 benchmarks/gpu_distributed.py --model DIR --strategy fsdp --full
    torchrun --standalone --nproc-per-node 2 benchmarks/gpu_distributed.py --model DIR --strategy fsdp --qlora
    torchrun --standalone --nproc-per-node 2 benchmarks/gpu_distributed.py --model TINY --device cpu --seq-len 64

The workload is benchmarks/gpu_anchor.py's (../shared/bench's random-weight Llama directory, bf16, LoRA r=16
alpha=16 dropout 0 on all 7 projections, AdamW lr 2e-4 weight decay 0.01, micro-batch 2 x 2048 random
tokens, labels = inputs), trained through lorafit's own data-parallel wrapping (training/distributed.py).

Accumulation stays 8 micro-batches per rank (--grad-accum 8), so each GPU does exactly the one-GPU anchor's
work per step and the effective batch grows with the ranks (2 GPUs: 32 sequences a step): the issue's goal,
">= 1.8x the one-GPU tokens/s", is a throughput ratio, and the 1-process run of this same script (first
line above; strategy none) is its denominator. --grad-accum 4 on 2 GPUs keeps one GPU's effective batch of 16
instead (half the micro-batches between two gradient reductions: a harder test of the communication).

tokens/s = ranks x micro-batch x seq-len x accumulation x timed steps / the slowest rank's time. --full
trains every weight (lr 2e-5, float32 master weights and AdamW state: 8B needs ~128 GiB besides activations,
so FSDP2 on two cards). --device cpu: gloo on CPU cores, float32, for a smoke test on a tiny model directory.
Rank 0 prints one table row and appends to benchmarks/results.jsonl (or --results).
"""

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a directory written by anchor_bench.py make-model")
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"], help="with one process: none")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--qlora", action="store_true", help="LoRA on an NF4 base (sharded under fsdp)")
    p.add_argument("--checkpointing", default="none", choices=["none", "layers", "offload"])
    p.add_argument("--no-kernels", action="store_true", help="the plain PyTorch path (before/after)")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--grad-accum", type=int, default=8, help="micro-batches per optimizer step on each rank")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--foreach", action="store_true", help="AdamW's foreach implementation instead of fused")
    p.add_argument("--results", default=None, help="append here (default: benchmarks/results.jsonl)")
    args = p.parse_args()

    import lorafit
    from _record import RESULTS, record
    from gpu_anchor import model_flops_per_token, matmul_tflops
    from lorafit.finetune import prepare_for_finetuning
    from lorafit.training.distributed import gradient_sync, init_distributed, resolve_strategy, shutdown, wrap_model

    cuda = args.device == "cuda"
    if not cuda:
        torch.set_num_threads(1)
    # torchrun's variables, read here at the entry point (no environment read inside lorafit).
    dist = init_distributed(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                            int(os.environ.get("LOCAL_RANK", "0")), args.device)
    device = dist.device or torch.device(args.device)
    dtype = torch.bfloat16 if cuda else torch.float32
    peak = matmul_tflops() if cuda else None
    cfg = json.loads((Path(args.model) / "config.json").read_text())

    started = time.perf_counter()
    if args.qlora and args.full:
        raise SystemExit("--qlora trains adapters on a 4-bit base: it does not go with --full")
    model, _ = lorafit.load_model(args.model, dtype=dtype, device=device, quantize="nf4" if args.qlora else None)
    load_s = time.perf_counter() - started
    torch.manual_seed(args.seed)  # the same adapters on every rank
    if args.full:
        prepare_for_finetuning(model, "full", verbose=False)
    else:
        lorafit.apply_lora(model, r=16, alpha=16, dropout=0.0, targets="all-linear", verbose=False)
    for p_ in model.parameters():  # as the SFT recipe keeps them: float32 masters
        if p_.requires_grad:
            p_.data = p_.data.float()
    model.activation_checkpointing = args.checkpointing
    model.kernels = not args.no_kernels
    strategy = resolve_strategy(args.strategy, model, dist)
    wrapped = wrap_model(model, strategy, dist, dtype)
    trainable = [p_ for p_ in model.parameters() if p_.requires_grad]  # after wrapping: FSDP2's are new
    optimizer = torch.optim.AdamW(trainable, lr=2e-5 if args.full else 2e-4, weight_decay=0.01,
                                  fused=cuda and not args.foreach)
    model.train()

    g = torch.Generator().manual_seed(args.seed * 1009 + dist.rank)  # each rank its own micro-batches
    n_micro = (args.warmup + args.steps) * args.grad_accum
    data = torch.randint(0, cfg["vocab_size"], (n_micro, args.micro_batch, args.seq_len), generator=g).to(device)
    autocast = torch.autocast("cuda", dtype=dtype) if cuda else torch.autocast("cpu", enabled=False)

    def synchronize():
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        total = torch.zeros((), device=device)
        for m in range(args.grad_accum):
            x = data[step * args.grad_accum + m]
            with gradient_sync(wrapped, m == args.grad_accum - 1):  # reduce once per step
                with autocast:
                    loss = wrapped(x, labels=x).loss
                (loss / args.grad_accum).backward()
            total += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(dist.sum_tensor(total).item() / args.grad_accum / dist.world_size)
        if dist.is_main:
            print(f"step {step} {'warm-up' if step < args.warmup else 'timed'} {times[-1]:.3f}s "
                  f"loss {losses[-1]:.4f}", flush=True)

    timed = max(dist.gather_objects(sum(times[args.warmup:])))  # the slowest rank sets the pace
    tokens = dist.world_size * args.micro_batch * args.seq_len * args.grad_accum * args.steps
    tokens_per_s = tokens / timed
    if cuda:
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
    else:  # the process's peak resident memory (ru_maxrss is in KiB on Linux)
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peaks = dist.gather_objects(round(peak_gib, 2))
    if dist.is_main:
        attention = 6 * cfg["num_hidden_layers"] * cfg["num_attention_heads"] * (
            cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]) * args.seq_len
        flops = model_flops_per_token(cfg, 16, args.seq_len)
        if args.full:  # every weight trains: 6 instead of 4 FLOPs per weight, no adapters
            flops = 1.5 * (model_flops_per_token(cfg, 0, args.seq_len) - attention) + attention
        mfu = flops * tokens_per_s / dist.world_size / (peak * 1e12) if peak else None
        row = {
            "system": "lorafit", "model": Path(args.model).name,
            "method": "full" if args.full else "qlora" if args.qlora else "lora",
            "strategy": strategy, "ranks": dist.world_size, "checkpointing": args.checkpointing,
            "kernels": not args.no_kernels, "tokens_per_s": round(tokens_per_s),
            "tokens_per_s_per_rank": round(tokens_per_s / dist.world_size),
            "peak_GiB_per_rank": peaks, "mfu": round(mfu, 3) if mfu else None,
            "peak_tflops": round(peak) if peak else None, "losses": [round(x, 4) for x in losses],
            "load_s": round(load_s, 1),
        }
        print(f"| {row['model']} | {row['method']} | {strategy} x {dist.world_size} | {row['tokens_per_s']} tok/s "
              f"| {row['tokens_per_s_per_rank']} per rank | peak {peaks} GiB | "
              f"MFU {f'{100 * mfu:.1f}%' if mfu else '-'} |", flush=True)
        record("gpu_distributed", [row], results=args.results or RESULTS, device=args.device,
               micro_batch=args.micro_batch, seq_len=args.seq_len, grad_accum_per_rank=args.grad_accum,
               effective_batch=args.micro_batch * args.grad_accum * dist.world_size, lora_r=None if args.full else 16)
    dist.barrier()
    shutdown(dist)


if __name__ == "__main__":
    main()
