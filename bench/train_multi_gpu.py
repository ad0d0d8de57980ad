"""Data-parallel ED-LoRA training: examples per second on 1 and on N GPUs, in one call.

The product's own path: `train_concept` under `accelerate launch --num_processes N` (each process
its own GPU and its own random batches; the trainable tensors' gradients are averaged). This
driver runs the same worker once as a single process and once through `accelerate launch`, and
writes OUT/train_multi_gpu.json with steps/s, examples/s and the speed-up.

Usage (nvidia-h100-x2 machine): python bench/train_multi_gpu.py --out $OUT
CPU check (gloo, through torchrun): python bench/train_multi_gpu.py --architecture tiny --device cpu --steps 4 --out /tmp/mg
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def worker(args) -> None:
    """One process of a run: train `--steps` steps, rank 0 writes the step times to `--result`."""
    from pipelines.base import load_base
    from pipelines.performance import configure_performance, distributed_device, world
    from pipelines.train import TrainConfig, train_concept

    base = load_base(args.model, device=distributed_device(args.device))
    configure_performance(base, memory="high", compile=args.compile)
    rng = np.random.default_rng(world().rank)
    photos = [Image.fromarray(rng.integers(0, 256, (base.native_resolution * 5 // 4, base.native_resolution, 3), dtype=np.uint8)) for _ in range(5)]
    stamps: list[float] = []
    config = TrainConfig(name="multi", class_word="dog", steps=args.steps, batch_size=args.batch_size, checkpoint_every=0, preview_steps=1)
    result = train_concept(base, photos, config, callback=lambda _: stamps.append(time.perf_counter()))
    if world().rank == 0:
        step_s = [b - a for a, b in zip(stamps, stamps[1:])][args.steps // 3:]
        processes = world().size
        Path(args.result).write_text(json.dumps({
            "processes": processes, "batch_per_process": args.batch_size, "steps": args.steps,
            "step_ms_median": round(1000 * statistics.median(step_s), 2),
            "steps_per_s": round(1 / statistics.median(step_s), 3),
            "examples_per_s": round(processes * args.batch_size / statistics.median(step_s), 2),
            "final_loss": round(result.losses[-1], 4),
        }))


def run(command: list[str], env: dict) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--architecture", default="sd15", choices=["sd15", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--compile", default="off", help="compile mode of the UNet (off: eager; compiling costs a warm-up per process)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from pipelines.base import build_tiny_model

    work = Path(tempfile.mkdtemp())
    model = build_tiny_model(work / "model", architecture=args.architecture)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    common = ["--model", str(model), "--device", args.device, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
              "--compile", args.compile, "--worker"]
    script = str(Path(__file__).resolve())
    results = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
               "gpus": torch.cuda.device_count() if args.device.startswith("cuda") else 0, "torch": torch.__version__,
               "architecture": args.architecture, "date": time.strftime("%Y-%m-%d"),
               "command": "python bench/train_multi_gpu.py --out $OUT"}
    run([sys.executable, script, *common, "--result", str(work / "one.json")], env)
    if args.device.startswith("cuda"):
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(args.processes),
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    else:  # accelerate's --cpu mode needs MPI for several processes; torchrun sets up the same environment
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes)]
    run([*launch, script, *common, "--result", str(work / "many.json")], env)
    one = json.loads((work / "one.json").read_text())
    many = json.loads((work / "many.json").read_text())
    results.update({"single": one, "parallel": many,
                    "speedup_examples_per_s": round(many["examples_per_s"] / one["examples_per_s"], 2),
                    "train_step_ms_b2_1gpu": one["step_ms_median"], f"train_step_ms_b2_{args.processes}gpu": many["step_ms_median"]})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_multi_gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{results['device']} x{args.processes}: 1 process {one['examples_per_s']} examples/s,"
          f" {args.processes} processes {many['examples_per_s']} examples/s, speed-up {results['speedup_examples_per_s']}x")


if __name__ == "__main__":
    main()
