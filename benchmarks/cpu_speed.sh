#!/usr/bin/env bash
# Reproduces the "CPU speed (issue 26)" figures of benchmarks/RESULTS.md: the read path
# (pretag bench read) and the whole job in the old default layout (1 session x 2 threads,
# full JPEG decode) against --instances auto with the reduced decode (pretag bench job).
# Run from the repository root after `pip install '.[export,dev]'`.
set -euo pipefail
SHARED="${PRETAG_SHARED:-../shared}"
OUT="${OUT:-benchmarks/results/cpu_speed}"
MODELS="${MODELS:-models}"
NUS="${NUS:-/tmp/nus}"  # the six nuScenes frames alone (copied outside the project)
mkdir -p "$OUT" "$MODELS" "$NUS"
cp "$SHARED"/data/driving/nuscenes_*.jpg "$NUS"/
for s in 416 640; do
  [ -f "$MODELS/yolox$s.onnx" ] || pretag export yolox --onnx "$SHARED/models/yolox_nano.onnx" \
    --input-size $s --output "$MODELS/yolox$s.onnx"
  [ -f "$MODELS/yolox${s}_coco.onnx" ] || pretag export yolox --onnx "$SHARED/models/yolox_nano.onnx" \
    --input-size $s --classes coco --output "$MODELS/yolox${s}_coco.onnx"
done
pretag bench read --images "$NUS" --input-size 640 --output "$OUT/read_nus640.json"
for s in 416 640; do
  pretag bench read --images "$SHARED/data/driving" --input-size $s --output "$OUT/read_driving$s.json"
  pretag bench read --images "$SHARED/data/coco128" --input-size $s --output "$OUT/read_coco$s.json"
done
pretag bench read --images "$SHARED/data/driving" --input-size 640 --threads 2 \
  --output "$OUT/read_driving640_t2.json"
MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=268435456 pretag bench read \
  --images "$SHARED/data/driving" --input-size 640 --output "$OUT/read_driving640_mmap64.json"
for s in 416 640; do
  pretag bench job --model "$MODELS/yolox${s}_coco.onnx" --images "$SHARED/data/coco128" \
    --repeats 5 --layouts 1x2+full 1x2 auto --output "$OUT/job_coco$s.json"
  pretag bench job --model "$MODELS/yolox$s.onnx" --images "$SHARED/data/driving" \
    --repeats 7 --layouts 1x2+full 1x2 auto --output "$OUT/job_driving$s.json"
done
