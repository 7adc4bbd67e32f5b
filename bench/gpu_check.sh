#!/usr/bin/env bash
# The one-call GPU check (docs/architecture.md): the kernel and step benchmarks, the GPU-marked
# tests, then a short table. Logs and CSV rows go under $OUT (default bench/out/), packed into
# one archive, $OUT/gpu_check.tar.gz (PACK=0 keeps the files: a device call returns 8 at most),
# which `python -m bench.collect` adds to bench/results/. Needs only torch, triton, transformers,
# numpy (what a bare CUDA machine has) and the repository; no network, no git (give the checkout's
# sha as PRX_GIT_REVISION). DALI is timed only when installed; Liger only when its wheel is
# carried (`make gpu-wheels`).
#
#   PRX_GIT_REVISION=abc1234 bash bench/gpu_check.sh    # on a GPU: every section, within BUDGET_S
#   bash bench/gpu_check.sh                             # without one: a smoke run of the same on CPU
#   ONLY="tests data" bash bench/gpu_check.sh           # some sections, in the order given
#
# Sections, in the default order: the numbers nobody has yet first, those that cost compile time
# later. Each line: what it measures; the reference's number (docs/recipe.md section 9, H200);
# the estimated GPU time of the section (estimates, from FLOP and byte counts and the compile
# times measured on the CPU, to be replaced by the measured times this script prints).
#   muon      Muon step on PRX small's 112 block matrices, reference and Triton, no torch.compile;
#             reference 141 ms. ~30 s: 48 TFLOP nominal a step, under 10 timed steps a provider
#             (do_bench: 20 ms of repetitions, at least one), ~5 Triton kernels to JIT (~1 s each:
#             26 compiled for sm_90a in 28 s on the 2-core CPU, bench/kernel_resources.py), 1.2 B
#             parameters' banks allocated.
#   kernels   patchify + noise, TREAD routing, fused losses: torch and Triton, no compile. ~90 s:
#             sub-millisecond ops, ~20 kernel variants to JIT.
#   step      dense prx_small step: 1024 px batch 16 eager, compiled, compiled without the text
#             mask; 512 px batch 64 eager; reference 41, 79, 89 and 156 img/s. ~3 min: 84 TFLOP
#             a step at 1024 px (0.21 s at 400 TFLOP/s, 0.39 s eager), 13 steps a variant, and two
#             inductor compiles of the block graphs (~60-110 s each: one PRX small block's fwd +
#             bwd compiled in 111 s on the 2-core CPU, inductor's C++ backend, other work running).
#   recipe    the full recipe step (TREAD, REPA, LPIPS, DINO, EMA, Muon) at 512 px batch 32,
#             compiled, and its ablation breakdown; reference 262.5 ms. ~3 min, mostly compiling.
#   tests     every GPU-marked test (kernels at PRX shapes, compiled blocks, FSDP2 under NCCL,
#             the cuDNN masked-attention case). ~3 min.
#   baselines the torch.compile providers of muon and kernels (the honest baselines; each op
#             compiles). ~3 min.
#   data      image decoding throughput, Pillow and DALI. ~1 min.
#   liger     Liger-Kernel ops against eager and compiled torch (skipped without its wheel). ~1 min.
#   text      caption embeddings per step: a random T5Gemma-2B-shaped encoder vs stored ones. ~1 min.
# Plan: a 15-minute device slot holds about 12 minutes of commands after the machine starts (1-2
# minutes), and one command runs 10 minutes at most. First call: muon kernels step recipe
# (~8 min estimated, BUDGET_S=480); second call: ONLY="tests baselines data liger text". Every section
# runs under what is left of BUDGET_S; one that would start with under a minute left is skipped,
# and the end names what was skipped or cut off, and prints each section's measured time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
SECTIONS="muon kernels step recipe tests baselines data liger text"
ONLY=${ONLY:-$SECTIONS}
PACK=${PACK:-1}  # 0: leave the logs and CSVs as files instead of one archive
if [[ -z ${PRX_GIT_REVISION:-} ]] && command -v git > /dev/null; then
    PRX_GIT_REVISION=$(git rev-parse --short HEAD 2> /dev/null || true)
