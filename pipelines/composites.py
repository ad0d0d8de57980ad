"""Group composites: the training data of a jointly trained group of pets.

Gen4Gen (Yeh, Cheng, Hsieh et al. 2024, arXiv 2402.15504, section 3.2) composes the segmented
subjects of a group into one picture with a background and a caption that names every subject and
the background; MuDI's Seg-Mix (Jang et al. 2024, arXiv 2404.04243) pastes segmented subjects side
by side on black. A joint group concept trains one model on such pictures, each pet's words on
its own pixels (per-pet masked losses, in pipelines/train.py).

What is kept from Gen4Gen: boxes that never overlap and stay in the image, its minimum box area
((H/5)(W/5) for up to 3 subjects, (H/6)(W/6) for 4, (H/8)(W/8) for more), the aspect ratio kept
inside each box, real background photos blurred with radius 1, and its training prompts (every
subject named, the background always stated, concept tokens optionally repeated).
Where this departs from Gen4Gen:
- No LLM boxes (GPT-3.5 / GPT-4 scale ratios): `group_layout` draws a seeded side-by-side layout,
  one row of equal slots in random order, each subject at MuDI's U(0.75, 1) x the fit of its slot.
  Because the boxes never overlap, Gen4Gen's paste order (most to least overlapping) and MuDI's
  random z-order change nothing, and every subject stays whole.
- No SDXL inpainting of the background around the subjects and no refiner: subjects are pasted
  straight onto the background (a user photo, a base-model drawing, or MuDI's black), with a
  small inward feather of the paste edge in place of Gen4Gen's soft inpainting mask.
- No saliency segmentation (DIS) and no LLaVA captions: masks are the user's subject masks (a photo
  without one is pasted as a whole tile, as train.make_composite does), and captions are Gen4Gen's
  short form. Its global composition token (strategy 1) belongs to the trainer, not here.
- No human filtering: nothing is generated that could fail, except drawn backgrounds.

Boxes are pixel boxes (x0, y0, x1, y1) as in `regional.Region`; masks are PIL "L" images, white
(255) on the subject, the size of the canvas, as train.resize_crop_paste returns them.
"""

from __future__ import annotations

import math
import os
import random

import numpy as np
from PIL import Image, ImageChops, ImageFilter, ImageOps, UnidentifiedImageError

from .base import BaseModel
from .edlora import set_active_adapters
from .errors import UserError
from .sample import SampleConfig, sample_loaded

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels, x1 and y1 exclusive

SUBJECT_SCALE = (0.75, 1.0)  # MuDI Seg-Mix: each subject at U(0.75, 1) x the fit of its slot
FEATHER_RADIUS = 1.0  # pixels of Gaussian blur on the inside of each paste edge (0: a hard edge)
BACKGROUND_BLUR = 1.0  # Gen4Gen blurs real background photos with a radius-1 Gaussian
# Gen4Gen's caption form is "{subjects} {background}"; the frames are Textual Inversion's object
# templates (as train.OBJECT_TEMPLATES) that read well with "a X and a Y" after them.
GROUP_TEMPLATES = (
    "a photo of {}", "a good photo of {}", "a close-up photo of {}", "a bright photo of {}",
    "a dark photo of {}", "a cropped photo of {}", "a rendering of {}", "a rendition of {}",
)
PLAIN_BACKGROUND_PROMPT = "on a simple background"  # MuDI's Seg-Mix captions end "simple background"
BACKGROUND_SCENE = "a realistic photo of an empty scene {}"  # Gen4Gen: "a realistic photo of {background}"
BACKGROUND_NEGATIVE = "animal, dog, cat, person, people, lowres, worst quality, low quality"  # no stray subjects
BACKGROUND_SAMPLE_STEPS = 20  # DPM-Solver++ steps per drawn background (as train's companions)
BACKGROUND_BATCH = 8  # drawn backgrounds sampled together at most


# ---------------------------------------------------------------------------------------------
# Layout


def min_box_side(count: int, size: int) -> int:
    """The side of the smallest square box Gen4Gen allows: area (H/5)(W/5) for <= 3 subjects,
    (H/6)(W/6) for 4, (H/8)(W/8) for more, on a `size` x `size` canvas."""
    divisor = 5 if count <= 3 else 6 if count == 4 else 8
    return math.ceil(size / divisor)


