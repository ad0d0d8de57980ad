"""Measure, with the oracle, whether each method works in the toy world.

    python -m bench.toyworld.evaluate --library L --images I   # the docs tables (GPU: minutes; prints markdown)

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
from bench.toyworld.world import PETS as WORLD_PETS, PETS_BY_NAME, SIZE, Look, Pet, pet_photos, pet_photos_with_masks
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


def as_pet(pet: Pet | str) -> Pet:
    """A pet by value; a stock pet may be given by name."""
    return PETS_BY_NAME[pet] if isinstance(pet, str) else pet


def train_pet(base, library, pet: Pet | str, steps: int = PET_STEPS, seed: int = 0, photos: int = 8, masks: bool = False,
              **options):
    """Train `pet` as concept <name> from its photos, as a user would, and save it in `library`.

    With `masks`, its photos come with their subject masks (what auto-mask gives a user): the loss is
    masked and Mix-of-Show's attention regulariser acts. `options` are further TrainConfig settings.
    """
    from pipelines.train import TrainConfig, train_concept

    pet = as_pet(pet)
    images, subject_masks = pet_photos_with_masks(pet, photos, seed=seed)
    config = TrainConfig(name=pet.name, class_word=pet.look.cls, steps=steps, seed=seed, checkpoint_every=0,
                         **{**PET_LEARNING_RATES, **options})
    result = train_concept(base, [Image.fromarray(p) for p in images], config,
                           masks=[Image.fromarray(m.astype(np.uint8) * 255) for m in subject_masks] if masks else None)
    library.save(result.concept, result.tensors, result.preview, overwrite=True)
    return result


def sample(base, library, prompt: str, count: int, seed: int = 0, regions=(), fused=None, layout=None, **options) -> list[Image.Image]:
    from pipelines.layout import NO_LAYOUT
    from pipelines.sample import SampleConfig, generate

    # no negative prompt: the toy text encoder never saw the product's default one (photo-quality words)
    config = SampleConfig(prompt=prompt, negative_prompt="", steps=SAMPLE_STEPS, guidance=GUIDANCE, seed=seed, num_images=count, **options)
    return generate(base, library, config, regions=regions, fused=fused, layout=layout or NO_LAYOUT).images


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
    match: float  # mean over pairs of the best share of the look's attributes (4, or 5 with a belly) an animal there has
    all_identified: float  # share of images with every expected look there
    bleeding: float  # share of images with an animal mixing two expected looks
    marked: float  # share of (image, expected pet) pairs with an animal of its class and its belly
    placed: float  # boxes only: share of boxes showing more of their own pet's traits than of another's
    count: int
    failed: float = float("nan")  # share of images with bleeding or a lost pet (a lost pet never reads as bleeding)

    def as_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}

    def short(self) -> dict:
        """What the single-pet tables show: identity, attribute match, belly."""
        return {"identity": round(self.identity, 3), "match": round(self.match, 3), "belly": round(self.marked, 3)}


def rates(scores) -> Rates:
    present = [p for s in scores for p in s.present]
    identified = [p for s in scores for p in s.identified]
    match = [m for s in scores for m in s.match]
    marked = [m for s in scores for m in s.marked]
    placed = [p for s in scores for p in (s.placed or [])]
    failed = [s.failed for s in scores if s.failed is not None]
    return Rates(float(np.mean(present)), float(np.mean(identified)), float(np.mean(match)),
                 float(np.mean([all(s.identified) for s in scores])),
                 float(np.mean([s.bleeding for s in scores])), float(np.mean(marked)) if marked else float("nan"),
                 float(np.mean(placed)) if placed else float("nan"), len(scores),
                 float(np.mean(failed)) if failed else float("nan"))


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
    pets = [as_pet(p) for p in pets]
    names = [f"a <{p.name}> {p.look.cls}" if as_concepts else f"a {p.look.cls}" for p in pets]
    joined = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{joined} {background}"


def plain_run(base, library, oracle, pets: list[str], fused, count: int, seed: int = 0, keep=None) -> Rates:
    """All pets in one plain prompt, scored image-wide."""
    looks = [as_pet(p).look for p in pets]
    images = sample(base, library, pet_prompt(pets), count, seed, fused=fused)
    keep is not None and keep.append(images)
    return image_rates(oracle, images, looks)


def regional_run(base, library, oracle, pets: list[str], fused, count: int, seed: int = 0, keep=None) -> Rates:
    """One box per pet side by side, each with its pet's prompt; scored box by box."""
    from pipelines.regional import Region

    looks = [as_pet(p).look for p in pets]
    boxes = side_by_side_boxes(len(pets))
    regions = [Region(box, f"a <{as_pet(p).name}> {as_pet(p).look.cls}") for box, p in zip(boxes, pets)]
    images = sample(base, library, pet_prompt(pets, as_concepts=False), count, seed, regions=regions, fused=fused)
    keep is not None and keep.append(images)
    return box_rates(oracle, images, looks, boxes)


