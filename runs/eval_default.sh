#!/usr/bin/env bash
# Evaluate one model on every benchmark the Code Llama way (shared/docs/EVAL.md): greedy pass@1; HumanEval and
# MultiPL-E zero-shot, MBPP 3-shot, HumanEval-infilling in both PSM and SPM order. Every task resumes where
# it stopped if the script is re-run; at the end one table + chart (`codellm eval report`) and OUT/SUMMARY.md.
#   bash runs/eval_default.sh MODEL_DIR [OUT_DIR]             # OUT_DIR default: runs/eval/<model dir name>
#   LIMIT=3 bash runs/eval_default.sh models/default /tmp/ev  # the first 3 problems of every task (smoke test)
#   FULL=1 bash runs/eval_default.sh MODEL_DIR                # also the two large infilling sets (see below)
# Sized for the default ~9M-parameter model on 2 CPU cores: about 45 minutes without FULL while a training
# run shares the machine (measured per task: HumanEval 1.5 min, MBPP 8, single-line infilling 4 for both
# orders, MultiPL-E 30 for 7 languages, half of it compiling C++/Java/C#/TypeScript), less on an idle one.
# The large infilling sets (multi-line 5815 and random-span 1640 items, each in two orders) would add about
# 80 minutes there, so they run only with FULL=1. BATCH (engine slots, default 64), THREADS (torch threads,
# default 1: four times faster than 2 for this model on a busy 2-core machine), WORKERS (programs run at
# once, default: all cores) and DEVICE (cpu | cuda) tune the run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODEL=${1:?usage: runs/eval_default.sh MODEL_DIR [OUT_DIR]   (env: LIMIT, FULL, BATCH, THREADS, WORKERS, DEVICE)}
OUT=${2:-runs/eval/$(basename "$MODEL")}
BATCH=${BATCH:-64}
DEVICE=${DEVICE:-cpu}
FULL=${FULL:-0}
export OMP_NUM_THREADS=${THREADS:-1}
mkdir -p "$OUT"

common=(--model "$MODEL" --device "$DEVICE" --max-batch "$BATCH")
[ -n "${LIMIT:-}" ] && common+=(--limit "$LIMIT")
[ -n "${WORKERS:-}" ] && common+=(--workers "$WORKERS")

# MultiPL-E languages whose toolchain the sandbox can run here (the others are left out, and said so)
read -r langs missing < <($PY - <<'EOF'
from codellm.eval.execution import LANGUAGES, missing_tools
from codellm.eval.tasks import MULTIPLE_COUNTS
from codellm.sandbox import Sandbox

with Sandbox(workers=1) as box:
    mode = box.isolation.mode
have = [lang for lang in MULTIPLE_COUNTS if not missing_tools(LANGUAGES[lang], mode)]
lacking = [f"{lang}({'+'.join(missing_tools(LANGUAGES[lang], mode))})" for lang in MULTIPLE_COUNTS if lang not in have]
print(",".join(have), ",".join(lacking) or "-")
EOF
)
left_out=()
[ "$missing" != "-" ] && left_out+=("MultiPL-E ${missing//,/, } (toolchain not usable by the sandbox)")
[ "$FULL" = 1 ] || left_out+=("infill multi-line (5815 x psm/spm) and random-span (1640 x psm/spm): FULL=1 runs them")
for item in "${left_out[@]}"; do echo "left out: $item"; done

runs=()
run() {  # run directory name, max new tokens, then the `codellm eval` action and its options
    local name=$1 tokens=$2; shift 2
    echo "== $name (max $tokens new tokens)"
    $PY -m codellm eval "$@" "${common[@]}" --max-new-tokens "$tokens" --out "$OUT/$name"
    runs+=("$OUT/$name")
}
# max new tokens: above the longest reference solution / middle in this tokenizer's tokens (HumanEval 299,
# MBPP 425 but p99 266, infilling middles 53 / 126 / 190 / 298), the stop sequences end most completions
run humaneval 384 humaneval
run mbpp 384 mbpp
for lang in ${langs//,/ }; do
    run "multipl-e-$lang" 384 multipl-e --lang "$lang"
done
for order in psm spm; do
    run "infill-single-line-$order" 64 infill --benchmark single-line --order "$order"
    run "infill-random-span-light-$order" 128 infill --benchmark random-span-light --order "$order"
    if [ "$FULL" = 1 ]; then
        run "infill-random-span-$order" 192 infill --benchmark random-span --order "$order"
        run "infill-multi-line-$order" 320 infill --benchmark multi-line --order "$order"
    fi
done

$PY -m codellm eval report "${runs[@]}" --png "$OUT/report.png" --markdown "$OUT/SUMMARY.md" | tee "$OUT/report.md"
{
    [ -n "${LIMIT:-}" ] && printf '\nSubset: the first %s problems of each task (LIMIT).\n' "$LIMIT"
    [ ${#left_out[@]} -gt 0 ] && printf '\nLeft out:\n' && printf -- '- %s\n' "${left_out[@]}"
    true
} >> "$OUT/SUMMARY.md"
for item in "${left_out[@]}"; do echo "left out: $item"; done
echo "done: $OUT/SUMMARY.md"
