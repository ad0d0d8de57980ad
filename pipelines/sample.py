"""Text-to-image sampling with layer-wise prompts and ED-LoRA concepts.

One visible loop: classifier-free guidance (Ho & Salimans 2022) with DPM-Solver++ (Lu et al. 2022,
2M multistep, diffusers' DPMSolverMultistepScheduler) by default. Prompts name concepts as
`<mochi>`; a prompt without concepts samples the base model. The PNG carries its settings.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .base import TEST_MODEL_NOTE, BaseModel
from .errors import Cancelled, UserError
from .layerwise import concepts_in, encode_layerwise, install_layerwise_attention

SCHEDULERS = ("dpm++", "ddim", "euler")


@dataclass(frozen=True)
class SampleConfig:
    """Settings of one generation; saved into every image it makes."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 30  # denoising steps; DPM-Solver++ is good from about 20
    guidance: float = 7.5  # classifier-free guidance scale; 1.0 turns guidance off
    seed: int = 0
    width: int | None = None  # pixels, a multiple of 8; None: the base model's native size
    height: int | None = None
    num_images: int = 1
    scheduler: str = "dpm++"  # one of SCHEDULERS
    lora_scale: float = 0.7  # strength of a single concept's LoRA (Mix-of-Show suggests 0.7)


@dataclass
class SampleResult:
    images: list[Image.Image]
    metadata: dict = field(default_factory=dict)  # what was made and how; also in each PNG


def make_scheduler(name: str, scheduler_config: dict):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "ddim":
        return DDIMScheduler.from_config(scheduler_config)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(scheduler_config)
    raise UserError(f"--scheduler {name!r} is not known; use one of {', '.join(SCHEDULERS)}")


def check_size(width: int, height: int, multiple: int = 8) -> None:
    for label, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value <= 0 or value % multiple:
            raise UserError(f"--{label} {value} must be a positive multiple of {multiple}")


def check_sample_config(config: SampleConfig, base: BaseModel) -> tuple[int, int]:
    """Validate before any GPU work; returns (width, height)."""
    width = config.width or base.native_resolution
    height = config.height or base.native_resolution
    check_size(width, height, base.vae_scale_factor)
    if config.steps < 1 or config.steps > 1000:
        raise UserError(f"--steps {config.steps} must be between 1 and 1000")
    if config.num_images < 1 or config.num_images > 64:
        raise UserError(f"--num-images {config.num_images} must be between 1 and 64")
    if config.guidance < 0:
        raise UserError(f"--guidance {config.guidance} must be 0 or more")
    if not config.prompt.strip():
        raise UserError("the prompt is empty; describe the picture, e.g. 'a photo of <mochi> on a beach'")
    if config.scheduler not in SCHEDULERS:
        raise UserError(f"--scheduler {config.scheduler!r} is not known; use one of {', '.join(SCHEDULERS)}")
    return width, height