def isolated_run(base, library, oracle, pets: list[str], fused, count: int, seed: int = 0, keep=None) -> Rates:
    """Isolated Diffusion of the plain prompt, the oracle as detector; scored image-wide."""
    from pipelines.isolated import IsolateConfig, Subject, isolate

    looks = [as_pet(p).look for p in pets]
    subjects = tuple(Subject(as_pet(p).look.cls, f"a <{as_pet(p).name}> {as_pet(p).look.cls}") for p in pets)
    detector = oracle_detector(oracle)
    images = []
    for i in range(count):
        config = IsolateConfig(prompt=pet_prompt(pets), subjects=subjects, negative_prompt="", steps=SAMPLE_STEPS, guidance=GUIDANCE,
                               seed=seed + i)
        images.append(isolate(base, library, config, detector=detector, fused=fused).final)
    keep is not None and keep.append(images)
    return image_rates(oracle, images, looks)


def multi_pet_runs(base, library, oracle, pets: list[str], fused, count: int, seed: int = 0) -> dict[str, Rates]:
    """Plain, regional and isolated sampling of `pets` together."""
    return {name: run(base, library, oracle, pets, fused, count, seed)
            for name, run in (("plain", plain_run), ("regional", regional_run), ("isolated", isolated_run))}


def identity_rate(base, library, oracle, prompt: str, look: Look, count: int, fused=None, keep=None, **options) -> dict:
    """Identity, attribute match and belly rate of `look` in images of `prompt`."""
    images = sample(base, library, prompt, count, fused=fused, **options)
    keep is not None and keep.append(images)
    return image_rates(oracle, images, [look]).short()


PETS = tuple(pet.name for pet in WORLD_PETS)
FUSION_GROUPS = (("rex", "bolt"), ("rex", "mimi"), ("rex", "bolt", "mimi"), PETS)
MULTI_GROUPS = (("rex", "bolt"), ("rex", "mimi"), ("rex", "bolt", "mimi"))


def run_all(samples: int, device: str = "cpu", steps: int = PET_STEPS, save=None, library_dir=None, images=None) -> dict:
    """Every measurement of the docs table, through the product's functions.

    `save(results)` is called after each part, so a run cut short keeps what it measured;
    `images[cell]` receives each cell's images (uint8 `[N, 64, 64, 3]`) when given.
    """
    import tempfile

    from bench.toyworld.faults import planted
    from pipelines.concept import ConceptLibrary
    from pipelines.fusion import FusionConfig, fuse_concepts

    def fresh():  # sampling after training or fusion starts from the plain toy model
        return load_base(str(MODEL_DIR), device=device, dtype="fp32")

    def kept(cell: str) -> list:
        shelf: list = []
        if images is not None:
            images[cell] = shelf
        return shelf

    results: dict = {"samples": samples, "pet_steps": steps, "sample_steps": SAMPLE_STEPS, "guidance": GUIDANCE,
                     "device": device}
    started = time.time()
    base, oracle = load_world(device)
    results["base"] = {}
    for cls, background in (("dog", "on the grass"), ("cat", "on the beach"), ("bird", "in the snow")):
        results["base"][cls] = image_rates(oracle, sample(base, None, f"a {cls} {background}", samples), [Look(cls, "?")]).presence
    library = ConceptLibrary(library_dir or tempfile.mkdtemp(prefix="toyworld-library-"))
    results["library"] = str(library.root)
    for pet in PETS:
        if pet not in library.names():  # trained by an earlier run into the same --library
            train_pet(fresh(), library, pet, steps)
    results["train_seconds"] = round(time.time() - started, 1)
    save and save(results)

    base = fresh()
    results["single"] = {}
    for pet in PETS:
        look = PETS_BY_NAME[pet].look
        prompt = f"a <{pet}> on the beach"
        results["single"][pet] = {
            "class_word": identity_rate(base, library, oracle, f"a {look.cls} on the beach", look, samples, keep=kept(f"{pet}/class_word")),
            "embedding_only": identity_rate(base, library, oracle, prompt, look, samples, keep=kept(f"{pet}/embedding_only"), lora_scale=0.0),
            # Mix-of-Show's suggested scale for one ED-LoRA, and the product's (1.0 in every mode, as fused models apply it)
            "concept": identity_rate(base, library, oracle, prompt, look, samples, keep=kept(f"{pet}/concept"), lora_scale=0.7),
            "concept_full": identity_rate(base, library, oracle, prompt, look, samples, keep=kept(f"{pet}/concept_full"),
                                          lora_scale=1.0),
        }
        with planted("same-layer"):  # a concept trained right, sampled with every layer fed copy 0
            results.setdefault("faults", {}).setdefault("same-layer", {})[pet] = identity_rate(
                base, library, oracle, prompt, look, samples, keep=kept(f"{pet}/same_layer"))
    print(f"single: {json.dumps(results['single'])} ({time.time() - started:.0f} s)", flush=True)
    save and save(results)

    results["fused"], results["multi"] = {}, {}
    for group in FUSION_GROUPS:
        key = "+".join(group)
        configs = {"gradient": FusionConfig(), "weight": FusionConfig(method="weight")}
        if group == PETS:  # the exact solve, without the product's eigenvalue cutoff (pipelines/fusion.py)
            configs["gradient_rcond_1e-6"] = FusionConfig(rcond=1e-6)
        for method, config in configs.items():
            base = fresh()
            fused = fuse_concepts(base, library, list(group), config).folder
            results["fused"].setdefault(key, {})[method] = {
                pet: identity_rate(base, library, oracle, f"a <{pet}> on the beach", PETS_BY_NAME[pet].look, samples, fused,
                                   keep=kept(f"{key}/{method}/{pet}"))
                for pet in group}
            if method == "gradient" and group in MULTI_GROUPS:
                runs = {}
                for name, run in (("plain", plain_run), ("regional", regional_run), ("isolated", isolated_run)):
                    runs[name] = run(base, library, oracle, list(group), fused, samples, keep=kept(f"{key}/{name}"))
                with planted("no-regions"):
                    runs["regional_no_regions"] = regional_run(base, library, oracle, list(group), fused, samples,
                                                               keep=kept(f"{key}/regional_no_regions"))
                results["multi"][key] = {name: r.as_dict() for name, r in runs.items()}
        print(f"{key}: {json.dumps(results['fused'][key])} ({time.time() - started:.0f} s)", flush=True)
        save and save(results)
    results["seconds"] = round(time.time() - started, 1)
    return results


