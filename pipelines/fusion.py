"""Gradient fusion of ED-LoRA concepts (Mix-of-Show, Gu et al. 2023, section 3.3.2), solved in closed form.

For every LoRA'd linear layer with base weight W0 and concept deltas dW_i, Mix-of-Show minimises

    sum_i || (W0 + dW_i) X_i - W X_i ||_F^2            (X_i: the layer's inputs under concept i)

with LBFGS started at W0 (30-50 min for 14 concepts on an A100). Writing G_i = X_i X_i^T (the Gram
matrix of the inputs, `in x in`), the normal equations are W sum_i G_i = sum_i (W0 + dW_i) G_i, and
the solution closest to W0, which is where LBFGS from W0 converges, is

    W = W0 + (sum_i dW_i G_i) (sum_i G_i)^+ .

Eigen-directions of sum_i G_i with eigenvalue <= `rcond` * largest are treated as null: W keeps W0
along them. The product's cutoff is 1e-3, not machine precision. Two concepts whose inputs are
nearly the same (the end-of-text rows of "photo of a <a> dog" and "... <b> dog") but whose targets
differ make the exact solve fit that difference along a tiny eigen-direction, with weights that
blow up on any other input. LBFGS started at W0 never gets far along such directions in its
50-500 iterations (the implicit regularisation Mix-of-Show relies on); the cutoff does the same
explicitly. Measured in the toy world (docs/toyworld.md): five pets fused at 1e-6 give ruined
images, at 1e-4 to 1e-2 they keep the pets.

The Grams are accumulated by forward hooks while the activations stream by; activations are never
stored. Inputs follow Mix-of-Show:
  1. text encoder (q/k/v/out_proj): concept i's own model on "photo of a <c>" and "<c>", all 16
     layer-wise variants, unpadded (an imported LoRA: its own trigger prompt in place of the first);
  2. UNet cross-attention to_k/to_v of layer l: outputs of the *fused* text encoder for the same
     prompts (variant l), at the concept-token and end-of-text positions;
  3. the other UNet LoRA layers (attn1 q/k/v/out, attn2 q/out): one 20-step DPM-Solver++ sample per
     concept (no CFG) with the fused text encoder and K/V, and concept i's own LoRA on these layers,
     every step recorded.
Token embeddings are not fused: each concept keeps its own tokens.

Imported LoRAs (`lora_import`) may adapt more layers (CLIP's MLP, the UNet's feed-forward and
proj_in/proj_out); a concept without a LoRA on a layer has dW_i = 0 there, and its inputs still count.
proj_in/proj_out are 1x1 convs in SD1.5: a 1x1 conv is a linear layer applied to every pixel, so its
Gram sums over pixels (`GramRecorder`) and its weight `[out, in, 1, 1]` is solved as `[out, in]`.

The weight-average baseline (`method="weight"`, Mix-of-Show Eq. 2) is W = W0 + sum_i w_i dW_i, w_i = 1/n.

A fused model is stored as only what changed, in float32: the update W - W0 of each fused layer and
the concept token table. Updates rather than weights, because (1) every SD1.5 fine-tune shares the
architecture, and fused weights W written into another fine-tune would silently replace its
layers with the first base's; an update applies to any base of the architecture (with a note when
the base differs from the one fused on, recognised by a signature of its weights); (2) an update of
1e-4 on weights of 0.03 does not survive being stored in half precision.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .base import BaseModel
from .errors import Cancelled, UserError
from .layerwise import (NUM_LAYERS, add_concept_tokens, concept_tokens, concept_words, cross_attention_layers, encode_layerwise,
                        expand_prompt, install_layerwise_attention)
from .edlora import (KIND_NAMES, LORA_SHAPED, apply_concept, canonical_keys, expand_concept_tensors, keys_for_model, lora_layers,
                     set_active_adapters, text_module_name)

METHODS = ("gradient", "weight", "custom-diffusion", "cones", "group")
KIND_MERGES = ("custom-diffusion", "cones", "group")  # merges of the other concept kinds (issue 16), `_merge_kinds`
FUSED_WEIGHTS = "fused.safetensors"
FUSED_RECORD = "fused.json"
REPORT_FILE = "report.json"
FUSED_FORMAT = "menagerie-fused-v2"  # v2 stores float32 updates W - W0 and the base's signature; v1 stored W
# A layer is flagged in the report when its relative output error for a concept is this many times
# the median of its kind of layer (text encoder, UNet K/V, other UNet layers) and above the floor.
# Healthy toy-world fusions of three pets stay below 5x the median (max 0.19 for K/V layers).
OUTLIER_RATIO = 10.0
OUTLIER_FLOOR = 0.05
# Two bases are the same when every fused layer's weight statistics agree to this relative
# tolerance. Loading in bf16 moves them by ~1e-3/sqrt(entries): < 1e-4 on the tiny model's 32x32
# layers, ~2e-6 at SD size; a fine-tune moves weights by percents.
SIGNATURE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class FusionConfig:
    # "auto": what the concepts' kind allows first (`merge_methods`); "gradient" (gradient fusion, closed form),
    # "weight" (weight averaging), "custom-diffusion" (its closed-form merge), "cones" (union), "group" (shared weights)
    method: str = "auto"
    rcond: float = 1e-3  # eigenvalues of sum G_i below rcond * largest count as zero (see the module docstring)
    spatial_steps: int = 20  # denoising steps of the per-concept sample feeding the UNet spatial layers
    seed: int = 0  # seed of those samples (Mix-of-Show leaves them unseeded)


@dataclass
class FusedModel:
    folder: Path
    concepts: list[str]
    method: str
    record: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    note: str = ""  # set when the fused model was made on another base of the same architecture


# ---------------------------------------------------------------------------------------------
# The math: pure functions of tensors


def gram_pinv(gram_sum: torch.Tensor, rcond: float = 1e-6) -> torch.Tensor:
    """(sum_i G_i)^+ in float64 through its eigen-decomposition; eigenvalues <= rcond * max are dropped."""
    gram_sum = gram_sum.double()
    gram_sum = (gram_sum + gram_sum.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(gram_sum)
    top = eigenvalues.max().clamp(min=0)
    if top <= 0:
        return torch.zeros_like(gram_sum)
    keep = eigenvalues > rcond * top
    kept = eigenvectors[:, keep]
    return (kept / eigenvalues[keep]) @ kept.T


def fuse_layer(w0: torch.Tensor, deltas: list[torch.Tensor], grams: list[torch.Tensor], rcond: float = 1e-6,
               pinv: torch.Tensor | None = None) -> torch.Tensor:
    """Exact gradient fusion of one linear layer, in float64.

    Args:
        w0: base weight `[out, in]`.
        deltas: concept deltas dW_i `[out, in]`.
        grams: input Grams G_i = X_i X_i^T `[in, in]` (X_i: inputs as columns).
        rcond: relative eigenvalue cutoff of (sum_i G_i)^+.
        pinv: (sum_i G_i)^+ if already computed (layers sharing an input share it).
    Returns:
        W = W0 + (sum_i dW_i G_i)(sum_i G_i)^+, `[out, in]`, float64.
    """
    if len(deltas) != len(grams) or not deltas:
        raise ValueError(f"need one Gram per delta, got {len(deltas)} deltas and {len(grams)} Grams")
    if pinv is None:
        pinv = gram_pinv(sum(g.double() for g in grams), rcond)
    weighted = sum(d.double() @ g.double() for d, g in zip(deltas, grams))
    return w0.double() + weighted @ pinv


def weight_average(w0: torch.Tensor, deltas: list[torch.Tensor], weights: list[float] | None = None) -> torch.Tensor:
    """Mix-of-Show's weight-fusion baseline: W0 + sum_i w_i dW_i (w_i = 1/n by default), float64."""
    weights = weights or [1.0 / len(deltas)] * len(deltas)
    return w0.double() + sum(w * d.double() for w, d in zip(weights, deltas))


