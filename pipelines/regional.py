"""Regionally controllable sampling (Mix-of-Show, Gu et al. 2023, section 3.4).

A global prompt and negative prompt plus regions, each a box in pixels (x0, y0, x1, y1), a prompt
and a negative prompt. In every cross-attention layer at every step, pixels inside a box take the
attention output computed against their region's layer-wise prompt (averaged where boxes
overlap); other pixels keep the global prompt's. In the unconditional half of classifier-free
guidance a region uses its own negative prompt. Self-attention is untouched unless a layout
control (`pipelines.layout`) bounds it between the boxes.

All regions attend in one batched call per layer (queries repeated once per region, region
contexts stacked along the batch); the global prompt attends in its own call with exactly the
shapes of plain sampling, so adding a full-canvas region with the global prompt changes no pixel.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import UserError
from .layerwise import concepts_in, cross_attention_layers, install_layerwise_attention, select_layer


@dataclass(frozen=True)
class Region:
    """A box in image pixels, x0 < x1 <= width, y0 < y1 <= height, with its own prompts."""

    box: tuple[int, int, int, int]  # (x0, y0, x1, y1)
    prompt: str
    negative_prompt: str = ""


# ---------------------------------------------------------------------------------------------
# Pure functions: parsing, checking and rasterising boxes, mixing attention outputs


def parse_region(text: str) -> Region:
    """'x0,y0,x1,y1|prompt|negative' (negative optional) -> Region."""
    parts = text.split("|")
    if len(parts) not in (2, 3):
        raise UserError(f"--region {text!r} must look like 'x0,y0,x1,y1|prompt|negative prompt'")
    try:
        box = tuple(int(round(float(v))) for v in parts[0].split(","))
    except (ValueError, OverflowError):
        raise UserError(f"--region {text!r}: the box must be four numbers x0,y0,x1,y1 in pixels") from None
    if len(box) != 4:
        raise UserError(f"--region {text!r}: the box must be four numbers x0,y0,x1,y1 in pixels")
    return Region(box=box, prompt=parts[1].strip(), negative_prompt=parts[2].strip() if len(parts) == 3 else "")


def load_regions(path: str | os.PathLike) -> list[Region]:
    """A JSON list of {"box": [x0, y0, x1, y1], "prompt": ..., "negative_prompt": ...}."""
    try:
        items = json.loads(Path(path).expanduser().read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"--regions {str(path)!r}: cannot read it as JSON ({error})") from None
    if not isinstance(items, list):
        raise UserError(f"--regions {str(path)!r} must hold a JSON list of regions")
    regions = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "box" not in item or "prompt" not in item:
            raise UserError(f"--regions {str(path)!r}: region {i} needs 'box' and 'prompt'")
        if not isinstance(item["box"], (list, tuple)) or len(item["box"]) != 4:
            raise UserError(f"--regions {str(path)!r}: region {i} box must be [x0, y0, x1, y1]")
        try:
            box = tuple(int(round(float(v))) for v in item["box"])
        except (ValueError, TypeError, OverflowError):
            raise UserError(f"--regions {str(path)!r}: region {i} box must be four numbers [x0, y0, x1, y1]") from None
        regions.append(Region(box, str(item["prompt"]), str(item.get("negative_prompt", ""))))
    return regions


def check_regions(regions: list[Region], width: int, height: int) -> None:
    for i, region in enumerate(regions):
        x0, y0, x1, y1 = region.box
        if x1 <= x0 or y1 <= y0:
            raise UserError(f"region {i} box {region.box} has zero area; x1 must exceed x0 and y1 exceed y0")
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise UserError(f"region {i} box {region.box} is off the {width}x{height} canvas; keep 0 <= x <= {width}, 0 <= y <= {height}")
        if not region.prompt.strip():
            raise UserError(f"region {i} has an empty prompt")


def box_mask(box: tuple[int, int, int, int], width: int, height: int, grid_w: int, grid_h: int) -> torch.Tensor:
    """Rasterise a pixel box onto a `grid_h x grid_w` grid covering the image: `[grid_h, grid_w]` bool.

    A cell is inside when its centre lies in the box [x0, x1) x [y0, y1). A box too small to contain
    any centre takes the one cell holding its own centre, so no region ever vanishes at coarse layers.
    """
    x0, y0, x1, y1 = box
    cx = (torch.arange(grid_w, dtype=torch.float64) + 0.5) * width / grid_w
    cy = (torch.arange(grid_h, dtype=torch.float64) + 0.5) * height / grid_h
    inside_x = (cx >= x0) & (cx < x1)
    inside_y = (cy >= y0) & (cy < y1)
    mask = inside_y[:, None] & inside_x[None, :]
    if not mask.any():
        col = min(grid_w - 1, int((x0 + x1) / 2 * grid_w / width))
        row = min(grid_h - 1, int((y0 + y1) / 2 * grid_h / height))
        mask[row, col] = True
    return mask


def unet_grids(latent_h: int, latent_w: int, levels: int = 4) -> list[tuple[int, int]]:
    """Token grids of the UNet's resolution levels: each stride-2 conv (padding 1) maps n to ceil(n/2)."""
    grids = [(latent_h, latent_w)]
    for _ in range(levels - 1):
        h, w = grids[-1]
        grids.append((math.ceil(h / 2), math.ceil(w / 2)))
    return grids


