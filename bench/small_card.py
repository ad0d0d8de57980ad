"""The whole default flow on an emulated small card (issue 15, target 4).

`torch.cuda.set_per_process_memory_fraction` caps this process's allocator at `--gib` of the
H200's memory, which is what a card of that size leaves a program (less its CUDA context: the cap
counts only torch's allocations). Then, through the product code with the memory mode "auto"
(`performance.memory_plan` reads the cap through `free_gpu_gib`), at SD1.5 size with random weights:

  train     an ED-LoRA concept from 5 photos (`--train-steps` steps, batch 2, 512x512)
  fuse      three concepts (the trained one and two random ones of its layout), gradient fusion
  regional  a 512x512 image, 30 steps, two concepts in two boxes, with the fused model
  isolate   Isolated Diffusion of two subjects in boxes with Grounding DINO + SAM ViT-B (random
            weights of the default models' architectures), with the fused model

and then, capped at `--sample-gib`, plain and regional sampling alone. Each stage records the mode
"auto" chose, its seconds, its peak allocated and reserved GiB, or the error it ended with.

Usage (on the GPU machine): python bench/small_card.py --out DIR [--gib 8] [--sample-gib 6]
Writes DIR/small_card.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.isolated import full_size_detector  # noqa: E402
from bench.train_speed import full_size_model, synthetic_photos  # noqa: E402
from pipelines.base import load_base  # noqa: E402
from pipelines.concept import ConceptLibrary  # noqa: E402
from pipelines.fusion import fuse_concepts  # noqa: E402
from pipelines.isolated import IsolateConfig, Subject, isolate  # noqa: E402
from pipelines.performance import configure_performance, free_gpu_gib, memory_plan  # noqa: E402
from pipelines.regional import Region  # noqa: E402
from pipelines.sample import SampleConfig, generate  # noqa: E402
from pipelines.train import TrainConfig, train_concept  # noqa: E402

GIB = 2**30


def cap(gib: float) -> None:
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(gib * GIB / total)


def stage(results: dict, name: str, job: str | None, base, fn) -> object:
    """Run one stage; record the mode auto picks for `job`, seconds, peaks, or the error."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    row = {"free_gib_at_start": round(free_gpu_gib(torch.device("cuda")), 2)}
    if job is not None:
        row["auto_mode"] = memory_plan(base, job).mode
    start = time.perf_counter()
    value = None
    try:
        value = fn()
        torch.cuda.synchronize()
        row["seconds"] = round(time.perf_counter() - start, 2)
    except Exception as error:
        row["error"] = f"{type(error).__name__}: {error}"[:1500]
        row["trace"] = traceback.format_exc()[-1500:]
    row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
    results[name] = row
    print(name, json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
    return value


def random_concepts(library: ConceptLibrary, template: str, count: int) -> list[str]:
    """`count` concepts with the template's layout and random LoRA deltas of about 1%."""
    concept, tensors = library.get(template), library.weights(template)
    generator = torch.Generator().manual_seed(1)
    names = []
    for i in range(count):
        new = {}
        for key, value in tensors.items():
            if key == "embeddings":
                new[key] = value + 0.02 * torch.randn(value.shape, generator=generator)
            elif ".lora_A." in key:
                new[key] = torch.randn(value.shape, generator=generator) / value.shape[1] ** 0.5
            else:
                new[key] = 0.01 * torch.randn(value.shape, generator=generator)
        concept.name = f"pet{i + 2}"
        library.save(concept, new)
        names.append(concept.name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--gib", type=float, default=8.0)
    parser.add_argument("--sample-gib", type=float, default=6.0)
    parser.add_argument("--train-steps", type=int, default=30)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp())
    model = full_size_model()
    gdino, sam = full_size_detector(work / "detector")
    library = ConceptLibrary(work / "library")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "command": "python bench/small_card.py " + " ".join(sys.argv[1:]), "cap_gib": args.gib,
               "sample_cap_gib": args.sample_gib, "train_steps": args.train_steps, "stages": {}}
    stages = results["stages"]

    def save() -> None:
        (out / "small_card.json").write_text(json.dumps(results, indent=1) + "\n")

    cap(args.gib)
    base = stage(stages, "load", None, None, lambda: load_base(str(model), device="cuda"))
    configure_performance(base, memory="auto")
    results["dtype"] = str(base.dtype)

    def train():
        config = TrainConfig(name="pet1", class_word="dog", steps=args.train_steps, batch_size=2, checkpoint_every=0)
        result = train_concept(base, synthetic_photos(), config)
        library.save(result.concept, result.tensors, result.preview)
        return result

    trained = stage(stages, "train", "train", base, train)
    if trained is not None:
        stages["train"]["ms_per_step"] = round(1000 * trained.seconds / args.train_steps, 1)
    save()
    names = ["pet1"] + random_concepts(library, "pet1", 2) if trained is not None else []
    fused = stage(stages, "fuse", None, base, lambda: fuse_concepts(base, library, names))
    save()
    fused_dir = getattr(fused, "folder", None)
    regions = [Region((0, 0, 256, 512), "a <pet1> dog"), Region((256, 0, 512, 512), "a <pet2> dog")]
    prompt = "a <pet1> dog and a <pet2> dog on the grass"
    stage(stages, "regional", "sample", base,
          lambda: generate(base, library, SampleConfig(prompt=prompt, steps=30, seed=0), regions=regions, fused=fused_dir))
    save()
    subjects = (Subject("dog", "a <pet1> dog"), Subject("cat", "a <pet2> cat"))
    config = IsolateConfig(prompt="a dog and a cat on the grass", subjects=subjects, steps=30, boxes=((0, 64, 256, 448), (256, 64, 512, 448)))
    stage(stages, "isolate", "sample", base,
          lambda: isolate(base, library, config, detector=str(gdino), segmenter=str(sam), fused=fused_dir))
    save()

    cap(args.sample_gib)
    plain = SampleConfig(prompt="a dog on the grass", steps=30, seed=0)
    stage(stages, f"plain_at_{args.sample_gib:g}gib", "sample", base, lambda: generate(base, library, plain))
    stage(stages, f"regional_at_{args.sample_gib:g}gib", "sample", base,
          lambda: generate(base, library, SampleConfig(prompt=prompt, steps=30, seed=0), regions=regions, fused=fused_dir))
    save()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
