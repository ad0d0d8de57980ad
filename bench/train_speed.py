"""The ED-LoRA training step at full SD1.5 size, eager against compiled, with a profile (issue 15).

Random weights with SD1.5's architecture cost the same FLOPs and memory as the real ones; every
variant runs through the product code (`load_base`, `configure_performance`, `train_concept`) on
the same synthetic photos, batch 2, 512x512, fp16 frozen weights with fp32 trainables (the default):

  eager           today's default (no compile)
  channels_last   eager, the UNet's weights and activations in NHWC (cuDNN's native layout)
  compile         the UNet under torch.compile (mode "default": inductor kernels, no CUDA graphs)
  cudagraphs      the UNet under torch.compile(mode="reduce-overhead"): inductor + CUDA graphs
  *_tf32          the same with training's fp32 matmuls as TF32 (`performance.tf32_matmuls`, the default)
  *_cl            and channels_last

For each: median and p90 ms per step (after the first third), peak GiB, seconds to the first step
(compile included) and the first losses beside the eager ones (same seed, same batches: how far a
variant moves the numbers). `--profile` traces 4 steps of the last variant with torch.profiler:
GPU kernel time per step, kernel launches per step and the kernels that take the most time.

`--first-step` (used by `--cache-check`) is one process that loads, compiles with the compile
cache in `--cache` and stops after the first step; `--cache-check` runs it twice on an empty cache
and reports the seconds from process start to the first step, cold and warm.

Usage (on the GPU machine):
    python bench/train_speed.py --out DIR [--variants eager,compile] [--steps 40] [--profile] [--cache-check]
Writes DIR/train_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROCESS_START = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.base import build_tiny_model, load_base  # noqa: E402
from pipelines.performance import configure_performance  # noqa: E402
from pipelines.train import TrainConfig, train_concept  # noqa: E402

GIB = 2**30
VARIANTS = {  # name: (compile mode, channels_last, TF32 for training's fp32 matmuls)
    "eager": ("off", False, False), "channels_last": ("off", True, False), "compile": ("default", False, False),
    "cudagraphs": ("reduce-overhead", False, False), "eager_tf32": ("off", False, True),
    "cudagraphs_tf32": ("reduce-overhead", False, True), "cudagraphs_tf32_cl": ("reduce-overhead", True, True),
}
MODEL_DIR = Path("/tmp/menagerie-bench/sd15")


def full_size_model() -> Path:
    """SD1.5's architecture with random weights, built once per machine (kept in /tmp)."""
    if not (MODEL_DIR / "model_index.json").exists():
        build_tiny_model(MODEL_DIR, architecture="sd15")
    return MODEL_DIR


def synthetic_photos(count: int = 5, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (640, 512, 3), dtype=np.uint8)) for _ in range(count)]


def profile_summary(prof, steps: int) -> dict:
    """GPU kernel time and launches per step, and the heaviest kernels, from a torch.profiler trace."""
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.self_device_time_total for e in kernels)
    launches = sum(e.count for e in kernels)
    top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:15]
    fp32_gemm_us = sum(e.self_device_time_total for e in kernels if "sgemm" in e.key or "simt" in e.key.lower())
    layout_us = sum(e.self_device_time_total for e in kernels if "nchwToNhwc" in e.key or "nhwcToNchw" in e.key)
    return {"gpu_kernel_ms_per_step": round(total_us / 1000 / steps, 2), "kernel_launches_per_step": round(launches / steps),
            "fp32_simt_gemm_ms_per_step": round(fp32_gemm_us / 1000 / steps, 2),
            "layout_conversion_ms_per_step": round(layout_us / 1000 / steps, 2),
            "top_kernels": [{"name": e.key[:120], "ms_per_step": round(e.self_device_time_total / 1000 / steps, 3),
                             "calls_per_step": round(e.count / steps, 1)} for e in top]}


