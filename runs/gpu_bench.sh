#!/usr/bin/env bash
# The GPU benchmark and the GPU tests in one run of about 3 minutes on a lent GPU (an H200 here): ceilings
# (copy bandwidth, bf16 matmul peak), `pytest -m gpu tests/test_gpu.py`, Code Llama 7B-shaped decode and
# prefill against the HBM floor, the matmul peak and transformers, and training MFU at a ~1B shape
# (bench/gpu.py has the sections and every formula). Each section runs in its own process under its own
# time cap, all of them inside GPU_BENCH_BUDGET; a section that fails or is killed is recorded and the next
# one runs. Writes into $OUT: gpu_bench.json (after every part), gpu_bench.md (the table for the README's
# GPU section, also printed last) and gpu_bench.log (everything printed).
#   bash runs/gpu_bench.sh                          # on the GPU machine: python3, the repo on PYTHONPATH
#   CODELLM_GPU_BENCH_DRY=1 bash runs/gpu_bench.sh  # the same code on the CPU with tiny shapes (~30 s)
# Env: PY (interpreter, default python3), OUT (default out/gpu_bench), GPU_BENCH_BUDGET (seconds for
# everything, default 215). Wheels in .whl/ (starlette, uvicorn, pydantic, ...: what the GPU machine lacks for
# `codellm serve`) are installed into a temporary directory put first on PYTHONPATH, each unless the machine
# has it at that version or newer; the dry run leaves them out (they are built for the GPU machine's Python 3.12).
# .whl/ is ignored by git; a session rebuilds it on its own machine (versions as used on 2026-12-04):
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl starlette==1.10.0 uvicorn==0.55.0 pydantic==2.14.4 \
#     pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 click==8.5.1 \
#     typing-extensions==4.16.0 protobuf==7.36.2
set -uo pipefail  # no -e: a failing section is recorded and the next one runs
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PY:-python3}
OUT=${OUT:-out/gpu_bench}
DRY=${CODELLM_GPU_BENCH_DRY:-0}
BUDGET=${GPU_BENCH_BUDGET:-215}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/gpu_bench.json" "$OUT/gpu_bench.md"
dry=()
[ "$DRY" = 1 ] && dry=(--dry-run)

# section NAME CAP RESERVE COMMAND...: run COMMAND under min(CAP, what the budget leaves after RESERVE seconds
# kept for the sections after it), then record how it ended (`gpu.py finish`; for the tests, pytest's counts)
section() {
    local name=$1 cap=$2 start=$SECONDS rc
    local left=$((BUDGET - SECONDS - $3))
    shift 3
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -lt 5 ]; then
        echo "== $name: skipped, ${left} s of the budget left"
        $PY bench/gpu.py finish "$name" --out "$OUT" --rc 124 --cap 0
        return
    fi
    echo "== $name (cap ${cap} s, at ${SECONDS} s)"
    # timeout signals its whole process group: a section's children (the test server, compile workers) end too
    if [ "$name" = tests ]; then
        timeout -k 5 "$cap" "$@" 2>&1 | tee "$TESTS_LOG"
        rc=${PIPESTATUS[0]}
    else
        timeout -k 5 "$cap" "$@" --out "$OUT" --budget "$cap" ${dry[@]+"${dry[@]}"}
        rc=$?
    fi
    $PY bench/gpu.py finish "$name" --out "$OUT" --rc "$rc" --cap "$cap" --seconds $((SECONDS - start)) \
        --log "$TESTS_LOG"
}

main() {
    echo "gpu_bench: $(date -u '+%Y-%m-%d %H:%M:%S') UTC, budget ${BUDGET} s, dry run: $DRY"
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
        --format=csv,noheader
    if [ "$DRY" != 1 ] && compgen -G ".whl/*.whl" > /dev/null; then
        mapfile -t wheels < <($PY - <<'EOF'
import glob
from importlib import metadata


def key(version):
    try:
        from packaging.version import Version

        return Version(version)
    except Exception:
        return tuple(int(p) if p.isdigit() else 0 for p in version.split(".")[:3])


for wheel in sorted(glob.glob(".whl/*.whl")):
    name, version = wheel.split("/")[-1].split("-")[:2]
    try:
        if key(metadata.version(name)) >= key(version):
            continue  # the machine's own is as new: keep it
    except metadata.PackageNotFoundError:
        pass
    print(wheel)
EOF
        )
        if [ "${#wheels[@]}" -gt 0 ]; then
            SITE=$(mktemp -d /tmp/codellm-site.XXXXXX)
            if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${wheels[@]}"; then
                export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
                echo "wheels: installed ${wheels[*]##*/} into $SITE"
            else
                echo "wheels: install failed; what needs them (the serve test) will skip"
            fi
        fi
    fi
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
    TESTS_LOG=$(mktemp /tmp/codellm-gpu-tests.XXXXXX)
    # caps (s): ceilings 30, tests 75, decode 90, train the rest; each keeps a reserve for those after it
    section ceilings 30 150 $PY bench/gpu.py ceilings
    section tests 75 95 $PY -m pytest -o addopts= -q -m gpu -rfEs -p no:cacheprovider tests/test_gpu.py
    section decode 90 45 $PY bench/gpu.py decode
    section train 120 5 $PY bench/gpu.py train
    echo "== table (at ${SECONDS} s)"
    $PY bench/gpu.py table --out "$OUT" --wall "$SECONDS"
}

main 2>&1 | tee "$OUT/gpu_bench.log"
exit "${PIPESTATUS[0]}"
