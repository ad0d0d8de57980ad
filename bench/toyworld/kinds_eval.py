"""The other concept kinds beside ED-LoRA, in the toy world (issue 16): Custom Diffusion, Cones and
jointly trained groups (Gen4Gen / MuDI), side by side.

    python -m bench.toyworld.kinds_eval --out DIR --work WORK [--samples 48] [--workers 14] [--device cuda] [--minutes 9]
    python -m bench.toyworld.kinds_eval --table DIR/results.json      # the docs tables, as markdown
    OMP_NUM_THREADS=1 python -m bench.toyworld.kinds_eval --out DIR --work WORK --device cpu --workers 2 \
        --samples 2 --pets 2 --groups 1 --steps 20                    # the plumbing, end to end, on a CPU

Methods (`METHODS`; each trains with its toy recipe, `RECIPES`):
- "edlora": ED-LoRA per pet (`evaluate.train_pet`, the toy recipe); several pets: gradient fusion.
- "joint": one ED-LoRA-shaped model per group (`train_group`, kind "joint"): composites of the group's
  pets on empty grass scenes; several pets: the group's shared weights ("group" merge).
- "cd_joint": Custom Diffusion trained jointly per group (`train_group`, kind "custom-diffusion").
- "cd_merged": Custom Diffusion per pet, merged by its closed form (`fuse_concepts`, "custom-diffusion").
- "cones": Cones per pet (concept neurons), merged by the union of the neurons.

Pets are the 8 random pets of the docs (`random_pets(RANDOM_SEED, 8)`) and the random groups of
`layout_eval.groups()` (4 mixed and 4 same-class pairs, 2 triples). Every pet is drawn alone ("a <pet>
on the beach", scored by `image_rates`) and every group in side-by-side boxes by each sampling mode
(`MODES`), scored box by box as `layout_eval.score` does (separate, merged, per-box match, belly, swap).
Each concept's file size is measured, and computed for SD1.5 from its architecture (`concept_bytes`).

Work runs in a pool of processes; results go to DIR/results.json after every job, so a run cut short
keeps what it measured, and a second run with the same --out and --work skips what is there (trained
concepts included: after changing a recipe, delete WORK/train/<method> and its results).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.toyworld import layout_eval as le
from bench.toyworld.world import Pet, random_pets

RANDOM_SEED = le.RANDOM_SEED
SINGLE_PROMPT = le.SINGLE_PROMPT  # "a <{name}> on the beach"
# A joint group's composites are pasted on background photos (Gen4Gen's real backgrounds): empty grass
# scenes rendered by the world, captioned "on the grass" (the multi-pet prompts' background). Not drawn by
# the base model (train_group's background_prompt alone): the toy model never saw an empty scene, and its
# "empty scene on the grass" holds two animals in every picture.
GROUP_BACKGROUND = "grass"
GROUP_BACKGROUND_PHOTOS = 8

# The toy recipes. The toy model is small and trained from scratch, so ED-LoRA's toy learning rates are
# ~10x the paper's (evaluate.PET_LEARNING_RATES); each kind's rates below were chosen on this CPU the same
# way (docs/toyworld.md, "Concept kinds"). `steps` is per pet: a group trains steps x members, the
# compute of training its pets one by one.
RECIPES = {
    # evaluate.train_pet's defaults: 400 steps, lr 5e-3 / 1e-4 / 1e-3, no masks
    "edlora": dict(kind="edlora", steps=400, masks=False),
    # Gen4Gen / MuDI: half the examples are composites of the whole group on a background photo, with
    # each pet's mask (what auto-mask gives; composites need cut-outs), Mix-of-Show's regulariser at its
    # product default 0.01; ED-LoRA's toy rates
    "joint": dict(kind="joint", steps=400, masks=True, multi_subject_probability=0.5, background=GROUP_BACKGROUND),
    # Custom Diffusion: the modifier token and the cross-attention K/V, one constant learning rate. diffusers'
    # 8e-5 (the product default) barely moves in 400 steps here; 10x it, as ED-LoRA's toy rates are 10x the
    # paper's, learns best. Chosen on this CPU, 400 steps, 8 images, match (belly) for p3a1d / p4b84, whose
    # class words read 0.23 / 0.40: lr 8e-5 0.23 (0.12) / 0.55 (0.00); 4e-4 0.70 (0.75) / 0.70 (0.00); 8e-4
    # 0.72 (0.88) / 0.68 (0.50); 2e-3 0.47 (0.38) / 0.55 (0.38); 4e-3 0.40 (0.00) / 0.07 (0.00), presence 0.75
    # / 0.12. Class priors off, as in ED-LoRA's toy recipe (Custom Diffusion's real regularisation images
    # need a network; not measured with the base model's own pictures).
    "cd_joint": dict(kind="custom-diffusion", steps=400, masks=True, multi_subject_probability=0.5, lr_kv=8e-4,
                     background=GROUP_BACKGROUND),
    "cd_merged": dict(kind="custom-diffusion", steps=400, masks=False, lr_kv=8e-4),
    # Cones: passes of the neuron search. The port's shrink rate 2e-5 (the product default, for SD's
    # weights) moves the toy model's weights by ~1e-9 a pass, i.e. not at all; 100 shrinks them, and
    # 1000 neurons (~0.08% of the K/V weights searched) gave the lowest held-out loss on p3a1d and pe0cd
    # on this CPU (300 passes: 0.0298 / 0.0267 against 0.0342 / 0.0349 with nothing shut; 3000: 0.0358 /
    # 0.0302; shrink 1000 diverges). Measured by the Cones helper run, see docs/toyworld.md.
    "cones": dict(kind="cones", steps=300, masks=False, cones_shrink=100.0, cones_max_neurons=1000),
}
METHODS = tuple(RECIPES)
GROUP_METHODS = ("joint", "cd_joint")  # trained per group; the rest per pet
# Several pets: "plain" and "regional" sample the merged model (each kind's merge, fuse_concepts' default;
# regional with the product's LayoutControl), "isolated_boxes" loads each subject's own concept in its
# branch, "isolated_boxes_merged" runs isolation with boxes on the merged model.
MODES = ("plain", "regional", "isolated_boxes", "isolated_boxes_merged")
MERGED_MODES = ("plain", "regional", "isolated_boxes_merged")
IMAGE_BUNDLE_SECONDS = 60  # images.npz is rewritten at most this often during a run (and at its end)


# ---------------------------------------------------------------------------------------------
# Storage: a concept file's bytes, from the architecture alone


@dataclass(frozen=True)
class Architecture:
    """What a concept file's size depends on (SD1.5's block structure, any widths)."""

    text_width: int  # CLIP's hidden size, also the cross-attention input width
    text_layers: int  # CLIP encoder layers
    channels: tuple[int, int, int, int]  # the UNet's block_out_channels


SD15 = Architecture(text_width=768, text_layers=12, channels=(320, 640, 1280, 1280))
TOY = Architecture(text_width=128, text_layers=4, channels=(64, 96, 96, 96))  # assets/toyworld/model
CONCEPT_METADATA = {"format": "menagerie-edlora-v1"}  # what ConceptLibrary.save writes into every file
DTYPE_BYTES = {"F32": 4, "I32": 4}
DTYPE_ORDER = {"F32": 1, "I32": 0}  # safetensors writes tensors by dtype (F32 before I32), then by name


def transformer_blocks(arch: Architecture) -> list[tuple[str, int]]:
    """The 16 transformer blocks of an SD1.5-shaped UNet, in order: (module prefix, width)."""
    c = arch.channels
    blocks = [(f"down_blocks.{i}.attentions.{j}", c[i]) for i in range(3) for j in range(2)]
    blocks.append(("mid_block.attentions.0", c[3]))
    blocks += [(f"up_blocks.{i}.attentions.{j}", c[3 - i]) for i in (1, 2, 3) for j in range(3)]
    return [(f"{prefix}.transformer_blocks.0", width) for prefix, width in blocks]


def kv_modules(arch: Architecture) -> list[str]:
    """The K/V projections Cones searches (attn1 and attn2 to_k / to_v of every block): 64 names."""
    return [f"{block}.{attn}.{proj}" for block, _ in transformer_blocks(arch) for attn in ("attn1", "attn2") for proj in ("to_k", "to_v")]


def kv_weights(arch: Architecture) -> int:
    """How many weights those 64 projections hold (attn1: d x d, attn2: d x text_width)."""
    return sum(2 * d * d + 2 * d * arch.text_width for _, d in transformer_blocks(arch))


def concept_shapes(kind: str, arch: Architecture, rank: int = 4, shut: dict[str, int] | None = None) -> dict[str, tuple[str, tuple]]:
    """Every tensor of a concept file of `kind` on `arch`: key -> (safetensors dtype, shape).

    "edlora" / "joint": embeddings [2, 16, w] and rank-`rank` LoRA factors on CLIP's q/k/v/out and the
    UNet's attn1 + attn2 q/k/v/out. "custom-diffusion": embeddings [2, 16, w] and dense attn2 to_k / to_v
    updates [d, w]. "cones": embeddings [2, 1, w] and int32 indices, `shut[module]` of them per module.
    """
    w = arch.text_width
    if kind in ("edlora", "joint"):
        shapes = {"embeddings": ("F32", (2, 16, w))}
        for i in range(arch.text_layers):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                key = f"text_encoder.encoder.layers.{i}.self_attn.{proj}"
                shapes[f"{key}.lora_A.weight"] = ("F32", (rank, w))
                shapes[f"{key}.lora_B.weight"] = ("F32", (w, rank))
        for block, d in transformer_blocks(arch):
            for attn in ("attn1", "attn2"):
                for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                    fan_in = w if attn == "attn2" and proj in ("to_k", "to_v") else d
                    shapes[f"unet.{block}.{attn}.{proj}.lora_A.weight"] = ("F32", (rank, fan_in))
                    shapes[f"unet.{block}.{attn}.{proj}.lora_B.weight"] = ("F32", (d, rank))
        return shapes
    if kind == "custom-diffusion":
        shapes = {"embeddings": ("F32", (2, 16, w))}
        for block, d in transformer_blocks(arch):
            for proj in ("to_k", "to_v"):
                shapes[f"unet.{block}.attn2.{proj}.delta"] = ("F32", (d, w))
        return shapes
    if kind == "cones":
        shapes = {"embeddings": ("F32", (2, 1, w))}
        for module, count in (shut or {}).items():
            if count:
                shapes[f"unet.{module}.shut"] = ("I32", (count,))
        return shapes
    raise ValueError(f"kind {kind!r} has no file layout here; use edlora, joint, custom-diffusion or cones")


def spread_neurons(arch: Architecture, total: int) -> dict[str, int]:
    """`total` Cones neurons spread evenly over the 64 K/V modules (for the file size: every module holds some)."""
    modules = kv_modules(arch)
    return {m: total // len(modules) + (i < total % len(modules)) for i, m in enumerate(modules)}


def safetensors_size(shapes: dict[str, tuple[str, tuple]], metadata: dict[str, str] | None = None) -> int:
    """The bytes of a safetensors file holding tensors of `shapes`: 8-byte length, JSON header padded with
    spaces to a multiple of 8, then the data (tensors ordered by dtype, then name, as safetensors writes them)."""
    order = sorted(shapes, key=lambda k: (-DTYPE_ORDER[shapes[k][0]], k))
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for key in order:
        dtype, shape = shapes[key]
        size = DTYPE_BYTES[dtype] * int(np.prod(shape, dtype=np.int64))
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + (text + 7) // 8 * 8 + offset


def concept_bytes(kind: str, arch: Architecture = SD15, neurons: int = 0, rank: int = 4) -> int:
    """A concept file's bytes for `kind` on `arch` (Cones: `neurons` indices spread over the 64 K/V modules)."""
    shut = spread_neurons(arch, neurons) if kind == "cones" else None
    return safetensors_size(concept_shapes(kind, arch, rank, shut), CONCEPT_METADATA)


