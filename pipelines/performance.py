"""Speed and memory settings shared by training, fusion and sampling.

A base model carries one `Performance` (`configure_performance`): a memory mode and an optional
`torch.compile` mode for the UNet. Each job resolves the memory mode for itself
(`memory_plan(base, job)`), because "auto" depends on the job and on the free GPU memory when the
job starts:

| mode    | gradient checkpointing | 8-bit AdamW (bitsandbytes) | VAE slicing | models offloaded to the CPU |
| ------- | ---------------------- | -------------------------- | ----------- | --------------------------- |
| high    | no                     | no                         | no          | no                          |
| low     | yes                    | yes, if importable         | yes         | no                          |
| lowest  | yes                    | yes, if importable         | yes         | yes, one model on the GPU at a time |

Everything here keeps the numbers of the default path: "high" without compile is exactly the
code path the tests pin down (same kernels, same order of random draws).

Data parallel training (`accelerate launch`, torchrun) is also set up here: `world()` reads the
launcher's environment, and `average_gradients` all-reduces the few trainable tensors (LoRA and
embeddings), which is all DDP would do for them.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import COMPILE_MODES, MEMORY_MODES  # noqa: F401 (defined where `--help` reads them without torch)
from .errors import UserError

logger = logging.getLogger(__name__)

JOBS = ("train", "sample")
GIB = 2**30

# Free GPU memory (GiB) a job needs at full size (SD1.5, 512x512) for "high", and for "low";
# below the second figure it runs "lowest". Measured peaks on an H100/H200 (bench/RESULTS.md):
# training at batch 2 peaks near 5 GiB in high mode, sampling near 2.7 GiB; the margin covers
# the CUDA context, the allocator's fragmentation and other programs on the card.
NEEDS_GIB = {"train": (8.0, 4.0), "sample": (5.0, 3.0)}


@dataclass(frozen=True)
class Performance:
    """How a base model runs: memory mode ("auto", "high", "low", "lowest") and UNet compile mode."""

    memory: str = "auto"
    compile: str = "off"  # one of COMPILE_MODES; "off" runs the UNet eagerly
    tf32_training: bool = True  # training's fp32 matmuls (text encoder, LoRA branches) on tensor cores (`tf32_matmuls`)


@dataclass(frozen=True)
class MemoryPlan:
    """What one job does to save memory (see the table in the module docstring)."""

    mode: str  # the resolved mode: high, low or lowest
    gradient_checkpointing: bool
    adam_8bit: bool
    vae_slicing: bool
    cpu_offload: bool


def check_performance(memory: str, compile: str) -> None:
    """Validate the two settings (before any model loads)."""
    if memory not in MEMORY_MODES:
        raise UserError(f"--memory {memory!r} is not known; use one of {', '.join(MEMORY_MODES)}")
    if compile not in COMPILE_MODES:
        raise UserError(f"--compile {compile!r} is not known; use one of {', '.join(COMPILE_MODES)}")


def choose_memory_mode(free_gib: float | None, job: str) -> str:
    """The memory mode for `job` ("train" or "sample") given the free GPU memory in GiB.

    `None` (no GPU, or a device that does not report it) gives "high": the CPU and Apple's unified
    memory gain nothing from checkpointing or offloading here.
    """
    if job not in JOBS:
        raise ValueError(f"job must be one of {JOBS}, got {job!r}")
    if free_gib is None:
        return "high"
    high, low = NEEDS_GIB[job]
    if free_gib >= high:
        return "high"
    if free_gib >= low:
        return "low"
    return "lowest"


def free_gpu_gib(device: torch.device) -> float | None:
    """GPU memory this process can still use, in GiB; None for other devices.

    What the driver reports free, plus what torch's allocator holds cached but unused (it is
    reused before asking the driver), and never more than the process's cap: a cap set with
    `torch.cuda.set_per_process_memory_fraction` (how a smaller card is emulated, or a shared card
    is split) stops the allocator there whatever the driver says.
    """
    if device.type != "cuda":
        return None
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    free += torch.cuda.memory_reserved(device) - allocated
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 1.0)(device)  # torch >= 2.6
    cap = fraction * total
    return max(0.0, min(free, cap - allocated)) / GIB


def plan_for(mode: str) -> MemoryPlan:
    """The MemoryPlan of a resolved mode (high, low or lowest)."""
    if mode not in ("high", "low", "lowest"):
        raise ValueError(f"a resolved memory mode is high, low or lowest, got {mode!r}")
    saving = mode != "high"
    return MemoryPlan(mode=mode, gradient_checkpointing=saving, adam_8bit=saving, vae_slicing=saving,
                      cpu_offload=mode == "lowest")


def memory_plan(base, job: str) -> MemoryPlan:
    """Resolve `base.performance.memory` for `job` ("auto" looks at the free GPU memory now)."""
    mode = base.performance.memory
    if mode == "auto":
        mode = choose_memory_mode(free_gpu_gib(base.device), job)
    return plan_for(mode)


def compile_cache_dir(library: str | os.PathLike) -> Path:
    """Where torch.compile's caches for a library live: a folder beside it (not inside: a library
    is copied and exported, the caches are large and belong to this machine)."""
    library = Path(library).resolve()
    return library.with_name(library.name + "-compile-cache")


def use_compile_cache(folder: str | os.PathLike) -> Path:
    """Keep torch.compile's caches in `folder`, so a later process on this machine skips most of
    the compile: inductor's FX-graph cache (generated kernels), AOTAutograd's cache (the forward
    and backward graphs of training) and Triton's compiled binaries. Dynamo still traces the model
    in each new process; the minutes of code generation and autotuning are what is saved.
    """
    import torch._functorch.config
    import torch._inductor.config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Both are read when a compile needs them, so setting them now reaches every later compile.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return folder


def configure_performance(base, memory: str = "auto", compile: str = "off",
                          compile_cache: str | os.PathLike | None = None, tf32_training: bool = True) -> Performance:
    """Set how `base` runs from now on; the app and the CLI call this once after `load_base`.

    Args:
        memory: "auto" (default; chosen per job from free GPU memory), "high", "low" or "lowest".
        compile: "off" (default), or a `torch.compile` mode for the UNet: "default",
            "reduce-overhead" (also CUDA graphs: least per-step overhead, more memory) or
            "max-autotune-no-cudagraphs". The first call of each new shape compiles (tens of seconds
            at full size on a GPU); later calls are faster.
        compile_cache: a folder for torch.compile's caches (`use_compile_cache`), used when
            `compile` is on; the CLI passes `compile_cache_dir(--library)`.
        tf32_training: training runs its fp32 matmuls as TF32 on CUDA (`tf32_matmuls`).
    """
    check_performance(memory, compile)
    if compile != "off" and compile_cache is not None:
        use_compile_cache(compile_cache)
    base.performance = Performance(memory=memory, compile=compile, tf32_training=tf32_training)
    base.compiled_unet = None
    if compile == "reduce-overhead" and base.device.type == "cuda":
        # Under CUDA graphs the step is bound by the kernels, and cuDNN's fp16 convolutions run
        # NHWC: a channels-last UNet saves the layout conversions around each one (7 ms of a
        # 100 ms training step on an H200, bench/RESULTS.md). Eager steps are bound by the host
        # and gain nothing, so eager UNets keep torch's default layout.
        base.unet.to(memory_format=torch.channels_last)
    return base.performance


# ---------------------------------------------------------------------------------------------
# The UNet, eager or compiled


def unet_forward(base):
    """The callable that runs the UNet: `base.unet` itself, or its compiled wrapper (made once).

    The wrapper shares the module's parameters, so concepts applied, merged or fused into
    `base.unet` reach the compiled UNet too (dynamo re-specialises when processors or adapters change).
    """
    mode = base.performance.compile
    if mode == "off":
        return base.unet
    if base.compiled_unet is None:
        import torch._dynamo

        # Plain, regional and isolated sampling and training each specialise the graph (other
        # processors, adapters, batch sizes, grad mode); the default limit of 8 would fall back to eager.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        options = {} if mode == "default" else {"mode": mode}
        base.compiled_unet = torch.compile(base.unet, dynamic=False, **options)
    return base.compiled_unet


@contextmanager
def tf32_matmuls(base):
    """fp32 matmuls as TF32 (tensor cores, fp32 accumulation) for the block, on CUDA only.

    In a training step with an fp16 UNet the fp32 matmuls are the text encoder's (16 layer-wise
    copies of each prompt, forward and backward) and the LoRA branches (fp32 weights, their input
    cast up): on an H200 about 25 ms a step of CUDA-core kernels, against about 78 ms of kernels
    in all (bench/RESULTS.md, "Training step"). TF32 keeps fp32's range and storage and rounds
    the products' inputs to 10 mantissa bits, as fp16 does: the loss curve moves by about 1e-5
    (measured there). Weights, gradients and optimizer state stay fp32. Fusion and sampling do
    not use this: the fusion solve wants full fp32 (float64 where it can).
    """
    if base.device.type != "cuda" or not base.performance.tf32_training:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# ---------------------------------------------------------------------------------------------
# Optimizer


def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def make_adamw(groups: list[dict], device: torch.device, eight_bit: bool, betas=(0.9, 0.999), weight_decay: float = 0.01):
    """AdamW over parameter groups: 8-bit (bitsandbytes) if asked and importable, else torch's.

    On CUDA torch's fused kernel updates every tensor in a few launches (the LoRA has hundreds of
    small tensors); elsewhere the default (foreach) implementation, so CPU runs keep their numbers.
    """
    if eight_bit and device.type == "cuda":
        if bitsandbytes_available():
            import bitsandbytes

            return bitsandbytes.optim.AdamW8bit(groups, betas=betas, weight_decay=weight_decay)
        logger.warning("8-bit AdamW needs bitsandbytes (pip install bitsandbytes); using torch's AdamW")
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, betas=betas, weight_decay=weight_decay, **fused)


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing and offloading


@contextmanager
def gradient_checkpointing(base, enabled: bool):
    """Recompute UNet and text-encoder activations in the backward pass instead of storing them.

    transformers checkpoints only in train mode, so the text encoder is put in train mode (CLIP has
    no dropout: same outputs). Both are restored afterwards.
    """
    if not enabled:
        yield
        return
    text_was_training = base.text_encoder.training
    text = base.text_encoder
    base.unet.enable_gradient_checkpointing()
    if hasattr(text, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old names warn there
        text.activation_checkpointing_enable()
        disable = text.activation_checkpointing_disable
    else:
        text.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        disable = text.gradient_checkpointing_disable
    text.train()
    try:
        yield
    finally:
        base.unet.disable_gradient_checkpointing()
        disable()
        text.train(text_was_training)


@contextmanager
def on_device(base, module: torch.nn.Module, plan: MemoryPlan):
    """With CPU offload, bring `module` to the GPU for the block and send it back after."""
    if not plan.cpu_offload or base.device.type != "cuda":
        yield module
        return
    module.to(base.device)
    try:
        yield module
    finally:
        module.to("cpu")
        torch.cuda.empty_cache()


@contextmanager
def offloaded(base, plan: MemoryPlan):
    """With CPU offload, park the text encoder and VAE on the CPU for the block (they are moved in
    by `on_device` when needed); restore everything to the device afterwards."""
    if not plan.cpu_offload or base.device.type != "cuda":
        yield
        return
    for module in (base.text_encoder, base.vae):
        module.to("cpu")
    torch.cuda.empty_cache()
    try:
        yield
    finally:
        for module in (base.text_encoder, base.vae):
            module.to(base.device)


@contextmanager
def vae_slicing(base, enabled: bool):
    """Decode (and encode) one image at a time: the VAE's activations at 512x512 are the peak."""
    if not enabled:
        yield
        return
    base.vae.enable_slicing()
    try:
        yield
    finally:
        base.vae.disable_slicing()


