"""The oracle: says which class and which pet appears where in a toy-world image.

A small fully-convolutional network labels every pixel as background or animal, and with the look
of the animal it belongs to (body colour, pattern, pattern colour). It is trained on rendered
scenes, half of them passed through the toy VAE so that it also reads the softer images the
diffusion model makes. An animal is a connected blob of animal pixels, split where it is two
touching animals (`split_touching`); its look is the vote of its pixels, and its class is read
from its whole silhouette by `shape.ShapeNet` (a pixel of body looks the same on a dog and a cat).
A fifth head reads a belly marking (a pet's out-of-domain trait; the oracle trains on scenes where
random animals have one). A pet is identified when class, colour, pattern, pattern colour and
belly all match its look.

Metrics built on it (`score_*`): presence, class accuracy, identity accuracy per pet, bleeding
(an animal that mixes the looks of two expected pets), lost pets, and in box mode the layout
(`score_layout`: one animal per box, none spanning two, no swapped pets).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from bench.toyworld.shape import ShapeNet, crop_animal
from bench.toyworld.world import CLASSES, COLOUR_NAMES, PATTERNS, PETS, Look, Scene

IGNORE = -1
HEADS = {"class": 1 + len(CLASSES), "colour": len(COLOUR_NAMES), "pattern": len(PATTERNS), "pattern_colour": len(COLOUR_NAMES),
         "belly": 1 + len(COLOUR_NAMES)}  # belly 0: none
MIN_PIXELS = 12  # smaller blobs are speckle, not an animal
# `split_touching`: erosion steps, pixels of a core that counts, core spacing (x sqrt(blob pixels))
SPLIT_ERODE, SPLIT_MIN_CORE, SPLIT_APART = 2, 16, 0.9
SPAN_SHARE = 0.2  # an animal spans two boxes when at least this share of its pixels is in each
BELLY_FROM = 0.6  # a belly is read below this share of the blob's height


def label_maps(scene: Scene, instance: np.ndarray) -> np.ndarray:
    """Per-pixel targets `[5, H, W]` (class, colour, pattern, pattern colour, belly); IGNORE where undefined."""
    labels = np.full((len(HEADS),) + instance.shape, IGNORE, np.int64)
    labels[0] = 0
    for index, animal in enumerate(scene.animals, start=1):
        where = instance == index
        look = animal.look
        labels[0][where] = 1 + CLASSES.index(look.cls)
        labels[1][where] = COLOUR_NAMES.index(look.colour)
        labels[2][where] = PATTERNS.index(look.pattern)
        if look.pattern_colour is not None:
            labels[3][where] = COLOUR_NAMES.index(look.pattern_colour)
        labels[4][where] = 0 if look.belly is None else 1 + COLOUR_NAMES.index(look.belly)
    return labels


def _block(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation), nn.GroupNorm(8, cout), nn.SiLU())


class OracleNet(nn.Module):
    """A small U-Net: 64 -> 32 -> 16 (dilated, for an animal-sized view) -> back to 64."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(_block(3, w), _block(w, w))
        self.enc2 = nn.Sequential(nn.MaxPool2d(2), _block(w, 2 * w), _block(2 * w, 2 * w))
        self.enc3 = nn.Sequential(nn.MaxPool2d(2), _block(2 * w, 3 * w), _block(3 * w, 3 * w, 2), _block(3 * w, 3 * w, 4))
        self.up2 = nn.Sequential(_block(3 * w + 2 * w, 2 * w), _block(2 * w, 2 * w))
        self.up1 = nn.Sequential(_block(2 * w + w, w), _block(w, w))
        self.head = nn.Conv2d(w, sum(HEADS.values()), 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images in [-1, 1], `[B, 3, H, W]` -> logits per head, `[B, C_head, H, W]`."""
        e1 = self.enc1(images)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.up2(torch.cat([nn.functional.interpolate(e3, scale_factor=2.0), e2], 1))
        d1 = self.up1(torch.cat([nn.functional.interpolate(d2, scale_factor=2.0), e1], 1))
        return dict(zip(HEADS, self.head(d1).split(list(HEADS.values()), dim=1)))


def oracle_loss(logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every head on its defined pixels; labels `[B, 5, H, W]`."""
    losses = [nn.functional.cross_entropy(logits[name].float(), labels[:, i], ignore_index=IGNORE)
              for i, name in enumerate(HEADS)]
    return sum(losses)


# ---------------------------------------------------------------------------------------------
# Reading images


@dataclass
class Found:
    """One animal the oracle sees."""

    look: Look
    pixels: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    mask: np.ndarray  # bool [H, W]
    confidence: float  # mean probability of "animal" over its pixels

    @property
    def pet(self) -> str | None:
        """The pet it is, if its look is exactly one pet's."""
        return next((pet.name for pet in PETS if pet.look == self.look), None)


def to_tensor(images) -> torch.Tensor:
    """PIL images / uint8 arrays `[H, W, 3]` -> float `[B, 3, H, W]` in [-1, 1]."""
    arrays = [np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


class Oracle:
    def __init__(self, net: OracleNet, shape_net: ShapeNet):
        self.net = net.eval()
        self.shape_net = shape_net.eval()

    @classmethod
    def load(cls, path, shape_path) -> "Oracle":
        net, shape_net = OracleNet(), ShapeNet()
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        shape_net.load_state_dict(torch.load(shape_path, map_location="cpu", weights_only=True))
        return cls(net.float(), shape_net.float())

    @torch.no_grad()
    def classify(self, image: np.ndarray, masks: list[np.ndarray]) -> list[str]:
        """The class of each animal (bool mask) in `image` (uint8 `[H, W, 3]`), from its silhouette."""
        if not masks:
            return []
        crops = torch.from_numpy(np.stack([crop_animal(image, mask) for mask in masks]))
        return [CLASSES[i] for i in self.shape_net(crops).argmax(1).tolist()]

    @torch.no_grad()
    def probabilities(self, images) -> dict[str, np.ndarray]:
        logits = self.net(to_tensor(images))
        return {name: value.softmax(1).numpy() for name, value in logits.items()}

    def describe(self, images, boxes: list | None = None, split: bool = True) -> list[list[Found]]:
        """Per image, the animals seen: connected blobs of non-background pixels, each split into
        the animals it holds when two touch (`split_touching`; `split=False`: plain blobs, as before).

        With `boxes` (per image, a list of (x0, y0, x1, y1)), the pixels of each box instead: one
        `Found` per box (or None when the box holds fewer than MIN_PIXELS animal pixels).
        """
        probs = self.probabilities(images)
        arrays = [np.asarray(image.convert("RGB") if hasattr(image, "convert") else image) for image in images]
        results = []
        for b in range(len(probs["class"])):
            p = {name: value[b] for name, value in probs.items()}
            foreground = p["class"].argmax(0) > 0
            if boxes is None and split:
                regions = split_touching(foreground)
            elif boxes is None:
                blobs, count = ndimage.label(foreground)
                regions = [blobs == i for i in range(1, count + 1)]
            else:
                regions = []
                for x0, y0, x1, y1 in boxes[b]:
                    inside = np.zeros_like(foreground)
                    inside[int(y0):int(y1), int(x0):int(x1)] = True
                    regions.append(inside & foreground)
            regions = [r if r.sum() >= MIN_PIXELS else None for r in regions]
            classes = iter(self.classify(arrays[b], [r for r in regions if r is not None]))
            found = [None if r is None else _read_region(p, r, next(classes)) for r in regions]
            results.append(found if boxes is not None else [f for f in found if f is not None])
        return results


def split_touching(foreground: np.ndarray, erode: int = SPLIT_ERODE, min_core: int = SPLIT_MIN_CORE,
                   apart: float = SPLIT_APART) -> list[np.ndarray]:
    """The animals in a foreground mask (bool `[H, W]`): its connected blobs, each split where it is
    two or more touching animals. Returns bool masks, blob by blob (a split blob's parts largest core first).

    A blob's cores are what is left after `erode` steps of binary erosion, as connected parts of at
    least `min_core` pixels: two animals touching by a paw, a nose or a tail become two cores. A
    blob with two or more cores is split: each of its pixels goes to the nearest core
    (`distance_transform_edt`).

    One guard keeps one animal whole: a cat's head, joined to its body by a thin neck, erodes into a
    core of its own, and so does a half body where the oracle reads stripes as background. So a
    core counts only if its centroid is at least `apart * sqrt(blob pixels)` from every larger
    counted core. On oracle readings of renders, two cores of one animal sit 0.5-0.96 such units
    apart (95% below 0.88), the bodies of two touching animals 0.96-1.47 (95% above 1.0); results
    are the same for `apart` 0.85-0.95. `apart=0` turns the guard off (every core counts). Two
    round blobs of one size that touch sit about 0.9 apart: the guard may keep them as one.

    Measured on oracle readings of 1500 renders (600 two-animal scenes, 600 pet photos, 300 random
    scenes), counting animal pairs merged in one part and animals cut in two parts of >= 20% each:
    plain blobs merge 38 and cut 37 (the oracle reads some stripes and eyes as background); the
    split without the guard merges 4 and cuts 104 (heads); with it, 4 and 40.
    """
    blobs, count = ndimage.label(foreground)
    masks = []
    for index in range(1, count + 1):
        blob = blobs == index
        cores, n = ndimage.label(ndimage.binary_erosion(blob, iterations=erode))
        sizes = np.bincount(cores.ravel(), minlength=n + 1)
        spacing = apart * np.sqrt(blob.sum())
        kept: list[int] = []
        centres: dict[int, np.ndarray] = {}
        for core in sorted(range(1, n + 1), key=lambda k: -sizes[k]):
            if sizes[core] < min_core:
                break
            ys, xs = np.nonzero(cores == core)
            centres[core] = np.array([ys.mean(), xs.mean()])
            if all(np.linalg.norm(centres[core] - centres[k]) >= spacing for k in kept):
                kept.append(core)
        if len(kept) < 2:
            masks.append(blob)
            continue
        cores = np.where(np.isin(cores, kept), cores, 0)
        _, (iy, ix) = ndimage.distance_transform_edt(cores == 0, return_indices=True)
        nearest = cores[iy, ix]
        masks += [blob & (nearest == core) for core in kept]
    return masks


def _read_region(p: dict[str, np.ndarray], region: np.ndarray, cls: str) -> Found:
    pixels = int(region.sum())
    votes = {name: value[:, region].sum(1) for name, value in p.items()}
    pattern = PATTERNS[int(votes["pattern"].argmax())]
    colour = COLOUR_NAMES[int(votes["colour"].argmax())]
    pattern_colour = None
    if pattern != "plain":
        ranked = np.argsort(-votes["pattern_colour"])
        pattern_colour = COLOUR_NAMES[int(ranked[0] if COLOUR_NAMES[int(ranked[0])] != colour else ranked[1])]
    rows = np.nonzero(region)[0]
    lower = region.copy()  # a belly is read where it is: the lower body and legs
    lower[: int(np.ceil(rows.min() + BELLY_FROM * (rows.max() - rows.min())))] = False
    belly_vote = int(p["belly"][:, lower if lower.any() else region].sum(1).argmax())
    belly = None if belly_vote == 0 else COLOUR_NAMES[belly_vote - 1]
    ys, xs = np.nonzero(region)
    confidence = float(p["class"][1:, region].sum(0).mean())
    return Found(Look(cls, colour, pattern, pattern_colour, belly), pixels, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), region, confidence)


# ---------------------------------------------------------------------------------------------
# Metrics


def attribute_match(found: Look, expected: Look) -> float:
    """Share of the look's attributes that match: class, colour, pattern, pattern colour, and belly for a pet."""
    same = [found.cls == expected.cls, found.colour == expected.colour,
            found.pattern == expected.pattern, found.pattern_colour == expected.pattern_colour]
    if expected.belly is not None:
        same.append(found.belly == expected.belly)
    return float(np.mean(same))


def is_hybrid(found: Look, looks: list[Look]) -> bool:
    """True if `found` carries a trait that only pet A has and another trait that only pet B has.

    A trait is (attribute, value); "only A has" means no other expected look shares that value.
    That is bleeding: e.g. rex's body colour on bolt's stripes, or a dog shape in a cat's colours.
    """
    found_traits = look_traits(found)
    return sum(bool(own & found_traits) for own in own_traits(looks)) >= 2


@dataclass
class ImageScore:
    present: list[bool]  # per expected look: an animal of its class is there
    identified: list[bool]  # per expected look: an animal with exactly that look is there
    bleeding: bool  # some animal mixes two expected looks
    match: list[float]  # per expected look: best `attribute_match` of an animal there (0 if none)
    marked: list[bool]  # per expected pet look: an animal of its class with its belly is there
    placed: list[bool] = None  # boxes only, per box i: it shows more of pet i's own traits than of another's
    # Per expected look: no animal (in box mode: the box's animal) is of its class and shows one of its
    # own traits other than class (`is_lost`). `bleeding` looks only at animals that exist, so it
    # reads 0 when both pets are gone; `failed` does not.
    lost: list[bool] = None
    failed: bool = None  # bleeding or some expected look lost: the multi-pet failure rate counts both


def look_traits(look: Look) -> set:
    """A look as (attribute, value) traits; pattern and pattern colour count as one."""
    traits = {("cls", look.cls), ("colour", look.colour), ("pattern", (look.pattern, look.pattern_colour))}
    return traits | ({("belly", look.belly)} if look.belly else set())


def own_traits(looks: list[Look]) -> list[set]:
    """Per look, the traits that no other of `looks` has."""
    return [look_traits(look) - set().union(*(look_traits(o) for j, o in enumerate(looks) if j != i))
            for i, look in enumerate(looks)]


def is_lost(looks: list[Look], expected: list[Look], i: int) -> bool:
    """Expected look i is lost among `looks` (the animals seen): none is of its class and shows at
    least one trait of its own (`own_traits`) other than class. A look with no own trait besides
    class (another expected look has all its traits) is lost only when no animal is of its class."""
    own = {t for t in own_traits(expected)[i] if t[0] != "cls"}
    return not any(l.cls == expected[i].cls and (not own or own & look_traits(l)) for l in looks)


def score_image(found: list[Found], expected: list[Look]) -> ImageScore:
    """Image-level score against expected looks: is each look there, anywhere in the image."""
    looks = [f.look for f in found]
    present = [any(l.cls == e.cls for l in looks) for e in expected]
    identified = [any(l == e for l in looks) for e in expected]
    match = [max((attribute_match(l, e) for l in looks), default=0.0) for e in expected]
    bleeding = any(is_hybrid(l, expected) for l in looks) if len(expected) > 1 else False
    marked = [any(l.cls == e.cls and l.belly == e.belly for l in looks) for e in expected if e.belly is not None]
    lost = [is_lost(looks, expected, i) for i in range(len(expected))]
    return ImageScore(present, identified, bleeding, match, marked, lost=lost, failed=bleeding or any(lost))


def score_boxes(found: list[Found | None], expected: list[Look]) -> ImageScore:
    """Box-level score: the animal read in box i must be look i (`found` from `describe(boxes=...)`)."""
    present = [f is not None and f.look.cls == e.cls for f, e in zip(found, expected)]
    identified = [f is not None and f.look == e for f, e in zip(found, expected)]
    bleeding = any(f is not None and (is_hybrid(f.look, expected) or (f.look != e and f.look in expected))
                   for f, e in zip(found, expected))
    match = [attribute_match(f.look, e) if f is not None else 0.0 for f, e in zip(found, expected)]
    marked = [f is not None and f.look.cls == e.cls and f.look.belly == e.belly for f, e in zip(found, expected) if e.belly is not None]
    own = own_traits(expected)
    placed = []
    for i, f in enumerate(found):
        counts = [len(look_traits(f.look) & traits) for traits in own] if f is not None else [0] * len(own)
        placed.append(len(expected) > 1 and counts[i] > max(c for j, c in enumerate(counts) if j != i))
    lost = [f is None or is_lost([f.look], expected, i) for i, f in enumerate(found)]
    return ImageScore(present, identified, bleeding, match, marked, placed, lost, bleeding or any(lost))


# ---------------------------------------------------------------------------------------------
# Layout (box mode, read from the animals `describe` finds, not from the boxes' pixels)


@dataclass
class LayoutScore:
    """How the animals of one image sit in the expected boxes (`score_layout`).

    An animal is IN box i when its centroid (mean pixel coordinate + 0.5) lies in the box. The
    box's animal is the one in it that best matches the box's look (ties: the larger).
    """

    count: list[int]  # per box: animals in it
    match: list[float]  # per box: attribute_match of its animal against the box's look (0 if none)
    belly: list[bool | None]  # per box: an animal in it of the look's class with the look's belly (None: look has no belly)
    swap: list[bool]  # per box: its animal matches another box's look better than its own (attribute_match to j > to i)
    placed: list[bool]  # per box: its animal shows more of the box's pet's own traits than of any other's
    lost: list[bool]  # per box: no animal in it is of the look's class with a trait of its own (`is_lost`)
    separate: bool  # every box holds exactly one animal, of its look's class, and no animal spans two boxes
    merged: bool  # some animal spans two boxes (>= SPAN_SHARE of its pixels in each)


def _in_box(x: float, y: float, box) -> bool:
    x0, y0, x1, y1 = box
    return x0 <= x < x1 and y0 <= y < y1


def _box_mask(shape, box) -> np.ndarray:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    inside = np.zeros(shape, bool)
    inside[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
    return inside


def score_layout(found: list[Found], boxes, looks: list[Look]) -> LayoutScore:
    """Score one image's animals (`describe(images)[k]`, blob mode) against one box per expected look.

    `boxes` are pixel boxes (x0, y0, x1, y1), exclusive ends, box i for `looks[i]`.
    - swap uses attribute_match: box i's animal is swapped when some other box's look j matches it
      better than look i. (`placed` is the own-traits reading of the same question, as `score_boxes`
      asks it, but of the box's animal rather than of all the box's pixels: the two agree when the
      box holds its one animal whole.) attribute_match counts 5 attributes for a look with a belly
      and 4 without; give every box a pet look (a belly) or none, or the shares are not comparable.
    - separate needs every box to hold exactly one animal, of its look's class, and no animal to
      span two boxes; merged is an animal spanning two boxes (what plain blobs give two touching
      animals, or what a model draws as one body across both boxes).
    """
    boxes = [tuple(b) for b in boxes]
    own = own_traits(looks)
    inside: list[list[Found]] = [[] for _ in boxes]
    merged = False
    for f in found:
        ys, xs = np.nonzero(f.mask)
        cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
        shares = []
        for i, box in enumerate(boxes):
            if _in_box(cx, cy, box):
                inside[i].append(f)
            shares.append((f.mask & _box_mask(f.mask.shape, box)).sum() / max(1, f.mask.sum()))
        merged |= sum(share >= SPAN_SHARE for share in shares) >= 2
    count, match, belly, swap, placed, lost = [], [], [], [], [], []
    for i, (animals, look) in enumerate(zip(inside, looks)):
        count.append(len(animals))
        best = max(animals, key=lambda f: (attribute_match(f.look, look), f.pixels), default=None)
        match.append(attribute_match(best.look, look) if best is not None else 0.0)
        belly.append(None if look.belly is None else any(f.look.cls == look.cls and f.look.belly == look.belly for f in animals))
        others = [attribute_match(best.look, o) for j, o in enumerate(looks) if j != i] if best is not None else []
        swap.append(bool(others) and max(others) > match[-1])
        traits = [len(look_traits(best.look) & t) for t in own] if best is not None else [0] * len(own)
        placed.append(len(looks) > 1 and best is not None and traits[i] > max(c for j, c in enumerate(traits) if j != i))
        lost.append(is_lost([f.look for f in animals], looks, i))
    separate = not merged and all(len(a) == 1 and a[0].look.cls == look.cls for a, look in zip(inside, looks))
    return LayoutScore(count, match, belly, swap, placed, lost, separate, merged)


@dataclass
class LayoutRates:
    """Means of `LayoutScore`s: image-level flags over images, per-box values over boxes and images."""

    separate: float  # share of images
    merged: float  # share of images
    count: float  # mean animals per box
    one: float  # share of boxes holding exactly one animal
    match: float
    belly: float  # over boxes whose look has a belly (nan if none)
    swap: float
    placed: float
    lost: float
    images: int

    def as_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def layout_rates(scores: list[LayoutScore]) -> LayoutRates:
    def boxes(name):
        values = [v for s in scores for v in getattr(s, name) if v is not None]
        return float(np.mean(values)) if values else float("nan")

    return LayoutRates(float(np.mean([s.separate for s in scores])), float(np.mean([s.merged for s in scores])),
                       boxes("count"), float(np.mean([c == 1 for s in scores for c in s.count])), boxes("match"),
                       boxes("belly"), boxes("swap"), boxes("placed"), boxes("lost"), len(scores))
