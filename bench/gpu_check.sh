#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py), capped at 8 minutes: GPU tests, page-kernel bandwidth, the engine
# on CUDA, pass costs and the speedup they project. Writes OUT_DIR/gpu_check.json, pytest.log and gpu_check.log.
#   bash bench/gpu_check.sh OUT_DIR [gpu_check.py options, e.g. --dry-run]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR [options]}
shift
mkdir -p "$out"

pick_python() {  # the first python whose torch sees a GPU, else the first with torch (GPU images ship their own)
  for want in "torch.cuda.is_available()" "True"; do
    for py in .venv/bin/python python3; do
      if command -v "$py" >/dev/null && "$py" -c "import sys, torch; sys.exit(not $want)" 2>/dev/null; then
        echo "$py"
        return
      fi
    done
  done
  echo python3
}
py=${PYTHON:-$(pick_python)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
timeout -k 10 470 "$py" bench/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
