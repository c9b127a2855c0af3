#!/usr/bin/env bash
# Installs the cm workspace into ./.venv (created if missing): torch, build tools, and every
# package under packages/ in editable mode. Safe to re-run; a second run installs nothing new.
#   CM_TORCH_SPEC   torch requirement to install (default torch==2.13.0; the packages only need torch>=2.4)
#   PYTHON          interpreter used to create the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${CM_TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
    echo "[install] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
pip_install() {
    # The machine's pip config lists local indexes that may be absent; drop only those warnings.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" \
        2> >(grep -v "^WARNING: Location 'file://" >&2)
}

echo "[install] $TORCH_SPEC, build and test tools"
pip_install "$TORCH_SPEC" "numpy>=1.23" "setuptools>=64" wheel "ninja>=1.11" "pybind11>=2.12" \
    "pytest>=7" "scipy>=1.9" "matplotlib>=3.7" "scikit-learn>=1.0" "pillow>=9" "pyyaml>=6" \
    "mpi4py>=3.1" mpich "click>=8.1" "tqdm>=4.60"

# Lower packages first, down the dependency graph of DESIGN.md (cm-kernels is the leaf).
# --no-build-isolation: the C++ extension must build against the torch installed above.
for pkg in packages/cm-kernels packages/cm-core packages/cm-nets packages/cm-eval packages/cm-train tools; do
    if [ -f "$pkg/pyproject.toml" ]; then
        echo "[install] $pkg"
        pip_install --no-build-isolation -e "$pkg"
    fi
done
.venv/bin/python -c "import cm_core; print('[install] ok: cm_core', cm_core.__version__)"