def region_masks(regions: list[Region], width: int, height: int, latent_h: int, latent_w: int) -> dict[int, torch.Tensor]:
    """Token count of each UNet level -> `[R, tokens]` float masks of the regions at that level."""
    masks = {}
    for grid_h, grid_w in unet_grids(latent_h, latent_w):
        stacked = torch.stack([box_mask(r.box, width, height, grid_w, grid_h).flatten() for r in regions]).float()
        masks[grid_h * grid_w] = stacked
    return masks


def mix_region_outputs(global_out: torch.Tensor, region_out: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Inside boxes the mean of the covering regions' outputs, elsewhere the global output.

    global_out: [B, N, C]; region_out: [R, B, N, C]; masks: [R, N] of 0/1.
    """
    cover = masks.sum(0)  # [N]
    summed = torch.einsum("rn,rbnc->bnc", masks.to(region_out.dtype), region_out)
    mixed = summed / cover.clamp(min=1).to(region_out.dtype)[None, :, None]
    return torch.where((cover > 0)[None, :, None], mixed, global_out)


# ---------------------------------------------------------------------------------------------
# The attention processor


class RegionalAttnProcessor:
    """Cross-attention for layer l with regions; without regions it is LayerwiseAttnProcessor.

    Call-time inputs through `cross_attention_kwargs`:
        region_context: `[R, B, 16 * 77, d]` layer-wise encodings of each region's prompts, batch
            aligned with `encoder_hidden_states` (negative prompt rows where the batch is unconditional);
        region_masks: {tokens: [R, tokens]} from `region_masks`;
        region_kv: optional {layer: (global K, global V, region K, region V)} from
            `precompute_region_kv`. The contexts do not change between steps, so sampling projects
            them once per image instead of in every step (same numbers, fewer kernels).
    """

    def __init__(self, layer: int):
        from .layerwise import LayerwiseAttnProcessor

        self.layer = layer
        self.plain = LayerwiseAttnProcessor(layer)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 region_context=None, region_masks=None, region_kv=None, self_attention_bias=None):
        if region_context is None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        batch, tokens, _ = hidden_states.shape
        regions = region_context.shape[0]
        if region_kv is not None:
            global_key, global_value, region_key, region_value = region_kv[self.layer]
        else:
            global_key, global_value, region_key, region_value = project_contexts(
                attn, select_layer(encoder_hidden_states, self.layer), select_layer(region_context.flatten(0, 1), self.layer))
        query = attn.to_q(hidden_states)  # [B, N, C]
        global_out = _attend(attn, query, global_key, global_value)  # [B, N, C]
        region_out = _attend(attn, query.repeat(regions, 1, 1), region_key, region_value)  # all regions in one call
        out = mix_region_outputs(global_out, region_out.view(regions, batch, tokens, -1), region_masks[tokens].to(query.device))
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def project_contexts(attn, global_context: torch.Tensor, region_context: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """K and V of the global `[B, 77, d]` and region `[R*B, 77, d]` contexts through one layer."""
    return attn.to_k(global_context), attn.to_v(global_context), attn.to_k(region_context), attn.to_v(region_context)


@torch.no_grad()
def precompute_region_kv(unet: torch.nn.Module, encoder_hidden_states: torch.Tensor, region_context: torch.Tensor) -> dict:
    """{layer: (global K, global V, region K, region V)} for every cross-attention layer."""
    out = {}
    for layer, (_, attn) in enumerate(cross_attention_layers(unet)):
        out[layer] = project_contexts(attn, select_layer(encoder_hidden_states, layer),
                                      select_layer(region_context.flatten(0, 1), layer))
    return out


def _attend(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Multi-head SDPA of `query` [n, N, C] against projected `key`/`value` [n, L, C], as AttnProcessor2_0.

    The global prompt goes through this with the same shapes as without regions, so a region
    covering the canvas with the global prompt reproduces plain sampling bit for bit.
    """
    batch = query.shape[0]
    head_dim = key.shape[-1] // attn.heads

    def split(x: torch.Tensor) -> torch.Tensor:  # [n, L, C] -> [n, heads, L, head_dim]
        return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(query), split(key), split(value))
    return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)


def install_regional_attention(unet: torch.nn.Module) -> None:
    """RegionalAttnProcessor(l) on cross-attention layer l; on every attn1 the bounded self-attention
    processor, which is plain SDPA unless a step passes `self_attention_bias` (pipelines.layout)."""
    from .layout import install_bounded_self_attention

    install_bounded_self_attention(unet)
    for layer, (_, module) in enumerate(cross_attention_layers(unet)):
        module.set_processor(RegionalAttnProcessor(layer))


# ---------------------------------------------------------------------------------------------
# Sampling with regions


def regional_context(base, regions: list[Region], num_images: int) -> torch.Tensor:
    """`[R, 2 * num_images, 16 * 77, d]`: each region's [negative x n, prompt x n] encodings (CFG order)."""
    from .layerwise import encode_layerwise

    out = []
    for region in regions:
        prompts = [region.negative_prompt] * num_images + [region.prompt] * num_images
        out.append(encode_layerwise(base.tokenizer, base.text_encoder, prompts))
    return torch.stack(out)


def region_concepts(regions: list[Region]) -> list[str]:
    names: list[str] = []
    for region in regions:
        for name in concepts_in(region.prompt) + concepts_in(region.negative_prompt):
            if name not in names:
                names.append(name)
    return names


def regions_metadata(regions: list[Region]) -> list[dict]:
    return [{**asdict(r), "box": list(r.box)} for r in regions]
