"""ED-LoRA concept weights (Mix-of-Show, Gu et al. 2023, section 3.3.1) on a base model.

A concept's weights are its layer-wise embeddings `[2, 16, d]` (V_rand, V_class) plus LoRA
adapters of rank 4, scale 1.0, on every CLIP attention projection (q/k/v/out) and on the UNet's
attn1 and attn2 to_q/to_k/to_v/to_out.0. The adapters are peft LoRA layers, one adapter name per
concept; ED-LoRA adds only what peft lacks, the layer-wise token embeddings (see `layerwise`).

Weights file keys: `embeddings` `[2, 16, d]`; `text_encoder.<peft key>` and `unet.<peft key>`, with
peft's key names (e.g. `...self_attn.q_proj.lora_A.weight`).

An imported LoRA (`lora_import`, record kind "lora") has the same file layout with more freedom:
embeddings `[words, 16, d]`, LoRA on any linear or 1x1 conv layer (A `[r, in, 1, 1]`, B `[out, r, 1, 1]`),
ranks per layer, and a text-encoder or UNet part alone. Its adapters go on exactly the layers
its tensors name; an ED-LoRA concept names exactly the modules of UNET_TARGETS and TEXT_ENCODER_TARGETS.

The other kinds of concept (issue 16) are stored in their own compact forms and become tokens plus
one LoRA adapter when loaded (`expand_concept_tensors`), so every sampling mode serves them alike:
- "custom-diffusion" (Kumari et al. 2023): embeddings [2, 16, d] (the modifier token V*, then the
  class word) and a dense update `unet.<module>.delta` [out, in] of each cross-attention to_k/to_v;
  loaded as the exact factors of `dense_as_lora`.
- "cones" (Liu et al. 2023): embeddings [2, 1, d] (a fixed identifier, the class word; the same in
  every layer) and `unet.<module>.shut`, int32 flat indices of the K/V weights the concept shuts
  (sets to 0); loaded as the update -W0 on those entries, as exact factors.
- "joint": one member of a group trained together (Gen4Gen / MuDI); an ED-LoRA file whose LoRA
  every member of the group shares.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from contextlib import contextmanager

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from . import KIND_NAMES  # noqa: F401  (re-exported: each kind's name for people)
from .errors import UserError
from .layerwise import NUM_LAYERS, WORD_LABELS, WORDS, add_concept_tokens, install_layerwise_attention

LORA_RANK = 4
# peft matches a string target with re.fullmatch against each module's full name.
UNET_TARGETS = r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)"
TEXT_ENCODER_TARGETS = r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)"
# a trained ED-LoRA concept; an imported LoRA (pipelines.lora_import); Custom Diffusion; Cones; a joint group's member
KINDS = ("edlora", "lora", "custom-diffusion", "cones", "joint")
LORA_SHAPED = ("edlora", "lora", "joint")  # files of LoRA factors as they are


# transformers 5 dropped the `text_model.` level of CLIPTextModel's module names (4.x:
# "text_model.encoder.layers.0...", 5.x: "encoder.layers.0..."). Concept and fused files name
# text-encoder layers without it, and `keys_for_model` adds it back for a 4.x model, so a concept
# trained under one version loads under the other.
TEXT_MODEL_LEVEL = "text_model."


def canonical_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with text-encoder keys in the file naming ("text_encoder.encoder.layers...")."""
    prefix = "text_encoder." + TEXT_MODEL_LEVEL
    return {("text_encoder." + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in tensors.items()}


def keys_for_model(tensors: dict[str, torch.Tensor], text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`tensors` (either naming) with text-encoder keys as `text_encoder`'s own module names."""
    tensors = canonical_keys(tensors)
    if not hasattr(text_encoder, "text_model"):
        return tensors
    return {("text_encoder." + TEXT_MODEL_LEVEL + k[len("text_encoder."):] if k.startswith("text_encoder.") else k): v
            for k, v in tensors.items()}


def text_module_name(text_encoder: torch.nn.Module, name: str) -> str:
    """A text-encoder module name in the file naming, as `text_encoder` calls it."""
    if hasattr(text_encoder, "text_model") and not name.startswith(TEXT_MODEL_LEVEL):
        return TEXT_MODEL_LEVEL + name
    return name


def lora_config(targets: str | list[str], rank: int = LORA_RANK, rank_pattern: dict[str, int] | None = None) -> LoraConfig:
    """LoRA as Mix-of-Show uses it: output = W0 x + 1.0 * B A x (alpha = rank gives scale 1.0).

    peft's default init (A Kaiming-uniform, B zero) is Mix-of-Show's, so step 0 equals the base.
    `targets`: a regex fullmatched against module names, or a list of module names. `rank_pattern`
    (escaped module name -> rank) gives some layers another rank, each still at scale 1.0.
    """
    ranks = [rank, *(rank_pattern or {}).values()]
    if any(r <= 0 for r in ranks):
        raise UserError(f"LoRA rank must be a positive integer, got {min(ranks)}")
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0, init_lora_weights=True,
                      rank_pattern=dict(rank_pattern or {}), alpha_pattern=dict(rank_pattern or {}))


def add_lora(model: torch.nn.Module, adapter: str, targets: str | list[str], rank: int = LORA_RANK,
             rank_pattern: dict[str, int] | None = None) -> None:
    """Add LoRA adapter `adapter` on the modules of `model` matching `targets` (replacing one of that name).

    peft's `inject_adapter_in_model` works the same on diffusers and transformers models.
    """
    remove_lora(model, adapter)
    with warnings.catch_warnings():  # peft warns that a second adapter joins the first: intended here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(lora_config(targets, rank, rank_pattern), model, adapter_name=adapter)


def remove_lora(model: torch.nn.Module, adapter: str) -> None:
    for layer in lora_layers(model).values():
        if adapter in layer.lora_A:
            layer.delete_adapter(adapter)


def lora_layers(model: torch.nn.Module) -> dict[str, BaseTunerLayer]:
    """Module name -> peft LoRA layer, for every adapted linear layer of `model`."""
    return {name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def lora_parameters(model: torch.nn.Module, adapter: str) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if ("lora_A" in n or "lora_B" in n) and f".{adapter}." in n]


def set_active_adapters(model: torch.nn.Module, adapters: list[str]) -> None:
    """Make exactly `adapters` active in every LoRA layer of `model` (none: the base model)."""
    for layer in lora_layers(model).values():
        present = [a for a in adapters if a in layer.lora_A]
        if present:
            layer.enable_adapters(True)
            layer.set_adapter(present)
        else:
            layer.enable_adapters(False)


@contextmanager
def merged_adapter(model: torch.nn.Module, adapter: str, unwrap: bool = False):
    """Run `model` with `adapter`'s LoRA folded into its weights, then restore the originals exactly.

    Sampling with an unmerged LoRA runs two extra small matmuls in each of the 128 UNet layers at
    every step (1.72x the time of plain sampling at SD1.5 size on an H100, bench/README.md). Folding
    W' = W + B A * scale once removes that. The original weight tensors are kept and put back, so
    nothing drifts however often it is done (peft's in-place merge/unmerge rounds in half precision).

    With `unwrap`, each peft LoRA layer is also swapped for its base linear until the end: the
    wrappers' Python cost per call is half of one concept's overhead over plain sampling at SD size
    (bench/RESULTS.md, "Where the one-concept sampling overhead goes"). Not for a compiled model,
    whose graph would be recompiled for the swapped modules on every call.
    """
    swapped = []
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if adapter not in layer.lora_A:
                continue
            linear = layer.get_base_layer()
            original = linear.weight.data
            delta = layer.get_delta_weight(adapter)  # B A * scaling, as peft merges it
            linear.weight.data = (original.float() + delta.float()).to(original.dtype)
            swapped.append((linear, original))
    set_active_adapters(model, [])
    unwrapped = []
    if unwrap:
        for name, layer in lora_layers(model).items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            unwrapped.append((parent, child, layer))
            setattr(parent, child, layer.get_base_layer())
    try:
        yield
    finally:
        for parent, child, layer in unwrapped:
            setattr(parent, child, layer)
        for linear, original in swapped:
            linear.weight.data = original


def ensure_layerwise(base) -> None:
    install_layerwise_attention(base.unet)


def concept_state_dict(base, adapter: str, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of one concept, ready for safetensors (fp32, contiguous, on the CPU, file naming)."""
    tensors = {"embeddings": embeddings.detach().float().cpu().contiguous()}
    for prefix, model in (("text_encoder", base.text_encoder), ("unet", base.unet)):
        for key, value in get_peft_model_state_dict(model, adapter_name=adapter).items():
            tensors[f"{prefix}.{key}"] = value.detach().float().cpu().contiguous()
    return canonical_keys(tensors)


def split_state_dict(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict, dict]:
    """(embeddings, text-encoder LoRA, UNet LoRA) of a concept's tensors."""
    if "embeddings" not in tensors:
        raise UserError("concept weights have no 'embeddings' tensor; this is not an ED-LoRA concept file")
    text = {k[len("text_encoder."):]: v for k, v in tensors.items() if k.startswith("text_encoder.")}
    unet = {k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")}
    return tensors["embeddings"], text, unet


def lora_rank_of(tensors: dict[str, torch.Tensor]) -> int:
    ranks = {v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight")}
    if len(ranks) != 1:
        raise UserError(f"concept LoRA tensors have inconsistent ranks {sorted(ranks)}")
    return ranks.pop()


def lora_ranks(part: dict[str, torch.Tensor]) -> dict[str, int]:
    """Module name -> LoRA rank, for the `<module>.lora_A.weight` keys of one model's tensors."""
    return {k[: -len(".lora_A.weight")]: v.shape[0] for k, v in part.items() if k.endswith(".lora_A.weight")}


def _check_pairs(tensors: dict[str, torch.Tensor]) -> None:
    """Every LoRA layer has an A and a B of one rank, both 2-d (linear) or both 1x1 4-d (conv)."""
    for key, down in tensors.items():
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            if key != "embeddings":
                raise UserError(f"concept tensor {key!r} is not a LoRA factor (expected <layer>.lora_A.weight or .lora_B.weight)")
            continue
        if not key.endswith(".lora_A.weight"):
            if key.replace(".lora_B.", ".lora_A.") not in tensors:
                raise UserError(f"concept tensor {key!r} has no lora_A partner")
            continue
        up = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if up is None:
            raise UserError(f"concept tensor {key!r} has no lora_B partner")
        conv = down.ndim == 4 and tuple(down.shape[2:]) == (1, 1) and up.ndim == 4 and tuple(up.shape[2:]) == (1, 1)
        if not (conv or (down.ndim == 2 and up.ndim == 2)) or up.shape[1] != down.shape[0]:
            raise UserError(f"concept tensors of {key[: -len('.lora_A.weight')]!r} have shapes {tuple(down.shape)} (A) and"
                            f" {tuple(up.shape)} (B); expected [r, in] and [out, r], or [r, in, 1, 1] and [out, r, 1, 1]")


def base_layer_shape(module: torch.nn.Module | None) -> tuple[int, int, bool] | None:
    """(in, out, is 1x1 conv) of a layer LoRA can adapt, a linear or 1x1 conv (or its peft wrapper); else None."""
    layer = getattr(module, "base_layer", module)
    if isinstance(layer, torch.nn.Linear):
        return layer.in_features, layer.out_features, False
    if isinstance(layer, torch.nn.Conv2d) and layer.kernel_size == (1, 1) and layer.groups == 1:
        return layer.in_channels, layer.out_channels, True
    return None


def check_concept_tensors(tensors: dict[str, torch.Tensor], base=None, kind: str | None = "edlora") -> None:
    """Structural checks of a concept's tensors; with `base`, also that every shape fits it.

    `kind` is the record's: "edlora" needs embeddings [2, 16, d], one rank and both LoRA parts;
    "lora" (an imported LoRA) allows [words, 16, d], a rank per layer, 1x1 conv layers and one part
    alone; None checks only what both share (apply_concept: the library checked the file's kind).
    Raises UserError naming the first tensor that does not fit.
    """
    if kind in ("custom-diffusion", "cones"):
        check_compact_tensors(tensors, kind, base)
        return
    embeddings, text, unet = split_state_dict(tensors)
    for key, value in tensors.items():
        if not value.dtype.is_floating_point:
            raise UserError(f"concept tensor {key!r} has dtype {value.dtype}; expected floating point")
        if not torch.isfinite(value).all():
            raise UserError(f"concept tensor {key!r} contains NaN or infinity")
    words = range(len(WORDS), len(WORDS) + 1) if kind in ("edlora", "joint") else range(1, len(WORD_LABELS) + 1)
    if embeddings.ndim != 3 or embeddings.shape[0] not in words or embeddings.shape[1] != NUM_LAYERS:
        raise UserError(f"concept embeddings have shape {tuple(embeddings.shape)}; expected [2, 16, d]"
                        f"{'' if kind == 'edlora' else f' (an imported LoRA: [words, 16, d], 1 to {len(WORD_LABELS)} words)'}")
    unknown = [k for k in tensors if k != "embeddings" and not k.startswith(("text_encoder.", "unet."))]
    if unknown:
        raise UserError(f"concept file has unexpected tensors, e.g. {unknown[0]!r}")
    if kind in ("edlora", "joint"):
        if not text or not unet:
            raise UserError("concept file lacks its text-encoder or UNet LoRA tensors")
        lora_rank_of(tensors)
    elif not text and not unet:
        raise UserError("concept file holds no LoRA tensors")
    if base is not None:
        _check_fits_base(tensors, base)
    _check_pairs(tensors)


COMPACT_SUFFIX = {"custom-diffusion": ".delta", "cones": ".shut"}


def check_compact_tensors(tensors: dict[str, torch.Tensor], kind: str, base=None) -> None:
    """Structural checks of a Custom Diffusion or Cones file (see the module docstring); with `base`,
    that every layer exists and every delta shape or index fits its weight. Raises UserError."""
    if "embeddings" not in tensors:
        raise UserError("concept weights have no 'embeddings' tensor")
    embeddings = tensors["embeddings"]
    layers = 1 if kind == "cones" else NUM_LAYERS
    if embeddings.ndim != 3 or embeddings.shape[0] != len(WORDS) or embeddings.shape[1] != layers or not embeddings.dtype.is_floating_point:
        raise UserError(f"concept embeddings have shape {tuple(embeddings.shape)}; a {kind} concept needs [2, {layers}, d] floats")
    suffix = COMPACT_SUFFIX[kind]
    parts = {k: v for k, v in tensors.items() if k != "embeddings"}
    if not parts:
        raise UserError(f"a {kind} concept file holds no unet.<layer>{suffix} tensors")
    modules = dict(base.unet.named_modules()) if base is not None else {}
    for key, value in tensors.items():
        if key != "embeddings" and (not key.startswith("unet.") or not key.endswith(suffix)):
            raise UserError(f"concept tensor {key!r} is not a unet.<layer>{suffix} tensor of a {kind} concept")
        if kind == "cones" and key != "embeddings":
            if value.dtype != torch.int32 or value.ndim != 1:
                raise UserError(f"concept tensor {key!r} must be 1-d int32 indices; it is {value.dtype} {tuple(value.shape)}")
            if value.numel() and (value.min() < 0 or bool((value[1:] <= value[:-1]).any())):
                raise UserError(f"concept tensor {key!r} must hold sorted, distinct, non-negative indices")
        elif not torch.isfinite(value.float()).all():
            raise UserError(f"concept tensor {key!r} contains NaN or infinity")
        elif kind == "custom-diffusion" and key != "embeddings" and (value.ndim != 2 or not value.dtype.is_floating_point):
            raise UserError(f"concept tensor {key!r} must be a 2-d float [out, in] update; it is {tuple(value.shape)}")
        if base is None or key == "embeddings":
            continue
        module = modules.get(key[len("unet."): -len(suffix)])
        weight = getattr(getattr(module, "base_layer", module), "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise UserError(f"concept tensor {key!r} names a layer this base model does not have")
        if kind == "custom-diffusion" and tuple(value.shape) != tuple(weight.shape):
            raise UserError(f"concept tensor {key!r} has shape {tuple(value.shape)}; this base needs {tuple(weight.shape)}")
        if kind == "cones" and value.numel() and int(value[-1]) >= weight.numel():
            raise UserError(f"concept tensor {key!r} indexes past its layer's {weight.numel()} weights")
    dim = base.text_encoder.get_input_embeddings().weight.shape[1] if base is not None else None
    if dim is not None and embeddings.shape[2] != dim:
        raise UserError(f"concept embeddings are {embeddings.shape[2]}-d; this base's text encoder uses {dim}-d")


def dense_as_lora(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LoRA factors (A [r, in], B [out, r]) of a dense update, r = min(out, in): B @ A == delta.

    One factor is the identity and the other the update itself, so nothing is approximated (a
    Custom Diffusion K/V update has full rank) and peft serves the update as any other adapter.
    """
    out_features, in_features = delta.shape
    if out_features <= in_features:
        return delta.clone(), torch.eye(out_features, dtype=delta.dtype)
    return torch.eye(in_features, dtype=delta.dtype), delta.clone()


def shut_update(weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The update that shuts (zeroes) the entries `indices` of `weight`: -W0 there, 0 elsewhere."""
    update = torch.zeros(weight.numel(), dtype=torch.float32)
    flat = weight.detach().float().cpu().reshape(-1)
    update[indices.long()] = -flat[indices.long()]
    return update.reshape(weight.shape)


def shut_as_lora(weight: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LoRA factors of `shut_update`: A holds the touched rows' updates, B puts them back in place
    (rank = rows touched, far below min(out, in) for a few thousand neurons)."""
    update = shut_update(weight, indices)
    rows = torch.unique(indices.long() // weight.shape[1])
    up = torch.zeros(weight.shape[0], len(rows))
    up[rows, torch.arange(len(rows))] = 1.0
    return update[rows].clone(), up


def base_weight(base, module_name: str) -> torch.Tensor:
    """The frozen weight of a UNet layer (under a peft wrapper, the wrapped layer's)."""
    module = base.unet.get_submodule(module_name)
    return getattr(module, "base_layer", module).weight


def compact_kind(tensors: dict[str, torch.Tensor]) -> str | None:
    """"custom-diffusion" or "cones" when `tensors` are in that compact form, else None."""
    for key in tensors:
        if key.endswith(".delta"):
            return "custom-diffusion"
        if key.endswith(".shut"):
            return "cones"
    return None


def dense_updates(tensors: dict[str, torch.Tensor], base) -> dict[str, torch.Tensor]:
    """A Custom Diffusion or Cones concept's updates, "unet.<module>" -> dense float32 [out, in]."""
    updates = {}
    for key, value in tensors.items():
        if key.endswith(".delta"):
            updates[key[: -len(".delta")]] = value.float()
        elif key.endswith(".shut"):
            module = key[len("unet."): -len(".shut")]
            updates[key[: -len(".shut")]] = shut_update(base_weight(base, module), value)
    return updates


def expand_concept_tensors(tensors: dict[str, torch.Tensor], base) -> dict[str, torch.Tensor]:
    """Any kind's tensors in the LoRA form `apply_concept` loads: embeddings [w, 16, d] and
    `<module>.lora_A/B.weight` factors. ED-LoRA-shaped files come back as they are."""
    if compact_kind(tensors) is None:
        return tensors
    embeddings = tensors["embeddings"]
    out = {"embeddings": embeddings.expand(-1, NUM_LAYERS, -1).contiguous() if embeddings.shape[1] == 1 else embeddings}
    for key, value in tensors.items():
        if key.endswith(".delta"):
            module = key[: -len(".delta")]
            down, up = dense_as_lora(value.float())
        elif key.endswith(".shut") and value.numel():
            module = key[: -len(".shut")]
            down, up = shut_as_lora(base_weight(base, module[len("unet."):]), value)
        else:
            continue
        out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = down, up
    return out


def _check_fits_base(tensors: dict[str, torch.Tensor], base) -> None:
    """Every tensor fits `base`: the embedding width, and each LoRA factor's layer and shape."""
    embeddings, text, unet = split_state_dict(keys_for_model(tensors, base.text_encoder))
    dim = base.text_encoder.get_input_embeddings().weight.shape[1] if hasattr(base.text_encoder, "get_input_embeddings") else None
    if dim is not None and embeddings.shape[2] != dim:
        raise UserError(f"concept embeddings are {embeddings.shape[2]}-d; this base's text encoder uses {dim}-d")
    for prefix, model, part in (("text_encoder", base.text_encoder, text), ("unet", base.unet, unet)):
        modules = dict(model.named_modules())
        for key, value in part.items():
            module_name = key.rsplit(".lora_", 1)[0]
            module = modules.get(module_name)
            if module is None:
                raise UserError(f"concept tensor {prefix}.{key} names a layer this base model does not have")
            shape = base_layer_shape(module)
            if shape is None:
                layer = getattr(module, "base_layer", module)
                raise UserError(f"concept tensor {prefix}.{key} adapts a {type(layer).__name__}"
                                f"{f' with kernel {layer.kernel_size}' if isinstance(layer, torch.nn.Conv2d) else ''};"
                                f" LoRA layers must be linear or 1x1 conv layers")
            in_features, out_features, conv = shape
            if value.ndim != (4 if conv else 2):
                raise UserError(f"concept tensor {prefix}.{key} has shape {tuple(value.shape)}; this base's layer needs"
                                f" {'[r, in, 1, 1] / [out, r, 1, 1] (a 1x1 conv)' if conv else '[r, in] / [out, r] (a linear)'}")
            rank = value.shape[0] if ".lora_A." in key else value.shape[1]
            expected = (rank, in_features) if ".lora_A." in key else (out_features, rank)
            expected = expected + (1, 1) if conv else expected
            if tuple(value.shape) != expected:
                raise UserError(f"concept tensor {prefix}.{key} has shape {tuple(value.shape)}; this base needs {expected}")


def targets_of(part: dict[str, torch.Tensor]) -> tuple[list[str], int, dict[str, int]]:
    """(module names, most common rank, escaped name -> rank of the others) of one model's LoRA tensors.

    The adapter goes on exactly the layers the tensors name: for an ED-LoRA concept those are the
    modules UNET_TARGETS / TEXT_ENCODER_TARGETS match, for an imported LoRA whatever it adapts.
    """
    ranks = lora_ranks(part)
    counts = {r: list(ranks.values()).count(r) for r in ranks.values()}
    rank = max(sorted(counts), key=counts.get)
    # peft matches pattern keys as regexes ending at a module name: escaped full names match one module
    pattern = {re.escape(module): r for module, r in ranks.items() if r != rank}
    return sorted(ranks), rank, pattern


def apply_concept(base, name: str, tensors: dict[str, torch.Tensor], lora_scale: float = 1.0) -> None:
    """Load concept `name` into `base`: its tokens into the text encoder, its LoRA as adapter `name`.

    `lora_scale` multiplies the LoRA deltas (Mix-of-Show suggests 0.7 for one ED-LoRA at inference).
    LoRA weights are kept in fp32; peft computes the adapter branch in that precision.
    """
    if compact_kind(tensors) is not None:
        lora_scale = 1.0  # the methods' updates as found: a scaled shut neuron or K/V update is neither method's
    digest = tensors_digest(tensors, lora_scale)
    if base.loaded_concepts.get(name) == digest:
        return  # already loaded with these weights and scale: re-injecting costs seconds at SD size
    kind = compact_kind(tensors)
    if kind is not None:
        check_compact_tensors(tensors, kind, base)
        tensors = expand_concept_tensors(tensors, base)
    check_concept_tensors(tensors, base, kind=None)
    embeddings, text, unet = split_state_dict(keys_for_model(tensors, base.text_encoder))
    ensure_layerwise(base)
    add_concept_tokens(base.tokenizer, base.text_encoder, name, embeddings)
    for model, part in ((base.text_encoder, text), (base.unet, unet)):
        remove_lora(model, name)
        if not part:  # an imported LoRA of the UNet (or text encoder) alone
            continue
        targets, rank, rank_pattern = targets_of(part)
        add_lora(model, name, targets, rank, rank_pattern)
        scaled = {k: (v * lora_scale if ".lora_B." in k else v).to(base.device, torch.float32) for k, v in part.items()}
        result = set_peft_model_state_dict(model, scaled, adapter_name=name)
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if missing:
            raise UserError(f"concept <{name}> has LoRA weights for layers this base does not have, e.g. {missing[0]}")
        for param in lora_parameters(model, name):
            param.data = param.data.float()
            param.requires_grad_(False)
    base.loaded_concepts[name] = digest


def tensors_digest(tensors: dict[str, torch.Tensor], lora_scale: float) -> str:
    """A hash of a concept's tensors and the scale it is loaded at."""
    digest = hashlib.sha1(repr(lora_scale).encode())
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
