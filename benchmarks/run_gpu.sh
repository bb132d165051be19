#!/usr/bin/env bash
# The GPU figures of issue 5, for a machine with onnxruntime-gpu (see ../shared/gpu/README.md).
# Not yet run: no task so far has had a GPU. Run from the repository root after
# `pip install '.[export,dev]'` and onnxruntime-gpu; SHARED defaults to ../shared.
# Faster R-CNN at 800/1333 with seeded random weights (compute does not depend on the
# values: the RPN keeps 1000 proposals per image), FP32 and FP16, batch 1 to 16 on the CUDA
# execution provider. Fraction of peak uses 134 GFLOPs per image (torchvision's figure at
# 800x1333) and the peaks below: H100 SXM dense tensor-core figures; FP32 convolutions may
# run as TF32 (ONNX Runtime's use_tf32 option), so the FP32 fraction is against TF32.
set -euo pipefail
SHARED="${PRETAG_SHARED:-../shared}"
OUT=benchmarks/results
MODELS="${MODELS:-models}"
PEAK_TF32="${PEAK_TF32:-495}"
PEAK_FP16="${PEAK_FP16:-989}"
mkdir -p "$OUT" "$MODELS"
[ -f "$MODELS/frcnn.onnx" ] || pretag export fasterrcnn --weights random --seed 0 --output "$MODELS/frcnn.onnx"
[ -f "$MODELS/frcnn_fp16.onnx" ] || pretag export fasterrcnn --weights random --seed 0 --fp16 --output "$MODELS/frcnn_fp16.onnx"
for precision in fp32 fp16; do
  model="$MODELS/frcnn.onnx"; peak="$PEAK_TF32"
  if [ "$precision" = fp16 ]; then model="$MODELS/frcnn_fp16.onnx"; peak="$PEAK_FP16"; fi
  pretag bench model --model "$model" --images "$SHARED/data/driving" --providers cuda \
    --batch-sizes 1 2 4 8 16 --iterations 30 --gflops-per-image 134 --peak-tflops "$peak" \
    --output "$OUT/model_fasterrcnn_cuda_$precision.json" \
    --markdown "$OUT/model_fasterrcnn_cuda_$precision.md"
done
# Server end to end on the GPU (the server picks CUDA when onnxruntime-gpu is installed)
pretag bench server --model "$MODELS/frcnn_fp16.onnx" --images "$SHARED/data/driving" \
  --concurrency 1 4 16 32 --max-batch-size 16 --window-s 5 \
  --output "$OUT/server_fasterrcnn_cuda_fp16.json" --markdown "$OUT/server_fasterrcnn_cuda_fp16.md"