fi
export PRX_GIT_REVISION=${PRX_GIT_REVISION:-unknown}  # bench/common.py records it in every row
status=0
unfinished=()  # sections skipped or cut off at the deadline
timings=()     # "section seconds" of each section run

# Wheels a bare GPU machine lacks (Liger-Kernel, ftfy for the prompt cleaning), fetched by `make gpu-wheels` into .whl/ and
# carried along with the repository:
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    smoke=""
    BUDGET_S=${BUDGET_S:-480}
    steps=10
    # docs/recipe.md section 9 (H200, reference code): 1024 px batch 16 fwd+bwd 79 img/s compiled with
    # the text mask, 89 without, 41 eager; 512 px batch 64 eager 156 img/s.
    step_runs=("--preset prx_small_1024 --batch-size 16 --variants eager compile compile-no-mask"
               "--preset prx_small_512 --batch-size 64 --variants eager")
    data_images=256
    text_args="--size 2b --steps 10"
else
    echo "gpu_check: no CUDA device; smoke run on the CPU (numbers are not GPU results)"
    smoke="--smoke"
    BUDGET_S=${BUDGET_S:-3600}
    steps=2
    step_runs=("--preset tiny --batch-size 8 --variants eager compile")
    data_images=16
    text_args="--size tiny --batch 4 --max-tokens 32 --steps 2"
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

kernel_benches() {  # kernel_benches PROVIDERS: patchify, routing and the losses with those providers
    run bench_patchify $PY -m bench.bench_patchify $smoke --providers "$1" --out-dir "$OUT"
    run bench_routing $PY -m bench.bench_routing $smoke --providers "$1" --out-dir "$OUT"
    run bench_losses $PY -m bench.bench_losses $smoke --providers "$1" --out-dir "$OUT"
}

for section in $ONLY; do
    started=$SECONDS
    case $section in
        muon) run bench_muon $PY -m bench.bench_muon $smoke --providers reference,triton --out-dir "$OUT" ;;
        kernels) kernel_benches torch,triton ;;
        step)
            for args in "${step_runs[@]}"; do
                # shellcheck disable=SC2086
                run bench_step $PY -m bench.bench_step $args --steps $steps --out "$OUT/step.csv"
            done ;;
        recipe) run bench_recipe $PY -m bench.bench_recipe $smoke --out-dir "$OUT" ;;
        tests)  # with pytest-timeout (on the GPU machines), a hung test costs 4 minutes, not the rest
            per_test=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout=240")
            run gpu_tests $PY -m pytest -q -m gpu ${per_test:+"$per_test"} tests ;;
        baselines)
            run bench_muon $PY -m bench.bench_muon $smoke --providers compile --out-dir "$OUT"
            kernel_benches compile ;;
        data) run bench_data $PY -m bench.bench_data --images $data_images --out "$OUT/data.csv" ;;
        # shellcheck disable=SC2086
        text) run bench_text $PY -m bench.bench_text $text_args --out "$OUT/text.csv" ;;
        liger)
            if $PY -c "import liger_kernel" 2> /dev/null; then
                run bench_liger $PY -m bench.bench_liger $smoke --out-dir "$OUT"
            else
                echo "== liger skipped: liger_kernel is not installed (carry it: make gpu-wheels)"
            fi ;;
        *) echo "!! unknown section '$section' ($SECTIONS)"; status=1; continue ;;
    esac
    timings+=("$section $((SECONDS - started))")
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
if ((${#timings[@]})); then  # what the next slot is planned from
    echo "section seconds: $(printf '%s, ' "${timings[@]}" | sed 's/, $//') (BUDGET_S=$BUDGET_S, revision $PRX_GIT_REVISION)"
fi
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
