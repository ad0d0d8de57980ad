"""ED-LoRA training of one concept (Mix-of-Show, Gu et al. 2023, section 3.3.1).

Mix-of-Show's `[main]` recipe (shared/research/mix_of_show.md section 1), with the deviations that
docs/architecture.md lists ("Deviations from the reference recipes"):
two new words per concept, V_rand (N(0, 0.013^2), one draw shared by its 16 layers) and V_class
(the class word's embedding), 16 layer-wise embeddings each; LoRA rank 4, scale 1.0, on CLIP
attention q/k/v/out and UNet attn1+attn2 q/k/v/out; AdamW (wd 0.01) with lr 1e-3 embeddings, 1e-5
text-encoder LoRA, 1e-4 UNet LoRA, linear decay to 0 without warm-up; epsilon MSE with noise offset
0.01, per-pixel loss weighted by a mask (the subject mask when given, else the pasted area of the
augmented canvas) and normalised by its sum; embeddings frozen once their mean norm reaches 0.55.
Data: crop-and-paste augmentation (Mix-of-Show's HumanResizeCropFinalV3) and object prompt
templates. Steps default to 500 examples per photo, Mix-of-Show's `dataset_enlarge_ratio`.

Concepts that share the frame (close-ups of one animal otherwise teach "one big animal"): with
subject masks, Mix-of-Show's cross-attention regulariser keeps the two concept words' attention on
the subject; optional two-subject composites (MuDI's Seg-Mix) put the pet beside another animal the
base model drew, and optional prior scenes of two animals, also drawn by the base model, keep
"a dog and a cat" meaning two animals.

Frozen weights stay in the base's dtype (the UNet in half precision on GPUs, the text encoder in
float32); only trainable tensors are fp32. With an fp16 UNet the loss is scaled (a dynamic
gradient scaler, `loss_scaler`): gradients to the embeddings pass the UNet's fp16 backward and
would otherwise underflow to zero.
All randomness comes from `seed` through one Python RNG and one torch generator, both saved in
checkpoints, so a resumed run equals an uninterrupted one.

Speed and memory (`pipelines.performance`): the UNet may run compiled, low-memory modes add
gradient checkpointing and 8-bit AdamW, the next batch is augmented on the CPU while the GPU
works on the current step, and each step reads back one pair of numbers (loss and embedding
norm). Under `accelerate launch` (or torchrun) every process trains on its own random batches
and the trainable tensors' gradients are averaged, which is data parallelism.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from itertools import combinations_with_replacement
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .base import BaseModel
from .concept import Concept, check_class_word, check_name
from .edlora import (
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    add_lora,
    concept_state_dict,
    lora_layers,
    lora_parameters,
    set_active_adapters,
)
from .errors import Cancelled, UserError
from .layerwise import (
    NUM_LAYERS,
    add_concept_tokens,
    concepts_in,
    cross_attention_layers,
    encode_layerwise,
    expand_prompt,
    install_layerwise_attention,
    select_layer,
)
from .performance import (average_gradients, gradient_checkpointing, init_distributed, make_adamw, memory_plan, tf32_matmuls,
                          unet_forward)
from .sample import SampleConfig, sample_loaded

logger = logging.getLogger(__name__)

# Textual Inversion's object templates (Gal et al. 2022), Mix-of-Show's `object` list.
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
EXAMPLES_PER_PHOTO = 500  # Mix-of-Show's dataset_enlarge_ratio
CHECKPOINT_FILE = "checkpoint.pt"
COMPANION_SAMPLE_STEPS = 20  # DPM-Solver++ steps of each companion / prior scene sample
SINGLE_KINDS = ("edlora", "custom-diffusion", "cones")  # kinds train_concept trains
GROUP_KINDS = ("joint", "custom-diffusion")  # kinds train_group trains
KV_TARGETS = r".*attn2\.(to_k|to_v)"  # Custom Diffusion's crossattn_kv: the UNet's cross-attention K and V
BACKGROUND_IMAGES = 8  # base-model pictures of a group's background prompt, drawn at the start
MAX_BASE_SAMPLES = 64  # companion_images and prior_images at most (sample_loaded's num_images limit)
COMPOSITE_SCALE = (0.75, 1.0)  # MuDI Seg-Mix: each subject at U(0.75, 1) x the fit of its half


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one ED-LoRA training run; saved in the concept's record and its checkpoints."""

    name: str  # concept name; prompts use it as <name>
    class_word: str  # one word, e.g. "dog"; V_class starts from its embedding
    steps: int | None = None  # None: 500 examples per photo / batch_size (Mix-of-Show)
    batch_size: int = 2
    resolution: int | None = None  # training image side in pixels; None: the base's native size
    rank: int = 4  # LoRA rank
    lr_embedding: float = 1e-3
    lr_text_lora: float = 1e-5
    lr_unet_lora: float = 1e-4
    weight_decay: float = 0.01
    noise_offset: float = 0.01  # "crucial for stable identity" (Mix-of-Show)
    emb_norm_stop: float = 0.55  # freeze embeddings once their mean L2 norm reaches this
    rand_init_std: float = 0.013  # V_rand initial scale
    crop_probability: float = 0.5  # chance of a random crop before paste (HumanResizeCropFinalV3)
    seed: int = 0
    checkpoint_every: int = 200  # steps between checkpoints (0: none); also written on cancel
    preview_every: int = 0  # steps between preview samples sent to the callback (0: none)
    preview_steps: int = 20  # denoising steps of a preview sample
    # Concepts that share the frame (see the module docstring)
    attn_reg_weight: float = 0.01  # Mix-of-Show's cross-attention regulariser; acts only with subject masks
    multi_subject_probability: float = 0.0  # chance an example is a two-subject composite (MuDI Seg-Mix)
    companions: tuple[str, ...] = ("dog", "cat")  # other animals for composites and prior scenes (+ the class word)
    companion_images: int = 8  # one-animal base-model samples made at the start, for composites
    prior_probability: float = 0.0  # chance an example is a two-animal prior scene (no concept)
    prior_images: int = 8  # two-animal base-model samples made at the start, for prior scenes
    # The kind of concept (pipelines.edlora.KINDS): "edlora", "custom-diffusion" or "cones" for one pet;
    # "joint" (or "custom-diffusion") for a group trained together with `train_group`
    kind: str = "edlora"
    # Custom Diffusion (Kumari et al. 2023): one learning rate for the modifier token and the K/V weights
    # (diffusers' recipe: 1e-5 x batch 2 x 2 GPUs x 2 with prior preservation = 8e-5)
    lr_kv: float = 8e-5
    # chance an example is a base-model picture of the class word with its own caption (DreamBooth /
    # Custom Diffusion prior preservation with generated class images; the paper's real LAION images need a network)
    class_prior_probability: float = 0.0
    class_images: int = 8  # class-word base-model samples made at the start, for class priors
    # Cones (Liu et al. 2023; the settings of the Gothos/Cones port): soft-shrink rate and how many neurons to shut
    cones_shrink: float = 2e-5
    cones_max_neurons: int = 20000  # int32 indices: 80 KB at most


@dataclass
class TrainProgress:
    """What the callback receives after every step."""

    step: int
    total: int
    loss: float
    eta_seconds: float
    embedding_norm: float
    embeddings_frozen: bool
    preview: Image.Image | None = None


@dataclass
class TrainResult:
    concept: Concept
    tensors: dict[str, torch.Tensor]  # what concept.safetensors holds
    preview: Image.Image | None
    losses: list[float] = field(default_factory=list)
    embeddings_frozen_at: int | None = None  # step at which the norm stop fired
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# Photos


