"""Why sampling with one concept costs more than plain sampling (found in issue 13's H200 run: 2.02 s
vs 1.06 s): the same 30-step generation, one run, three ways.

  plain     - no concept in the prompt;
  wrapped   - one concept with its UNet LoRA folded in and peft's wrappers left in every UNet linear
              (the product before this measurement);
  unwrapped - the product now: the same folded weights, each peft LoRA wrapper of the UNet swapped
              for its base linear while sampling (`edlora.merged_adapter(unwrap=True)`); same image checked.

Usage (on the GPU machine): python bench/concept_overhead.py --out DIR -> DIR/concept_overhead.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.train_sd15 import synthetic_photos  # noqa: E402
from pipelines.base import build_tiny_model, load_base  # noqa: E402
from pipelines.concept import ConceptLibrary  # noqa: E402
from pipelines.edlora import merged_adapter  # noqa: E402
from pipelines.sample import SampleConfig, generate  # noqa: E402
from pipelines.train import TrainConfig, train_concept  # noqa: E402


def timed(base, library, prompt: str, repeats: int = 3) -> tuple[float, np.ndarray]:
    generate(base, library, SampleConfig(prompt=prompt, steps=3))
    times, image = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        image = generate(base, library, SampleConfig(prompt=prompt, steps=30, seed=0)).images[0]
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 3), np.asarray(image)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    model_dir = build_tiny_model(work / "m", architecture="sd15")
    library = ConceptLibrary(work / "lib")
    base = load_base(str(model_dir), device="cuda")
    trained = train_concept(base, synthetic_photos(3), TrainConfig(name="mochi", class_word="dog", steps=2, checkpoint_every=0, preview_steps=2))
    library.save(trained.concept, trained.tensors, trained.preview)
    base = load_base(str(model_dir), device="cuda")
    rows = {}
    rows["plain_s"], _ = timed(base, library, "a photo of a dog on a beach")
    import pipelines.edlora as edlora

    edlora.merged_adapter = lambda model, adapter, unwrap=False: merged_adapter(model, adapter, False)  # the wrappers kept
    try:
        rows["wrapped_s"], with_wrappers = timed(base, library, "a photo of <mochi> on a beach")
    finally:
        edlora.merged_adapter = merged_adapter
    rows["unwrapped_s"], without_wrappers = timed(base, library, "a photo of <mochi> on a beach")
    rows["same_image"] = bool(np.array_equal(with_wrappers, without_wrappers))
    rows["max_pixel_difference"] = int(np.abs(with_wrappers.astype(int) - without_wrappers.astype(int)).max())
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "command": "python bench/concept_overhead.py --out $OUT", "steps": 30, **rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "concept_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
