"""The toy world: procedural scenes of dogs, cats and birds, with captions and pixel labels.

Every animal is a sprite drawn from a few shapes (ellipses, triangles, bars) whose silhouette is
fixed by its class and whose body colour, pattern (plain, spots, stripes), pattern colour, size
and pose vary. Scenes put one to three animals on one of five backgrounds. Each render comes with
its caption and a per-pixel instance map, which is what the oracle scorer trains on.

A few *pets* are specific individuals (class + body colour + pattern + pattern colour). Base
training scenes never contain a pet's exact combination, so the base model cannot draw a pet
from a caption it has seen: only a concept trained on the pet's "photos" can. Each pet also has a
*belly* of its own colour (lower body and legs), a marking no base scene has and no caption word
names: it is out of the base model's domain, like the details of a real pet that words miss.
Mix-of-Show finds that ED-LoRA's embedding holds in-domain looks and its LoRA the out-of-domain
details; the belly is what makes that, and so fusion, measurable here.

Rendering is numpy at 2x the output size, averaged down (anti-aliased edges): about 1 ms a scene.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, replace

import numpy as np

SIZE = 64  # output side in pixels
SUPERSAMPLE = 2

CLASSES = ("dog", "cat", "bird")
COLOURS = {
    "red": (205, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (240, 215, 50),
    "green": (50, 150, 60),
    "blue": (45, 85, 215),
    "purple": (135, 60, 175),
    "pink": (245, 140, 190),
    "brown": (125, 75, 35),
    "grey": (135, 135, 135),
    "black": (25, 25, 25),
    "white": (248, 248, 248),
}
COLOUR_NAMES = tuple(COLOURS)
PATTERNS = ("plain", "spotted", "striped")
BACKGROUNDS = ("grass", "beach", "snow", "water", "night")
# How a caption places the scene on each background.
BACKGROUND_PHRASES = {"grass": "on the grass", "beach": "on the beach", "snow": "in the snow",
                      "water": "in the water", "night": "at night"}


@dataclass(frozen=True)
class Look:
    """What identifies an animal: class, body colour, pattern, pattern colour (and a pet's belly)."""

    cls: str
    colour: str
    pattern: str = "plain"
    pattern_colour: str | None = None  # None for plain
    belly: str | None = None  # pets only: colour of the lower body and legs; no caption word names it

    def phrase(self) -> str:
        """Caption words for this look, e.g. "brown dog with white spots" (the belly has no words)."""
        if self.pattern == "plain":
            return f"{self.colour} {self.cls}"
        marks = "spots" if self.pattern == "spotted" else "stripes"
        return f"{self.colour} {self.cls} with {self.pattern_colour} {marks}"


@dataclass(frozen=True)
class Pet:
    name: str
    look: Look


# The individuals a user would train as concepts. Two dogs and two cats, so fusion and regional
# sampling are tested on same-class pairs too. Base scenes never show these looks, not even
# without the belly (the belly colours are far from each pet's other colours, for the oracle).
PETS = (
    Pet("rex", Look("dog", "brown", "spotted", "white", belly="pink")),
    Pet("bolt", Look("dog", "yellow", "striped", "black", belly="blue")),
    Pet("mimi", Look("cat", "grey", "striped", "orange", belly="green")),
    Pet("luna", Look("cat", "black", "spotted", "yellow", belly="red")),
    Pet("kiwi", Look("bird", "blue", "spotted", "yellow", belly="red")),
)
PET_LOOKS = {pet.look for pet in PETS}
PET_WORD_LOOKS = {replace(pet.look, belly=None) for pet in PETS}  # what words can say of each pet
PETS_BY_NAME = {pet.name: pet for pet in PETS}
# A pet's belly must be at least this far (RGB Euclidean distance) from its body and pattern colours,
# so the oracle can tell it apart. The stock pets' closest pair is mimi's green belly on grey, 114.
BELLY_DISTANCE = 110.0


@dataclass(frozen=True)
class Animal:
    look: Look
    cx: float  # centre, in output pixels
    cy: float
    size: float  # body length in output pixels
    facing: int  # +1 right, -1 left
    pose: tuple  # small shape jitters, see `draw_animal`
    seed: int  # places the spots


@dataclass(frozen=True)
class Scene:
    background: str
    animals: tuple[Animal, ...]
    seed: int


# ---------------------------------------------------------------------------------------------
# Sampling scenes


def random_look(rng: np.random.Generator, cls: str | None = None) -> Look:
    """A random look that is not one of the pets'."""
    while True:
        c = cls or CLASSES[rng.integers(len(CLASSES))]
        colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
        pattern = PATTERNS[rng.integers(len(PATTERNS))]
        pattern_colour = None
        if pattern != "plain":
            pattern_colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
            if pattern_colour == colour:
                continue
        look = Look(c, colour, pattern, pattern_colour)
        if look not in PET_WORD_LOOKS:
            return look


def place_animals(rng: np.random.Generator, looks: list[Look]) -> tuple[Animal, ...]:
    """Animals side by side in horizontal slots (little overlap), random size, height and pose."""
    n = len(looks)
    animals = []
    for i, look in enumerate(looks):
        slot = SIZE / n
        size = rng.uniform(0.55, 0.8) * min(slot, 40) if n > 1 else rng.uniform(22, 36)
        cx = slot * (i + 0.5) + rng.uniform(-0.12, 0.12) * slot
        cy = rng.uniform(0.45, 0.72) * SIZE
        pose = tuple(rng.uniform(-1, 1, size=4))
        animals.append(Animal(look, cx, cy, size, int(rng.choice([-1, 1])), pose, int(rng.integers(2**31))))
    return tuple(animals)


def random_scene(rng: np.random.Generator, max_animals: int = 3) -> Scene:
    weights = np.array([0.4, 0.4, 0.2][:max_animals])
    count = int(rng.choice(np.arange(1, max_animals + 1), p=weights / weights.sum()))
    looks = [random_look(rng) for _ in range(count)]
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    return Scene(background, place_animals(rng, looks), int(rng.integers(2**31)))


def with_random_bellies(scene: Scene, rng: np.random.Generator, probability: float = 0.3) -> Scene:
    """`scene` with some animals given a random belly colour: training scenes for the oracle only.

    The base model never sees a belly; the oracle must read one on any animal, pet or not.
    """
    animals = []
    for animal in scene.animals:
        if rng.random() < probability:
            taken = {animal.look.colour, animal.look.pattern_colour}
            belly = str(rng.choice([c for c in COLOUR_NAMES if c not in taken]))
            animal = replace(animal, look=replace(animal.look, belly=belly))
        animals.append(animal)
    return replace(scene, animals=tuple(animals))


def pet_photo_scene(rng: np.random.Generator, pet: Pet) -> Scene:
    """A "photo" of one pet, as a user would upload: the pet alone, varied pose, size, place, background."""
    animal = place_animals(rng, [pet.look])[0]
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    return Scene(background, (animal,), int(rng.integers(2**31)))


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """The scene's caption; with `rng`, training-time variants that drop some of the words.

    Dropping words teaches the model to fill them in: "a dog" alone must still draw some dog.
    """
    parts = []
    for animal in scene.animals:
        if rng is not None and rng.random() < 0.3:
            parts.append(f"a {animal.look.cls}")
        elif rng is not None and rng.random() < 0.15 and animal.look.pattern != "plain":
            parts.append(f"a {animal.look.colour} {animal.look.cls}")
        else:
            parts.append(f"a {animal.look.phrase()}")
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if rng is None or rng.random() > 0.2:
        text += " " + BACKGROUND_PHRASES[scene.background]
    return text


# ---------------------------------------------------------------------------------------------
# Rendering


class Grid:
    """Sub-pixel centres (in output pixels) of a window of the supersampled canvas.

    Shapes are evaluated only inside the window around one animal: 5-10x faster than the canvas.
    """

    def __init__(self, rows: slice = slice(None), cols: slice = slice(None)):
        coords = (np.arange(SIZE * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE
        self.rows, self.cols = rows, cols
        self.x, self.y = np.meshgrid(coords[cols], coords[rows])


CANVAS = Grid()


def ellipse(g: Grid, cx, cy, rx, ry, angle=0.0) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = g.x - cx, g.y - cy
    u, v = dx * c + dy * s, -dx * s + dy * c
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def triangle(g: Grid, p0, p1, p2) -> np.ndarray:
    def side(a, b):
        return (b[0] - a[0]) * (g.y - a[1]) - (b[1] - a[1]) * (g.x - a[0])
    d0, d1, d2 = side(p0, p1), side(p1, p2), side(p2, p0)
    return ((d0 >= 0) & (d1 >= 0) & (d2 >= 0)) | ((d0 <= 0) & (d1 <= 0) & (d2 <= 0))


def bar(g: Grid, x0, y0, x1, y1, width) -> np.ndarray:
    """A thick segment from (x0, y0) to (x1, y1)."""
    dx, dy = x1 - x0, y1 - y0
    length2 = dx * dx + dy * dy + 1e-6
    t = np.clip(((g.x - x0) * dx + (g.y - y0) * dy) / length2, 0, 1)
    return (g.x - x0 - t * dx) ** 2 + (g.y - y0 - t * dy) ** 2 <= (width / 2) ** 2


def draw_background(name: str, rng: np.random.Generator) -> np.ndarray:
    side = SIZE * SUPERSAMPLE
    img = np.zeros((side, side, 3), np.float32)
    t = (CANVAS.y / SIZE)[..., None]
    if name == "grass":
        img[:] = (1 - t) * np.array([150, 200, 240]) + t * np.array([60, 140, 50])
        img[CANVAS.y > SIZE * 0.35] = np.array([70, 150, 55])
        blades = rng.random((side, side)) < 0.04
        img[blades & (CANVAS.y > SIZE * 0.35)] = np.array([40, 110, 35])
    elif name == "beach":
        img[:] = np.array([120, 185, 235])
        img[CANVAS.y > SIZE * 0.3] = np.array([40, 110, 190])
        img[CANVAS.y > SIZE * 0.45] = np.array([235, 210, 150])
    elif name == "snow":
        img[:] = np.array([200, 215, 235])
        img[CANVAS.y > SIZE * 0.4] = np.array([240, 243, 250])
    elif name == "water":
        img[:] = np.array([30, 90, 170])
        waves = np.sin(CANVAS.y * 1.3 + np.sin(CANVAS.x * 0.4) * 2) > 0.85
        img[waves] = np.array([120, 180, 230])
    elif name == "night":
        img[:] = (1 - t) * np.array([10, 15, 50]) + t * np.array([25, 30, 70])
        stars = rng.random((side, side)) < 0.004
        img[stars] = 255
        img[ellipse(CANVAS, SIZE * 0.82, SIZE * 0.15, 4, 4)] = np.array([240, 235, 200])
    else:
        raise ValueError(f"unknown background {name!r}")
    return img


def animal_shapes(animal: Animal, g: Grid) -> tuple[np.ndarray, list[tuple[np.ndarray, str]]]:
    """The body mask (where the pattern goes) and the extra parts with their colour role.

    Roles: "body" (body colour), "body_leg" (a leg: the belly colour if any, else the body's),
    "dark_body", "eye", "beak". Coordinates are in a frame
    facing right and mirrored by `facing`.
    """
    s, f = animal.size, animal.facing
    p = animal.pose
    cx, cy = animal.cx, animal.cy

    def x(dx):
        return cx + f * dx * s

    def y(dy):
        return cy + dy * s

    parts = []
    cls = animal.look.cls
    if cls == "dog":
        body = ellipse(g, x(0), y(0), 0.5 * s, 0.24 * s * (1 + 0.1 * p[0]))
        head = ellipse(g, x(0.45), y(-0.28 + 0.05 * p[1]), 0.2 * s, 0.19 * s)
        snout = ellipse(g, x(0.65), y(-0.22 + 0.05 * p[1]), 0.12 * s, 0.08 * s)
        ear = ellipse(g, x(0.36), y(-0.22 + 0.05 * p[1]), 0.07 * s, 0.16 * s, angle=f * 0.3)
        legs = [bar(g, x(dx), y(0.1), x(dx + 0.05 * p[2]), y(0.48), 0.1 * s) for dx in (-0.35, -0.2, 0.22, 0.36)]
        tail = bar(g, x(-0.45), y(-0.08), x(-0.68), y(-0.35 + 0.1 * p[3]), 0.08 * s)
        body = body | head | snout
        parts = [(leg, "body_leg") for leg in legs] + [(tail, "body"), (ear, "dark_body"),
                 (ellipse(g, x(0.5), y(-0.33 + 0.05 * p[1]), 0.035 * s, 0.035 * s), "eye"),
                 (ellipse(g, x(0.76), y(-0.24 + 0.05 * p[1]), 0.035 * s, 0.03 * s), "eye")]
    elif cls == "cat":
        body = ellipse(g, x(0), y(0.02), 0.42 * s, 0.2 * s * (1 + 0.1 * p[0]))
        hy = -0.25 + 0.04 * p[1]
        head = ellipse(g, x(0.4), y(hy), 0.18 * s, 0.17 * s)
        ear1 = triangle(g, (x(0.26), y(hy - 0.08)), (x(0.34), y(hy - 0.32)), (x(0.42), y(hy - 0.12)))
        ear2 = triangle(g, (x(0.4), y(hy - 0.12)), (x(0.5), y(hy - 0.34)), (x(0.56), y(hy - 0.06)))
        legs = [bar(g, x(dx), y(0.1), x(dx), y(0.45), 0.07 * s) for dx in (-0.3, -0.18, 0.2, 0.3)]
        tail = bar(g, x(-0.4), y(0.0), x(-0.62 - 0.05 * p[2]), y(-0.5 + 0.1 * p[3]), 0.07 * s)
        body = body | head
        parts = [(leg, "body_leg") for leg in legs] + [(tail, "body"), (ear1, "body"), (ear2, "body"),
                 (ellipse(g, x(0.47), y(hy - 0.03), 0.035 * s, 0.045 * s), "eye"),
                 (triangle(g, (x(0.55), y(hy + 0.03)), (x(0.6), y(hy + 0.03)), (x(0.575), y(hy + 0.07))), "eye")]
    elif cls == "bird":
        body = ellipse(g, x(0), y(0), 0.34 * s, 0.27 * s * (1 + 0.1 * p[0]), angle=f * -0.2)
        hy = -0.3 + 0.04 * p[1]
        head = ellipse(g, x(0.3), y(hy), 0.17 * s, 0.16 * s)
        beak = triangle(g, (x(0.43), y(hy - 0.05)), (x(0.65 + 0.04 * p[2]), y(hy + 0.02)), (x(0.43), y(hy + 0.07)))
        tail = triangle(g, (x(-0.28), y(-0.05)), (x(-0.62), y(-0.25 + 0.1 * p[3])), (x(-0.55), y(0.1)))
        wing = ellipse(g, x(-0.05), y(-0.02), 0.2 * s, 0.11 * s, angle=f * (0.35 + 0.2 * p[3]))
        legs = [bar(g, x(dx), y(0.2), x(dx + 0.03), y(0.5), 0.045 * s) for dx in (-0.06, 0.08)]
        body = body | head
        parts = [(tail, "body"), (beak, "beak"), (wing, "dark_body")] + [(leg, "beak") for leg in legs] + [
            (ellipse(g, x(0.35), y(hy - 0.03), 0.035 * s, 0.035 * s), "eye")]
    else:
        raise ValueError(f"unknown class {cls!r}")
    return body, parts


def pattern_mask(animal: Animal, body: np.ndarray, g: Grid) -> np.ndarray:
    look, s = animal.look, animal.size
    if look.pattern == "plain":
        return np.zeros_like(body)
    if look.pattern == "spotted":
        rng = np.random.default_rng(animal.seed)
        ys, xs = np.nonzero(body)
        xs, ys = g.x[ys, xs], g.y[ys, xs]
        spots = np.zeros_like(body)
        if len(xs) == 0:
            return spots
        for _ in range(int(rng.integers(5, 9))):
            i = rng.integers(len(xs))
            spots |= ellipse(g, xs[i], ys[i], 0.085 * s + 0.6, 0.085 * s + 0.6)
        return spots & body
    period = max(0.22 * s, 3.5)  # stripes: vertical bands across the body, about 5 per animal
    phase = (animal.seed % 100) / 100 * period
    return (((g.x - animal.cx + phase) % period) < period * 0.45) & body


def animal_window(animal: Animal) -> Grid:
    """The part of the canvas an animal can cover (its shapes stay within 0.8 body lengths)."""
    k, reach = SUPERSAMPLE, 0.8 * animal.size
    def span(centre):
        return slice(max(0, int((centre - reach) * k)), min(SIZE * k, int((centre + reach) * k) + 1))
    return Grid(span(animal.cy), span(animal.cx))


def _colour(name: str) -> np.ndarray:
    return np.array(COLOURS[name], np.float32)


def draw_animal(img: np.ndarray, instance: np.ndarray, animal: Animal, index: int) -> None:
    """Paint `animal` into the supersampled image and its instance id (1-based) into `instance`."""
    g = animal_window(animal)
    img, instance = img[g.rows, g.cols], instance[g.rows, g.cols]  # views: painting them paints the canvas
    body, parts = animal_shapes(animal, g)
    body_colour = _colour(animal.look.colour)
    dark = body_colour * 0.7
    eye = np.array([250, 250, 250] if animal.look.colour == "black" else [15, 15, 15], np.float32)
    beak = np.array([230, 150, 20] if animal.look.colour not in ("orange", "yellow") else [150, 80, 20], np.float32)
    colour_of = {"body": body_colour, "dark_body": dark, "eye": eye, "beak": beak}
    belly = np.zeros_like(body)
    if animal.look.belly is not None:  # a pet's marking: lower body and legs, pattern on the back only
        colour_of["body_leg"] = _colour(animal.look.belly)
        belly = body & (g.y > animal.cy + 0.04 * animal.size)
    for mask, role in parts:
        if role != "eye":  # parts behind and beside the body
            img[mask] = colour_of.get(role, body_colour)
            instance[mask] = index
    img[body] = body_colour
    instance[body] = index
    if animal.look.pattern != "plain":
        img[pattern_mask(animal, body, g) & ~belly] = _colour(animal.look.pattern_colour)
    if belly.any():
        img[belly] = colour_of["body_leg"]
    for mask, role in parts:
        if role in ("eye", "dark_body"):
            img[mask] = colour_of[role]
            instance[mask] = index


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """The scene as uint8 `[SIZE, SIZE, 3]` and its instance map uint8 `[SIZE, SIZE]` (0 = background).

    An output pixel belongs to the instance covering most of its sub-pixels.
    """
    rng = np.random.default_rng(scene.seed)
    img = draw_background(scene.background, rng)
    instance = np.zeros(img.shape[:2], np.uint8)
    for index, animal in enumerate(scene.animals, start=1):
        draw_animal(img, instance, animal, index)
    k = SUPERSAMPLE
    small = img.reshape(SIZE, k, SIZE, k, 3).mean(axis=(1, 3))
    votes = np.stack([(instance == i).reshape(SIZE, k, SIZE, k).sum(axis=(1, 3)) for i in range(len(scene.animals) + 1)])
    return np.clip(small + 0.5, 0, 255).astype(np.uint8), votes.argmax(0).astype(np.uint8)


def render_many(scenes: list[Scene]) -> tuple[np.ndarray, np.ndarray]:
    images, instances = zip(*(render(scene) for scene in scenes))
    return np.stack(images), np.stack(instances)


def pet_stream(pet: Pet) -> int:
    """The number that, with the photo seed, seeds `pet`'s photos.

    A stock pet keeps its index in PETS (so its photos, and the concepts trained on them, stay what
    they were); any other pet gets a stable hash of its name and look (sha256 of the repr, never
    Python's salted `hash()`), offset past the stock indices.
    """
    if pet in PETS:
        return PETS.index(pet)
    digest = hashlib.sha256(repr((pet.name, pet.look)).encode()).digest()
    return len(PETS) + int.from_bytes(digest[:8], "little")


def pet_photos_with_masks(pet: Pet | str, count: int = 8, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`pet_photos` and, per photo, the pet's pixels (bool `[SIZE, SIZE]`, from the instance map)."""
    pet = PETS_BY_NAME[pet] if isinstance(pet, str) else pet
    rng = np.random.default_rng([seed, pet_stream(pet)])
    renders = [render(pet_photo_scene(rng, pet)) for _ in range(count)]
    return [image for image, _ in renders], [instance == 1 for _, instance in renders]


def pet_photos(pet: Pet | str, count: int = 8, seed: int = 0) -> list[np.ndarray]:
    """What a user uploads for `pet` (a stock pet's name or any `Pet`): `count` renders of it alone,
    varied pose, size and background. The same pet, count and seed give the same photos."""
    return pet_photos_with_masks(pet, count, seed)[0]


# ---------------------------------------------------------------------------------------------
# Random pets: more individuals than the five stock ones, for evaluating methods on many pets


def colour_distance(a: str, b: str) -> float:
    return float(np.linalg.norm(np.subtract(COLOURS[a], COLOURS[b], dtype=np.float64)))


def belly_choices(look: Look) -> list[str]:
    """Belly colours the oracle can tell from `look`'s body and pattern colours (>= BELLY_DISTANCE away)."""
    others = [c for c in (look.colour, look.pattern_colour) if c is not None]
    return [c for c in COLOUR_NAMES if all(c != o and colour_distance(c, o) >= BELLY_DISTANCE for o in others)]


def random_pet(rng: np.random.Generator, cls: str | None = None, name: str | None = None) -> Pet:
    """A new pet: a look drawn like `random_look`, plus a belly far from its body and pattern colours.

    The name (unless given) is "p" and four hex digits, e.g. "p3f2a": a valid concept name
    (pipelines/concept.py `check_name`) and never a world word or a stock pet's name.

    What is in domain: the base model trained on scenes whose looks come from `random_look`, so it
    has seen looks like this one (every word look except the five stock pets'). For a random pet
    only the belly is out of domain; for a stock pet, the word look is unseen too. So a random pet
    tests what the LoRA must carry (the belly) but not whether the embedding learns an unseen word look.
    """
    while True:
        look = random_look(rng, cls)
        choices = belly_choices(look)
        if choices:
            break
    look = replace(look, belly=choices[int(rng.integers(len(choices)))])
    if name is None:
        name = f"p{int(rng.integers(16 ** 4)):04x}"
    return Pet(name, look)


def random_pets(seed: int, count: int = 8, classes: tuple[str, ...] | None = None) -> tuple[Pet, ...]:
    """`count` distinct random pets, the same for the same arguments.

    Classes cycle through `classes` (default all three: dog, cat, bird, dog, ...), so with
    count >= 2 * len(classes) every class has at least two pets, for same-class pairs (count=8: three
    dogs, three cats, two birds). Names, word looks (look without belly) and looks are all distinct.
    """
    classes = tuple(classes or CLASSES)
    rng = np.random.default_rng([0x70E7, seed])
    pets: list[Pet] = []
    while len(pets) < count:
        pet = random_pet(rng, classes[len(pets) % len(classes)])
        word_looks = {replace(p.look, belly=None) for p in pets}
        if pet.name not in {p.name for p in pets} and replace(pet.look, belly=None) not in word_looks:
            pets.append(pet)
    return tuple(pets)


def group_kind(group) -> str:
    """"same" (every pet of one class), "mixed" (every class different), or "partly" (some share a class)."""
    classes = [pet.look.cls for pet in group]
    distinct = len(set(classes))
    return "same" if distinct == 1 else "mixed" if distinct == len(classes) else "partly"


def pet_groups(pets, size: int = 2, per_kind: int | None = None) -> dict[str, list[tuple[Pet, ...]]]:
    """Groups of `size` pets for multi-pet evaluation, by `group_kind`: "same", "mixed", "partly".

    Same-class groups (e.g. two dogs) are the hard case: class words cannot tell the pets apart, only
    their looks. Every combination is listed, in `itertools.combinations` order; with `per_kind`, at
    most that many of each kind, picked greedily so the pets appear as evenly as possible (each
    next group is the first whose pets have been used least). Kinds with no group are absent.
    """
    groups: dict[str, list[tuple[Pet, ...]]] = {}
    for group in itertools.combinations(tuple(pets), size):
        groups.setdefault(group_kind(group), []).append(group)
    if per_kind is None:
        return groups
    picked = {}
    for kind, candidates in groups.items():
        uses = {pet: 0 for pet in pets}
        chosen: list[tuple[Pet, ...]] = []
        while candidates and len(chosen) < per_kind:
            best = min(candidates, key=lambda g: (sorted((uses[p] for p in g), reverse=True), candidates.index(g)))
            chosen.append(best)
            candidates = [g for g in candidates if g != best]
            for pet in best:
                uses[pet] += 1
        picked[kind] = chosen
    return picked


def pet_pairs(pets, per_kind: int | None = None) -> dict[str, list[tuple[Pet, Pet]]]:
    """Pairs of pets by kind: "same" (same class) and "mixed"; see `pet_groups`."""
    return pet_groups(pets, 2, per_kind)


def vocabulary() -> list[str]:
    """Every word a caption or an evaluation prompt of this world uses."""
    words = {"a", "and", "with", "spots", "stripes", "photo", "of", "the", "on", "in", "at", ","}
    words |= set(CLASSES) | set(COLOUR_NAMES) | set(PATTERNS) | set(BACKGROUNDS)
    for phrase in BACKGROUND_PHRASES.values():
        words |= set(phrase.split())
    return sorted(words)
