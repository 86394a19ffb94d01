"""Greedy generation speed on CPU: lorafit vs transformers' `generate`, same weights, same machine.

    python benchmarks/generation_cpu.py [--model default] [--new-tokens 64] [--repeats 3]

Both generate exactly --new-tokens tokens per sequence (end-of-sequence stopping is switched off on both
sides so that the work is equal), at batch 1 and batch 8 with prompts of different lengths (left padding).
Prints a table and appends it to benchmarks/results.jsonl.
"""

import argparse
import statistics
import time

import torch

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain in one paragraph why the sky is blue, as if to a ten-year-old child.",
    "def fibonacci(n):",
    "List three fruits:",
    "Once upon a time, in a small village by the mountains, there lived an old clockmaker who",
    "Translate to French: good morning",
    "The three laws of thermodynamics are",
]


def time_interleaved(fns, repeats: int) -> list[float]:
    """Median seconds of each function, run in turns so that a slow spell of a shared machine (seen here:
    +-20% between consecutive runs) hits all of them alike."""
    for fn in fns:
        fn()  # warm-up: allocator, thread pool, first-call caches
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    import transformers

    import lorafit
    from lorafit.generate import generate_ids
    from lorafit.models.loading import DTYPES, resolve_source

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="for both models")
    args = p.parse_args()

    directory = resolve_source(args.model)
    ours, tokenizer = lorafit.load_model(directory, dtype=args.dtype, device="cpu")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=DTYPES[args.dtype]).eval()
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = args.new_tokens

    rows = []
    for batch in (1, 8):
        texts = PROMPTS[:batch]
        ids = [tokenizer.encode(t) for t in texts]
        enc = tokenizer(texts, return_tensors="pt", padding=True)

        outputs = {}

        def run_ours():
            outputs["lorafit"] = generate_ids(ours, ids, n, stop_ids=(), pad_id=pad)
            assert all(len(o) == n for o in outputs["lorafit"])

        def run_theirs():
            with torch.inference_mode():
                out = theirs.generate(**enc, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=pad)
            assert out.shape[1] - enc.input_ids.shape[1] == n
            outputs["transformers"] = out[:, enc.input_ids.shape[1] :].tolist()

        t_ours, t_theirs = time_interleaved([run_ours, run_theirs], args.repeats)
        rows.append({
            "batch": batch, "new_tokens": n,
            "lorafit_tok_s": round(batch * n / t_ours, 1),
            "transformers_tok_s": round(batch * n / t_theirs, 1),
            "ratio": round(t_theirs / t_ours, 2),
            # The same work: greedy continuations that agree token for token (a float-order difference
            # may flip a near-tie late in a sequence; the count shows it).
            "same_tokens": sum(a == b for a, b in zip(outputs["lorafit"], outputs["transformers"])),
        })

    print(f"{'batch':>5} {'lorafit tok/s':>14} {'transformers tok/s':>19} {'ratio':>6} {'same greedy output':>19}")
    for r in rows:
        same = f"{r['same_tokens']}/{r['batch']}"
        print(f"{r['batch']:>5} {r['lorafit_tok_s']:>14} {r['transformers_tok_s']:>19} {r['ratio']:>6} {same:>19}")
    from _record import record

    record("generation_cpu", rows, model=str(args.model), dtype=args.dtype)


if __name__ == "__main__":
    main()
