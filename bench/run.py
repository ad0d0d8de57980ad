"""The performance benchmark: training, fusion and sampling at full SD1.5 size, in one command.

Random weights with SD1.5's exact architecture (same FLOPs and memory as real weights) and
synthetic random-LoRA concepts; everything runs through the product code (`train_concept`,
`fuse_concepts`, `generate`, `isolate`) with the settings the product exposes (`--memory`,
`--compile`). Every figure has its baseline from the same run beside it.

Sections (`--only`, comma-separated; default all, in this order):
  train   ED-LoRA step at 512: batch 2 and 1 (bf16 frozen weights, fp32 trainables, compiled
          UNet), low-memory mode at batch 2, and the baseline: diffusers' LoRA example recipe
          (every weight fp32 under bf16 autocast, eager); ms/step, peak GiB, TFLOP/s (FLOPs of one
          step counted with torch's FlopCounterMode).
  sample  512x512, 30 DPM-Solver++ steps with CFG: plain, 2 and 4 regions, Isolated Diffusion with
          2 and 3 subjects (stand-in detector inside, Grounding DINO + SAM timed apart); eager and
          compiled, each with its ratio to plain in the same mode.
  fuse    gradient fusion of 2, 5 and 14 concepts (seconds, peak GiB), and Mix-of-Show's LBFGS on
          a few of the same layers: seconds per layer and both objective values.

Usage (GPU machine, about 8 minutes on one H100):
    python bench/run.py --out $OUT
CPU check of the script itself (timings mean nothing):
    python bench/run.py --architecture tiny --device cpu --out /tmp/bench --train-compile off --sample-compile off

Writes OUT/results.json (rewritten after every measurement, so a run cut short keeps what it
measured; `--merge FILE` adds to an earlier run's results) and OUT/RESULTS.md, and prints a table.
Split over two device calls if one is too short:
    python bench/run.py --out $OUT --only train,fuse
    python bench/run.py --out $OUT --only sample --merge bench/results.json   # the first call's file
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.isolated import LABELS, full_size_detector, stand_in_detector  # noqa: E402
from bench.mix_of_show import synthetic_library  # noqa: E402
from pipelines import detect as detect_module  # noqa: E402
from pipelines import fusion as fusion_module  # noqa: E402
from pipelines.base import build_tiny_model, load_base  # noqa: E402
from pipelines.fusion import FusionConfig, fuse_concepts  # noqa: E402
from pipelines.isolated import IsolateConfig, Subject, isolate  # noqa: E402
from pipelines.performance import configure_performance  # noqa: E402
from pipelines.regional import Region  # noqa: E402
from pipelines.sample import SampleConfig, generate  # noqa: E402
from pipelines.train import TrainConfig, train_concept  # noqa: E402

GIB = 2**30
SECTIONS = ("train", "sample", "fuse")
TARGETS = {  # issue 15's targets on one H200 (seconds, GiB, or ms); issue 6's on the H100 were 0.45 s and 0.5 s for sampling
    "train_step_ms_b2": ("<=", 60.0), "train_peak_gib_b2": ("<", 10.0), "train_peak_gib_b2_low": ("<", 6.0),
    "fuse_14_s": ("<=", 60.0), "sample_plain_s": ("<=", 0.3), "sample_regional2_s": ("<=", 0.35),
    "sample_isolated2_s": ("<=", 1.0),
}


class Bench:
    """Device helpers and the results file, rewritten after every measurement."""

    def __init__(self, device: str, out: Path, merge: Path | None):
        self.device = device
        self.cuda = device.startswith("cuda")
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.results = json.loads(merge.read_text()) if merge else {}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated() / GIB, 2) if self.cuda else None

    def record(self, key: str, value) -> None:
        self.results[key] = value
        print(f"{key}: {json.dumps(value)}", flush=True)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, sort_keys=True) + "\n")

    def median_seconds(self, fn, repeats: int = 3) -> float:
        """Median wall time of `fn()` over `repeats` runs, the device synchronised around each."""
        times = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def synthetic_photos(count: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size * 5 // 4, size, 3), dtype=np.uint8)) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# Training


def step_flops(model_dir: Path, device: str, batch_size: int) -> float:
    """FLOPs of one training step: a 2-step run minus a 1-step run (both end with the same preview)."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for steps in (1, 2):
        base = load_base(str(model_dir), device=device)
        configure_performance(base, memory="high", compile="off")
        config = TrainConfig(name="flops", class_word="dog", steps=steps, batch_size=batch_size, checkpoint_every=0, preview_steps=1)
        with FlopCounterMode(display=False) as counter:
            train_concept(base, synthetic_photos(2, 64), config)
        counts.append(counter.get_total_flops())
        del base
    return float(counts[1] - counts[0])


