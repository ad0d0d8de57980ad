"""Base models: load an SD1.5-family model, or build the tiny random test model.

A base model comes from a Hugging Face Hub id (default `stable-diffusion-v1-5/stable-diffusion-v1-5`),
a local diffusers folder, or a single `.safetensors`/`.ckpt` checkpoint in the original (CompVis)
layout. A single file loads with no network: SD1.5's diffusers configs ship in `assets/sd15/`
(CLIP's tokenizer files are written from the bundled merges at load time), and a file that is not
an SD1.x model, or a `.ckpt` that pickles Python objects, is refused with the reason. The special
name `tiny` builds (once, cached on disk) a tiny random model with the real SD1.5 block structure,
so every path of Menagerie runs offline on a CPU; its images are noise and are labelled as such.
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

from . import DEFAULT_BASE  # defined in pipelines/__init__.py, which `app.py --help` reads without torch
TINY = "tiny"
TEST_MODEL_MARKER = "menagerie_test_model.json"
# OpenAI CLIP's byte-pair merges (MIT licence), as shipped with CLIP and open_clip. The real
# tokenizer files (vocab.json, merges.txt) of the tiny model are built from it.
CLIP_BPE_FILE = Path(__file__).resolve().parent.parent / "assets" / "clip_tokenizer" / "bpe_simple_vocab_16e6.txt.gz"
# The diffusers configs (no weights) of stable-diffusion-v1-5/stable-diffusion-v1-5: single
# checkpoint files are loaded into this architecture, offline (`single_file_config`)
SD15_CONFIG_DIR = Path(__file__).resolve().parent.parent / "assets" / "sd15"
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
    dtype: torch.dtype  # dtype of the frozen UNet and VAE weights; the text encoder is always float32
    is_test_model: bool  # True for tiny random models: their output is noise
    fingerprint: str  # architecture hash; concepts carry it and are refused on another one
    fused: str | None = None  # folder of the fused model written into these weights, if any
    fused_note: str = ""  # load_fused's note when that model was fused on another base of the architecture
    loaded_concepts: dict = field(default_factory=dict)  # concept name -> digest of what apply_concept loaded
    performance: Performance = field(default_factory=Performance)  # memory and compile modes (configure_performance)
    compiled_unet: object = None  # the torch.compile wrapper of `unet`, made on first use (performance.unet_forward)
    safety_checker: object = None  # pipelines.safety.SafetyChecker screening every sampled image while on (configure_safety)

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
    """fp16 on accelerators, float32 on the CPU.

    fp16, not bf16, on every GPU: its 10-bit mantissa keeps a merged LoRA or fused update 8x more
    exactly (a change of 1e-3 on weights of 0.03 keeps 0.6% relative error in fp16, 5% in bf16;
    tests/test_base.py), it runs at the same tensor-core rate, and cards before Ampere only emulate
    bf16. Training in fp16 uses a gradient scaler (train.loss_scaler).
    """
    if device.type in ("cuda", "mps"):
        return torch.float16
    return torch.float32


def check_dtype_supported(dtype: torch.dtype, device: torch.device) -> None:
    """Warn where bf16 was asked for on a GPU that only emulates it (T4, V100, RTX 20xx, GTX 10xx)."""
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        logger.warning("this GPU only emulates bf16, which is slow; --dtype fp16 runs at full speed")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return default_dtype(device)
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r} is not known; use one of {', '.join(DTYPES)}")
    check_dtype_supported(DTYPES[name], device)
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
            if prefix == "text_encoder" and name.startswith("text_model."):  # transformers 4.x's extra level
                name = name[len("text_model."):]
            digest.update(f"{prefix}.{name}:{tuple(param.shape)};".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Architecture:
    """A base model known by its name and architecture fingerprint only (`architecture_of`)."""

    name: str
    fingerprint: str


def base_config_files(name: str, parts: tuple[str, ...]) -> list[Path] | None:
    """The `<part>/config.json` files of base `name`, found without loading weights: a folder's own,
    SD1.5's (assets/sd15) for a single checkpoint file, the Hub cache's for a Hub id; None when
    they cannot be read here (a Hub id not cached, a missing path)."""
    path = ensure_tiny_model() if name == TINY else Path(os.path.expanduser(name))  # tiny: built once, in seconds
    if path.is_file() and path.suffix in (".safetensors", ".ckpt"):
        path = SD15_CONFIG_DIR  # a single file loads into SD1.5's architecture or not at all
    if path.is_dir():
        files = [path / part / "config.json" for part in parts]
        return files if all(f.is_file() for f in files) else None
    if _is_hub_id(name):
        from huggingface_hub import try_to_load_from_cache

        found = [try_to_load_from_cache(name, f"{part}/config.json") for part in parts]
        return [Path(f) for f in found] if all(isinstance(f, str) for f in found) else None
    return None


def architecture_of(name: str) -> Architecture | None:
    """The architecture fingerprint of base `name`, read from its UNet and text-encoder configs
    without loading weights (the models are built on the meta device: under a second at SD1.5 size).

    It equals `load_base(name).fingerprint`. None when the configs cannot be read here
    (`base_config_files`).
    """
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    files = base_config_files(name, ("unet", "text_encoder"))
    if files is None:
        return None
    try:
        unet_config, text_config = (json.loads(f.read_text()) for f in files)
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(unet_config)
            text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(text_config))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return Architecture(name, architecture_fingerprint(unet, text_encoder))


def native_resolution_of(name: str) -> int:
    """The image side base `name` was trained at, read from its configs without loading weights
    (64 for the tiny model, 512 for SD1.5 and its single files; 512 when nothing can be read)."""
    files = base_config_files(name, ("unet", "vae"))
    try:
        unet, vae = (json.loads(f.read_text()) for f in files)
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (TypeError, OSError, ValueError, KeyError):  # TypeError: no files
        return 512


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


# Two keys of the original (CompVis) layout that tell a checkpoint's family: the first cross-attention
# layer's key projection, [UNet channels, text width], and the UNet's first conv, [channels, in, 3, 3]
CROSS_ATTENTION_PROBE = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CONV_IN_PROBE = "model.diffusion_model.input_blocks.0.0.weight"


def _ckpt_conversion(path: Path) -> str:
    """A shell one-liner that rewrites a trusted .ckpt's tensors as a .safetensors file beside it."""
    return (f"python -c \"import torch, safetensors.torch as st; sd = torch.load({str(path)!r}, weights_only=False);"
            f" sd = sd.get('state_dict', sd); st.save_file({{k: v.contiguous() for k, v in sd.items()"
            f" if isinstance(v, torch.Tensor)}}, {str(path.with_suffix('.safetensors'))!r})\"")


