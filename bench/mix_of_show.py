"""GPU benchmark of Mix-of-Show multi-concept: exact gradient fusion and regional sampling.

Full SD1.5 architecture with random weights; synthetic concepts with random rank-4 LoRA deltas on
every LoRA'd layer and random layer-wise embeddings (the cost of fusion does not depend on what the
deltas encode). Everything runs through the product code (`fuse_concepts`, `generate`).

Measured in one run on one card:
  - gradient fusion of 2, 5 and 14 concepts: seconds and peak GPU GiB (each on a freshly loaded base);
  - sampling 512x512, 30 DPM-Solver++ steps with CFG: plain, 2 regions, 4 regions (median of 3).

Usage (GPU machine): python bench/mix_of_show.py --out DIR      -> DIR/mix_of_show.json
Quick check of the script on a CPU: python bench/mix_of_show.py --architecture tiny --device cpu --out /tmp/b
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.base import build_tiny_model, load_base  # noqa: E402
from pipelines.concept import ConceptLibrary  # noqa: E402
from pipelines.fusion import FusionConfig, fuse_concepts  # noqa: E402
from pipelines.regional import Region  # noqa: E402
from pipelines.sample import SampleConfig, generate  # noqa: E402
from pipelines.train import TrainConfig, train_concept  # noqa: E402

GIB = 2**30


def synthetic_library(model_dir: Path, root: Path, count: int, device: str) -> ConceptLibrary:
    """`count` concepts: one trained for a step (for the tensor layout), the rest random of that layout."""
    library = ConceptLibrary(root)
    base = load_base(str(model_dir), device=device)
    photos = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (320, 256, 3), dtype=np.uint8)) for i in range(2)]
    template = train_concept(base, photos, TrainConfig(name="c00", class_word="dog", steps=1, checkpoint_every=0, preview_steps=1))
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        tensors = {}
        for key, value in template.tensors.items():
            if key == "embeddings":
                tensors[key] = value + 0.02 * torch.randn(value.shape, generator=generator)
            elif ".lora_A." in key:
                tensors[key] = torch.randn(value.shape, generator=generator) / value.shape[1] ** 0.5
            else:  # lora_B: a delta of about 1% of a unit-scale weight
                tensors[key] = 0.01 * torch.randn(value.shape, generator=generator)
        concept = template.concept
        concept.name = f"c{i:02d}"
        library.save(concept, tensors, template.preview)
    del base
    return library


def median_seconds(fn, sync, repeats: int = 3) -> float:
    """Median wall time of `fn()` over `repeats` runs, the device synchronised around each."""
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--architecture", default="sd15")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--counts", default="2,5,14")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def peak() -> float | None:
        return round(torch.cuda.max_memory_allocated() / GIB, 2) if cuda else None

    work = Path(tempfile.mkdtemp())
    model_dir = build_tiny_model(work / "model", architecture=args.architecture)
    counts = [int(c) for c in args.counts.split(",")]
    library = synthetic_library(model_dir, work / "library", max(counts), args.device)
    results = {"device": torch.cuda.get_device_name() if cuda else args.device, "torch": torch.__version__,
               "architecture": args.architecture, "date": time.strftime("%Y-%m-%d"),
               "command": "python bench/mix_of_show.py --out $OUT", "fusion": [], "sampling": []}

    # Fusion, each on a fresh base
    for count in counts:
        base = load_base(str(model_dir), device=args.device)
        names = [f"c{i:02d}" for i in range(count)]
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        stages = {}
        last = [time.perf_counter()]

        def on_stage(stage: str, done: int, total: int) -> None:
            sync()
            now = time.perf_counter()
            key = stage.split(" of ")[0]
            stages[key] = stages.get(key, 0.0) + now - last[0]
            last[0] = now

        start = time.perf_counter()
        fused = fuse_concepts(base, library, names, FusionConfig(), out_dir=work / f"fused{count}", callback=on_stage)
        sync()
        seconds = time.perf_counter() - start
        summary = fused.report["summary"]
        row = {"concepts": count, "seconds": round(seconds, 2), "peak_gib": peak(),
               "stage_seconds": {k: round(v, 2) for k, v in stages.items()},
               "mean_relative_error": statistics.mean(s["mean_relative_error"] for s in summary.values()),
               "weight_average_mean_relative_error": statistics.mean(s["weight_average_mean_relative_error"] for s in summary.values())}
        results["fusion"].append(row)
        print(json.dumps(row), flush=True)
        del base, fused
        if cuda:
            torch.cuda.empty_cache()

    # Sampling: plain, 2 and 4 regions
    base = load_base(str(model_dir), device=args.device)
    size = base.native_resolution
    half, quarter = size // 2, size // 4
    layouts = {
        "plain": [],
        "regional2": [Region((0, 0, half, size), "a dog"), Region((half, 0, size, size), "a cat")],
        "regional4": [Region((0, 0, half, half), "a dog"), Region((half, 0, size, half), "a cat"),
                      Region((0, half, half, size), "a bird"), Region((quarter, quarter, size, size), "a rabbit")],
    }
    config = SampleConfig(prompt="animals on the grass", steps=30, seed=0)
    for label, regions in layouts.items():
        generate(base, library, SampleConfig(prompt=config.prompt, steps=3), regions=regions)  # warm-up
        seconds = median_seconds(lambda: generate(base, library, config, regions=regions), sync)
        results["sampling"].append({"layout": label, "regions": len(regions), "steps": 30, "size": size,
                                    "seconds_median": round(seconds, 3)})
    plain = results["sampling"][0]["seconds_median"]
    for row in results["sampling"]:
        row["ratio_to_plain"] = round(row["seconds_median"] / plain, 3)
        print(json.dumps(row), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mix_of_show.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
