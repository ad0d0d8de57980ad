"""GPU benchmark of layout control (issue 12): the cost of keeping subjects apart, against plain sampling.

Full SD1.5 architecture with random weights (isolated branches carry synthetic random-LoRA
concepts; regional cases use class-word regions, as bench/run.py does); 512x512, 30
DPM-Solver++ steps with CFG, two subjects side by side, everything through the product code
(`generate` with regions and a `LayoutControl`, `isolate` with boxes). Every figure is a ratio to
plain sampling measured in the same run, eager, plus absolute seconds and peak memory.

Cases:
  plain                   one prompt, no regions (the baseline)
  regional                Mix-of-Show's regional sampler, layout control off (today)
  regional_self           + bounded self-attention masks in every step (target <= 1.3x plain)
  regional_bootstrap      + bootstrapped box branches in the first 20% of steps (target <= 1.7x)
  regional_guidance       + Bounded Attention guidance in the first 30% of steps (reported)
  isolated_boxes          Isolated Diffusion with 2 boxes, each found (target <= 4x)
  isolated_boxes_added    ... one box missed by the detector: its subject is added and bootstrapped
  isolated_boxes_retry    ... the detector merges both boxes in the first layout: one retry

Usage (GPU machine): python bench/layout.py --out DIR        -> DIR/layout.json, printed table
CPU check of the script: python bench/layout.py --architecture tiny --device cpu --out /tmp/b
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.mix_of_show import median_seconds, synthetic_library  # noqa: E402
from pipelines.base import build_tiny_model, load_base  # noqa: E402
from pipelines.detect import Detection  # noqa: E402
from pipelines.isolated import IsolateConfig, Subject, isolate  # noqa: E402
from pipelines.layout import LayoutControl  # noqa: E402
from pipelines.regional import Region  # noqa: E402
from pipelines.sample import SampleConfig, generate  # noqa: E402

TARGETS = {"regional_self": 1.3, "regional_bootstrap": 1.7, "isolated_boxes": 4.0}


def boxes_for(size: int) -> list[tuple[int, int, int, int]]:
    """Two boxes side by side over the lower three quarters of the canvas."""
    return [(size // 32, size // 4, size // 2 - size // 32, size - size // 32),
            (size // 2 + size // 32, size // 4, size - size // 32, size - size // 32)]


def box_detector(boxes, found: str = "both"):
    """A stand-in detector with known answers: "both" finds one animal per box, "one" misses the
    second, "merged-once" first finds one animal across both boxes, then both (a retry)."""
    calls = {"n": 0}

    def detect(image, labels):
        width, height = image.size
        calls["n"] += 1

        def detection(x0, y0, x1, y1):
            mask = np.zeros((height, width), bool)
            mask[y0:y1, x0:x1] = True
            return Detection(labels[0], (x0, y0, x1, y1), 0.9, mask)

        inner = [(b[0] + 8, b[1] + 8, b[2] - 8, b[3] - 8) for b in boxes]
        if found == "merged-once" and calls["n"] % 2 == 1:
            return [detection(inner[0][0], inner[0][1], inner[1][2], inner[1][3])]
        if found == "one":
            return [detection(*inner[0])]
        return [detection(*box) for box in inner]

    return detect


def cases(size: int) -> dict:
    """label -> a function (base, library) that makes one image that way."""
    boxes = boxes_for(size)
    prompt = "a dog and a dog on the grass"
    config = SampleConfig(prompt=prompt, steps=30, seed=0)
    # class-word regions, as bench/run.py times regional sampling: with concepts every call would also
    # load the pair's fused weights, which is not sampling cost
    regions = [Region(box, "a photo of a dog") for box in boxes]
    subjects = tuple(Subject("dog", f"a photo of <c{i:02d}> dog") for i in range(2))

    def regional(layout: LayoutControl):
        return lambda base, library: generate(base, library, config, regions=regions, layout=layout)

    def isolated(found: str):
        iso = IsolateConfig(prompt=prompt, subjects=subjects, steps=30, t_lay=0.75, boxes=tuple(boxes))
        return lambda base, library: isolate(base, library, iso, detector=box_detector(boxes, found))

    return {
        "plain": lambda base, library: generate(base, library, config),
        "regional": regional(LayoutControl()),
        "regional_self": regional(LayoutControl(self_attention=1.0)),
        "regional_bootstrap": regional(LayoutControl(self_attention=1.0, bootstrap=0.2)),
        "regional_guidance": regional(LayoutControl(self_attention=1.0, guidance=0.3)),
        "isolated_boxes": isolated("both"),
        "isolated_boxes_added": isolated("one"),
        "isolated_boxes_retry": isolated("merged-once"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--architecture", default="sd15", choices=["sd15", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", default=None, help="comma-separated cases (default all)")
    args = parser.parse_args()
    cuda = args.device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    work = Path(tempfile.mkdtemp())
    started = time.perf_counter()
    model_dir = build_tiny_model(work / "model", architecture=args.architecture)
    library = synthetic_library(model_dir, work / "library", 2, args.device)
    base = load_base(str(model_dir), device=args.device)
    results = {"device": torch.cuda.get_device_name() if cuda else args.device, "torch": torch.__version__,
               "architecture": args.architecture, "date": time.strftime("%Y-%m-%d"),
               "command": "python bench/layout.py --out $OUT", "cases": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plain = None
    for label, job in cases(base.native_resolution).items():
        if args.only and label != "plain" and label not in args.only.split(","):
            continue
        job(base, library)  # warm-up (loads the concepts, fuses the pair once: the fused model is cached)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = median_seconds(lambda: job(base, library), sync)
        plain = plain or seconds
        row = {"seconds": round(seconds, 3), "ratio_to_plain": round(seconds / plain, 3)}
        if cuda:
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if label in TARGETS:
            row["target"] = f"<= {TARGETS[label]}x"
            row["met"] = row["ratio_to_plain"] <= TARGETS[label]
        results["cases"][label] = row
        (out / "layout.json").write_text(json.dumps(results, indent=1))
        print(f"{label:24s} {row}", flush=True)
    results["total_s"] = round(time.perf_counter() - started, 1)
    (out / "layout.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
