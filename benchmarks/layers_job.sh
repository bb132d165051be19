#!/usr/bin/env bash
# pretag run on coco128 (YOLOX-Nano contract model, 416, embedded server, image vectors by
# default), the old commit and this one alternated in one sitting: the layering issue's
# "within 5%" check. OLD: a folder holding an install of the old commit
# (pip install --no-deps --target OLD <tree>); MODEL: the contract model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
IMAGES="${PRETAG_SHARED:-../shared}/data/coco128"
for round in 1 2 3 4; do
  for which in old new; do
    out=$(mktemp -d)
    if [ "$which" = old ]; then pp="$OLD"; else pp=""; fi
    rate=$(PYTHONPATH="$pp" "$PY" -m pretag.cli run "$IMAGES" --output-dir "$out" \
             --model "$MODEL" --quiet 2>/dev/null | awk '/throughput/ {print $2}')
    echo "$round $which $rate"
    rm -rf "$out"
  done
done