def initial_latents(base: BaseModel, num_images: int, width: int, height: int, seed: int) -> torch.Tensor:
    """Gaussian latents drawn on the CPU from `seed`, so a seed gives the same image on any device."""
    generator = torch.Generator("cpu").manual_seed(seed)
    channels = base.unet.config.in_channels
    shape = (num_images, channels, height // base.vae_scale_factor, width // base.vae_scale_factor)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(base.device)


@torch.no_grad()
def decode_latents(base: BaseModel, latents: torch.Tensor) -> list[Image.Image]:
    latents = latents / base.vae.config.scaling_factor
    pixels = base.vae.decode(latents.to(base.dtype)).sample.float()
    pixels = (pixels / 2 + 0.5).clamp(0, 1)
    array = (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in array]


@torch.no_grad()
def denoise(
    base: BaseModel,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    steps: int,
    guidance: float,
    scheduler_name: str = "dpm++",
    callback: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> torch.Tensor:
    """The sampling loop: CFG on layer-wise encodings `cond`/`uncond` ([B, 16*77, d])."""
    scheduler = make_scheduler(scheduler_name, base.scheduler_config)
    scheduler.set_timesteps(steps, device=base.device)
    latents = latents * scheduler.init_noise_sigma
    context = torch.cat([uncond, cond]).to(base.dtype)
    for i, t in enumerate(scheduler.timesteps):
        if cancel is not None and cancel.is_set():
            raise Cancelled("sampling cancelled")
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        noise = base.unet(model_input.to(base.dtype), t, encoder_hidden_states=context).sample.float()
        noise_uncond, noise_cond = noise.chunk(2)
        noise = noise_uncond + guidance * (noise_cond - noise_uncond)
        latents = scheduler.step(noise, t, latents).prev_sample
        if callback is not None:
            callback(i + 1, steps)
    return latents


def sample_loaded(
    base: BaseModel,
    config: SampleConfig,
    callback: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> list[Image.Image]:
    """Sample with whatever concepts are already loaded into `base` (used for training previews)."""
    width, height = check_sample_config(config, base)
    install_layerwise_attention(base.unet)
    with torch.no_grad():
        cond = encode_layerwise(base.tokenizer, base.text_encoder, [config.prompt] * config.num_images)
        uncond = encode_layerwise(base.tokenizer, base.text_encoder, [config.negative_prompt] * config.num_images)
    latents = initial_latents(base, config.num_images, width, height, config.seed)
    latents = denoise(base, latents, cond, uncond, config.steps, config.guidance, config.scheduler, callback, cancel)
    return decode_latents(base, latents)


def generate(
    base: BaseModel,
    library,
    config: SampleConfig,
    callback: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> SampleResult:
    """Generate images for a prompt that may name one concept of `library` as `<name>`.

    Raises:
        UserError: bad sizes or steps, an unknown concept, a concept from another architecture, or
            several concepts (those need a fused model).
    """
    from .concept import check_compatible
    from .edlora import apply_concept, set_active_adapters

    # 1. Check inputs
    check_sample_config(config, base)
    names = concepts_in(config.prompt) + [n for n in concepts_in(config.negative_prompt) if n not in concepts_in(config.prompt)]
    records = [library.get(name) for name in names]  # unknown names raise here, before any GPU work
    for record in records:
        check_compatible(record, base)
    if len(records) > 1:
        raise UserError(
            f"the prompt names {len(records)} concepts ({', '.join(r.token for r in records)}); one plain prompt can"
            f" use one concept. Several concepts need a fused model"
        )

    # 2. Load the concept (if any) and make it the only active one
    for record in records:
        apply_concept(base, record.name, library.weights(record.name), lora_scale=config.lora_scale)
    for model in (base.text_encoder, base.unet):
        set_active_adapters(model, names)

    # 3. Sample
    started = time.perf_counter()
    images = sample_loaded(base, config, callback, cancel)
    metadata = {
        "app": "menagerie",
        "method": "single-concept" if names else "base",
        **asdict(config),
        "width": config.width or base.native_resolution,
        "height": config.height or base.native_resolution,
        "concepts": names,
        "base_model": base.name,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if base.is_test_model:
        metadata["note"] = TEST_MODEL_NOTE
    return SampleResult(images=images, metadata=metadata)


def save_png(image: Image.Image, path: str | os.PathLike, metadata: dict) -> Path:
    """Write a PNG with `metadata` as JSON in its 'menagerie' text chunk (atomically)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("menagerie", json.dumps(metadata, sort_keys=True))
    info.add_text("parameters", f"{metadata.get('prompt', '')}\nNegative prompt: {metadata.get('negative_prompt', '')}\n"
                  f"Steps: {metadata.get('steps')}, Sampler: {metadata.get('scheduler')}, CFG scale: {metadata.get('guidance')},"
                  f" Seed: {metadata.get('seed')}, Size: {metadata.get('width')}x{metadata.get('height')}")
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return path


def read_png_metadata(path: str | os.PathLike) -> dict:
    """The settings a Menagerie PNG carries ({} for other images)."""
    with Image.open(path) as image:
        text = image.info.get("menagerie")
    return json.loads(text) if text else {}