def relative_output_error(w: torch.Tensor, target: torch.Tensor, gram: torch.Tensor) -> float:
    """||W X - T X|| / ||T X|| from the Gram alone: sqrt(tr(E G E^T) / tr(T G T^T)), E = W - T."""
    error = (w.double() - target.double())
    gram = gram.double()
    numerator = torch.einsum("oi,ij,oj->", error, gram, error).clamp(min=0)
    denominator = torch.einsum("oi,ij,oj->", target.double(), gram, target.double()).clamp(min=1e-300)
    return float((numerator / denominator).sqrt())


# ---------------------------------------------------------------------------------------------
# Gram accumulation with forward hooks


def input_group(module_name: str) -> str:
    """Layers that read the same input share a Gram: q/k/v of an attention (k/v only for attn2)."""
    parent, _, leaf = module_name.rpartition(".") if not module_name.endswith("to_out.0") else (module_name[: -len(".to_out.0")], "", "to_out.0")
    if leaf in ("q_proj", "k_proj", "v_proj"):
        return f"{parent}.qkv"
    if leaf in ("to_q", "to_k", "to_v"):
        if parent.endswith("attn2") and leaf in ("to_k", "to_v"):
            return f"{parent}.kv"  # cross-attention K/V read the text, to_q reads the image
        return f"{parent}.qkv" if parent.endswith("attn1") else f"{parent}.q"
    return module_name


def is_conv(module: torch.nn.Module) -> bool:
    """A (peft-wrapped) Conv2d: its input is [B, C, H, W], channels first."""
    return isinstance(getattr(module, "base_layer", module), torch.nn.Conv2d)