def checkpoint_shapes(name: str, path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's name and shape in a single checkpoint file, without reading a .safetensors'
    weights (a .ckpt in zip format is memory-mapped).

    Raises:
        UserError: the file is unreadable, or it is a .ckpt that pickles Python objects besides its
            tensors (`torch.load(weights_only=True)` refuses those, since unpickling can run any code).
    """
    import pickle
    import zipfile

    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as checkpoint:
                return {key: tuple(checkpoint.get_slice(key).get_shape()) for key in checkpoint.keys()}
        except (SafetensorError, OSError) as error:
            raise UserError(f"--base {name!r} is not a readable .safetensors file ({error})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError:
        raise UserError(
            f"--base {name!r} holds pickled Python objects besides its weights (e.g. a PyTorch Lightning training state),"
            f" which are not loaded because unpickling can run any code; if you trust the file, convert it once to"
            f" .safetensors with {_ckpt_conversion(path)} and pass --base {path.with_suffix('.safetensors')}"
        ) from None
    except (OSError, RuntimeError, EOFError) as error:
        raise UserError(f"--base {name!r} is not a readable PyTorch checkpoint ({error})") from None
    while isinstance(state, dict) and "state_dict" in state:  # training checkpoints nest the weights
        state = state["state_dict"]
    return {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)} if isinstance(state, dict) else {}


def check_single_file(name: str, shapes: dict[str, tuple[int, ...]], config_dir: Path) -> None:
    """Refuse a checkpoint that does not fit the architecture of `config_dir` (SD1.5's), saying what it is."""
    unet = json.loads((config_dir / "unet" / "config.json").read_text())
    channels, width, in_channels = unet["block_out_channels"][0], unet["cross_attention_dim"], unet["in_channels"]
    attention, conv_in = shapes.get(CROSS_ATTENTION_PROBE), shapes.get(CONV_IN_PROBE)
    if attention == (channels, width) and conv_in is not None and conv_in[1] == in_channels:
        return
    if any(key.startswith("conditioner.embedders.") for key in shapes):
        kind = "an SDXL checkpoint"
    elif attention is not None and attention[1] != width:
        kind = f"a model whose UNet reads {attention[1]}-wide text (SD2.x: 1024), not SD1.5's {width}"
    elif attention is not None and attention[0] != channels:
        kind = f"a model with {attention[0]} UNet channels, not SD1.5's {channels}"
    elif attention is not None and conv_in is not None:
        kind = f"a model whose UNet takes {conv_in[1]} input channels (inpainting models: 9), not {in_channels}"
    elif any("lora" in key.lower() for key in shapes):
        kind = "a LoRA, not a whole model"
    else:
        kind = "not a Stable Diffusion checkpoint in the original (CompVis) layout"
    raise UserError(f"--base {name!r} is {kind}; Menagerie loads SD1.5-family models: pass an SD1.5 fine-tune's"
                    f" .safetensors/.ckpt file or a diffusers folder")


def single_file_config(folder: Path, config_dir: Path) -> Path:
    """`folder` made a complete diffusers config folder (no weights) for `from_single_file`: the
    configs of `config_dir` plus CLIP's vocab.json and merges.txt, written from the bundled merges
    (1.5 MB the repository need not carry)."""
    shutil.copytree(config_dir, folder, dirs_exist_ok=True)
    write_clip_tokenizer_files(folder / "tokenizer")
    return folder


def dtype_argument(dtype: torch.dtype | dict) -> dict:
    """diffusers' keyword for the dtype to load in: `dtype` from 0.40 on (where `torch_dtype` is
    deprecated), `torch_dtype` before (0.35-0.39 ignore `dtype` and load float32)."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__).release >= (0, 40) else "torch_dtype": dtype}


def load_base(name: str = DEFAULT_BASE, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> BaseModel:
    """Load a base model from a Hub id, a local diffusers folder, a single checkpoint, or "tiny".

    Args:
        name: Hub id, folder, `.safetensors`/`.ckpt` file, or "tiny" (built-in random test model).
        device: "cpu", "cuda", "cuda:N", "mps"; default the best available.
        dtype: "fp32", "fp16", "bf16" or a torch dtype of the UNet and VAE; default fp16 on GPUs,
            fp32 on the CPU. The text encoder is always float32 (0.25 GB more than half precision):
            its LoRA updates are ~1e-4 of weights ~0.03, which half precision rounds away.
    Raises:
        UserError: the path does not exist, the folder is not a diffusers model, a single file is not an
            SD1.x checkpoint (or pickles Python objects), or the Hub id is not cached and cannot be downloaded.
    """
    from diffusers import StableDiffusionPipeline

    device = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype, device)
    common = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    # folders and Hub ids load each part in its own dtype; a single file loads in float32 (diffusers
    # takes no per-part dtype there) and is cast below
    per_part = dtype_argument({"text_encoder": torch.float32, "default": dtype})

    # 1. Find the weights
    if name == TINY:
        source = ensure_tiny_model()
    else:
        source = Path(os.path.expanduser(name))
    if name == TINY or source.is_dir():
        if not (source / "model_index.json").exists():
            raise UserError(f"--base {name!r} is a folder but not a diffusers model (no model_index.json in it)")
        try:
            pipe = StableDiffusionPipeline.from_pretrained(str(source), local_files_only=True, **common, **per_part)
        except (OSError, ValueError) as error:
            raise UserError(f"--base {name!r}: could not load the diffusers folder: {error}") from None
        is_test_model = (source / TEST_MODEL_MARKER).exists()
    elif source.is_file():
        if source.suffix not in (".safetensors", ".ckpt"):
            raise UserError(f"--base {name!r}: a single checkpoint must be a .safetensors or .ckpt file")
        check_single_file(name, checkpoint_shapes(name, source), SD15_CONFIG_DIR)
        with tempfile.TemporaryDirectory() as tmp:  # SD1.5's configs from assets/ and only local files: no network
            config = single_file_config(Path(tmp) / "config", SD15_CONFIG_DIR)
            try:
                pipe = StableDiffusionPipeline.from_single_file(str(source), config=str(config), local_files_only=True, **common,
                                                                **dtype_argument(torch.float32))
            except (OSError, ValueError) as error:
                raise UserError(f"--base {name!r}: could not load the checkpoint as an SD1.5 model ({error})") from None
        is_test_model = False
    elif not _is_hub_id(name):
        raise UserError(f"--base {name!r} does not exist; give a Hub id, a diffusers folder or a .safetensors/.ckpt file")
    else:
        from .hub import offline

        try:  # offline (set, or the Hub does not answer): the cache only, failing at once instead of retrying for minutes
            pipe = StableDiffusionPipeline.from_pretrained(name, local_files_only=offline(), **common, **per_part)
        except (OSError, ValueError) as error:
            logger.debug("loading %s failed: %s", name, error)
            raise UserError(_offline_help(name)) from None
        is_test_model = False

    # 2. Keep what Menagerie uses, frozen, on the device: the UNet and VAE in `dtype`, the text
    # encoder in float32, where small text-LoRA and fused updates survive (see `dtype` above). The
    # cast is not left to the loader alone (a single file loads float32).
    for module, module_dtype in ((pipe.text_encoder, torch.float32), (pipe.unet, dtype), (pipe.vae, dtype)):
        module.requires_grad_(False)
        module.eval()
        module.to(device=device, dtype=module_dtype)
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