def cones_neurons_at(arch: Architecture, share: float, max_neurons: int) -> int:
    """The neurons a Cones search keeps on `arch` when it shuts `share` of the searched weights (as it did in
    the toy world), capped as `pipelines.cones.neuron_limit` caps it (`max_neurons`, at most 1% of them)."""
    from pipelines.cones import neuron_limit

    return min(neuron_limit(kv_weights(arch), max_neurons), round(share * kv_weights(arch)))


# ---------------------------------------------------------------------------------------------
# Pets and groups


def groups(random_seed: int = RANDOM_SEED) -> dict[str, tuple[Pet, ...]]:
    """The random pets' groups of the layout table (name -> pets left to right; the stock pets' left out)."""
    pets = {p.name for p in random_pets(random_seed, 8)}
    return {name: group for name, group in le.groups(random_seed).items() if all(p.name in pets for p in group)}


def group_kind(pets) -> str:
    """"same" (a pair of one class), "mixed" (a pair of two classes) or "triple"."""
    if len(pets) > 2:
        return "triple"
    return "same" if len({p.look.cls for p in pets}) == 1 else "mixed"


def group_name(key: str) -> str:
    """A group's concept-group name: "p3a1d+pe0cd" -> "p3a1d-pe0cd" (names take no '+')."""
    return key.replace("+", "-")