class GramRecorder:
    """Accumulates G = sum_rows x^T x of the inputs of chosen layers, one Gram per input group.

    Rows are tokens for a linear layer ([..., in]) and pixels for a 1x1 conv ([B, in, H, W]).
    """

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.grams: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self._handles = []
        for group, name in {input_group(n): n for n in sorted(modules)}.items():
            self._handles.append(modules[name].register_forward_pre_hook(self._hook(group, is_conv(modules[name]))))

    def _hook(self, group: str, channels_first: bool = False):
        def record(module, args, kwargs=None):
            x = args[0].detach()
            if channels_first:  # a 1x1 conv: one row per pixel
                x = x.movedim(1, -1)
            x = x.reshape(-1, x.shape[-1]).float()
            gram = x.T @ x
            if group in self.grams:
                self.grams[group] += gram
                self.rows[group] += x.shape[0]
            else:
                self.grams[group] = gram
                self.rows[group] = x.shape[0]

        return record

    def close(self) -> dict[str, torch.Tensor]:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return {k: v.cpu().double() for k, v in self.grams.items()}


@contextmanager
def recording(modules: dict[str, torch.nn.Module]):
    recorder = GramRecorder(modules)
    try:
        yield recorder
    finally:
        recorder.close()


# ---------------------------------------------------------------------------------------------
# Glue: concepts' deltas, activation passes, writing weights


