"""The offline demo: the studio on the toy world (docs/toyworld.md).

    python app.py --demo

The toy world is a small real text-to-image model of SD1.5's architecture (`assets/toyworld/model`,
8 M parameters, 64 px) trained on a made-up world of simple dogs, cats and birds, with five stock
pets trained as ED-LoRA concepts and an oracle network that reads its pictures. It needs no
download and no GPU, so it shows the method working where real weights cannot be had: a pet trains
in minutes on a CPU, and Regional and Isolated sampling put two pets in their boxes.

This module prepares everything the studio takes from the toy world:
- a writable demo library holding the stock pets (copied from `assets/toyworld/pets`, which is
  never written to);
- the stock pets' photos as PNGs, the training form's ready-made examples;
- the toy training recipe and sampling settings, the forms' defaults;
- the oracle as the detector of Isolated mode and as the subject masker of the training form's
  auto-mask (what Grounding DINO + SAM do on real photos).

The toy world's code lives in `bench/toyworld/` (imported when first needed).
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .detect import Detection
from .errors import UserError

ROOT = Path(__file__).resolve().parent.parent
TOY_MODEL = ROOT / "assets" / "toyworld" / "model"
STOCK_PETS = ROOT / "assets" / "toyworld" / "pets"
DOCS = ROOT / "docs" / "toyworld.md"
DOCS_URL = "https://huggingface.co/spaces/{space}/blob/main/docs/toyworld.md"
SIZE = 64  # the toy model's native image side, in pixels
PROMPT = "a dog and a cat on the grass"  # a prompt in the world's own words (its text encoder knows no others)


@dataclass
class Demo:
    """The toy world as the studio uses it: folders, form defaults, and the oracle as detector.

    Built by `prepare_demo`. `detector` loads the oracle on first use (a second).
    """

    library: Path  # the demo concept library (the stock pets, and what the user trains)
    outputs: Path  # where generated images are saved
    examples: list[list]  # the training form's examples: per stock pet, [photo paths, name, class word]
    base: str = str(TOY_MODEL)
    size: int = SIZE
    # the training form's defaults: the toy recipe (bench/toyworld/evaluate.py), minutes on a CPU
    training: dict = field(default_factory=dict)
    # the Generate form's defaults: the toy world's sampling (20 steps, guidance 5) and no negative
    # prompt, since the toy text encoder never saw the product's default one (photo-quality words)
    sampling: dict = field(default_factory=dict)
    _oracle: object | None = field(default=None, repr=False)

    def oracle(self):
        """The toy world's oracle (bench/toyworld/oracle.py), loaded once."""
        if self._oracle is None:
            from bench.toyworld.evaluate import ORACLE_PATH, SHAPE_PATH
            from bench.toyworld.oracle import Oracle

            self._oracle = Oracle.load(ORACLE_PATH, SHAPE_PATH)
        return self._oracle

    def detector(self, image: Image.Image, labels: list[str]) -> list[Detection]:
        """The toy world's detector (Isolated mode, auto-mask): the animals of the asked classes the
        oracle sees, with boxes and masks, best score first. An image of another size is read at
        the oracle's 64 px and its finds scaled back."""
        from bench.toyworld.evaluate import oracle_detector

        width, height = image.size
        small = image.convert("RGB") if image.size == (SIZE, SIZE) else image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
        found = sorted(oracle_detector(self.oracle())(small, labels), key=lambda d: -d.score)
        if image.size == (SIZE, SIZE):
            return found
        sx, sy = width / SIZE, height / SIZE
        return [Detection(d.label, (d.box[0] * sx, d.box[1] * sy, d.box[2] * sx, d.box[3] * sy), d.score,
                          np.asarray(Image.fromarray(d.mask).resize((width, height), Image.NEAREST)))
                for d in found]

    def served_paths(self) -> list[str]:
        """What the page serves besides the library and the images: the example photos and the docs."""
        return sorted({str(Path(path).parent) for photos, _, _ in self.examples for path in photos} | {str(DOCS)})

    def banner(self) -> str:
        """What the page says the demo is (markdown)."""
        space = os.environ.get("SPACE_ID")
        docs = DOCS_URL.format(space=space) if space else f"/gradio_api/file={DOCS}"
        return (f"**Offline demo: the toy world.** A small real text-to-image model (SD1.5's architecture, 8 M"
                f" parameters) of a made-up world of simple dogs, cats and birds, drawn at {self.size} px, with five"
                f" stock pets already trained (`<rex>`, `<bolt>`, `<mimi>`, `<luna>`, `<kiwi>`). Its pictures are judged by an"
                f" oracle network, which also serves as the detector here. Prompts use the world's words, e.g."
                f" \"{PROMPT}\". A pet trains in minutes on a CPU: pick a stock pet's photos under *Examples* in"
                f" Concepts. [What the toy world is and what it measures]({docs}) (docs/toyworld.md).")


