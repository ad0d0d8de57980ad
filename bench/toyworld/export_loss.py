"""What the A1111 export loses: the full ED-LoRA against its kohya LoRA + one collapsed embedding.

A concept exported for A1111/ComfyUI (`pipelines.export.export_for_webui`) keeps its LoRA exactly,
but its 16 layer-wise token pairs become one pair for every layer. Each pet, stock (rex, bolt,
mimi) and the random pets of `layout_eval` (seed 12), is sampled as "a <pet> on the beach":
(a) through Menagerie with its full ED-LoRA, (b) from the exported files loaded by diffusers' own
`load_lora_weights` and `load_textual_inversion` into a plain `StableDiffusionPipeline` of the toy
model, for each collapse (`COLLAPSES`); same scheduler, steps, guidance, empty negative prompt and
starting latents as the toy world's sampling. The oracle scores identity / match / belly.

    python -m bench.toyworld.export_loss --work DIR --samples 16 [--device cpu]

Pets are read from DIR/train/today/<pet>/ (layout_eval's work folder; missing ones are trained
there as `layout_eval` does); the table goes to DIR/export_loss.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.toyworld.evaluate import GUIDANCE, MODEL_DIR, SAMPLE_STEPS, identity_rate, image_rates, load_world
from bench.toyworld.layout_eval import single_pet_sample
from bench.toyworld.world import PETS_BY_NAME
from pipelines.concept import ConceptLibrary
from pipelines.export import LORA_SUFFIX, export_for_webui
from pipelines.sample import initial_latents, make_scheduler

COLLAPSES = ("mean", "layer:6")  # the average of the 16 copies; the copy of the UNet's mid block
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
    pipe.load_lora_weights(str(folder / f"{name}{LORA_SUFFIX}.safetensors"), adapter_name=name)
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder of trained pets (train/today/<pet>/) and of the result")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    work = Path(args.work)
    pets = single_pet_sample(work, args.device)
    results = {"samples": args.samples, "collapses": COLLAPSES, "prompt": PROMPT, "pets": {}}
    base, oracle = load_world(args.device)
    pipe = diffusers_pipeline(args.device)
    for pet in pets:
        library = ConceptLibrary(work / "train" / "today" / pet.name)
        row = {"random": pet.name not in PETS_BY_NAME,
               "full": identity_rate(base, library, oracle, PROMPT.format(name=pet.name), pet.look, args.samples)}
        for how in COLLAPSES:
            with tempfile.TemporaryDirectory() as folder:
                export_for_webui(library, pet.name, folder, how=how)
                images = exported_images(pipe, base, Path(folder), pet.name, args.samples)
            row[how] = image_rates(oracle, images, [pet.look]).short()
        results["pets"][pet.name] = row
        (work / "export_loss.json").write_text(json.dumps(results, indent=1) + "\n")  # a run cut short keeps what it measured
        print(pet.name, json.dumps({k: v for k, v in row.items() if k != "random"}), flush=True)
    cells = ("full",) + COLLAPSES
    for group, random in (("stock", False), ("random", True), ("all", None)):
        rows = [r for r in results["pets"].values() if random is None or r["random"] == random]
        results[f"mean_{group}"] = {c: {k: round(sum(r[c][k] for r in rows) / len(rows), 3)
                                        for k in ("identity", "match", "belly")} for c in cells}
    (work / "export_loss.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k.startswith("mean")}, indent=1))
    return results


if __name__ == "__main__":
    main()