def _cell(d: dict) -> str:
    return f"{d['identity']:.2f} / {d['match']:.2f} / {d['belly']:.2f}"


def markdown_table(results: dict) -> str:
    """The docs tables: Mix-of-Show's Table 2a in the toy world, plus bleeding rates and faults."""
    n = results["samples"]
    lines = [f"Each cell: exact identity / attribute match / belly, over {n} images of \"a <pet> on the beach\"."
             " Identity: the oracle finds the pet's exact look, belly included. Match: mean share of the look's 5"
             " attributes (class, colour, pattern, pattern colour, belly). Belly: an animal of the pet's class with its"
             " belly, the trait no word names.", "",
             "| pet | class word only | embedding only (LoRA off) | single ED-LoRA (LoRA scale 0.7) | single, scale 1.0 |"
             " same-layer fault (0.7) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for pet, cells in results["single"].items():
        full = _cell(cells["concept_full"]) if "concept_full" in cells else "-"
        lines.append(f"| <{pet}> | {_cell(cells['class_word'])} | {_cell(cells['embedding_only'])} | {_cell(cells['concept'])} |"
                     f" {full} | {_cell(results['faults']['same-layer'][pet])} |")
    def single(pet: str, cell: str) -> dict:
        return results["single"][pet].get(cell, results["single"][pet]["concept"])

    def mean(cells):
        return {k: float(np.mean([c[k] for c in cells])) for k in ("identity", "match", "belly")}

    lines += ["", "Fused models, each pet prompted alone (same cells; the single ED-LoRA cells repeated for reference. A fused"
              " model applies every LoRA at full strength, so single at scale 1.0 is the like-for-like reference):", "",
              "| fused pets | pet | single, scale 0.7 | single, scale 1.0 | weight averaging | gradient fusion |",
              "| --- | --- | --- | --- | --- | --- |"]
    for key, methods in results["fused"].items():
        for pet in methods["gradient"]:
            lines.append(f"| {key} | <{pet}> | {_cell(single(pet, 'concept'))} | {_cell(single(pet, 'concept_full'))} |"
                         f" {_cell(methods['weight'][pet])} | {_cell(methods['gradient'][pet])} |")
    lines += ["", "Mean over the pets of each group, identity / match / belly:", "",
              "| fused pets | single, scale 0.7 | single, scale 1.0 | weight averaging | gradient fusion |",
              "| --- | --- | --- | --- | --- |"]
    for key, methods in results["fused"].items():
        pets = list(methods["gradient"])
        lines.append(f"| {key} | {_cell(mean([single(p, 'concept') for p in pets]))} | {_cell(mean([single(p, 'concept_full') for p in pets]))} |"
                     f" {_cell(mean([methods['weight'][p] for p in pets]))} | {_cell(mean([methods['gradient'][p] for p in pets]))} |")
    exact = results["fused"].get("+".join(PETS), {}).get("gradient_rcond_1e-6")
    if exact:
        lines += ["", "All five pets fused by the exact solve (eigenvalue cutoff 1e-6 instead of the product's 1e-3), mean: "
                  + _cell(mean(list(exact.values())))]
    lines += ["", f"Several pets in one image (gradient-fused model, {n} images per cell): attribute match / belly /"
              " bleeding (an animal mixing two pets' own traits). Plain and isolated are read image-wide, regional box"
              " by box (one box per pet, side by side); there, placed is the share of boxes showing more of their own"
              " pet's traits than of the other's.", "",
              "| pets | plain prompt | isolated (oracle as detector) | regional: match / belly / bleeding / placed |"
              " regional, no-regions fault: same |",
              "| --- | --- | --- | --- | --- |"]
    for key, runs in results["multi"].items():
        cells = [f"{r['match']:.2f} / {r['marked']:.2f} / {r['bleeding']:.2f}" for r in (runs["plain"], runs["isolated"])]
        cells += [f"{r['match']:.2f} / {r['marked']:.2f} / {r['bleeding']:.2f} / {r['placed']:.2f}"
                  for r in (runs["regional"], runs["regional_no_regions"])]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "Base model, share of images with the asked class: " +
              ", ".join(f"{cls} {v:.2f}" for cls, v in results["base"].items())]
    return "\n".join(lines)