def background_photos(background: str, count: int, seed: int = 10_000) -> list:
    """`count` empty scenes of one of the world's backgrounds (no animal; render seeds from `seed`), as PIL images."""
    from PIL import Image

    from bench.toyworld.world import Scene, render

    return [Image.fromarray(render(Scene(background=background, animals=(), seed=seed + i))[0]) for i in range(count)]


def first_groups(table: dict[str, tuple[Pet, ...]]) -> dict[str, str]:
    """Pet -> the first group of `table` it is in (where its joint concept is sampled alone)."""
    out: dict[str, str] = {}
    for name, pets in table.items():
        for pet in pets:
            out.setdefault(pet.name, name)
    return out


# ---------------------------------------------------------------------------------------------
# Jobs (each runs in a worker process)


def train_dir(work: Path, method: str, key: str) -> Path:
    """Where `method`'s concepts for `key` (a pet, or a group for GROUP_METHODS) are trained."""
    return work / "train" / method / key


def train_job(work: Path, method: str, key: str, pets, steps: int, device: str) -> dict:
    """Train `pets` (one pet, or a group) with `method`'s recipe into their own library; reuse what is there."""
    from PIL import Image

    from bench.toyworld.evaluate import PET_LEARNING_RATES, train_pet
    from bench.toyworld.world import pet_photos_with_masks
    from pipelines.concept import ConceptLibrary
    from pipelines.train import GroupMember, TrainConfig, train_group

    library = ConceptLibrary(train_dir(work, method, key))
    if all(p.name in library.names() for p in pets):
        return {"reused": True, **stored_row(library, pets)}
    recipe = {k: v for k, v in RECIPES[method].items() if k not in ("steps", "background")}
    masks = recipe.pop("masks")
    base = le._load(device)
    started = time.time()
    if method in GROUP_METHODS:
        members = []
        for pet in pets:
            photos, cuts = pet_photos_with_masks(pet, 8, seed=0)  # train_pet's photos
            members.append(GroupMember(pet.name, pet.look.cls, [Image.fromarray(p) for p in photos],
                                       [Image.fromarray(m.astype(np.uint8) * 255) for m in cuts] if masks else None))
        config = TrainConfig(name=group_name(key), class_word=pets[0].look.cls, steps=steps * len(pets), seed=0, checkpoint_every=0,
                             **{**PET_LEARNING_RATES, **recipe})
        backgrounds = background_photos(RECIPES[method]["background"], GROUP_BACKGROUND_PHOTOS)
        prompt = f"on the {RECIPES[method]['background']}"
        for result in train_group(base, members, config, backgrounds=backgrounds, background_prompt=prompt):
            library.save(result.concept, result.tensors, result.preview, overwrite=True)
    else:
        train_pet(base, library, pets[0], steps, masks=masks, **recipe)  # saves it into the library
    seconds = time.time() - started
    return {"seconds": round(seconds, 1), "per_concept_seconds": round(seconds / len(pets), 1), "steps": steps * len(pets),
            **stored_row(library, pets)}


