"""Open-vocabulary detection (Grounding DINO, Liu et al. 2023) and segmentation (SAM, Kirillov et al. 2023).

Both through transformers: no compiled ops, safetensors weights from the Hub, CPU-capable.
(The pip packages `groundingdino-py` and `segment-anything` are not used: the first fails to
build its model under transformers 5 and pins an old `supervision`; the second is unmaintained.)

    detect(image, ["dog", "cat"]) -> [Detection(label, box, score, mask), ...]   best score first

Grounding DINO scores every query box against every text token; a label's score is the best
probability over its own tokens (the phrase-grounding reading used by Grounded-SAM). Boxes above
`box_threshold` whose label score is above `text_threshold` are kept, duplicates of a label are
removed by non-maximum suppression, and SAM turns each box into a mask. Models load lazily and are
cached per (name, dtype) on the CPU: each call brings them to its device and sends them back after,
so between jobs the GPU holds only the base model. On CUDA they run in fp16 (Grounding DINO tiny +
SAM ViT-B: ~0.5 GB instead of ~1 GB of fp32 weights), elsewhere in fp32; scores, boxes and masks are
post-processed in fp32. The name `tiny` builds tiny random models offline (tests, demos).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import hub
from .base import resolve_device
from .errors import UserError

from . import DEFAULT_DETECTOR, DEFAULT_SEGMENTER  # defined in pipelines/__init__.py, read by `app.py --help`
TINY = "tiny"
BOX_THRESHOLD = 0.35
TEXT_THRESHOLD = 0.25
NMS_IOU = 0.5
MAX_PER_LABEL = 5  # boxes kept per label; isolation needs one per subject


@dataclass
class Detection:
    label: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels
    score: float
    mask: np.ndarray | None = field(default=None, repr=False)  # bool [H, W], None without a segmenter

    def to_json(self) -> dict:
        return {"label": self.label, "box": [round(v, 2) for v in self.box], "score": round(self.score, 4),
                "mask_pixels": int(self.mask.sum()) if self.mask is not None else None}


# ---------------------------------------------------------------------------------------------
# Pure post-processing


def label_token_spans(input_ids: list[int], label_ids: list[list[int]], start: int = 1) -> list[list[int]]:
    """Positions of each label's tokens in the prompt "label_1 . label_2 . ..." (after [CLS]).

    The processor joins labels with " . " so the tokens appear in order, each label followed by
    the period token; spans are found by walking the ids in that order.
    """
    spans, position = [], start
    for ids in label_ids:
        while position + len(ids) <= len(input_ids) and input_ids[position : position + len(ids)] != ids:
            position += 1
        if position + len(ids) > len(input_ids):
            raise ValueError(f"label tokens {ids} not found in the prompt ids")
        spans.append(list(range(position, position + len(ids))))
        position += len(ids)
    return spans


def label_scores(token_probs: torch.Tensor, spans: list[list[int]]) -> torch.Tensor:
    """`[Q, T]` per-token probabilities -> `[Q, L]`: each label's best token probability per query."""
    return torch.stack([token_probs[:, span].max(dim=1).values for span in spans], dim=1)


def cxcywh_to_xyxy(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Normalised (cx, cy, w, h) -> pixel (x0, y0, x1, y1), clipped to the image."""
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    scale = torch.tensor([width, height, width, height], dtype=xyxy.dtype)
    return (xyxy * scale).clamp(min=0).minimum(scale)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix of xyxy boxes `[n, 4]` x `[m, 4]` -> `[n, m]`."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


def non_max_suppression(boxes: torch.Tensor, scores: torch.Tensor, iou: float = NMS_IOU) -> list[int]:
    """Indices kept by greedy NMS, best score first."""
    order = scores.argsort(descending=True).tolist()
    keep: list[int] = []
    for index in order:
        if all(box_iou(boxes[index : index + 1], boxes[k : k + 1]).item() <= iou for k in keep):
            keep.append(index)
    return keep


def select_detections(scores: torch.Tensor, boxes: torch.Tensor, labels: list[str], box_threshold: float,
                      text_threshold: float, iou: float = NMS_IOU, max_per_label: int = MAX_PER_LABEL) -> list[tuple[str, tuple, float]]:
    """Queries -> (label, box, score), best score first.

    scores: `[Q, L]` label scores; boxes: `[Q, 4]` pixel xyxy. A query takes its best label; it is
    kept if that score passes both thresholds; NMS runs within each label, which keeps at most
    `max_per_label` boxes.
    """
    best, which = scores.max(dim=1)
    chosen = (best > box_threshold) & (best > text_threshold)
    out = []
    for j, label in enumerate(labels):
        index = torch.nonzero(chosen & (which == j)).flatten()
        if len(index) == 0:
            continue
        index = index[best[index].argsort(descending=True)[: 10 * max_per_label]]  # bound the NMS work
        for k in non_max_suppression(boxes[index], best[index], iou)[:max_per_label]:
            q = index[k].item()
            out.append((label, tuple(float(v) for v in boxes[q]), float(best[q])))
    return sorted(out, key=lambda d: -d[2])


# ---------------------------------------------------------------------------------------------
# Tiny random models (offline tests and demos)


def build_tiny_detector(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny random Grounding DINO with a small WordPiece vocabulary (letters as fallback pieces)."""
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "a", "an", "the", "and", "dog", "cat", "bird",
             "puppy", "kitten", "pet", "animal", "person"]
    words += [chr(c) for c in range(97, 123)] + ["##" + chr(c) for c in range(97, 123)]
    (out_dir / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(out_dir / "vocab.txt"))
    torch.manual_seed(seed)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, image_size=64,
                                   out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=20,
        encoder_attention_heads=2, decoder_attention_heads=2, max_text_len=32, encoder_n_points=2, decoder_n_points=2,
    )
    model = GroundingDinoForObjectDetection(config)
    processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 192}),
                                       tokenizer=tokenizer)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "menagerie_test_model.json").write_text(json.dumps({"kind": "tiny random Grounding DINO"}))
    return out_dir


