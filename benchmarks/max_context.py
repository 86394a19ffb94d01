"""The longest context that trains: the same search for lorafit and for Unsloth, on one GPU (issue 6).

    python benchmarks/max_context.py --model DIR --system lorafit|unsloth|unsloth-qlora [--qlora]
                                     [--cap-gib G] [--start 8192] [--resolution 1024] [--results FILE]

A probe trains one optimizer step (forward, backward, AdamW) at micro-batch 1 on `length` random tokens
(labels = inputs) with LoRA r=16 alpha=16 on all 7 projections, as the anchor workload does; it fits if it
does not run out of GPU memory. The search doubles from --start until a probe fails, then bisects to
--resolution tokens. Every layer is checkpointed, each system its own way: lorafit offloads every layer's
input to pinned CPU memory (activation_checkpointing "offload"); Unsloth runs with its default
use_gradient_checkpointing="unsloth", which also offloads.

--cap-gib: the search on a smaller card. torch.cuda.set_per_process_memory_fraction caps what PyTorch's
allocator may hold (both systems allocate through it). On the whole 141 GiB of an H200 the longest contexts
of Llama-3.1-8B QLoRA run past a million tokens, and one probe there is over an hour of attention (its work
grows with the square of the length), so the search runs under a cap, the same cap for both systems.

Unsloth is built by the anchor harness's own builder (`build_unsloth` of ../shared/bench/anchor_bench.py,
carried as .anchor/), so it is configured exactly as in the throughput runs. Unsloth cuts inputs longer than
the model's `max_seq_length` and builds RoPE tables for that length, so each probe sets it to the probe's
length, as a user training at that length would have set it at load.
"""

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # as the anchor harness runs Unsloth

import torch  # noqa: E402

HERE = Path(__file__).parent
GiB = 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a directory written by anchor_bench.py make-model")
    p.add_argument("--system", default="lorafit", choices=["lorafit", "unsloth", "unsloth-qlora"])
    p.add_argument("--qlora", action="store_true", help="lorafit: an NF4 base (unsloth-qlora is Unsloth's)")
    p.add_argument("--cap-gib", type=float, default=None, help="GPU memory PyTorch may hold (default: all)")
    p.add_argument("--start", type=int, default=8192)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--harness", default=str(HERE.parent / ".anchor" / "anchor_bench.py"))
    p.add_argument("--site-root", default="/tmp/anchor_site", help="where run_all.sh unpacked the harness's sites")
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--results", default=None, help="append here (default: benchmarks/results.jsonl)")
    args = p.parse_args()

    total = torch.cuda.get_device_properties(0).total_memory
    if args.cap_gib is not None:
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GiB / total))
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    started = time.perf_counter()
    if args.system == "lorafit":
        model, autocast, set_length = load_lorafit(args)
    else:
        model, autocast, set_length = load_unsloth(args)
    load_s = time.perf_counter() - started
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()

    probes = []

    def fits(length: int) -> bool:
        set_length(length)
        probes.append(one_step(model, trainable, cfg["vocab_size"], length, autocast))
        print(f"  {length:,} tokens: {probes[-1]['result']} ({probes[-1]['seconds']} s, peak "
              f"{probes[-1]['peak_GiB']} GiB)", flush=True)
        return probes[-1]["result"] == "fits"

    longest = longest_trainable(fits, args.start, args.resolution)
    qlora = args.qlora or args.system == "unsloth-qlora"
    label = f"{args.system}{' QLoRA' if args.qlora else ''}"
    cap = f"capped at {args.cap_gib} GiB" if args.cap_gib else f"all {total / GiB:.0f} GiB"
    print(f"| {Path(args.model).name} | {label} | {cap} | longest trainable context {longest:,} tokens |")
    from _record import RESULTS, record

    row = {"system": args.system, "model": Path(args.model).name, "qlora": qlora, "micro_batch": 1,
           "cap_GiB": args.cap_gib, "card_GiB": round(total / GiB, 1), "max_context_tokens": longest,
           "resolution_tokens": args.resolution, "load_s": round(load_s, 1), "probes": probes}
    record("gpu_max_context", [row], results=args.results or RESULTS)


def longest_trainable(fits, start: int, resolution: int) -> int:
    """The longest multiple of `resolution` tokens for which fits(length) holds, assuming it holds for every
    shorter length: doubling from `start` until it fails, then bisection. 0 if even `start` fails."""
    low, high = 0, start
    while fits(high):
        low, high = high, high * 2
    while high - low > resolution:
        mid = (low + high) // 2 // resolution * resolution
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def one_step(model, trainable, vocab_size: int, length: int, autocast) -> dict:
    """One AdamW step at micro-batch 1 on `length` random tokens: fits or out of memory, its peak and time."""
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.01, fused=True)
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        x = torch.randint(0, vocab_size, (1, length), device="cuda")
        with autocast():
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize()
        result = "fits"
    except torch.OutOfMemoryError:
        result = "out of memory"
    except RuntimeError as e:  # some kernels report it as a plain RuntimeError
        if "out of memory" not in str(e):
            raise
        result = "out of memory"
    seconds = time.perf_counter() - started
    loss = x = None
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    gc.collect()  # the failed step's frames hold tensors until collected
    torch.cuda.empty_cache()
    return {"tokens": length, "result": result, "seconds": round(seconds, 1),
            "peak_GiB": round(torch.cuda.max_memory_allocated() / GiB, 2)}


def load_lorafit(args):
    import lorafit

    model, _ = lorafit.load_model(args.model, dtype="bfloat16", device="cuda",
                                  quantize="nf4" if args.qlora else None)
    torch.manual_seed(args.seed)
    lorafit.apply_lora(model, r=16, alpha=16, dropout=0.0, targets="all-linear")
    for p in model.parameters():
        if p.requires_grad:  # as the SFT recipe keeps them: float32 masters under bf16 autocast
            p.data = p.data.float()
    model.activation_checkpointing = "offload"  # what the longest contexts need

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16)

    return model, autocast, lambda length: None


def load_unsloth(args):
    spec = importlib.util.spec_from_file_location("anchor_bench", args.harness)
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    harness._set_env()
    harness._add_sites([os.path.join(args.site_root, site) for site in harness.SYSTEMS[args.system][1]])
    os.makedirs("/tmp/anchor_work", exist_ok=True)
    os.chdir("/tmp/anchor_work")  # Unsloth writes compiled caches into the working directory
    built = harness.SYSTEMS[args.system][0](argparse.Namespace(
        model=os.path.abspath(args.model), model_dir=os.path.dirname(os.path.abspath(args.model)),
        seq_len=args.start, no_gc=False, seed=args.seed, kbit_prepare=False))
    model = built.model

    def set_length(length: int) -> None:  # what FastLanguageModel.from_pretrained(max_seq_length=) sets
        for module in model.modules():
            if hasattr(module, "max_seq_length"):
                module.max_seq_length = length

    return model, contextlib.nullcontext, set_length  # Unsloth trains in bf16 without autocast, as the harness runs it


if __name__ == "__main__":
    main()
