#!/usr/bin/env bash
# Installs the cm workspace into ./.venv (created if missing): torch, build and test tools, and
# every package under packages/ plus tools/ in editable mode. Safe to re-run: a rerun installs
# nothing new and skips cm-kernels' compile when its sources, build settings and torch are unchanged.
#
#   CM_TORCH_SPEC     what to install for torch (default "torch==2.14.1 torchvision==0.29.1": the
#                     default PyPI CUDA 13 builds, what users get from `pip install torch`; they run
#                     on CPU-only machines too). "torch==2.13.0" is the small CPU-only wheel; with it
#                     there is no torchvision, so timm and lpips (FD-DINOv2, LPIPS tests) are left out.
#   CM_KERNELS_CUDA   1: build cm-kernels' CUDA kernels (fails if no CUDA toolkit works; CI sets it);
#                     0: CPU kernels only; unset: CUDA kernels when a GPU is visible, since compiling
#                     them takes about 3 minutes on 2 cores and a machine without a GPU cannot run them.
#   CM_KERNELS_CUDA_ARCHS  SM architectures to compile (default "80;90").
#   CM_INSTALL_OFFLINE=1  for a machine without a package index whose PYTHON already holds torch
#                     (e.g. a lent GPU box's image): the venv sees that interpreter's packages
#                     (--system-site-packages) and only the workspace's own packages are installed,
#                     without their dependencies (tools/gpu_check.sh uses this).
#   PYTHON            interpreter used to create the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${CM_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
start=$SECONDS

OFFLINE=${CM_INSTALL_OFFLINE:-0}
if [ ! -x .venv/bin/python ]; then
    echo "[install] creating .venv with $($PYTHON --version)"
    if [ "$OFFLINE" = 1 ]; then
        "$PYTHON" -m venv --system-site-packages .venv
    else
        "$PYTHON" -m venv .venv
    fi
fi
pip_install() {
    # The machine's pip config lists local indexes that may be absent; drop only those warnings.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" \
        2> >(grep -v "^WARNING: Location 'file://" >&2)
}

if [ "$OFFLINE" = 1 ]; then
    echo "[install] offline: torch and the tools come from $PYTHON's own packages"
    pip_install() {
        .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-index --no-deps "$@"
    }
else
    echo "[install] $TORCH_SPEC, build and test tools"
    # shellcheck disable=SC2086  # TORCH_SPEC holds one or more requirements
    pip_install $TORCH_SPEC "numpy>=1.23" "setuptools>=64" wheel "ninja>=1.11" "pybind11>=2.12" \
        "pytest>=7" "scipy>=1.9" "matplotlib>=3.7" "scikit-learn>=1.0" "pillow>=9" "pyyaml>=6" \
        "mpi4py>=3.1" mpich "click>=8.1" "tqdm>=4.60" "safetensors>=0.4" "packaging>=23" \
        "diffusers>=0.30" "transformers>=4.40" "peft>=0.13" "pyarrow>=12"  # SD/SDXL LoRA distillation, parquet
    if .venv/bin/python -c "import torchvision" 2>/dev/null; then
        # FD-DINOv2 (cm-eval[dino]) and the LPIPS package (cm-core[lpips]) both need torchvision.
        pip_install "timm>=0.9" "lpips>=0.1.4" "open-clip-torch>=2.20"
    else
        echo "[install] no torchvision with $TORCH_SPEC: timm and lpips not installed (their tests will skip)"
    fi
fi

if [ -z "${CM_KERNELS_CUDA:-}" ]; then
    if .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        export CM_KERNELS_CUDA=auto
        echo "[install] a GPU is visible: cm-kernels builds its CUDA kernels if a CUDA toolkit works (about 3 min)"
    else
        export CM_KERNELS_CUDA=0
        echo "[install] no GPU visible: cm-kernels builds its CPU kernels (CM_KERNELS_CUDA=1 builds the CUDA ones too)"
    fi
fi

# cm-kernels' build key: its C++ sources, build files, the CUDA request and torch's version. A rerun
# with the same key and a loadable extension skips the compile (50 s to minutes); anything else
# rebuilds. The key is written only after a successful build.
KERNELS_STAMP=.venv/.cm-kernels-build-key
kernels_key() {
    .venv/bin/python - <<'KEY'
import hashlib, os, pathlib, torch
root = pathlib.Path("packages/cm-kernels")
h = hashlib.sha256()
files = [root / "setup.py", root / "pyproject.toml", root / "src/cm_kernels/_build_config.py"]
files += sorted(p for p in (root / "csrc").rglob("*") if p.is_file())
for p in files:
    h.update(str(p).encode() + b"\0" + p.read_bytes())
env = [os.environ.get(k, "") for k in ("CM_KERNELS_CUDA", "CM_KERNELS_CUDA_ARCHS", "CUDA_HOME", "CUDA_PATH")]
h.update(repr((env, torch.__version__, torch.version.cuda)).encode())
print(h.hexdigest())
KEY
}
kernels_binary() {  # the compiled extension's own hash: a rebuild by hand (other flags) changes it
    cat packages/cm-kernels/src/cm_kernels/_C*.so 2>/dev/null | sha256sum | cut -c1-64
}
kernels_built() {  # the stamp matches the key and the binary, and the compiled extension loads
    [ -f "$KERNELS_STAMP" ] && [ "$(cat "$KERNELS_STAMP")" = "$1 $(kernels_binary)" ] &&
        .venv/bin/python -c "import sys, cm_kernels; sys.exit(0 if cm_kernels._STATE.loaded and cm_kernels._STATE.source == 'aot' else 1)" 2>/dev/null
}

# Lower packages first, down the package graph in README.md (cm-kernels is the leaf).
# --no-build-isolation: the C++ extension must build against the torch installed above.
for pkg in packages/cm-kernels packages/cm-core packages/cm-nets packages/cm-eval packages/cm-train tools; do
    [ -f "$pkg/pyproject.toml" ] || continue
    if [ "$pkg" = packages/cm-kernels ]; then
        key=$(kernels_key)
        if kernels_built "$key"; then
            echo "[install] $pkg: sources, build settings and torch unchanged since its last build: not rebuilt"
            continue
        fi
        rm -f "$KERNELS_STAMP"
    fi
    echo "[install] $pkg"
    pip_install --no-build-isolation -e "$pkg"
    [ "$pkg" != packages/cm-kernels ] || echo "$key $(kernels_binary)" > "$KERNELS_STAMP"
done
.venv/bin/python - <<'EOF'
import torch
import cm_core
from cm_kernels import _build_info as b

print(f"[install] ok: torch {torch.__version__}, cm_core {cm_core.__version__}; cm-kernels: {b.CUDA_REASON}")
EOF
echo "[install] done in $((SECONDS - start)) s"
