"""Several pets in one picture, each in its own box (issue 12), measured in the toy world.

    python -m bench.toyworld.layout_eval --out DIR [--samples 48] [--workers 12]   # GPU: the docs table

For every training recipe (`VARIANTS`) the pets are trained with the product's ED-LoRA trainer;
for every group of pets (`groups`: the stock rex+bolt, rex+mimi, rex+bolt+mimi, and same-class,
mixed and three-pet groups of randomly generated pets) each sampling mode (`MODES`) draws the
pets in side-by-side boxes, and the oracle scores the boxes (`oracle.score_layout`): separate,
merged, per-box match, belly and swap. Single-pet cells check that each recipe learns each pet.
Everything goes through the product's functions (`train_concept`, `fuse_concepts`, `generate`
with regions and a `LayoutControl`, `isolate` with and without boxes; the oracle plays the detector).

Work runs in a pool of processes (the toy model is small, so one GPU serves many); results are
written after every job to DIR/results.json, so a run cut short keeps what it measured, and a
second run with the same DIR skips what is there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from bench.toyworld.world import PETS_BY_NAME, Pet, random_pets, pet_groups

RANDOM_SEED = 12  # the seed of the random pets in the docs table
SINGLE_PROMPT = "a <{name}> on the beach"
# Training recipes. Masks are what auto-mask gives a user: the loss is masked to the pet and
# Mix-of-Show's attention regulariser acts (its weight 0.01 is the product default with masks).
TOY_COMPANIONS = ("dog", "cat", "bird")
VARIANTS = {
    "today": dict(masks=False),
    "attn_reg": dict(masks=True, attn_reg_weight=0.01),
    "multi": dict(masks=True, attn_reg_weight=0.0, multi_subject_probability=0.3, companions=TOY_COMPANIONS),
    "prior": dict(masks=False, prior_probability=0.2, companions=TOY_COMPANIONS),
    "all": dict(masks=True, attn_reg_weight=0.01, multi_subject_probability=0.3, prior_probability=0.2,
                companions=TOY_COMPANIONS),
}


def layouts():
    from pipelines.layout import LayoutControl

    return {
        "regional": LayoutControl(),
        "regional_self": LayoutControl(self_attention=1.0),
        "regional_bootstrap": LayoutControl(bootstrap=0.2),
        "regional_guidance": LayoutControl(self_attention=1.0, guidance=0.3),
        "regional_all": LayoutControl(self_attention=1.0, bootstrap=0.2, guidance=0.3),
    }


# Sampling modes. "isolated" is today's Isolated Diffusion (no boxes, subjects matched by label);
# the fault modes run isolated sampling with boxes under a planted fault (bench/toyworld/faults.py).
MODES = ("plain", "regional", "regional_self", "regional_bootstrap", "regional_guidance", "regional_all",
         "isolated", "isolated_boxes_no_cross", "isolated_boxes_no_cross_retry3", "isolated_boxes",
         "isolated_boxes_t075", "isolated_boxes_no_retry",
         "fault_no_layout", "fault_class_word_matching")
STOCK_MODES = ("plain", "regional", "regional_self", "regional_bootstrap", "regional_guidance", "isolated",
               "isolated_boxes_no_cross", "isolated_boxes_no_cross_retry3", "isolated_boxes", "fault_no_layout",
               "fault_class_word_matching")
RANDOM_MODES = ("plain", "regional", "regional_self", "isolated", "isolated_boxes_no_cross", "isolated_boxes_no_cross_retry3",
                "isolated_boxes")


def modes_for(variant: str, group: str = "") -> tuple[str, ...]:
    if variant == "today":
        return STOCK_MODES if all(p in PETS_BY_NAME for p in group.split("+")) else RANDOM_MODES
    return ("plain", "regional", "regional_self", "regional_bootstrap", "isolated_boxes_no_cross", "isolated_boxes")


def groups(random_seed: int = RANDOM_SEED) -> dict[str, tuple[Pet, ...]]:
    """The pet groups of the table: name -> pets (left to right, one box each)."""
    stock = {"+".join(g): tuple(PETS_BY_NAME[p] for p in g) for g in (("rex", "bolt"), ("rex", "mimi"), ("rex", "bolt", "mimi"))}
    pets = random_pets(random_seed, 8)
    out = dict(stock)
    for kind, found in pet_groups(pets, 2, per_kind=4).items():  # 4 same-class and 4 mixed pairs: all 8 pets
        if kind in ("same", "mixed"):
            for group in found:
                out["+".join(p.name for p in group)] = group
    triples = pet_groups(pets, 3, per_kind=1)
    for kind in ("partly", "mixed", "same"):
        for group in triples.get(kind, [])[:1]:
            if sum(len(g) == 3 for g in out.values()) < 3:
                out["+".join(p.name for p in group)] = group
    return out


def all_pets(table: dict[str, tuple[Pet, ...]]) -> list[Pet]:
    return list({p.name: p for group in table.values() for p in group}.values())


# ---------------------------------------------------------------------------------------------
# Cells


def boxes_for(count: int):
    from bench.toyworld.evaluate import side_by_side_boxes

    return side_by_side_boxes(count)


def class_prompt(pets) -> str:
    from bench.toyworld.evaluate import pet_prompt

    return pet_prompt(list(pets), as_concepts=False)


def concept_prompt(pets) -> str:
    names = [f"a <{p.name}> {p.look.cls}" for p in pets]
    return (names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]) + " on the grass"


def sample_mode(mode: str, base, library, pets, fused, count: int, seed: int = 0):
    """Images of `pets` in side-by-side boxes by `mode`, and per image what isolation did per box."""
    from bench.toyworld.evaluate import GUIDANCE, SAMPLE_STEPS, oracle_detector, sample
    from pipelines.isolated import IsolateConfig, Subject, isolate
    from pipelines.regional import Region

    boxes = boxes_for(len(pets))
    if mode == "plain":
        return sample(base, library, concept_prompt(pets), count, seed, fused=fused), None
    if mode.startswith("regional"):
        regions = [Region(box, f"a <{p.name}> {p.look.cls}") for box, p in zip(boxes, pets)]
        return sample(base, library, class_prompt(pets), count, seed, regions=regions, fused=fused, layout=layouts()[mode]), None
    subjects = tuple(Subject(p.look.cls, f"a <{p.name}> {p.look.cls}") for p in pets)
    options = {} if mode == "isolated" else {"boxes": tuple(boxes)}
    if mode == "isolated_boxes_no_retry":
        options["layout_retries"] = 0
    if mode.startswith("isolated_boxes_no_cross"):  # the first version: no bounded cross-attention, 1 retry
        options.update(layout_cross_attention="off", layout_retries=3 if mode.endswith("retry3") else 1)
    if mode == "isolated_boxes_t075":
        options["t_lay"] = 0.75
    planted = nullcontext()
    if mode.startswith("fault_"):
        from bench.toyworld.faults import planted as plant

        planted = plant(mode[len("fault_"):].replace("_", "-"))
    images, statuses = [], []
    with planted:
        for i in range(count):
            config = IsolateConfig(prompt=class_prompt(pets), subjects=subjects, negative_prompt="", steps=SAMPLE_STEPS, guidance=GUIDANCE,
                                   seed=seed + i, **options)
            result = isolate(base, library, config, detector=oracle_detector(ORACLE[0]))
            images.append(result.final)
            statuses.append([a.status for a in result.assignments])
    return images, statuses


ORACLE: list = []  # the worker's oracle (loaded once per process)


def score(images, pets) -> dict:
    from bench.toyworld.oracle import layout_rates, score_layout

    boxes = boxes_for(len(pets))
    found = ORACLE[0].describe(images)
    return layout_rates([score_layout(f, boxes, [p.look for p in pets]) for f in found]).as_dict()


# ---------------------------------------------------------------------------------------------
# Jobs (each runs in a worker process)


def _load(device: str):
    import torch

    from bench.toyworld.evaluate import load_world

    torch.set_num_threads(1)
    base, oracle = load_world(device)
    if not ORACLE:
        ORACLE.append(oracle)
    return base


def single_pet_sample(work: Path, device: str) -> list[Pet]:
    """The pets single-concept studies judge on: stock rex, bolt and mimi and 8 random pets
    (seed RANDOM_SEED), each trained into work/train/today/<pet>/ with the "today" recipe
    (a pet already there is reused)."""
    from bench.toyworld.evaluate import PET_STEPS

    pets = [PETS_BY_NAME[n] for n in ("rex", "bolt", "mimi")] + list(random_pets(RANDOM_SEED, 8))
    for pet in pets:
        train_job(work, "today", pet, PET_STEPS, device)
    return pets


def train_job(work: Path, variant: str, pet: Pet, steps: int, device: str, stored: bool = False) -> dict:
    from bench.toyworld.evaluate import ROOT, train_pet
    from pipelines.concept import ConceptLibrary

    started = time.time()
    library = ConceptLibrary(work / "train" / variant / pet.name)  # one folder per job: no two writers share one
    if stored and variant == "today" and pet.name in PETS_BY_NAME and pet.name not in library.names():
        shutil.copytree(ROOT / "assets" / "toyworld" / "pets" / pet.name, library.root / pet.name)  # trained by this recipe
        return {"seconds": 0.0, "stored": True}
    if pet.name not in library.names():
        train_pet(_load(device), library, pet, steps, **VARIANTS[variant])
    return {"seconds": round(time.time() - started, 1)}


def library_of(work: Path, variant: str, pets, folder: str):
    """A fresh library holding the trained `pets` of `variant` (fused models are cached inside it)."""
    from pipelines.concept import ConceptLibrary

    root = work / "eval" / variant / folder
    for pet in pets:
        target = root / pet.name
        if not target.exists():
            shutil.copytree(work / "train" / variant / pet.name / pet.name, target)
    return ConceptLibrary(root)


def single_job(work: Path, variant: str, pet: Pet, samples: int, device: str) -> dict:
    from bench.toyworld.evaluate import image_rates, sample

    library = library_of(work, variant, [pet], pet.name)
    base = _load(device)
    concept = image_rates(ORACLE[0], sample(base, library, SINGLE_PROMPT.format(name=pet.name), samples), [pet.look])
    out = {"concept": concept.short(), "presence": round(concept.presence, 3)}
    if variant == "today":
        word = image_rates(ORACLE[0], sample(base, library, f"a {pet.look.cls} on the beach", samples), [pet.look])
        out["class_word"] = word.short()
    return out


def cell_job(work: Path, variant: str, name: str, pets, mode: str, samples: int, device: str, keep: int) -> dict:
    """One cell: `pets` drawn by `mode`, scored. Each cell has its own library (fused models are cached there)."""
    from pipelines.fusion import fuse_concepts

    library = library_of(work, variant, pets, f"{name}__{mode}")
    base = _load(device)  # sampling starts from the plain toy model every time
    fused = None
    if mode == "plain" or mode.startswith("regional"):
        fused = fuse_concepts(base, library, [p.name for p in pets]).folder
    started = time.time()
    images, statuses = sample_mode(mode, base, library, pets, fused, samples)
    out = score(images, pets)
    out["seconds"] = round(time.time() - started, 1)
    if statuses is not None and statuses[0]:
        flat = [s for image in statuses for s in image]
        out["boxes"] = {s: round(flat.count(s) / len(flat), 3) for s in ("matched", "split", "added")}
    kept = np.stack([np.asarray(im.convert("RGB")) for im in images[:keep]])
    np.savez_compressed(work / "images" / f"{variant}__{name}__{mode}.npz", images=kept)
    return out


def run_job(job: tuple) -> tuple:
    kind, key, args = job
    try:
        result = {"train": train_job, "single": single_job, "cell": cell_job}[kind](*args)
        return kind, key, result, None
    except Exception:  # a failed job is reported and the rest go on
        return kind, key, None, traceback.format_exc()


# ---------------------------------------------------------------------------------------------
# The run


def main() -> None:
    import multiprocessing

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for results.json (and, with --work, nothing else)")
    parser.add_argument("--work", default="/tmp/toy12", help="trained pets, libraries and images (kept between runs)")
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--steps", type=int, default=None, help="ED-LoRA steps per pet (default: the toy recipe's)")
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--groups", default=None, help="comma-separated group names (default: all)")
    parser.add_argument("--keep", type=int, default=8, help="images kept per cell for the figures")
    parser.add_argument("--minutes", type=float, default=9.0, help="stop waiting for jobs after this long")
    parser.add_argument("--stored", action="store_true", help="recipe 'today': use the stored stock pets (assets/toyworld/pets)")
    parser.add_argument("--no-single", action="store_true", help="skip the single-pet cells")
    args = parser.parse_args()

    from bench.toyworld.evaluate import PET_STEPS

    steps = args.steps or PET_STEPS
    work, out = Path(args.work), Path(args.out)
    (work / "images").mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.update(samples=args.samples, pet_steps=steps, random_seed=RANDOM_SEED,
                   variants={k: {n: list(v) if isinstance(v, tuple) else v for n, v in s.items()} for k, s in VARIANTS.items()})
    table = groups()
    if args.groups:
        table = {k: v for k, v in table.items() if k in args.groups.split(",")}
    results["groups"] = {k: [p.name for p in v] for k, v in table.items()}
    results["pets"] = {p.name: p.look.__dict__ for p in all_pets(table)}
    variants = args.variants.split(",")
    started = time.time()

    def save(images: bool = False):
        results["seconds"] = round(time.time() - started, 1)
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, results_path)
        if images:  # every cell's first images in one file (the device returns few files)
            bundle_images(work / "images", out / "images.npz")

    pets = all_pets(table)
    train = [("train", f"{v}/{p.name}", (work, v, p, steps, args.device, args.stored)) for v in variants for p in pets]
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.workers, maxtasksperchild=4) as pool:
        for kind, key, result, error in pool.imap_unordered(run_job, train):
            results.setdefault("errors" if error else "train", {})[key] = error or result
            print(f"{kind} {key} {'FAILED' if error else result}", flush=True)
        save()
        later = [] if args.no_single else [("single", f"{v}/{p.name}", (work, v, p, args.samples, args.device))
                                           for v in variants for p in pets if p.name not in results.get("single", {}).get(v, {})]
        later += [("cell", f"{v}/{name}/{mode}", (work, v, name, group, mode, args.samples, args.device, args.keep))
                  for v in variants for name, group in table.items() for mode in modes_for(v, name)
                  if mode not in results.get("multi", {}).get(v, {}).get(name, {})]
        later.sort(key=lambda job: job[0] == "cell" and "fault_" in job[1])  # the planted faults last
        done = []

        def record(outcome):  # runs in the pool's result thread, as each job finishes
            kind, key, result, error = outcome
            if error:
                results.setdefault("errors", {})[key] = error
            elif kind == "single":
                variant, name = key.split("/")
                results.setdefault("single", {}).setdefault(variant, {})[name] = result
            else:
                variant, name, mode = key.split("/")
                results.setdefault("multi", {}).setdefault(variant, {}).setdefault(name, {})[mode] = result
            print(f"{kind} {key} {'FAILED' if error else json.dumps(result)[:300]}", flush=True)
            done.append(key)
            save(images=kind == "cell")

        for job in later:
            pool.apply_async(run_job, (job,), callback=record)
        while len(done) < len(later) and time.time() - started < args.minutes * 60:
            time.sleep(1)
        if len(done) < len(later):
            print(f"out of time: {len(later) - len(done)} jobs are left for the next run", flush=True)
        pool.terminate()
    save(images=True)


def bundle_images(folder: Path, target: Path) -> None:
    """All `variant__group__mode.npz` files of `folder` as one npz, keys `variant__group__mode`."""
    arrays = {}
    for path in sorted(folder.glob("*.npz")):
        with np.load(path) as cell:
            arrays[path.stem] = cell["images"]
    tmp = target.with_name(target.stem + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, target)


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------------------------------------
# The docs tables

MODE_NAMES = {
    "plain": "plain prompt (fused)", "regional": "regional today (fused)", "regional_self": "+ bounded self-attention",
    "regional_bootstrap": "+ bootstrapping (20%)", "regional_guidance": "+ self-attention + guidance (30%)",
    "regional_all": "+ all three", "isolated": "isolated today (no boxes)", "isolated_boxes": "**isolated with boxes** (bounded cross-attention, 3 retries)",
    "isolated_boxes_t075": "isolated with boxes, branches from 0.75 T", "isolated_boxes_no_retry": "isolated with boxes, no retry",
    "isolated_boxes_no_cross": "isolated with boxes, first version (no cross bound, 1 retry)",
    "isolated_boxes_no_cross_retry3": "isolated with boxes, first version with 3 retries",
    "fault_no_layout": "fault: no layout control", "fault_class_word_matching": "fault: class-word matching",
}


def cell(rates: dict) -> str:
    return (f"{rates['separate']:.2f} / {rates['merged']:.2f} / {rates['match']:.2f} / {rates['belly']:.2f} /"
            f" {rates['swap']:.2f}")


def markdown(results: dict, variant: str = "today", names=None, modes=MODES) -> str:
    """One row per mode, one column per group (all, or `names`): separate / merged / match / belly / swap."""
    multi = results.get("multi", {}).get(variant, {})
    names = [name for name in (names or results["groups"]) if name in multi]
    lines = ["| mode | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for mode in modes:
        if any(mode in multi[name] for name in names):
            lines.append(f"| {MODE_NAMES[mode]} | " + " | ".join(cell(multi[name][mode]) if mode in multi[name] else "-"
                                                               for name in names) + " |")
    return "\n".join(lines)


def summary(results: dict, variant: str = "today", modes=MODES) -> str:
    """Per mode, mean and spread (min-max) of separate and match over the random pets' groups, by size."""
    multi = results.get("multi", {}).get(variant, {})
    lines = ["| mode | groups | separate: mean (min-max) | merged | match | swap |", "| --- | --- | --- | --- | --- | --- |"]
    for size in (2, 3):
        chosen = [n for n in multi if len(n.split("+")) == size and not all(p in PETS_BY_NAME for p in n.split("+"))]
        for mode in modes:
            rows = [multi[n][mode] for n in chosen if mode in multi[n]]
            if not rows:
                continue
            sep = [r["separate"] for r in rows]
            lines.append(f"| {MODE_NAMES[mode]} | {len(rows)} of {size} pets | {np.mean(sep):.2f} ({min(sep):.2f}-{max(sep):.2f}) |"
                         f" {np.mean([r['merged'] for r in rows]):.2f} | {np.mean([r['match'] for r in rows]):.2f} |"
                         f" {np.mean([r['swap'] for r in rows]):.2f} |")
    return "\n".join(lines)
