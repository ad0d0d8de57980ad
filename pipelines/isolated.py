"""Isolated Diffusion (Zhu, Ma, Chen, Yuan 2024, arXiv 2403.16954), detector-guided, with concepts.

Multi-attachment (paper section 3.2): prompts [uncond, base, base + attachment_1..k] combine per step as

    eps = (1 - l) eps_u + l eps_base + sum_i l (eps_i - eps_base)            (l: guidance scale)

Multi-subject (section 3.3): sample a layout with the full prompt and keep the latent x at t_lay
(about 0.75 of T); detect each subject in the layout by its class word (Grounding DINO, not the
paper's YOLO: open vocabulary fits pets) and segment it (SAM). Each subject i gets a branch latent
in which the *other* subjects' regions are replaced by fresh noise,

    x^i = x * (1 - U_{j != i} M_j) + noise * U_{j != i} M_j ,

and every branch is denoised from t_lay with its own prompt and its own concept (that concept's
ED-LoRA, so no fusion is needed, or a fused model); the background is denoised with the full
prompt; the noise predictions are fused by the masks,

    eps = eps_0 * (1 - U_n M_n) + sum_i eps_i * M_i .

The fused prediction drives the shared latent; each branch latent takes its own step with its own
prediction, so inside M_i the two stay equal and the final image shows branch i there. All
latents of a step (background and branches, both CFG halves, all attachments) go through one UNet
call; peft runs each row with its own concept's LoRA.

With boxes (one per subject, our addition; `pipelines.layout`) the layout is sampled with
self- and cross-attention bounded by the boxes, detections are matched to boxes by position, and
the branches start at 0.3 T instead of 0.75 (measured in docs/toyworld.md).
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .base import TEST_MODEL_NOTE, BaseModel
from .errors import Cancelled, UserError
from .layerwise import concept_words, concepts_in, encode_layerwise, expand_prompt, install_layerwise_attention
from .performance import unet_forward
from .sample import DEFAULT_NEGATIVE_PROMPT, decode_latents, denoise, initial_latents, make_scheduler

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass(frozen=True)
class Subject:
    """A subject to isolate: the detector label (a word of the prompt) and its own prompt."""

    label: str  # e.g. "dog": what Grounding DINO looks for in the layout
    prompt: str  # e.g. "a photo of <mochi> dog": this subject's branch prompt


@dataclass(frozen=True)
class IsolateConfig:
    prompt: str  # the full prompt, e.g. "a dog and a cat in a hot spring"
    subjects: tuple[Subject, ...] = ()
    attachments: tuple[str, ...] = ()  # "label=prompt" for a subject, or a prompt for the background
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    t_lay: float | None = None  # layout time, a fraction of T; None: 0.75 (paper: 700-800 of 1000), BOX_T_LAY with boxes
    steps: int = 30
    guidance: float = 7.5  # the paper's lambda
    seed: int = 0
    width: int | None = None
    height: int | None = None
    box_threshold: float = 0.35
    text_threshold: float = 0.25
    # With boxes (one pixel box (x0, y0, x1, y1) per subject, in subject order) each subject is
    # isolated in its own box; without, wherever the detector finds it.
    boxes: tuple[tuple[int, int, int, int], ...] = ()
    layout_self_attention: float = 1.0  # share of layout steps with bounded self-attention between the boxes
    # Bounded cross-attention in those steps (LAYOUT_CROSS_ATTENTION): "boxes" (a box's pixels see no other subject's word),
    # "all" (and pixels outside every box see no subject word), or "off"
    layout_cross_attention: str = "boxes"
    layout_retries: int = 3  # layouts re-sampled with the next seed while a box is missed or two boxes merge
    added_bootstrap: float = 0.3  # share of branch steps an added subject's branch is bootstrapped in its box


# With boxes the branches start later (measured in the toy world, docs/toyworld.md: from t = 0.75 T
# the branches redraw each subject at the concept's own size and break the boxes' layout; from
# 0.3 T they keep it). Without boxes the paper's 0.75 stands.
BOX_T_LAY = 0.3
LAYOUT_CROSS_ATTENTION = ("off", "boxes", "all")  # choices (see the field) of IsolateConfig.layout_cross_attention
PAPER_T_LAY = 0.75


def layout_time(config: "IsolateConfig") -> float:
    """The layout time in use: the config's, or the default for its mode."""
    if config.t_lay is not None:
        return config.t_lay
    return BOX_T_LAY if config.boxes else PAPER_T_LAY


RETRY_SEED_STRIDE = 7919  # a retried layout uses seed + attempt * this (a prime: far from the user's next seeds)


@dataclass
class BoxAssignment:
    """What became of one box: its subject's detection, a part of a merged one, or an added subject."""

    index: int  # the box's position (= its subject's) in config.boxes
    box: tuple[int, int, int, int]
    subject: str  # the subject's mask key ("dog", "dog-2")
    status: str  # "matched", "split" (a part of a detection spanning several boxes) or "added" (none found)
    detection: int | None = None  # index into IsolatedResult.found
    iou: float = 0.0  # of the detection's box with this box

    def to_json(self) -> dict:
        return {"box": list(self.box), "subject": self.subject, "status": self.status, "detection": self.detection,
                "iou": round(self.iou, 3)}