# ---------------------------------------------------------------------------------------------
# Data parallel training


@dataclass(frozen=True)
class World:
    rank: int  # this process, 0..size-1
    size: int  # number of processes
    local_rank: int  # GPU index on this host


def world() -> World:
    """This process's place in a launch by `accelerate launch` or torchrun (1 process otherwise)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(rank=int(os.environ.get("RANK", "0")), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def distributed_device(name: str | None) -> str | None:
    """Under a multi-process launch, "cuda" (or no device) means this process's own GPU."""
    here = world()
    if here.size > 1 and torch.cuda.is_available() and (name is None or name == "cuda"):
        return f"cuda:{here.local_rank}"
    return name


def init_distributed(device: torch.device) -> World:
    """Join the process group of a multi-process launch (NCCL on GPUs, gloo on the CPU)."""
    here = world()
    if here.size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend)
    return here


def average_gradients(params: list[torch.Tensor], size: int) -> None:
    """Average the gradients of `params` over all processes (one all-reduce of one flat buffer)."""
    if size <= 1:
        return
    with_grad = [p for p in params if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in with_grad])
    torch.distributed.all_reduce(flat)
    flat /= size
    offset = 0
    for p in with_grad:
        count = p.grad.numel()
        p.grad.copy_(flat[offset : offset + count].view_as(p.grad))
        offset += count