def stored_row(library, pets) -> dict:
    """Each trained concept file's bytes; for Cones, how many neurons the search kept of how many weights."""
    row = {"bytes": {p.name: (library.path(p.name) / "concept.safetensors").stat().st_size for p in pets}}
    settings = library.get(pets[0].name).settings
    if "neurons" in settings:
        row.update(neurons=settings["neurons"], searched=settings["searched_weights"], neuron_limit=settings["neuron_limit"])
    return row


def library_of(work: Path, method: str, sources: dict[str, str], folder: str):
    """A fresh library under work/eval/<method>/<folder> holding each pet from its training folder
    (`sources`: pet -> training key); fused models are cached inside it."""
    from pipelines.concept import ConceptLibrary

    root = work / "eval" / method / folder
    for pet, key in sources.items():
        target = root / pet
        if not target.exists():
            shutil.copytree(train_dir(work, method, key) / pet, target)
    return ConceptLibrary(root)


def sources_for(method: str, pets, group: str) -> dict[str, str]:
    return {p.name: group if method in GROUP_METHODS else p.name for p in pets}


def keep_images(images, path: Path, keep: int) -> None:
    np.savez_compressed(path, images=np.stack([np.asarray(im.convert("RGB")) for im in images[:keep]]))


def single_job(work: Path, method: str, pet: Pet, group: str, samples: int, device: str, keep: int) -> dict:
    """`pet` alone, "a <pet> on the beach" (method "class_word": "a dog on the beach"); identity, match, belly.
    Group methods sample the pet's concept from `group` (its first group) without the other members."""
    from bench.toyworld.evaluate import image_rates, sample

    base = le._load(device)
    if method == "class_word":
        images = sample(base, None, f"a {pet.look.cls} on the beach", samples)
    else:
        library = library_of(work, method, sources_for(method, [pet], group), f"single__{pet.name}")
        images = sample(base, library, SINGLE_PROMPT.format(name=pet.name), samples)
    rates = image_rates(le.ORACLE[0], images, [pet.look])
    keep_images(images, work / "images" / f"{method}__{pet.name}__single.npz", keep)
    return {**rates.short(), "presence": round(rates.presence, 3)}


def sample_mode(mode: str, base, library, pets, fused, count: int, seed: int = 0):
    """Images of `pets` in side-by-side boxes by `mode` (see MODES), and per image what isolation did per box."""
    if mode != "isolated_boxes_merged":
        return le.sample_mode(mode, base, library, pets, fused, count, seed)
    from bench.toyworld.evaluate import GUIDANCE, SAMPLE_STEPS, oracle_detector
    from pipelines.isolated import IsolateConfig, Subject, isolate

    subjects = tuple(Subject(p.look.cls, f"a <{p.name}> {p.look.cls}") for p in pets)
    images, statuses = [], []
    for i in range(count):
        config = IsolateConfig(prompt=le.class_prompt(pets), subjects=subjects, negative_prompt="", steps=SAMPLE_STEPS,
                               guidance=GUIDANCE, seed=seed + i, boxes=tuple(le.boxes_for(len(pets))))
        result = isolate(base, library, config, detector=oracle_detector(le.ORACLE[0]), fused=fused)
        images.append(result.final)
        statuses.append([a.status for a in result.assignments])
    return images, statuses