@dataclass
class SubjectPlan:
    """Which subjects are isolated, with which masks, and how each was found in the layout."""

    subjects: list[int]  # indices into config.subjects, in branch order
    masks: list[np.ndarray]  # image-size bool masks, disjoint, one per isolated subject
    detections: list  # the Detection of each isolated subject (None for one added in its box)
    assignments: list[BoxAssignment]  # boxes mode: one per box; else empty
    added: list[int] = field(default_factory=list)  # positions in `subjects` of subjects added in their box
    missing: list[int] = field(default_factory=list)  # indices into config.subjects of subjects not isolated
    boxes: list = field(default_factory=list)  # boxes mode: the box of each isolated subject

    def problems(self) -> int:
        """Boxes not found as one clean detection (boxes mode), or subjects not found (label mode)."""
        if self.assignments:
            return sum(a.status != "matched" for a in self.assignments)
        return len(self.missing)


@dataclass
class IsolatedResult:
    layout: Image.Image  # the plain sample with the full prompt
    final: Image.Image  # after isolation (the layout itself if nothing was found)
    detections: list = field(default_factory=list)  # Detection (None: added in its box) per isolated subject
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # label -> bool mask at image size
    missing: list[str] = field(default_factory=list)  # subject labels not found in the layout
    message: str = ""
    metadata: dict = field(default_factory=dict)
    latents: torch.Tensor | None = field(default=None, repr=False)  # final [1 + S, C, h, w]: background, branches
    found: list = field(default_factory=list)  # every detection in the (chosen) layout
    assignments: list[BoxAssignment] = field(default_factory=list)  # boxes mode: what became of each box
    attempts: int = 1  # layouts sampled (boxes mode retries merged or missed layouts; the best is kept)
    blocked: list[str] = field(default_factory=list)  # "layout", "final image": turned black by the safety checker


# ---------------------------------------------------------------------------------------------
# Pure functions


def combine_attachments(eps_uncond: torch.Tensor, eps_base: torch.Tensor, eps_attachments: list[torch.Tensor], scale: float) -> torch.Tensor:
    """(1 - l) eps_u + l eps_base + sum_i l (eps_i - eps_base); with no attachments, plain CFG."""
    eps = (1 - scale) * eps_uncond + scale * eps_base
    for eps_i in eps_attachments:
        eps = eps + scale * (eps_i - eps_base)
    return eps


