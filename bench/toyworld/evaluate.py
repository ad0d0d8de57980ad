"""Measure, with the oracle, whether each method works in the toy world.

    python -m bench.toyworld.evaluate --samples 8    # the docs table (CPU, about 30 min; prints markdown)

Every measurement goes through the product's own functions (`train_concept`, `fuse_concepts`,
`generate` with and without regions, `isolate`); the toy model is loaded by the normal loader.
The quality tests (tests/test_toyworld.py) use the same helpers with fewer samples.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.toyworld.oracle import Oracle, score_boxes, score_image
from bench.toyworld.world import PETS_BY_NAME, SIZE, Look, pet_photos
from pipelines.base import load_base
from pipelines.detect import Detection

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "assets" / "toyworld" / "model"
ORACLE_PATH = ROOT / "assets" / "toyworld" / "oracle.pt"
SHAPE_PATH = ROOT / "assets" / "toyworld" / "oracle_shape.pt"

SAMPLE_STEPS = 20
GUIDANCE = 5.0
# ED-LoRA in the toy world: the paper's recipe with larger learning rates and fewer steps, sized
# for a small model trained from scratch, 8 photos, and a CPU (measured in docs/toyworld.md).
PET_STEPS = 400
PET_LEARNING_RATES = dict(lr_embedding=5e-3, lr_text_lora=1e-4, lr_unet_lora=1e-3)


def load_world(device: str = "cpu"):
    """The toy model through the normal loader, and the oracle."""
    if not (MODEL_DIR / "model_index.json").exists():
        raise FileNotFoundError(f"the toy model is missing: {MODEL_DIR}; train it with python -m bench.toyworld.train")
    return load_base(str(MODEL_DIR), device=device, dtype="fp32"), Oracle.load(ORACLE_PATH, SHAPE_PATH)


def train_pet(base, library, pet: str, steps: int = PET_STEPS, seed: int = 0, photos: int = 8):
    """Train pet `pet` as concept <pet> from its photos, as a user would, and save it in `library`."""
    from pipelines.train import TrainConfig, train_concept

    images = [Image.fromarray(p) for p in pet_photos(pet, photos, seed=seed)]
    config = TrainConfig(name=pet, class_word=PETS_BY_NAME[pet].look.cls, steps=steps, seed=seed, checkpoint_every=0,
                         **PET_LEARNING_RATES)
    result = train_concept(base, images, config)
    library.save(result.concept, result.tensors, result.preview, overwrite=True)
    return result


def sample(base, library, prompt: str, count: int, seed: int = 0, regions=(), fused=None) -> list[Image.Image]:
    from pipelines.sample import SampleConfig, generate

    config = SampleConfig(prompt=prompt, steps=SAMPLE_STEPS, guidance=GUIDANCE, seed=seed, num_images=count)
    return generate(base, library, config, regions=regions, fused=fused).images


def oracle_detector(oracle: Oracle):
    """A detector for `pipelines.isolated.isolate`: the oracle's class segmentation.

    In the toy world it plays the part Grounding DINO + SAM play on real photos: boxes and masks
    of the animals whose class word is asked for.
    """
    def detect(image: Image.Image, labels: list[str]) -> list[Detection]:
        found = oracle.describe([image])[0]
        return [Detection(f.look.cls, tuple(float(v) for v in f.box), f.confidence, f.mask)
                for f in found if f.look.cls in labels]
    return detect


@dataclass
class Rates:
    presence: float  # share of (image, expected animal) pairs whose class is there
    identity: float  # ... whose exact look is there
    match: float  # mean over pairs of the best share of the look's 4 attributes an animal there has
    all_identified: float  # share of images with every expected look there
    bleeding: float  # share of images with an animal mixing two expected looks
    count: int

    def as_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def rates(scores) -> Rates:
    present = [p for s in scores for p in s.present]
    identified = [p for s in scores for p in s.identified]
    match = [m for s in scores for m in s.match]
    return Rates(float(np.mean(present)), float(np.mean(identified)), float(np.mean(match)),
                 float(np.mean([all(s.identified) for s in scores])),
                 float(np.mean([s.bleeding for s in scores])), len(scores))


def image_rates(oracle: Oracle, images, looks: list[Look]) -> Rates:
    return rates([score_image(found, looks) for found in oracle.describe(images)])


def box_rates(oracle: Oracle, images, looks: list[Look], boxes: list) -> Rates:
    return rates([score_boxes(found, looks) for found in oracle.describe(images, [boxes] * len(images))])


def side_by_side_boxes(count: int) -> list[tuple[int, int, int, int]]:
    """`count` boxes side by side across the lower two thirds of the canvas, a small gap between."""
    width = SIZE // count
    return [(i * width + 1, SIZE // 4, (i + 1) * width - 1, SIZE - 2) for i in range(count)]


# ---------------------------------------------------------------------------------------------
# Experiments: each returns plain numbers, used by the tests and by the docs table


def pet_prompt(pets: list[str], background: str = "on the grass", as_concepts: bool = True) -> str:
    """E.g. "a <rex> dog and a <mimi> cat on the grass" (the class words are what the detector seeks)."""
    names = [f"a <{p}> {PETS_BY_NAME[p].look.cls}" if as_concepts else f"a {PETS_BY_NAME[p].look.cls}" for p in pets]
    joined = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{joined} {background}"


def plain_run(base, library, oracle, pets: list[str], fused, count: int, seed: int = 0) -> Rates:
    """All pets in one plain prompt, scored image-wide."""
    looks = [PETS_BY_NAME[p].look for p in pets]
    return image_rates(oracle, sample(base, library, pet_prompt(pets), count, seed, fused=fused), looks)


def regional_run(base, library, oracle, pets: list[str], fused, count: int, seed: int = 0) -> Rates:
    """One box per pet side by side, each with its pet's prompt; scored box by box."""
    from pipelines.regional import Region

    looks = [PETS_BY_NAME[p].look for p in pets]
    boxes = side_by_side_boxes(len(pets))
    regions = [Region(box, f"a <{p}> {PETS_BY_NAME[p].look.cls}") for box, p in zip(boxes, pets)]
    images = sample(base, library, pet_prompt(pets, as_concepts=False), count, seed, regions=regions, fused=fused)
    return box_rates(oracle, images, looks, boxes)


