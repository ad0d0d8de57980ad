"""GPU benchmark of the foundation: ED-LoRA training and sampling at full SD1.5 size.

Random weights with SD1.5's exact architecture (UNet 859.5M, VAE 83.7M, CLIP-L text encoder 123M
parameters) cost the same FLOPs and memory as the real ones. Everything runs through the product
code: `load_base` on a diffusers folder, `train_concept`, `generate`.

Measured, in one run on one card:
  - ED-LoRA training, 512x512, 50 steps, batch 2 and batch 1: median ms per step (steps 6-50),
    peak GiB; frozen UNet in fp16 with fp32 text encoder and trainables and a loss scaler
    (Menagerie's recipe), and in bf16 (the recipe before issue 13);
  - the same at batch 2 with every weight in fp32 (the naive baseline), 20 steps;
  - sampling 512x512, 30 DPM-Solver++ steps with CFG: base prompt, and with the trained concept.

Usage (on the GPU machine): python bench/train_sd15.py --out DIR
Writes DIR/train_sd15.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
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
from pipelines.sample import SampleConfig, generate  # noqa: E402
from pipelines.train import TrainConfig, train_concept  # noqa: E402

GIB = 2**30
DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / GIB, 2) if DEVICE == "cuda" else None


def empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def synthetic_photos(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (640, 512, 3), dtype=np.uint8)) for _ in range(count)]


def time_training(model_dir: Path, dtype: str, batch_size: int, steps: int, name: str) -> dict:
    base = load_base(str(model_dir), device=DEVICE, dtype=dtype)
    sync()
    reset_peak()
    stamps: list[float] = []

    def on_step(progress) -> None:  # loss.item() inside the loop has synchronised already
        stamps.append(time.perf_counter())

    config = TrainConfig(name=name, class_word="dog", steps=steps, batch_size=batch_size, checkpoint_every=0, preview_steps=2)
    result = train_concept(base, synthetic_photos(5), config, callback=on_step)
    step_ms = [1000 * (b - a) for a, b in zip(stamps, stamps[1:])][5:]
    row = {
        "dtype": dtype, "batch_size": batch_size, "steps": steps,
        "step_ms_median": round(statistics.median(step_ms), 2),
        "step_ms_p90": round(sorted(step_ms)[int(0.9 * (len(step_ms) - 1))], 2),
        "peak_gib": peak_gib(),
        "final_loss": round(result.losses[-1], 4),
    }
    del base, result
    empty_cache()
    return row


def time_sampling(model_dir: Path, library: ConceptLibrary, prompt: str, repeats: int = 3) -> dict:
    base = load_base(str(model_dir), device=DEVICE)
    config = SampleConfig(prompt=prompt, steps=30, seed=0)
    generate(base, library, SampleConfig(prompt=prompt, steps=3))  # warm-up
    sync()
    reset_peak()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        generate(base, library, config)
        sync()
        times.append(time.perf_counter() - start)
    return {"prompt": prompt, "steps": 30, "seconds_median": round(statistics.median(times), 3), "peak_gib": peak_gib()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--architecture", default="sd15", help="sd15 (the benchmark) or tiny (a quick check of this script on a CPU)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    work = Path(tempfile.mkdtemp())
    started = time.perf_counter()
    model_dir = build_tiny_model(work / "random-model", architecture=args.architecture)
    build_s = time.perf_counter() - started

    results = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE,
        "architecture": args.architecture,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/train_sd15.py --out $OUT",
        "build_random_sd15_s": round(build_s, 1),
        "train": [],
    }
    print(f"built random {args.architecture} model in {build_s:.1f} s", flush=True)
    results["train"].append(time_training(model_dir, "fp16", 2, args.steps, "bench-b2"))  # the default, loss scaled
    results["train"].append(time_training(model_dir, "fp16", 1, args.steps, "bench-b1"))
    results["train"].append(time_training(model_dir, "bf16", 2, args.steps, "bench-bf16"))  # the default before issue 13
    results["train"].append(time_training(model_dir, "fp32", 2, 20, "bench-fp32"))

    # A concept for the sampling timing, trained briefly and saved through the library
    library = ConceptLibrary(work / "library")
    base = load_base(str(model_dir), device=DEVICE)
    trained = train_concept(base, synthetic_photos(3), TrainConfig(name="mochi", class_word="dog", steps=2, checkpoint_every=0, preview_steps=2))
    library.save(trained.concept, trained.tensors, trained.preview)
    del base
    empty_cache()
    results["sample"] = [
        time_sampling(model_dir, library, "a photo of a dog on a beach"),
        time_sampling(model_dir, library, "a photo of <mochi> on a beach"),
    ]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_sd15.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{results['device']}, torch {results['torch']}")
    print("| training (512x512) | dtype | batch | ms/step (median) | p90 | peak GiB |")
    print("|---|---|---|---|---|---|")
    for row in results["train"]:
        print(f"| ED-LoRA | {row['dtype']} | {row['batch_size']} | {row['step_ms_median']} | {row['step_ms_p90']} | {row['peak_gib']} |")
    print("| sampling (512x512, 30 steps, CFG) | s/image | peak GiB |")
    for row in results["sample"]:
        print(f"| {row['prompt']} | {row['seconds_median']} | {row['peak_gib']} |")


if __name__ == "__main__":
    main()
