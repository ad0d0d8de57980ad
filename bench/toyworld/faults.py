"""Planted faults, to show that the toy-world quality tests catch a broken method.

A pytest plugin; choose the fault with MENAGERIE_FAULT:

    MENAGERIE_FAULT=same-layer     python -m pytest -p bench.toyworld.faults tests/test_toyworld.py
    MENAGERIE_FAULT=average-fusion python -m pytest -p bench.toyworld.faults tests/test_toyworld.py
    MENAGERIE_FAULT=no-regions     python -m pytest -p bench.toyworld.faults tests/test_toyworld.py

- same-layer: every cross-attention layer is fed layer 0's copy of the layer-wise embedding
  (ED-LoRA's 16 per-layer tokens collapse into one).
- average-fusion: the gradient-fusion solve is replaced by weight averaging.
- no-regions: regional attention ignores the boxes (every region covers the whole canvas).

`planted(name)` plants one for a block of code (bench/toyworld/evaluate.py measures them).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from pipelines import fusion, layerwise, regional

FAULTS = ("same-layer", "average-fusion", "no-regions")


def _same_layer(encoder_hidden_states: torch.Tensor, layer: int) -> torch.Tensor:
    return _original_select_layer(encoder_hidden_states, 0)


def _average_fusion(w0, deltas, grams, rcond=1e-6, pinv=None):
    return fusion.weight_average(w0, deltas)


def _no_regions(regions, width, height, latent_h, latent_w):
    full = [type(r)((0, 0, width, height), r.prompt, r.negative_prompt) for r in regions]
    return _original_region_masks(full, width, height, latent_h, latent_w)


_original_select_layer = layerwise.select_layer
_original_region_masks = regional.region_masks
_original_fuse_layer = fusion.fuse_layer


def plant(name: str) -> None:
    if name == "same-layer":
        layerwise.select_layer = regional.select_layer = _same_layer
    elif name == "average-fusion":
        fusion.fuse_layer = _average_fusion
    elif name == "no-regions":
        regional.region_masks = _no_regions
    else:
        raise ValueError(f"unknown fault {name!r}; one of {', '.join(FAULTS)}")


def remove() -> None:
    layerwise.select_layer = regional.select_layer = _original_select_layer
    fusion.fuse_layer = _original_fuse_layer
    regional.region_masks = _original_region_masks


@contextmanager
def planted(name: str):
    plant(name)
    try:
        yield
    finally:
        remove()


if os.environ.get("MENAGERIE_FAULT"):
    plant(os.environ["MENAGERIE_FAULT"])
