#!/usr/bin/env bash
# The one-call GPU check (DESIGN.md): GPU-marked tests, then the step benchmarks, then a short
# table. Full logs and CSV rows go under $OUT (default bench/out/). Needs only torch, triton,
# transformers, numpy (what a bare CUDA machine has) plus the repository; no network.
#
#   bash bench/gpu_check.sh                 # on a GPU: the real check, a few minutes
#   bash bench/gpu_check.sh                 # without one: a smoke run of the same steps on CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
status=0

if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    steps=10
    # Dense PRX small at 1024 px, batch 16: the reference's 79 img/s (compiled, text mask) and
    # 89 img/s (no mask) on an H200 (RECIPE section 9).
    runs=("--preset prx_small_1024 --batch-size 16"
          "--preset prx_small_1024 --batch-size 16 --compile"
          "--preset prx_small_1024 --batch-size 16 --compile --no-mask"
          "--preset prx_small_512 --batch-size 64")
else
    echo "gpu_check: no CUDA device; smoke run on the CPU (numbers are not GPU results)"
    steps=2
    runs=("--preset tiny --batch-size 8" "--preset tiny --batch-size 8 --compile")
fi

echo "== GPU-marked tests"
$PY -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -3
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== step benchmarks"
for args in "${runs[@]}"; do
    # shellcheck disable=SC2086
    $PY bench/bench_step.py $args --steps $steps --out "$OUT/step.csv" 2>&1 | tee -a "$OUT/bench_step.log" | tail -1
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done

echo "== summary"
$PY - "$OUT/step.csv" <<'PYEOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print(f"{'preset':<16}{'batch':>6}{'mask':>6}{'provider':>9}{'ms/step':>10}{'img/s':>8}{'MFU':>7}{'peak GiB':>10}  device")
for r in rows:
    print(f"{r['preset']:<16}{r['batch']:>6}{r['mask']:>6}{r['provider']:>9}{r['ms_per_step']:>10}"
          f"{r['img_per_s']:>8}{r['mfu'] or '-':>7}{r['peak_gib'] or '-':>10}  {r['device']}")
PYEOF
exit $status