def branch_latents(latent: torch.Tensor, noise: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """One latent per subject with the other subjects' regions replaced by `noise`.

    latent, noise: [1, C, h, w]; masks: [S, 1, h, w] of 0/1 (disjoint). Returns [S, C, h, w].
    """
    union = masks.sum(0, keepdim=True).clamp(max=1)  # [1, 1, h, w]
    others = (union - masks).clamp(min=0)  # [S, 1, h, w]: the other subjects' regions
    return latent * (1 - others) + noise * others


def fuse_predictions(eps_background: torch.Tensor, eps_subjects: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """eps_0 (1 - U M) + sum_i eps_i M_i. eps_background [1, C, h, w]; eps_subjects [S, C, h, w]; masks [S, 1, h, w]."""
    union = masks.sum(0, keepdim=True).clamp(max=1)
    return eps_background * (1 - union) + (eps_subjects * masks).sum(0, keepdim=True)


def disjoint_masks(masks: list[np.ndarray]) -> list[np.ndarray]:
    """Make masks disjoint: earlier masks (higher scores) keep the pixels they share with later ones."""
    taken = np.zeros_like(masks[0], dtype=bool) if masks else None
    out = []
    for mask in masks:
        out.append(mask & ~taken)
        taken = taken | mask
    return out


def latent_masks(masks: list[np.ndarray], latent_h: int, latent_w: int) -> torch.Tensor:
    """Image-size bool masks -> [S, 1, h, w] float: a latent cell is in when half its pixels are.

    A cell split exactly half/half between two masks goes to the earlier one, so the latent masks
    stay disjoint (overlapping masks would add two branch predictions in `fuse_predictions`).
    """
    stacked = torch.from_numpy(np.stack(masks)).float()[:, None]  # [S, 1, H, W]
    inside = F.adaptive_avg_pool2d(stacked, (latent_h, latent_w)) >= 0.5
    taken = torch.zeros_like(inside[0])
    for mask in inside:
        mask &= ~taken
        taken |= mask
    return inside.float()


def layout_step_index(timesteps: torch.Tensor, t_lay: float, num_train_timesteps: int) -> int:
    """Index of the first sampling step whose timestep is at or below t_lay * T (at least 1)."""
    below = (timesteps <= t_lay * num_train_timesteps).nonzero()
    index = int(below[0, 0]) if len(below) else len(timesteps) - 1
    return min(max(index, 1), len(timesteps) - 1)


def word_in_prompt(word: str, prompt: str) -> bool:
    """True when `prompt` mentions `word` as whole words, its last word in any simple English form
    ("cat" is in "two cats on a sofa", "teddy bear" in "two teddy bears"; `layout.noun_forms`);
    a concept's `<name>` is not a mention."""
    import re

    from .layout import noun_forms

    words = word.lower().split()
    if not words:
        return False
    head = "".join(re.escape(w) + r"\s+" for w in words[:-1])
    last = "|".join(re.escape(form) for form in sorted(noun_forms(words[-1]), key=len, reverse=True))
    return re.search(rf"(?<![\w<]){head}(?:{last})(?![\w>])", prompt.lower()) is not None


def parse_subject(text: str) -> Subject:
    """'label=prompt' -> Subject."""
    if "=" not in text:
        raise UserError(f"--subject {text!r} must look like 'dog=<mochi> dog' (detector label = branch prompt)")
    label, prompt = (part.strip() for part in text.split("=", 1))
    if not label or not prompt:
        raise UserError(f"--subject {text!r} must look like 'dog=<mochi> dog' (detector label = branch prompt)")
    return Subject(label=label, prompt=prompt)


# ---------------------------------------------------------------------------------------------
# Which detection becomes which subject


def plan_by_label(found: list, config: IsolateConfig) -> SubjectPlan:
    """Without boxes: each subject takes the best-scoring unused detection of its label."""
    plan = SubjectPlan([], [], [], [])
    used = set()
    for number, subject in enumerate(config.subjects):
        candidates = [i for i, d in enumerate(found) if d.label == subject.label and i not in used]
        if not candidates:
            plan.missing.append(number)
            continue
        best = max(candidates, key=lambda i: found[i].score)
        used.add(best)
        plan.subjects.append(number)
        plan.detections.append(found[best])
    plan.masks = disjoint_masks([d.mask for d in plan.detections]) if plan.detections else []
    return plan


def plan_boxes(found: list, config: IsolateConfig, width: int, height: int) -> SubjectPlan:
    """With boxes: detections matched to boxes by position; merged ones split, missing subjects added.

    Masks are made disjoint with matched detections first, then split parts, then added boxes, so an
    added subject never paints over a found one.
    """
    from .layout import box_iou, box_pixels, boxes_spanned, match_detections_to_boxes, split_mask_by_boxes

    boxes = [tuple(b) for b in config.boxes]
    labels = [s.label for s in config.subjects]
    keys = [mask_key(list(config.subjects), i) for i in range(len(boxes))]
    matched = match_detections_to_boxes([d.box for d in found], [d.label for d in found], boxes, labels)
    masks: list = [None] * len(boxes)
    status: list = [None] * len(boxes)
    source: list = [None] * len(boxes)
    spanning = []
    for i, j in enumerate(matched):
        if j is None:
            continue
        spans = boxes_spanned(found[j].mask, boxes)
        if len(spans) >= 2 and i in spans:
            spanning.append((i, j, spans))
        else:
            masks[i], status[i], source[i] = found[j].mask, "matched", j
    for i, j, spans in spanning:  # a merged detection: each box it covers takes its part, if still empty
        parts = split_mask_by_boxes(found[j].mask, boxes)
        for k in spans:
            if masks[k] is None or k == i:
                masks[k], status[k], source[k] = parts[k], "split", j
    for i in range(len(boxes)):
        if masks[i] is None or not masks[i].any():
            masks[i], status[i], source[i] = box_pixels(boxes[i], width, height), "added", None
    priority = sorted(range(len(boxes)), key=lambda i: ("matched", "split", "added").index(status[i]))
    taken = np.zeros((height, width), dtype=bool)
    for i in priority:
        masks[i] = masks[i] & ~taken
        taken |= masks[i]
    plan = SubjectPlan([], [], [], [], boxes=[])
    for i in range(len(boxes)):
        detection = found[source[i]] if source[i] is not None else None
        iou = box_iou(boxes[i], detection.box) if detection is not None else 0.0
        plan.assignments.append(BoxAssignment(i, boxes[i], keys[i], status[i], source[i], iou))
        if not masks[i].any():  # wholly covered by other subjects' masks: nothing left to isolate
            plan.missing.append(i)
            continue
        if status[i] == "added":
            plan.added.append(len(plan.subjects))
        plan.subjects.append(i)
        plan.masks.append(masks[i])
        plan.detections.append(detection)
        plan.boxes.append(boxes[i])
    return plan


# ---------------------------------------------------------------------------------------------
# Mixed-adapter UNet calls


@contextmanager
def mixed_adapters(unet: torch.nn.Module, row_adapters: list[str]):
    """Run each batch row of the UNet with its own LoRA adapter (or BASE_ADAPTER for none).

    Every LoRA layer adds `x_row A_row^T B_row^T * scale` for its rows through two batched matmuls
    over per-row stacked factors (zeros for base rows), built once per call of this context. This
    computes what peft's mixed-adapter batch computes (`adapter_names=`), but peft loops over the
    adapters with a gather and a scatter each in all 128 layers, which made isolation steps launch-bound.
    """
    from .edlora import lora_layers

    layers = lora_layers(unet)
    for layer in layers.values():
        layer.enable_adapters(False)  # the base layer runs alone; the hook adds the per-row LoRA
    if not layers or all(name == BASE_ADAPTER for name in row_adapters):
        yield
        return
    handles = []
    for layer in layers.values():
        down, up = row_lora_factors(layer, row_adapters)
        if down is None:
            continue
        handles.append(layer.register_forward_hook(_row_lora_hook(down, up)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def row_lora_factors(layer, row_adapters: list[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-row LoRA factors of one peft layer: A `[rows, r, in]`, B * scale `[rows, out, r]` (fp32)."""
    names = [n for n in dict.fromkeys(row_adapters) if n != BASE_ADAPTER and n in layer.lora_A]
    if not names:
        return None, None
    rank = max(layer.lora_A[n].weight.shape[0] for n in names)
    weight = layer.get_base_layer().weight.flatten(1)  # an imported LoRA's 1x1 conv [out, in, 1, 1] as [out, in]
    down = torch.zeros(len(row_adapters), rank, weight.shape[1], device=weight.device)
    up = torch.zeros(len(row_adapters), weight.shape[0], rank, device=weight.device)
    for row, name in enumerate(row_adapters):
        if name in names:
            a, b = layer.lora_A[name].weight.flatten(1), layer.lora_B[name].weight.flatten(1)
            down[row, : a.shape[0]] = a.float()
            up[row, :, : b.shape[1]] = b.float() * layer.scaling[name]
    return down, up


def _row_lora_hook(down: torch.Tensor, up: torch.Tensor):
    def add_lora(module, args, output):
        x = args[0]  # [rows, L, in], or [rows, in, H, W] into a 1x1 conv (a linear over pixels)
        pixels = x.flatten(2).transpose(1, 2) if x.ndim == 4 else x
        delta = torch.bmm(torch.bmm(pixels.float(), down.transpose(1, 2)), up.transpose(1, 2))  # [rows, L, out]
        if x.ndim == 4:
            delta = delta.transpose(1, 2).reshape(output.shape)
        return output + delta.to(output.dtype)

    return add_lora


# ---------------------------------------------------------------------------------------------
# Entry point


def mask_key(subjects: list, index: int) -> str:
    """The subject's label, numbered when several subjects share it ("dog", "dog-2")."""
    label = subjects[index].label
    count = sum(s.label == label for s in subjects[: index + 1])
    return label if count == 1 else f"{label}-{count}"


def check_isolate_config(config: IsolateConfig, base: BaseModel) -> tuple[int, int]:
    from .sample import check_size

    width = base.native_resolution if config.width is None else config.width
    height = base.native_resolution if config.height is None else config.height
    check_size(width, height, base.vae_scale_factor)
    if not config.prompt.strip():
        raise UserError("the prompt is empty; describe the scene, e.g. 'a dog and a cat in a hot spring'")
    if config.t_lay is not None and not 0 < config.t_lay < 1:
        raise UserError(f"--t-lay {config.t_lay} must be between 0 and 1 (exclusive); 0.75 is typical without boxes,"
                        f" {BOX_T_LAY} with boxes")
    if config.steps < 2 or config.steps > 1000:
        raise UserError(f"--steps {config.steps} must be between 2 and 1000")
    labels = [s.label for s in config.subjects]
    shared = {label for label in labels if labels.count(label) > 1}  # two dogs: the detector finds both
    for attachment in config.attachments:
        if "=" in attachment and attachment.split("=", 1)[0].strip() in shared:
            raise UserError(f"attachment {attachment!r} names {attachment.split('=', 1)[0].strip()!r}, which several"
                            f" subjects share; put it in that subject's own prompt instead")
    for subject in config.subjects:
        if not word_in_prompt(subject.label, config.prompt):
            raise UserError(f"subject label {subject.label!r} does not appear in the prompt {config.prompt!r}; the"
                            f" layout is searched for it, so the prompt must mention it")
    if config.boxes:
        from .regional import Region, check_regions

        if len(config.boxes) != len(config.subjects):
            raise UserError(f"{len(config.boxes)} boxes for {len(config.subjects)} subjects; give one box per subject, in the"
                            f" same order (or no boxes to find the subjects anywhere)")
        check_regions([Region(tuple(int(v) for v in box), subject.label) for box, subject in zip(config.boxes, config.subjects)],
                      width, height)
    for name in ("layout_self_attention", "added_bootstrap"):
        if not 0 <= getattr(config, name) <= 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(config, name)} must be a share of the steps between 0 and 1")
    if config.layout_cross_attention not in LAYOUT_CROSS_ATTENTION:
        raise UserError(f"--layout-cross-attention {config.layout_cross_attention!r} must be one of {', '.join(LAYOUT_CROSS_ATTENTION)}")
    if not 0 <= config.layout_retries <= 10:
        raise UserError(f"--layout-retries {config.layout_retries} must be between 0 and 10")
    for attachment in config.attachments:
        if "=" in attachment and attachment.split("=", 1)[0].strip() not in labels:
            raise UserError(f"attachment {attachment!r} names subject {attachment.split('=', 1)[0].strip()!r}, which is not a --subject")
    return width, height


def isolate(
    base: BaseModel,
    library,
    config: IsolateConfig,
    detector="IDEA-Research/grounding-dino-tiny",
    segmenter: str = "facebook/sam-vit-base",
    fused: str | os.PathLike | None = None,
    callback: Callable[[str, int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> IsolatedResult:
    """Isolated Diffusion for several subjects (and attachments) with concepts, optionally in boxes.

    Without boxes each subject takes the best-scoring detection of its label. With boxes (one per
    subject) the layout is sampled with bounded self-attention between the boxes and bounded
    cross-attention (each box reads only its own subject's word of the prompt), detections are
    matched to boxes by position (`layout.match_detections_to_boxes`), a layout whose detections
    merge two boxes or miss one is re-sampled with the next seed (`layout_retries`), and what is
    still wrong is mended: a merged detection is split by the boxes, a box with no detection gets
    its subject added (fresh noise in the box, bootstrapped in its branch). `result.assignments`
    says what happened to each box. With the safety checker on, a flagged layout or final image
    comes back black (`result.blocked`, and the message says so).

    Args:
        detector: Grounding DINO name (Hub id, folder or "tiny"), used with `segmenter` (SAM) through
            `pipelines.detect.detect`; or a callable `(image, labels) -> [Detection]` with masks,
            e.g. a stand-in with known boxes in tests. Named models load before any sampling.
        fused: a fused model folder; without it each subject's concepts load as their own
            ED-LoRA (the full prompt may then name no concept).
        callback: `(stage, step, total)` with stage "layout" or "isolate".
    """
    from .concept import check_compatible
    from .edlora import apply_concept, set_active_adapters
    from .fusion import load_fused

    # 1. Check inputs, load the concepts and the detector
    width, height = check_isolate_config(config, base)
    subject_concepts = [concepts_in(s.prompt) for s in config.subjects]
    for subject, names in zip(config.subjects, subject_concepts):
        if len(names) > 1 and fused is None:
            raise UserError(f"subject {subject.label!r} names several concepts ({', '.join(names)}); give each subject one, or use --fused")
    background_concepts = concepts_in(config.prompt) + concepts_in(config.negative_prompt)
    all_names = list(dict.fromkeys(background_concepts + [n for names in subject_concepts for n in names]))
    if fused is not None:
        fused_model = load_fused(base, fused)
        missing = [n for n in all_names if n not in fused_model.concepts]
        if missing:
            raise UserError(f"the fused model {fused} does not hold {', '.join('<' + n + '>' for n in missing)}")
    else:
        records = [library.get(name) for name in all_names]  # unknown concepts raise here
        for record in records:
            check_compatible(record, base)
        if background_concepts:
            raise UserError(f"the full prompt names {', '.join('<' + n + '>' for n in background_concepts)}; without --fused"
                            f" put concepts only in --subject prompts (each branch loads its own concept)")
        for record in records:
            apply_concept(base, record.name, library.weights(record.name, base), lora_scale=1.0)
    if config.subjects and not callable(detector):
        from .detect import detect, load_model

        detector_name = detector
        load_model("detector", detector_name, base.device)  # fail now, not after the layout is sampled
        load_model("segmenter", segmenter, base.device)

        def detector(image, labels):
            return detect(image, labels, detector=detector_name, segmenter=segmenter, device=base.device,
                          box_threshold=config.box_threshold, text_threshold=config.text_threshold)

    started = time.perf_counter()

    def check_cancel() -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("isolated sampling cancelled")

    with torch.no_grad():
        for model in (base.text_encoder, base.unet):
            set_active_adapters(model, [])
        background_prompts = [config.prompt] + [a for a in config.attachments if "=" not in a]
        background_context = encode_layerwise(base.tokenizer, base.text_encoder, background_prompts)  # [1 + k, L, d]
        uncond = encode_layerwise(base.tokenizer, base.text_encoder, [config.negative_prompt])
    scheduler = make_scheduler("dpm++", base.scheduler_config)
    scheduler.set_timesteps(config.steps, device=base.device)
    lay_index = layout_step_index(scheduler.timesteps.cpu(), layout_time(config), scheduler.config.num_train_timesteps)
    metadata = {"app": "menagerie", "method": "isolated", **asdict(config), "width": width, "height": height,
                "subjects": [asdict(s) for s in config.subjects], "concepts": all_names, "base_model": base.name,
                "fused": str(fused) if fused else None,
                "fused_note": fused_model.note if fused is not None else "", "layout_step": lay_index, "t_lay_used": layout_time(config)}
    if base.is_test_model:
        metadata["note"] = TEST_MODEL_NOTE

    # 2. Multi-attachment only: no layout, every step combines the prompts
    if not config.subjects:
        latent = initial_latents(base, 1, width, height, config.seed) * scheduler.init_noise_sigma
        plan = SubjectPlan([], [], [], [])
        result = IsolatedResult(layout=None, final=None)
        lay_index = metadata["layout_step"] = 0
    # 3. Layout, detection and assignment (re-sampled while boxes are merged or missed)
    else:
        labels = list(dict.fromkeys(s.label for s in config.subjects))
        best, sampled = None, 0
        for attempt in range(1 + (config.layout_retries if config.boxes else 0)):
            sampled += 1
            seed = config.seed + attempt * RETRY_SEED_STRIDE
            layout_image, latent = sample_layout(base, config, background_context[:1], uncond, width, height, seed,
                                                 lay_index, callback, check_cancel)
            found = [d for d in detector(layout_image, labels) if d.mask is not None]
            plan = plan_boxes(found, config, width, height) if config.boxes else plan_by_label(found, config)
            trial = (plan.problems(), attempt, seed, layout_image, latent, found, plan)
            if best is None or trial[0] < best[0]:
                best = trial
            if plan.problems() == 0:
                break
        _, attempt, seed, layout_image, latent, found, plan = best
        metadata.update(layout_seed=seed, layout_attempts=sampled, layout_kept=attempt + 1)
        result = IsolatedResult(layout=layout_image, final=layout_image, detections=plan.detections,
                                missing=[config.subjects[i].label for i in plan.missing], attempts=sampled,
                                found=found, assignments=plan.assignments)
        if not plan.subjects:
            result.message = (f"no subject was found in the layout ({', '.join(s.label for s in config.subjects)}); the layout"
                              f" image is returned unchanged. Try another seed or a lower detection threshold")
            result.metadata = {**metadata, "missing": result.missing, "message": result.message}
            return screen_stages(base, result)
        if result.missing:
            result.message = f"not found in the layout, left as sampled: {', '.join(result.missing)}"
        mended = [a for a in plan.assignments if a.status != "matched"]
        if mended:
            result.message = "; ".join(f"box {a.index + 1} ({a.subject}): {a.status}" for a in mended)

    # 4. Branch latents at t_lay and masks at latent resolution
    subjects = [config.subjects[i] for i in plan.subjects]
    factor = base.vae_scale_factor
    latent_h, latent_w = height // factor, width // factor
    result.masks = {mask_key(subjects, i): m for i, m in enumerate(plan.masks)}
    masks = latent_masks(plan.masks, latent_h, latent_w).to(base.device) if subjects else None
    generator = torch.Generator("cpu").manual_seed(config.seed + 1)
    noise = torch.randn(latent.shape, generator=generator).to(base.device) * scheduler.init_noise_sigma
    if subjects:
        added = torch.tensor([i in plan.added for i in range(len(subjects))], device=base.device).float()[:, None, None, None]
        fresh = (masks * added).sum(0, keepdim=True).clamp(max=1)  # added subjects' boxes start from fresh noise
        latent = latent * (1 - fresh) + noise * fresh
        all_latents = torch.cat([latent, branch_latents(latent, noise, masks)])  # [1 + S, C, h, w]
    else:
        all_latents = latent

    # 5. Prompts of every row: per latent, [uncond, base, attachments...]
    with torch.no_grad():
        rows_context, rows_adapter, groups = [], [], []
        for index in range(1 + len(subjects)):
            if index == 0:
                prompts, adapter = background_prompts, BASE_ADAPTER
            else:
                subject = subjects[index - 1]
                prompts = [subject.prompt] + [a.split("=", 1)[1].strip() for a in config.attachments
                                              if "=" in a and a.split("=", 1)[0].strip() == subject.label]
                names = subject_concepts[plan.subjects[index - 1]]
                adapter = names[0] if names and fused is None else BASE_ADAPTER
            set_active_adapters(base.text_encoder, [] if adapter == BASE_ADAPTER else [adapter])
            encoded = encode_layerwise(base.tokenizer, base.text_encoder, prompts)
            rows_context += [uncond[0]] + list(encoded)
            rows_adapter += [adapter] * (1 + len(prompts))
            groups.append(1 + len(prompts))
        set_active_adapters(base.text_encoder, [])
        context = torch.stack(rows_context).to(base.dtype)  # [rows, L, d]

    # 6. Denoise every latent from t_lay in one batched UNet call per step
    bootstrap = None
    if plan.added:
        from .layout import plain_colour_latents

        with torch.no_grad():
            plain = plain_colour_latents(base.vae, len(subjects), width, height, config.seed, base.dtype).to(base.device)
        bootstrap = AddedBootstrap([1 + i for i in plan.added], [plan.boxes[i] for i in plan.added], plain, noise,
                                   width, height, config.added_bootstrap)
    all_latents = denoise_branches(base, all_latents, context, rows_adapter, groups, masks, config, lay_index, bootstrap,
                                   callback, check_cancel)
    with torch.no_grad():
        result.final = decode_latents(base, all_latents[:1])[0]
    result.latents = all_latents
    if result.layout is None:
        result.layout = result.final
    result.metadata = {**metadata, "missing": result.missing, "message": result.message,
                       "detections": [d.to_json() if d is not None else None for d in result.detections],
                       "assignments": [a.to_json() for a in result.assignments],
                       "seconds": round(time.perf_counter() - started, 3)}
    return screen_stages(base, result)


def sample_layout(base: BaseModel, config: IsolateConfig, context: torch.Tensor, uncond: torch.Tensor, width: int, height: int,
                  seed: int, lay_index: int, callback, check_cancel) -> tuple[Image.Image, torch.Tensor]:
    """A plain sample of the full prompt (bounded between the boxes, if any): its image and its latent at t_lay."""
    from .layout import (LayoutControl, cross_attention_biases, install_bounded_self_attention, label_word_positions,
                         self_attention_biases)

    install_layerwise_attention(base.unet)
    bias = None
    bounded_steps = LayoutControl(self_attention=config.layout_self_attention).steps(config.steps)["self_attention"]
    if not config.boxes:
        bounded_steps = 0
    cross_bias = None
    if bounded_steps:
        install_bounded_self_attention(base.unet)
        factor = base.vae_scale_factor
        bias = self_attention_biases(list(config.boxes), width, height, height // factor, width // factor, base.device, base.dtype)
        if config.layout_cross_attention != "off":
            # positions in the prompt as encoded (a concept's <name> becomes its two tokens; every layer's copy aligns)
            encoded_prompt = expand_prompt(config.prompt, 0, concept_words(base.text_encoder))
            words = label_word_positions(base.tokenizer, encoded_prompt, [s.label for s in config.subjects])
            cross_bias = cross_attention_biases(list(config.boxes), words, base.tokenizer.model_max_length, width, height,
                                                height // factor, width // factor, base.device, base.dtype,
                                                block_background=config.layout_cross_attention == "all")
    kept = {}

    def keep(i: int, latents: torch.Tensor) -> None:
        check_cancel()
        if i == lay_index:
            kept["latent"] = latents.clone()

    def progress(step: int, total: int) -> None:
        if callback is not None:
            callback("layout", step, total)

    latents = initial_latents(base, 1, width, height, seed)
    latents = denoise(base, latents, context, uncond, config.steps, config.guidance, "dpm++", progress, None,
                      self_attention_bias=bias, self_attention_steps=bounded_steps, cross_attention_bias=cross_bias,
                      latents_callback=keep)
    with torch.no_grad():
        return decode_latents(base, latents)[0], kept["latent"]


class AddedBootstrap:
    """Bootstrapping of the branches of subjects the layout missed (MultiDiffusion, as in `layout.BoxBootstrap`).

    For its first steps such a branch sees its box's latent inside the box and a noised plain colour
    outside, shifted so the box sits in the middle of the canvas: the model has to draw the subject
    there, where the final image takes it from.
    """

    def __init__(self, latent_indices: list[int], boxes: list, plain: torch.Tensor, noise: torch.Tensor,
                 width: int, height: int, share: float):
        from .layout import centring_shift
        from .regional import box_mask

        latent_h, latent_w = noise.shape[-2:]
        self.latent_indices = latent_indices
        self.masks = [box_mask(box, width, height, latent_w, latent_h).float()[None, None].to(noise.device) for box in boxes]
        self.shifts = [centring_shift(box, width, height, latent_h, latent_w) for box in boxes]
        self.plain = plain  # [S, 1, C, h, w]
        self.noise = noise
        self.share = share

    def steps(self, total: int) -> int:
        return 0 if self.share <= 0 else max(1, round(self.share * total))

    def inputs(self, scheduler, t, all_latents: torch.Tensor) -> torch.Tensor:
        from .layout import bootstrap_latent

        out = all_latents.clone()
        for k, (index, mask, shift) in enumerate(zip(self.latent_indices, self.masks, self.shifts)):
            noised = scheduler.add_noise(self.plain[k], self.noise, t.reshape(1))
            out[index] = torch.roll(bootstrap_latent(all_latents[index : index + 1], mask, noised), shift, dims=(2, 3))[0]
        return out

    def unshift(self, eps: torch.Tensor) -> torch.Tensor:
        out = eps.clone()
        for index, shift in zip(self.latent_indices, self.shifts):
            out[index] = torch.roll(eps[index], (-shift[0], -shift[1]), dims=(1, 2))
        return out


def denoise_branches(base: BaseModel, all_latents: torch.Tensor, context: torch.Tensor, rows_adapter: list[str],
                     groups: list[int], masks: torch.Tensor | None, config: IsolateConfig, lay_index: int,
                     bootstrap: AddedBootstrap | None, callback, check_cancel) -> torch.Tensor:
    """Steps lay_index.. of the schedule for the shared latent and every branch, one UNet call per step."""
    unet = unet_forward(base)
    install_layerwise_attention(base.unet)
    scheduler = make_scheduler("dpm++", base.scheduler_config)
    scheduler.set_timesteps(config.steps, device=base.device)
    scheduler.set_begin_index(lay_index)  # continue the schedule where the layout latent was kept
    remaining = scheduler.timesteps[lay_index:]
    bootstrap_steps = bootstrap.steps(len(remaining)) if bootstrap is not None else 0
    repeats = torch.tensor(groups, device=base.device)
    with torch.no_grad(), mixed_adapters(base.unet, rows_adapter):
        for i, t in enumerate(remaining):
            check_cancel()
            inputs = bootstrap.inputs(scheduler, t, all_latents) if i < bootstrap_steps else all_latents
            model_input = scheduler.scale_model_input(inputs, t).repeat_interleave(repeats, dim=0)
            eps_rows = unet(model_input.to(base.dtype), t, encoder_hidden_states=context).sample.float()
            eps_latents, start = [], 0
            for size in groups:
                block = eps_rows[start : start + size]  # [uncond, base, attachments...]
                eps_latents.append(combine_attachments(block[:1], block[1:2], [block[j : j + 1] for j in range(2, size)], config.guidance))
                start += size
            eps = torch.cat(eps_latents)  # [1 + S, C, h, w]
            if i < bootstrap_steps:
                eps = bootstrap.unshift(eps)
            if masks is not None:
                eps = torch.cat([fuse_predictions(eps[:1], eps[1:], masks), eps[1:]])
            all_latents = scheduler.step(eps, t, all_latents).prev_sample
            if callback is not None:
                callback("isolate", i + 1, len(remaining))
    return all_latents


def screen_stages(base: BaseModel, result: IsolatedResult) -> IsolatedResult:
    """The layout and the final image through the safety checker, when on (`pipelines.safety`): a
    flagged one turns black (so do the stage images drawn on it) and the message says which."""
    from .safety import screen

    images = [result.layout] if result.final is result.layout else [result.layout, result.final]
    screened, blocked = screen(base, images)
    if not blocked:
        return result
    names = ["layout", "final image"] if len(images) == 2 else ["image"]
    result.layout, result.final = screened[0], screened[-1]
    result.blocked = [names[i] for i in blocked]
    note = f"the safety checker blocked the {' and the '.join(result.blocked)} (black)"
    result.message = f"{result.message}; {note}" if result.message else note
    result.metadata = {**result.metadata, "message": result.message, "blocked": result.blocked}
    return result


def describe_boxes(result) -> list[str]:
    """What became of each box of an isolate run with boxes (`result.assignments`), one line per box,
    and a line on re-sampled layouts; nothing without boxes. The studio shows the same lines."""
    from .layout import boxes_spanned

    lines = []
    for a in result.assignments:
        head = f"Box {a.index + 1} ({a.subject})"
        if a.status == "matched":
            line = f"{head}: matched, IoU {a.iou:.2f}"
        elif a.status == "split":
            spanned = boxes_spanned(result.found[a.detection].mask, [b.box for b in result.assignments])
            line = (f"{head}: split: its detection covered boxes {', '.join(str(i + 1) for i in spanned)}, so it was cut"
                    f" along the boxes and this box took its part (IoU {a.iou:.2f})")
        else:
            line = f"{head}: added: no detection in it, drawn fresh"
        if a.subject not in result.masks:
            line += " (but other subjects' masks cover the whole box: left as sampled)"
        lines.append(line)
    if result.assignments and result.attempts > 1:
        retries = result.attempts - 1
        lines.append(f"layout re-sampled {retries} time{'s' if retries > 1 else ''} (earlier layouts merged or missed boxes)")
    return lines


def draw_assignments(image: Image.Image, result: IsolatedResult) -> Image.Image:
    """Boxes mode: each box in its colour with "1 dog: matched / split / added", and the mask each
    subject was isolated with tinted in its box's colour; unused detections are outlined in grey."""
    from PIL import ImageDraw

    from .detect import PALETTE

    canvas = image.convert("RGB").copy()
    overlay = np.asarray(canvas).astype(np.float32)
    colour_of = {a.subject: np.array(PALETTE[a.index % len(PALETTE)], dtype=np.float32) for a in result.assignments}
    for key, mask in result.masks.items():
        if key in colour_of and mask.shape == overlay.shape[:2]:
            overlay[mask] = 0.55 * overlay[mask] + 0.45 * colour_of[key]
    canvas = Image.fromarray(overlay.round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    line = max(1, image.width // 200)
    used = {a.detection for a in result.assignments}
    for j, detection in enumerate(result.found):
        if j not in used:
            draw.rectangle(detection.box, outline=(128, 128, 128), width=line)
    for a in result.assignments:
        colour = PALETTE[a.index % len(PALETTE)]
        draw.rectangle(a.box, outline=colour, width=line)
        draw.text((a.box[0] + 2, a.box[1] + 1), f"{a.index + 1} {a.subject}: {a.status}", fill=colour)
    return canvas


def save_stages(result: IsolatedResult, folder: str | os.PathLike) -> list[Path]:
    """layout.png, detections.png (masks and boxes drawn; with boxes, what became of each box),
    mask_<label>.png and final.png."""
    from .detect import draw_detections
    from .sample import save_png

    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    written = [save_png(result.layout, folder / "layout.png", {**result.metadata, "stage": "layout"})]
    drawn = (draw_assignments(result.layout, result) if result.assignments
             else draw_detections(result.layout, [d for d in result.detections if d is not None]))
    written.append(save_png(drawn, folder / "detections.png", {**result.metadata, "stage": "detections"}))
    for label, mask in result.masks.items():
        path = folder / f"mask_{label}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
        written.append(path)
    written.append(save_png(result.final, folder / "final.png", {**result.metadata, "stage": "final"}))
    return written
