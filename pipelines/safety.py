"""The safety checker: Stable Diffusion's NSFW image filter, on for public Spaces.

It is the standard one shipped with SD1.x (diffusers' `StableDiffusionSafetyChecker`: a CLIP
ViT-L/14 image embedding compared with 17 concept and 3 special-care embeddings, each with its own
threshold; Rando et al. 2022, "Red-Teaming the Stable Diffusion Safety Filter", describe it),
with `CLIPImageProcessor` in front. It comes from the base repository's `safety_checker/` and
`feature_extractor/` folders where it has them, else from `CompVis/stable-diffusion-safety-checker`.

It is off for local use and on when running on Hugging Face Spaces (`SPACE_ID` is set); the CLI's
and the app's `--safety-checker on|off` override that. Switched on, it must load: when it cannot
(offline and not cached), that is an error, never a silent run without it. Every image that
`sample.generate` and `isolated.isolate` return passes through `screen`: flagged images become
black and the result names them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .base import TINY, BaseModel, _is_hub_id, tiny_model_dir
from .errors import UserError

logger = logging.getLogger(__name__)

SAFETY_CHECKER_REPO = "CompVis/stable-diffusion-safety-checker"  # the checker SD1.x pipelines ship with
SAFETY_FLAG = ("on", "off")  # choices of --safety-checker; not given: on when on Spaces


@dataclass
class SafetyChecker:
    """A loaded checker on one device."""

    model: torch.nn.Module  # diffusers StableDiffusionSafetyChecker
    processor: object  # transformers CLIPImageProcessor
    source: str  # where it came from: a folder, or a Hub id (with subfolder)
    device: torch.device
    dtype: torch.dtype  # half precision on GPUs, float32 on the CPU


def on_spaces() -> bool:
    """True when running as a Hugging Face Space (the platform sets SPACE_ID)."""
    return bool(os.environ.get("SPACE_ID"))


def safety_enabled(flag: str | None) -> bool:
    """--safety-checker "on"/"off", or None: on when running on Hugging Face Spaces, off elsewhere."""
    if flag is None:
        return on_spaces()
    if flag not in SAFETY_FLAG:
        raise UserError(f"--safety-checker {flag!r} is not known; use on or off")
    return flag == "on"


def checker_sources(base_name: str) -> list[tuple[str, str]]:
    """Where to look for the checker of base `base_name`, in order: (Hub id or folder, subfolder) pairs.

    The base's own `safety_checker/` + `feature_extractor/` come first where it has them (a folder
    holding both, or a Hub repository whose model_index.json lists a safety checker); then the
    standard CompVis checker. Single checkpoint files carry none.
    """
    sources = []
    folder = tiny_model_dir() if base_name == TINY else Path(os.path.expanduser(base_name))
    if folder.is_dir():
        if (folder / "safety_checker" / "config.json").exists() and (folder / "feature_extractor" / "preprocessor_config.json").exists():
            sources.append((str(folder), "safety_checker"))
    elif _is_hub_id(base_name) and _hub_base_has_checker(base_name):
        sources.append((base_name, "safety_checker"))
    sources.append((SAFETY_CHECKER_REPO, ""))
    return sources


def _offline() -> bool:
    from .hub import offline

    return offline()


def _hub_base_has_checker(repo: str) -> bool:
    """Whether the Hub model's model_index.json names a safety checker (read from the cache offline)."""
    from huggingface_hub import hf_hub_download

    try:
        index = json.loads(Path(hf_hub_download(repo, "model_index.json", local_files_only=_offline())).read_text())
    except (OSError, ValueError) as error:  # not cached offline, unreachable, or not a diffusers repository
        logger.debug("no model_index.json for %s: %s", repo, error)
        return False
    return (index.get("safety_checker") or [None])[0] is not None


_LOADED: dict[tuple[str, str, str], SafetyChecker] = {}  # (source, subfolder, device) -> checker: each loads once


def load_safety_checker(base_name: str, device: torch.device) -> SafetyChecker:
    """The checker for base `base_name` on `device` (half precision on GPUs), loaded on first use.

    Raises:
        UserError: no source can be loaded (offline and not cached, or the Hub unreachable).
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    dtype = torch.float16 if device.type in ("cuda", "mps") else torch.float32
    tried = []
    for source, subfolder in checker_sources(base_name):
        key = (source, subfolder, str(device))
        if key in _LOADED:
            return _LOADED[key]
        local_only = _offline() or Path(source).is_dir()
        extractor = "feature_extractor" if subfolder else ""  # the image processor sits beside the checker
        try:
            model = StableDiffusionSafetyChecker.from_pretrained(source, subfolder=subfolder, local_files_only=local_only)
            processor = CLIPImageProcessor.from_pretrained(source, subfolder=extractor, local_files_only=local_only)
        except (OSError, ValueError) as error:
            logger.debug("safety checker from %s/%s failed: %s", source, subfolder, error)
            tried.append(f"{source}/{subfolder}".rstrip("/"))
            continue
        model.requires_grad_(False)
        model.eval()
        model.to(device=device, dtype=dtype)
        _LOADED[key] = SafetyChecker(model, processor, f"{source}/{subfolder}".rstrip("/"), device, dtype)
        return _LOADED[key]
    why = "it is on by default on Hugging Face Spaces" if on_spaces() else "--safety-checker on"
    raise UserError(
        f"the safety checker cannot be loaded ({why}): {' or '.join(tried)} is not in the local Hugging Face cache and"
        f" cannot be downloaded here (offline or the Hub is unreachable). Download it once with network access"
        f" (`hf download {SAFETY_CHECKER_REPO}`), or run with --safety-checker off"
    )


def configure_safety(base: BaseModel, enabled: bool) -> None:
    """Turn the checker on (loading it) or off for everything sampled from `base`."""
    base.safety_checker = load_safety_checker(base.name, base.device) if enabled else None


@torch.no_grad()
def screen(base: BaseModel, images: list[Image.Image]) -> tuple[list[Image.Image], list[int]]:
    """Run `base`'s safety checker over `images`; flagged ones come back black.

    Returns the images (the same objects where nothing is flagged, so output is unchanged) and the
    positions of those blocked. Without a checker (off), everything passes unchanged.
    """
    checker = base.safety_checker
    if checker is None or not images:
        return list(images), []
    pixels = checker.processor(images=[image.convert("RGB") for image in images], return_tensors="pt").pixel_values
    arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255 for image in images])  # [N, H, W, 3]
    _, flagged = checker.model(clip_input=pixels.to(checker.device, checker.dtype), images=arrays)
    blocked = [i for i, flag in enumerate(flagged) if flag]
    return [Image.new("RGB", image.size) if i in blocked else image for i, image in enumerate(images)], blocked


def blocked_note(blocked: list[int], total: int, what: str = "image") -> str:
    """One line saying which images the safety checker blocked; "" when none was."""
    if not blocked:
        return ""
    if total == 1:
        return f"the safety checker blocked the {what} (it is black)"
    names = ", ".join(str(i + 1) for i in blocked)
    return f"the safety checker blocked {what} {names} of {total} (black)"