def time_variant(name: str, steps: int, profile: bool, cache: Path | None = None) -> dict:
    compile, channels_last, tf32 = VARIANTS[name]
    torch.cuda.empty_cache()
    base = load_base(str(full_size_model()), device="cuda")
    configure_performance(base, memory="high", compile=compile, compile_cache=cache, tf32_training=tf32)
    if channels_last:
        base.unet.to(memory_format=torch.channels_last)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    stamps: list[float] = []
    losses: list[float] = []
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) if profile else None
    profiled = (steps - 6, steps - 2)  # 4 steps, after warm-up, before the closing preview

    def on_step(progress) -> None:  # each step reads its loss back, so the host timestamp is a synchronised one
        stamps.append(time.perf_counter())
        losses.append(progress.loss)
        if prof is not None and progress.step == profiled[0]:
            prof.start()
        if prof is not None and progress.step == profiled[1]:
            prof.stop()
        if progress.step == progress.total:  # the closing preview runs eagerly: no inference compile here
            configure_performance(base, memory="high", compile="off", tf32_training=tf32)

    config = TrainConfig(name="bench", class_word="dog", steps=steps, batch_size=2, checkpoint_every=0, preview_steps=1)
    start = time.perf_counter()
    train_concept(base, synthetic_photos(), config, callback=on_step)
    step_ms = [1000 * (b - a) for a, b in zip(stamps, stamps[1:])][steps // 3:]
    if prof is not None:  # the profiled steps are slower; keep them out of the timing
        step_ms = [1000 * (b - a) for a, b in zip(stamps, stamps[1:])][steps // 3:profiled[0] - 1]
    row = {"variant": name, "compile": compile, "channels_last": channels_last, "tf32": tf32, "steps": steps,
           "ms_median": round(statistics.median(step_ms), 2), "ms_p90": round(sorted(step_ms)[int(0.9 * (len(step_ms) - 1))], 2),
           "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2), "first_step_s": round(stamps[0] - start, 1),
           "losses": [round(x, 6) for x in losses[:10]]}
    if prof is not None:
        row["profile"] = profile_summary(prof, profiled[1] - profiled[0])
    del base
    return row


def first_step(cache: Path, compile: str) -> dict:
    """One process: load, compile (with the cache), train until the first step, stop."""
    base = load_base(str(full_size_model()), device="cuda")
    loaded = time.perf_counter()
    configure_performance(base, memory="high", compile=compile, compile_cache=cache)

    class FirstStep(Exception):
        pass

    def on_step(progress) -> None:
        raise FirstStep

    train_start = time.perf_counter()
    try:
        train_concept(base, synthetic_photos(), TrainConfig(name="cache", class_word="dog", steps=10, batch_size=2,
                                                             checkpoint_every=0, preview_steps=1), callback=on_step)
    except FirstStep:
        pass
    now = time.perf_counter()
    return {"process_to_first_step_s": round(now - PROCESS_START, 1), "load_s": round(loaded - PROCESS_START, 1),
            "train_start_to_first_step_s": round(now - train_start, 1)}


def cache_check(compile: str, cache: Path) -> dict:
    rows = {}
    for run in ("cold", "warm"):
        done = subprocess.run([sys.executable, __file__, "--first-step", "--cache", str(cache), "--compile", compile],
                              capture_output=True, text=True)
        if done.returncode != 0:
            rows[run] = {"error": done.stderr[-3000:]}
            break
        rows[run] = json.loads(done.stdout.strip().splitlines()[-1])
    return {"compile": compile, "cache": str(cache), **rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--profile", action="store_true", help="profile 4 steps of the last variant")
    parser.add_argument("--cache-check", action="store_true")
    parser.add_argument("--cache", default="/tmp/menagerie-bench/compile-cache")
    parser.add_argument("--compile", default="default", help="compile mode of --first-step and --cache-check")
    parser.add_argument("--first-step", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.first_step:
        print(json.dumps(first_step(Path(args.cache), args.compile)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "command": "python bench/train_speed.py " + " ".join(sys.argv[1:]), "rows": []}
    full_size_model()
    if args.cache_check:
        cache = Path(args.cache)
        if cache.exists():
            import shutil

            shutil.rmtree(cache)
        result["cache_check"] = cache_check(args.compile, cache)
        (out / "train_speed.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result["cache_check"]), flush=True)
    names = [n for n in args.variants.split(",") if n]
    for i, name in enumerate(names):
        try:
            row = time_variant(name, args.steps, args.profile and i == len(names) - 1)
        except Exception as error:  # a compiler failure is a result too
            row = {"variant": name, "error": f"{type(error).__name__}: {error}"[:3000]}
        result["rows"].append(row)
        (out / "train_speed.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
    eager = next((r for r in result["rows"] if r.get("variant") == "eager" and "losses" in r), None)
    for row in result["rows"]:
        if eager is not None and "losses" in row:
            row["max_loss_diff_vs_eager"] = round(max(abs(a - b) for a, b in zip(row["losses"], eager["losses"])), 6)
    (out / "train_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
