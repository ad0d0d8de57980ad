"""Export a fused model as one single-file checkpoint in the original Stable Diffusion layout.

A1111, Forge and ComfyUI load SD1.x models as one file in the layout of the original (CompVis LDM)
code, as do diffusers' `from_single_file` and Menagerie's own `--base FILE`. Its keys:

    model.diffusion_model.*            the UNet (input_blocks / middle_block / output_blocks)
    first_stage_model.*                the VAE (encoder.down.{i}.block.{j}, mid.attn_1 as 1x1 convs, ...)
    cond_stage_model.transformer.*     the CLIP text encoder, as transformers 4.x names it (text_model.*)

`original_sd_state_dict` is a port of diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py
(its SD1.x branch). The script hard-codes SD1.5's block and layer counts; here the block indices are
counted off the models themselves, in the order the LDM code builds its blocks, so a smaller model
of the same design (the tiny test model: one resnet per VAE block) maps as well.

A fused model (`pipelines.fusion`) is the base with each fused layer's update written in, plus each
concept's layer-wise tokens (`[2, 16, d]`, stored in the fused folder as `concepts.<name>`). The
tokens do not go into the checkpoint: its vocabulary stays CLIP's 49408 rows, which those tools
expect, and each concept becomes a textual-inversion embedding file beside it (`pipelines.export`),
its 16 layer copies collapsed into one, which loses some identity.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from .base import BaseModel
from .edlora import TEXT_MODEL_LEVEL
from .errors import UserError
from .layerwise import ConceptTokenTable

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
# The vocabulary of SD1.x's text encoder (OpenAI CLIP ViT-L/14), which A1111 and ComfyUI build
CLIP_VOCAB_SIZE = 49408
CHECKPOINT_FORMAT = "menagerie-fused-checkpoint-v1"
TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"

# (diffusers name, original name) inside a UNet resnet; the VAE's resnets differ only in the shortcut
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
# The VAE's mid-block attention: diffusers' linear layers are 1x1 convolutions in the original
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


# ---------------------------------------------------------------------------------------------
# Key maps: pure functions of the models' structure


def unet_prefixes(unet: torch.nn.Module) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers module path -> (original module path, renames inside it), for every UNet part.

    The original UNet is three flat lists. `input_blocks`: conv_in, then per down block one entry per
    layer (resnet at .0, attention at .1) and one for its downsampler (.0.op). `middle_block`:
    resnet, attention, resnet. `output_blocks`: per up block one entry per layer, the block's
    upsampler joining its last entry (after the attention, if any).
    """
    prefixes = {
        "time_embedding.linear_1": ("time_embed.0", {}),
        "time_embedding.linear_2": ("time_embed.2", {}),
        "conv_in": ("input_blocks.0.0", {}),
        "conv_norm_out": ("out.0", {}),
        "conv_out": ("out.2", {}),
    }
    index = 1
    for i, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            prefixes[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{index}.0", UNET_RESNET)
            if getattr(block, "attentions", None):
                prefixes[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{index}.1", {})
            index += 1
        if block.downsamplers:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", {})
            index += 1
    for k in range(len(unet.mid_block.resnets)):
        prefixes[f"mid_block.resnets.{k}"] = (f"middle_block.{2 * k}", UNET_RESNET)
    for k in range(len(unet.mid_block.attentions)):
        prefixes[f"mid_block.attentions.{k}"] = (f"middle_block.{2 * k + 1}", {})
    index = 0
    for i, block in enumerate(unet.up_blocks):
        has_attention = bool(getattr(block, "attentions", None))
        for j in range(len(block.resnets)):
            prefixes[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{index}.0", UNET_RESNET)
            if has_attention:
                prefixes[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{index}.1", {})
            index += 1
        if block.upsamplers:
            prefixes[f"up_blocks.{i}.upsamplers.0"] = (f"output_blocks.{index - 1}.{2 if has_attention else 1}", {})
    return prefixes


def vae_prefixes(vae: torch.nn.Module) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers module path -> (original module path, renames inside it), for every VAE part.

    The original decoder numbers its up blocks from the lowest resolution upwards (`up.{n-1-i}`),
    the reverse of diffusers' order; its mid block has `block_1`, `attn_1`, `block_2`.
    """
    prefixes = {name: (name, {}) for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                                              "quant_conv", "post_quant_conv")}
    prefixes["encoder.conv_norm_out"] = ("encoder.norm_out", {})
    prefixes["decoder.conv_norm_out"] = ("decoder.norm_out", {})
    for i, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", VAE_RESNET)
        if block.downsamplers:
            prefixes[f"encoder.down_blocks.{i}.downsamplers.0"] = (f"encoder.down.{i}.downsample", {})
    count = len(vae.decoder.up_blocks)
    for i, block in enumerate(vae.decoder.up_blocks):
        for j in range(len(block.resnets)):
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{count - 1 - i}.block.{j}", VAE_RESNET)
        if block.upsamplers:
            prefixes[f"decoder.up_blocks.{i}.upsamplers.0"] = (f"decoder.up.{count - 1 - i}.upsample", {})
    for part in ("encoder", "decoder"):
        for k in range(len(getattr(vae, part).mid_block.resnets)):
            prefixes[f"{part}.mid_block.resnets.{k}"] = (f"{part}.mid.block_{k + 1}", VAE_RESNET)
        prefixes[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", VAE_ATTENTION)
    return prefixes


def original_key(key: str, prefixes: dict[str, tuple[str, dict[str, str]]]) -> str:
    """`key` (a diffusers parameter name) in the original layout: its longest module path found in
    `prefixes` becomes the original path, and the start of the rest is renamed by that entry's map.

    Raises KeyError for a parameter that has no place in the original layout.
    """
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in prefixes:
            original, inner = prefixes[head]
            rest = ".".join(parts[cut:])
            for old, new in inner.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            return f"{original}.{rest}"
    raise KeyError(key)


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` as the model without Menagerie's additions: no LoRA factors (a fused
    model has its updates written into the weights), no concept vectors, and the layers that peft
    and the concept token table wrap under their own names again."""
    out = {}
    for key, value in model.state_dict().items():
        if "lora_" in key or ".concept_vectors." in key:
            continue
        out[key.replace(".base_layer.", ".").replace(".base_table.", ".")] = value
    return out


def _renamed(tensors: dict[str, torch.Tensor], prefixes: dict, part: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tensors.items():
        try:
            out[original_key(key, prefixes)] = value
        except KeyError:
            raise UserError(f"the {part} has a layer the original SD1.x layout has no place for ({key});"
                            f" only SD1.x-family models can be exported as a single file") from None
    return out


def unet_original(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's tensors under their original names (without the `model.diffusion_model.` prefix)."""
    return _renamed(plain_state_dict(unet), unet_prefixes(unet), "UNet")


def vae_original(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The VAE's tensors under their original names; the mid-block attention's linear weights
    `[c, c]` become 1x1 convolution weights `[c, c, 1, 1]`, as the original has them."""
    tensors = _renamed(plain_state_dict(vae), vae_prefixes(vae), "VAE")
    for key, value in tensors.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            tensors[key] = value.reshape(*value.shape, 1, 1)
    return tensors


def text_encoder_original(text_encoder: torch.nn.Module, vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """The CLIP text encoder's tensors as the original layout names them (transformers 4.x's
    `text_model.*`, which transformers 5 dropped), with the token embedding cut back to the base
    vocabulary: rows past it hold added tokens, which A1111 and ComfyUI would refuse on shape.

    Args:
        vocab_size: rows of the token embedding to keep; default: the base vocabulary of the
            concept token table when one is installed, else CLIP_VOCAB_SIZE (49408, SD1.x's).
    """
    if vocab_size is None:
        table = text_encoder.get_input_embeddings()
        vocab_size = table.base_vocab if isinstance(table, ConceptTokenTable) else CLIP_VOCAB_SIZE
    out = {}
    for key, value in plain_state_dict(text_encoder).items():
        key = key if key.startswith(TEXT_MODEL_LEVEL) else TEXT_MODEL_LEVEL + key
        out[key] = value[:vocab_size] if key == TOKEN_EMBEDDING else value
    return out


def original_sd_state_dict(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                           vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """The diffusers parts of an SD1.x model as one state dict in the original (LDM) single-file layout.

    Tensors are the models' own (detached, on the CPU, in their dtype): cast before saving.
    `vocab_size`: see `text_encoder_original`.
    """
    tensors = {UNET_PREFIX + k: v for k, v in unet_original(unet).items()}
    tensors.update({VAE_PREFIX + k: v for k, v in vae_original(vae).items()})
    tensors.update({TEXT_ENCODER_PREFIX + k: v for k, v in text_encoder_original(text_encoder, vocab_size).items()})
    return {k: v.detach().cpu() for k, v in tensors.items()}


# ---------------------------------------------------------------------------------------------
# The export


def export_paths(out_path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """(checkpoint, folder of embeddings, README) of an export to `out_path`: `X.safetensors`,
    `X-embeddings/`, `X-README.txt`."""
    out = Path(out_path).expanduser()
    return out, out.with_name(f"{out.stem}-embeddings"), out.with_name(f"{out.stem}-README.txt")


def check_out_path(out_path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """Refuse an export target that cannot be written, before any work; returns `export_paths`."""
    out, embeddings, readme = export_paths(out_path)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {str(out)!r} must be a .safetensors file")
    for path, kind in ((out, "a file"), (embeddings, "a folder"), (readme, "a file")):
        if path.exists() and path.is_dir() != (kind == "a folder"):
            raise UserError(f"cannot export to --out {str(out)!r}: {str(path)!r} exists and is not {kind}")
    existing = out.parent
    while not existing.exists():  # folders still to be made: the first one that exists must take them
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot export to --out {str(out)!r}: {str(existing)!r} is not a folder this user can write to")
    return out, embeddings, readme


def readme_text(checkpoint: str, embeddings: str, names: list[str], base_model: str) -> str:
    """The usage note shipped with an export: where the files go, how prompts name the pets."""
    from .export import DEFAULT_COLLAPSE

    first = names[0]
    collapse = "their mean" if DEFAULT_COLLAPSE == "mean" else f"the copy of cross-attention layer {DEFAULT_COLLAPSE.split(':')[1]}"
    files = ", ".join(f"{n}.safetensors" for n in names)
    return f"""Menagerie fused model of {', '.join('<' + n + '>' for n in names)} (base: {base_model})

Files
  {checkpoint}   the whole model in the original SD1.5 layout (UNet, VAE, CLIP text encoder),
      with the concepts' LoRAs fused into its weights (Mix-of-Show gradient fusion)
  {embeddings}/   one textual-inversion embedding per pet: {files}
      A pet's look is in both: use the checkpoint together with its embeddings.

Where they go
  AUTOMATIC1111 / Forge: the checkpoint into models/Stable-diffusion/, the embeddings into embeddings/
  ComfyUI: the checkpoint into models/checkpoints/ (Load Checkpoint node), the embeddings into models/embeddings/
  diffusers: pipe = StableDiffusionPipeline.from_single_file("{checkpoint}")
             pipe.load_textual_inversion("{embeddings}/{first}.safetensors", token="{first}")

Prompts (Menagerie's "a photo of <{first}> on a beach")
  AUTOMATIC1111 / Forge: a photo of {first} on a beach        (the embedding's file name is the word)
  ComfyUI:               a photo of embedding:{first} on a beach
  diffusers:             a photo of {first} on a beach        (the token given to load_textual_inversion)

Lossy: ED-LoRA gives each pet 16 layer-wise embeddings, one per cross-attention layer of the UNet.
An embedding file has one vector per token for every layer, so each pet's 16 were collapsed into one
({collapse}). That loses some of the pet's identity; Menagerie's own sampling with the fused model
(`python -m pipelines generate --fused FOLDER`) keeps all 16. Several pets in one picture need
regional prompting there (Menagerie's regions; in A1111 an extension such as Regional Prompter).
"""


def export_fused_checkpoint(base: BaseModel, fused_folder: str | os.PathLike, out_path: str | os.PathLike,
                            half: bool = False) -> Path:
    """Write the fused model in `fused_folder` on `base` as one `.safetensors` checkpoint in the
    original SD layout, with one textual-inversion embedding per concept and a README beside it.

    Writes `X.safetensors`, `X-embeddings/<name>.safetensors` and `X-README.txt` (`export_paths`);
    each replaces an earlier one of that name only once all are written.

    The concept embeddings come from the fused folder (`concepts.<name>`, each concept's `[2, 16, d]`
    layer-wise tokens as trained), loaded by `load_fused`; each is collapsed to `[2, d]` by
    `pipelines.export.textual_inversion_vectors`.

    Args:
        base: the base model the fusion fits (its architecture); afterwards it holds the fused
            model, as after `load_fused`. Load it in float32: the weights are written as held, and
            half-precision ones have already rounded the smaller fused updates.
        fused_folder: a fused model folder written by `fuse_concepts` (`python -m pipelines fuse`).
        out_path: the checkpoint file, ending in `.safetensors`; missing folders are made.
        half: write fp16 (2 GB at SD1.5 size instead of 4 GB). fp16 keeps a fused UNet update of
            1e-3 with ~0.6% error but a text-encoder one of 1e-4 with ~6% (docs/architecture.md).
    Returns:
        The checkpoint's path.
    Raises:
        UserError: `out_path` cannot be written, `fused_folder` is not a fused model, or it was made
            on another architecture than `base`'s. Nothing is written then.
    """
    from .export import save_a1111_embedding, textual_inversion_vectors
    from .fusion import load_fused
    from .layerwise import token_table

    # 1. Check inputs, then make `base` the fused model (load_fused refuses before changing anything)
    out, embeddings_dir, readme = check_out_path(out_path)
    fused = load_fused(base, fused_folder)

    # 2. The checkpoint's tensors and each concept's collapsed embedding
    dtype = torch.float16 if half else torch.float32
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
               for k, v in original_sd_state_dict(base.unet, base.vae, base.text_encoder).items()}
    table = token_table(base.text_encoder)
    vectors = {name: textual_inversion_vectors(table.concept_vectors[name].detach().cpu()) for name in fused.concepts}
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "base_model": base.name,
        "concepts": ",".join(fused.concepts),
        "fusion_method": fused.method,
        "fused_key": str(fused.record.get("key", "")),
        "dtype": "fp16" if half else "fp32",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "embeddings": json.dumps({name: f"{embeddings_dir.name}/{name}.safetensors" for name in fused.concepts}),
    }

    # 3. Write everything under temporary names, then rename into place
    tag = uuid.uuid4().hex[:8]
    tmp_checkpoint = out.with_name(f".{out.name}.{tag}.tmp")
    tmp_embeddings = embeddings_dir.with_name(f".{embeddings_dir.name}.{tag}.tmp")
    tmp_readme = readme.with_name(f".{readme.name}.{tag}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, tmp_checkpoint, metadata=metadata)
        for name, v in vectors.items():
            save_a1111_embedding(tmp_embeddings / f"{name}.safetensors", name, v)
        tmp_readme.write_text(readme_text(out.name, embeddings_dir.name, fused.concepts, base.name))
        os.replace(tmp_checkpoint, out)
        if embeddings_dir.exists():
            shutil.rmtree(embeddings_dir)
        os.replace(tmp_embeddings, embeddings_dir)
        os.replace(tmp_readme, readme)
    except OSError as error:
        raise UserError(f"cannot write the export to {str(out)!r}: {error}") from None
    finally:
        tmp_checkpoint.unlink(missing_ok=True)
        tmp_readme.unlink(missing_ok=True)
        shutil.rmtree(tmp_embeddings, ignore_errors=True)
    return out
