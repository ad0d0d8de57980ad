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
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .base import TEST_MODEL_NOTE, BaseModel
from .errors import Cancelled, UserError
from .layerwise import concepts_in, encode_layerwise, install_layerwise_attention
from .layout import NO_LAYOUT, LayoutControl
from .performance import memory_plan, offloaded, on_device, unet_forward, vae_slicing

SCHEDULERS = ("dpm++", "ddim", "euler")


# Mix-of-Show's negative prompt, used in every one of its sampling scripts (regionally_controlable_sampling.py
# and the inference examples); the toy world passes "" since its text encoder never saw these words.
DEFAULT_NEGATIVE_PROMPT = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped,"
                           " worst quality, low quality")


@dataclass(frozen=True)
class SampleConfig:
    """Settings of one generation; saved into every image it makes."""

    prompt: str
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    steps: int = 30  # denoising steps; DPM-Solver++ is good from about 20
    guidance: float = 7.5  # classifier-free guidance scale; 1.0 turns guidance off
    seed: int = 0
    width: int | None = None  # pixels, a multiple of 8; None: the base model's native size
    height: int | None = None
    num_images: int = 1
    scheduler: str = "dpm++"  # one of SCHEDULERS
    # strength of a single concept's LoRA: 1.0, as fused models and isolated branches apply every LoRA
    # (Mix-of-Show suggests 0.7; the toy world measures 1.0 equal or better, docs/toyworld.md "One LoRA scale")
    lora_scale: float = 1.0


@dataclass
class SampleResult:
    images: list[Image.Image]
    metadata: dict = field(default_factory=dict)  # what was made and how; also in each PNG
    blocked: list[int] = field(default_factory=list)  # positions of images the safety checker turned black


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
    width = base.native_resolution if config.width is None else config.width
    height = base.native_resolution if config.height is None else config.height
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
    cross_attention_kwargs: dict | None = None,
    self_attention_bias: dict | None = None,
    self_attention_steps: int = 0,
    bootstrap=None,
    bootstrap_steps: int = 0,
    guide=None,
    guidance_steps: int = 0,
    latents_callback: Callable[[int, torch.Tensor], None] | None = None,
    cross_attention_bias: dict | None = None,
) -> torch.Tensor:
    """The sampling loop: CFG on layer-wise encodings `cond`/`uncond` ([B, 16*77, d]).

    `cross_attention_kwargs` reach the attention processors (regional sampling passes its regions).
    Layout control (`pipelines.layout`): for the first `self_attention_steps` steps the
    self-attention layers get `self_attention_bias` (and the cross-attention layers
    `cross_attention_bias`, if given); for the first `bootstrap_steps` steps
    `bootstrap.predict` replaces the prediction inside each box with the box's own branch.
    For the first `guidance_steps` steps `guide.update` first moves the latents along Bounded
    Attention's loss. `latents_callback(i, latents)` sees the latents before step i (isolated sampling keeps one).
    The UNet runs compiled when `base.performance.compile` asks for it.
    """
    unet = unet_forward(base)
    scheduler = make_scheduler(scheduler_name, base.scheduler_config)
    scheduler.set_timesteps(steps, device=base.device)
    latents = latents * scheduler.init_noise_sigma
    context = torch.cat([uncond, cond]).to(base.dtype)
    bounded_kwargs = {**(cross_attention_kwargs or {}), "self_attention_bias": self_attention_bias}
    if cross_attention_bias is not None:  # layer-wise processors only (isolated sampling's layout)
        bounded_kwargs["cross_attention_bias"] = cross_attention_bias
    for i, t in enumerate(scheduler.timesteps):
        if cancel is not None and cancel.is_set():
            raise Cancelled("sampling cancelled")
        if i < guidance_steps:
            latents = guide.update(i, scheduler, t, latents, base.dtype)
        if latents_callback is not None:
            latents_callback(i, latents)
        kwargs = bounded_kwargs if i < self_attention_steps and self_attention_bias is not None else cross_attention_kwargs
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        noise = unet(model_input.to(base.dtype), t, encoder_hidden_states=context,
                     cross_attention_kwargs=kwargs).sample.float()
        noise_uncond, noise_cond = noise.chunk(2)
        noise = noise_uncond + guidance * (noise_cond - noise_uncond)
        if i < bootstrap_steps:
            noise = bootstrap.predict(scheduler, t, latents, noise, base.dtype)
        latents = scheduler.step(noise, t, latents).prev_sample
        if callback is not None:
            callback(i + 1, steps)
    return latents