def slot_edges(count: int, size: int) -> list[int]:
    """The x edges of `count` equal side-by-side slots across `size` pixels (count + 1 numbers)."""
    return [round(k * size / count) for k in range(count + 1)]


def group_layout(count: int, size: int, rng: random.Random, scale: tuple[float, float] = SUBJECT_SCALE) -> list[Box]:
    """One square box per subject on a `size` x `size` canvas: side by side, random order and scale.

    The canvas is cut into `count` equal vertical slots; subject i gets a random slot (a random
    permutation), a square side of U(scale) x the slot's fit (its width, at most `size`) but never
    below Gen4Gen's minimum (`min_box_side`), and a random place inside the slot. So boxes never
    overlap and stay inside the canvas (Gen4Gen's rules for its LLM boxes, arXiv 2402.15504).

    Args:
        count: subjects, 1 to 8 (more do not fit side by side at Gen4Gen's minimum area).
        size: canvas side in pixels.
        rng: the only source of randomness.
        scale: (low, high) in (0, 1], the box side as a share of the slot's fit; MuDI's (0.75, 1).
    Returns boxes (x0, y0, x1, y1) in subject order (not left to right).
    """
    if not isinstance(size, int) or size < 8:
        raise UserError(f"composite size {size!r} must be a whole number of pixels, 8 or more")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise UserError(f"subject scale {scale} must be (low, high) with 0 < low <= high <= 1")
    edges = slot_edges(count, size) if count >= 1 else []
    smallest = min_box_side(count, size)
    if count < 1 or count > 8 or min(b - a for a, b in zip(edges, edges[1:])) < smallest:
        raise UserError(f"{count} pets do not fit side by side on a {size}x{size} canvas at Gen4Gen's minimum box side"
                        f" of {smallest} pixels; a joint group has 1 to 8 members")
    slots = list(range(count))
    rng.shuffle(slots)
    boxes = []
    for slot in slots:
        left, right = edges[slot], edges[slot + 1]
        fit = min(right - left, size)
        side = max(smallest, round(fit * rng.uniform(*scale)))
        x, y = left + rng.randint(0, right - left - side), rng.randint(0, size - side)
        boxes.append((x, y, x + side, y + side))
    return boxes


def left_to_right(boxes: list[Box]) -> list[int]:
    """Subject indices ordered by their box's left edge (the order a caption names them)."""
    return sorted(range(len(boxes)), key=lambda i: boxes[i][0])


# ---------------------------------------------------------------------------------------------
# Pasting


def subject_cutout(photo: Image.Image, mask: Image.Image | None) -> tuple[Image.Image, Image.Image]:
    """The subject's pixels and its 0/255 cut, cropped to the mask's bounding box; a photo without
    a mask is the whole photo tile (cut all white)."""
    if mask is None:
        return photo.convert("RGB"), Image.new("L", photo.size, 255)
    if mask.size != photo.size:
        raise UserError(f"a subject mask is {mask.size[0]}x{mask.size[1]} but its photo {photo.size[0]}x{photo.size[1]};"
                        " a mask must be the size of its photo")
    cut = mask.convert("L").point(lambda v: 255 if v > 127 else 0)
    box = cut.getbbox()
    if box is None:
        raise UserError("a subject mask is empty (all black); the subject must be white")
    return photo.convert("RGB").crop(box), cut.crop(box)


def fit_in_box(width: int, height: int, box: Box) -> tuple[int, int]:
    """The largest (w, h) with the aspect of `width` x `height` inside `box`, at least 1 x 1."""
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    scale = min(box_w / width, box_h / height)
    return min(box_w, max(1, round(width * scale))), min(box_h, max(1, round(height * scale)))


def feathered(cut: Image.Image, radius: float) -> Image.Image:
    """The paste alpha: `cut` softened on its inside edge only (blur x cut), so the soft edge never
    leaves the subject's mask. Radius 0 returns the hard cut. The cut is blurred with a black
    margin around it, so a whole-photo tile (a cut white to its border) is softened too."""
    if radius <= 0:
        return cut
    margin = math.ceil(3 * radius)
    padded = ImageOps.expand(cut, margin, fill=0).filter(ImageFilter.GaussianBlur(radius))
    return ImageChops.multiply(cut, padded.crop((margin, margin, margin + cut.width, margin + cut.height)))


