#!/usr/bin/env bash
# Install gaperon-recipes on a GPU cluster (run once on a login node; the venv must sit on a
# filesystem the compute nodes see, and its path goes into your profile's `setup:`).
#
#   slurm/install_cluster.sh [--venv DIR] [--python python3.12] [--apex-src DIR]
#   APEX_SRC=DIR slurm/install_cluster.sh          (same, options as environment variables)
#
#   --venv DIR       where to create the virtual environment (default: <repo>/.venv)
#   --python EXE     interpreter to build it from (default: python3; 3.11 or 3.12)
#   --apex-src DIR   also build NVIDIA apex (fused kernels) from a git checkout of
#                    https://github.com/NVIDIA/apex, e.g. `git clone https://github.com/NVIDIA/apex DIR`.
#                    Optional: every apex use in this repo has a pure-torch fallback.
#
# Never `pip install apex`: the PyPI package of that name is an unrelated web toolkit.
# Load the site's CUDA/compiler modules first (apex needs nvcc matching torch's CUDA).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}        # the options below may also come as these environment variables
PYTHON=${PYTHON:-python3}
APEX_SRC=${APEX_SRC:-}
die() { echo "install_cluster: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --venv) VENV=$2; shift 2 ;;
        --python) PYTHON=$2; shift 2 ;;
        --apex-src) APEX_SRC=$2; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

REQ=$ROOT/requirements.txt
[ -f "$REQ" ] || die "$REQ not found"
if grep -qiE '^[[:space:]]*apex([^a-z0-9_.-]|$)' "$REQ"; then
    die "$REQ lists 'apex': that PyPI package is not NVIDIA apex; remove it (use --apex-src)"
fi

# Check everything before installing anything.
command -v "$PYTHON" >/dev/null || die "$PYTHON not found (--python EXE)"
if [ -n "$APEX_SRC" ]; then
    [ -f "$APEX_SRC/setup.py" ] && [ -d "$APEX_SRC/apex" ] \
        || die "$APEX_SRC is not a checkout of https://github.com/NVIDIA/apex (no setup.py + apex/)"
    command -v nvcc >/dev/null || die "nvcc not found: load the CUDA module matching torch's CUDA"
fi

echo "install_cluster: venv $VENV from $($PYTHON --version 2>&1)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install -r "$REQ"
python -m pip install --no-deps --no-build-isolation -e "$ROOT"   # the `gaperon` command

if [ -n "$APEX_SRC" ]; then
    echo "install_cluster: building NVIDIA apex from $APEX_SRC (takes a while; MAX_JOBS=${MAX_JOBS:-8})"
    export MAX_JOBS=${MAX_JOBS:-8}
    # --no-build-isolation: the extensions compile against the torch just installed.
    # Newer apex selects its extensions by environment variable, older by build option.
    if grep -q APEX_CPP_EXT "$APEX_SRC/setup.py"; then
        APEX_CPP_EXT=1 APEX_CUDA_EXT=1 python -m pip install -v --no-build-isolation --no-cache-dir "$APEX_SRC"
    else
        python -m pip install -v --no-build-isolation --no-cache-dir \
            --config-settings "--build-option=--cpp_ext" --config-settings "--build-option=--cuda_ext" "$APEX_SRC"
    fi
    python -c "import amp_C, apex; print('install_cluster: NVIDIA apex with CUDA extensions OK')"
fi

python -W ignore - <<'EOF'
import deepspeed, megatron.core, torch
cuda = torch.cuda.is_available()
print(f"install_cluster: torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"{torch.cuda.device_count() if cuda else 0} GPUs visible here), "
      f"megatron-core {megatron.core.__version__}, deepspeed {deepspeed.__version__}")
EOF
echo "install_cluster: done. Put 'source $VENV/bin/activate' in your profile's setup: (slurm/clusters/)"
