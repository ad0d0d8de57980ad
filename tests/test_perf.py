"""Speed and memory settings (pipelines.performance), data-parallel training and the benchmark's report.

torch.compile itself takes minutes on this CPU (7 minutes for the tiny UNet with inductor), so
these tests check that the compiled wrapper is made, cached and called; bench/run.py compares
compiled and eager on the GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.errors import UserError
from pipelines.performance import (
    average_gradients,
    check_performance,
    choose_memory_mode,
    configure_performance,
    make_adamw,
    memory_plan,
    plan_for,
    unet_forward,
)
from pipelines.sample import SampleConfig, sample_loaded
from pipelines.train import TrainConfig, train_concept

from conftest import procedural_photo

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("free, job, mode", [
    (80.0, "train", "high"), (8.0, "train", "high"), (7.9, "train", "low"), (4.0, "train", "low"), (3.9, "train", "lowest"),
    (5.0, "sample", "high"), (4.9, "sample", "low"), (2.9, "sample", "lowest"), (None, "train", "high"), (None, "sample", "high"),
])
def test_memory_mode_from_free_memory(free, job, mode):
    assert choose_memory_mode(free, job) == mode


def test_plans_of_the_modes():
    assert plan_for("high") == plan_for("high").__class__("high", False, False, False, False)
    low, lowest = plan_for("low"), plan_for("lowest")
    assert low.gradient_checkpointing and low.adam_8bit and low.vae_slicing and not low.cpu_offload
    assert lowest.gradient_checkpointing and lowest.cpu_offload


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="--memory 'medium' is not known; use one of auto, high, low, lowest"):
        check_performance("medium", "off")
    with pytest.raises(UserError, match="--compile 'fast' is not known"):
        check_performance("auto", "fast")


def test_auto_on_the_cpu_is_high_and_an_explicit_mode_wins(base):

    assert base.performance.memory == "auto" and base.performance.compile == "off"
    assert memory_plan(base, "train").mode == "high"
    configure_performance(base, memory="lowest")
    try:
        assert memory_plan(base, "train").mode == "lowest"
    finally:
        configure_performance(base)


def test_compiled_unet_is_made_once_with_the_mode_and_used_by_sampling(fresh_base, monkeypatch):
    """`unet_forward` wraps the UNet with torch.compile(mode=...) once; sampling calls the wrapper."""
    made = []

    def fake_compile(module, **options):
        made.append(options)
        calls = []

        def compiled(*args, **kwargs):
            calls.append(1)
            return module(*args, **kwargs)

        compiled.calls = calls
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    base = fresh_base()
    assert unet_forward(base) is base.unet  # off: the module itself
    configure_performance(base, memory="high", compile="reduce-overhead")
    wrapper = unet_forward(base)
    assert unet_forward(base) is wrapper and made == [{"dynamic": False, "mode": "reduce-overhead"}]
    eager = fresh_base()
    config = SampleConfig(prompt="a photo of a dog", steps=3)
    assert (sample_loaded(base, config)[0].tobytes() == sample_loaded(eager, config)[0].tobytes())
    assert len(wrapper.calls) == 3  # one UNet call per step went through the wrapper
    configure_performance(base, compile="default")
    unet_forward(base)
    assert made[-1] == {"dynamic": False}


def test_low_memory_training_checkpoints_and_gives_the_same_result(fresh_base):
    """Gradient checkpointing recomputes activations: same losses and weights as without it."""
    config = TrainConfig(name="mochi", class_word="dog", steps=3, batch_size=2, resolution=64, checkpoint_every=0, preview_steps=2)
    photos = [procedural_photo(0), procedural_photo(1)]
    high = train_concept(fresh_base(), photos, config)
    base = fresh_base()
    configure_performance(base, memory="low")
    seen = []
    text = base.text_encoder
    text_checkpointing = (lambda: text.is_activation_checkpointing) if hasattr(text, "is_activation_checkpointing") else (
        lambda: text.is_gradient_checkpointing)  # the name before transformers 5.2x
    low = train_concept(base, photos, config, callback=lambda p: seen.append((base.unet.is_gradient_checkpointing, text_checkpointing())))
    assert seen == [(True, True)] * 3
    assert not base.unet.is_gradient_checkpointing and not text_checkpointing() and not text.training  # restored afterwards
    assert low.losses == pytest.approx(high.losses, rel=1e-5)
    for key in high.tensors:
        torch.testing.assert_close(low.tensors[key], high.tensors[key], rtol=1e-4, atol=1e-6)


def test_adamw_is_torch_default_on_the_cpu_even_when_8bit_is_asked():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = make_adamw([{"params": [param], "lr": 1e-3}], torch.device("cpu"), eight_bit=True)
    assert type(optimizer) is torch.optim.AdamW and not optimizer.defaults["fused"]


def test_average_gradients_is_a_no_op_for_one_process():
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.tensor([1.0, 2.0])
    average_gradients([param], 1)
    assert param.grad.tolist() == [1.0, 2.0]


DDP_WORKER = """
import json, sys, numpy as np, torch
from PIL import Image
from pipelines.base import load_base
from pipelines.performance import world
from pipelines.train import TrainConfig, train_concept
torch.set_num_threads(1)
base = load_base(sys.argv[1], device="cpu")
photos = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (80, 64, 3), dtype=np.uint8)) for i in range(2)]
seen = []
result = train_concept(base, photos, TrainConfig(name="mochi", class_word="dog", steps=2, checkpoint_every=0, preview_steps=1),
                       callback=seen.append)
out = {"rank": world().rank, "losses": result.losses, "callbacks": len(seen),
       "embeddings": result.tensors["embeddings"].flatten()[:64].tolist(),
       "lora": [v.flatten()[:16].tolist() for k, v in sorted(result.tensors.items()) if "lora_B" in k][:4]}
open(sys.argv[2] + f"/rank{world().rank}.json", "w").write(json.dumps(out))
"""


def test_data_parallel_training_in_two_processes(tiny_dir, tmp_path):
    """Two CPU processes (gloo): each draws its own batches, both end with the same trained tensors,
    and only rank 0 reports progress."""
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # torchrun: `accelerate launch --multi_gpu` starts GPU processes the same way (its --cpu mode needs MPI)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                    str(script), str(tiny_dir), str(tmp_path)],
                   check=True, env=env, cwd=tmp_path, capture_output=True, timeout=300)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["losses"] != rank1["losses"]  # other photos, augmentations and noise on each rank
    assert rank0["embeddings"] == rank1["embeddings"] and rank0["lora"] == rank1["lora"]  # averaged gradients
    assert rank0["callbacks"] == 2 and rank1["callbacks"] == 0