def concept_deltas(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """dW = B A (LoRA scale 1.0, alpha = rank) of every LoRA'd module under `prefix`, float64, `[out, in]`
    (a 1x1 conv's `[out, r, 1, 1]` and `[r, in, 1, 1]` factors as matrices)."""
    deltas = {}
    for key, down in tensors.items():
        if key.startswith(prefix + ".") and key.endswith(".lora_A.weight"):
            module = key[len(prefix) + 1 : -len(".lora_A.weight")]
            up = tensors[key.replace(".lora_A.", ".lora_B.")]
            deltas[module] = up.flatten(1).double() @ down.flatten(1).double()
    return deltas


def linear_of(model: torch.nn.Module, name: str) -> torch.nn.Linear | torch.nn.Conv2d:
    """The base layer (a linear, or an imported LoRA's 1x1 conv) of a LoRA'd module."""
    module = model.get_submodule(name)
    return getattr(module, "base_layer", module)


def _encode_unpadded(base: BaseModel, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode texts of equal token length (the 16 layer variants of one prompt) without padding.

    Returns ids [n, T] and hidden states [n, T, d]; no padding rows reach the Grams.
    """
    ids = base.tokenizer(texts).input_ids
    if len({len(i) for i in ids}) != 1:
        raise ValueError("layer variants of a prompt should tokenize to equal lengths")
    ids = torch.tensor(ids, device=base.device)
    return ids, base.text_encoder(ids)[0]


def fusion_prompts(name: str, concept_prompt: str = "") -> list[str]:
    """Mix-of-Show's two prompts of a concept; an imported LoRA's trigger prompt (`Concept.concept_prompt`,
    its "trigger class" written as <name>) replaces the first."""
    return [concept_prompt or f"photo of a <{name}>", f"<{name}>"]


def _apply_updates(model: torch.nn.Module, updates: dict[str, torch.Tensor]) -> None:
    """W = W0 + update (float32) in each named layer of `model`, rounded once to the layer's dtype.

    Fusing and loading a stored fused model both write through here, so both give the same weights."""
    with torch.no_grad():
        for name, update in updates.items():
            linear = linear_of(model, name)
            update = update.reshape(linear.weight.shape)  # a 1x1 conv's update may come as [out, in]
            weight = linear.weight.detach().float() + update.to(linear.weight.device, torch.float32)
            linear.weight.copy_(weight.to(linear.weight.dtype))


def weight_signature(weight: torch.Tensor) -> list[float]:
    """Statistics that tell one base's layer from another's (sum |w|, sum w, sum w^2), in float64.

    Stable across the dtypes a base loads in, unlike a hash of the bytes."""
    w = weight.detach().double()
    return [float(w.abs().sum()), float(w.sum()), float((w * w).sum())]


def base_signature(base: BaseModel, layers: list[str]) -> dict[str, list[float]]:
    """`weight_signature` of the named layers ("text_encoder.<module>" / "unet.<module>") of `base`."""
    models = {"text_encoder": base.text_encoder, "unet": base.unet}
    out = {}
    for name in layers:
        prefix, module = name.split(".", 1)
        if prefix == "text_encoder":
            module = text_module_name(base.text_encoder, module)
        out[name] = weight_signature(linear_of(models[prefix], module).weight)
    return out


def same_signature(a: dict[str, list[float]], b: dict[str, list[float]], tolerance: float = SIGNATURE_TOLERANCE) -> bool:
    """True when two signatures describe the same base weights (relative to each layer's scale)."""
    if a.keys() != b.keys():
        return False
    for name in a:
        (abs_a, sum_a, sq_a), (abs_b, sum_b, sq_b) = a[name], b[name]
        scale = max(abs_a, 1e-12)
        if abs(abs_a - abs_b) > tolerance * scale or abs(sum_a - sum_b) > tolerance * scale:
            return False
        if abs(sq_a - sq_b) > tolerance * max(sq_a, 1e-24):
            return False
    return True


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("fusion cancelled")


def cache_key(base: BaseModel, library, names: list[str], config: FusionConfig) -> str:
    """Hash of the base (name + architecture), every concept's weight file, and the fusion settings.

    The concepts' order does not count (they are hashed sorted, as `fuse_concepts` fuses them), so
    <a> + <b> and <b> + <a> are one cached model. An unknown or damaged concept raises its UserError.
    """
    digest = hashlib.sha256(f"{base.name}|{base.fingerprint}|{json.dumps(asdict(config), sort_keys=True)}".encode())
    for name in sorted(names):
        record = library.get(name)  # unknown: "unknown concept ... (known: ...)", not a missing file
        digest.update(name.encode())
        if record.concept_prompt:  # an imported LoRA's trigger prompt feeds the fusion (ED-LoRA keys stay as they were)
            digest.update(record.concept_prompt.encode())
        with open(library.path(name) / "concept.safetensors", "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:20]


def float64_device(device: torch.device | str) -> torch.device:
    """Where the float64 fusion solve runs: on `device`, except on Apple's MPS, which has no float64."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def _solve(w0s: dict[str, torch.Tensor], deltas: list[dict[str, torch.Tensor]], grams: list[dict[str, torch.Tensor]],
           config: FusionConfig, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Fuse every layer in `w0s`; returns (fused weights, per-layer report)."""
    device = float64_device(device)
    fused, report, pinvs = {}, {}, {}
    for name, w0 in w0s.items():
        group = input_group(name)
        # a concept without a LoRA on this layer (imported LoRAs adapt more layers) wants W0 there: dW_i = 0
        layer_deltas = [d[name].to(device) if name in d else torch.zeros_like(w0, device=device) for d in deltas]
        layer_grams = [g[group].to(device) for g in grams]
        w0 = w0.to(device).double()
        average = weight_average(w0, layer_deltas)
        if config.method == "weight":
            w = average
        else:  # gradient fusion ("auto" for LoRA-shaped concepts)
            if group not in pinvs:
                pinvs[group] = gram_pinv(sum(layer_grams), config.rcond)
            w = fuse_layer(w0, layer_deltas, layer_grams, pinv=pinvs[group])
        fused[name] = w
        report[name] = {
            "method": [relative_output_error(w, w0 + d, g) for d, g in zip(layer_deltas, layer_grams)],
            "weight": [relative_output_error(average, w0 + d, g) for d, g in zip(layer_deltas, layer_grams)],
        }
    return fused, report


def _fuse_into(base: BaseModel, model: torch.nn.Module, prefix: str, layers: list[str], deltas: list[dict],
               grams: list[dict], config: FusionConfig, reports: dict) -> dict[str, torch.Tensor]:
    """Solve `layers` of `model`, write the fused weights into it, add their report rows; returns
    the float32 updates W - W0."""
    w0 = {n: linear_of(model, n).weight.detach().float().cpu().flatten(1) for n in layers}  # a 1x1 conv as [out, in]
    fused, report = _solve(w0, deltas, grams, config, base.device)
    reports.update({f"{prefix}.{k}": v for k, v in report.items()})
    updates = {n: (fused[n].cpu() - w0[n].double()).float().reshape(linear_of(model, n).weight.shape) for n in layers}
    _apply_updates(model, updates)
    return updates


# ---------------------------------------------------------------------------------------------
# Entry point


def fuse_concepts(
    base: BaseModel,
    library,
    names: list[str],
    config: FusionConfig = FusionConfig(),
    out_dir: str | os.PathLike | None = None,
    callback: Callable[[str, int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> FusedModel:
    """Fuse concepts `names` of `library` into one model; cached under <library>/.fused/<hash>/.

    The order of `names` does not matter: they are fused, recorded and reported in sorted order.

    Afterwards `base` *is* the fused model (weights written in place, all concept tokens loaded,
    adapters off). `callback(stage, done, total)` reports progress; `cancel` stops between passes.
    Raises UserError for unknown concepts, concepts of another architecture, or a bad method.
    """
    from .concept import check_compatible
    from .sample import make_scheduler

    # 1. Check inputs
    if config.method not in METHODS + ("auto",):
        raise UserError(f"--method {config.method!r} is not known; use auto or one of {', '.join(METHODS)}")
    if not 0 < config.rcond < 1:
        raise UserError(f"--rcond {config.rcond} is out of range; use a value between 0 and 1 such as 1e-3 (the default)")
    if not names:
        raise UserError("no concepts selected; name at least one concept to fuse, e.g. --concepts mochi,tama")
    if len(set(names)) != len(names):
        raise UserError(f"a concept is named twice in {', '.join(names)}")
    # Fused in sorted order: the solve sums over concepts, but each concept's spatial sample is seeded
    # by its place (seed + index), so only a fixed order makes [a, b] and [b, a] one fused model.
    names = sorted(names)
    records = [library.get(name) for name in names]
    fingerprints = {r.fingerprint for r in records}
    if len(fingerprints) > 1:
        detail = ", ".join(f"{r.name} ({r.base_model})" for r in records)
        raise UserError(f"cannot fuse concepts trained on different base models: {detail}")
    for record in records:
        check_compatible(record, base)
    config = replace(config, method=resolve_method(records, config.method))
    key = cache_key(base, library, names, config)
    folder = Path(out_dir) if out_dir else library.root / ".fused" / key
    if base.fused is not None and Path(base.fused) != folder:
        raise UserError(f"this base model already holds the fused model {base.fused}; load the base again before fusing others")
    if (folder / FUSED_RECORD).exists():
        cached = _read_record(folder)
        if cached.get("key") == key and cached.get("format") == FUSED_FORMAT:
            return load_fused(base, folder)

    if config.method in KIND_MERGES:
        return _merge_kinds(base, library, names, records, config, key, folder, cancel)

    started = time.perf_counter()
    # a damaged or unfitting file names its concept; text-encoder keys as this transformers names them
    tensors = [keys_for_model(library.weights(name, base), base.text_encoder) for name in names]
    for name, t in zip(names, tensors):
        apply_concept(base, name, t, lora_scale=1.0)
    install_layerwise_attention(base.unet)
    text_deltas = [concept_deltas(t, "text_encoder") for t in tensors]
    unet_deltas = [concept_deltas(t, "unet") for t in tensors]
    prompts = {r.name: fusion_prompts(r.name, r.concept_prompt) for r in records}
    words = {name: concept_words(base.text_encoder)[name] for name in names}  # for expand_prompt
    # every layer any concept adapts (ED-LoRA concepts all adapt the same ones; imported LoRAs vary)
    text_layers = sorted(set().union(*text_deltas))
    unet_layers = sorted(set().union(*unet_deltas))
    kv_layers = [n for n in unet_layers if input_group(n).endswith(".kv")]
    spatial_layers = [n for n in unet_layers if n not in kv_layers]
    total = 3 * len(names) + 3
    done = 0

    def progress(stage: str) -> None:
        nonlocal done
        done += 1
        if callback is not None:
            callback(stage, done, total)

    reports: dict[str, dict] = {}
    signature = base_signature(base, [f"text_encoder.{n}" for n in text_layers] + [f"unet.{n}" for n in unet_layers])
    with torch.no_grad():
        # 2. Text encoder: each concept's own model on its two prompts, 16 variants each, unpadded
        text_modules = {n: base.text_encoder.get_submodule(n) for n in text_layers}
        text_grams = []
        for name in names:
            _check_cancel(cancel)
            set_active_adapters(base.text_encoder, [name])
            with recording(text_modules) as recorder:
                for prompt in prompts[name]:
                    _encode_unpadded(base, [expand_prompt(prompt, layer, words) for layer in range(NUM_LAYERS)])
                text_grams.append({k: v.cpu().double() for k, v in recorder.grams.items()})
            progress(f"text encoder inputs of <{name}>")
        set_active_adapters(base.text_encoder, [])
        fused_text = _fuse_into(base, base.text_encoder, "text_encoder", text_layers, text_deltas, text_grams, config, reports)
        progress("text encoder fused")

        # 3. UNet cross-attention K/V: fused text encoder outputs at concept tokens and end-of-text
        attn2 = [name.rsplit(".", 1)[0] for name in kv_layers if name.endswith("to_k")]
        order = [n for n, _ in cross_attention_layers(base.unet)]
        if not set(attn2) <= set(order):
            raise UserError("the concepts' LoRA layers do not match the 16 cross-attention layers of this UNet")
        kv_grams = []
        for name in names:
            _check_cancel(cancel)
            ids_of_concept = set(base.tokenizer.convert_tokens_to_ids(concept_tokens(name, words[name])))
            grams: dict[str, torch.Tensor] = {}
            for prompt in prompts[name]:
                ids, hidden = _encode_unpadded(base, [expand_prompt(prompt, layer, words) for layer in range(NUM_LAYERS)])
                for layer, module_name in enumerate(order):
                    layer_ids = ids[layer].tolist()
                    keep = [i for i, token in enumerate(layer_ids) if token in ids_of_concept]
                    keep.append(layer_ids.index(base.tokenizer.eos_token_id))  # the (only, unpadded) end-of-text
                    rows = hidden[layer, keep].float()
                    group = f"{module_name}.kv"
                    grams[group] = grams.get(group, 0) + (rows.T @ rows).cpu().double()
            kv_grams.append(grams)
            progress(f"cross-attention inputs of <{name}>")
        fused_kv = _fuse_into(base, base.unet, "unet", kv_layers, unet_deltas, kv_grams, config, reports)
        progress("cross-attention K/V fused")

        # 4. UNet spatial layers: one sample per concept with its own LoRA on these layers
        all_layers = lora_layers(base.unet)
        spatial_modules = {n: base.unet.get_submodule(n) for n in spatial_layers}
        spatial_grams = []
        size = base.unet.config.sample_size
        for index, name in enumerate(names):
            _check_cancel(cancel)
            for layer_name, layer in all_layers.items():
                if layer_name in spatial_modules and name in layer.lora_A:
                    layer.enable_adapters(True)
                    layer.set_adapter([name])
                else:
                    layer.enable_adapters(False)
            scheduler = make_scheduler("dpm++", base.scheduler_config)
            scheduler.set_timesteps(config.spatial_steps, device=base.device)
            context = encode_layerwise(base.tokenizer, base.text_encoder, [prompts[name][0]]).to(base.dtype)
            generator = torch.Generator("cpu").manual_seed(config.seed + index)
            latents = torch.randn((1, base.unet.config.in_channels, size, size), generator=generator).to(base.device)
            latents = latents * scheduler.init_noise_sigma
            with recording(spatial_modules) as recorder:
                for t in scheduler.timesteps:
                    model_input = scheduler.scale_model_input(latents, t)
                    noise = base.unet(model_input.to(base.dtype), t, encoder_hidden_states=context).sample.float()
                    latents = scheduler.step(noise, t, latents).prev_sample
                spatial_grams.append({k: v.cpu().double() for k, v in recorder.grams.items()})
            progress(f"UNet inputs of <{name}>")
        set_active_adapters(base.unet, [])
        fused_spatial = _fuse_into(base, base.unet, "unet", spatial_layers, unet_deltas, spatial_grams, config, reports)
        progress("UNet fused")

    # 5. Save only what changed (float32 updates W - W0), and the report
    updates = {f"text_encoder.{k}": v for k, v in fused_text.items()}
    updates.update({f"unet.{k}": v for k, v in {**fused_kv, **fused_spatial}.items()})
    tensors_out = _fused_tensors(updates, names, tensors)
    report = fusion_report(reports, names, config.method)
    record = _fused_record(base, key, names, records, config, signature, started)
    _save_fused(folder, tensors_out, record, report)
    base.fused = str(folder)
    return FusedModel(folder=folder, concepts=names, method=config.method, record=record, report=report)


# ---------------------------------------------------------------------------------------------
# Which merge each kind of concept allows (issue 16)


def merge_methods(kinds: list[str], groups: list[str]) -> list[str]:
    """The merges concepts of `kinds` (and joint `groups`, "" for none) allow, the default first; [] for none.

    LoRA-shaped concepts (ED-LoRA, imported LoRAs, members of different joint groups): gradient fusion
    or weight averaging. Members of one group: their shared weights as trained ("group"). Custom
    Diffusion: its closed-form merge. Cones: the union of the concepts' neurons.
    """
    kinds_set = set(kinds)
    if len(kinds_set) == 1 and len(set(groups)) == 1 and groups[0] and kinds_set <= {"joint", "custom-diffusion"}:
        return ["group"]
    if kinds_set == {"custom-diffusion"}:
        return ["custom-diffusion"]
    if kinds_set == {"cones"}:
        return ["cones"]
    if kinds_set <= set(LORA_SHAPED):
        return ["gradient", "weight"]
    return []


def resolve_method(records: list, method: str) -> str:
    """`method` ("auto": the kinds' default merge) checked against what the concepts' kinds allow."""
    allowed = merge_methods([r.kind for r in records], [r.group for r in records])
    if not allowed:
        described = ", ".join(f"<{r.name}> ({KIND_NAMES.get(r.kind, r.kind)})" for r in records)
        raise UserError(f"these concepts cannot be merged into one model: {described}. ED-LoRA, imported LoRAs and joint-group members merge with"
                        f" each other, Custom Diffusion and Cones concepts only with their own kind; choose concepts of one"
                        f" kind, or use isolated sampling, which loads each concept on its own")
    if method == "auto":
        return allowed[0]
    if method not in allowed:
        raise UserError(f"--method {method} does not merge {', '.join('<' + r.name + '>' for r in records)}; their kind allows"
                        f" {' or '.join(allowed)}")
    return method


def group_updates(base: BaseModel, names: list[str], tensors: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The weights a group's members share (trained together), as updates "text_encoder.<m>" / "unet.<m>" -> W - W0.

    Every member's file holds the same shared weights; a member retrained apart would not, and is refused.
    """
    expanded = [expand_concept_tensors(t, base) for t in tensors]
    shared = [{f"{prefix}.{k}": v for prefix in ("text_encoder", "unet") for k, v in concept_deltas(t, prefix).items()} for t in expanded]
    for name, deltas in zip(names[1:], shared[1:]):
        if deltas.keys() != shared[0].keys() or any(not torch.allclose(deltas[k], shared[0][k], atol=1e-7) for k in deltas):
            raise UserError(f"<{name}> does not hold the same shared weights as <{names[0]}>: retrain the group together,"
                            f" or merge them with their kind's other merge")
    return shared[0]


def _merge_kinds(base: BaseModel, library, names: list[str], records: list, config: FusionConfig, key: str, folder: Path,
                 cancel: threading.Event | None) -> FusedModel:
    """Merge concepts of the other kinds into one model: Custom Diffusion's closed form, Cones' union,
    or a group's shared weights. Stored and loaded as any fused model (updates W - W0 and tokens)."""
    started = time.perf_counter()
    tensors = [keys_for_model(library.weights(name, base), base.text_encoder) for name in names]
    _check_cancel(cancel)
    for name, t in zip(names, tensors):
        apply_concept(base, name, t, lora_scale=1.0)
    install_layerwise_attention(base.unet)
    with torch.no_grad():
        if config.method == "custom-diffusion":
            from .custom_diffusion import merge_custom_diffusion, regularization_captions

            captions = regularization_captions(sorted({r.class_word for r in records}))
            updates, report = merge_custom_diffusion(base, names, tensors, captions=captions)
        elif config.method == "cones":
            from .cones import merge_cones

            updates, report = merge_cones(base, names, tensors)
        else:
            updates = group_updates(base, names, tensors)
            report = {"method": "group", "concepts": names, "summary": {}, "layers": {}, "outliers": []}
    for model in (base.text_encoder, base.unet):
        set_active_adapters(model, [])
    signature = base_signature(base, list(updates))
    tensors_out = _fused_tensors(updates, names, tensors)
    record = _fused_record(base, key, names, records, config, signature, started)
    _save_fused(folder, tensors_out, record, report)
    for model, prefix in ((base.text_encoder, "text_encoder."), (base.unet, "unet.")):
        _apply_updates(model, {k[len(prefix):]: v for k, v in updates.items() if k.startswith(prefix)})
    base.fused = str(folder)
    return FusedModel(folder=folder, concepts=names, method=config.method, record=record, report=report)


def fusion_report(layers: dict[str, dict], names: list[str], method: str) -> dict:
    """Per layer and concept: relative output errors of `method` and of weight averaging; per-concept means."""
    summary = {}
    for i, name in enumerate(names):
        chosen = [v["method"][i] for v in layers.values()]
        average = [v["weight"][i] for v in layers.values()]
        summary[name] = {
            "mean_relative_error": sum(chosen) / len(chosen),
            "max_relative_error": max(chosen),
            "weight_average_mean_relative_error": sum(average) / len(average),
            "weight_average_max_relative_error": max(average),
        }
    return {
        "method": method, "concepts": names, "summary": summary,
        "layers": {k: {"method": dict(zip(names, v["method"])), "weight": dict(zip(names, v["weight"]))} for k, v in layers.items()},
        "outliers": outlier_layers({k: v["method"] for k, v in layers.items()}, names),
    }


def layer_kind(layer: str) -> str:
    """The peers a layer's fusion error is compared with: text encoder, UNet K/V, other UNet layers."""
    if layer.startswith("text_encoder."):
        return "text encoder"
    return "UNet K/V" if input_group(layer.split(".", 1)[1]).endswith(".kv") else "UNet"


def outlier_layers(errors: dict[str, list[float]], names: list[str], ratio: float = OUTLIER_RATIO,
                   floor: float = OUTLIER_FLOOR) -> list[dict]:
    """Layers whose relative output error for a concept is far above their peers'.

    `errors` maps "text_encoder.<module>"/"unet.<module>" to one error per concept. A layer is flagged
    for a concept when its error exceeds `ratio` times the median of its kind (`layer_kind`) for
    that concept and `floor`. One eigenvalue cutoff serves all layers; on a real model's spectra a
    layer can lose directions a concept needs, and this is where it shows (then fuse with a smaller
    `rcond`, `python -m pipelines fuse --rcond 1e-4`).
    """
    flagged = []
    for i, name in enumerate(names):
        by_kind: dict[str, list[float]] = {}
        for layer, values in errors.items():
            by_kind.setdefault(layer_kind(layer), []).append(values[i])
        medians = {kind: sorted(v)[len(v) // 2] for kind, v in by_kind.items()}
        for layer, values in errors.items():
            median = medians[layer_kind(layer)]
            if values[i] > floor and values[i] > ratio * median:
                flagged.append({"layer": layer, "concept": name, "relative_error": values[i], "median_of_kind": median})
    return sorted(flagged, key=lambda row: -row["relative_error"] / max(row["median_of_kind"], 1e-12))


def _fused_tensors(updates: dict[str, torch.Tensor], names: list[str], tensors: list[dict]) -> dict[str, torch.Tensor]:
    """What fused.safetensors holds: float32 updates (file naming) and each concept's [w, 16, d] tokens
    (a Cones concept's one vector per word, repeated over the layers)."""
    out = {k: v.float().cpu().contiguous() for k, v in canonical_keys(updates).items()}
    for name, t in zip(names, tensors):
        out[f"concepts.{name}"] = t["embeddings"].float().expand(-1, NUM_LAYERS, -1).contiguous()
    return out


def _fused_record(base: BaseModel, key: str, names: list[str], records: list, config: FusionConfig,
                  signature: dict, started: float) -> dict:
    """fused.json: what was fused, how, on which base (with its weights' signature), and when."""
    return {
        "format": FUSED_FORMAT, "key": key, "concepts": names, "method": config.method,
        "config": asdict(config), "base_model": base.name, "fingerprint": base.fingerprint, "base_signature": canonical_keys(signature),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.perf_counter() - started, 2),
        "concept_records": [r.to_json() for r in records],
    }


def _save_fused(folder: Path, tensors: dict[str, torch.Tensor], record: dict, report: dict) -> None:
    """Write the fused model atomically: a staging folder renamed into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".staging-{folder.name}-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        save_file(tensors, staging / FUSED_WEIGHTS, metadata={"format": FUSED_FORMAT})
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        (staging / FUSED_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _read_record(folder: Path) -> dict:
    try:
        record = json.loads((folder / FUSED_RECORD).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"fused model {folder}: its {FUSED_RECORD} cannot be read ({error}); delete the folder and fuse again") from None
    if not isinstance(record, dict):
        raise UserError(f"fused model {folder}: its {FUSED_RECORD} is not a record; delete the folder and fuse again")
    return record


def load_fused(base: BaseModel, folder: str | os.PathLike) -> FusedModel:
    """Make `base` the fused model in `folder`: W0 + stored update written into each fused layer,
    concept tokens loaded. Any base of the architecture fused on fits; `FusedModel.note` says so
    when it is not the base the fusion was made on."""
    folder = Path(folder).expanduser()
    if not (folder / FUSED_RECORD).exists() or not (folder / FUSED_WEIGHTS).exists():
        raise UserError(f"--fused {str(folder)!r} is not a fused model folder (no {FUSED_RECORD}/{FUSED_WEIGHTS})")
    record = _read_record(folder)
    if record.get("format") != FUSED_FORMAT:
        raise UserError(f"fused model {folder} was made by an older Menagerie ({record.get('format')}, which stored"
                        f" weights, not updates); fuse {', '.join(record.get('concepts', []))} again")
    if record.get("fingerprint") != base.fingerprint:
        raise UserError(f"fused model {folder} was made on {record.get('base_model')} (architecture {record.get('fingerprint')});"
                        f" the base {base.name} has architecture {base.fingerprint}")
    if base.fused is not None and Path(base.fused) != folder:
        raise UserError(f"this base model already holds the fused model {base.fused}; load the base again to use {folder}")
    if base.fused is not None:  # already written in (adding the updates again would double them)
        return FusedModel(folder=folder, concepts=record["concepts"], method=record["method"], record=record,
                          report=_read_report(folder), note=base.fused_note)
    try:
        tensors = keys_for_model(load_file(folder / FUSED_WEIGHTS), base.text_encoder)
    except Exception as error:  # safetensors raises its own error types for truncated or garbage files
        raise UserError(f"fused model {folder}: {FUSED_WEIGHTS} cannot be read ({type(error).__name__}); delete the folder and fuse again") from None
    note = _base_note(base, record)
    install_layerwise_attention(base.unet)
    for name in record["concepts"]:
        add_concept_tokens(base.tokenizer, base.text_encoder, name, tensors[f"concepts.{name}"])
    for model, prefix in ((base.text_encoder, "text_encoder."), (base.unet, "unet.")):
        set_active_adapters(model, [])
        _apply_updates(model, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    base.fused, base.fused_note = str(folder), note
    return FusedModel(folder=folder, concepts=record["concepts"], method=record["method"], record=record,
                      report=_read_report(folder), note=note)


def _read_report(folder: Path) -> dict:
    try:
        return json.loads((folder / REPORT_FILE).read_text()) if (folder / REPORT_FILE).exists() else {}
    except ValueError:
        return {}


def _base_note(base: BaseModel, record: dict) -> str:
    """'' on the base the fusion was made on; otherwise a note that the updates were applied to another."""
    stored = record.get("base_signature") or {}
    if same_signature(stored, base_signature(base, list(stored))):
        return ""
    return (f"fused on {record.get('base_model')}; its updates were applied to {base.name}, another base of the same"
            f" architecture (the concepts were trained on {record.get('base_model')}; fuse again on this base for the exact solve)")


def list_fused(library, base: BaseModel | None = None) -> list[dict]:
    """Records of the fused models cached in a library; with `base`, only those that fit it (its
    architecture, and written in the current format). Unreadable folders are left out."""
    root = library.root / ".fused"
    if not root.exists():
        return []
    out = []
    for folder in sorted(root.iterdir()):
        if not (folder / FUSED_RECORD).exists():
            continue
        try:
            record = _read_record(folder)
        except UserError:
            continue
        if base is not None and (record.get("fingerprint") != base.fingerprint or record.get("format") != FUSED_FORMAT):
            continue
        record["folder"] = str(folder)
        out.append(record)
    return out
