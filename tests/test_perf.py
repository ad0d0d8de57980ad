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


GIB = 2**30


def fake_card(monkeypatch, total_gib: float, cap_gib: float | None, allocated_gib: float, reserved_gib: float, driver_free_gib: float):
    """torch.cuda's memory queries as a card of `total_gib` with a per-process cap of `cap_gib` would answer them."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(driver_free_gib * GIB), int(total_gib * GIB)))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: int(allocated_gib * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: int(reserved_gib * GIB))
    fraction = 1.0 if cap_gib is None else cap_gib / total_gib
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: fraction)


@pytest.mark.parametrize("cap, train_mode, sample_mode", [(None, "high", "high"), (8.0, "low", "high"), (6.0, "lowest", "low"),
                                                         (4.0, "lowest", "lowest")])
def test_auto_mode_follows_the_memory_a_capped_process_can_use(monkeypatch, cap, train_mode, sample_mode):
    """An H200 capped like a small card (as bench/small_card.py emulates one): the base's 2.4 GiB of
    weights are allocated, the driver reports 100 GiB free; auto must plan for the cap, not the card."""
    from types import SimpleNamespace

    from pipelines.performance import Performance, free_gpu_gib

    fake_card(monkeypatch, total_gib=140.0, cap_gib=cap, allocated_gib=2.4, reserved_gib=3.0, driver_free_gib=100.0)
    base = SimpleNamespace(device=torch.device("cuda"), performance=Performance())
    expected = 100.0 + 0.6 if cap is None else cap - 2.4  # uncapped: the driver's free plus the allocator's unused cache
    assert free_gpu_gib(torch.device("cuda")) == pytest.approx(expected)
    assert memory_plan(base, "train").mode == train_mode
    assert memory_plan(base, "sample").mode == sample_mode


def test_free_memory_counts_the_allocators_unused_cache(monkeypatch):
    from pipelines.performance import free_gpu_gib

    fake_card(monkeypatch, total_gib=8.0, cap_gib=None, allocated_gib=2.0, reserved_gib=5.0, driver_free_gib=1.0)
    assert free_gpu_gib(torch.device("cuda:0")) == pytest.approx(4.0)  # 1 free + 3 cached and reusable
    assert free_gpu_gib(torch.device("cpu")) is None


def test_tf32_matmuls_only_in_training_on_cuda_and_restored():
    from types import SimpleNamespace

    from pipelines.performance import Performance, tf32_matmuls

    flag = torch.backends.cuda.matmul
    before = flag.allow_tf32
    cuda = SimpleNamespace(device=torch.device("cuda"), performance=Performance())
    try:
        flag.allow_tf32 = False
        with tf32_matmuls(cuda):
            assert flag.allow_tf32
        assert not flag.allow_tf32
        with pytest.raises(RuntimeError), tf32_matmuls(cuda):
            raise RuntimeError("a failing step")
        assert not flag.allow_tf32  # restored on errors too
        for base in (SimpleNamespace(device=torch.device("cpu"), performance=Performance()),
                     SimpleNamespace(device=torch.device("cuda"), performance=Performance(tf32_training=False))):
            with tf32_matmuls(base):
                assert not flag.allow_tf32
    finally:
        flag.allow_tf32 = before


def test_channels_last_only_under_cuda_graphs_and_training_numbers_hold(fresh_base):
    """configure_performance makes the UNet channels-last for reduce-overhead on CUDA only; a
    channels-last UNet trains to the same losses and weights (checked here on the CPU)."""
    from types import SimpleNamespace

    def layout_of(unet):
        weight = next(p for p in unet.parameters() if p.ndim == 4)
        return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()

    for device, mode, expected in (("cuda", "reduce-overhead", True), ("cuda", "default", False), ("cpu", "reduce-overhead", False)):
        unet = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3))
        configure_performance(SimpleNamespace(device=torch.device(device), unet=unet), compile=mode)
        assert layout_of(unet) == expected, (device, mode)

    config = TrainConfig(name="mochi", class_word="dog", steps=3, batch_size=2, resolution=64, checkpoint_every=0, preview_steps=2)
    photos = [procedural_photo(0), procedural_photo(1)]
    default = train_concept(fresh_base(), photos, config)
    base = fresh_base()
    base.unet.to(memory_format=torch.channels_last)
    assert layout_of(base.unet)
    nhwc = train_concept(base, photos, config)
    assert nhwc.losses == pytest.approx(default.losses, rel=1e-5)
    for key in default.tensors:
        torch.testing.assert_close(nhwc.tensors[key], default.tensors[key], rtol=1e-4, atol=1e-6)


def test_compile_cache_lives_beside_the_library_and_is_switched_on(tmp_path, monkeypatch, base):
    import torch._functorch.config
    import torch._inductor.config

    from pipelines.performance import compile_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset")
    monkeypatch.setenv("TRITON_CACHE_DIR", "unset")
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    folder = compile_cache_dir(tmp_path / "library")
    assert folder == (tmp_path / "library-compile-cache").resolve()
    try:
        configure_performance(base, compile="off", compile_cache=folder)  # off: nothing to cache
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "unset" and not folder.exists()
        configure_performance(base, compile="default", compile_cache=folder)
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder / "inductor")
        assert os.environ["TRITON_CACHE_DIR"] == str(folder / "triton")
        assert torch._inductor.config.fx_graph_cache and torch._functorch.config.enable_autograd_cache and folder.is_dir()
    finally:
        configure_performance(base)


def test_studio_runs_its_base_with_the_memory_and_compile_flags(tiny_dir, tmp_path, monkeypatch):
    import torch._functorch.config
    import torch._inductor.config

    import app

    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, "unset")  # restored after the test: the compile cache sets them
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", torch._inductor.config.fx_graph_cache)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", torch._functorch.config.enable_autograd_cache)
    args = app.build_parser().parse_args(["--compile"])
    assert (args.compile, args.memory) == ("reduce-overhead", "auto")
    studio = app.Studio(str(tiny_dir), tmp_path / "lib", tmp_path / "out", memory="low", compile="default")
    base = studio.models.get()
    assert (base.performance.memory, base.performance.compile) == ("low", "default")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "lib-compile-cache" / "inductor").resolve())
