#!/usr/bin/env bash
# The one-call GPU check (docs/architecture.md): GPU-marked tests, the kernel benchmarks, the step
# benchmarks, then a short table. Full logs and CSV rows go under $OUT (default bench/out/).
# Needs only torch, triton, transformers, numpy (what a bare CUDA machine has) plus the
# repository; no network. DALI is timed only when installed (its wheel is not carried).
#
#   bash bench/gpu_check.sh                         # on a GPU: every section, within BUDGET_S
#   bash bench/gpu_check.sh                         # without one: a smoke run of the same on CPU
#   ONLY="recipe data" bash bench/gpu_check.sh      # some sections, in the order given
#
# Sections, in the default order (most wanted first: the open GPU items of issue 3 lead):
#   step     dense prx_small step, 1024 px batch 16: eager, compiled, compiled without text mask
#            (one process), then 512 px batch 64 eager
#   liger    Liger-Kernel ops against eager and compiled torch (needs the carried wheel)
#   tests    every GPU-marked test
#   kernels  Muon Newton-Schulz, patchify + routing, fused losses against eager and compiled torch
#   recipe   the full recipe step and its ablation breakdown
#   data     image decoding throughput
# A device lease is 15 minutes, machine start included, and a command 10 minutes at most, so the
# sections share one deadline, BUDGET_S seconds (default 420 on a GPU): each runs under what is
# left of it, a section that would start with under a minute left is skipped, and the summary
# names what was skipped or cut off so a second call can run just those.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
ONLY=${ONLY:-"step liger tests kernels recipe data"}
PACK=${PACK:-0}  # 1: pack $OUT into one archive at the end (the device tool returns 8 files at most)
status=0
unfinished=()  # sections skipped or cut off at the deadline

# Wheels a bare GPU machine lacks (Liger-Kernel), fetched by `make gpu-wheels` into .whl/ and
# carried along with the repository:
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    smoke=""
    BUDGET_S=${BUDGET_S:-420}
    steps=10
    # docs/recipe.md section 9 (H200, reference code): 1024 px batch 16 fwd+bwd 79 img/s compiled with
    # the text mask, 89 without, 41 eager; 512 px batch 64 eager 156 img/s.
    step_runs=("--preset prx_small_1024 --batch-size 16 --variants eager compile compile-no-mask"
               "--preset prx_small_512 --batch-size 64 --variants eager")
    data_images=256
else
    echo "gpu_check: no CUDA device; smoke run on the CPU (numbers are not GPU results)"
    smoke="--smoke"
    BUDGET_S=${BUDGET_S:-3600}
    steps=2
    step_runs=("--preset tiny --batch-size 8 --variants eager compile")
    data_images=16
fi
deadline=$((SECONDS + BUDGET_S))

run() {  # run NAME CMD...: under the time left, log to $OUT/NAME.log, print the tail
    local name=$1 left=$((deadline - SECONDS))
    shift
    echo "== $name ($left s left)"
    if ((left < 60)); then
        echo "!! $name skipped: under a minute of BUDGET_S=$BUDGET_S left"
        unfinished+=("$section")
        return
    fi
    timeout --kill-after=20 "$left" "$@" 2>&1 | tee -a "$OUT/$name.log" | tail -12
    local rc=${PIPESTATUS[0]}
    if ((rc == 124 || rc == 137)); then
        echo "!! $name cut off at the deadline (see $OUT/$name.log)"
        unfinished+=("$section")
    elif ((rc != 0)); then
        echo "!! $name failed with exit status $rc (see $OUT/$name.log)"
        status=1
    fi
}

for section in $ONLY; do
    case $section in
        step)
            for args in "${step_runs[@]}"; do
                # shellcheck disable=SC2086
                run bench_step $PY -m bench.bench_step $args --steps $steps --out "$OUT/step.csv"
            done ;;
        liger) run bench_liger $PY -m bench.bench_liger $smoke --out-dir "$OUT" ;;
        tests)  # with pytest-timeout (on the GPU machines), a hung test costs 4 minutes, not the rest
            per_test=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout=240")
            run gpu_tests $PY -m pytest -q -m gpu ${per_test:+"$per_test"} tests ;;
        kernels)
            run bench_muon $PY -m bench.bench_muon $smoke --out-dir "$OUT"
            run bench_patchify $PY -m bench.bench_patchify $smoke --out-dir "$OUT"
            run bench_routing $PY -m bench.bench_routing $smoke --out-dir "$OUT"
            run bench_losses $PY -m bench.bench_losses $smoke --out-dir "$OUT" ;;
        recipe) run bench_recipe $PY -m bench.bench_recipe $smoke --out-dir "$OUT" ;;
        data) run bench_data $PY -m bench.bench_data --images $data_images --out "$OUT/data.csv" ;;
        *) echo "!! unknown section '$section' (step liger tests kernels recipe data)"; status=1 ;;
    esac
done

echo "== summary (most wanted last: a device call returns only the end of the output)"
$PY - "$OUT" <<'PYEOF'
import csv, sys
from pathlib import Path
out = Path(sys.argv[1])
def rows(name):
    path = out / f"{name}.csv"
    return list(csv.DictReader(path.open())) if path.exists() else []
def num(text, fmt):
    return format(float(text), fmt) if text else ""
for r in rows("data"):
    print(f"data  {r['shape']:<8}{r['provider']:<18}{r['note']}")
for name in ("losses", "routing", "patchify", "muon", "recipe", "liger"):
    for r in rows(name):
        rate = (f"{num(r['gbps'], '.1f')} GB/s" if r["gbps"] else
                f"{num(r['tflops'], '.1f')} TFLOP/s" if r["tflops"] else r["note"][:32])
        ratio = f"x{num(r['ratio'], '.2f')}" if r["ratio"] else ""
        print(f"{r['op']:<18}{r['shape'][:30]:<31}{r['mode']:<6}{r['provider'][:24]:<25}{num(r['ms'], '.3f'):>10} ms  "
              f"{rate:<34}{ratio}")
if rows("step"):
    print(f"{'preset':<16}{'batch':>6}{'mask':>6}{'provider':>9}{'fwd+bwd ms':>11}{'img/s':>8}{'step ms':>9}"
          f"{'MFU':>7}{'peak GiB':>10}")
for r in rows("step"):
    print(f"{r['preset']:<16}{r['batch']:>6}{r['mask']:>6}{r['provider']:>9}{r['fwd_bwd_ms']:>11}"
          f"{r['img_per_s']:>8}{r['ms_per_step']:>9}{r.get('mfu') or '-':>7}{r.get('peak_gib') or '-':>10}")
PYEOF
if ((${#unfinished[@]})); then
    rerun=$(printf '%s\n' "${unfinished[@]}" | awk '!seen[$0]++' | xargs)
    echo "not finished within BUDGET_S=$BUDGET_S s: $rerun; a second call: ONLY=\"$rerun\" bash bench/gpu_check.sh"
    status=1
fi
if ((PACK)); then  # one archive of every log and CSV, read by bench/collect.py
    archive=$(mktemp --suffix .tar.gz)
    tar -czf "$archive" -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv "$archive" "$OUT/gpu_check.tar.gz"
fi
exit $status