def cell_job(work: Path, method: str, name: str, pets, mode: str, samples: int, device: str, keep: int) -> dict:
    """One cell: `pets` drawn by `mode` with `method`'s concepts, scored box by box."""
    from pipelines.fusion import fuse_concepts

    library = library_of(work, method, sources_for(method, pets, name), f"{name}__{mode}")
    base = le._load(device)  # every cell starts from the plain toy model
    fused = None
    started = time.time()
    if mode in MERGED_MODES:
        merged = fuse_concepts(base, library, [p.name for p in pets])  # each kind's own merge
        fused = merged.folder
    merge_seconds = time.time() - started
    images, statuses = sample_mode(mode, base, library, pets, fused, samples)
    out = le.score(images, pets)
    out.update(seconds=round(time.time() - started, 1), merge_seconds=round(merge_seconds, 1))
    if fused is not None:
        out["merge"] = merged.method
    if statuses is not None and statuses[0]:
        flat = [s for image in statuses for s in image]
        out["boxes"] = {s: round(flat.count(s) / len(flat), 3) for s in ("matched", "split", "added")}
    keep_images(images, work / "images" / f"{method}__{name}__{mode}.npz", keep)
    return out


def run_job(job: tuple) -> tuple:
    kind, key, args = job
    try:
        return kind, key, {"train": train_job, "single": single_job, "cell": cell_job}[kind](*args), None
    except Exception:  # a failed job is reported and the rest go on
        return kind, key, None, traceback.format_exc()


# ---------------------------------------------------------------------------------------------
# The run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for results.json and images.npz")
    parser.add_argument("--work", default="/tmp/toy16", help="trained concepts, libraries and images (kept between runs)")
    parser.add_argument("--table", help="print the docs tables of this results.json and exit")
    parser.add_argument("--samples", type=int, default=48, help="images per cell")
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--minutes", type=float, default=9.0, help="stop waiting for jobs after this long")
    parser.add_argument("--steps", type=int, default=None, help="steps per pet for every method (default: each recipe's)")
    parser.add_argument("--pets", type=int, default=8, help="the first N random pets")
    parser.add_argument("--groups", type=int, default=None, help="the first N groups made of those pets (default: all)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="RESULTS",
                        help="merge these results.json files (runs split over calls or GPUs) into --out/results.json and exit;"
                             " a cell measured in two files keeps the first file's")
    parser.add_argument("--group-names", default=None, help="comma-separated groups to run (default: all, or the first --groups)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--keep", type=int, default=8, help="images kept per cell for the figures")
    parser.add_argument("--no-single", action="store_true", help="skip the single-pet cells")
    args = parser.parse_args(argv)
    if not args.table and not args.out:
        parser.error("give --out DIR (a run) or --table results.json (the tables)")
    for value, known, flag in ((args.methods, METHODS, "--methods"), (args.modes, MODES, "--modes")):
        unknown = [v for v in value.split(",") if v not in known]
        if unknown:
            parser.error(f"{flag} {','.join(unknown)} is not known; choose from {','.join(known)}")
    if not 1 <= args.pets <= 8:
        parser.error(f"--pets {args.pets}: choose 1 to 8")
    return args