def save_images(images: dict, folder: Path) -> None:
    """Each cell's images as uint8 arrays, one .npz per pet or group (the first part of the cell name)."""
    folder.mkdir(parents=True, exist_ok=True)
    groups: dict[str, dict] = {}
    for cell, shelf in images.items():
        arrays = [np.asarray(image.convert("RGB")) for batch in shelf for image in batch]
        if arrays:
            group, _, rest = cell.partition("/")
            groups.setdefault(group, {})[rest.replace("/", "__")] = np.stack(arrays)
    for group, arrays in groups.items():
        np.savez_compressed(folder / f"{group}.npz", **arrays)


def rescore(results: dict, folder: Path, oracle: Oracle) -> dict:
    """`results` recomputed from the images `save_images` wrote (e.g. after the oracle changed)."""
    for pet, cells in results["single"].items():
        arrays = np.load(folder / f"{pet}.npz")
        look = PETS_BY_NAME[pet].look
        for cell in list(cells):
            cells[cell] = image_rates(oracle, list(arrays[cell]), [look]).short()
        results["faults"]["same-layer"][pet] = image_rates(oracle, list(arrays["same_layer"]), [look]).short()
    for key, methods in results["fused"].items():
        arrays = np.load(folder / f"{key}.npz")
        for method, pets in methods.items():
            for pet in pets:
                pets[pet] = image_rates(oracle, list(arrays[f"{method}__{pet}"]), [PETS_BY_NAME[pet].look]).short()
    for key, runs in results["multi"].items():
        arrays = np.load(folder / f"{key}.npz")
        looks = [PETS_BY_NAME[p].look for p in key.split("+")]
        for name in runs:
            images = list(arrays[name])
            boxed = name.startswith("regional")
            runs[name] = (box_rates(oracle, images, looks, side_by_side_boxes(len(looks))) if boxed
                          else image_rates(oracle, images, looks)).as_dict()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="docs/toyworld_results.json")
    parser.add_argument("--samples", type=int, default=32, help="images per measurement")
    parser.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=PET_STEPS, help="ED-LoRA steps per pet")
    parser.add_argument("--library", help="concept library to train the pets into (pets already there are reused)")
    parser.add_argument("--images", help="folder for every cell's images (.npz), to look at or rescore")
    parser.add_argument("--rescore", action="store_true", help="score the images in --images again into --json; no sampling")
    args = parser.parse_args()
    if args.rescore:
        results = rescore(json.loads(Path(args.json).read_text()), Path(args.images), load_world()[1])
        results["rescored"] = "oracle re-run on the saved images (python -m bench.toyworld.evaluate --rescore)"
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(markdown_table(results))
        return
    images: dict | None = {} if args.images else None

    def save(results):
        Path(args.json).write_text(json.dumps(results, indent=1))
        if images is not None:
            save_images(images, Path(args.images))

    results = run_all(args.samples, args.device, args.steps, save=save, library_dir=args.library, images=images)
    save(results)
    print(markdown_table(results))


if __name__ == "__main__":
    main()
