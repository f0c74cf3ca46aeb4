#!/usr/bin/env bash
# Fill benchmarks/gpu_carry/ (git-ignored) with what benchmarks/gpu_check.sh needs on a GPU
# machine that has its own torch and no network, run here where pip reaches PyPI:
#
#   wheels/        baobab's dependencies that such a machine lacks (jsonargparse with its
#                  signature support, fastapi, uvicorn; the openai client for the tests) and
#                  everything they need in turn, as Python 3.12 x86-64 wheels, at the versions
#                  installed in this environment (the ones baobab is tested with);
#   stdlib-4096/   the quickstart corpus (this interpreter's standard library, 4,096-token
#                  BPE), so the GPU's minutes are not spent preparing it.
#
#   bash benchmarks/gpu_wheels.sh [--python PY] [--no-data] [--out DIR] [--python-version 3.12]
#
# --python: the environment whose versions are carried; --out: another folder (then pass it
# to gpu_check.sh --carry); --python-version: the target interpreter (the GPU image: 3.12).
#
# Then copy the working tree with this folder to the GPU machine and run
# `bash benchmarks/gpu_check.sh` there. The folder stays under 64 MiB.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Roots only: pip resolves what they need. torch, numpy, tokenizers, safetensors, xxhash,
# jinja2, prometheus_client, pyyaml, tqdm, matplotlib, scikit-learn, pyarrow, pillow and
# pytest are in the GPU machine's image and none of the roots
# needs them, except PyYAML (small; carried at this environment's version).
ROOTS=("jsonargparse[signatures]" docstring-parser fastapi uvicorn openai)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64
    manylinux2014_x86_64 manylinux1_x86_64)
LIMIT_MIB=48  # of the 64 MiB that travel, leave room for the repository itself

python=python3 data=1 CARRY="$REPO/benchmarks/gpu_carry" pyver=3.12
while [[ $# -gt 0 ]]; do
    case "$1" in
    --python | --out | --python-version)
        [[ $# -ge 2 && -n "$2" ]] || { echo "gpu_wheels.sh: $1 needs a value" >&2; exit 2; }
        case "$1" in --python) python=$2 ;; --out) CARRY=$2 ;; *) pyver=$2 ;; esac
        shift 2 ;;
    --no-data) data=0; shift ;;
    -h | --help) sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_wheels.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done

mkdir -p "$CARRY"
constraints="$CARRY/constraints.txt"
# This environment's versions (torch and baobab itself excluded; local and VCS builds too).
"$python" -m pip list --format=freeze 2>/dev/null |
    grep -viE '^(torch|baobab)==|[+@]' >"$constraints"
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done

rm -rf "$CARRY/wheels"  # one version of each: two would stop the install there
"$python" -m pip download -q --only-binary=:all: --python-version "$pyver" --implementation cp \
    "${platform_args[@]}" -c "$constraints" -d "$CARRY/wheels" "${ROOTS[@]}"
echo "wheels:"
ls -1 "$CARRY/wheels"

if ((data)) && [[ ! -f "$CARRY/stdlib-4096/manifest.json" ]]; then
    echo "preparing the corpus in $CARRY/stdlib-4096 ..."
    (cd "$REPO" && "$python" -c "import sys; from baobab import data; \
data.prepare_stdlib(sys.argv[1], vocab_size=4096)" "$CARRY/stdlib-4096")
fi

mib=$(du -sm "$CARRY" | cut -f1)
echo "$CARRY: ${mib} MiB"
if ((mib > LIMIT_MIB)); then
    echo "gpu_wheels.sh: $CARRY is ${mib} MiB, over ${LIMIT_MIB} MiB: it would not travel with the repository" >&2
    exit 1
fi
