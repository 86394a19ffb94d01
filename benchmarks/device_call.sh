#!/usr/bin/env bash
# One device call's measurements, by stage, on the GPU machine (the `device` tool runs it in a copy of the
# checkout). The anchor harness must travel with it: copy ../shared/bench into .anchor/ here, exclude it from
# git (echo /.anchor/ >> .git/info/exclude) and pass carry [".anchor"]. Every stage writes under $OUT, which
# comes back; benchmarks/record_device_call.py N DIR then appends it all to results.jsonl as device call N.
#
#   bash benchmarks/device_call.sh tests        the GPU tests of the kernels, the model, graphs, offloading,
#                                               the tiled MLP, SFT and QLoRA (~3 min)
#   bash benchmarks/device_call.sh speed-8b     Llama-3.1-8B speed mode, LoRA and QLoRA: Unsloth without
#                                               checkpointing (the harness), then lorafit at Unsloth's peak
#                                               (~9 min; 3 timed steps after 1 warm-up, as calls 16-38)
#   bash benchmarks/device_call.sh speed-8b-ab  speed-8b with a variant run after each lorafit row: .variant/*.patch
#                                               (git diff main BRANCH -- lorafit) applied to a copy of the tree;
#                                               carry .variant too (excluded from git like .anchor). Its rows go to
#                                               variant_results.jsonl, not recorded (~5 min)
#   bash benchmarks/device_call.sh memory-8b    Llama-3.1-8B memory mode, LoRA: Unsloth with its offloaded checkpointing
#                                               (the harness's default), then lorafit at Unsloth's peak (~3 min);
#                                               memory-8b-qlora the same for QLoRA. Record these calls with
#                                               record_device_call.py --harness-checkpointing "unsloth offloaded"
#   bash benchmarks/device_call.sh regress-1b   Llama-3.2-1B, lorafit alone at the budgets of calls 29-30
#                                               (Unsloth's peaks there): the four 1B rows still hold (~4 min)
#   bash benchmarks/device_call.sh qlora-memory-8b
#                                               Llama-3.1-8B QLoRA, lorafit alone at Unsloth-QLoRA's peak with
#                                               its default offloaded checkpointing (7.07 GiB in calls 12 and 20):
#                                               the memory-mode row still fits (~2 min)
#   bash benchmarks/device_call.sh replay-8b    Llama-3.1-8B speed mode, LoRA and QLoRA at Unsloth's peaks (30.81, 21.16
#                                               GiB in every call since 16): lorafit as planned (eager), then
#                                               every micro-batch replayed from a CUDA graph (--replay): whether
#                                               the host still holds the 8B back (~3 min)
#   bash benchmarks/device_call.sh nf4-sweep    QLoRA's dequantisation of an 8B layer and other tilings of its
#                                               kernel (benchmarks/nf4_dequantize.py --sweep, ~1 min)
#
# Stages run in the order given; each call of the `device` tool has 10 minutes, so one or two per call.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?run on the device machine: OUT is where results come back}"
ANCHOR=.anchor
MODEL_DIR=${TMPDIR:-/tmp}/anchor_models
export ANCHOR_SITE_ROOT=${TMPDIR:-/tmp}/anchor_site PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 WANDB_DISABLED=true
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

unpack_harness() {
  [ -f "$ANCHOR/anchor_bench.py" ] || { echo "[device_call] no $ANCHOR/: carry it (see the top)"; exit 2; }
  if [ ! -d "$ANCHOR_SITE_ROOT/site_unsloth" ]; then
    mkdir -p "$ANCHOR_SITE_ROOT" && tar -C "$ANCHOR_SITE_ROOT" -xJf "$ANCHOR/sites.tar.xz"
  fi
}

make_model() {  # $1: harness preset
  python3 "$ANCHOR/anchor_bench.py" make-model --model "$1" --model-dir "$MODEL_DIR" | tail -1
}

unsloth_peak() {  # $1 system, $2 model: the peak GiB of its last row in the harness's results
  python3 - "$1" "$2" "$OUT/anchor_results.jsonl" <<'EOF'
import json, sys
system, model, path = sys.argv[1:]
rows = [json.loads(l) for l in open(path) if l.strip()]
rows = [r for r in rows if r.get("kind") == "train" and r["system"] == system and r["model"] == model]
print(rows[-1]["peak_alloc_GiB"] if rows and rows[-1].get("status", "ok") == "ok" else "")
EOF
}

