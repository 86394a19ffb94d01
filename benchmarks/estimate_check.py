"""How close `lorafit estimate` comes to what the GPU measured (issue 10: within 15% of the peak memory and
25% of the step time).

    python benchmarks/estimate_check.py [--results FILE] [--no-record]

Runs on any machine: it reads the anchor-workload rows that benchmarks/gpu_anchor.py recorded on the H200
(results.jsonl, device calls 7 on, less the 1B runs measured before the host got faster: see SUPERSEDED),
rebuilds each run's model on the meta device from its architecture, and asks the estimate, as the command
does, for the peak memory and the step time of that run's micro-batch, sequence length, method and
checkpointing. Prints the table and appends it to the results file.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

MEMORY_BAR, TIME_BAR = 0.15, 0.25  # issue 10's acceptance
# Calls 9, 11 and 13 measured Llama-3.2-1B before the kernels skipped their ops' dispatch in eager mode
# (call 16): the host then launched a 1B micro-batch in 128 ms instead of 77, so those runs no longer say
# how long lorafit takes. The 8B runs were GPU-bound then as now (the GPU's 240 ms against 153 launched), as
# was call 15's 1B run of 4 x 4096 tokens a micro-batch. Call 22 replayed CUDA graphs recorded with stale
# MLP adapters (fixed before call 23). The host itself varies between calls: Unsloth's 1B offloaded run
# took 24,450 tokens/s in call 16 and 35,666 in call 25, so eager 1B runs miss the host clock by as much.
FIRST_CALL, SUPERSEDED = 7, {9, 11, 13, 22, 26}


def modes_of(checkpointing: str, layers: int) -> list[str]:
    """gpu_anchor's label ("none", "offload", "layers", or "J of N offloaded", "K of N recomputed", or both
    joined by ", ") -> one mode per layer, in memory.plan_checkpointing's order: offloaded, recomputed, kept."""
    if checkpointing in ("none", "offload", "layers"):
        return [checkpointing] * layers
    modes = []
    for part in checkpointing.split(", "):
        count, how = int(part.split(" of ")[0]), part.split()[-1]
        modes += ["layers" if how == "recomputed" else "offload"] * count
    return modes + ["none"] * (layers - len(modes))


