"""Planted faults, to show that the toy-world quality tests catch a broken method.

A pytest plugin; choose the fault with MENAGERIE_FAULT:

    MENAGERIE_FAULT=same-layer     python -m pytest -p bench.toyworld.faults tests/test_toyworld.py
    MENAGERIE_FAULT=average-fusion python -m pytest -p bench.toyworld.faults tests/test_toyworld.py
    MENAGERIE_FAULT=no-regions     python -m pytest -p bench.toyworld.faults tests/test_toyworld.py

- same-layer: every cross-attention layer is fed layer 0's copy of the layer-wise embedding
  (ED-LoRA's 16 per-layer tokens collapse into one).
- average-fusion: the gradient-fusion solve is replaced by weight averaging.
- no-regions: regional attention ignores the boxes (every region covers the whole canvas).
- no-layout: layout control is off (no bounded self-attention, bootstrapping or guidance in
  regional sampling; isolated sampling ignores its boxes and assigns detections by label).
- class-word-matching: isolated sampling with boxes gives each box the first detection of its
  class word instead of matching detections to boxes by position.
- no-multi-subject: ED-LoRA training never makes multi-subject views (Seg-Mix composites).
- no-cross-attention: isolated sampling's layout with boxes runs without bounded cross-attention
  (every pixel reads every subject's word), whatever `layout_cross_attention` says.

`planted(name)` plants one for a block of code (bench/toyworld/evaluate.py measures them).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from pipelines import fusion, isolated, layerwise, layout, regional, train

FAULTS = ("same-layer", "average-fusion", "no-regions", "no-layout", "class-word-matching", "no-multi-subject",
          "no-cross-attention")


def _same_layer(encoder_hidden_states: torch.Tensor, layer: int) -> torch.Tensor:
    return _original_select_layer(encoder_hidden_states, 0)


def _average_fusion(w0, deltas, grams, rcond=1e-6, pinv=None):
    return fusion.weight_average(w0, deltas)


def _no_regions(regions, width, height, latent_h, latent_w):
    full = [type(r)((0, 0, width, height), r.prompt, r.negative_prompt) for r in regions]
    return _original_region_masks(full, width, height, latent_h, latent_w)


def _no_layout_steps(self, total):
    return {"self_attention": 0, "bootstrap": 0, "guidance": 0}


def _boxes_ignored(found, config, width, height):
    return isolated.plan_by_label(found, config)


def _class_word_matching(detection_boxes, detection_labels, boxes, box_labels, min_iou=0.3):
    used, out = set(), []
    for label in box_labels:
        first = next((j for j, found in enumerate(detection_labels) if found == label and j not in used), None)
        if first is not None:
            used.add(first)
        out.append(first)
    return out


def _no_multi_subject(config, photo_count):
    from dataclasses import replace

    return _original_check_train_config(replace(config, multi_subject_probability=0.0), photo_count)


_original_select_layer = layerwise.select_layer
_original_region_masks = regional.region_masks
_original_fuse_layer = fusion.fuse_layer
_original_steps = layout.LayoutControl.steps
_original_plan_boxes = isolated.plan_boxes
_original_match = layout.match_detections_to_boxes
_original_check_train_config = train.check_train_config
_original_cross_biases = layout.cross_attention_biases


def plant(name: str) -> None:
    if name == "same-layer":
        layerwise.select_layer = regional.select_layer = _same_layer
    elif name == "average-fusion":
        fusion.fuse_layer = _average_fusion
    elif name == "no-regions":
        regional.region_masks = _no_regions
    elif name == "no-layout":
        layout.LayoutControl.steps = _no_layout_steps
        isolated.plan_boxes = _boxes_ignored
    elif name == "class-word-matching":
        layout.match_detections_to_boxes = _class_word_matching
    elif name == "no-multi-subject":
        train.check_train_config = _no_multi_subject
    elif name == "no-cross-attention":
        layout.cross_attention_biases = lambda *args, **kwargs: None
    else:
        raise ValueError(f"unknown fault {name!r}; one of {', '.join(FAULTS)}")


def remove() -> None:
    layerwise.select_layer = regional.select_layer = _original_select_layer
    fusion.fuse_layer = _original_fuse_layer
    regional.region_masks = _original_region_masks
    layout.LayoutControl.steps = _original_steps
    isolated.plan_boxes = _original_plan_boxes
    layout.match_detections_to_boxes = _original_match
    train.check_train_config = _original_check_train_config
    layout.cross_attention_biases = _original_cross_biases


@contextmanager
def planted(name: str):
    plant(name)
    try:
        yield
    finally:
        remove()


if os.environ.get("MENAGERIE_FAULT"):
    plant(os.environ["MENAGERIE_FAULT"])