def fit_background(background: Image.Image, size: int, rng: random.Random) -> Image.Image:
    """`background` scaled to cover `size` x `size` (short side = size) and cropped at random."""
    try:
        image = background.convert("RGB")
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read a background image: {error}; remove it or replace it with a JPEG or PNG") from None
    w, h = image.size
    scale = size / min(w, h)
    w, h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((w, h), Image.BICUBIC)
    x, y = rng.randint(0, w - size), rng.randint(0, h - size)
    return image.crop((x, y, x + size, y + size))


def make_group_composite(cutouts: list[tuple[Image.Image, Image.Image | None]], background: Image.Image, size: int,
                         rng: random.Random, feather: float = FEATHER_RADIUS):
    """All subjects of a group pasted side by side on a background (Gen4Gen's composition step
    without its inpainting, arXiv 2402.15504; MuDI's Seg-Mix for more than two, arXiv 2404.04243).

    Each subject (the photo under its mask, cropped to the mask's bounding box; a photo without a
    mask: the whole tile) is scaled into its `group_layout` box with its aspect kept and placed at
    random inside it, on `background` scaled and cropped to `size` x `size`.

    Args:
        cutouts: one (photo, mask or None) per subject; masks white on the subject, photo-sized.
        background: any image; covered and randomly cropped to the canvas.
        size: canvas side in pixels.
        rng: the only source of randomness.
        feather: inward blur radius of the paste edge in pixels (0: hard edge); the outermost
            pixels of a subject blend with the background, pixels outside the masks stay the
            background's.
    Returns (canvas RGB, one full-canvas 0/255 mask per subject, one box per subject), masks and
    boxes in `cutouts` order; a box is the pasted tile's rectangle, inside its layout box. Boxes
    never overlap, so the masks are disjoint and each is wholly visible.
    """
    if not cutouts:
        raise UserError("a group composite needs at least one subject")
    tiles = [subject_cutout(photo, mask) for photo, mask in cutouts]
    canvas = fit_background(background, size, rng)
    layout = group_layout(len(tiles), size, rng)
    masks, boxes = [], []
    for (tile, cut), box in zip(tiles, layout):
        w, h = fit_in_box(*tile.size, box)
        tile, cut = tile.resize((w, h), Image.BICUBIC), cut.resize((w, h), Image.NEAREST)
        x, y = box[0] + rng.randint(0, box[2] - box[0] - w), box[1] + rng.randint(0, box[3] - box[1] - h)
        canvas.paste(tile, (x, y), feathered(cut, feather))
        mask = Image.new("L", (size, size))
        mask.paste(cut, (x, y))
        masks.append(mask)
        boxes.append((x, y, x + w, y + h))
    return canvas, masks, boxes


# ---------------------------------------------------------------------------------------------
# Captions


def name_subjects(namings: list[str]) -> str:
    """"a X", "a X and a Y", "a X, a Y and a Z"."""
    named = [f"a {n}" for n in namings]
    return named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"


def group_caption(tokens: list[str], class_words: list[str] | None, background_prompt: str, rng: random.Random,
                  repeat_tokens: bool = False) -> str:
    """Gen4Gen's training prompt (arXiv 2402.15504, section 3.4): every subject named in the order
    given (pass them left to right) and the background always stated, so the concept tokens do not
    absorb the background: "a photo of a <a> dog and a <b> dog on the grass".

    Args:
        tokens: concept tokens as they appear in prompts, e.g. ["<rex>", "<mochi>"].
        class_words: one per token, written after it ("<rex> dog"), or None for tokens alone. A
            Menagerie token "<name>" already carries its class word (ED-LoRA's V_class, Custom
            Diffusion's second word), so None avoids saying it twice.
        background_prompt: where they are, e.g. "on the grass", "in the garden"; must not be empty.
        rng: picks the frame among GROUP_TEMPLATES.
        repeat_tokens: Gen4Gen's strategy 2, repeat the concept tokens so long prompts do not lose
            a subject. The paper gives no exact form; this appends the named subjects once more
            (", <rex> dog, <mochi> dog").
    """
    if not tokens:
        raise UserError("a group caption needs at least one concept token")
    if class_words is not None and len(class_words) != len(tokens):
        raise UserError(f"{len(class_words)} class words for {len(tokens)} tokens; give one class word per token")
    if not background_prompt.strip():
        raise UserError("the background prompt is empty; Gen4Gen always states the background, e.g. 'on the grass'")
    namings = [f"{t} {c}".strip() for t, c in zip(tokens, class_words)] if class_words is not None else list(tokens)
    prompt = rng.choice(GROUP_TEMPLATES).format(f"{name_subjects(namings)} {background_prompt.strip()}")
    return f"{prompt}, {', '.join(namings)}" if repeat_tokens else prompt


