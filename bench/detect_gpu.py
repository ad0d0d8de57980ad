"""GPU check of the detector's memory between jobs (issue 13, item 11), through `pipelines.detect`.

Random weights with the architectures of the defaults: Grounding DINO with its default config
(Swin-T backbone, BERT-base text encoder: grounding-dino-tiny's shape) and SAM ViT-B
(`SamConfig()`, sam-vit-base's shape), saved as local folders and loaded by the product's loader.
Measured on one card, fp16 (the product) and fp32 (before), the same image and labels:
GPU memory allocated before a detection job, its peak, after it; seconds per call (median of 3
after a warm-up); parameter dtype.

Usage (on the GPU machine): python bench/detect_gpu.py --out DIR  -> DIR/detect_gpu.json
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

from pipelines import detect  # noqa: E402

GIB = 2**30


def build_models(work: Path) -> tuple[Path, Path]:
    from transformers import (BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection, GroundingDinoImageProcessor,
                              GroundingDinoProcessor, SamConfig, SamModel, SamProcessor)

    tiny = detect.build_tiny_detector(work / "vocab-source")  # a small WordPiece vocabulary (no download)
    detector_dir, segmenter_dir = work / "grounding-dino", work / "sam"
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(GroundingDinoConfig()).save_pretrained(detector_dir)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(), tokenizer=BertTokenizer(str(tiny / "vocab.txt"))
                           ).save_pretrained(detector_dir)
    SamModel(SamConfig()).save_pretrained(segmenter_dir)
    SamProcessor(image_processor=__import__("transformers").SamImageProcessor()).save_pretrained(segmenter_dir)
    return detector_dir, segmenter_dir


def measure(detector_dir: Path, segmenter_dir: Path, dtype: torch.dtype, image: Image.Image) -> dict:
    detect._MODELS.clear()
    real = detect.detector_dtype
    detect.detector_dtype = lambda device: dtype if torch.device(device).type == "cuda" else torch.float32
    try:
        run = lambda: detect.detect(image, ["dog", "cat"], detector=str(detector_dir), segmenter=str(segmenter_dir),  # noqa: E731
                                    device="cuda", box_threshold=0.0, text_threshold=0.0)
        run()  # load and warm up
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            found = run()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        after = torch.cuda.memory_allocated()
        _, model = detect._MODELS[("detector", str(detector_dir), str(dtype).removeprefix("torch."))]
        return {"dtype": str(dtype).removeprefix("torch."), "param_dtype": str(next(model.parameters()).dtype),
                "param_device": str(next(model.parameters()).device), "detections": len(found),
                "allocated_before_gib": round(before / GIB, 3), "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
                "allocated_after_gib": round(after / GIB, 3), "seconds_median": round(statistics.median(times), 3)}
    finally:
        detect.detector_dtype = real
        detect._MODELS.clear()
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    detector_dir, segmenter_dir = build_models(work)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    rows = [measure(detector_dir, segmenter_dir, dtype, image) for dtype in (torch.float16, torch.float32)]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "command": "python bench/detect_gpu.py --out $OUT", "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "detect_gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
