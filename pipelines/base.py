"""Base models: load an SD1.5-family model, or build the tiny random test model.

A base model comes from a Hugging Face Hub id (default `stable-diffusion-v1-5/stable-diffusion-v1-5`),
a local diffusers folder, or a single `.safetensors`/`.ckpt` checkpoint. The special name `tiny`
builds (once, cached on disk) a tiny random model with the real SD1.5 block structure, so every
path of Menagerie runs offline on a CPU; its images are noise and are labelled as such.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .performance import Performance

logger = logging.getLogger(__name__)

DEFAULT_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TINY = "tiny"
TEST_MODEL_MARKER = "menagerie_test_model.json"
# OpenAI CLIP's byte-pair merges (MIT licence), as shipped with CLIP and open_clip. The real
# tokenizer files (vocab.json, merges.txt) of the tiny model are built from it.
CLIP_BPE_FILE = Path(__file__).resolve().parent.parent / "assets" / "clip_tokenizer" / "bpe_simple_vocab_16e6.txt.gz"
TEST_MODEL_NOTE = "noise from a random test model (tiny), not a real image"


@dataclass
class BaseModel:
    """The parts of a Stable Diffusion 1.x model that Menagerie uses, on one device."""

    name: str  # what the user asked for: Hub id, path, or "tiny"
    tokenizer: object  # transformers CLIPTokenizer
    text_encoder: torch.nn.Module  # transformers CLIPTextModel
    unet: torch.nn.Module  # diffusers UNet2DConditionModel
    vae: torch.nn.Module  # diffusers AutoencoderKL
    scheduler_config: dict  # the base's noise schedule; samplers are built from it
    device: torch.device
    dtype: torch.dtype  # dtype of the frozen weights
    is_test_model: bool  # True for tiny random models: their output is noise
    fingerprint: str  # architecture hash; concepts carry it and are refused on another one
    fused: str | None = None  # folder of the fused model written into these weights, if any
    loaded_concepts: dict = field(default_factory=dict)  # concept name -> digest of what apply_concept loaded
    performance: Performance = field(default_factory=Performance)  # memory and compile modes (configure_performance)
    compiled_unet: object = None  # the torch.compile wrapper of `unet`, made on first use (performance.unet_forward)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        """Image side the model was trained at (512 for SD1.5, 64 for the tiny model)."""
        return self.unet.config.sample_size * self.vae_scale_factor


# ---------------------------------------------------------------------------------------------
# Device and dtype


def resolve_device(name: str | None = None) -> torch.device:
    """The device to run on: `name` if given ("cpu", "cuda", "cuda:1", "mps"), else the best present."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name!r}: no CUDA GPU is available here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name!r}: Apple MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name!r} is not supported; use cpu, cuda, cuda:N or mps")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """Half precision on accelerators (bf16 where the GPU has it natively, Ampere on), float32 on the CPU."""
    if device.type == "cuda":
        # emulated bf16 (T4, V100, RTX 20xx, GTX 10xx) is slow: those cards get fp16
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return default_dtype(device)
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r} is not known; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


# ---------------------------------------------------------------------------------------------
# The tiny random test model


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table (Radford et al. 2021, CLIP tokenizer)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def write_clip_tokenizer_files(folder: Path) -> None:
    """Write CLIP's real `vocab.json` and `merges.txt` (49408 tokens) from the bundled BPE merges."""
    lines = gzip.open(CLIP_BPE_FILE).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # the 48894 merges CLIP uses
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


# Random-weight architectures: "tiny" for tests and offline demos, "sd15" (full SD1.5 size) for
# GPU benchmarks, whose FLOPs and memory equal those of real weights.
ARCHITECTURES = {
    "tiny": dict(
        unet=dict(sample_size=8, block_out_channels=(32, 32, 64, 64), norm_num_groups=8, cross_attention_dim=32,
                  attention_head_dim=4),  # diffusers' legacy name: 4 heads, as SD1.5's 8 means 8 heads
        vae=dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    ),
    "sd15": dict(
        unet=dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32, cross_attention_dim=768,
                  attention_head_dim=8),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    ),
}


