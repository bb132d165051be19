"""Batched detection ops written so that they export to ONNX for any batch size.

torchvision's post-processing loops over images in Python, which the ONNX
tracer unrolls into a fixed batch. Here everything is a tensor op over the
batch: ONNX ``NonMaxSuppression`` takes a batch axis and a class axis, and the
per-image variable counts become a fixed top-K with a validity mask.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torchvision
from torch import Tensor

#: Score given to candidates that must never be selected (valid scores are >= 0).
MASKED = -1.0


def _is_tracing() -> bool:
    return torch.jit.is_tracing()


class _BatchedNMS(torch.autograd.Function):
    """ONNX NonMaxSuppression: boxes [B, M, 4], scores [B, C, M] -> [S, 3] (b, c, m).

    Candidates scoring below zero are ignored. The eager forward exists so the
    tracer has something to run; it follows the ONNX operator's semantics.
    """

    @staticmethod
    def forward(ctx: Any, boxes: Tensor, scores: Tensor, max_per_class: int,
                iou_threshold: float) -> Tensor:
        rows = []
        for b in range(scores.shape[0]):
            for c in range(scores.shape[1]):
                candidates = torch.where(scores[b, c] > MASKED / 2)[0]
                keep = torchvision.ops.nms(boxes[b, candidates], scores[b, c, candidates],
                                           iou_threshold)[:max_per_class]
                index = candidates[keep]
                rows.append(torch.stack([torch.full_like(index, b), torch.full_like(index, c),
                                         index], dim=1))
        return torch.cat(rows) if rows else torch.zeros((0, 3), dtype=torch.int64)

    @staticmethod
    def symbolic(g: Any, boxes: Any, scores: Any, max_per_class: int,
                 iou_threshold: float) -> Any:
        max_out = g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.int64))
        iou = g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32))
        score = g.op("Constant", value_t=torch.tensor([MASKED / 2], dtype=torch.float32))
        return g.op("NonMaxSuppression", boxes, scores, max_out, iou, score,
                    center_point_box_i=0)


def batched_nms(boxes: Tensor, scores: Tensor, max_per_class: int, iou_threshold: float) -> Tensor:
    """Indices [S, 3] (batch, class, box) kept by per-(image, class) NMS."""
    out: Tensor = _BatchedNMS.apply(boxes, scores, max_per_class, iou_threshold)
    return out


def dim_min(x: Tensor, dim: int, k: int) -> int:
    """min(k, x.shape[dim]), kept dynamic while tracing for export.

    While tracing, the value is a 0-d tensor, which ``topk`` accepts as its k;
    it is typed ``int`` because that is how callers use it.
    """
    if not _is_tracing():
        return min(k, x.shape[dim])
    size = torch._shape_as_tensor(x)[dim].unsqueeze(0)
    return cast(int, torch.min(torch.cat([torch.tensor([k], dtype=size.dtype), size])))


def nms_topk(boxes: Tensor, scores: Tensor, k: int, iou_threshold: float
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-class NMS per image, then the best ``k`` detections of each image.

    ``boxes`` is either shared by the classes, [B, M, 4], or class-specific,
    [B, C, M, 4]; ``scores`` is [B, C, M] with :data:`MASKED` marking
    candidates that must not be selected. Returns boxes [B, k', 4], scores
    [B, k'], class indices [B, k'], a validity mask [B, k'], sorted by
    score, with k' = min(k, C * M), and each slot's candidate index [B, k'] into
    M (the proposal or anchor it came from, to gather per-candidate vectors).
    Invalid (padding) slots have score :data:`MASKED` and arbitrary boxes.
    """
    batch, classes, num = scores.shape
    if boxes.dim() == 4:
        # Class-specific boxes: every (image, class) pair is its own NMS batch.
        selected = batched_nms(boxes.reshape(-1, num, 4), scores.reshape(-1, 1, num),
                               k, iou_threshold)
        flat = selected[:, 0] * num + selected[:, 2]
    else:
        selected = batched_nms(boxes, scores, k, iou_threshold)
        flat = (selected[:, 0] * classes + selected[:, 1]) * num + selected[:, 2]
    keep = torch.zeros(scores.numel(), dtype=scores.dtype)
    keep = keep.scatter(0, flat, torch.ones_like(flat, dtype=scores.dtype))
    kept_scores = torch.where(keep.reshape(scores.shape) > 0, scores,
                              torch.full_like(scores, MASKED)).reshape(batch, -1)
    top_scores, top_index = kept_scores.topk(dim_min(kept_scores, 1, k), dim=1)
    labels = torch.div(top_index, num, rounding_mode="floor")
    candidate = top_index - labels * num
    if boxes.dim() == 4:
        flat_boxes = boxes.reshape(batch, -1, 4)
        gather_index = top_index
    else:
        flat_boxes = boxes
        gather_index = candidate
    top_boxes = flat_boxes.gather(1, gather_index.unsqueeze(-1).expand(-1, -1, 4))
    return top_boxes, top_scores, labels, top_scores > MASKED / 2, candidate