def main(argv=None) -> None:
    import multiprocessing

    args = parse_args(argv)
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return
    if args.merge:
        merged = merge_results([json.loads(Path(path).read_text()) for path in args.merge])
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(merged, indent=1))
        return
    work, out = Path(args.work), Path(args.out)
    (work / "images").mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    # 1. What to run: pets, groups, methods, modes
    pets = list(random_pets(RANDOM_SEED, 8))[: args.pets]
    chosen = {p.name for p in pets}
    table = {k: v for k, v in groups().items() if all(p.name in chosen for p in v)}
    table = dict(list(table.items())[: args.groups]) if args.groups is not None else table
    if args.group_names:
        table = {k: v for k, v in table.items() if k in args.group_names.split(",")}
    methods, modes = args.methods.split(","), args.modes.split(",")
    steps = {m: args.steps or RECIPES[m]["steps"] for m in methods}
    results.update(samples=args.samples, random_seed=RANDOM_SEED, workers=args.workers, device=args.device,
                   recipes={m: RECIPES[m] | {"steps": steps[m]} for m in methods}, modes=modes,
                   groups={k: [p.name for p in v] for k, v in table.items()},
                   group_kinds={k: group_kind(v) for k, v in table.items()},
                   pets={p.name: p.look.__dict__ for p in pets})
    started = time.time()
    bundled = [started]

    def save(images: bool = False) -> None:
        results["seconds"] = round(time.time() - started, 1)
        results["storage"] = storage(results)
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, results_path)
        if images and time.time() - bundled[0] > IMAGE_BUNDLE_SECONDS:  # every cell's first images in one file
            le.bundle_images(work / "images", out / "images.npz")
            bundled[0] = time.time()

    def record(outcome) -> None:  # in the pool's result thread, as each job finishes
        kind, key, result, error = outcome
        if error:
            results.setdefault("errors", {})[key] = error
        elif kind == "train":
            method, name = key.split("/")
            if not result.get("reused") or name not in results.get("train", {}).get(method, {}):
                results.setdefault("train", {}).setdefault(method, {})[name] = result
        elif kind == "single":
            method, name = key.split("/")
            results.setdefault("single", {}).setdefault(method, {})[name] = result
        else:
            method, name, mode = key.split("/")
            results.setdefault("multi", {}).setdefault(method, {}).setdefault(name, {})[mode] = result
        print(f"{kind} {key} {'FAILED' if error else json.dumps(result)[:300]}", flush=True)
        save(images=kind != "train")

    # 2. Training: per pet, or per group
    train = [("train", f"{m}/{name}", (work, m, name, group, steps[m], args.device))
             for m in methods if m in GROUP_METHODS for name, group in table.items()]
    train += [("train", f"{m}/{p.name}", (work, m, p.name, (p,), steps[m], args.device))
              for m in methods if m not in GROUP_METHODS for p in pets]
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.workers, maxtasksperchild=4) as pool:
        left = run_all(pool, train, record, started + args.minutes * 60)
        trained = {key for _, key, _ in train if key.split("/")[1] in results.get("train", {}).get(key.split("/")[0], {})}

        # 3. Single pets and groups, for what trained
        first = first_groups(table)
        later = []
        if not args.no_single:
            later += [("single", f"class_word/{p.name}", (work, "class_word", p, "", args.samples, args.device, args.keep))
                      for p in pets if p.name not in results.get("single", {}).get("class_word", {})]
            for m in methods:
                for p in pets:
                    source = first.get(p.name) if m in GROUP_METHODS else p.name
                    if source and f"{m}/{source}" in trained and p.name not in results.get("single", {}).get(m, {}):
                        later.append(("single", f"{m}/{p.name}", (work, m, p, source, args.samples, args.device, args.keep)))
        for name, group in sorted(table.items(), key=lambda item: len(item[1])):  # pairs first
            for m in methods:
                needed = [f"{m}/{name}"] if m in GROUP_METHODS else [f"{m}/{p.name}" for p in group]
                if not all(k in trained for k in needed):
                    continue
                later += [("cell", f"{m}/{name}/{mode}", (work, m, name, group, mode, args.samples, args.device, args.keep))
                          for mode in modes if mode not in results.get("multi", {}).get(m, {}).get(name, {})]
        left += run_all(pool, later, record, started + args.minutes * 60) if time.time() - started < args.minutes * 60 else len(later)
        if left:
            print(f"out of time: {left} jobs are left for the next run", flush=True)
        pool.terminate()
    bundled[0] = 0.0
    save(images=True)


def merge_results(parts: list[dict]) -> dict:
    """One results dict from runs of the same settings split over calls or GPUs: the measured cells
    (train, single, multi, errors) of every part, the first part's where two measured the same one;
    groups, pets and recipes as the union."""
    merged: dict = {}
    for part in parts:
        for key, value in part.items():
            if key in ("train", "single", "multi", "errors", "groups", "group_kinds", "pets", "recipes"):
                _merge_missing(merged.setdefault(key, {}), value)
            elif key not in merged:
                merged[key] = value
    merged["modes"] = list(dict.fromkeys(m for part in parts for m in part.get("modes", [])))
    merged["seconds"] = round(sum(part.get("seconds", 0.0) for part in parts), 1)
    merged["storage"] = storage(merged)
    return merged


def _merge_missing(into: dict, other: dict) -> None:
    for key, value in other.items():
        if key not in into:
            into[key] = value
        elif isinstance(into[key], dict) and isinstance(value, dict):
            _merge_missing(into[key], value)


def run_all(pool, jobs: list, record, deadline: float) -> int:
    """Run `jobs` in `pool`, `record` each as it finishes; returns how many did not finish by `deadline`."""
    done: list = []

    def finished(outcome) -> None:
        record(outcome)
        done.append(outcome[1])

    for job in jobs:
        pool.apply_async(run_job, (job,), callback=finished)
    while len(done) < len(jobs) and time.time() < deadline:
        time.sleep(1)
    return len(jobs) - len(done)


