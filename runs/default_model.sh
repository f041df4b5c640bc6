#!/usr/bin/env bash
# Train codellm's shipped default model from nothing, on this machine's offline sources:
# corpus -> tokenizer -> pretrain (+infilling) -> long-context -> sft, then copy to models/.
# Sized for 2 CPU cores in about an hour; STEPS_* and BATCH scale it (a GPU run uses the same
# stages with larger numbers). Every stage resumes exactly where it stopped if the script is re-run.
#   bash runs/default_model.sh            # everything, into runs/default/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/default}
STEPS_PRETRAIN=${STEPS_PRETRAIN:-900}
STEPS_LONG=${STEPS_LONG:-30}
STEPS_SFT=${STEPS_SFT:-60}
BATCH=${BATCH:-8192}   # tokens per optimizer step
mkdir -p "$RUN"
stage() {  # name, then the command; records wall time per stage in $RUN/times.tsv
    local name=$1; shift
    local t0=$SECONDS
    "$@"
    printf '%s\t%s\n' "$name" $((SECONDS - t0)) >> "$RUN/times.tsv"
}
resume() { [ -d "$RUN/$1/checkpoints" ] && echo --resume || true; }

# 1. corpus: the Python standard library + the local package store (permissive licences only,
#    deduplicated, decontaminated against HumanEval/MBPP/MultiPL-E, split by package)
[ -f "$RUN/corpus/manifest.json" ] || stage corpus $PY -m codellm data build --stdlib \
    --source /opt/pypi/files --source /opt/pypi-more/files --out "$RUN/corpus"

# 2. byte-level BPE tokenizer with <PRE> <SUF> <MID> <EOT>
[ -f "$RUN/tokenizer/tokenizer.json" ] || stage tokenizer $PY -m codellm tokenizer train \
    --corpus "$RUN/corpus" --out "$RUN/tokenizer" --vocab-size 8192 --max-docs 20000

# 3. pretraining with the infilling objective (rate 0.9, PSM/SPM half-half), theta 1e4, 512 tokens
[ -f "$RUN/pretrain/final/config.json" ] || stage pretrain $PY -m codellm train --stage pretrain \
    $(resume pretrain) --out "$RUN/pretrain" --corpus "$RUN/corpus" --tokenizer "$RUN/tokenizer" \
    --model-preset default-cpu --rope-theta 10000 --seq-len 512 --steps "$STEPS_PRETRAIN" \
    --batch-tokens "$BATCH" --micro-batch-size 8 --lr 1e-3 --warmup-steps 30 \
    --log-every 10 --eval-every 100 --eval-batches 8 --save-every 50 --device cpu

# 4. long-context fine-tuning: theta 1e4 -> 1e6, context x4 (2048)
[ -f "$RUN/long/final/config.json" ] || stage long-context $PY -m codellm train --stage long-context \
    $(resume long) --out "$RUN/long" --init "$RUN/pretrain/final" --corpus "$RUN/corpus" \
    --rope-theta 1e6 --seq-len-multiplier 4 --steps "$STEPS_LONG" --batch-tokens "$BATCH" \
    --micro-batch-size 2 --lr 3e-4 --warmup-steps 4 --log-every 5 --eval-every 10 --eval-batches 4 \
    --save-every 10 --device cpu

# 5. instruct variant: docstring -> function dialogs mined from the corpus, with 8% rehearsal
[ -f "$RUN/sft/final/config.json" ] || stage sft $PY -m codellm train --stage sft \
    $(resume sft) --out "$RUN/sft" --init "$RUN/long/final" --corpus "$RUN/corpus" \
    --steps "$STEPS_SFT" --batch-tokens "$BATCH" --micro-batch-size 8 --seq-len 512 --lr 2e-4 \
    --warmup-steps 5 --log-every 5 --eval-every 20 --eval-batches 4 --save-every 20 --device cpu

for s in pretrain long sft; do $PY -m codellm train plot "$RUN/$s"; done
echo "done: $RUN/long/final (base) and $RUN/sft/final (instruct)"