def row_sum(x: Tensor) -> Tensor:
    """The sum over the last axis as a fixed chain of additions (keepdim): ONNX Runtime's
    ReduceSum adds in an order that depends on the tensor's shape, so the same row summed
    in a batch of one and of eight could differ in the last bit."""
    total = x[..., 0:1]
    for i in range(1, x.shape[-1]):
        total = total + x[..., i:i + 1]
    return total


def class_distribution(scores: Tensor) -> Tensor:
    """Per-class scores [..., C] (each >= 0) divided by their sum: a distribution."""
    return scores / row_sum(scores).clamp(min=1e-12)


def gather_vectors(vectors: Tensor, candidate: Tensor, valid: Tensor) -> Tensor:
    """Per-candidate vectors [B, M, E] -> per-slot [B, k', E]; zeros in padding slots."""
    picked = vectors.gather(1, candidate.unsqueeze(-1).expand(-1, -1, vectors.shape[-1]))
    return torch.where(valid.unsqueeze(-1), picked, torch.zeros_like(picked))


def clip_boxes(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """Clip boxes [B, ..., 4] to each image's valid (height, width) from [B, 2]."""
    shape = [boxes.shape[0]] + [1] * (boxes.dim() - 1)
    height = image_sizes[:, 0].to(boxes.dtype).reshape(shape)
    width = image_sizes[:, 1].to(boxes.dtype).reshape(shape)
    zero = torch.zeros_like(boxes[..., 0])
    x1 = torch.min(torch.max(boxes[..., 0], zero), width.squeeze(-1))
    y1 = torch.min(torch.max(boxes[..., 1], zero), height.squeeze(-1))
    x2 = torch.min(torch.max(boxes[..., 2], zero), width.squeeze(-1))
    y2 = torch.min(torch.max(boxes[..., 3], zero), height.squeeze(-1))
    return torch.stack([x1, y1, x2, y2], dim=-1)


def valid_mask(image_sizes: Tensor, height: int, width: int, stride: int = 1) -> Tensor:
    """[B, 1, height, width] bool mask of pixels inside each image (feature stride aware)."""
    valid_h = torch.div(image_sizes[:, 0] + stride - 1, stride, rounding_mode="floor")
    valid_w = torch.div(image_sizes[:, 1] + stride - 1, stride, rounding_mode="floor")
    rows = torch.arange(height).reshape(1, -1, 1) < valid_h.reshape(-1, 1, 1)
    cols = torch.arange(width).reshape(1, 1, -1) < valid_w.reshape(-1, 1, 1)
    return (rows & cols).unsqueeze(1)


def pad_outputs(boxes: Tensor, scores: Tensor, labels: Tensor, valid: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Contract outputs: zero boxes and scores, label -1 in padding slots."""
    boxes = torch.where(valid.unsqueeze(-1), boxes, torch.zeros_like(boxes))
    scores = torch.where(valid, scores, torch.zeros_like(scores))
    labels = torch.where(valid, labels, torch.full_like(labels, -1))
    return boxes, scores, labels, valid.to(torch.int64).sum(dim=1)
