#!/usr/bin/env bash
# Train codellm's shipped default model from nothing, on this machine's offline sources:
# corpus -> tokenizer -> pretrain (+infilling) -> long-context -> sft, then copy to models/.
# Sized for 2 CPU cores in about two hours; STEPS_* scale it (a GPU run uses the same stages).
#   bash runs/default_model.sh            # everything, into runs/default/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/default}
STEPS_PRETRAIN=${STEPS_PRETRAIN:-1500}
STEPS_LONG=${STEPS_LONG:-60}
STEPS_SFT=${STEPS_SFT:-150}
mkdir -p "$RUN"

# 1. corpus: the Python standard library + the local package store (permissive licences only,
#    deduplicated, decontaminated against HumanEval/MBPP/MultiPL-E, split by package)
[ -f "$RUN/corpus/manifest.json" ] || $PY -m codellm data build --stdlib \
    --source /opt/pypi/files --source /opt/pypi-more/files --out "$RUN/corpus"

# 2. byte-level BPE tokenizer with <PRE> <SUF> <MID> <EOT>
[ -f "$RUN/tokenizer/tokenizer.json" ] || $PY -m codellm tokenizer train --corpus "$RUN/corpus" \
    --out "$RUN/tokenizer" --vocab-size 8192 --max-docs 20000

# 3. pretraining with the infilling objective (rate 0.9, PSM/SPM half-half), theta 1e4, 512 tokens
RESUME=(); [ -d "$RUN/pretrain/checkpoints" ] && RESUME=(--resume)
[ -f "$RUN/pretrain/final/config.json" ] || $PY -m codellm train --stage pretrain "${RESUME[@]}" \
    --out "$RUN/pretrain" --corpus "$RUN/corpus" --tokenizer "$RUN/tokenizer" --model-preset default \
    --rope-theta 10000 --seq-len 512 --steps "$STEPS_PRETRAIN" --batch-tokens 8192 --micro-batch-size 8 \
    --lr 2e-3 --warmup-steps 100 --log-every 10 --eval-every 250 --save-every 250 --device cpu

# 4. long-context fine-tuning: theta 1e4 -> 1e6, context x4 (2048), low learning rate
RESUME=(); [ -d "$RUN/long/checkpoints" ] && RESUME=(--resume)
[ -f "$RUN/long/final/config.json" ] || $PY -m codellm train --stage long-context "${RESUME[@]}" \
    --out "$RUN/long" --init "$RUN/pretrain/final" --corpus "$RUN/corpus" --rope-theta 1e6 \
    --seq-len-multiplier 4 --steps "$STEPS_LONG" --batch-tokens 8192 --micro-batch-size 2 \
    --log-every 5 --eval-every 30 --save-every 30 --device cpu

# 5. instruct variant: docstring -> function dialogs mined from the corpus, with rehearsal
RESUME=(); [ -d "$RUN/sft/checkpoints" ] && RESUME=(--resume)
[ -f "$RUN/sft/final/config.json" ] || $PY -m codellm train --stage sft "${RESUME[@]}" \
    --out "$RUN/sft" --init "$RUN/long/final" --corpus "$RUN/corpus" --steps "$STEPS_SFT" \
    --batch-tokens 8192 --micro-batch-size 8 --seq-len 512 --log-every 10 --eval-every 50 \
    --save-every 50 --device cpu

for stage in pretrain long sft; do $PY -m codellm train plot "$RUN/$stage"; done
echo "done: $RUN/long/final (base) and $RUN/sft/final (instruct)"