def image_extensions() -> set[str]:
    return {ext.lower() for ext in Image.registered_extensions()}


def find_photos(inputs: list[str | os.PathLike], flag: str = "--images",
                hint: str = "; add JPEG/PNG/WebP photos of the subject") -> list[Path]:
    """Expand folders (their image files, sorted) and keep files; an error naming `flag` if nothing is left."""
    photos: list[Path] = []
    extensions = image_extensions()
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            photos += sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions)
        elif path.is_file():
            photos.append(path)
        else:
            raise UserError(f"{flag} {str(item)!r} does not exist")
    if not photos:
        raise UserError(f"no images found in {', '.join(str(i) for i in inputs)}{hint}")
    return photos


def load_photo(path: str | os.PathLike) -> Image.Image:
    """Open any image PIL reads, apply its EXIF orientation, and convert to RGB (alpha onto white)."""
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise UserError(f"cannot read image {str(path)!r}: {error}; remove it or replace it with a JPEG or PNG") from None
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_mask(path: str | os.PathLike) -> Image.Image:
    """A subject mask: white (>127) marks the subject. Any image PIL reads."""
    try:
        with Image.open(path) as opened:
            mask = ImageOps.exif_transpose(opened).convert("L")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UserError(f"cannot read mask {str(path)!r}: {error}") from None
    return mask.point(lambda v: 255 if v > 127 else 0)


def find_masks(mask_dir: str | os.PathLike, photos: list[Path]) -> list[Path]:
    """The mask for each photo: the file in `mask_dir` with the same stem."""
    folder = Path(mask_dir).expanduser()
    if not folder.is_dir():
        raise UserError(f"--masks {str(mask_dir)!r} is not a folder")
    by_stem = {p.stem: p for p in folder.iterdir() if p.is_file()}
    masks = []
    for photo in photos:
        if photo.stem not in by_stem:
            raise UserError(f"no mask for photo {photo.name} in {folder} (expected a file named {photo.stem}.png)")
        masks.append(by_stem[photo.stem])
    return masks


def load_training_set(photo_paths: list[Path], mask_paths: list[Path] | None = None) -> tuple[list[Image.Image], list[Image.Image] | None]:
    photos = [load_photo(p) for p in photo_paths]
    masks = None
    if mask_paths is not None:
        masks = [load_mask(p) for p in mask_paths]
        for photo, mask, path in zip(photos, masks, mask_paths):
            if mask.size != photo.size:
                raise UserError(f"mask {path.name} is {mask.size[0]}x{mask.size[1]}, its photo {photo.size[0]}x{photo.size[1]}")
            if not np.asarray(mask).any():
                raise UserError(f"mask {path.name} is empty (all black); the subject must be white")
    if len(photos) < 3:
        warnings.warn(f"only {len(photos)} photo(s): identity is learned better from 3 or more", stacklevel=2)
    return photos, masks


# ---------------------------------------------------------------------------------------------
# Augmentation and captions


def resize_crop_paste(image: Image.Image, mask: Image.Image | None, size: int, crop_probability: float, rng: random.Random):
    """Mix-of-Show's HumanResizeCropFinalV3 on a photo and its subject mask.

    1. Resize the short side to `size`. 2. With probability `crop_probability` crop: a portrait keeps
    its top part with a random height in [w, h] (keeps the head), a landscape gets a random
    `size`-wide crop. 3. Resize the long side to `size` and paste at a random offset on a black
    `size` x `size` canvas. Returns (canvas, subject mask or None, pasted-area mask), all PIL.
    """
    w, h = image.size
    scale = size / min(w, h)
    w, h = max(1, round(w * scale)), max(1, round(h * scale))
    image = image.resize((w, h), Image.BICUBIC)
    mask = mask.resize((w, h), Image.NEAREST) if mask is not None else None
    if rng.random() < crop_probability:
        if h > w:
            keep = rng.randint(w, h)
            box = (0, 0, w, keep)
        else:
            left = rng.randint(0, w - size)
            box = (left, 0, left + size, h)
        image = image.crop(box)
        mask = mask.crop(box) if mask is not None else None
        w, h = image.size
    scale = size / max(w, h)
    w, h = max(1, round(w * scale)), max(1, round(h * scale))
    image = image.resize((w, h), Image.BICUBIC)
    mask = mask.resize((w, h), Image.NEAREST) if mask is not None else None
    x, y = rng.randint(0, size - w), rng.randint(0, size - h)
    canvas = Image.new("RGB", (size, size))
    canvas.paste(image, (x, y))
    pasted = Image.new("L", (size, size))
    pasted.paste(255, (x, y, x + w, y + h))
    subject = None
    if mask is not None:
        subject = Image.new("L", (size, size))
        subject.paste(mask, (x, y))
    return canvas, subject, pasted