def sample_loaded(
    base: BaseModel,
    config: SampleConfig,
    callback: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
    regions: list | tuple = (),
    layout: LayoutControl = NO_LAYOUT,
) -> list[Image.Image]:
    """Sample with whatever concepts are already loaded into `base` (optionally with regions).

    `layout` (pipelines.layout) keeps the regions' subjects apart; it acts only with regions.
    Low-memory modes (`pipelines.performance`) decode one image at a time and, in "lowest", keep
    the text encoder and VAE on the CPU except while they run.
    """
    width, height = check_sample_config(config, base)
    plan = memory_plan(base, "sample")
    with offloaded(base, plan), vae_slicing(base, plan.vae_slicing):
        return _sample_loaded(base, config, callback, cancel, regions, width, height, plan, layout)


def _sample_loaded(base, config, callback, cancel, regions, width, height, plan, layout=NO_LAYOUT) -> list[Image.Image]:
    """`sample_loaded` once sizes are checked and the memory plan is in place."""
    from .layerwise import concept_words, cross_attention_layers
    from .layout import (BoundedGuidance, BoxBootstrap, check_layout_control, cond_half_kwargs, plain_colour_latents,
                         self_attention_biases, subject_token_masks, subject_word_positions)
    from .regional import check_regions, install_regional_attention, precompute_region_kv, region_masks, regional_context

    check_regions(list(regions), width, height)
    check_layout_control(layout)
    with torch.no_grad(), on_device(base, base.text_encoder, plan):
        cond = encode_layerwise(base.tokenizer, base.text_encoder, [config.prompt] * config.num_images)
        uncond = encode_layerwise(base.tokenizer, base.text_encoder, [config.negative_prompt] * config.num_images)
        kwargs = None
        if regions:
            factor = base.vae_scale_factor
            kwargs = {
                "region_context": regional_context(base, list(regions), config.num_images).to(base.dtype),
                # on the device once, so no layer copies masks from the host at every step
                "region_masks": {tokens: mask.to(base.device, base.dtype) for tokens, mask in
                                 region_masks(list(regions), width, height, height // factor, width // factor).items()},
            }
        if regions:  # the contexts are fixed for the whole loop: project them once
            kwargs["region_kv"] = precompute_region_kv(base.unet, torch.cat([uncond, cond]).to(base.dtype), kwargs["region_context"])
    latents = initial_latents(base, config.num_images, width, height, config.seed)
    # Layout control: bounded self-attention between the boxes and bootstrapped box branches
    layout_steps = layout.steps(config.steps) if regions else {"self_attention": 0, "bootstrap": 0, "guidance": 0}
    boxes = [region.box for region in regions]
    factor = base.vae_scale_factor
    bias = None
    if layout_steps["self_attention"]:
        bias = self_attention_biases(boxes, width, height, height // factor, width // factor, base.device, base.dtype)
    bootstrap = None
    if layout_steps["bootstrap"]:
        with on_device(base, base.vae, plan):
            plain = plain_colour_latents(base.vae, len(boxes), width, height, config.seed, base.dtype).to(base.device)
        bootstrap = BoxBootstrap(unet_forward(base), boxes, kwargs["region_context"], plain, latents, width, height,
                                 layout.centre, config.guidance)
    guide = None
    if layout_steps["guidance"]:
        known = concept_words(base.text_encoder)
        guide_kwargs = cond_half_kwargs(kwargs, config.num_images)
        if bias is not None:
            guide_kwargs["self_attention_bias"] = bias
        guide = BoundedGuidance(
            base.unet, {module: layer for layer, (_, module) in enumerate(cross_attention_layers(base.unet))},
            cond.to(base.dtype), guide_kwargs, [subject_word_positions(base.tokenizer, r.prompt, known) for r in regions],
            {n: m.to(base.device) for n, m in subject_token_masks(boxes, width, height, height // factor, width // factor).items()},
            layout.guidance_iterations, layout_steps["guidance"])
    if regions:
        install_regional_attention(base.unet)
    else:
        install_layerwise_attention(base.unet)
    try:
        latents = denoise(base, latents, cond, uncond, config.steps, config.guidance, config.scheduler, callback, cancel, kwargs,
                          bias, layout_steps["self_attention"], bootstrap, layout_steps["bootstrap"], guide, layout_steps["guidance"])
    finally:
        install_layerwise_attention(base.unet)
    with on_device(base, base.vae, plan):
        return decode_latents(base, latents)


def generate(
    base: BaseModel,
    library,
    config: SampleConfig,
    regions: list | tuple = (),
    fused: str | os.PathLike | None = None,
    callback: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
    layout: LayoutControl = NO_LAYOUT,
) -> SampleResult:
    """Generate images; prompts (global and regional) name concepts of `library` as `<name>`.

    One concept is loaded as its own ED-LoRA. Several concepts need one fused model: `fused` names a
    fused model folder, or else the concepts are fused on the fly with gradient fusion (cached in the
    library). Regions (see `regional.Region`) turn on regionally controllable sampling; `layout`
    (`pipelines.layout.LayoutControl`) keeps the regions' subjects apart. With the safety checker on
    (`pipelines.safety.configure_safety`), images it flags come back black and `result.blocked` names them.

    Raises:
        UserError: bad sizes, steps or boxes, an unknown concept, or a concept from another architecture.
    """
    from .concept import check_compatible
    from .edlora import apply_concept, merged_adapter, set_active_adapters
    from .fusion import fuse_concepts, load_fused
    from .regional import check_regions, region_concepts, regions_metadata
    from .safety import screen

    # 1. Check inputs, before any GPU work
    from .layout import check_layout_control

    width, height = check_sample_config(config, base)
    regions = list(regions)
    check_regions(regions, width, height)
    check_layout_control(layout)
    names: list[str] = []
    for name in concepts_in(config.prompt) + concepts_in(config.negative_prompt) + region_concepts(regions):
        if name not in names:
            names.append(name)

    # 2. Load the concepts: a fused model, one ED-LoRA, or fuse on the fly
    method = "regional" if regions else "plain"
    fused_model = None
    if fused is not None:
        fused_model = load_fused(base, fused)
        missing = [n for n in names if n not in fused_model.concepts]
        if missing:
            raise UserError(f"the fused model {fused} does not hold {', '.join('<' + n + '>' for n in missing)};"
                            f" it holds {', '.join('<' + n + '>' for n in fused_model.concepts)}")
    else:
        records = [library.get(name) for name in names]  # unknown names raise here
        for record in records:
            check_compatible(record, base)
        if len(records) == 1:
            apply_concept(base, records[0].name, library.weights(records[0].name, base), lora_scale=config.lora_scale)
        if len(records) <= 1:  # exactly this concept's adapters, or none: no concept samples the plain base
            for model in (base.text_encoder, base.unet):
                set_active_adapters(model, names)
        if len(records) > 1:
            fused_model = fuse_concepts(base, library, names)

    # 3. Sample (one concept's UNet LoRA folded into the weights for speed; its text LoRA stays active)
    started = time.perf_counter()
    single = names[0] if fused_model is None and len(names) == 1 else None
    # peft's wrappers come out too while the UNet runs eager (a compiled one would recompile for them)
    with merged_adapter(base.unet, single, unwrap=base.performance.compile == "off") if single else nullcontext():
        images = sample_loaded(base, config, callback, cancel, regions, layout)
    images, blocked = screen(base, images)  # the safety checker, when on (pipelines.safety)
    metadata = {
        "app": "menagerie",
        "method": method,
        **asdict(config),
        "width": width,
        "height": height,
        "regions": regions_metadata(regions),
        "layout": layout.to_json() if regions else None,
        "concepts": names,
        "fused": str(fused_model.folder) if fused_model else None,
        "fusion_method": fused_model.method if fused_model else None,
        "fused_note": fused_model.note if fused_model else "",
        "base_model": base.name,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if base.is_test_model:
        metadata["note"] = TEST_MODEL_NOTE
    if blocked:
        metadata["blocked"] = blocked
    return SampleResult(images=images, metadata=metadata, blocked=blocked)


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