def isolated_run(base, library, oracle, pets: list[str], fused, count: int, seed: int = 0) -> Rates:
    """Isolated Diffusion of the plain prompt, the oracle as detector; scored image-wide."""
    from pipelines.isolated import IsolateConfig, Subject, isolate

    looks = [PETS_BY_NAME[p].look for p in pets]
    subjects = tuple(Subject(PETS_BY_NAME[p].look.cls, f"a <{p}> {PETS_BY_NAME[p].look.cls}") for p in pets)
    detector = oracle_detector(oracle)
    images = []
    for i in range(count):
        config = IsolateConfig(prompt=pet_prompt(pets), subjects=subjects, steps=SAMPLE_STEPS, guidance=GUIDANCE, seed=seed + i)
        images.append(isolate(base, library, config, detector=detector, fused=fused).final)
    return image_rates(oracle, images, looks)


def multi_pet_runs(base, library, oracle, pets: list[str], fused, count: int, seed: int = 0) -> dict[str, Rates]:
    """Plain, regional and isolated sampling of `pets` together."""
    return {name: run(base, library, oracle, pets, fused, count, seed)
            for name, run in (("plain", plain_run), ("regional", regional_run), ("isolated", isolated_run))}


def identity_rate(base, library, oracle, prompt: str, look: Look, count: int, fused=None) -> dict:
    """Exact identity rate and mean attribute match of `look` in images of `prompt`."""
    r = image_rates(oracle, sample(base, library, prompt, count, fused=fused), [look])
    return {"identity": round(r.identity, 3), "match": round(r.match, 3)}