def measured_runs(results: Path):
    """(call, entry, row) of lorafit's anchor runs with every kernel on (CUDA graphs recorded from call 22;
    call 22's were measured before the graphs' recording was fixed, which is left out as SUPERSEDED)."""
    for line in results.read_text().splitlines():
        entry = json.loads(line)
        call = entry.get("device_call")
        if entry.get("benchmark") != "gpu_anchor" or call is None or call < FIRST_CALL or call in SUPERSEDED:
            continue
        for row in entry["rows"]:
            # From call 28 lorafit runs with expandable segments (cli.py); call 27 compared the default allocator.
            default_allocator = row.get("alloc_conf") == ""
            if row.get("kernels", True) and not row.get("disabled_kernels") and not default_allocator:
                yield call, entry, row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=None, help="read and append here (default: benchmarks/results.jsonl)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()

    from _record import RESULTS, record
    from gpu_profile import hf_config
    from lorafit import Config
    from lorafit.estimate import DEVICES, build_meta_model, estimate
    from lorafit.memory import GiB

    results = Path(args.results or RESULTS)
    rows = []
    print("| call | model | method | micro x seq | checkpointing | peak GiB measured / estimated | "
          "step s measured / estimated |")
    print("|---|---|---|---|---|---|---|")
    for call, entry, row in measured_runs(results):
        micro, seq, accumulation = entry["micro_batch"], entry["seq_len"], entry["grad_accum"]
        method = "qlora" if row.get("qlora") else "lora"
        config = Config.from_dict({
            "model": {"dtype": "bfloat16", "max_seq_length": seq},
            "finetune": {"method": method, "r": entry.get("lora_r", 16), "alpha": entry.get("lora_r", 16)},
            "train": {"batch_size": micro, "grad_accum": accumulation}})
        hf = hf_config(row["model"])
        model = build_meta_model(config, hf)
        if row.get("mlp_chunk"):  # the planner tiled the MLPs (from call 28)
            model.tile_mlp_from(micro * seq, row["mlp_chunk"])
        modes = modes_of(row["checkpointing"], hf["num_hidden_layers"])
        # Replayed from a CUDA graph: the peak held is the graph's whole pool beside the rest (gpu_anchor.py's
        # peak_GiB), and the host's clock stops counting.
        graphed = bool(row.get("cuda_graph"))
        result = estimate(config, model, micro * seq, seq, modes, None, DEVICES["H200"], graphed=graphed)
        step = micro * seq * accumulation / row["tokens_per_s"]
        memory, peak = result.memory.total / GiB, row["peak_GiB"] if graphed else row["peak_alloc_GiB"]
        out = {"device_call": call, "model": row["model"], "method": method, "micro_batch": micro, "seq_len": seq,
               "checkpointing": row["checkpointing"] + (f", MLP {row['mlp_chunk']:,} tokens at a time"
                                                        if row.get("mlp_chunk") else "")
               + (", CUDA graph" if graphed else ""), "peak_GiB": peak,
               "estimate_peak_GiB": round(memory, 2), "memory_error": round(memory / peak - 1, 3),
               "step_s": round(step, 3), "estimate_step_s": round(result.step_seconds, 3),
               "time_error": round(result.step_seconds / step - 1, 3)}
        rows.append(out)
        print(f"| {call} | {row['model']} | {method} | {micro} x {seq} | {out['checkpointing']} | "
              f"{peak} / {memory:.2f} ({100 * out['memory_error']:+.1f}%) | "
              f"{step:.3f} / {result.step_seconds:.3f} ({100 * out['time_error']:+.1f}%) |")
    worst_memory = max(abs(r["memory_error"]) for r in rows)
    worst_time = max(abs(r["time_error"]) for r in rows)
    print(f"\n{len(rows)} runs; largest errors: memory {100 * worst_memory:.1f}% (bar {100 * MEMORY_BAR:.0f}%), "
          f"time {100 * worst_time:.1f}% (bar {100 * TIME_BAR:.0f}%)")
    probes = long_context_probes(results, hf_config, Config, build_meta_model)
    worst_probe = max((abs(r["memory_error"]) for r in probes), default=0.0)
    if not args.no_record:
        record("estimate_check", rows, results=results, card="H200", largest_memory_error=round(worst_memory, 3),
               largest_time_error=round(worst_time, 3), long_context_probes=probes,
               long_context_largest_memory_error=round(worst_probe, 3))


def long_context_probes(results: Path, hf_config, Config, build_meta_model) -> list[dict]:
    """The peaks of lorafit's longest-context probes (benchmarks/max_context.py: one sequence, every layer
    offloaded, one AdamW step) against the memory estimate. The peak comes in backward, before the step makes
    AdamW's moments, so they are left out of the estimate here."""
    from lorafit.memory import GiB, estimate_training_memory

    out = []
    for line in results.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("benchmark") != "gpu_max_context":
            continue
        for row in entry["rows"]:
            if row["system"] != "lorafit":
                continue
            method = "qlora" if row["qlora"] else "lora"
            hf = hf_config(row["model"])
            for probe in row["probes"]:
                if probe["result"] != "fits":
                    continue
                config = Config.from_dict({"model": {"dtype": "bfloat16", "max_seq_length": probe["tokens"]},
                                           "finetune": {"method": method, "r": 16, "alpha": 16},
                                           "train": {"batch_size": 1, "grad_accum": 1}})
                model = build_meta_model(config, hf)
                modes = ["offload"] * hf["num_hidden_layers"]
                memory = estimate_training_memory(model, probe["tokens"], modes, optimizer_states=False).total / GiB
                out.append({"device_call": entry.get("device_call"), "model": row["model"], "method": method,
                            "tokens": probe["tokens"], "peak_GiB": probe["peak_GiB"],
                            "estimate_peak_GiB": round(memory, 2),
                            "memory_error": round(memory / probe["peak_GiB"] - 1, 3)})
    if out:
        print("\nLongest-context probes (one sequence, every layer offloaded):\n")
        print("| call | model | method | tokens | peak GiB measured / estimated |")
        print("|---|---|---|---:|---|")
        for r in out:
            print(f"| {r['device_call']} | {r['model']} | {r['method']} | {r['tokens']:,} | {r['peak_GiB']} / "
                  f"{r['estimate_peak_GiB']:.2f} ({100 * r['memory_error']:+.1f}%) |")
        worst = max(abs(r["memory_error"]) for r in out)
        print(f"\n{len(out)} probes; largest memory error {100 * worst:.1f}%")
    return out


if __name__ == "__main__":
    main()