def storage(results: dict) -> dict:
    """Per method: the toy concept file's bytes (mean over trained concepts) and the same kind's bytes at SD1.5 size."""
    out = {}
    for method, trained in results.get("train", {}).items():
        sizes = [b for row in trained.values() for b in row.get("bytes", {}).values()]
        seconds = [row["per_concept_seconds"] for row in trained.values() if "per_concept_seconds" in row]
        if not sizes:
            continue
        kind = RECIPES[method]["kind"]
        row = {"kind": kind, "toy_bytes": round(float(np.mean(sizes))), "toy_bytes_max": max(sizes),
               "seconds_per_concept": round(float(np.mean(seconds)), 1) if seconds else None}
        if kind == "cones":
            found = [r for r in trained.values() if "neurons" in r]
            share = float(np.mean([r["neurons"] / r["searched"] for r in found]))
            # at SD1.5 size the product's cap applies (the toy recipe's smaller cap is the toy model's)
            neurons = cones_neurons_at(SD15, share, cones_default_cap())
            row.update(sd15_neurons=neurons, toy_neurons=round(float(np.mean([r["neurons"] for r in found]))))
            row["sd15_bytes"] = concept_bytes("cones", SD15, neurons)
        else:
            row["sd15_bytes"] = concept_bytes(kind, SD15)
        out[method] = row
    return out


def cones_default_cap() -> int:
    from pipelines.train import TrainConfig

    return TrainConfig(name="x", class_word="dog").cones_max_neurons


# ---------------------------------------------------------------------------------------------
# The docs tables

METHOD_NAMES = {"edlora": "ED-LoRA (gradient fusion)", "joint": "joint group (Gen4Gen / MuDI)", "cd_joint": "Custom Diffusion, joint",
                "cd_merged": "Custom Diffusion, merged (closed form)", "cones": "Cones (union)", "class_word": "class word only"}
MODE_NAMES = {"plain": "plain", "regional": "regional", "isolated_boxes": "isolated with boxes, own concepts",
              "isolated_boxes_merged": "isolated with boxes, merged model"}
GROUP_KINDS = (("same", "same-class pairs"), ("mixed", "mixed pairs"), ("triple", "triples"))


def mean_of(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None and r[key] == r[key]]
    return float(np.mean(values)) if values else float("nan")


def group_rows(results: dict, method: str, mode: str, kinds: tuple[str, ...]) -> list[dict]:
    multi = results.get("multi", {}).get(method, {})
    return [multi[g][mode] for g, kind in results.get("group_kinds", {}).items() if kind in kinds and mode in multi.get(g, {})]


def best_mode(results: dict, method: str) -> str | None:
    """The mode with the highest mean separate over the random pairs (same-class and mixed)."""
    scored = {mode: mean_of(group_rows(results, method, mode, ("same", "mixed")), "separate") for mode in results.get("modes", MODES)}
    scored = {m: v for m, v in scored.items() if v == v}
    return max(scored, key=scored.get) if scored else None


def layout_cell(rows: list[dict]) -> str:
    if not rows:
        return "-"
    separate = [r["separate"] for r in rows]
    return (f"{np.mean(separate):.2f} ({min(separate):.2f}-{max(separate):.2f}) / {mean_of(rows, 'merged'):.2f} /"
            f" {mean_of(rows, 'match'):.2f} / {mean_of(rows, 'swap'):.2f}")


def single_means(results: dict, method: str) -> dict | None:
    rows = list(results.get("single", {}).get(method, {}).values())
    return {k: mean_of(rows, k) for k in ("identity", "match", "belly")} | {"pets": len(rows)} if rows else None


