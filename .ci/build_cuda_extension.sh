#!/usr/bin/env bash
# CI: build the optional DCNv3 CUDA extension for ONE architecture into a temporary folder, import it, and run its
# tests with it importable (GPU tests skip without a GPU). Prints the build time. Skips (exit 0) when this
# environment cannot build it (CPU-only torch or no matching CUDA toolkit), unless DCNV3_CUDA_REQUIRED=1.
# Usage: bash .ci/build_cuda_extension.sh   (PYTHON=... to pick the interpreter; TORCH_CUDA_ARCH_LIST=... the arch)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=$(command -v "${PYTHON:-python}")
case "$PYTHON" in /*) ;; *) PYTHON="$PWD/$PYTHON" ;; esac
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r dcnv3_cuda "$work/source"
rm -rf "$work/source/build" "$work/source"/src/*.egg-info

echo "== dcnv3_cuda: build environment"
# --no-build-isolation builds with this environment's setuptools; Python >= 3.12 venvs do not ship it.
"$PYTHON" -c "import setuptools" 2>/dev/null || "$PYTHON" -m pip install -q setuptools
rc=0
(cd "$work/source" && "$PYTHON" -c "
import sys
from build_utils import BuildEnvironmentError, prepare_build_environment
try:
    print(prepare_build_environment())
except BuildEnvironmentError as error:
    print(error, file=sys.stderr)
    sys.exit(3)") || rc=$?
if [ "$rc" != 0 ]; then
  if [ "$rc" != 3 ] || [ "${DCNV3_CUDA_REQUIRED:-0}" = 1 ]; then echo "FAIL dcnv3_cuda build environment"; exit 1; fi
  echo "SKIP dcnv3_cuda build: this environment cannot build it (see the message above)"; exit 0
fi

echo "== dcnv3_cuda: build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
start=$(date +%s)
if ! "$PYTHON" -m pip install -q "$work/source" --no-build-isolation --no-deps --target "$work/lib" \
    >"$work/build.log" 2>&1; then
  tail -40 "$work/build.log"; echo "FAIL dcnv3_cuda build"; exit 1
fi
echo "dcnv3_cuda built in $(( $(date +%s) - start )) s"

echo "== dcnv3_cuda: import and tests"
PYTHONPATH="$work/lib${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c "
import torch, dcnv3_cuda
print('imported', dcnv3_cuda.__file__, 'ops:', torch.ops.dcnv3_cuda.forward.default.name(), torch.ops.dcnv3_cuda.backward.default.name())"
PYTHONPATH="$work/lib${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_dcnv3_cuda.py -k "not emulated"