def to_tensors(canvas: Image.Image, loss_mask: Image.Image, latent_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels in [-1, 1] `[3, S, S]` and the loss mask nearest-downsampled to `[1, s, s]`."""
    pixels = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return pixels, downsample_mask(loss_mask, latent_size)


def downsample_mask(mask: Image.Image, latent_size: int) -> torch.Tensor:
    """A 0/1 `[1, s, s]` tensor of a white-on-black mask, nearest-downsampled to the latent size."""
    return torch.from_numpy((np.asarray(mask.resize((latent_size, latent_size), Image.NEAREST)) > 127).astype(np.float32))[None]


def caption(name: str, rng: random.Random) -> str:
    return rng.choice(OBJECT_TEMPLATES).format(f"<{name}>")


def paste_in_half(canvas: Image.Image, tile: Image.Image, cut: Image.Image, left: bool, rng: random.Random) -> Image.Image:
    """Paste `tile`'s pixels under `cut` (white) into the left or right half of `canvas`, in place.

    The tile is scaled to U(0.75, 1) x the largest size that fits the half, aspect kept, and placed
    at a random position inside the half (MuDI Seg-Mix, arXiv 2404.04243). Returns the pasted cut
    as a mask of the whole canvas.
    """
    size = canvas.size[0]
    half_left, half_width = (0, size // 2) if left else (size // 2, size - size // 2)
    w, h = tile.size
    scale = min(half_width / w, size / h) * rng.uniform(*COMPOSITE_SCALE)
    w, h = min(half_width, max(1, round(w * scale))), min(size, max(1, round(h * scale)))
    tile, cut = tile.resize((w, h), Image.BICUBIC), cut.resize((w, h), Image.NEAREST)
    x, y = half_left + rng.randint(0, half_width - w), rng.randint(0, size - h)
    canvas.paste(tile, (x, y), cut)
    pasted = Image.new("L", canvas.size)
    pasted.paste(cut, (x, y))
    return pasted


def make_composite(pet: Image.Image, pet_cut: Image.Image, companion: Image.Image, size: int, rng: random.Random):
    """A two-subject training view, MuDI's Seg-Mix (arXiv 2404.04243) on a black `size` canvas.

    The pet (the pixels of `pet` under its cut mask `pet_cut`, cropped to the cut's bounding box:
    a segmented subject, or the whole photo tile when the cut is its pasted area) goes into a
    random half; the companion (a whole image) goes into the other. Each is scaled to U(0.75, 1) x
    the fit of its half and placed at random inside it. Returns (canvas, the pet's mask on the
    canvas, whether the pet is on the left).
    """
    box = pet_cut.getbbox()
    if box is None:
        raise ValueError("the pet's cut mask is empty")
    pet_on_left = rng.random() < 0.5
    canvas = Image.new("RGB", (size, size))
    pet_area = paste_in_half(canvas, pet.crop(box), pet_cut.crop(box), pet_on_left, rng)
    paste_in_half(canvas, companion, Image.new("L", companion.size, 255), not pet_on_left, rng)
    return canvas, pet_area, pet_on_left


def composite_caption(name: str, companion_word: str, pet_on_left: bool, rng: random.Random) -> str:
    """An object template naming both subjects left to right: "a photo of a <rex> and a cat"."""
    pair = f"<{name}> and a {companion_word}" if pet_on_left else f"{companion_word} and a <{name}>"
    return rng.choice(OBJECT_TEMPLATES).format(pair)


def default_steps(photo_count: int, batch_size: int) -> int:
    """Mix-of-Show's schedule: 500 examples per photo (e.g. 5 photos at batch 2: 1250 steps)."""
    return math.ceil(EXAMPLES_PER_PHOTO * photo_count / batch_size)


# ---------------------------------------------------------------------------------------------
# Companions and prior scenes, drawn by the base model itself


def companion_words(config: TrainConfig) -> tuple[str, ...]:
    """The companions plus the concept's own class word (so same-class pairs are covered), once each."""
    return tuple(dict.fromkeys((*config.companions, config.class_word)))


def companion_prompts(words: tuple[str, ...], count: int) -> list[tuple[str, str]]:
    """`count` (word, prompt) pairs, "a photo of a {word}", cycling through the words."""
    return [(words[i % len(words)], f"a photo of a {words[i % len(words)]}") for i in range(count)]


def prior_scene_prompts(words: tuple[str, ...], count: int) -> list[str]:
    """`count` two-animal prompts "a photo of a {w1} and a {w2}", cycling through every pair of
    words, same-class pairs included ("a photo of a dog and a dog")."""
    pairs = list(combinations_with_replacement(words, 2))
    return [f"a photo of a {pairs[i % len(pairs)][0]} and a {pairs[i % len(pairs)][1]}" for i in range(count)]


def sample_prompts(base: BaseModel, prompts: list[str], resolution: int, seed: int) -> list[Image.Image]:
    """One base-model sample per prompt, in order; equal prompts are sampled as one batch.

    Whatever LoRA adapters are in `base` must be disabled by the caller: these are the base
    model's own pictures.
    """
    images: list[Image.Image | None] = [None] * len(prompts)
    for offset, prompt in enumerate(dict.fromkeys(prompts)):
        places = [i for i, p in enumerate(prompts) if p == prompt]
        sample = SampleConfig(prompt=prompt, steps=COMPANION_SAMPLE_STEPS, seed=seed + offset, width=resolution,
                              height=resolution, num_images=len(places))
        for place, image in zip(places, sample_loaded(base, sample)):
            images[place] = image
    return images


def sample_companions(base: BaseModel, config: TrainConfig, resolution: int, class_words: tuple[str, ...] = ()):
    """The base model's companions (word, image), prior scenes and class pictures (caption, image) for `config`.

    Made once at the start of training, before the concept exists, with every adapter off. Only
    what the config uses is made (composites need companions, prior scenes need scenes, class
    priors "a photo of a <class>" for each of `class_words`, default the config's class word).
    """
    class_words = tuple(dict.fromkeys(class_words or (config.class_word,)))
    words = companion_words(config)
    for model in (base.text_encoder, base.unet):
        set_active_adapters(model, [])  # concepts loaded earlier must not draw the companions
    companions: list[tuple[str, Image.Image]] = []
    prior_scenes: list[tuple[str, Image.Image]] = []
    if config.multi_subject_probability > 0:
        pairs = companion_prompts(words, config.companion_images)
        images = sample_prompts(base, [prompt for _, prompt in pairs], resolution, config.seed)
        companions = [(word, image) for (word, _), image in zip(pairs, images)]
    if config.prior_probability > 0:
        prompts = prior_scene_prompts(words, config.prior_images)
        prior_scenes = list(zip(prompts, sample_prompts(base, prompts, resolution, config.seed)))
    class_priors: list[tuple[str, Image.Image]] = []
    if config.class_prior_probability > 0:
        prompts = [f"a photo of a {word}" for word in class_words] * config.class_images
        prompts = prompts[: max(config.class_images, len(class_words))]
        class_priors = list(zip(prompts, sample_prompts(base, prompts, resolution, config.seed + 7919)))
    logger.info("sampled %d companions, %d prior scenes and %d class pictures with the base model", len(companions),
                len(prior_scenes), len(class_priors))
    return companions, prior_scenes, class_priors


def _images_to_state(pairs: list[tuple[str, Image.Image]]) -> list[tuple[str, torch.Tensor]]:
    """Labelled images as uint8 tensors for a checkpoint (resuming must not resample them)."""
    return [(label, torch.from_numpy(np.array(image, dtype=np.uint8))) for label, image in pairs]


def _images_from_state(state: list[tuple[str, torch.Tensor]]) -> list[tuple[str, Image.Image]]:
    return [(label, Image.fromarray(pixels.numpy())) for label, pixels in state]


# ---------------------------------------------------------------------------------------------
# Loss


def loss_scaler(dtype: torch.dtype, device: torch.device) -> torch.amp.GradScaler:
    """A dynamic loss scaler, on where the frozen UNet is fp16 (off, a pass-through, otherwise).

    fp16 keeps magnitudes down to 6e-8; gradients that reach the embeddings through the UNet's
    backward pass and the cross-attention are often smaller and flush to zero. Scaling the loss
    (by 2^16 at first, halved on overflow, the step skipped) keeps them; bf16 has fp32's range.
    """
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE over masked pixels, normalised by the mask's area, averaged over the batch.

    prediction, target: [B, C, h, w]; mask: [B, 1, h, w] of 0/1.
    """
    per_pixel = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=1, keepdim=True)
    return ((per_pixel * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp(min=1.0)).mean()


def attention_grid(tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) grid of an attention layer with `tokens` spatial tokens over an `height` x `width` latent."""
    factor = math.sqrt(height * width / tokens)  # the layer's downsampling from the latent
    h, w = round(height / factor), round(width / factor)
    if h * w != tokens:
        raise ValueError(f"{tokens} attention tokens do not tile a {height}x{width} latent")
    return h, w


def attention_regulariser(maps: dict[int, torch.Tensor], subject_masks: torch.Tensor, weight: float) -> torch.Tensor:
    """Mix-of-Show's cross-attention regulariser (`trainer_edlora.py::cal_attn_reg`, reg_full_identity false).

    maps: spatial token count -> `[B, 2, N]` attention of (V_rand, V_class), averaged over heads and
    over the layers of that resolution; subject_masks: `[B, 1, h, w]` of 0/1 at the latent size.
    Per resolution each map is divided by its max and penalised by its mean outside the subject mask
    (resized by area average, then > 0.5): weight * (L_rand + L_class), summed over resolutions.
    Examples whose mask covers everything (no subject mask, no concept) or nothing (cropped away)
    at a resolution are skipped there; Mix-of-Show skips a NaN loss. Unlike Mix-of-Show, which divides
    by the batch's max and pools pixels over the batch, each example's maps are normalised by their
    own max and averaged per example, so one example cannot scale another's penalty.
    """
    total = subject_masks.new_zeros((), dtype=torch.float32)
    height, width = subject_masks.shape[-2:]
    for tokens, word_maps in maps.items():
        grid = attention_grid(tokens, height, width)
        inside = F.interpolate(subject_masks.float(), size=grid, mode="area").flatten(1) > 0.5  # [B, N]
        outside = (~inside).float()
        counted = (outside.sum(1) > 0) & (inside.sum(1) > 0)
        if not counted.any():
            continue
        word_maps = word_maps.float()
        word_maps = word_maps / word_maps.amax(dim=-1, keepdim=True).clamp(min=1e-12)  # each map by its max
        mean_outside = (word_maps * outside[:, None]).sum(-1) / outside.sum(1).clamp(min=1)[:, None]  # [B, 2]
        total = total + weight * mean_outside[counted].sum(-1).mean()  # L_rand + L_class
    return total


def concept_token_positions(tokenizer, prompts: list[str], name: str, known: set[str] | None = None) -> torch.Tensor:
    """`[B, 2]` positions of V_rand and V_class in each prompt's token ids, -1 where the prompt does not
    name the concept. Copy 0 is used: each layer-wise copy has its tokens at the same positions.
    `known`: every concept the prompts may name (a group's members), default `name` alone."""
    wanted = tokenizer.convert_tokens_to_ids([f"<{name}-r0>", f"<{name}-c0>"])
    texts = [expand_prompt(p, 0, known or {name}) if name in concepts_in(p) else p for p in prompts]
    rows = tokenizer(texts, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return torch.tensor([[ids.index(t) if t in ids else -1 for t in wanted] for ids in rows], dtype=torch.long)


def embedding_norm(vectors: torch.Tensor) -> float:
    """Mean L2 norm of a concept's 32 layer-wise vectors ([2, 16, d])."""
    return mean_norm(vectors).item()


def mean_norm(vectors: torch.Tensor) -> torch.Tensor:
    """`embedding_norm` as a 0-d tensor on the vectors' device (no host sync)."""
    return vectors.detach().float().norm(dim=-1).mean()


# ---------------------------------------------------------------------------------------------
# Cross-attention maps of the concept tokens, recorded while training


class ConceptAttentionMaps:
    """Cross-attention maps at the concept-token columns, grouped by spatial token count.

    Like Mix-of-Show's AttentionStore, but it keeps only the two columns the regulariser reads,
    averaged over heads: `[B, 2, N]` per layer instead of `[B, heads, N, 77]`.
    """

    def __init__(self):
        self.positions: torch.Tensor | None = None  # [B, 2] token positions of V_rand, V_class
        self.maps: dict[int, list[torch.Tensor]] = defaultdict(list)

    def start(self, positions: torch.Tensor) -> None:
        """Begin a forward pass whose prompts hold the concept tokens at `positions` ([B, 2])."""
        self.maps.clear()
        self.positions = positions

    def record(self, probs: torch.Tensor) -> None:
        """Keep one layer's attention probabilities `[B, heads, N, S]` at the concept tokens."""
        if self.positions is None:
            return
        per_pixel = probs.mean(dim=1)  # [B, N, S]
        index = self.positions[:, None, :].expand(-1, per_pixel.shape[1], -1)  # [B, N, 2]
        self.maps[per_pixel.shape[1]].append(per_pixel.gather(2, index).transpose(1, 2))  # [B, 2, N]

    def by_resolution(self) -> dict[int, torch.Tensor]:
        """Token count -> `[B, 2, N]` maps averaged over the layers of that resolution."""
        return {tokens: torch.stack(layers).mean(0) for tokens, layers in self.maps.items()}

    def clear(self) -> None:
        self.maps.clear()


class ConceptAttentionRecorder:
    """Cross-attention of layer l (copy l of the layer-wise prompt) with explicit probabilities.

    Computes softmax(Q K^T / sqrt(d)) itself (`Attention.get_attention_scores`, as diffusers'
    AttnProcessor) instead of SDPA, so the concept tokens' maps can be recorded into `store` and
    the regulariser's gradient flows through them. Training only.
    """

    def __init__(self, layer: int, store: ConceptAttentionMaps):
        self.layer = layer
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        context = select_layer(encoder_hidden_states, self.layer)
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        batch, tokens, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # [B * heads, N, d_head]
        key = attn.head_to_batch_dim(attn.to_k(context))  # [B * heads, S, d_head]
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)  # [B * heads, N, S]
        self.store.record(probs.view(batch, attn.heads, tokens, -1))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))  # [B, N, heads * d_head]
        out = attn.to_out[1](attn.to_out[0](out))  # linear, dropout
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@contextmanager
def recording_cross_attention(unet: torch.nn.Module, store: ConceptAttentionMaps):
    """Give every cross-attention layer a ConceptAttentionRecorder; put the old processors back after."""
    layers = [module for _, module in cross_attention_layers(unet)]
    saved = [module.processor for module in layers]
    for layer, module in enumerate(layers):
        module.set_processor(ConceptAttentionRecorder(layer, store))
    try:
        yield store
    finally:
        for module, processor in zip(layers, saved):
            module.set_processor(processor)


