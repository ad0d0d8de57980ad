"""The oracle: says which class and which pet appears where in a toy-world image.

A small fully-convolutional network labels every pixel as background or animal, and with the look
of the animal it belongs to (body colour, pattern, pattern colour). It is trained on rendered
scenes, half of them passed through the toy VAE so that it also reads the softer images the
diffusion model makes. An animal is a connected blob of animal pixels; its look is the vote of
its pixels, and its class is read from its whole silhouette by `shape.ShapeNet` (a pixel of body
looks the same on a dog and a cat). A fifth head reads a belly marking (a pet's out-of-domain
trait; the oracle trains on scenes where random animals have one). A pet is identified when class,
colour, pattern, pattern colour and belly all match its look.

Metrics built on it (`score_*`): presence, class accuracy, identity accuracy per pet, and
bleeding (an animal that mixes the looks of two expected pets).
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

    def describe(self, images, boxes: list | None = None) -> list[list[Found]]:
        """Per image, the animals seen: connected blobs of non-background pixels.

        With `boxes` (per image, a list of (x0, y0, x1, y1)), the pixels of each box instead: one
        `Found` per box (or None when the box holds fewer than MIN_PIXELS animal pixels).
        """
        probs = self.probabilities(images)
        arrays = [np.asarray(image.convert("RGB") if hasattr(image, "convert") else image) for image in images]
        results = []
        for b in range(len(probs["class"])):
            p = {name: value[b] for name, value in probs.items()}
            foreground = p["class"].argmax(0) > 0
            if boxes is None:
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


def look_traits(look: Look) -> set:
    """A look as (attribute, value) traits; pattern and pattern colour count as one."""
    traits = {("cls", look.cls), ("colour", look.colour), ("pattern", (look.pattern, look.pattern_colour))}
    return traits | ({("belly", look.belly)} if look.belly else set())


def own_traits(looks: list[Look]) -> list[set]:
    """Per look, the traits that no other of `looks` has."""
    return [look_traits(look) - set().union(*(look_traits(o) for j, o in enumerate(looks) if j != i))
            for i, look in enumerate(looks)]


def score_image(found: list[Found], expected: list[Look]) -> ImageScore:
    """Image-level score against expected looks: is each look there, anywhere in the image."""
    looks = [f.look for f in found]
    present = [any(l.cls == e.cls for l in looks) for e in expected]
    identified = [any(l == e for l in looks) for e in expected]
    match = [max((attribute_match(l, e) for l in looks), default=0.0) for e in expected]
    bleeding = any(is_hybrid(l, expected) for l in looks) if len(expected) > 1 else False
    marked = [any(l.cls == e.cls and l.belly == e.belly for l in looks) for e in expected if e.belly is not None]
    return ImageScore(present, identified, bleeding, match, marked)


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
    return ImageScore(present, identified, bleeding, match, marked, placed)
