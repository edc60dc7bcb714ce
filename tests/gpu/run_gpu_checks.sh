#!/usr/bin/env bash
# make test-gpu: the GPU checks (tests/gpu/README.md), ~8 minutes on one H100.
#   1. pytest -m gpu tests/gpu/gpu_stages.py: train -> merge -> generate in bf16 on CUDA (tiny
#      Llama; tiny Gemma-3n with its real timm vision tower), resume after SIGKILL on CUDA;
#   2. benchmarks/bench_train.py and bench_generate.py on CUDA with random models of the
#      SmolLM2-135M and Gemma-3-270M shapes (benchmarks/configs/), Liger as a third training side;
#   3. one JSON of the results (gpu_checks.json) and a printed summary.
# Without a CUDA device it prints `skipped: no CUDA device` and exits 0.
#
#   bash tests/gpu/run_gpu_checks.sh [--out DIR]      (default DIR: results/gpu_checks)
# .whl/ (tests/gpu/fetch_wheels.sh) is installed first with pip --no-index when it is present.
# SNAKETUNE_GPU_BUDGET_S (default 480): benchmarks that would start after this many seconds
# are skipped (and recorded as such) so the whole run stays inside a device lease.
set -uo pipefail
cd "$(dirname "$0")/../.."

OUT_DIR=results/gpu_checks
while [ $# -gt 0 ]; do
    case "$1" in
    --out) OUT_DIR=$2; shift 2 ;;
    *) echo "usage: $0 [--out DIR]" >&2; exit 2 ;;
    esac
done

# A Python whose torch sees a CUDA device: $PYTHON, the project's .venv, or the machine's python3.
PY=
for cand in "${PYTHON:-}" .venv/bin/python python3; do
    [ -n "$cand" ] || continue
    if "$cand" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
        PY=$cand
        break
    fi
done
if [ -z "$PY" ]; then
    echo "skipped: no CUDA device"
    exit 0
fi

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
rm -f "$OUT_DIR"/{steps.jsonl,env.json,tests.xml,gpu_checks.json} "$OUT_DIR"/bench_{train,generate}_*.json
START=$(date +%s)
BUDGET=${SNAKETUNE_GPU_BUDGET_S:-480}
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

# step NAME TIMEOUT_S COMMAND...: run, log to NAME.log, record rc and seconds in steps.jsonl.
step() {
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    echo "== $name"
    timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    rc=$?
    echo "{\"name\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0))}" >>"$OUT_DIR/steps.jsonl"
    if [ $rc -eq 0 ]; then
        echo "   ok ($(($(date +%s) - t0)) s)"
    else
        echo "   FAILED rc=$rc ($(($(date +%s) - t0)) s); last lines of $name.log:"
        tail -n 15 "$OUT_DIR/$name.log" | sed 's/^/   | /'
    fi
    return 0
}

# bench NAME TIMEOUT_S COMMAND...: a step, unless the time budget is spent.
bench() {
    local name=$1
    if (($(date +%s) - START > BUDGET)); then
        echo "== $name: skipped (time budget of $BUDGET s spent)"
        echo "{\"name\": \"$name\", \"rc\": null, \"seconds\": 0, \"skipped\": \"time budget\"}" >>"$OUT_DIR/steps.jsonl"
        return 0
    fi
    step "$@"
}

if ls .whl/*.whl >/dev/null 2>&1; then
    SITE=${SNAKETUNE_GPU_SITE:-/tmp/snaketune-gpu-site}
    step install_wheels 300 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

step env_check 120 "$PY" tests/gpu/env_check.py --out "$OUT_DIR/env.json"
step pytest_gpu 360 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu/gpu_stages.py \
    -o junit_family=legacy --junitxml "$OUT_DIR/tests.xml"

for model in smollm2-135m gemma3-270m; do
    bench "bench_train_$model" 240 "$PY" benchmarks/bench_train.py --device cuda --model-config "$model" \
        --steps 8 --warmup 3 --batch-size 16 --threads 8 --json "$OUT_DIR/bench_train_$model.json"
done
for model in smollm2-135m gemma3-270m; do
    bench "bench_generate_$model" 300 "$PY" benchmarks/bench_generate.py --device cuda \
        --model-config "$model" --n 16 --long-n 16 --max-new-tokens 64 --threads 8 \
        --json "$OUT_DIR/bench_generate_$model.json"
done

"$PY" tests/gpu/summarize.py --dir "$OUT_DIR" --seconds $(($(date +%s) - START))
