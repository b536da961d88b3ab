#!/usr/bin/env bash
# setup.sh [PREFIX]: the spj-edge runtime in PREFIX/venv (default /opt/spj-edge) on a Raspberry Pi with a 64-bit OS.
#
# Installs the pinned wheels of requirements-pi.txt and spj-edge itself without extras: no torch, no onnx.
# Needs python3-venv (sudo apt install python3-venv) and the network. Safe to run again: it updates in place.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PREFIX=${1:-/opt/spj-edge}

# onnxruntime has aarch64 wheels only: a 32-bit userland (armv7l), even on a 64-bit kernel, can't run it.
bits=$(python3 -c 'import struct; print(8 * struct.calcsize("P"))')
machine=$(python3 -c 'import platform; print(platform.machine())')
if [ "$machine" != aarch64 ] || [ "$bits" != 64 ]; then
  echo "setup.sh: this Python is $bits-bit $machine; onnxruntime needs 64-bit ARM (aarch64)." >&2
  echo "setup.sh: install Raspberry Pi OS (64-bit) and run this again." >&2
  exit 2
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "setup.sh: Python 3.10 or newer needed" >&2; exit 2; }

mkdir -p "$PREFIX"
python3 -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$HERE/requirements-pi.txt"
"$PREFIX/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "$REPO"
"$PREFIX/venv/bin/python" -c 'import onnxruntime, spj_edge.runtime; print("spj-edge runtime ready, onnxruntime", onnxruntime.__version__)'

cat <<DONE
Next:
  copy a package:   cp dist/student.spj.tar.gz $PREFIX/model.spj.tar.gz
  check it:         $PREFIX/venv/bin/python $HERE/check.py $PREFIX/model.spj.tar.gz
  generate:         $PREFIX/venv/bin/python -m spj_edge.runtime --model $PREFIX/model.spj.tar.gz --prompt "Once upon a time"
  as a service:     sudo cp $HERE/spj-edge.service $HERE/spj-edge-health.* /etc/systemd/system/ (see $HERE/README.md)
DONE
