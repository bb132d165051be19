"""Adapt a YOLOX ONNX file (Megvii's export, batch 1) to the detector contract.

The original graph is kept as it is, with its batch axis made symbolic. Around
it go two small graphs traced from torch: ``pre`` (uint8 RGB -> float BGR,
pixels outside each image set to the letterbox value) and ``post`` (grid
decoding, score = objectness x class score, class filter, per-class NMS and
padding to K, all batched).

Embeddings come from the same pass: the head's input at each level (the PAFPN
outputs) and the head's stem (the 1x1 conv every level starts with, one width
for all levels) are exposed from the original graph. The image vector is the
valid-region mean of each head input, concatenated; the object vector is the
stem output at the grid cell and level of the anchor that made the detection.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pretag.contract import DRIVING_CLASSES, ModelSpec, ResizeSpec
from pretag.export.common import (
    DYNAMIC_AXES,
    INPUT_NAMES,
    OPSET,
    ExportError,
    finalize,
    sha256_file,
    trace_to_onnx,
)
from pretag.export.fp16 import onnx_to_fp16
from pretag.export.ops import (
    MASKED,
    class_distribution,
    clip_boxes,
    gather_vectors,
    nms_topk,
    pad_outputs,
    valid_mask,
)

log = logging.getLogger(__name__)

COCO80: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)
STRIDES = (8, 16, 32)
FEATURES = [f"head_in{i}" for i in range(3)] + [f"stem{i}" for i in range(3)]
AXES = {**DYNAMIC_AXES, "canvas": {0: "N", 2: "H", 3: "W"}, "raw": {0: "N", 1: "A"},
        **{name: {0: "N", 2: f"h{name}", 3: f"w{name}"} for name in FEATURES}}
EMBEDDING_METHOD = ("mean of the head's input at each level (PAFPN outputs, strides 8, 16, "
                    "32) over the image's valid region, concatenated")
OBJECT_EMBEDDING_METHOD = ("head stem output (the 1x1 conv each level starts with) at the grid "
                           "cell and level of the anchor that produced the detection")
CLASS_PROBABILITY_METHOD = ("each class's score from the YOLOX head (a sigmoid per class, "
                            "objectness left out) divided by their sum over the model's "
                            "classes, at the anchor that produced the detection")
LETTERBOX_VALUE = 114


@dataclass(frozen=True)
class YoloxExport:
    """Settings of ``pretag export yolox``."""

    onnx: Path
    output: Path
    classes: Literal["driving", "coco"] = "driving"
    input_size: int = 416
    score_threshold: float = 0.05
    nms_threshold: float = 0.45
    max_detections: int = 100
    fp16: bool = False


class YoloxPre(nn.Module):
    """uint8 RGB [N, 3, H, W] -> float32 BGR, letterbox value outside each image."""

    def forward(self, images: Tensor, image_sizes: Tensor) -> Tensor:
        x = images.to(torch.float32).index_select(1, torch.tensor([2, 1, 0]))
        inside = valid_mask(image_sizes, x.shape[2], x.shape[3])
        return torch.where(inside, x, torch.full_like(x, float(LETTERBOX_VALUE)))


class YoloxPost(nn.Module):
    """Raw YOLOX output [N, A, 5 + 80] -> contract outputs (boxes in input pixels)."""

    class_ids: Tensor

    def __init__(self, class_ids: list[int], score_threshold: float, nms_threshold: float,
                 max_detections: int) -> None:
        super().__init__()
        self.register_buffer("class_ids", torch.tensor(class_ids, dtype=torch.int64))
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.max_detections = int(max_detections)

    def forward(self, raw: Tensor, image_sizes: Tensor, canvas: Tensor, *features: Tensor
                ) -> tuple[Tensor, ...]:
        """``features``: the head input of each level, then the stem output of each level."""
        head_inputs, stems = features[:3], features[3:]
        grids, strides = [], []
        for stride in STRIDES:
            ys = torch.arange(canvas.shape[2] // stride)
            xs = torch.arange(canvas.shape[3] // stride)
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            grid = torch.stack([gx, gy], dim=-1).reshape(-1, 2)
            grids.append(grid)
            strides.append(torch.ones_like(grid[:, :1]) * stride)
        grid_t = torch.cat(grids).to(raw.dtype)
        stride_t = torch.cat(strides).to(raw.dtype)
        xy = (raw[..., :2] + grid_t) * stride_t
        wh = torch.exp(raw[..., 2:4]) * stride_t
        boxes = clip_boxes(torch.cat([xy - wh / 2, xy + wh / 2], dim=-1), image_sizes)
        scores = (raw[..., 4:5] * raw[..., 5:]).index_select(2, self.class_ids).permute(0, 2, 1)
        scores = torch.where(scores > self.score_threshold, scores,
                             torch.full_like(scores, MASKED))
        top_boxes, top_scores, labels, valid, anchor = nms_topk(
            boxes, scores, self.max_detections, self.nms_threshold)
        per_anchor = torch.cat([s.flatten(2).transpose(1, 2) for s in stems], dim=1)
        distribution = class_distribution(raw[..., 5:].index_select(2, self.class_ids))
        return (*pad_outputs(top_boxes, top_scores, labels, valid),
                image_vectors(head_inputs, image_sizes),
                gather_vectors(per_anchor, anchor, valid),
                gather_vectors(distribution, anchor, valid))


def image_vectors(levels: tuple[Tensor, ...], image_sizes: Tensor) -> Tensor:
    """The mean of each level over each image's valid region, concatenated: [N, sum C]."""
    pooled = []
    for stride, f in zip(STRIDES, levels, strict=True):
        mask = valid_mask(image_sizes, f.shape[-2], f.shape[-1], stride).to(f.dtype)
        pooled.append((f * mask).sum(dim=(2, 3)) / mask.sum(dim=(2, 3)).clamp(min=1.0))
    return torch.cat(pooled, dim=1)


