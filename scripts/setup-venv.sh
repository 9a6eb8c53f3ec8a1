#!/usr/bin/env bash
# Create .venv and install use-search into it. Usage: scripts/setup-venv.sh [EXTRAS], e.g. "dev".
# torch/torchvision are installed first as the pinned pair (docs/design.md: a looser pin pulls another
# multi-GB build, and PyPI's torchvision does not import beside other torch builds).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
if [ -n "$extras" ]; then
  .venv/bin/python -m pip install -q -e ".[$extras]"
else
  .venv/bin/python -m pip install -q -e .
fi
if [[ ",$extras," == *",dev,"* ]]; then
  # The generator behind the generated-client API test pins typer<0.28 and httpx<0.29: a venv of its own
  # keeps it from downgrading the project's.
  python3 -m venv .venv/tools
  .venv/tools/bin/python -m pip install -q --upgrade pip
  .venv/tools/bin/python -m pip install -q "openapi-python-client==0.29.1"
fi
