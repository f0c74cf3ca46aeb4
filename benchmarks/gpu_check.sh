#!/usr/bin/env bash
# One check of baobab on a machine with one CUDA GPU, in under 5 minutes, written to one JSON
# file. Made for a GPU machine with its own torch and no network: the missing packages come
# as wheels carried in the working tree (fill benchmarks/gpu_carry/ first, on a machine with
# pip access: bash benchmarks/gpu_wheels.sh).
#
#   bash benchmarks/gpu_check.sh [--out FILE] [--budget 280] [--dry-run] ...   (--help: all)
#
# Steps, each under `timeout` (its cap, and never past what is left of --budget); a step
# that fails or times out is recorded in the JSON and the next one runs all the same:
#   install  carried wheels into WORK/site (on PYTHONPATH), then pip install --no-deps -e .
#            over the machine's own torch; checks that baobab's serving stack imports
#   env      python, torch, the GPU, package versions as installed  (gpu_report.py env)
#   data     the corpus: the carried benchmarks/gpu_carry/stdlib-4096, else prepared here
#   tests    pytest -m cuda over the test files that mark tests cuda (JUnit XML)
#   train    benchmarks/train_throughput.py: gpt2-124m, bf16, fixed steps and rounds
#   export   baobab train (gpt2-124m, bf16, a few steps) and baobab export --dtype bfloat16
#   serve    baobab serve on the GPU, then baobab bench serve at each --concurrency level
# then gpu_report.py assemble writes every number to --out (MFU against the GPU's nominal
# bf16 peak; the goal is 45%), and every step's log goes beside it (NAME_logs.tar.gz).
# Exit status: 0 when every step passed, 1 otherwise, 2 for a bad argument.
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STEP_NAMES=(install env data tests train export serve)
declare -A CAP=([env]=30 [install]=60 [data]=60 [tests]=75 [train]=90 [export]=60 [serve]=120)

usage() {
    cat <<EOF
usage: bash benchmarks/gpu_check.sh [options]

  --out FILE           the JSON report (default: \$OUT/gpu_check.json where \$OUT is set,
                       else benchmarks/results/gpu_check.json)
  --work DIR           scratch directory, cleared first (default: /tmp/baobab-gpu-check)
  --budget SECONDS     wall-clock limit of all steps together (default: 280; the report
                       adds a few seconds)
  --only LIST          run only these steps, comma-separated (default: all:
                       ${STEP_NAMES[*]})
  --model NAME         the model trained, exported and served (default: gpt2-124m)
  --device DEV         torch device of training and serving (default: cuda; cpu runs the
                       same pipeline as a smoke test on a machine without a GPU)
  --train-steps N      optimizer steps per round of train_throughput.py (default: 20)
  --rounds N           rounds of train_throughput.py (default: 2)
  --batch N            batch size for training (default: 32)
  --seq-len N          tokens per sequence for training (default: 1024)
  --export-steps N     steps of the baobab train run that is exported (default: 20)
  --concurrency LIST   bench serve levels, comma-separated (default: 1,16,64)
  --input-len N        bench serve prompt tokens (default: 128)
  --output-len N       bench serve output tokens (default: 128)
  --kv-cache-gib X     the server's KV cache (default: 4; 64 requests of gpt2-124m at
                       full context need 2.3)
  --port N             the server's port on 127.0.0.1 (default: 8321)
  --python PY          the interpreter holding torch (default: python3)
  --carry DIR          wheels/ and stdlib-4096/ to use (default: benchmarks/gpu_carry)
  --dry-run            check the arguments, print the plan, write the report of the
                       planned steps (nothing runs), and exit 0
  -h, --help           this text
EOF
}

die() {  # a bad argument: one sentence, exit 2
    echo "gpu_check.sh: $1 (see --help)" >&2
    exit 2
}

positive_int() {  # NAME VALUE
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}