anchor_pair() {  # $1 harness system, $2 preset, $3 extra lorafit flags, $4 (optional) a variant's tree;
  # HARNESS_FLAGS: the harness's mode (--no-gc: speed mode; empty: Unsloth's offloaded checkpointing)
  # shellcheck disable=SC2086
  timeout -k 15 300 python3 "$ANCHOR/anchor_bench.py" train --system "$1" --model "$2" --model-dir "$MODEL_DIR" \
    ${HARNESS_FLAGS---no-gc} --warmup 1 --steps 3 --out "$OUT/anchor_results.jsonl" 2>&1 | tail -3
  local peak
  peak=$(unsloth_peak "$1" "$2")
  if [ -z "$peak" ]; then echo "[device_call] no $1 row for $2: lorafit not run"; return; fi
  # shellcheck disable=SC2086
  timeout -k 15 300 python3 benchmarks/gpu_anchor.py --model "$MODEL_DIR/$2" --memory-budget "$peak" \
    --warmup 1 --steps 3 --results "$OUT/results.jsonl" $3 2>&1 | tail -4
  [ -n "${4:-}" ] || return 0
  echo "[device_call] the variant:"
  # shellcheck disable=SC2086
  PYTHONPATH=$4 timeout -k 15 300 python3 "$4/benchmarks/gpu_anchor.py" --model "$MODEL_DIR/$2" \
    --memory-budget "$peak" --warmup 1 --steps 3 --results "$OUT/variant_results.jsonl" $3 2>&1 | tail -4
}

lorafit_rows() {  # $1 harness preset, $2 warm-up steps, $3 timed steps, then gpu_anchor.py's flags, one row each
  local preset=$1 warmup=$2 steps=$3 args
  shift 3
  unpack_harness && make_model "$preset"
  for args in "$@"; do
    # shellcheck disable=SC2086
    timeout -k 15 300 python3 benchmarks/gpu_anchor.py --model "$MODEL_DIR/$preset" $args --warmup "$warmup" \
      --steps "$steps" --results "$OUT/results.jsonl" 2>&1 | tail -3
  done
}

variant_tree() {  # a copy of lorafit/ and benchmarks/ with .variant/*.patch applied (carry .variant); prints it
  local tree=${TMPDIR:-/tmp}/variant
  rm -rf "$tree" && mkdir -p "$tree" && cp -r lorafit benchmarks "$tree/"
  for patch in .variant/*.patch; do patch -s -d "$tree" -p1 < "$patch" >&2 || return 1; done
  echo "$tree"
}

for stage in "$@"; do
  echo "[device_call] $stage at $(date -u +%H:%M:%S)"
  case $stage in
    tests)
      python3 -m pytest -q -m gpu tests/test_kernels_*.py tests/test_cuda_graphs.py tests/test_checkpointing.py \
        tests/test_tiled_mlp.py tests/test_sft_gpu.py tests/test_qlora.py 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
      ;;
    speed-8b)
      unpack_harness && make_model llama-3.1-8b
      anchor_pair unsloth llama-3.1-8b ""
      anchor_pair unsloth-qlora llama-3.1-8b "--qlora"
      ;;
    speed-8b-ab)
      tree=$(variant_tree) || { echo "[device_call] a .variant patch does not apply"; exit 2; }
      unpack_harness && make_model llama-3.1-8b
      anchor_pair unsloth llama-3.1-8b "" "$tree"
      anchor_pair unsloth-qlora llama-3.1-8b "--qlora" "$tree"
      ;;
    memory-8b)
      unpack_harness && make_model llama-3.1-8b
      HARNESS_FLAGS="" anchor_pair unsloth llama-3.1-8b ""
      ;;
    memory-8b-qlora)
      unpack_harness && make_model llama-3.1-8b
      HARNESS_FLAGS="" anchor_pair unsloth-qlora llama-3.1-8b "--qlora"
      ;;
    regress-1b)  # Unsloth's peaks in calls 29 (memory mode, with checkpointing) and 30 (speed mode)
      lorafit_rows llama-3.2-1b 2 5 "--memory-budget 3.12" "--memory-budget 1.77 --qlora" "--memory-budget 6.77" \
        "--memory-budget 5.42 --qlora"
      ;;
    qlora-memory-8b)
      lorafit_rows llama-3.1-8b 1 3 "--memory-budget 7.07 --qlora"
      ;;
    replay-8b)
      lorafit_rows llama-3.1-8b 1 3 "--memory-budget 30.81" "--memory-budget 30.81 --replay" \
        "--memory-budget 21.16 --qlora" "--memory-budget 21.16 --qlora --replay"
      ;;
    nf4-sweep)
      python3 benchmarks/nf4_dequantize.py --sweep 2>&1 | tee "$OUT/nf4_sweep.txt"
      ;;
    *) echo "[device_call] unknown stage $stage (tests, speed-8b, speed-8b-ab, memory-8b, memory-8b-qlora, regress-1b, qlora-memory-8b, replay-8b, nf4-sweep)"; exit 2 ;;
  esac
done
