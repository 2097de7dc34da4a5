#!/usr/bin/env bash
# Fetch vLLM-Ascend's pinned releases from the package registry, once, and unpack their Python
# sources (never installed) under $VLLM_PTQ_ASCEND_CACHE/upstream/vllm-ascend/<version>/.
# The tests import vllm_ascend.quantization from there on top of our torch_npu emulation
# (tests/vllm_ascend_real.py). Idempotent: a version already unpacked is skipped.
#   0.26.0rc1     x86_64 cp311 wheel: no build, unzip only
#   0.23.0.post1  sdist (the last final release): pip prepares its metadata, which needs
#                 setuptools_scm and SOC_VERSION, so pip download runs without build isolation;
#                 its build would generate vllm_ascend/_build_info.py (device type from SOC_VERSION):
#                 written here as setup.py's gen_build_info() does for ascend910b1 (A2)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ROOT=${VLLM_PTQ_ASCEND_CACHE:-$PWD/.cache}/upstream/vllm-ascend
mkdir -p "$ROOT"
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
fetch() {  # fetch VERSION EXTRA_PIP_ARGS...
  local version=$1; shift
  local dest=$ROOT/$version
  [ -f "$dest/.complete" ] && return 0
  local tmp; tmp=$(mktemp -d "$ROOT/.partial-$version-XXXX")
  if ! SOC_VERSION=ascend910b1 "$PY" -m pip download --no-deps -d "$tmp/dl" "vllm-ascend==$version" "$@" >"$LOG" 2>&1; then
    grep -v "^WARNING: Location" "$LOG" >&2
    rm -rf "$tmp"
    echo "[fetch_vllm_ascend] pip download vllm-ascend==$version failed" >&2
    exit 1
  fi
  "$PY" - "$tmp" <<'PYEOF'
import pathlib, shutil, sys, tarfile, zipfile
tmp = pathlib.Path(sys.argv[1])
(archive,) = (tmp / "dl").iterdir()
src = tmp / "src"
if archive.suffix == ".whl":
    with zipfile.ZipFile(archive) as z:
        z.extractall(src)
else:
    with tarfile.open(archive) as t:
        t.extractall(src, filter="data")
    (top,) = src.iterdir()  # vllm_ascend-<version>/
    for p in top.iterdir():
        p.rename(src / p.name)
    top.rmdir()
# Only the package (and the sdist's unit tests) stay: no dist-info, so vLLM never sees it as a plugin.
for p in src.iterdir():
    if p.name not in ("vllm_ascend", "tests"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
for so in src.rglob("*.so"):  # compiled for CANN; never imported here
    so.unlink()
build_info = src / "vllm_ascend" / "_build_info.py"
if not build_info.exists():  # what the sdist's setup.py gen_build_info() writes for SOC_VERSION=ascend910b1
    build_info.write_text("# Auto-generated file\n__device_type__ = 'A2'\n")
shutil.rmtree(tmp / "dl")
PYEOF
  rm -rf "$dest"
  mv "$tmp/src" "$dest"
  rmdir "$tmp"
  echo "$version" > "$dest/.complete"
  echo "[fetch_vllm_ascend] vllm-ascend $version unpacked in $dest"
}
fetch 0.26.0rc1 --pre --only-binary :all: --platform manylinux_2_34_x86_64 --python-version 3.11
fetch 0.23.0.post1 --no-binary :all: --no-build-isolation
