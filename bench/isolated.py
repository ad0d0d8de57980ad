"""GPU benchmark of Isolated Diffusion: sampling with 2 and 3 subjects against plain sampling.

Full SD1.5 architecture with random weights; subjects carry synthetic random-LoRA concepts (each
branch runs its own ED-LoRA through peft's mixed-adapter batch). The detector is timed apart on
full-size random Grounding DINO (Swin-T + BERT-base, as grounding-dino-tiny) and SAM ViT-B
architectures; inside the isolate timings a stand-in detector returns fixed masks, so the numbers
are the sampling cost alone (random detectors find random boxes).

Usage (GPU machine): python bench/isolated.py --out DIR        -> DIR/isolated.json
CPU check of the script: python bench/isolated.py --architecture tiny --device cpu --out /tmp/b
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
from pipelines import detect as detect_module  # noqa: E402
from pipelines.base import build_tiny_model, load_base  # noqa: E402
from pipelines.detect import Detection, build_tiny_detector  # noqa: E402
from pipelines.isolated import IsolateConfig, Subject, isolate  # noqa: E402
from pipelines.sample import SampleConfig, generate  # noqa: E402

LABELS = ["dog", "cat", "bird"]


def stand_in_detector(image, labels):
    """Vertical stripes, one per label, best score first."""
    width, height = image.size
    out = []
    for i, label in enumerate(labels):
        mask = np.zeros((height, width), bool)
        mask[:, i * width // len(labels) : (i + 1) * width // len(labels)] = True
        out.append(Detection(label, (i * width / len(labels), 0, (i + 1) * width / len(labels), height), 0.9 - 0.1 * i, mask))
    return out


def full_size_detector(folder: Path) -> tuple[Path, Path]:
    """Random-weight Grounding DINO (grounding-dino-tiny's architecture) and SAM ViT-B, saved as folders."""
    from transformers import (GroundingDinoConfig, GroundingDinoForObjectDetection, GroundingDinoImageProcessor,
                              GroundingDinoProcessor, SamConfig, SamImageProcessor, SamModel, SamProcessor)

    tiny = build_tiny_detector(folder / "tokenizer-source")  # only its small WordPiece vocabulary is reused
    processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(),
                                       tokenizer=GroundingDinoProcessor.from_pretrained(tiny).tokenizer)
    detector = GroundingDinoForObjectDetection(GroundingDinoConfig())
    detector.save_pretrained(folder / "gdino")
    processor.save_pretrained(folder / "gdino")
    sam = SamModel(SamConfig())
    sam.save_pretrained(folder / "sam")
    SamProcessor(image_processor=SamImageProcessor()).save_pretrained(folder / "sam")
    return folder / "gdino", folder / "sam"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--architecture", default="sd15")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    cuda = args.device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(fn):
        fn()  # warm-up
        return median_seconds(fn, sync)

    work = Path(tempfile.mkdtemp())
    model_dir = build_tiny_model(work / "model", architecture=args.architecture)
    library = synthetic_library(model_dir, work / "library", 3, args.device)
    base = load_base(str(model_dir), device=args.device)
    results = {"device": torch.cuda.get_device_name() if cuda else args.device, "torch": torch.__version__,
               "architecture": args.architecture, "date": time.strftime("%Y-%m-%d"),
               "command": "python bench/isolated.py --out $OUT", "steps": 30, "t_lay": 0.75}

    results["sample_plain_s"] = round(timed(lambda: generate(base, library, SampleConfig(prompt="a dog, a cat and a bird", steps=30))), 3)
    for count in (2, 3):
        subjects = tuple(Subject(label, f"a photo of <c{i:02d}> {label}") for i, label in enumerate(LABELS[:count]))
        config = IsolateConfig(prompt="a dog, a cat and a bird on the grass", subjects=subjects, steps=30, t_lay=0.75)
        seconds = timed(lambda: isolate(base, library, config, detector=stand_in_detector))
        results[f"sample_isolated{count}_s"] = round(seconds, 3)
        # where the time goes, in one more run: stage boundaries from the progress callback
        marks = {}

        def on_step(stage: str, step: int, total: int) -> None:
            sync()
            now = time.perf_counter()
            marks.setdefault(stage, [now, now, total])[1] = now

        sync()
        start = time.perf_counter()
        isolate(base, library, config, detector=stand_in_detector, callback=on_step)
        sync()
        end = time.perf_counter()
        layout_first, layout_last, _ = marks["layout"]
        isolate_first, isolate_last, isolate_steps = marks["isolate"]
        results[f"isolated{count}_breakdown_s"] = {
            "setup_and_first_layout_step": round(layout_first - start, 3),
            "layout_steps": round(layout_last - layout_first, 3),
            "detect_and_branch_setup": round(isolate_first - layout_last, 3),
            "isolate_steps": round(isolate_last - isolate_first, 3),
            "decode": round(end - isolate_last, 3),
            "isolate_step_count": isolate_steps,
        }
        results[f"isolated{count}_ratio_to_plain"] = round(seconds / results["sample_plain_s"], 3)
        print(json.dumps({k: v for k, v in results.items() if k.startswith(("sample", "isolated"))}), flush=True)

    if args.architecture == "sd15":
        gdino, sam = full_size_detector(work)
    else:
        gdino, sam = "tiny", "tiny"
    image = generate(base, library, SampleConfig(prompt="a dog", steps=2)).images[0]
    detect_module.load_model("detector", str(gdino), base.device)
    detect_module.load_model("segmenter", str(sam), base.device)
    results["detect_segment_s"] = round(timed(lambda: detect_module.detect(image, ["dog", "cat"], detector=str(gdino), segmenter=str(sam),
                                                                            device=base.device)), 3)
    print(json.dumps(results), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "isolated.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