def build_tiny_model(out_dir: str | os.PathLike, seed: int = 0, architecture: str = "tiny") -> Path:
    """Write a random-weight SD1.5-structured model as a standard diffusers folder.

    UNet: SD1.5's blocks (3 cross-attention down blocks + 1 plain, mid block, 1 plain + 3
    cross-attention up blocks, 2 layers per down block, 3 per up block), so it has the same 16
    cross-attention layers in the same order; "tiny" has 1/10 of the channels. VAE: downsampling
    factor 8 like SD's. Text encoder: CLIP with the real 49408-token vocabulary and tokenizer (2
    layers of width 32 for "tiny"). Deterministic for `seed`. Images it makes are noise.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if architecture not in ARCHITECTURES:
        raise UserError(f"unknown architecture {architecture!r}; use one of {', '.join(ARCHITECTURES)}")
    sizes = ARCHITECTURES[architecture]
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        **sizes["unet"],
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        **sizes["vae"],
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            **sizes["text"],
        )
    )
    # SD1.5's noise schedule, as in its scheduler_config.json
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
    )
    with tempfile.TemporaryDirectory(dir=out_dir.parent if out_dir.parent.exists() else None) as tmp:
        tok_dir = Path(tmp) / "clip_tokenizer"
        write_clip_tokenizer_files(tok_dir)
        tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        staging = Path(tmp) / "model"
        pipe.save_pretrained(staging)
        write_clip_tokenizer_files(staging / "tokenizer")  # the real CLIP files beside tokenizer.json
        (staging / TEST_MODEL_MARKER).write_text(json.dumps({"kind": f"random test model ({architecture})", "seed": seed, "note": TEST_MODEL_NOTE}))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), out_dir)
    return out_dir


def tiny_model_dir() -> Path:
    """Where the built-in tiny model is cached ($MENAGERIE_CACHE, default ~/.cache/menagerie)."""
    root = Path(os.environ.get("MENAGERIE_CACHE", Path.home() / ".cache" / "menagerie"))
    return root / "tiny-model-v1"


def ensure_tiny_model() -> Path:
    folder = tiny_model_dir()
    if not (folder / "model_index.json").exists():
        build_tiny_model(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Loading


def architecture_fingerprint(unet: torch.nn.Module, text_encoder: torch.nn.Module) -> str:
    """A short hash of every parameter's name and shape in the UNet and text encoder.

    SD1.5 fine-tunes (e.g. other checkpoints of the same family) share it; a different architecture
    (SD2, the tiny model) does not, so a concept trained on one is refused on the other.
    """
    digest = hashlib.sha256()
    for prefix, model in (("unet", unet), ("text_encoder", text_encoder)):
        for name, param in model.named_parameters():
            if "lora_" in name or "concept_vectors" in name:
                continue  # adapters and concept tokens are not part of the base architecture
            name = name.replace(".base_layer", "").replace(".token_embedding.base_table", ".token_embedding")
            digest.update(f"{prefix}.{name}:{tuple(param.shape)};".encode())
    return digest.hexdigest()[:16]


def _is_hub_id(name: str) -> bool:
    """True for an "org/model" Hub id; anything else is taken as a local path."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None and not name.endswith((".safetensors", ".ckpt"))


def _offline_help(name: str) -> str:
    return (
        f"base model {name!r} is not in the local Hugging Face cache and cannot be downloaded here"
        f" (offline or the Hub is unreachable). Download it once with network access"
        f" (`hf download {name}`), or pass --base with a local diffusers folder or a .safetensors/.ckpt file;"
        f" `--base tiny` runs a random test model offline"
    )


def load_base(name: str = DEFAULT_BASE, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> BaseModel:
    """Load a base model from a Hub id, a local diffusers folder, a single checkpoint, or "tiny".

    Args:
        name: Hub id, folder, `.safetensors`/`.ckpt` file, or "tiny" (built-in random test model).
        device: "cpu", "cuda", "cuda:N", "mps"; default the best available.
        dtype: "fp32", "fp16", "bf16" or a torch dtype; default bf16/fp16 on GPUs, fp32 on the CPU.
    Raises:
        UserError: the path does not exist, the folder is not a diffusers model, or the Hub id is not
            cached and cannot be downloaded.
    """
    from diffusers import StableDiffusionPipeline

    device = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype, device)
    common = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False, dtype=dtype)

    # 1. Find the weights
    if name == TINY:
        source = ensure_tiny_model()
    else:
        source = Path(os.path.expanduser(name))
    if name == TINY or source.is_dir():
        if not (source / "model_index.json").exists():
            raise UserError(f"--base {name!r} is a folder but not a diffusers model (no model_index.json in it)")
        try:
            pipe = StableDiffusionPipeline.from_pretrained(str(source), local_files_only=True, **common)
        except (OSError, ValueError) as error:
            raise UserError(f"--base {name!r}: could not load the diffusers folder: {error}") from None
        is_test_model = (source / TEST_MODEL_MARKER).exists()
    elif source.is_file():
        if source.suffix not in (".safetensors", ".ckpt"):
            raise UserError(f"--base {name!r}: a single checkpoint must be a .safetensors or .ckpt file")
        try:
            pipe = StableDiffusionPipeline.from_single_file(str(source), **common)
        except (OSError, ValueError) as error:
            raise UserError(
                f"--base {name!r}: could not load the checkpoint ({error}). Single files need SD1.5's config"
                f" files from the Hub cache once ({DEFAULT_BASE}); or convert the file to a diffusers folder"
            ) from None
        is_test_model = False
    elif not _is_hub_id(name):
        raise UserError(f"--base {name!r} does not exist; give a Hub id, a diffusers folder or a .safetensors/.ckpt file")
    else:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        try:
            pipe = StableDiffusionPipeline.from_pretrained(name, local_files_only=offline, **common)
        except (OSError, ValueError) as error:
            logger.debug("loading %s failed: %s", name, error)
            raise UserError(_offline_help(name)) from None
        is_test_model = False

    # 2. Keep what Menagerie uses, frozen, on the device, in `dtype` (diffusers before 0.40 ignores
    # `dtype=` with a warning and loads float32, so the cast is not left to the loader)
    for module in (pipe.text_encoder, pipe.unet, pipe.vae):
        module.requires_grad_(False)
        module.eval()
        module.to(device=device, dtype=dtype)
    return BaseModel(
        name=name,
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        unet=pipe.unet,
        vae=pipe.vae,
        scheduler_config=dict(pipe.scheduler.config),
        device=device,
        dtype=dtype,
        is_test_model=is_test_model,
        fingerprint=architecture_fingerprint(pipe.unet, pipe.text_encoder),
    )