def head_tensors(graph: Any) -> tuple[list[str], list[str], list[int], int]:
    """Names of the head input and the stem output of each level in a YOLOX graph, the
    head inputs' channel counts and the stem width, found by structure.

    Each level ends in Concat(box, objectness, classes); the stem output is the nearest
    tensor both the box and the class branch grow from, and the head input is what the
    stem's convolution reads.
    """
    from onnx import numpy_helper

    producer = {out: node for node in graph.node for out in node.output}
    weights = {t.name: numpy_helper.to_array(t).shape for t in graph.initializer}

    def chain(name: str) -> list[str]:
        names = []
        while name in producer:
            names.append(name)
            name = producer[name].input[0]
        return names

    levels = producer[producer[graph.output[0].name].input[0]]  # Transpose <- Concat
    head_inputs, stems, channels, widths = [], [], [], set()
    for reshaped in levels.input:
        box, _, classes = producer[producer[reshaped].input[0]].input
        class_chain = set(chain(classes))
        stem = next(t for t in chain(box) if t in class_chain)
        conv = producer[producer[stem].input[0]]
        if conv.op_type != "Conv":
            raise ExportError(f"unexpected YOLOX head: {conv.op_type} makes the stem")
        out_c, in_c = weights[conv.input[1]][:2]
        head_inputs.append(conv.input[0])
        stems.append(stem)
        channels.append(int(in_c))
        widths.add(int(out_c))
    if len(head_inputs) != 3 or len(widths) != 1:
        raise ExportError("expected three head levels with one stem width")
    return head_inputs, stems, channels, widths.pop()


def expose_head(model: Any) -> tuple[list[int], int]:
    """Make the head inputs and stem outputs outputs of the graph (named as FEATURES)."""
    from onnx import TensorProto, helper

    graph = model.graph
    head_inputs, stems, channels, width = head_tensors(graph)
    for name, source, size in zip(FEATURES, head_inputs + stems, channels + [width] * 3,
                                  strict=True):
        graph.node.append(helper.make_node("Identity", [source], [name], name=f"expose_{name}"))
        graph.output.append(helper.make_tensor_value_info(
            name, TensorProto.FLOAT, ["N", size, f"h{name}", f"w{name}"]))
    return channels, width