def default_root(storage: Path | None = None) -> Path:
    """Where the demo keeps its library, images and examples: `storage`/demo (e.g. a Space's /data),
    else $MENAGERIE_CACHE/demo (default ~/.cache/menagerie/demo)."""
    if storage is not None:
        return Path(storage) / "demo"
    return Path(os.environ.get("MENAGERIE_CACHE", Path.home() / ".cache" / "menagerie")) / "demo"


def stock_library(folder: Path) -> list[str]:
    """Copy each stock pet into the library `folder` unless a concept of that name is there already
    (one the user retrained or replaced stays); returns the names copied. Each copy is staged and
    renamed into place, so a crash never leaves half a concept."""
    folder.mkdir(parents=True, exist_ok=True)
    copied = []
    for pet in sorted(p for p in STOCK_PETS.iterdir() if p.is_dir()):
        target = folder / pet.name
        if target.exists():
            continue
        staging = folder / f".staging-{pet.name}-{uuid.uuid4().hex[:8]}"
        shutil.copytree(pet, staging)
        os.replace(staging, target)
        copied.append(pet.name)
    return copied


def write_examples(folder: Path) -> list[list]:
    """Each stock pet's 8 photos (`bench.toyworld.world.pet_photos`) as PNGs under `folder/<pet>/`,
    written once; returns the training form's examples, [photo paths, name, class word] per pet.

    The example's name is `my-<pet>`: the stock <pet> is already in the library, so a run from its
    photos trains a concept of its own, to compare with the stock one.
    """
    from bench.toyworld.world import PETS, pet_photos

    examples = []
    for pet in PETS:
        paths = [folder / pet.name / f"{pet.name}-{i + 1}.png" for i in range(8)]
        if not all(p.exists() for p in paths):
            paths[0].parent.mkdir(parents=True, exist_ok=True)
            for path, photo in zip(paths, pet_photos(pet)):
                Image.fromarray(photo).save(path)
        examples.append([[str(p) for p in paths], f"my-{pet.name}", pet.look.cls])
    return examples


def prepare_demo(root: Path | None = None, library: str | os.PathLike | None = None,
                 outputs: str | os.PathLike | None = None) -> Demo:
    """The demo's folders filled and its settings made: the stock pets in the library, the photos
    written, the toy recipe as defaults.

    Args:
        root: folder for the demo's library, images and examples; default `default_root()`.
        library / outputs: other folders for the library and the images (e.g. --concepts-dir).
    """
    from bench.toyworld.evaluate import GUIDANCE, PET_LEARNING_RATES, PET_STEPS, SAMPLE_STEPS

    # 1. Check that the toy world is here (a checkout without assets/ cannot run the demo)
    if not (TOY_MODEL / "model_index.json").exists():
        raise UserError(f"the toy model is missing ({TOY_MODEL}); the demo needs the repository's assets/toyworld folder")
    root = Path(root) if root is not None else default_root()
    library = Path(library).expanduser() if library else root / "concepts"
    outputs = Path(outputs).expanduser() if outputs else root / "outputs"

    # 2. Fill the folders
    stock_library(library)
    outputs.mkdir(parents=True, exist_ok=True)
    examples = write_examples(root / "examples")

    # 3. The forms' defaults: the toy recipe and sampling settings
    training = {"steps": PET_STEPS, **PET_LEARNING_RATES}
    sampling = {"prompt": PROMPT, "negative_prompt": "", "steps": SAMPLE_STEPS, "guidance": GUIDANCE,
                "width": SIZE, "height": SIZE}
    return Demo(library=library, outputs=outputs, examples=examples, training=training, sampling=sampling)


def demo_by_default(base_chosen: bool) -> bool:
    """Whether the studio starts in demo mode unasked: on a Hugging Face Space (SPACE_ID set)
    without a CUDA GPU (free CPU hardware; ZeroGPU lends one), unless a base model was chosen
    (--base or $MENAGERIE_BASE)."""
    import torch

    zero_gpu = os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")
    return bool(os.environ.get("SPACE_ID")) and not base_chosen and not zero_gpu and not torch.cuda.is_available()
