#!/usr/bin/env bash
# Creates one venv per peer engine under benchmarks/peers/.venv-<peer> (gitignored), never touching the project's
# .venv: each peer pins its own transformers/torch, which would fight the project's.
#
#   benchmarks/peers/setup.sh [llama|genai|all]      (default: all)
#
# llama: llama-cpp-python 0.3.36 compiled from the sdist for this CPU (GGML_NATIVE), plus what the vendored
#        convert_hf_to_gguf.py needs; the sdist is kept unpacked in .cache/ because the convert script lives in it.
# genai: onnxruntime-genai 0.18.0 and its model builder (needs transformers 5.x).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="$HERE/.cache"
PY="${PYTHON:-python3}"
LLAMA_CPP_PYTHON=0.3.36
GENAI=0.18.0
TORCH=2.13.0   # this exact version installs a CPU build from local disk; plain `torch` would pull CUDA wheels

command -v "$PY" >/dev/null || { echo "setup.sh: $PY not found (set PYTHON=)"; exit 1; }

new_venv() {  # new_venv NAME -> path of its python
    local dir="$HERE/.venv-$1"
    [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
    "$dir/bin/python" -m pip install -q --upgrade pip wheel >&2
    echo "$dir/bin/python"
}

setup_llama() {
    command -v cmake >/dev/null && command -v g++ >/dev/null || { echo "setup.sh: llama.cpp needs cmake and g++"; exit 1; }
    local py; py="$(new_venv llama)"
    "$py" -m pip install -q numpy "torch==$TORCH" transformers sentencepiece protobuf gguf
    # Compiling takes ~10-20 min on 2 cores; nice keeps it out of the way of other work on the machine. The tools
    # (llama-quantize, ...) cannot be switched on: the package adds tools/mtmd itself and CMake refuses it twice; its
    # Python API quantizes instead. LLAVA_BUILD=OFF skips the multimodal library, which nothing here uses.
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        nice -n 10 "$py" -m pip install -v --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PYTHON"
    # The convert script is not installed by the wheel: keep the sdist's source tree.
    mkdir -p "$CACHE"
    if [ ! -d "$CACHE/llama_cpp_python-$LLAMA_CPP_PYTHON" ]; then
        "$py" -m pip download -q --no-deps --no-binary :all: -d "$CACHE" "llama-cpp-python==$LLAMA_CPP_PYTHON"
        tar -xzf "$CACHE/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$CACHE"
    fi
    # The convert script's own gguf-py is the one it was written against; prefer it over the PyPI release.
    "$py" -m pip install -q "$CACHE/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp/gguf-py"
    "$py" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
}

setup_genai() {
    local py; py="$(new_venv genai)"
    "$py" -m pip install -q "onnxruntime-genai==$GENAI" "torch==$TORCH" "transformers>=5,<6" onnx onnx_ir \
        safetensors numpy
    "$py" -c "import onnxruntime_genai as og, onnxruntime as ort; print('onnxruntime-genai', og.__version__, 'onnxruntime', ort.__version__)"
}

case "${1:-all}" in
    llama) setup_llama ;;
    genai) setup_genai ;;
    all) setup_llama; setup_genai ;;
    *) echo "usage: setup.sh [llama|genai|all]"; exit 2 ;;
esac
