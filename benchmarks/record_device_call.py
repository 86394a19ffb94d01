"""Appends what benchmarks/device_call.sh left under $OUT to results.jsonl, as device call N.

    python benchmarks/record_device_call.py N DIR [--harness-checkpointing "unsloth no-gc"] [--variant TEXT]

DIR/results.jsonl: lorafit's rows (gpu_anchor.py wrote them there), each entry given "device_call": N.
DIR/anchor_results.jsonl: the anchor harness's rows (../shared/bench), one gpu_anchor_reference entry each,
labelled with --harness-checkpointing (the harness's own label says "offloaded" for Unsloth even with --no-gc;
device_call.sh's speed-8b stage runs it with --no-gc, the default here). DIR/variant_results.jsonl (the
speed-8b-ab stage's variant rows) only with --variant, which says what the variant was: each entry is given
"variant": TEXT. Prints a table of what it appended.
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _record import RESULTS  # noqa: E402

_REFERENCE_FIELDS = ("system", "model", "tokens_per_s", "peak_alloc_GiB", "losses", "status")


def reference_entries(path: Path, call: int, checkpointing: str) -> list[dict]:
    entries = []
    for line in path.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if row.get("kind") != "train":
            continue
        kept = {k: row[k] for k in _REFERENCE_FIELDS if k in row}
        if "tokens_per_s" in kept:
            kept["tokens_per_s"] = round(kept["tokens_per_s"])
        entries.append({
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "benchmark": "gpu_anchor_reference", "device_call": call,
            "machine": {"gpu": row.get("gpu")}, "versions": row.get("versions", {}),
            "micro_batch": row.get("micro_batch"), "seq_len": row.get("seq_len"), "grad_accum": row.get("grad_accum"),
            "rows": [dict(kept, checkpointing=checkpointing)],
        })
    return entries


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("call", type=int)
    p.add_argument("dir", type=Path)
    p.add_argument("--harness-checkpointing", default="unsloth no-gc")
    p.add_argument("--variant", default=None, help="record DIR/variant_results.jsonl too, labelled with this")
    args = p.parse_args()
    entries = []
    harness = args.dir / "anchor_results.jsonl"
    if harness.exists():
        entries += reference_entries(harness, args.call, args.harness_checkpointing)
    ours = args.dir / "results.jsonl"
    if ours.exists():
        entries += [dict(json.loads(line), device_call=args.call) for line in ours.read_text().splitlines() if line]
    variant = args.dir / "variant_results.jsonl"
    if args.variant and variant.exists():
        entries += [dict(json.loads(line), device_call=args.call, variant=args.variant)
                    for line in variant.read_text().splitlines() if line]
    with RESULTS.open("a") as f:
        for entry in entries:
            f.write(json.dumps(entry) + "\n")
    print("| system | model | checkpointing | tok/s | peak GiB |\n|---|---|---|---:|---:|")
    for entry in entries:
        for row in entry["rows"]:
            peak = row.get("peak_GiB", row.get("peak_alloc_GiB"))
            print(f"| {row.get('system')} | {row.get('model')} | {row.get('checkpointing')} | "
                  f"{row.get('tokens_per_s')} | {peak} |")
    print(f"appended {len(entries)} entries to {RESULTS}")


if __name__ == "__main__":
    main()