# ---------------------------------------------------------------------------------------------
# Training


def _class_embedding(base: BaseModel, class_word: str) -> torch.Tensor:
    ids = base.tokenizer(class_word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise UserError(f"class word {class_word!r} is {len(ids)} tokens for CLIP; choose a common single word (dog, cat, bird...)")
    table = base.text_encoder.get_input_embeddings()
    base_table = getattr(table, "base_table", table)
    return base_table.weight[ids[0]].detach().float().cpu()


def check_train_config(config: TrainConfig, photo_count: int) -> TrainConfig:
    """Validate settings (before any model loads); returns the config with steps resolved."""
    check_name(config.name)
    class_word = check_class_word(config.class_word)
    if photo_count < 1:
        raise UserError("no photos given; upload at least one photo of the subject (3 or more is better)")
    for label, value in (("batch size", config.batch_size), ("rank", config.rank)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{label} must be a positive integer, got {value}")
    if config.steps is not None and config.steps < 1:
        raise UserError(f"--steps must be at least 1, got {config.steps}")
    for label, value in (("lr_embedding", config.lr_embedding), ("lr_text_lora", config.lr_text_lora), ("lr_unet_lora", config.lr_unet_lora)):
        if not value >= 0:
            raise UserError(f"{label} must be 0 or more, got {value}")
    if not config.attn_reg_weight >= 0:
        raise UserError(f"attn_reg_weight must be 0 or more (0 turns the attention regulariser off), got {config.attn_reg_weight}")
    if config.kind not in SINGLE_KINDS + GROUP_KINDS:
        raise UserError(f"kind {config.kind!r} is not known; use one of {', '.join(dict.fromkeys(SINGLE_KINDS + GROUP_KINDS))}")
    if not config.lr_kv >= 0:
        raise UserError(f"lr_kv must be 0 or more, got {config.lr_kv}")
    chances = (("multi_subject_probability", config.multi_subject_probability), ("prior_probability", config.prior_probability),
               ("class_prior_probability", config.class_prior_probability))
    for label, value in chances:
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{label} must be between 0 and 1 (the chance a training example is one), got {value}")
    if sum(value for _, value in chances) > 1.0:
        raise UserError(f"multi_subject_probability + prior_probability + class_prior_probability must be at most 1, got"
                        f" {' + '.join(str(value) for _, value in chances)}; lower one of them")
    if config.class_prior_probability > 0 and (not isinstance(config.class_images, int) or not 1 <= config.class_images <= MAX_BASE_SAMPLES):
        raise UserError(f"class_images must be an integer from 1 to {MAX_BASE_SAMPLES}, got {config.class_images}")
    companions = tuple(config.companions)
    if config.multi_subject_probability > 0 or config.prior_probability > 0:
        if not companions:
            raise UserError("companions is empty; name at least one other animal the base model draws, e.g. dog,cat")
        companions = tuple(_check_companion(word) for word in companions)
        for label, value in (("companion_images", config.companion_images), ("prior_images", config.prior_images)):
            if not isinstance(value, int) or not 1 <= value <= MAX_BASE_SAMPLES:
                raise UserError(f"{label} must be an integer from 1 to {MAX_BASE_SAMPLES}, got {value}")
    steps = config.steps or default_steps(photo_count, config.batch_size)
    return replace(config, class_word=class_word, steps=steps, companions=companions)


def parse_companions(text: str) -> tuple[str, ...]:
    """Companion class words from a comma-separated field ("dog, cat" -> ("dog", "cat"))."""
    return tuple(word.strip() for word in text.split(",") if word.strip())


def _check_companion(word: str) -> str:
    try:
        return check_class_word(word)
    except UserError:
        raise UserError(f"companion {word!r} is not valid: use one plain word per animal, e.g. dog,cat") from None


def _check_companion_tokens(tokenizer, words: tuple[str, ...]) -> None:
    """Each companion must be one CLIP token, like the class word (see `_class_embedding`)."""
    for word in words:
        count = len(tokenizer(word, add_special_tokens=False).input_ids)
        if count != 1:
            raise UserError(f"companion {word!r} is {count} tokens for CLIP; choose a common single word (dog, cat, bird...)")


def _trainable_state(vectors: list[torch.Tensor], text_params: list, unet_params: list) -> dict[str, torch.Tensor]:
    state = {("embeddings" if i == 0 else f"embeddings.{i}"): v.detach().clone() for i, v in enumerate(vectors)}
    state.update({f"text.{i}": p.detach().clone() for i, p in enumerate(text_params)})
    state.update({f"unet.{i}": p.detach().clone() for i, p in enumerate(unet_params)})
    return state


def _example_kind(config: TrainConfig, rng: random.Random) -> str:
    """"prior", "composite", "class" or "single"; draws from `rng` only when composites or priors are
    on, so the default configuration makes the same batches as before they existed."""
    if config.multi_subject_probability == 0 and config.prior_probability == 0 and config.class_prior_probability == 0:
        return "single"
    draw = rng.random()
    if draw < config.prior_probability:
        return "prior"
    if draw < config.prior_probability + config.multi_subject_probability:
        return "composite"
    if draw < config.prior_probability + config.multi_subject_probability + config.class_prior_probability:
        return "class"
    return "single"


def _make_batch(photos, masks, config: TrainConfig, resolution: int, latent_size: int, rng: random.Random,
                companions=(), prior_scenes=(), class_priors=()):
    """One batch on the CPU: random examples, augmented, with captions from templates.

    An example is one photo (crop-and-paste), or with `multi_subject_probability` a composite of it
    beside a companion (`make_composite`), or with `prior_probability` a prior scene, or with
    `class_prior_probability` a class-word picture (prior preservation). Returns pixels
    `[B, 3, S, S]`, loss masks `[B, 1, s, s]`, subject masks for the attention regulariser
    `[B, 1, s, s]` (all ones where there is none, which the regulariser skips) and prompts.
    """
    pixels, loss_masks, subject_masks, prompts = [], [], [], []
    everything = Image.new("L", (resolution, resolution), 255)
    for _ in range(config.batch_size):
        kind = _example_kind(config, rng)
        if kind in ("prior", "class"):  # the base model's own picture and caption, loss everywhere, no concept
            pool = prior_scenes if kind == "prior" else class_priors
            prompt, canvas = pool[rng.randrange(len(pool))]
            canvas, loss_area, subject = canvas.resize((resolution, resolution), Image.BICUBIC), everything, None
        else:
            index = rng.randrange(len(photos))
            canvas, subject, pasted = resize_crop_paste(photos[index], masks[index] if masks else None, resolution, config.crop_probability, rng)
            if kind == "composite":
                word, companion = companions[rng.randrange(len(companions))]
                cut = subject if subject is not None and subject.getbbox() else pasted  # a cropped-away subject: the tile
                canvas, pet_area, pet_on_left = make_composite(canvas, cut, companion, resolution, rng)
                loss_area, subject = pet_area, pet_area if cut is subject else None
                prompt = composite_caption(config.name, word, pet_on_left, rng)
            else:
                loss_area = subject if subject is not None else pasted
                prompt = caption(config.name, rng)
        image_tensor, mask_tensor = to_tensors(canvas, loss_area, latent_size)
        pixels.append(image_tensor)
        loss_masks.append(mask_tensor)
        subject_masks.append(downsample_mask(subject, latent_size) if subject is not None else torch.ones_like(mask_tensor))
        prompts.append(prompt)
    return torch.stack(pixels), torch.stack(loss_masks), torch.stack(subject_masks), prompts


def _save_checkpoint(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


@dataclass
class GroupMember:
    """One pet of a group trained together (`train_group`): its name, class word, photos and optional masks."""

    name: str
    class_word: str
    photos: list
    masks: list | None = None


def train_concept(
    base: BaseModel,
    photos: list[Image.Image],
    config: TrainConfig,
    masks: list[Image.Image] | None = None,
    callback: Callable[[TrainProgress], None] | None = None,
    cancel: threading.Event | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train one concept of kind `config.kind` on `photos`; it stays loaded in `base` under its name.

    Kinds: "edlora" (ED-LoRA, the default), "custom-diffusion" (the modifier token and the
    cross-attention K/V, Kumari et al. 2023) and "cones" (concept neurons, `pipelines.cones`).

    Args:
        base: the base model; frozen weights are used in its dtype, and its `performance` settings
            (memory mode, compiled UNet; see `pipelines.performance`) apply.
        photos: RGB images of the subject (see `load_training_set`).
        config: TrainConfig; `steps=None` picks Mix-of-Show's default for the photo count.
        masks: optional subject masks, one per photo (white = subject; None for a photo without
            one) for the masked loss and, with `attn_reg_weight` > 0, the cross-attention regulariser.
        callback: called after every step with a TrainProgress.
        cancel: set it to stop; a checkpoint is written first and Cancelled is raised.
        checkpoint_dir: where checkpoints go (every `checkpoint_every` steps and on cancel).
        resume: continue from the checkpoint in `checkpoint_dir` if there is one.
    """
    if config.kind == "cones":
        from .cones import find_concept_neurons

        return find_concept_neurons(base, photos, config, masks=masks, callback=callback, cancel=cancel,
                                    checkpoint_dir=checkpoint_dir, resume=resume)
    if config.kind not in SINGLE_KINDS:
        raise UserError(f"kind {config.kind!r} is not one concept's: use {', '.join(SINGLE_KINDS)}"
                        f"{' (a joint concept is trained for a group of pets with train-group)' if config.kind == 'joint' else ''}")
    if masks is not None and len(masks) != len(photos):
        raise UserError(f"{len(masks)} masks for {len(photos)} photos; give one mask per photo")
    member = GroupMember(config.name, config.class_word, photos, masks)
    return _train(base, [member], config, None, "", callback, cancel, checkpoint_dir, resume)[0]


def train_group(
    base: BaseModel,
    members: list[GroupMember],
    config: TrainConfig,
    backgrounds: list[Image.Image] | None = None,
    background_prompt: str = "",
    callback: Callable[[TrainProgress], None] | None = None,
    cancel: threading.Event | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> list[TrainResult]:
    """Train a group of pets together as one model (Gen4Gen / MuDI): one concept per member.

    `config.kind` "joint" trains ED-LoRA words per member and one shared LoRA; "custom-diffusion"
    is Custom Diffusion's joint training (a modifier token per member, one set of K/V weights).
    `config.name` names the group. With chance `config.multi_subject_probability` an example is a
    composite of every member (`pipelines.composites`) on a background: the user's `backgrounds`,
    or base-model pictures of `background_prompt`, or black (MuDI's Seg-Mix); its loss is averaged
    per pet (each pet's own mask, plus the background when it is a picture), so a small pet counts
    as much as a large one. Other examples are one member's photo, as in single training.
    Returns one TrainResult per member, in order; each member's file holds the shared weights.
    """
    if config.kind not in GROUP_KINDS:
        raise UserError(f"a group is trained as {' or '.join(GROUP_KINDS)}, not {config.kind!r}")
    if len(members) < 2:
        raise UserError("a group needs at least two pets; train a single pet with train")
    names = [check_name(m.name, "pet name") for m in members]
    if len(set(names)) != len(names):
        raise UserError(f"a pet is named twice in the group: {', '.join(names)}")
    if config.name in names:
        raise UserError(f"the group's name {config.name!r} is also a pet's; give the group its own name, e.g. {'-'.join(names)}")
    for member in members:
        if member.masks is not None and len(member.masks) != len(member.photos):
            raise UserError(f"<{member.name}>: {len(member.masks)} masks for {len(member.photos)} photos; give one mask per photo")
        if not member.photos:
            raise UserError(f"<{member.name}> has no photos; upload at least one photo of each pet")
    from .composites import check_members

    check_members([(m.photos, m.masks) for m in members], names)
    if backgrounds and not background_prompt.strip():
        raise UserError("background photos need a background prompt that says what they show, e.g. 'in a garden'")
    if config.multi_subject_probability <= 0:
        raise UserError("multi_subject_probability is 0: a group learns from composites of its pets; use 0.5 (the default of train-group)")
    return _train(base, list(members), config, backgrounds, background_prompt, callback, cancel, checkpoint_dir, resume)


def _member_tensors(base: BaseModel, config: TrainConfig, adapter: str, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
    """What one member's concept file holds (see `pipelines.edlora` for each kind's layout)."""
    if config.kind != "custom-diffusion":
        return concept_state_dict(base, adapter, vectors)
    tensors = {"embeddings": vectors.detach().float().cpu().contiguous()}
    for name, layer in lora_layers(base.unet).items():
        if adapter in layer.lora_B:  # A is the identity: the update B @ A is B
            tensors[f"unet.{name}.delta"] = layer.lora_B[adapter].weight.detach().float().cpu().contiguous()
    return tensors


def _add_kv_updates(base: BaseModel, adapter: str) -> list[torch.nn.Parameter]:
    """Custom Diffusion's trainable K/V: a dense update of every cross-attention to_k/to_v, as a
    peft adapter whose A is a frozen identity and whose B (zero at first) trains: W0 + B."""
    width = cross_attention_layers(base.unet)[0][1].to_k.in_features
    add_lora(base.unet, adapter, KV_TARGETS, width)
    trainable = []
    for layer in lora_layers(base.unet).values():
        if adapter in layer.lora_A:
            layer.lora_A[adapter].weight.data = torch.eye(width, device=base.device)
            layer.lora_A[adapter].weight.requires_grad_(False)
            trainable.append(layer.lora_B[adapter].weight)
    return trainable


def region_masked_mse(prediction: torch.Tensor, target: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """`masked_mse` per region, averaged over each example's non-empty regions, then over the batch.

    regions: [B, K, h, w] of 0/1 (K = 1: exactly `masked_mse`). A group composite has one region
    per pet (and the background), so each pet weighs the same whatever its size.
    """
    per_pixel = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=1, keepdim=True)
    area = regions.sum(dim=(2, 3))  # [B, K]
    per_region = (per_pixel * regions).sum(dim=(2, 3)) / area.clamp(min=1.0)
    counted = (area > 0).float()
    return ((per_region * counted).sum(1) / counted.sum(1).clamp(min=1.0)).mean()


def _make_group_batch(members: list[GroupMember], config: TrainConfig, resolution: int, latent_size: int, rng: random.Random,
                      backgrounds, background_is_picture: bool, background_prompt: str, class_priors=()):
    """One batch of a group: composites of every member, single members' photos, class pictures.

    Returns pixels [B, 3, S, S], loss regions [B, n + 1, s, s] (each pet, then the background of a
    picture), subject masks [B, n, s, s] for the attention regulariser (ones where a pet is absent,
    which it skips) and prompts.
    """
    from .composites import make_group_example

    count = len(members)
    everything = Image.new("L", (resolution, resolution), 255)
    pixels, regions, subjects, prompts = [], [], [], []
    for _ in range(config.batch_size):
        kind = _example_kind(config, rng)
        region = torch.zeros(count + 1, latent_size, latent_size)
        subject = torch.ones(count, latent_size, latent_size)
        if kind == "composite":
            # <name> already holds its class word (V_class, or Custom Diffusion's second word): no class words
            canvas, masks, prompt = make_group_example([(m.photos, m.masks) for m in members], backgrounds,
                                                       [m.name for m in members], None, background_prompt, resolution, rng)
            for i, mask in enumerate(masks):
                region[i] = downsample_mask(mask, latent_size)[0]
                subject[i] = region[i]
            if background_is_picture:
                region[count] = (1 - region[:count].amax(0)).clamp(min=0)
        elif kind == "class":
            prompt, canvas = class_priors[rng.randrange(len(class_priors))]
            canvas = canvas.resize((resolution, resolution), Image.BICUBIC)
            region[count] = downsample_mask(everything, latent_size)[0]
        else:  # one member's photo, as in single training
            i = rng.randrange(count)
            member = members[i]
            index = rng.randrange(len(member.photos))
            canvas, cut, pasted = resize_crop_paste(member.photos[index], member.masks[index] if member.masks else None,
                                                    resolution, config.crop_probability, rng)
            region[i] = downsample_mask(cut if cut is not None else pasted, latent_size)[0]
            if cut is not None:
                subject[i] = region[i]
            prompt = caption(member.name, rng)
        pixels.append(to_tensors(canvas, everything, latent_size)[0])
        regions.append(region)
        subjects.append(subject)
        prompts.append(prompt)
    return torch.stack(pixels), torch.stack(regions), torch.stack(subjects), prompts


def _train(base: BaseModel, members: list[GroupMember], config: TrainConfig, backgrounds, background_prompt: str,
           callback, cancel, checkpoint_dir, resume) -> list[TrainResult]:
    """The training loop of every gradient-trained kind: one pet (`train_concept`) or a group (`train_group`)."""
    # 1. Check inputs
    group = len(members) > 1 or config.kind == "joint"
    here = init_distributed(base.device)
    photo_count = sum(len(m.photos) for m in members)
    if config.steps is None and here.size > 1:  # the same examples in all, spread over the processes
        config = replace(config, steps=default_steps(photo_count, config.batch_size * here.size))
    config = check_train_config(replace(config, class_word=members[0].class_word) if group else config, photo_count)
    if group:
        members = [replace(m, class_word=check_class_word(m.class_word)) for m in members]
    resolution = config.resolution or base.native_resolution
    if resolution % (base.vae_scale_factor * 8):
        raise UserError(f"--resolution {resolution} must be a multiple of {base.vae_scale_factor * 8}")
    latent_size = resolution // base.vae_scale_factor
    class_embeddings = [_class_embedding(base, m.class_word) for m in members]
    uses_companions = not group and (config.multi_subject_probability > 0 or config.prior_probability > 0)
    if uses_companions:
        _check_companion_tokens(base.tokenizer, companion_words(config))
    background_pictures = list(backgrounds or [])
    if group and background_pictures:
        from .composites import load_backgrounds

        background_pictures = load_backgrounds(background_pictures)
    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir else None
    payload = None
    if resume and checkpoint_path is not None and checkpoint_path.exists():
        payload = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        saved = {k: v for k, v in payload["config"].items() if k not in ("steps", "checkpoint_every", "preview_every")}
        if saved != {k: v for k, v in asdict(config).items() if k not in ("steps", "checkpoint_every", "preview_every")}:
            raise UserError(f"the checkpoint in {checkpoint_dir} was made with other settings; train without --resume to start over")

    # 2. The base model's own pictures, before the concept exists: companions, prior scenes, class
    #    pictures, and a group's backgrounds drawn from its prompt
    companions, prior_scenes, class_priors = [], [], []
    needs_class = config.class_prior_probability > 0
    drawn_backgrounds = group and not background_pictures and bool(background_prompt.strip())
    if payload is not None:  # the very images of the interrupted run
        companions, prior_scenes = _images_from_state(payload["companions"]), _images_from_state(payload["prior_scenes"])
        class_priors = _images_from_state(payload.get("class_priors", []))
        if drawn_backgrounds:
            background_pictures = [image for _, image in _images_from_state(payload.get("backgrounds", []))]
    else:
        if uses_companions or needs_class:
            sampling = config if uses_companions else replace(config, multi_subject_probability=0.0, prior_probability=0.0)
            companions, prior_scenes, class_priors = sample_companions(base, sampling, resolution, tuple(m.class_word for m in members))
        if drawn_backgrounds:
            from .composites import draw_backgrounds

            for model in (base.text_encoder, base.unet):
                set_active_adapters(model, [])
            background_pictures = draw_backgrounds(base, background_prompt, BACKGROUND_IMAGES, resolution, config.seed)
    background_is_picture = bool(background_pictures)

    # 3. Concept tokens and the trained weights, all randomness from the seed
    torch.manual_seed(config.seed)  # peft's Kaiming init of lora_A draws from the global RNG
    rng = random.Random(config.seed)
    generator = torch.Generator("cpu").manual_seed(config.seed)
    dim = base.text_encoder.get_input_embeddings().weight.shape[1]
    inits, vectors = [], []
    for member, v_class in zip(members, class_embeddings):
        v_rand = torch.randn(dim, generator=generator) * config.rand_init_std  # ED-LoRA's V_rand; Custom Diffusion's V*
        inits.append(torch.stack([v_rand.expand(NUM_LAYERS, -1), v_class.expand(NUM_LAYERS, -1)]))  # [2, 16, d]
        vectors.append(add_concept_tokens(base.tokenizer, base.text_encoder, member.name, inits[-1]))
    install_layerwise_attention(base.unet)
    adapter = config.name
    for name in [adapter] + [m.name for m in members]:
        base.loaded_concepts.pop(name, None)  # the adapters below are new, not what apply_concept loaded
    custom = config.kind == "custom-diffusion"
    if custom:
        unet_params, text_params = _add_kv_updates(base, adapter), []
        set_active_adapters(base.unet, [adapter])
        set_active_adapters(base.text_encoder, [])  # Custom Diffusion leaves the text encoder as it is
    else:
        for model, targets in ((base.text_encoder, TEXT_ENCODER_TARGETS), (base.unet, UNET_TARGETS)):
            add_lora(model, adapter, targets, config.rank)
            set_active_adapters(model, [adapter])
        text_params = lora_parameters(base.text_encoder, adapter)
        unet_params = lora_parameters(base.unet, adapter)
    for param in text_params + unet_params:
        param.data = param.data.float()  # fp32 master copies of what trains; frozen weights stay half
        param.requires_grad_(True)
    for v in vectors:
        v.requires_grad_(True)
    if here.rank > 0:  # same initial weights everywhere (drawn above), then other batches and noise
        rng = random.Random(config.seed + 1_000_003 * here.rank)
        generator.manual_seed(config.seed + 1_000_003 * here.rank)

    plan = memory_plan(base, "train")
    if custom:  # diffusers' train_custom_diffusion.py: one learning rate, constant
        groups = [{"params": vectors + unet_params, "lr": config.lr_kv}]
    else:
        groups = [{"params": vectors, "lr": config.lr_embedding}, {"params": text_params, "lr": config.lr_text_lora},
                  {"params": unet_params, "lr": config.lr_unet_lora}]
    optimizer = make_adamw(groups, base.device, eight_bit=plan.adam_8bit, betas=(0.9, 0.999), weight_decay=config.weight_decay)
    total = config.steps
    decay = (lambda step: 1.0) if custom else (lambda step: max(0.0, (total - step) / total))
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
    scaler = loss_scaler(base.dtype, base.device)
    step, losses, frozen_at = 0, [], None

    # 4. Resume
    if payload is not None:
        with torch.no_grad():
            for i, v in enumerate(vectors):
                v.copy_(payload["trainable"]["embeddings" if i == 0 else f"embeddings.{i}"])
            for i, p in enumerate(text_params):
                p.copy_(payload["trainable"][f"text.{i}"])
            for i, p in enumerate(unet_params):
                p.copy_(payload["trainable"][f"unet.{i}"])
        optimizer.load_state_dict(payload["optimizer"])
        lr_schedule.load_state_dict(payload["lr_schedule"])
        if payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        rng.setstate(payload["python_rng"])
        generator.set_state(payload["torch_rng"])
        if here.rank > 0:  # the checkpoint holds rank 0's random state; the others draw afresh from here
            rng = random.Random(config.seed + 1_000_003 * here.rank + payload["step"])
            generator.manual_seed(config.seed + 1_000_003 * here.rank + payload["step"])
        step, losses, frozen_at = payload["step"], payload["losses"], payload["frozen_at"]
        if frozen_at is not None:
            for v in vectors:
                v.requires_grad_(False)
        logger.info("resumed %s at step %d of %d", config.name, step, total)

    def checkpoint() -> None:
        if checkpoint_path is None or here.rank > 0:
            return
        _save_checkpoint(checkpoint_path, {
            "config": asdict(config), "step": step, "losses": losses, "frozen_at": frozen_at,
            "trainable": _trainable_state(vectors, text_params, unet_params),
            "optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(), "scaler": scaler.state_dict(),
            # the Python RNG as it was before the next batch was drawn ahead (see 5d)
            "python_rng": rng_at_step, "torch_rng": generator.get_state(),
            "companions": _images_to_state(companions), "prior_scenes": _images_to_state(prior_scenes),
            "class_priors": _images_to_state(class_priors),
            "backgrounds": _images_to_state([("", b) for b in background_pictures]) if drawn_backgrounds else [],
        })

    # 5. The loop
    base.unet.train()  # no dropout in SD; train() only matters for modules that check it
    unet = unet_forward(base)
    trainable = vectors + text_params + unet_params
    started, start_step = time.perf_counter(), step
    preview_seconds: list[float] = []  # each preview's time, kept out of the step time and added per preview to come
    # Mix-of-Show's regulariser needs to know where the subject is: subject masks, or a group's composites
    has_masks = any(m.masks is not None for m in members)
    attention_maps = ConceptAttentionMaps() if (has_masks or group) and config.attn_reg_weight > 0 else None
    recording = recording_cross_attention(base.unet, attention_maps) if attention_maps is not None else nullcontext()

    def make_batch():
        if not group:
            member = members[0]
            pixels, loss_mask, subject_mask, prompts = _make_batch(member.photos, member.masks, config, resolution, latent_size,
                                                                   rng, companions, prior_scenes, class_priors)
            return pixels, loss_mask, subject_mask, prompts
        return _make_group_batch(members, config, resolution, latent_size, rng, background_pictures, background_is_picture,
                                 background_prompt, class_priors)

    rng_at_step = rng.getstate()
    batch = make_batch() if step < total else None
    with gradient_checkpointing(base, plan.gradient_checkpointing), recording, tf32_matmuls(base):
        while step < total:
            if cancel is not None and cancel.is_set():
                checkpoint()
                raise Cancelled(f"training of {config.name} cancelled at step {step} of {total}")
            # 5a. The batch made ahead on the CPU
            pixels, loss_regions, subject_masks, prompts = batch
            pixels = pixels.to(base.device, base.dtype)
            loss_regions = loss_regions.to(base.device)

            # 5b. Diffusion loss
            with torch.no_grad():
                posterior = base.vae.encode(pixels).latent_dist
                latents = posterior.sample(generator=generator).float() * base.vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=generator)
            noise = noise + config.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=generator)
            noise = noise.to(base.device)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(base.device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            context = encode_layerwise(base.tokenizer, base.text_encoder, prompts)
            if attention_maps is not None:
                known = {m.name for m in members}
                positions = torch.cat([concept_token_positions(base.tokenizer, prompts, m.name, known) for m in members], dim=1)  # [B, 2n]
                for i in range(len(members)):  # a pet the prompt does not name: nothing to keep in place
                    subject_masks[:, i][(positions[:, 2 * i: 2 * i + 2] < 0).any(dim=1)] = 1.0
                attention_maps.start(positions.clamp(min=0).to(base.device))
            prediction = unet(noisy.to(base.dtype), timesteps, encoder_hidden_states=context.to(base.dtype)).sample
            loss = region_masked_mse(prediction, target, loss_regions)
            if attention_maps is not None:
                per_pet = {tokens: maps.unflatten(1, (len(members), 2)).flatten(0, 1)  # [B * n, 2, N]
                           for tokens, maps in attention_maps.by_resolution().items()}
                loss = loss + attention_regulariser(per_pet, subject_masks.flatten(0, 1)[:, None].to(base.device), config.attn_reg_weight)

            # 5c. Update (queued on the device; nothing here waits for it)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # with an fp16 UNet: scaled, so small gradients do not flush to zero
            if custom:
                _tie_modifier_gradients(vectors)
            average_gradients(trainable, here.size)  # scaled sums: an overflow on one process reaches all
            scaler.step(optimizer)  # unscales; skips the step (and lowers the scale) on inf/NaN gradients
            scaler.update()
            lr_schedule.step()
            if custom:
                with torch.no_grad():  # weight decay must not move the frozen class word either
                    for v, init in zip(vectors, inits):
                        v[1].copy_(init[1])
            step += 1

            # 5d. While the device works, augment the next batch; then read loss and norm in one sync
            if attention_maps is not None:
                attention_maps.clear()  # this step's maps, and what gradient checkpointing recorded again in backward
            rng_at_step = rng.getstate()
            batch = make_batch() if step < total else None
            norm_now = torch.stack([mean_norm(v) for v in vectors]).mean()
            loss_value, norm = torch.stack([loss.detach(), norm_now]).tolist()
            if not math.isfinite(loss_value):
                raise UserError(f"training diverged at step {step - 1} (loss {loss_value}); lower the learning rates")
            losses.append(loss_value)
            if not custom and frozen_at is None and norm >= config.emb_norm_stop:
                frozen_at = step  # Mix-of-Show: stop the embeddings, keep training the LoRA
                for v in vectors:
                    v.requires_grad_(False)
                    v.grad = None

            # 5e. Report, preview, checkpoint
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
                checkpoint()
            preview = None
            if config.preview_every and step % config.preview_every == 0:
                preview_started = time.perf_counter()
                preview = _preview(base, config, members)
                preview_seconds.append(time.perf_counter() - preview_started)
            if callback is not None and here.rank == 0:
                eta = training_eta(time.perf_counter() - started - sum(preview_seconds), step - start_step, step, total,
                                   preview_seconds, config)
                callback(TrainProgress(step, total, losses[-1], eta, norm, frozen_at is not None, preview))

    # 6. Wrap up: each member's tensors and a preview sample
    base.unet.eval()
    for param in vectors + text_params + unet_params:
        param.requires_grad_(False)
    preview = _preview(base, config, members)
    results = []
    for member, v in zip(members, vectors):
        concept = Concept(
            name=member.name,
            class_word=member.class_word,
            base_model=base.name,
            fingerprint=base.fingerprint,
            photo_count=len(member.photos),
            settings={**asdict(config), "resolution": resolution, "embeddings_frozen_at": frozen_at,
                      "final_loss": losses[-1] if losses else None},
            is_test_model=base.is_test_model,
            kind=config.kind,
            group=config.name if group else "",
            members=[m.name for m in members] if group else [],
        )
        results.append(TrainResult(
            concept=concept,
            tensors=_member_tensors(base, config, adapter, v),
            preview=preview,
            losses=losses,
            embeddings_frozen_at=frozen_at,
            seconds=time.perf_counter() - started,
        ))
    if checkpoint_path is not None and checkpoint_path.exists() and here.rank == 0:
        checkpoint_path.unlink()
    return results


def _tie_modifier_gradients(vectors: list[torch.Tensor]) -> None:
    """Custom Diffusion trains one input embedding per modifier token: its 16 layer copies get the
    sum of their gradients (so they stay one vector), and the class word gets none."""
    for v in vectors:
        if v.grad is not None:
            v.grad[0] = v.grad[0].sum(dim=0, keepdim=True).expand_as(v.grad[0])
            v.grad[1] = 0.0


def training_eta(step_seconds: float, steps_timed: int, step: int, total: int, preview_seconds: list[float],
                 config: TrainConfig) -> float:
    """Seconds left after `step` of `total`: the steps to come at the pace of the `steps_timed` so far
    (previews excluded), plus the previews to come and the final one, at their measured time (before
    the first, a sampling step is taken as half a training step)."""
    per_step = step_seconds / max(steps_timed, 1)
    per_preview = sum(preview_seconds) / len(preview_seconds) if preview_seconds else config.preview_steps * per_step / 2
    every = config.preview_every
    previews_left = (total // every - step // every) if every else 0
    return per_step * (total - step) + per_preview * (previews_left + 1)


def _preview(base: BaseModel, config: TrainConfig, members: list | None = None) -> Image.Image:
    """One sample of "a photo of <name>" (a group: of every member) with the concept as it is now."""
    was_training = base.unet.training
    processors = base.unet.attn_processors  # sampling installs its own; training's recorders come back
    base.unet.eval()
    names = [m.name for m in members] if members and len(members) > 1 else [config.name]
    prompt = "a photo of " + " and ".join(f"<{n}>" for n in names)
    image = sample_loaded(base, SampleConfig(prompt=prompt, steps=config.preview_steps, seed=config.seed))[0]
    base.unet.set_attn_processor(processors)
    base.unet.train(was_training)
    return image
