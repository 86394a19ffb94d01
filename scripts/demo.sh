#!/usr/bin/env bash
# The demo: sets everything up, then asks the default model (SmolLM2-135M-Instruct, on the CPU) a question.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
question="What is the capital of France?"
echo "Q: $question"
echo -n "A: "
./.venv/bin/lorafit generate --max-new-tokens 64 "$question"
