#!/usr/bin/env bash
# Create .venv and install the pinned requirements (idempotent). Used by the demo, the tests and CI.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# The project itself, editable: `gaperon` on the venv's PATH and megatron_ext importable from anywhere.
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
.venv/bin/python -c "import torch, megatron.core, deepspeed, transformers; print('gaperon-recipes: torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| deepspeed', deepspeed.__version__)" 2>&1 | grep gaperon-recipes
