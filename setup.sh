#!/usr/bin/env bash
# Set up hybrid in ./.venv on a fresh machine (CPU; Python 3.11).
#   bash setup.sh          the package and its runtime dependencies
#   bash setup.sh --dev    the same plus the test tools
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
extras=""
for arg in "$@"; do
  case "$arg" in
    --dev) extras="[dev]" ;;
    *) echo "setup.sh: unknown option $arg (use --dev)" >&2; exit 2 ;;
  esac
done
# torch==2.13.0 first: the CPU build (a newer or unpinned torch would pull a multi-GB CUDA build)
$PIP install "torch==2.13.0"
$PIP install -e ".${extras}"
echo "hybrid is set up in .venv (run: .venv/bin/hybrid --help)"
