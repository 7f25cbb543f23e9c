#!/usr/bin/env bash
# The LaSS pipeline through the CLI on a GPU (--device auto -> cuda, --amp auto -> bf16):
# base (dense) -> fine-tune -> prune -> joint (masked) -> evaluate, Transformer-base on the bundled
# demo subset (en-de, en-zh), token batches. Prints each stage's JSON summary (tokens_per_s) and
# the evaluation table; everything goes to ${OUT:-gpu_pipeline}/pipeline.log.
#   bash tools/gpu_pipeline_check.sh [STEPS=60] [MAX_TOKENS=8192]
set -euo pipefail
STEPS=${1:-60}
MAX_TOKENS=${2:-8192}
OUTDIR=${OUT:-gpu_pipeline}
R=$(mktemp -d)/run
mkdir -p "$OUTDIR"
LS="python3 -m lass_sparse.cli"
# evaluate needs the [lass] extras (langid is not preinstalled on the lent GPU machines: carry a
# wheel, `pip wheel --no-deps langid`); without them the stages run and evaluation is skipped
EVAL=1
python3 -c "import langid, sacrebleu, sentencepiece" 2>/dev/null || EVAL=0
{
  [ $EVAL = 1 ] || echo "gpu_pipeline_check: langid/sacrebleu/sentencepiece missing" \
    "(pip install \".[lass]\"): evaluation skipped"
  set -x
  $LS train --run "$R" --config base --pairs en-de en-zh --max-tokens "$MAX_TOKENS" \
    --steps "$STEPS" --quiet
  $LS finetune --run "$R" --pair all --steps 10 --max-tokens "$MAX_TOKENS" --quiet
  $LS prune --run "$R" --alpha 0.5
  $LS joint --run "$R" --steps "$STEPS" --max-tokens "$MAX_TOKENS" --quiet
  [ $EVAL = 1 ] || exit 0
  $LS evaluate --run "$R" --limit 100 --masks masks.safetensors --name lass --baseline base --quiet
  $LS evaluate --run "$R" --limit 20 --masks masks.safetensors --name lass --quiet --device cpu --directions en-de
} 2>&1 | tee "$OUTDIR/pipeline.log"