# ---------------------------------------------------------------------------------------------
# Backgrounds


def load_backgrounds(photos: list) -> list[Image.Image]:
    """User background photos (paths or PIL images) as RGB, blurred with radius 1 as Gen4Gen blurs
    its Unsplash backgrounds (arXiv 2402.15504, stage 3), which keeps their detail from competing
    with the subjects'. EXIF orientation is applied; alpha goes onto white."""
    if not photos:
        raise UserError("no background photos given; add JPEG/PNG photos of empty scenes or leave backgrounds out")
    backgrounds = []
    for item in photos:
        label = repr(str(item)) if isinstance(item, (str, os.PathLike)) else f"{len(backgrounds) + 1}"
        try:
            if isinstance(item, (str, os.PathLike)):
                with Image.open(item) as opened:
                    image = ImageOps.exif_transpose(opened)
                    image.load()
            else:
                image = item
                image.load()
            if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            image = image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, AttributeError, Image.DecompressionBombError) as error:
            raise UserError(f"cannot read background {label}: {error}; remove it or replace it with a JPEG or PNG") from None
        backgrounds.append(image.filter(ImageFilter.GaussianBlur(BACKGROUND_BLUR)))
    return backgrounds


def draw_backgrounds(base: BaseModel, prompt: str, count: int, resolution: int, seed: int) -> list[Image.Image]:
    """`count` empty scenes drawn by the base model itself ("a realistic photo of an empty scene
    {prompt}", Gen4Gen's background prompt form; a negative prompt keeps animals out), every
    concept adapter off. Gen4Gen starts from real photos and inpaints; drawing them is our
    departure for users without background photos.

    Args:
        base: a loaded pipelines.base.BaseModel; its LoRA adapters are switched off.
        prompt: the background prompt, e.g. "on the grass".
        count: images, 1 to 64.
        resolution: side in pixels, a multiple of the VAE factor.
        seed: the first batch's seed; batch k uses seed + k.
    """
    if not prompt.strip():
        raise UserError("the background prompt is empty; describe the scene, e.g. 'on the grass'")
    if not 1 <= count <= 64:
        raise UserError(f"background count {count} must be between 1 and 64")
    for model in (base.text_encoder, base.unet):
        set_active_adapters(model, [])  # the base model's own scenes, no concept in them
    images: list[Image.Image] = []
    for batch, start in enumerate(range(0, count, BACKGROUND_BATCH)):
        sample = SampleConfig(prompt=BACKGROUND_SCENE.format(prompt.strip()), negative_prompt=BACKGROUND_NEGATIVE,
                              steps=BACKGROUND_SAMPLE_STEPS, seed=seed + batch, width=resolution, height=resolution,
                              num_images=min(BACKGROUND_BATCH, count - start))
        images.extend(sample_loaded(base, sample))
    return images