def load_original(path: Path) -> Any:
    """The YOLOX graph with a symbolic batch (and H, W), converted to our opset."""
    import onnx
    from onnx import numpy_helper, version_converter

    if not path.is_file():
        raise ExportError(f"YOLOX ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError and friends
        raise ExportError(f"cannot read {path} as ONNX: {exc}") from None
    graph = model.graph
    if [i.name for i in graph.input] != ["images"] or len(graph.output) != 1:
        raise ExportError(f"{path} does not look like a YOLOX export (one input 'images', "
                          f"one output expected)")
    out_dims = graph.output[0].type.tensor_type.shape.dim
    if len(out_dims) != 3 or out_dims[2].dim_value != 85:
        raise ExportError(f"{path}: output must be [1, A, 85] (80 COCO classes)")
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Reshape" and node.input[1] in inits:
            shape = numpy_helper.to_array(inits[node.input[1]]).copy()
            if shape.size and shape[0] == 1:  # the exported batch: copy it from the input
                shape[0] = 0
                inits[node.input[1]].CopyFrom(numpy_helper.from_array(shape, node.input[1]))
    symbolic = ((graph.input[0], ("N", None, "H", "W")), (graph.output[0], ("N", "A", None)))
    for value, names in symbolic:
        for dim, name in zip(value.type.tensor_type.shape.dim, names, strict=True):
            if name is not None:
                dim.dim_param = name
    del graph.value_info[:]
    return version_converter.convert_version(model, OPSET)


def _rename(graph: Any, prefix: str, mapping: dict[str, str]) -> None:
    """Prefix every tensor and node name of ``graph`` unless ``mapping`` names it."""
    def name(n: str) -> str:
        return n if not n else mapping.get(n, prefix + n)

    for node in graph.node:
        if any(a.type in (5, 10) for a in node.attribute):  # GRAPH, GRAPHS
            raise ExportError(f"node {node.name} has a subgraph; not supported")
        node.input[:] = [name(n) for n in node.input]
        node.output[:] = [name(n) for n in node.output]
        node.name = prefix + node.name
    for init in graph.initializer:
        init.name = name(init.name)


def build_graph(original: Any, pre: Any, post: Any) -> Any:
    """Splice pre -> original -> post into one model with the contract's inputs/outputs."""
    from onnx import helper

    _rename(pre.graph, "pre/", {"images": "images", "image_sizes": "image_sizes",
                                "canvas": "yolox/images"})
    _rename(original.graph, "yolox/", {})
    out_name = "yolox/" + original.graph.output[0].name
    _rename(post.graph, "post/", {"raw": out_name, "image_sizes": "image_sizes",
                                  "canvas": "yolox/images",
                                  **{name: "yolox/" + name for name in FEATURES},
                                  **{o.name: o.name for o in post.graph.output}})
    nodes = [*pre.graph.node, *original.graph.node, *post.graph.node]
    inits = [*pre.graph.initializer, *original.graph.initializer, *post.graph.initializer]
    graph = helper.make_graph(nodes, "pretag_yolox", list(pre.graph.input),
                              list(post.graph.output), inits)
    opset = [helper.make_opsetid("", OPSET)]
    return helper.make_model(graph, opset_imports=opset, ir_version=post.ir_version,
                             producer_name="pretag")


def export_yolox(cfg: YoloxExport) -> ModelSpec:
    """Write the contract model for the YOLOX file ``cfg.onnx`` to ``cfg.output``."""
    if cfg.classes == "driving":
        class_names = DRIVING_CLASSES
    elif cfg.classes == "coco":
        class_names = COCO80
    else:
        raise ExportError(f"unknown class set {cfg.classes!r}; use driving or coco")
    class_ids = [COCO80.index(n) for n in class_names]
    original = load_original(cfg.onnx)
    channels, width = expose_head(original)  # before fp16: they come out as float32
    if cfg.fp16:
        original = onnx_to_fp16(original)
    size = cfg.input_size
    images = torch.full((2, 3, size, size), LETTERBOX_VALUE, dtype=torch.uint8)
    sizes = torch.tensor([[size, size], [size // 2, size]], dtype=torch.int64)
    pre = trace_to_onnx(YoloxPre(), (images, sizes), INPUT_NAMES, ["canvas"], AXES)
    anchors = sum((size // s) ** 2 for s in STRIDES)
    raw = torch.rand(2, anchors, 85)
    features = [torch.rand(2, c, size // s, size // s)
                for c, s in zip(channels + [width] * 3, STRIDES * 2, strict=True)]
    post_module = YoloxPost(class_ids, cfg.score_threshold, cfg.nms_threshold,
                            cfg.max_detections)
    post = trace_to_onnx(post_module, (raw, sizes, images.float(), *features),
                         ["raw", "image_sizes", "canvas", *FEATURES],
                         ["boxes", "scores", "labels", "num_detections", "embeddings",
                          "object_embeddings", "class_probabilities"], AXES)
    model = build_graph(original, pre, post)
    spec = ModelSpec(
        name="yolox_nano-" + cfg.classes,
        class_names=tuple(class_names),
        resize=ResizeSpec("longest_edge", max_size=size, pad_value=LETTERBOX_VALUE,
                          size_multiple=32, canvas=(size, size)),
        score_threshold=cfg.score_threshold,
        max_detections=cfg.max_detections,
        source_weights=f"file:{cfg.onnx.name}",
        source_sha256=sha256_file(cfg.onnx),
        precision="fp16" if cfg.fp16 else "fp32",
        embedding_dim=sum(channels), embedding_method=EMBEDDING_METHOD,
        object_embedding_dim=width, object_embedding_method=OBJECT_EMBEDDING_METHOD,
        class_probability_method=CLASS_PROBABILITY_METHOD,
    )
    return finalize(model, spec, cfg.output)