def markdown(results: dict) -> str:
    """(a) single pets, (b) several pets by each method's best mode, (c) storage and training time, (d) targets."""
    n = results.get("samples")
    methods = [m for m in METHODS if m in results.get("recipes", RECIPES)]
    lines = [f"**Single pets** ({n} images of \"a <pet> on the beach\" a pet): identity / match / belly, mean over the random pets", "",
             "| method | pets | identity / match / belly |", "| --- | --- | --- |"]
    for method in ["class_word"] + methods:
        means = single_means(results, method)
        if means:
            lines.append(f"| {METHOD_NAMES[method]} | {means['pets']} | {means['identity']:.2f} / {means['match']:.2f} /"
                         f" {means['belly']:.2f} |")
    pets = list(results.get("pets", {}))
    lines += ["", "Per pet, match:", "", "| method | " + " | ".join(f"<{p}>" for p in pets) + " |", "| --- |" + " --- |" * len(pets)]
    for method in ["class_word"] + methods:
        row = results.get("single", {}).get(method, {})
        if row:
            lines.append(f"| {METHOD_NAMES[method]} | " + " | ".join(f"{row[p]['match']:.2f}" if p in row else "-" for p in pets) + " |")

    lines += ["", f"**Several pets in boxes** ({n} images a group), each method at its best mode (highest mean separate over"
              " the random pairs). Cell: separate mean (min-max) / merged / per-box match / swap, mean over the groups", "",
              "| method | best mode | " + " | ".join(label for _, label in GROUP_KINDS) + " |",
              "| --- | --- |" + " --- |" * len(GROUP_KINDS)]
    for method in methods:
        mode = best_mode(results, method)
        if mode:
            lines.append(f"| {METHOD_NAMES[method]} | {MODE_NAMES[mode]} | "
                         + " | ".join(layout_cell(group_rows(results, method, mode, (kind,))) for kind, _ in GROUP_KINDS) + " |")
    lines += ["", "Every mode (same cells):", "", "| method | mode | " + " | ".join(label for _, label in GROUP_KINDS) + " |",
              "| --- | --- |" + " --- |" * len(GROUP_KINDS)]
    for method in methods:
        for mode in results.get("modes", MODES):
            cells = [layout_cell(group_rows(results, method, mode, (kind,))) for kind, _ in GROUP_KINDS]
            if any(c != "-" for c in cells):
                lines.append(f"| {METHOD_NAMES[method]} | {MODE_NAMES[mode]} | " + " | ".join(cells) + " |")

    store = results.get("storage", {})
    lines += ["", f"**Storage and training time per concept** (toy: the concept file; SD1.5: the same kind's file computed from"
              f" SD1.5's architecture, `kinds_eval.concept_bytes`; seconds on {results.get('device')} shared by"
              f" {results.get('workers')} workers; a group's time divided by its pets)", "",
              "| method | kind | toy file | SD1.5 file | seconds per concept |", "| --- | --- | --- | --- | --- |"]
    for method in methods:
        row = store.get(method)
        if row:
            note = f" ({row['sd15_neurons']} neurons)" if "sd15_neurons" in row else ""
            lines.append(f"| {METHOD_NAMES[method]} | {row['kind']} | {kilobytes(row['toy_bytes'])} |"
                         f" {kilobytes(row['sd15_bytes'])}{note} |"
                         f" {row['seconds_per_concept']} |")
    lines += ["", "**Targets** (issue 16)", "", "| target | measured | met? |", "| --- | --- | --- |"]
    lines += [f"| {target} | {measured} | {met} |" for target, measured, met in targets(results)]
    return "\n".join(lines)


def kilobytes(count: int) -> str:
    return f"{count / 1e3:,.1f} KB" if count < 1e6 else f"{count / 1e6:,.2f} MB"


def targets(results: dict) -> list[tuple[str, str, str]]:
    """The issue's targets: (target, measured, met?); "-" where the run did not measure it."""
    modes = results.get("modes", MODES)
    joint_same = {m: mean_of(group_rows(results, "joint", m, ("same",)), "separate") for m in modes}
    joint_same = {m: v for m, v in joint_same.items() if v == v}
    rows = [("joint concept: separate >= 0.9 on same-class pairs (its best mode there)", "-", "-")]
    if joint_same:
        mode = max(joint_same, key=joint_same.get)
        rows[-1] = (rows[-1][0], f"{joint_same[mode]:.2f} ({MODE_NAMES[mode]})", met(joint_same[mode] >= 0.9))
    joint_mode, edlora_mode = best_mode(results, "joint"), best_mode(results, "edlora")
    rows.append(("joint concept: per-box match >= ED-LoRA's (pairs, each at its best mode)", "-", "-"))
    if joint_mode and edlora_mode:
        joint = mean_of(group_rows(results, "joint", joint_mode, ("same", "mixed")), "match")
        edlora = mean_of(group_rows(results, "edlora", edlora_mode, ("same", "mixed")), "match")
        rows[-1] = (rows[-1][0], f"{joint:.2f} vs {edlora:.2f}", met(joint >= edlora))
    cones = results.get("storage", {}).get("cones")
    rows.append(("Cones: storage <= 100 KB per concept at SD1.5 size", "-", "-"))
    if cones:
        rows[-1] = (rows[-1][0], kilobytes(cones["sd15_bytes"]), met(cones["sd15_bytes"] <= 100_000))
    cones_single, edlora_single = single_means(results, "cones"), single_means(results, "edlora")
    rows.append(("Cones: identity (match) within 0.1 of ED-LoRA's", "-", "-"))
    if cones_single and edlora_single:
        gap = edlora_single["match"] - cones_single["match"]
        rows[-1] = (rows[-1][0], f"{cones_single['match']:.2f} vs {edlora_single['match']:.2f} (gap {gap:+.2f})", met(gap <= 0.1))
    return rows


def met(ok: bool) -> str:
    return "met" if ok else "missed"


if __name__ == "__main__":
    main()
