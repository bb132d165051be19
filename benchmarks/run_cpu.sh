#!/usr/bin/env bash
# Reproduces every CPU figure in benchmarks/RESULTS.md. Run from the repository root after
# `pip install '.[export,dev]'`; SHARED defaults to ../shared (YOLOX-Nano and the images).
# Faster R-CNN uses seeded random weights (torchvision's COCO weights cannot be downloaded
# here); its compute does not depend on the weights' values: the RPN keeps a fixed 1000
# proposals per image and the heads run on all of them.
set -euo pipefail
SHARED="${PRETAG_SHARED:-../shared}"
OUT=benchmarks/results
MODELS="${MODELS:-models}"
mkdir -p "$OUT" "$MODELS"
[ -f "$MODELS/yolox.onnx" ] || pretag export yolox --onnx "$SHARED/models/yolox_nano.onnx" --output "$MODELS/yolox.onnx"
[ -f "$MODELS/frcnn.onnx" ] || pretag export fasterrcnn --weights random --seed 0 --output "$MODELS/frcnn.onnx"

# 1. Model only (ONNX Runtime vs torchvision eager on the same tensors, alternated), 800/1333
pretag bench model --model "$MODELS/frcnn.onnx" --images "$SHARED/data/driving" \
  --batch-sizes 1 2 4 8 --iterations 2 --torch-weights random \
  --output $OUT/model_fasterrcnn_cpu.json --markdown $OUT/model_fasterrcnn_cpu.md
pretag bench model --model "$MODELS/yolox.onnx" --images "$SHARED/data/coco128" \
  --batch-sizes 1 2 4 8 --iterations 20 \
  --output $OUT/model_yolox_cpu.json --markdown $OUT/model_yolox_cpu.md
# 2. Server end to end (separate `pretag serve` process), plus RSS after 500 and 5000 requests
pretag bench server --model "$MODELS/yolox.onnx" --images "$SHARED/data/coco128" \
  --concurrency 1 2 4 8 16 32 --window-s 5 --memory-requests 500 5000 \
  --output $OUT/server_yolox_cpu.json --markdown $OUT/server_yolox_cpu.md
pretag bench server --model "$MODELS/frcnn.onnx" --images "$SHARED/data/driving" \
  --concurrency 1 4 8 --window-s 15 --max-windows 4 --warmup-s 8 \
  --output $OUT/server_fasterrcnn_cpu.json --markdown $OUT/server_fasterrcnn_cpu.md
# 3. Whole job: pretag run (embedded server) vs in-process ONNX Runtime over the same files
pretag bench job --model "$MODELS/yolox.onnx" --images "$SHARED/data/coco128" --repeats 3 \
  --output $OUT/job_yolox_cpu.json --markdown $OUT/job_yolox_cpu.md
# 4. Selection at scale (issue 14): DIVERSITY + BALANCE, 10k picks, synthetic 1280-d vectors;
#    the plain loop (every sample recomputed after each pick) at 20k for the ratio
pretag bench select --sizes 100000 1000000 --picks 10000 --baseline-size 20000 \
  --output $OUT/select_cpu.json --markdown $OUT/select_cpu.md
#    the four sets at 1M read from a run's Parquet shards, as pretag select reads them (the
#    peak is the selection's: RESULTS, "Holding the vectors once")
for set in "scenes 24 0.05" "scenes 64 0.1" "drives 64 0.1" "mixture 64 0.1"; do
  read -r shape latent noise <<< "$set"
  pretag bench select --sizes 1000000 --picks 10000 --baseline-size 0 --stream \
    --shape $shape --latent $latent --noise $noise \
    --output $OUT/select_stream_${shape}_${latent}.json --markdown $OUT/select_stream_${shape}_${latent}.md
done