# ---------------------------------------------------------------------- one step, in a child
# `bash gpu_check.sh --step NAME` runs one step with the settings exported by the parent, so
# that `timeout` can limit (and kill) everything the step starts.
run_one() {
    local py="$GPU_CHECK_PYTHON" work="$GPU_CHECK_WORK"
    cd "$REPO" || return 1
    case "$1" in
    env)
        "$py" benchmarks/gpu_report.py env --out "$work/env.json" && cat "$work/env.json"
        ;;
    install)
        local wheels=("$GPU_CHECK_CARRY"/wheels/*.whl)
        if [[ ! -e "${wheels[0]}" ]]; then
            echo "no wheels in $GPU_CHECK_CARRY/wheels: run benchmarks/gpu_wheels.sh where pip works"
        else
            "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$work/site" "${wheels[@]}" || return 1
        fi
        # Over the machine's own torch; no index, no build isolation: nothing is fetched.
        "$py" -m pip install -q --no-index --no-deps --no-build-isolation -e . ||
            echo "pip install -e . failed; baobab is still importable from PYTHONPATH ($REPO)"
        "$py" -c "import baobab.cli, fastapi, uvicorn, jsonargparse, torch; \
print('baobab imports; torch', torch.__version__, 'cuda', torch.cuda.is_available())"
        ;;
    data)
        if [[ -f "$GPU_CHECK_DATA/manifest.json" ]]; then
            echo "using the carried corpus $GPU_CHECK_DATA"
        else
            "$py" -c "import sys; from baobab import data; data.prepare_stdlib(sys.argv[1], vocab_size=4096)" \
                "$GPU_CHECK_DATA"
        fi
        ;;
    tests)
        local files
        mapfile -t files < <(grep -rlE --include='test_*.py' 'mark\.cuda' tests | sort)
        [[ ${#files[@]} -gt 0 ]] || { echo "no test file marks a test cuda"; return 1; }
        "$py" -m pytest -m cuda -p no:cacheprovider -rfEs --junitxml "$work/pytest.xml" "${files[@]}"
        ;;
    train)
        # train_throughput.py takes CUDA whenever torch sees it: hide it for a cpu smoke run.
        [[ "$GPU_CHECK_DEVICE" == cpu ]] && export CUDA_VISIBLE_DEVICES=""
        "$py" benchmarks/train_throughput.py --model "$GPU_CHECK_MODEL" --precision bf16 \
            --data "$GPU_CHECK_DATA" --steps "$GPU_CHECK_TRAIN_STEPS" --rounds "$GPU_CHECK_ROUNDS" \
            --batch "$GPU_CHECK_BATCH" --seq-len "$GPU_CHECK_SEQ_LEN" \
            --out "$work/train_throughput.json"
        ;;
    export)
        "$py" -m baobab train --model.name "$GPU_CHECK_MODEL" --data.path "$GPU_CHECK_DATA" \
            --data.seq_len "$GPU_CHECK_SEQ_LEN" --data.batch_size "$GPU_CHECK_BATCH" \
            --train.max_steps "$GPU_CHECK_EXPORT_STEPS" --train.log_every 5 --train.eval_batches 2 \
            --train.device "$GPU_CHECK_DEVICE" --train.precision bf16 --train.progress false \
            --train.run_dir "$work/run" &&
            "$py" -m baobab export --checkpoint "$work/run" --out "$work/export" --dtype bfloat16
        ;;
    serve)
        serve_and_bench "$py" "$work"
        ;;
    *)
        echo "unknown step '$1'" >&2
        return 2
        ;;
    esac
}

serve_and_bench() {  # PY WORK: the server in the background, the benchmark against it
    local py=$1 work=$2 url="http://127.0.0.1:$GPU_CHECK_PORT"
    [[ -f "$work/export/config.json" ]] || { echo "no export in $work/export: the export step failed"; return 1; }
    "$py" -m baobab serve "$work/export" --port "$GPU_CHECK_PORT" --engine.device "$GPU_CHECK_DEVICE" \
        --engine.kv_cache_memory_gib "$GPU_CHECK_KV_GIB" --engine.max_num_seqs 64 --drain_timeout 5 \
        --log_level warning >"$work/logs/server.log" 2>&1 &
    SERVER_PID=$!  # global: the EXIT trap runs after this function's locals are gone
    trap 'kill -TERM "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null' EXIT
    local waited=0
    until "$py" -c "import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=2)" "$url/health" 2>/dev/null; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "the server exited before answering /health:"; tail -n 30 "$work/logs/server.log"; return 1
        fi
        ((waited++ < 120)) || { echo "the server did not answer /health within 60 s"; return 1; }
        sleep 0.5
    done
    echo "server healthy after ~$((waited / 2)) s"
    # One run per level, each writing its own file: a level cut short by the step's timeout
    # loses only itself.
    local c levels status=0
    IFS=, read -r -a levels <<<"$GPU_CHECK_CONCURRENCY"
    for c in "${levels[@]}"; do
        "$py" -m baobab bench serve --url "$url" --concurrency "$c" \
            --input_len "$GPU_CHECK_INPUT_LEN" --output_len "$GPU_CHECK_OUTPUT_LEN" --vocab 4096 \
            --out "$work/bench_serve_c$c.json" || status=1
    done
    return "$status"
}

if [[ "${1:-}" == "--step" ]]; then
    run_one "${2:-}"
    exit $?
fi

# ---------------------------------------------------------------------------- arguments
out="" work=/tmp/baobab-gpu-check budget=280 only="" dry_run=0
model=gpt2-124m device=cuda export_steps=20 kv_gib=4
train_steps=20 rounds=2 batch=32 seq_len=1024 concurrency=1,16,64 input_len=128 output_len=128
port=8321 python=python3 carry="$REPO/benchmarks/gpu_carry"
while [[ $# -gt 0 ]]; do
    case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift; continue ;;
    --out | --work | --budget | --only | --model | --device | --train-steps | --rounds | \
        --batch | --seq-len | --export-steps | --concurrency | --input-len | --output-len | \
        --kv-cache-gib | --port | --python | --carry)
        [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value" ;;
    *) die "unknown option '$1'" ;;
    esac
    case "$1" in
    --out) out=$2 ;;
    --work) work=$2 ;;
    --budget) budget=$2 ;;
    --only) only=$2 ;;
    --model) model=$2 ;;
    --device) device=$2 ;;
    --export-steps) export_steps=$2 ;;
    --train-steps) train_steps=$2 ;;
    --rounds) rounds=$2 ;;
    --batch) batch=$2 ;;
    --seq-len) seq_len=$2 ;;
    --concurrency) concurrency=$2 ;;
    --input-len) input_len=$2 ;;
    --output-len) output_len=$2 ;;
    --kv-cache-gib) kv_gib=$2 ;;
    --port) port=$2 ;;
    --python) python=$2 ;;
    --carry) carry=$2 ;;
    esac
    shift 2
done
for pair in "--budget:$budget" "--train-steps:$train_steps" "--rounds:$rounds" "--batch:$batch" \
    "--seq-len:$seq_len" "--export-steps:$export_steps" "--input-len:$input_len" "--output-len:$output_len" "--port:$port"; do
    positive_int "${pair%%:*}" "${pair#*:}"
done
((budget >= 30)) || die "--budget must be at least 30 seconds, got $budget"
((port <= 65535)) || die "--port must be at most 65535, got $port"
[[ "$kv_gib" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)$ && ! "$kv_gib" =~ ^[0.]+$ ]] ||
    die "--kv-cache-gib must be a positive number, got '$kv_gib'"
[[ "$device" =~ ^(cuda(:[0-9]+)?|cpu)$ ]] || die "--device must be cuda, cuda:N or cpu, got '$device'"
[[ "$concurrency" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] ||
    die "--concurrency must be positive integers separated by commas, got '$concurrency'"
selected=("${STEP_NAMES[@]}")
if [[ -n "$only" ]]; then
    [[ "$only" =~ ^[a-z]+(,[a-z]+)*$ ]] || die "--only must be step names separated by commas, got '$only'"
    IFS=, read -r -a selected <<<"$only"
    for s in "${selected[@]}"; do
        [[ -n "${CAP[$s]+x}" ]] || die "--only names an unknown step '$s' (steps: ${STEP_NAMES[*]})"
    done
fi
[[ -n "$out" ]] || out="${OUT:+$OUT/gpu_check.json}"
[[ -n "$out" ]] || out="$REPO/benchmarks/results/gpu_check.json"
[[ "$out" == /* ]] || out="$PWD/$out"
[[ "$work" == /* ]] || work="$PWD/$work"
[[ "$carry" == /* ]] || carry="$PWD/$carry"
command -v "$python" >/dev/null || die "--python '$python' is not a command"
# The work directory is cleared: refuse one that holds anything but an earlier check.
if [[ -d "$work" && -n "$(ls -A "$work")" && ! -f "$work/.gpu_check" ]]; then
    die "--work $work holds other files; name an empty or new directory"
fi

data="$carry/stdlib-4096"
[[ -f "$data/manifest.json" ]] || data="$work/stdlib-4096"
export GPU_CHECK_PYTHON="$python" GPU_CHECK_WORK="$work" GPU_CHECK_CARRY="$carry"
export GPU_CHECK_DATA="$data" GPU_CHECK_TRAIN_STEPS="$train_steps" GPU_CHECK_ROUNDS="$rounds"
export GPU_CHECK_BATCH="$batch" GPU_CHECK_SEQ_LEN="$seq_len" GPU_CHECK_PORT="$port"
export GPU_CHECK_CONCURRENCY="$concurrency" GPU_CHECK_INPUT_LEN="$input_len"
export GPU_CHECK_OUTPUT_LEN="$output_len" GPU_CHECK_MODEL="$model" GPU_CHECK_DEVICE="$device"
export GPU_CHECK_EXPORT_STEPS="$export_steps" GPU_CHECK_KV_GIB="$kv_gib"
# Carried wheels first (they are the versions baobab was tested with), then this checkout.
export PYTHONPATH="$work/site:$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{ rm -rf "$work" && mkdir -p "$work/logs" && touch "$work/.gpu_check"; } || die "cannot create --work $work"
steps_file="$work/steps.tsv"
: >"$steps_file"

echo "gpu_check: $(printf '%s ' "${selected[@]}")within ${budget}s; work $work; report $out"
n_wheels=$(compgen -G "$carry/wheels/*.whl" | wc -l)
echo "  carried: $n_wheels wheels in $carry/wheels; corpus $data"
echo "  train: $model bf16 on $device, batch $batch x $seq_len tokens, $rounds rounds x $train_steps steps"
echo "  serve: bench serve at concurrency $concurrency, $input_len in / $output_len out tokens, port $port"

start=$(date +%s.%N)
failed=0
for name in "${selected[@]}"; do
    left=$(awk -v s="$start" -v now="$(date +%s.%N)" -v b="$budget" 'BEGIN { printf "%d", b - (now - s) }')
    limit=$((CAP[$name] < left ? CAP[$name] : left))
    if ((dry_run)); then
        printf '  %-8s up to %3ss\n' "$name" "${CAP[$name]}"
        printf '%s\t-\t0\t%s\tdry run\n' "$name" "${CAP[$name]}" >>"$steps_file"
        continue
    fi
    if ((left < 5)); then
        echo "[$name] not run: the ${budget}s budget is spent"
        printf '%s\t-\t0\t%s\tnot run: the %ss budget was spent\n' "$name" "${CAP[$name]}" "$budget" >>"$steps_file"
        failed=1
        continue
    fi
    echo "[$name] up to ${limit}s ..."
    t0=$(date +%s.%N)
    timeout --kill-after=5 "$limit" bash "${BASH_SOURCE[0]}" --step "$name" >"$work/logs/$name.log" 2>&1
    rc=$?
    seconds=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    note=""
    ((rc == 124 || rc == 137)) && note="timed out after ${limit}s"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$limit" "$note" >>"$steps_file"
    echo "[$name] rc=$rc in ${seconds}s${note:+ ($note)}"
    ((rc == 0)) || { failed=1; tail -n 5 "$work/logs/$name.log" | sed 's/^/    /'; }
done

mkdir -p "$(dirname "$out")"
timeout 60 "$python" "$REPO/benchmarks/gpu_report.py" assemble --work "$work" --out "$out" || exit 1
# Every step's whole log beside the report (the report keeps only the ends of failed ones).
((dry_run)) || tar -czf "${out%.json}_logs.tar.gz" -C "$work" logs steps.tsv ||
    echo "gpu_check: could not write ${out%.json}_logs.tar.gz" >&2
((dry_run)) && exit 0
exit "$failed"
