"""torchvision Faster R-CNN rewritten as one batch-agnostic graph (detector contract v1).

The backbone, FPN, RPN head, box head and box coders are torchvision's own
modules with their weights. What changes is everything that loops over images
in torchvision: anchor generation, RPN proposal filtering, multi-scale RoI
pooling and box post-processing are batched (see :mod:`pretag.export.ops`),
and the transform's normalisation and padding move inside the graph, driven by
``image_sizes``. Resizing stays outside (recorded in the model's metadata).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.ops.poolers import initLevelMapper

from pretag.contract import DRIVING_CLASSES, ModelSpec, ResizeSpec
from pretag.export.common import INPUT_NAMES, ExportError, finalize, trace_to_onnx
from pretag.export.fp16 import HalfPrecision
from pretag.export.ops import (
    MASKED,
    class_distribution,
    clip_boxes,
    dim_min,
    gather_vectors,
    nms_topk,
    pad_outputs,
    row_sum,
    valid_mask,
)
from pretag.export.weights import COCO_CATEGORIES, load_fasterrcnn

OUTPUT_NAMES = ["boxes", "scores", "labels", "num_detections", "embeddings", "object_embeddings",
                "class_probabilities"]
EMBEDDING_METHOD = ("mean of each FPN level (strides 4-64, 256 channels each) over the image's "
                    "valid region, concatenated")
OBJECT_EMBEDDING_METHOD = ("box head representation (output of the two-layer MLP head, "
                           "TwoMLPHead.fc7) of the proposal each detection came from")
CLASS_PROBABILITY_METHOD = ("softmax of the box predictor's class logits (torchvision's 91 "
                            "outputs, background included) for the proposal each detection "
                            "came from, restricted to the model's classes and divided by their "
                            "sum")


def _level_tensors(objectness: Tensor, deltas: Tensor) -> tuple[Tensor, Tensor]:
    """[N, A, H, W] and [N, 4A, H, W] -> [N, H*W*A] and [N, H*W*A, 4] (torchvision's order)."""
    n, a, h, w = objectness.shape
    ob = objectness.permute(0, 2, 3, 1).reshape(n, -1)
    d = deltas.reshape(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
    return ob, d


class BatchedFasterRCNN(nn.Module):
    """uint8 images [N, 3, H, W] + image_sizes [N, 2] -> contract outputs."""

    class_ids: Tensor
    mean: Tensor
    std: Tensor

    def __init__(self, model: FasterRCNN, class_ids: list[int], score_threshold: float,
                 max_detections: int, fp16: bool = False) -> None:
        super().__init__()
        model = model.eval()
        rpn, heads = model.rpn, model.roi_heads

        def precision(module: nn.Module) -> nn.Module:
            return HalfPrecision(module) if fp16 else module

        self.backbone = precision(model.backbone)
        self.rpn_head = precision(rpn.head)
        self.anchor_generator = rpn.anchor_generator
        self.rpn_coder = rpn.box_coder
        self.pre_nms_top_n = int(rpn._pre_nms_top_n["testing"])
        self.post_nms_top_n = int(rpn._post_nms_top_n["testing"])
        self.rpn_nms = float(rpn.nms_thresh)
        self.rpn_min_size = float(rpn.min_size)
        self.rpn_score_thresh = float(rpn.score_thresh)
        pool = heads.box_roi_pool
        self.featmap_names = list(pool.featmap_names)
        self.roi_output_size = pool.output_size
        self.sampling_ratio = int(pool.sampling_ratio)
        self.box_head = precision(heads.box_head)
        self.box_predictor = precision(heads.box_predictor)
        self.box_coder = heads.box_coder
        self.box_nms = float(heads.nms_thresh)
        self.score_threshold = float(score_threshold)
        self.max_detections = int(max_detections)
        self.register_buffer("class_ids", torch.tensor(class_ids, dtype=torch.int64))
        transform = model.transform
        self.register_buffer("mean", torch.tensor(transform.image_mean).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(transform.image_std).reshape(1, 3, 1, 1))

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, ...]:
        x = (images.to(torch.float32) / 255.0 - self.mean) / self.std
        # torchvision pads after normalising, with zeros: do the same whatever the pad value.
        x = x * valid_mask(image_sizes, x.shape[2], x.shape[3]).to(x.dtype)
        features = self.backbone(x)
        feats = list(features.values())
        proposals, proposal_valid = self._proposals(x, feats, image_sizes)
        pooled = self._roi_pool(features, proposals)
        represent = self.box_head(pooled)  # [N * P, representation size]
        class_logits, box_regression = self.box_predictor(represent)
        *detections, valid, candidate = self._detections(class_logits, box_regression,
                                                         proposals, proposal_valid, image_sizes)
        n, p = proposals.shape[:2]
        objects = gather_vectors(represent.reshape(n, p, -1).to(torch.float32), candidate, valid)
        logits = class_logits.to(torch.float32)
        exp = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
        softmax = exp / row_sum(exp)  # as torch.softmax, summed in a fixed order
        distribution = class_distribution(softmax.index_select(1, self.class_ids))
        return (*detections, self._embeddings(feats, image_sizes), objects,
                gather_vectors(distribution.reshape(n, p, -1), candidate, valid))

    def _anchors(self, x: Tensor, feats: list[Tensor]) -> list[Tensor]:
        """Anchors per level, the same for every image of the padded batch."""
        gen = self.anchor_generator
        grid_sizes = [f.shape[-2:] for f in feats]
        strides = [[torch.empty((), dtype=torch.int64).fill_(x.shape[-2] // g[0]),
                    torch.empty((), dtype=torch.int64).fill_(x.shape[-1] // g[1])]
                   for g in grid_sizes]
        gen.set_cell_anchors(x.dtype, x.device)
        anchors: list[Tensor] = gen.grid_anchors(grid_sizes, strides)
        return anchors

    def _proposals(self, x: Tensor, feats: list[Tensor], image_sizes: Tensor
                   ) -> tuple[Tensor, Tensor]:
        """RPN: per-level top-k, decode, clip, filter, NMS per level, top post_nms_top_n."""
        objectness, deltas = self.rpn_head(feats)
        boxes, scores, levels = [], [], []
        for level, (ob_map, d_map, anchors) in enumerate(
                zip(objectness, deltas, self._anchors(x, feats), strict=True)):
            ob, d = _level_tensors(ob_map, d_map)
            top_ob, index = ob.topk(dim_min(ob, 1, self.pre_nms_top_n), dim=1)
            top_d = d.gather(1, index.unsqueeze(-1).expand(-1, -1, 4))
            top_anchors = anchors[index]
            decoded = self.rpn_coder.decode_single(top_d.reshape(-1, 4), top_anchors.reshape(-1, 4))
            boxes.append(decoded.reshape(ob.shape[0], -1, 4))
            scores.append(torch.sigmoid(top_ob))
            levels.append(torch.zeros_like(top_ob, dtype=torch.int64) + level)
        box = clip_boxes(torch.cat(boxes, 1), image_sizes)
        score = torch.cat(scores, 1)
        level_of = torch.cat(levels, 1)
        wh = box[..., 2:] - box[..., :2]
        ok = (wh >= self.rpn_min_size).all(dim=-1) & (score >= self.rpn_score_thresh)
        by_level = torch.arange(len(objectness)).reshape(1, -1, 1) == level_of.unsqueeze(1)
        masked = torch.where(by_level & ok.unsqueeze(1), score.unsqueeze(1),
                             torch.full_like(score.unsqueeze(1), MASKED))
        proposals, _, _, valid, _ = nms_topk(box, masked, self.post_nms_top_n, self.rpn_nms)
        return proposals, valid

    def _roi_pool(self, features: dict[str, Tensor], proposals: Tensor) -> Tensor:
        """MultiScaleRoIAlign over all images at once (RoiAlign takes batch indices)."""
        n, p = proposals.shape[:2]
        flat = proposals.reshape(-1, 4)
        batch_index = torch.arange(n).reshape(-1, 1).expand(n, p).reshape(-1, 1)
        rois = torch.cat([batch_index.to(flat.dtype), flat], dim=1)
        maps = [features[name] for name in self.featmap_names]
        # torchvision infers these from shapes; for ResNet-FPN levels '0'..'3' they are
        # always strides 4..32 (canvases are multiples of 32), so RoI levels 2..5.
        scales = [2.0 ** -(2 + i) for i in range(len(maps))]
        levels = initLevelMapper(2, 1 + len(maps))([flat])
        result = torch.zeros((rois.shape[0], maps[0].shape[1], *self.roi_output_size),
                             dtype=flat.dtype)
        for level, (feature, scale) in enumerate(zip(maps, scales, strict=True)):
            index = torch.where(levels == level)[0]
            pooled = torchvision.ops.roi_align(feature, rois[index], self.roi_output_size,
                                               spatial_scale=scale,
                                               sampling_ratio=self.sampling_ratio)
            result = result.index_put((index,), pooled)
        return result

    def _detections(self, class_logits: Tensor, box_regression: Tensor, proposals: Tensor,
                    proposal_valid: Tensor, image_sizes: Tensor) -> tuple[Tensor, ...]:
        n, p = proposals.shape[:2]
        decoded = self.box_coder.decode_single(box_regression, proposals.reshape(-1, 4))
        boxes = clip_boxes(decoded.reshape(n, p, -1, 4), image_sizes)
        scores = torch.softmax(class_logits, -1).reshape(n, p, -1)
        boxes = boxes.index_select(2, self.class_ids).permute(0, 2, 1, 3)
        scores = scores.index_select(2, self.class_ids).permute(0, 2, 1)
        wh = boxes[..., 2:] - boxes[..., :2]
        ok = ((scores > self.score_threshold) & (wh >= 1e-2).all(dim=-1)
              & proposal_valid.unsqueeze(1))
        scores = torch.where(ok, scores, torch.full_like(scores, MASKED))
        top_boxes, top_scores, labels, valid, candidate = nms_topk(
            boxes, scores, self.max_detections, self.box_nms)
        return (*pad_outputs(top_boxes, top_scores, labels, valid), valid, candidate)

    def _embeddings(self, feats: list[Tensor], image_sizes: Tensor) -> Tensor:
        """Mean of each FPN level (strides 4..64) over each image's valid region, concatenated."""
        pooled = []
        for level, f in enumerate(feats):
            mask = valid_mask(image_sizes, f.shape[-2], f.shape[-1], 4 * 2**level).to(f.dtype)
            total = (f * mask).sum(dim=(2, 3))
            pooled.append(total / mask.sum(dim=(2, 3)).clamp(min=1.0))
        return torch.cat(pooled, dim=1)


def eager_reference(model: FasterRCNN, images: Tensor, image_sizes: Tensor,
                    class_ids: list[int], max_detections: int, score_threshold: float
                    ) -> list[dict[str, Tensor]]:
    """torchvision's own eager path on the same padded uint8 batch, for parity checks.

    Runs backbone, RPN and RoI heads exactly as torchvision does (its per-image
    loops included), then restricts each image's detections to ``class_ids`` and
    keeps the best ``max_detections``; the model's own cap is lifted so that the
    restriction happens before the cap, as in the exported graph.
    """
    from torchvision.models.detection.image_list import ImageList

    model = model.eval()
    t = model.transform
    mean = torch.tensor(t.image_mean, device=images.device).reshape(1, 3, 1, 1)
    std = torch.tensor(t.image_std, device=images.device).reshape(1, 3, 1, 1)
    x = (images.float() / 255.0 - mean) / std
    sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
    padded = torch.zeros_like(x)
    for i, (h, w) in enumerate(sizes):
        padded[i, :, :h, :w] = x[i, :, :h, :w]
    heads = model.roi_heads
    saved = heads.detections_per_img, heads.score_thresh
    heads.detections_per_img, heads.score_thresh = 10**9, score_threshold
    try:
        with torch.inference_mode():
            image_list = ImageList(padded, sizes)
            features = model.backbone(padded)
            proposals, _ = model.rpn(image_list, features)
            detections, _ = model.roi_heads(features, proposals, sizes)
    finally:
        heads.detections_per_img, heads.score_thresh = saved
    lookup = {c: i for i, c in enumerate(class_ids)}
    out = []
    for det in detections:
        keep = torch.tensor([int(label) in lookup for label in det["labels"]], dtype=torch.bool)
        keep_idx = torch.where(keep)[0][:max_detections]
        out.append({
            "boxes": det["boxes"][keep_idx],
            "scores": det["scores"][keep_idx],
            "labels": torch.tensor([lookup[int(v)] for v in det["labels"][keep_idx]],
                                   dtype=torch.int64),
        })
    return out




@dataclass(frozen=True)
class FasterRCNNExport:
    """Settings of ``pretag export fasterrcnn``."""

    output: Path
    weights: str = "default"
    classes: Literal["driving", "coco"] = "driving"
    min_size: int = 800
    max_size: int = 1333
    score_threshold: float = 0.05
    max_detections: int = 100
    rpn_pre_nms_top_n: int = 1000
    rpn_post_nms_top_n: int = 1000
    fp16: bool = False
    seed: int = 0


def class_selection(classes: str) -> tuple[list[int], list[str]]:
    """torchvision label ids and names for ``driving`` (the seven) or ``coco`` (the 80)."""
    if classes == "coco":
        ids = [i for i, n in enumerate(COCO_CATEGORIES) if n not in ("__background__", "N/A")]
    elif classes == "driving":
        ids = [COCO_CATEGORIES.index(n) for n in DRIVING_CLASSES]
    else:
        raise ExportError(f"unknown class set {classes!r}; use driving or coco")
    return ids, [COCO_CATEGORIES[i] for i in ids]


def export_fasterrcnn(cfg: FasterRCNNExport) -> ModelSpec:
    """Load weights per ``cfg`` and write the contract ONNX to ``cfg.output``."""
    loaded = load_fasterrcnn(cfg.weights, cfg.seed,
                             rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n,
                             rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n)
    return export_fasterrcnn_model(loaded.model, cfg, loaded.source, loaded.sha256)


def export_fasterrcnn_model(model: FasterRCNN, cfg: FasterRCNNExport, source: str,
                            sha256: str) -> ModelSpec:
    """Trace ``model`` (a torchvision Faster R-CNN) into the contract ONNX graph."""
    ids, names = class_selection(cfg.classes)
    graph = BatchedFasterRCNN(model, ids, cfg.score_threshold, cfg.max_detections,
                              fp16=cfg.fp16).eval()
    # Two images of different sizes so that nothing gets specialised to one shape.
    images = torch.full((2, 3, 192, 224), 114, dtype=torch.uint8)
    images[:, :, 40:150, 60:200] = 200
    sizes = torch.tensor([[192, 224], [160, 192]], dtype=torch.int64)
    spec = ModelSpec(
        name=f"fasterrcnn_resnet50_fpn-{cfg.classes}",
        class_names=tuple(names),
        resize=ResizeSpec("shortest_edge", max_size=cfg.max_size, min_size=cfg.min_size,
                          pad_value=0, size_multiple=32),
        score_threshold=cfg.score_threshold,
        max_detections=cfg.max_detections,
        source_weights=source,
        source_sha256=sha256,
        precision="fp16" if cfg.fp16 else "fp32",
        embedding_dim=256 * 5, embedding_method=EMBEDDING_METHOD,
        object_embedding_dim=int(model.roi_heads.box_head.fc7.out_features),
        object_embedding_method=OBJECT_EMBEDDING_METHOD,
        class_probability_method=CLASS_PROBABILITY_METHOD,
    )
    proto = trace_to_onnx(graph, (images, sizes), INPUT_NAMES, OUTPUT_NAMES)
    return finalize(proto, spec, cfg.output)
