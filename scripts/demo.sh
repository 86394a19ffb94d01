#!/usr/bin/env bash
# The demo: sets everything up, then fine-tunes the default model (SmolLM2-135M-Instruct) with LoRA on the
# CPU so that it learns a new identity, printing its answer to "Who are you?" before and after (~2 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec ./.venv/bin/lorafit train "$@"