def plain_backgrounds(count: int, size: int, rng: random.Random, flat_colours: bool = False) -> list[Image.Image]:
    """`count` plain `size` x `size` backgrounds: black, as MuDI's Seg-Mix (arXiv 2404.04243), or
    with `flat_colours` one random colour each (drawn from `rng`)."""
    if flat_colours:
        return [Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3))) for _ in range(count)]
    return [Image.new("RGB", (size, size)) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# Examples for the trainer and previews for the studio


def check_members(members: list, names: list[str] | None = None) -> None:
    """Each member's photos exist, its masks (if any) are one per photo, photo-sized and not empty.

    Call once before training; `make_group_example` only checks what it draws.
    """
    if not members:
        raise UserError("a joint group needs at least one member")
    for i, (photos, masks) in enumerate(members):
        who = names[i] if names is not None else f"member {i + 1}"
        if not photos:
            raise UserError(f"{who} has no photos; add 1 or more photos of it")
        if masks is None:
            continue
        if len(masks) != len(photos):
            raise UserError(f"{who} has {len(masks)} masks for {len(photos)} photos; give one mask per photo or none")
        for j, (photo, mask) in enumerate(zip(photos, masks)):
            if mask is None:  # a photo without a mask: pasted whole
                continue
            if mask.size != photo.size:
                raise UserError(f"{who}'s mask {j + 1} is {mask.size[0]}x{mask.size[1]}, its photo"
                                f" {photo.size[0]}x{photo.size[1]}; a mask must be the size of its photo")
            if not np.asarray(mask.convert("L")).max() > 127:
                raise UserError(f"{who}'s mask {j + 1} is empty (all black); the subject must be white")


def pick_cutouts(members: list, rng: random.Random) -> list[tuple[Image.Image, Image.Image | None]]:
    """One random (photo, mask or None) of each member."""
    cutouts = []
    for photos, masks in members:
        index = rng.randrange(len(photos))
        cutouts.append((photos[index], masks[index] if masks else None))
    return cutouts


def make_group_example(members: list, backgrounds: list[Image.Image] | None, names: list[str],
                       class_words: list[str] | None, background_prompt: str, size: int, rng: random.Random,
                       repeat_tokens: bool = False):
    """One joint-training example: a random photo of every member composited on a random
    background (`make_group_composite`) and Gen4Gen's caption naming them left to right.

    Args:
        members: one (photos, masks or None) per member, in `names` order.
        backgrounds: images to draw from (`load_backgrounds`, `draw_backgrounds`); None or empty:
            black, as MuDI's Seg-Mix.
        names: concept names; the caption says "<name>".
        class_words: see `group_caption` (None: tokens alone).
        background_prompt: the background's words; "" means PLAIN_BACKGROUND_PROMPT, right for
            plain backgrounds only, so give one with photos or drawn scenes.
        size: canvas side in pixels.
        rng: the only source of randomness.
        repeat_tokens: Gen4Gen's strategy 2 (`group_caption`).
    Returns (canvas, masks, caption), masks in `members` order: masks[i] is where names[i] is.
    The trainer's loss mask is their union (plus any background weight) and masks[i] is the
    attention target of names[i]'s words.
    """
    if len(names) != len(members):
        raise UserError(f"{len(names)} names for {len(members)} members; give one name per member")
    for name, (photos, _) in zip(names, members):
        if not photos:
            raise UserError(f"{name} has no photos; add 1 or more photos of it")
    cutouts = pick_cutouts(members, rng)
    background = rng.choice(backgrounds) if backgrounds else plain_backgrounds(1, size, rng)[0]
    canvas, masks, boxes = make_group_composite(cutouts, background, size, rng)
    order = left_to_right(boxes)
    words = [class_words[i] for i in order] if class_words is not None else None
    prompt = group_caption([f"<{names[i]}>" for i in order], words, background_prompt or PLAIN_BACKGROUND_PROMPT, rng,
                           repeat_tokens)
    return canvas, masks, prompt


def preview_composites(members: list, backgrounds: list[Image.Image] | None, size: int, count: int,
                       seed: int) -> list[Image.Image]:
    """`count` composites as training will make them, to show before training (same seed, same
    pictures). Members are (photos, masks or None); no backgrounds: black."""
    check_members(members)
    if count < 1:
        raise UserError(f"preview count {count} must be 1 or more")
    rng = random.Random(seed)
    previews = []
    for _ in range(count):
        background = rng.choice(backgrounds) if backgrounds else plain_backgrounds(1, size, rng)[0]
        canvas, _, _ = make_group_composite(pick_cutouts(members, rng), background, size, rng)
        previews.append(canvas)
    return previews


def composite_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Images of one size in a grid, `columns` wide (fewer if there are fewer images), row by row."""
    if not images:
        raise UserError("no images to put in a grid")
    if columns < 1:
        raise UserError(f"grid columns {columns} must be 1 or more")
    w, h = images[0].size
    if any(image.size != (w, h) for image in images):
        raise UserError("grid images differ in size; make them all one size")
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % columns) * w, (i // columns) * h))
    return grid
