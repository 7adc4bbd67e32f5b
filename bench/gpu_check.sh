#!/usr/bin/env bash
# The one-call GPU check (DESIGN.md): GPU-marked tests, the kernel benchmarks, the step
# benchmarks, then a short table. Full logs and CSV rows go under $OUT (default bench/out/).
# Needs only torch, triton, transformers, numpy (what a bare CUDA machine has) plus the
# repository; no network. DALI is timed only when installed (its wheel is not carried).
#
#   bash bench/gpu_check.sh                 # on a GPU: the real check, a few minutes
#   bash bench/gpu_check.sh                 # without one: a smoke run of the same steps on CPU
#   ONLY="muon patchify" bash bench/gpu_check.sh   # a subset of: tests kernels (muon patchify
#                                                   # losses liger) step recipe data
# All of it is estimated (not yet measured) at 12-15 minutes on one H100: over the device tool's
# 10 minutes a call, so split it: ONLY="tests kernels", then ONLY="step recipe data".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
ONLY=${ONLY:-"tests kernels step data"}
status=0

# Wheels carried to a bare GPU machine in .whl/ (the device tool's `carry`), e.g. Liger-Kernel:
#   pip download liger-kernel==0.8.5 --no-deps -d .whl
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    smoke=""
    steps=10
    # Dense PRX small at 1024 px, batch 16: the reference's 79 img/s (compiled, text mask) and
    # 89 img/s (no mask) on an H200 (RECIPE section 9).
    runs=("--preset prx_small_1024 --batch-size 16"
          "--preset prx_small_1024 --batch-size 16 --compile"
          "--preset prx_small_1024 --batch-size 16 --compile --no-mask"
          "--preset prx_small_512 --batch-size 64")
    data_images=256
else
    echo "gpu_check: no CUDA device; smoke run on the CPU (numbers are not GPU results)"
    smoke="--smoke"
    steps=2
    runs=("--preset tiny --batch-size 8" "--preset tiny --batch-size 8 --compile")
    data_images=16
fi

run() {  # run NAME CMD...: log to $OUT/NAME.log, print the tail, remember failures
    local name=$1
    shift
    echo "== $name"
    "$@" 2>&1 | tee -a "$OUT/$name.log" | tail -12
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "!! $name failed (see $OUT/$name.log)"; status=1; }
}

if [[ $ONLY == *tests* ]]; then
    run gpu_tests $PY -m pytest -q -m gpu tests
fi
if [[ $ONLY == *kernels* || $ONLY == *muon* ]]; then
    run bench_muon $PY bench/bench_muon.py $smoke --out-dir "$OUT"
fi
if [[ $ONLY == *kernels* || $ONLY == *patchify* ]]; then
    run bench_patchify $PY bench/bench_patchify.py $smoke --out-dir "$OUT"
    run bench_routing $PY bench/bench_routing.py $smoke --out-dir "$OUT"
fi
if [[ $ONLY == *kernels* || $ONLY == *losses* ]]; then
    run bench_losses $PY bench/bench_losses.py $smoke --out-dir "$OUT"
fi
if [[ $ONLY == *kernels* || $ONLY == *liger* ]]; then
    run bench_liger $PY bench/bench_liger.py $smoke --out-dir "$OUT"
fi
if [[ $ONLY == *step* ]]; then
    for args in "${runs[@]}"; do
        # shellcheck disable=SC2086
        run bench_step $PY bench/bench_step.py $args --steps $steps --out "$OUT/step.csv"
    done
fi
if [[ $ONLY == *step* || $ONLY == *recipe* ]]; then
    run bench_recipe $PY bench/bench_recipe.py $smoke --out-dir "$OUT"
fi
if [[ $ONLY == *data* ]]; then
    run bench_data $PY bench/bench_data.py --images $data_images --out "$OUT/data.csv"
fi

echo "== summary"
$PY - "$OUT" <<'PYEOF'
import csv, sys
from pathlib import Path
out = Path(sys.argv[1])
step = out / "step.csv"
if step.exists():
    print(f"{'preset':<16}{'batch':>6}{'mask':>6}{'provider':>9}{'ms/step':>10}{'img/s':>8}{'MFU':>7}{'peak GiB':>10}")
    for r in csv.DictReader(step.open()):
        print(f"{r['preset']:<16}{r['batch']:>6}{r['mask']:>6}{r['provider']:>9}{r['ms_per_step']:>10}"
              f"{r['img_per_s']:>8}{r.get('mfu') or '-':>7}{r.get('peak_gib') or '-':>10}")
def num(text, fmt):
    return format(float(text), fmt) if text else ""
for name in ("muon", "patchify", "routing", "losses", "liger", "recipe"):
    path = out / f"{name}.csv"
    if not path.exists():
        continue
    for r in csv.DictReader(path.open()):
        rate = (f"{num(r['gbps'], '.1f')} GB/s" if r["gbps"] else
                f"{num(r['tflops'], '.1f')} TFLOP/s" if r["tflops"] else r["note"][:32])
        ratio = f"x{num(r['ratio'], '.2f')}" if r["ratio"] else ""
        print(f"{r['op']:<18}{r['shape'][:30]:<31}{r['mode']:<6}{r['provider'][:24]:<25}{num(r['ms'], '.3f'):>10} ms  "
              f"{rate:<34}{ratio}")
data = out / "data.csv"
if data.exists():
    for r in csv.DictReader(data.open()):
        print(f"data  {r['shape']:<8}{r['provider']:<18}{r['note']}")
PYEOF
exit $status