def time_training(bench: Bench, model_dir: Path, *, batch_size: int, steps: int, dtype: str | None = None,
                  memory: str = "high", compile: str = "off", autocast: bool = False) -> dict:
    """Median ms per step (after the first `steps // 3`), peak GiB and the time to the first step."""
    base = load_base(str(model_dir), device=bench.device, dtype=dtype)
    configure_performance(base, memory=memory, compile=compile)
    bench.reset_peak()
    stamps: list[float] = []
    config = TrainConfig(name="bench", class_word="dog", steps=steps, batch_size=batch_size, checkpoint_every=0, preview_steps=1)
    amp = torch.autocast(bench.device.split(":")[0], dtype=torch.bfloat16) if autocast else nullcontext()

    def on_step(progress) -> None:  # each step reads its loss back: a host timestamp per step is a synchronised one
        stamps.append(time.perf_counter())
        if progress.step == progress.total:  # the closing preview runs eagerly: no inference compile here
            configure_performance(base, memory=memory, compile="off")

    start = time.perf_counter()
    with amp:
        train_concept(base, synthetic_photos(5, base.native_resolution), config, callback=on_step)
    step_ms = [1000 * (b - a) for a, b in zip(stamps, stamps[1:])][steps // 3:]
    row = {"batch_size": batch_size, "steps": steps, "dtype": str(base.dtype).replace("torch.", ""), "memory": memory,
           "compile": compile, "autocast": autocast, "ms_median": round(statistics.median(step_ms), 2),
           "ms_p90": round(sorted(step_ms)[int(0.9 * (len(step_ms) - 1))], 2), "peak_gib": bench.peak_gib(),
           "first_step_s": round(stamps[0] - start, 1)}
    del base
    return row


def run_train(bench: Bench, model_dir: Path, args) -> None:
    steps = args.train_steps
    flops = step_flops(model_dir, bench.device, 2)
    bench.record("train_flop_b2", flops)
    bench.record("train_flop_b1", step_flops(model_dir, bench.device, 1))

    baseline = time_training(bench, model_dir, batch_size=2, steps=steps, dtype="fp32", autocast=True)
    bench.record("train_baseline_b2", baseline)
    bench.record("train_step_ms_b2_baseline", baseline["ms_median"])
    bench.record("train_peak_gib_b2_baseline", baseline["peak_gib"])

    eager = time_training(bench, model_dir, batch_size=2, steps=steps)
    bench.record("train_eager_b2", eager)
    for batch_size in (2, 1):
        try:
            row = time_training(bench, model_dir, batch_size=batch_size, steps=steps, compile=args.train_compile)
        except Exception as error:  # a compiler failure is a result too; fall back to the eager figure
            if args.train_compile == "off":
                raise
            bench.record(f"train_b{batch_size}_compile_error", f"{type(error).__name__}: {error}"[:2000])
            row = eager if batch_size == 2 else time_training(bench, model_dir, batch_size=1, steps=steps)
        row["tflops"] = round(bench.results[f"train_flop_b{batch_size}"] / row["ms_median"] / 1e9, 1)
        bench.record(f"train_b{batch_size}", row)
        bench.record(f"train_step_ms_b{batch_size}", row["ms_median"])
        bench.record(f"train_peak_gib_b{batch_size}", row["peak_gib"])
    bench.record("train_tflops_b2_baseline", round(flops / baseline["ms_median"] / 1e9, 1))
    bench.record("train_speedup_b2", round(baseline["ms_median"] / bench.results["train_step_ms_b2"], 2))

    low = time_training(bench, model_dir, batch_size=2, steps=max(6, steps // 2), memory="low")
    bench.record("train_low_b2", low)
    bench.record("train_peak_gib_b2_low", low["peak_gib"])


# ---------------------------------------------------------------------------------------------
# Sampling


def sample_jobs(size: int) -> dict:
    """label -> a function (base, library) that makes one 512x512, 30-step image that way."""
    half, quarter = size // 2, size // 4
    config = SampleConfig(prompt="a dog, a cat and a bird on the grass", steps=30, seed=0)
    regions = {
        2: [Region((0, 0, half, size), "a dog"), Region((half, 0, size, size), "a cat")],
        4: [Region((0, 0, half, half), "a dog"), Region((half, 0, size, half), "a cat"),
            Region((0, half, half, size), "a bird"), Region((quarter, quarter, size, size), "a rabbit")],
    }

    def isolated(count: int, boxes: bool = False):
        subjects = tuple(Subject(label, f"a photo of <c{i:02d}> {label}") for i, label in enumerate(LABELS[:count]))
        if boxes:  # the studio's way: one box per subject (the stand-in detector's stripes), branches from 0.3 T
            stripes = tuple((i * size // count, 0, (i + 1) * size // count, size) for i in range(count))
            iso = IsolateConfig(prompt=config.prompt, subjects=subjects, steps=30, boxes=stripes)
        else:
            iso = IsolateConfig(prompt=config.prompt, subjects=subjects, steps=30, t_lay=0.75)
        return lambda base, library: isolate(base, library, iso, detector=stand_in_detector)

    return {
        "plain": lambda base, library: generate(base, library, config),
        "regional2": lambda base, library: generate(base, library, config, regions=regions[2]),
        "regional4": lambda base, library: generate(base, library, config, regions=regions[4]),
        "isolated2": isolated(2),
        "isolated3": isolated(3),
        "isolated2_boxes": isolated(2, boxes=True),
    }


def run_sample(bench: Bench, model_dir: Path, library, work: Path, args) -> None:
    base = load_base(str(model_dir), device=bench.device)
    jobs = {label: job for label, job in sample_jobs(base.native_resolution).items() if label in args.sample_jobs.split(",")}
    modes = ["off"] + ([args.sample_compile] if args.sample_compile != "off" else [])
    for mode in modes:
        configure_performance(base, memory="high", compile=mode)
        rows = {}
        for label, job in jobs.items():
            warm = time.perf_counter()
            try:
                for _ in range(1 if mode == "off" else 2):  # compiles this shape; reduce-overhead records CUDA graphs on the 2nd
                    job(base, library)
            except Exception as error:  # a compiler failure is a result too; the eager figure stands
                if mode == "off":
                    raise
                bench.record(f"sample_{mode}_{label}_error", f"{type(error).__name__}: {error}"[:2000])
                rows[label] = bench.results[f"sample_off_{label}"]
                bench.record(f"sample_{mode}_{label}", {**rows[label], "fell_back_to_eager": True})
                configure_performance(base, memory="high", compile=mode)  # a fresh wrapper for the next layout
                continue
            warm_s = time.perf_counter() - warm
            bench.reset_peak()
            seconds = bench.median_seconds(lambda: job(base, library))
            rows[label] = {"seconds": round(seconds, 3), "ratio_to_plain": round(seconds / rows.get("plain", {"seconds": seconds})["seconds"], 3),
                           "peak_gib": bench.peak_gib(), "warm_up_s": round(warm_s, 1)}
            bench.record(f"sample_{mode}_{label}", rows[label])
    best = modes[-1]
    for label in jobs:
        bench.record(f"sample_{label}_s", bench.results[f"sample_{best}_{label}"]["seconds"])
        bench.record(f"sample_{label}_s_eager", bench.results[f"sample_off_{label}"]["seconds"])
    bench.record("sample_best_mode", best)

    # Detection + segmentation of one image, timed apart (the isolated timings use a stand-in)
    if args.architecture == "sd15":
        gdino, sam = full_size_detector(work)
    else:
        gdino, sam = "tiny", "tiny"
    configure_performance(base, memory="high", compile="off")
    image = generate(base, library, SampleConfig(prompt="a dog", steps=2)).images[0]
    detect_module.load_model("detector", str(gdino), base.device)
    detect_module.load_model("segmenter", str(sam), base.device)

    def detect_once():
        detect_module.detect(image, ["dog", "cat"], detector=str(gdino), segmenter=str(sam), device=base.device)

    detect_once()
    bench.record("detect_segment_s", round(bench.median_seconds(detect_once), 3))


# ---------------------------------------------------------------------------------------------
# Fusion


def lbfgs_fuse(w0: torch.Tensor, deltas: list[torch.Tensor], grams: list[torch.Tensor], max_iter: int) -> tuple[torch.Tensor, float]:
    """Mix-of-Show's fusion of one layer: LBFGS from W0 on sum_i ||W X_i - (W0 + dW_i) X_i||^2.

    The objective is evaluated through the Grams, tr((W - T_i) G_i (W - T_i)^T): the same value as
    through the activations X_i. float32 on the device, as Mix-of-Show runs it. Returns (W, seconds).
    """
    device = w0.device
    targets = [(w0 + d).float() for d in deltas]
    grams32 = [g.float().to(device) for g in grams]
    weight = w0.float().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight], lr=1.0, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = sum(((weight - t) @ g * (weight - t)).sum() for t, g in zip(targets, grams32))
        loss.backward()
        return loss

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    optimizer.step(closure)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return weight.detach(), time.perf_counter() - start


def objective(w: torch.Tensor, w0: torch.Tensor, deltas: list[torch.Tensor], grams: list[torch.Tensor]) -> float:
    """sum_i ||W X_i - (W0 + dW_i) X_i||^2 from the Grams, in float64."""
    total = 0.0
    for d, g in zip(deltas, grams):
        error = w.double() - (w0.double() + d.double())
        total += float(torch.einsum("oi,ij,oj->", error, g.double(), error))
    return total


def run_fuse(bench: Bench, model_dir: Path, library, work: Path, args) -> None:
    captured = []
    solve = fusion_module._solve

    def capturing_solve(w0s, deltas, grams, config, device):  # keeps the inputs of the first solves
        if len(captured) < 2:
            captured.append((w0s, deltas, grams))
        return solve(w0s, deltas, grams, config, device)

    for count in args.fuse_counts:
        base = load_base(str(model_dir), device=bench.device)
        names = [f"c{i:02d}" for i in range(count)]
        bench.reset_peak()
        fusion_module._solve = capturing_solve if count == max(args.fuse_counts) else solve
        try:
            start = time.perf_counter()
            fused = fuse_concepts(base, library, names, FusionConfig(), out_dir=work / f"fused{count}")
            bench.sync()
            seconds = time.perf_counter() - start
        finally:
            fusion_module._solve = solve
        summary = fused.report["summary"]
        bench.record(f"fuse_{count}", {"seconds": round(seconds, 2), "peak_gib": bench.peak_gib(),
                                       "mean_relative_error": round(statistics.mean(s["mean_relative_error"] for s in summary.values()), 5)})
        bench.record(f"fuse_{count}_s", round(seconds, 2))
        del base, fused

    # LBFGS on a few layers of the largest fusion: a text-encoder layer and UNet K/V layers
    device = torch.device(bench.device)
    rows = []
    for w0s, deltas, grams in captured:
        for name in list(w0s)[: args.lbfgs_layers]:
            group = fusion_module.input_group(name)
            w0 = w0s[name].to(device).double()
            layer_deltas = [d[name].to(device) for d in deltas]
            layer_grams = [g[group].to(device) for g in grams]
            start = time.perf_counter()
            closed = fusion_module.fuse_layer(w0, layer_deltas, layer_grams)
            bench.sync()
            closed_s = time.perf_counter() - start
            lbfgs, lbfgs_s = lbfgs_fuse(w0, layer_deltas, layer_grams, args.lbfgs_iterations)
            rows.append({"layer": name, "shape": list(w0.shape), "closed_form_s": round(closed_s, 4), "lbfgs_s": round(lbfgs_s, 3),
                         "objective_w0": objective(w0, w0, layer_deltas, layer_grams),
                         "objective_closed_form": objective(closed, w0, layer_deltas, layer_grams),
                         "objective_lbfgs": objective(lbfgs, w0, layer_deltas, layer_grams)})
    bench.record("fuse_lbfgs_layers", rows)
    bench.record("fuse_lbfgs_iterations", args.lbfgs_iterations)
    bench.record("fuse_lbfgs_s_per_layer", round(statistics.mean(r["lbfgs_s"] for r in rows), 3))


# ---------------------------------------------------------------------------------------------
# Report


def verdict(key: str, value) -> str:
    if key not in TARGETS or value is None:
        return ""
    op, target = TARGETS[key]
    met = value <= target if op == "<=" else value < target
    return f"target {op} {target}: " + ("met" if met else f"missed by {value - target:.3g} ({value / target:.2f}x)")


def table_rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(figure, value, same-run baseline, target) rows for RESULTS.md and the printout."""
    r = results.get
    rows = []
    for b in (2, 1):
        if f"train_b{b}" in results:
            row = results[f"train_b{b}"]
            rows.append((f"ED-LoRA step, batch {b} (bf16 frozen, fp32 trainables, compile={row['compile']})",
                         f"{row['ms_median']} ms, {row['peak_gib']} GiB, {row.get('tflops')} TFLOP/s",
                         f"eager {r('train_eager_b2', {}).get('ms_median')} ms" if b == 2 else "", verdict(f"train_step_ms_b{b}", row["ms_median"])))
    if "train_baseline_b2" in results:
        row = results["train_baseline_b2"]
        rows.append(("baseline: diffusers LoRA recipe, batch 2 (fp32 weights, bf16 autocast, eager)",
                     f"{row['ms_median']} ms, {row['peak_gib']} GiB, {r('train_tflops_b2_baseline')} TFLOP/s", "",
                     f"speed-up {r('train_speedup_b2')}x (target 3x)"))
    if "train_low_b2" in results:
        row = results["train_low_b2"]
        rows.append(("ED-LoRA step, batch 2, --memory low (checkpointing, 8-bit AdamW if bitsandbytes)",
                     f"{row['ms_median']} ms, {row['peak_gib']} GiB", "", verdict("train_peak_gib_b2_low", row["peak_gib"])))
    for count in (2, 5, 14):
        if f"fuse_{count}" in results:
            row = results[f"fuse_{count}"]
            rows.append((f"gradient fusion, {count} concepts", f"{row['seconds']} s, {row['peak_gib']} GiB", "",
                         verdict(f"fuse_{count}_s", row["seconds"])))
    if "fuse_lbfgs_layers" in results:
        layers = results["fuse_lbfgs_layers"]
        rows.append((f"LBFGS reference ({len(layers)} layers, {r('fuse_lbfgs_iterations')} iterations each)",
                     f"{r('fuse_lbfgs_s_per_layer')} s/layer", "closed form "
                     f"{statistics.mean(x['closed_form_s'] for x in layers):.4f} s/layer",
                     "objective closed form / LBFGS: " + ", ".join(f"{x['objective_closed_form']:.4g} / {x['objective_lbfgs']:.4g}" for x in layers)))
    mode = r("sample_best_mode", "off")
    for label in ("plain", "regional2", "regional4", "isolated2", "isolated3", "isolated2_boxes"):
        if f"sample_{label}_s" in results:
            best, eager = results[f"sample_{mode}_{label}"], results[f"sample_off_{label}"]
            rows.append((f"sampling 512x512, 30 steps: {label} (compile={mode})", f"{best['seconds']} s ({best['ratio_to_plain']}x plain)",
                         f"eager {eager['seconds']} s ({eager['ratio_to_plain']}x)", verdict(f"sample_{label}_s", best["seconds"])))
    if "detect_segment_s" in results:
        rows.append(("detection + segmentation (Grounding DINO tiny + SAM ViT-B), apart", f"{r('detect_segment_s')} s", "", ""))
    return rows


def write_markdown(results: dict, out: Path) -> None:
    lines = ["# Benchmark results", "",
             f"{results.get('date')}, {results.get('device')}, torch {results.get('torch')}, architecture {results.get('architecture')}", "",
             f"Command: `{results.get('command')}`", "",
             "| figure | value | same-run baseline | target |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in table_rows(results)]
    lines += ["", "All figures are in `results.json` beside this file."]
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--merge", default=None, help="results.json of an earlier run to add this run's sections to")
    parser.add_argument("--architecture", default="sd15", choices=["sd15", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--train-compile", default="default", help="compile mode of the UNet in training (off: eager)")
    parser.add_argument("--sample-compile", default="reduce-overhead", help="compile mode of the UNet in sampling (off: eager only)")
    parser.add_argument("--sample-jobs", default="plain,regional2,regional4,isolated2,isolated3", help="comma-separated sampling jobs")
    parser.add_argument("--fuse-counts", default="2,5,14")
    parser.add_argument("--lbfgs-layers", type=int, default=2, help="layers per solve group (text encoder, UNet K/V) run through LBFGS")
    parser.add_argument("--lbfgs-iterations", type=int, default=100)
    args = parser.parse_args()
    args.fuse_counts = [int(c) for c in args.fuse_counts.split(",")]
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown sections {sorted(unknown)}; use {', '.join(SECTIONS)}")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    out = Path(args.out)
    bench = Bench(args.device, out, merge=Path(args.merge) if args.merge else None)
    command = "python bench/run.py --out $OUT" + ("" if set(sections) == set(SECTIONS) else f" --only {args.only}")
    bench.results.update({"device": torch.cuda.get_device_name() if bench.cuda else args.device, "torch": torch.__version__,
                          "architecture": args.architecture, "date": time.strftime("%Y-%m-%d")})
    bench.results.setdefault("commands", {})
    for section in sections:
        bench.results["commands"][section] = command
    bench.results["command"] = command
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp())
    model_dir = build_tiny_model(work / "model", architecture=args.architecture)
    bench.record("build_model_s", round(time.perf_counter() - started, 1))
    library = None
    if "sample" in sections or "fuse" in sections:
        library = synthetic_library(model_dir, work / "library", max(args.fuse_counts + [3]), args.device)
    for section in sections:
        section_start = time.perf_counter()
        if section == "train":
            run_train(bench, model_dir, args)
        elif section == "sample":
            run_sample(bench, model_dir, library, work, args)
        else:
            run_fuse(bench, model_dir, library, work, args)
        bench.record(f"section_{section}_s", round(time.perf_counter() - section_start, 1))
    bench.record("total_s", round(time.perf_counter() - started, 1))
    write_markdown(bench.results, out)

    print(f"\n{bench.results['device']}, torch {bench.results['torch']}, {bench.results['total_s']} s")
    for figure, value, baseline, target in table_rows(bench.results):
        print(f"| {figure} | {value} | {baseline} | {target} |")


if __name__ == "__main__":
    main()
