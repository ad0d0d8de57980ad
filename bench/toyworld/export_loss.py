"""What the A1111 export loses: the full ED-LoRA against its kohya LoRA + one collapsed embedding.

A concept exported for A1111/ComfyUI (`pipelines.export.export_for_webui`) keeps its LoRA exactly,
but its 16 layer-wise token pairs become one pair for every layer. Each pet, stock (rex, bolt,
mimi) and the random pets of `layout_eval` (seed 12), is sampled as "a <pet> on the beach":
(a) through Menagerie with its full ED-LoRA, (b) from the exported files loaded by diffusers' own
`load_lora_weights` and `load_textual_inversion` into a plain `StableDiffusionPipeline` of the toy
model, for each collapse (`COLLAPSES`); same scheduler, steps, guidance, empty negative prompt and
starting latents as the toy world's sampling. The oracle scores identity / match / belly. With
"distil", each pet's key/value objective (`pipelines.export.key_value_objective`) is recorded for
the mean, layer 6 and the distilled pair, with the seconds its export took.

    python -m bench.toyworld.export_loss --work DIR --samples 16 [--device cpu] [--collapses distil --merge]

Pets are read from DIR/train/today/<pet>/ (layout_eval's work folder; missing ones are trained
there as `layout_eval` does); the table goes to DIR/export_loss.json. With --merge, the cells
already in that file are kept and only --collapses (and "full" where missing) are measured;
`runs` in the file says which run measured each cell.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from bench.toyworld.evaluate import GUIDANCE, MODEL_DIR, SAMPLE_STEPS, identity_rate, image_rates, load_world
from bench.toyworld.layout_eval import single_pet_sample
from bench.toyworld.world import PETS_BY_NAME
from pipelines.concept import ConceptLibrary
from pipelines.export import LORA_SUFFIX, distilled_vectors, export_for_webui, key_value_objective
from pipelines.sample import initial_latents, make_scheduler

# the average of the 16 copies; the copy of the UNet's mid block; the pair distilled through K/V
COLLAPSES = ("mean", "layer:6", "distil")
PROMPT = "a <{name}> on the beach"


def diffusers_pipeline(device: str):
    """The toy model as a stock diffusers pipeline, sampling as the toy world does (DPM-Solver++ 2M)."""
    from diffusers import StableDiffusionPipeline

    # fp32 as `load_world` loads it (the files are fp16)
    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL_DIR), dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = make_scheduler("dpm++", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def exported_images(pipe, base, folder: Path, name: str, count: int, seed: int = 0) -> list[Image.Image]:
    """Images of the exported concept in `folder` through diffusers' loaders, from Menagerie's starting latents."""
    pipe.load_lora_weights(str(folder), weight_name=f"{name}{LORA_SUFFIX}.safetensors", adapter_name=name)
    pipe.load_textual_inversion(str(folder / f"{name}.safetensors"), token=f"<{name}>")
    try:
        latents = initial_latents(base, count, base.native_resolution, base.native_resolution, seed)
        with torch.no_grad():
            pixels = pipe(PROMPT.format(name=name), negative_prompt="", num_inference_steps=SAMPLE_STEPS,
                          guidance_scale=GUIDANCE, latents=latents, num_images_per_prompt=count, output_type="np").images
    finally:
        pipe.unload_lora_weights()
        pipe.unload_textual_inversion()
    return [Image.fromarray((p * 255).round().astype(np.uint8)) for p in pixels]


def key_value_errors(base, library, name: str, distilled: torch.Tensor) -> dict:
    """The distillation objective (relative K/V error) of the mean, layer 6 and the distilled pair."""
    concept, tensors = library.get(name), library.weights(name, base)
    embeddings = tensors["embeddings"].float()
    objective = key_value_objective(base, name, tensors, concept.class_word)
    with torch.no_grad():
        return {how: round(objective(v.to(base.device)).item(), 4)
                for how, v in (("mean", embeddings.mean(dim=1)), ("layer:6", embeddings[:, 6]), ("distil", distilled))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder of trained pets (train/today/<pet>/) and of the result")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--collapses", nargs="+", default=list(COLLAPSES), help=f"collapses to measure (default {COLLAPSES})")
    parser.add_argument("--merge", action="store_true", help="keep the cells of DIR/export_loss.json, measure only --collapses")
    args = parser.parse_args(argv)
    work = Path(args.work)
    out = work / "export_loss.json"
    pets = single_pet_sample(work, args.device)
    results = {"samples": args.samples, "collapses": list(COLLAPSES), "prompt": PROMPT, "pets": {}, "runs": {}}
    if args.merge and out.exists():
        results = json.loads(out.read_text())
        if results["samples"] != args.samples or results["prompt"] != PROMPT:
            raise SystemExit(f"{out} has {results['samples']} samples of {results['prompt']!r}; cannot merge another setting")
        # cells measured before `runs` was recorded came from one earlier run
        runs = results.setdefault("runs", {})
        for cell in ["full", *results["collapses"]]:
            runs.setdefault(cell, "an earlier run")
        results["collapses"] = list(dict.fromkeys(results["collapses"] + args.collapses))
    run = time.strftime("%Y-%m-%d %H:%M")
    base, oracle = load_world(args.device)
    pipe = diffusers_pipeline(args.device)
    for pet in pets:
        library = ConceptLibrary(work / "train" / "today" / pet.name)
        row = results["pets"].setdefault(pet.name, {"random": pet.name not in PETS_BY_NAME})
        if "full" not in row:
            row["full"] = identity_rate(base, library, oracle, PROMPT.format(name=pet.name), pet.look, args.samples)
            results["runs"]["full"] = run
        for how in args.collapses:
            with tempfile.TemporaryDirectory() as folder:
                started = time.perf_counter()
                export_for_webui(library, pet.name, folder, how=how, base=base)
                seconds = round(time.perf_counter() - started, 1)
                if how == "distil":
                    distilled = load_file(Path(folder) / f"{pet.name}.safetensors")["emb_params"]
                    row["key_value"] = {"relative_error": key_value_errors(base, library, pet.name, distilled),
                                        "export_seconds": seconds}
                images = exported_images(pipe, base, Path(folder), pet.name, args.samples)
            row[how] = image_rates(oracle, images, [pet.look]).short()
            results["runs"][how] = run
        out.write_text(json.dumps(results, indent=1) + "\n")  # a run cut short keeps what it measured
        print(pet.name, json.dumps({k: v for k, v in row.items() if k != "random"}), flush=True)
    cells = ["full", *results["collapses"]]
    for group, random in (("stock", False), ("random", True), ("all", None)):
        rows = [r for r in results["pets"].values() if random is None or r["random"] == random]
        results[f"mean_{group}"] = {c: {k: round(sum(r[c][k] for r in rows) / len(rows), 3)
                                        for k in ("identity", "match", "belly")} for c in cells}
        if all("key_value" in r for r in rows):
            errors = [r["key_value"]["relative_error"] for r in rows]
            results[f"mean_{group}"]["key_value_relative_error"] = {
                how: round(sum(e[how] for e in errors) / len(errors), 4) for how in ("mean", "layer:6", "distil")}
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k.startswith("mean")}, indent=1))
    return results


if __name__ == "__main__":
    main()