def run_all(samples: int, pets=("rex", "bolt", "mimi"), steps: int = PET_STEPS, save=None, library_dir=None) -> dict:
    """Every measurement of the docs table, through the product's functions.

    `save(results)` is called after each part, so a run cut short keeps what it measured.
    """
    import tempfile

    from pipelines.concept import ConceptLibrary
    from pipelines.fusion import FusionConfig, fuse_concepts

    results: dict = {"samples": samples, "pet_steps": steps, "sample_steps": SAMPLE_STEPS, "guidance": GUIDANCE}
    started = time.time()
    base, oracle = load_world()
    results["base"] = {}
    for cls, background in (("dog", "on the grass"), ("cat", "on the beach"), ("bird", "in the snow")):
        images = sample(base, None, f"a {cls} {background}", samples)
        results["base"][cls] = image_rates(oracle, images, [Look(cls, "?")]).presence
    library = ConceptLibrary(library_dir or tempfile.mkdtemp(prefix="toyworld-library-"))
    results["library"] = str(library.root)
    for pet in pets:
        if pet in library.names():  # trained by an earlier run into the same --library
            continue
        train_pet(base, library, pet, steps)
        base, _ = load_world()  # training leaves adapters loaded: start each measurement clean
    save and save(results)
    results["single"] = {}
    for pet in pets:
        look = PETS_BY_NAME[pet].look
        results["single"][pet] = {
            "concept": identity_rate(base, library, oracle, f"a <{pet}> on the beach", look, samples),
            "class_word": identity_rate(base, library, oracle, f"a {look.cls} on the beach", look, samples),
        }
    save and save(results)
    results["fused"] = {}
    results["multi"] = {}
    for group in (pets[:2], (pets[0], pets[2]), pets):
        key = "+".join(group)
        for method in ("gradient", "weight"):
            base, _ = load_world()
            fused = fuse_concepts(base, library, list(group), FusionConfig(method=method)).folder
            results["fused"].setdefault(key, {})[method] = {
                pet: identity_rate(base, library, oracle, f"a <{pet}> on the beach", PETS_BY_NAME[pet].look, samples, fused)
                for pet in group}
            if method == "gradient":
                runs = multi_pet_runs(base, library, oracle, list(group), fused, samples)
                results["multi"][key] = {name: r.as_dict() for name, r in runs.items()}
        print(f"{key}: {json.dumps(results['fused'][key])} ({time.time() - started:.0f} s)", flush=True)
        save and save(results)
    results["seconds"] = round(time.time() - started, 1)
    return results


def markdown_table(results: dict) -> str:
    """The docs table, in the style of Mix-of-Show's Table 2a, plus bleeding rates."""
    n = results["samples"]
    def cell(d: dict) -> str:
        return f"{d['identity']:.2f} / {d['match']:.2f}"

    lines = [f"Each cell: exact identity (share of {n} images in which the oracle finds the pet's exact look) /"
             " attribute match (mean share of the look's 4 attributes: class, colour, pattern, pattern colour).", "",
             "| pet | class word only | single ED-LoRA | fused: weight averaging | fused: gradient fusion |",
             "| --- | --- | --- | --- | --- |"]
    pets = list(results["single"])
    pair = "+".join(pets[:2])
    for pet in pets:
        group = pair if pet in pets[:2] else f"{pets[0]}+{pet}"
        fused = results["fused"][group]
        lines.append(f"| <{pet}> ({group}) | {cell(results['single'][pet]['class_word'])} | {cell(results['single'][pet]['concept'])} |"
                     f" {cell(fused['weight'][pet])} | {cell(fused['gradient'][pet])} |")
    key3 = "+".join(pets)
    lines += ["", f"Three pets fused ({key3}), identity of each:", "",
              "| pet | weight averaging | gradient fusion |", "| --- | --- | --- |"]
    for pet in pets:
        lines.append(f"| <{pet}> | {cell(results['fused'][key3]['weight'][pet])} | {cell(results['fused'][key3]['gradient'][pet])} |")
    lines += ["", f"Several pets in one image (gradient-fused model, {n} images per cell): every pet identified /"
              " attribute match / bleeding (an animal mixing two pets' looks).", "",
              "| pets | plain prompt | regional (one box per pet) | isolated (oracle as detector) |",
              "| --- | --- | --- | --- |"]
    for key, runs in results["multi"].items():
        cells = [f"{r['all_identified']:.2f} / {r['match']:.2f} / {r['bleeding']:.2f}" for r in
                 (runs["plain"], runs["regional"], runs["isolated"])]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "Base model, share of images with the asked class: " +
              ", ".join(f"{cls} {v:.2f}" for cls, v in results["base"].items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="docs/toyworld_results.json")
    parser.add_argument("--samples", type=int, default=16, help="images per measurement")
    parser.add_argument("--library", help="concept library to train the pets into (pets already there are reused)")
    args = parser.parse_args()
    def save(results):
        Path(args.json).write_text(json.dumps(results, indent=1))

    results = run_all(args.samples, save=save, library_dir=args.library)
    save(results)
    print(markdown_table(results))


if __name__ == "__main__":
    main()