def build_tiny_segmenter(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny random SAM working at 64 px."""
    from transformers import (SamConfig, SamImageProcessor, SamMaskDecoderConfig, SamModel, SamProcessor,
                              SamPromptEncoderConfig, SamVisionConfig)

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    config = SamConfig(
        vision_config=SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, image_size=64,
                                      patch_size=8, output_channels=32, window_size=4, global_attn_indexes=[1], num_pos_feats=16),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=32, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
                                                 iou_head_hidden_dim=32),
    )
    model = SamModel(config)
    processor = SamProcessor(image_processor=SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                                                               mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16}))
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "menagerie_test_model.json").write_text(json.dumps({"kind": "tiny random SAM"}))
    return out_dir


def _tiny_dir(kind: str) -> Path:
    from .base import tiny_model_dir

    return tiny_model_dir().parent / f"tiny-{kind}-v1"


# ---------------------------------------------------------------------------------------------
# Loading (lazy, cached on the CPU between jobs)

OFFLOAD = torch.device("cpu")  # where the models wait between calls
_MODELS: dict[tuple[str, str, str], tuple[object, torch.nn.Module]] = {}


def detector_dtype(device: str | torch.device) -> torch.dtype:
    """fp16 on CUDA, which halves the models' GPU memory; fp32 elsewhere (CPU half kernels are slow or missing)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def load_model(kind: str, name: str, device: torch.device):
    """(processor, model) to run on `device`: loaded once, in `detector_dtype(device)`, into CPU memory.

    Nothing is put on `device` here; `on_device` brings the model over for one call.
    """
    dtype = detector_dtype(device)
    key = (kind, name, str(dtype).removeprefix("torch."))
    if key in _MODELS:
        return _MODELS[key]
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor, SamModel, SamProcessor

    source = name
    if name == TINY:
        folder = _tiny_dir(kind)
        if not (folder / "config.json").exists():
            (build_tiny_detector if kind == "detector" else build_tiny_segmenter)(folder)
        source = str(folder)
    local_only = Path(source).is_dir() or hub.offline()  # unreachable Hub: fail at once, not after minutes of retries
    model_class, processor_class = (AutoModelForZeroShotObjectDetection, AutoProcessor) if kind == "detector" else (SamModel, SamProcessor)
    try:
        processor = processor_class.from_pretrained(source, local_files_only=local_only)
        model = model_class.from_pretrained(source, local_files_only=local_only, dtype=dtype)
    except (OSError, ValueError) as error:
        flag = "--detector" if kind == "detector" else "--segmenter"
        raise UserError(
            f"{flag} {name!r} could not be loaded ({type(error).__name__}); it is not in the local Hugging Face cache"
            f" and cannot be downloaded here. Download it once with network access (`hf download {name}`), pass a"
            f" local folder, or use {flag} tiny (random test model)"
        ) from None
    model = model.eval()
    _MODELS[key] = (processor, model)
    return processor, model


def model_problem(kind: str, name: str) -> str | None:
    """Why the detector ("detector") or segmenter ("segmenter") `name` cannot be loaded here, said
    before anyone asks for it; None when it can (tiny, a local folder, cached, or the Hub answers)."""
    if name == TINY or Path(os.path.expanduser(name)).is_dir():
        return None
    if hub.cached(name, "config.json") or not hub.offline():
        return None
    flag = "--detector" if kind == "detector" else "--segmenter"
    return (f"{flag} {name!r} is not in the local Hugging Face cache and the Hub cannot be reached. Download it once"
            f" (`hf download {name}`), or start with {flag} PATH (a local folder) or {flag} tiny (random, for tests)")


@contextmanager
def on_device(model: torch.nn.Module, device: torch.device):
    """Run the block with `model` on `device`, then send it back to OFFLOAD, errors included.

    Left on the GPU, the detector and segmenter would hold ~0.5 GB for the life of the process, and
    the next job would pick a slower memory mode for the base model (performance.memory_plan reads
    the free memory). Moving ~0.5 GB of fp16 weights each way costs about 0.1 s on PCIe per call.
    """
    model.to(device)
    try:
        yield model
    finally:
        model.to(OFFLOAD)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # return the freed blocks to the driver, where mem_get_info sees them


# ---------------------------------------------------------------------------------------------
# Entry point


def check_labels(labels: list[str]) -> list[str]:
    labels = [label.strip() for label in labels if label and label.strip()]
    if not labels:
        raise UserError("no labels given; name what to find, e.g. --labels dog,cat")
    if any("." in label for label in labels):
        raise UserError(f"labels must not contain '.', which separates labels for Grounding DINO: {labels}")
    return labels


@torch.no_grad()
def detect(
    image: Image.Image,
    labels: list[str],
    detector: str = DEFAULT_DETECTOR,
    segmenter: str | None = DEFAULT_SEGMENTER,
    device: str | torch.device | None = None,
    box_threshold: float = BOX_THRESHOLD,
    text_threshold: float = TEXT_THRESHOLD,
) -> list[Detection]:
    """Find `labels` in `image`: boxes (Grounding DINO) and masks (SAM), best score first.

    Args:
        image: RGB PIL image.
        labels: what to look for, e.g. ["dog", "cat"].
        detector / segmenter: Hub ids, local folders or "tiny"; segmenter None skips masks.
        box_threshold: minimum box confidence (0-1); text_threshold: minimum label confidence.
    """
    labels = check_labels(labels)
    for name, value in (("box threshold", box_threshold), ("text threshold", text_threshold)):
        if not 0 <= value < 1:
            raise UserError(f"{name} {value} must be in [0, 1)")
    device = device if isinstance(device, torch.device) else resolve_device(device)
    image = image.convert("RGB")
    width, height = image.size

    # 1. Boxes
    processor, model = load_model("detector", detector, device)
    inputs = processor(images=image, text=[labels], return_tensors="pt")
    input_ids = inputs["input_ids"][0].tolist()
    with on_device(model, device):
        outputs = model(**inputs.to(device, model.dtype))  # casts only the floats: pixel_values to the model's dtype
        logits, pred_boxes = outputs.logits[0].float().cpu(), outputs.pred_boxes[0].float().cpu()  # [Q, max_text_len], [Q, 4]
        del inputs, outputs  # their GPU memory goes back with the model's
    tokenizer = processor.tokenizer
    label_ids = [tokenizer(label, add_special_tokens=False).input_ids for label in labels]
    spans = label_token_spans(input_ids, label_ids)
    scores = label_scores(logits.sigmoid(), spans)
    boxes = cxcywh_to_xyxy(pred_boxes, width, height)
    found = select_detections(scores, boxes, labels, box_threshold, text_threshold)
    detections = [Detection(label, box, score) for label, box, score in found]
    if not detections or segmenter is None:
        return detections

    # 2. Masks
    sam_processor, sam = load_model("segmenter", segmenter, device)
    sam_inputs = sam_processor(image, input_boxes=[[list(d.box) for d in detections]], return_tensors="pt")
    sizes = sam_inputs["original_sizes"], sam_inputs["reshaped_input_sizes"]
    with on_device(sam, device):
        sam_outputs = sam(**sam_inputs.to(device, sam.dtype), multimask_output=False)  # pixel_values, input_boxes cast
        low_res = sam_outputs.pred_masks.float().cpu()
        del sam_inputs, sam_outputs
    masks = sam_processor.post_process_masks(low_res, *sizes)[0]  # [n, 1, H, W] bool
    for detection, mask in zip(detections, masks):
        detection.mask = mask[0].numpy().astype(bool)
    return detections


def subject_mask(image: Image.Image, label: str, detector=DEFAULT_DETECTOR, **kwargs) -> Image.Image | None:
    """The mask of the best `label` detection as an L image (white = subject), or None if none found.

    `detector` is a Grounding DINO name, used through `detect` with `kwargs`, or a callable
    `(image, labels) -> [Detection]` best first, as `isolated.isolate` takes (the demo's oracle).
    """
    found = detector(image, [label]) if callable(detector) else detect(image, [label], detector=detector, **kwargs)
    found = [d for d in found if d.mask is not None]
    if not found:
        return None
    return Image.fromarray(found[0].mask.astype(np.uint8) * 255)


PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def draw_detections(image: Image.Image, detections: list[Detection]) -> Image.Image:
    """The image with each detection's mask tinted, its box drawn and its label and score written."""
    canvas = image.convert("RGB").copy()
    overlay = np.asarray(canvas).astype(np.float32)
    for i, detection in enumerate(detections):
        if detection.mask is not None:
            color = np.array(PALETTE[i % len(PALETTE)], dtype=np.float32)
            overlay[detection.mask] = 0.55 * overlay[detection.mask] + 0.45 * color
    canvas = Image.fromarray(overlay.round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for i, detection in enumerate(detections):
        color = PALETTE[i % len(PALETTE)]
        draw.rectangle(detection.box, outline=color, width=max(1, image.width // 200))
        draw.text((detection.box[0] + 2, detection.box[1] + 1), f"{detection.label} {detection.score:.2f}", fill=color)
    return canvas
