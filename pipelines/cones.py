"""Cones: a concept as concept neurons shut to zero (Liu et al., ICML 2023, arXiv 2303.05125).

Cones trains nothing. It looks for the few weights of the UNet whose removal makes the model
draw the subject: "concept neurons", found from statistics of the gradients of a concept loss,
and "shut" (set to 0) at sampling time. A concept is stored as the flat indices of those
weights, so a file is kilobytes.

The paper's abstract is all that was checked of the paper itself; where it is silent this module
follows the unofficial port github.com/Gothos/Cones (`Cones.ipynb`: `cones_compute`,
`process_attn`; shared/research/isolated_cones_gen4gen.md section 2.2):

1. Stimulus: the concept's photos with captions naming it, "a photo of a <name>"; the loss L is the
   masked diffusion loss of ED-LoRA training (`pipelines.train.train_concept`, step 5b), on the
   same augmented batches (`train._make_batch`).
2. Each pass, for every weight theta of the K/V projections searched (to_k and to_v of attn1 and
   attn2 in every transformer block, as the port; the paper's exact set is not checked):
       g = dL/dtheta
       s <- s + theta * g                          (the score; first-order Taylor)
       theta <- theta - rho * theta^2 * g          (soft shrink, rho = `cones_shrink`)
   Shutting theta_k (theta_k -> 0) changes L by about -theta_k g_k, so a positive score means
   shutting it lowers the loss. The shrink moves the working copies partway to that shut state,
   so later passes score the model as it would be; the originals are never touched.
3. Concept neurons: the weights with the largest positive scores, at most `neuron_limit`.
4. Sampling: W0 with those entries set to 0 (the lead's `.shut` expansion; `shut_delta` here).
   Several concepts: the union of their neurons (the paper's "concatenating clusters",
   `merge_cones`).

Departures:
- Words: the port prompts with an existing rare token ("sks dog"). Here <name> is two words in
  the ED-LoRA layout, word 0 a fixed identifier vector drawn from the seed (N(0, rand_init_std^2),
  ED-LoRA's V_rand draw; never trained) and word 1 the class word's own embedding. Stored as
  [2, 1, d] and used in all 16 layers.
- Selection: a count (the largest positive scores, capped) in place of the port's absolute
  threshold on s (7e-3 after 100 passes in its notebook, which depends on the pass count and the
  model's scale; its README says thresholds of 1e-4 or lower turn samples to noise). A count
  bounds the file size and means the same on any model.
- Prior preservation: the port adds DreamBooth's prior loss on 20 class images. Here it is what
  the trainer offers (`prior_probability`: prior scenes the base model drew), off by default as
  for ED-LoRA.
- fp16 UNets: the searched layers compute in the UNet's dtype from fp32 working copies (their
  gradients, scores and shrink are fp32), and the loss is scaled so that small gradients survive
  the fp16 backward pass (a dynamic scale, halved and the pass's scores skipped on overflow).
- Not built: the paper's "few steps of further fine-tuning" for several subjects (no details
  found), and Cones 2 (Liu et al., NeurIPS 2023, arXiv 2305.19327; github.com/ali-vilab/Cones-V2).
  Cones 2's residual token embedding comes from a fine-tuned text encoder (4000 steps, its own
  regulariser) and is added to the text encoder's output at sampling time: a training loop and a
  sampling hook of its own, not a trivial addition; its layout guidance is close to what
  `pipelines.layout` already does with boxes.

Measured in the toy world (bench/toyworld, two random pets, 8 images a cell; the numbers are in
the issue-16 report): shutting a pet's neurons lowers the diffusion loss on held-out batches of
its photos by 13-23%, and random K/V entries shut do nothing, but the oracle's attribute match of
"a <pet> on the beach" mostly stays at the class word's level; one pet (a plain pink cat) rose
from 0.30 to 0.62 at 3000 neurons. The neurons are global: "a cat on the beach" changes with them
shut too (0.43), since shutting is not tied to the concept's words, as the paper describes.

Storage: int32 indices, at most `cones_max_neurons` of them (20000: 80 KB). SD1.5's 16
transformer blocks have 43,950,080 K/V weights in the 64 projections searched (attn1: 2 d^2,
attn2: 2 * 768 d, d = 320/640/1280 in 5/5/6 blocks), so the cap is 0.046% of them; a full file
(embeddings [2, 1, 768] and 64 index tensors) is about 94 KB.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .base import BaseModel
from .concept import Concept
from .edlora import set_active_adapters
from .errors import Cancelled, UserError
from .layerwise import NUM_LAYERS, add_concept_tokens, encode_layerwise, install_layerwise_attention
from .performance import gradient_checkpointing, memory_plan, tf32_matmuls
from .train import (
    CHECKPOINT_FILE,
    TrainConfig,
    TrainProgress,
    TrainResult,
    _class_embedding,
    _check_companion_tokens,
    _images_from_state,
    _images_to_state,
    _make_batch,
    _preview,
    _save_checkpoint,
    check_train_config,
    companion_words,
    masked_mse,
    sample_companions,
    training_eta,
)

logger = logging.getLogger(__name__)

# The weights searched: to_k and to_v of self- (attn1) and cross-attention (attn2), as Gothos/Cones.
KV_MODULES = re.compile(r".*attn[12]\.to_[kv]")
# At most this share of the searched weights is shut, whatever `cones_max_neurons` says. At SD1.5
# size the count binds (20000 of 44M weights is 0.046%). A small model would otherwise lose a
# large part of its attention to the same count: 20000 is 3.4% of the toy model's 596K K/V weights
# and 17% of the tiny test model's 115K. Measured in the toy world (two random pets, 300 passes,
# shrink 100): the loss on held-out batches of the pet's photos fell with the neurons shut up to
# ~1000 (0.17%; -13% and -23%) and rose again by 3000 (0.5%); with the port's shrink 2e-5 the
# optimum was ~100 and 1000 doubled the loss. So 0.2%: above the measured optimum, below the harm.
MAX_SHUT_FRACTION = 0.002
FP16_LOSS_SCALE = 2.0**16  # the first loss scale with an fp16 UNet (torch.amp.GradScaler's default)


# ---------------------------------------------------------------------------------------------
# The math: pure functions of tensors


def neuron_limit(searched: int, max_neurons: int) -> int:
    """How many neurons a concept may shut: `max_neurons`, and at most MAX_SHUT_FRACTION of the
    `searched` weights (at least 1)."""
    return max(1, min(max_neurons, math.floor(MAX_SHUT_FRACTION * searched)))


def top_neurons(scores: dict[str, torch.Tensor], limit: int) -> dict[str, torch.Tensor]:
    """The concept neurons: the at most `limit` entries with the largest positive scores, over all
    modules together. Returns module -> int32 sorted flat indices (CPU), for modules with any."""
    names = list(scores)
    flat = torch.cat([scores[name].flatten().float() for name in names])  # [all searched weights]
    count = min(limit, int((flat > 0).sum()))
    if count == 0:
        return {}
    chosen = torch.topk(flat, count).indices.cpu()
    neurons, start = {}, 0
    for name in names:
        size = scores[name].numel()
        inside = chosen[(chosen >= start) & (chosen < start + size)] - start
        if inside.numel():
            neurons[name] = inside.sort().values.to(torch.int32)
        start += size
    return neurons


def shut_delta(weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The update that shuts `indices` (flat, row-major) of `weight`: -weight there, 0 elsewhere (float32)."""
    delta = torch.zeros(weight.numel(), dtype=torch.float32, device=weight.device)
    index = indices.to(weight.device, torch.long)
    delta[index] = -weight.detach().flatten()[index].float()
    return delta.view(weight.shape)


def shut_lora_factors(weight: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LoRA factors (A [r, in], B [out, r], B @ A == shut_delta) of rank r = the rows touched.

    A shut set touches few rows of a large matrix: A holds those rows of the delta and B places
    them (one-hot columns), far smaller than a dense factorisation of rank min(out, in).
    """
    delta = shut_delta(weight, indices)  # [out, in]
    rows = torch.unique(indices.to(torch.long) // weight.shape[1]).to(delta.device)  # [r]
    up = torch.zeros(weight.shape[0], rows.numel(), dtype=torch.float32, device=delta.device)
    up[rows, torch.arange(rows.numel(), device=delta.device)] = 1.0
    return delta[rows], up


def union_shut(index_sets: list[torch.Tensor]) -> torch.Tensor:
    """The union of several concepts' neurons in one module: int32, sorted, unique."""
    if not index_sets:
        return torch.zeros(0, dtype=torch.int32)
    return torch.unique(torch.cat([i.to(torch.long).flatten() for i in index_sets])).to(torch.int32)


def storage_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """The size of a safetensors file holding `tensors` (the concept file's weights), header included."""
    return len(safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def relative_weight_error(w0: torch.Tensor, merged: torch.Tensor, own: torch.Tensor) -> float:
    """||(W0 + merged) - (W0 + own)||_F / ||W0 + own||_F: how far a merge puts a layer from the
    concept's own shut layer."""
    target = w0.double() + own.double()
    return float((merged.double() - own.double()).norm() / target.norm().clamp(min=1e-12))


# ---------------------------------------------------------------------------------------------
# Files


def shut_key(module: str) -> str:
    return f"unet.{module}.shut"


def neurons_of(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module -> shut indices of a concept's tensors."""
    return {k[len("unet."): -len(".shut")]: v for k, v in tensors.items() if k.startswith("unet.") and k.endswith(".shut")}


def check_cones_tensors(tensors: dict[str, torch.Tensor], base: BaseModel | None = None) -> None:
    """Structural checks of a Cones concept's tensors; with `base`, also that every index fits it.

    `embeddings` [2, 1, d] float; `unet.<module>.shut` int32 1-d sorted unique indices into that
    K/V module's weight. Raises UserError naming the first tensor that does not fit.
    """
    words = tensors.get("embeddings")
    if words is None or words.ndim != 3 or words.shape[:2] != (2, 1) or not words.dtype.is_floating_point:
        raise UserError(f"a Cones concept needs 'embeddings' of shape [2, 1, d] (float), got "
                        f"{None if words is None else (tuple(words.shape), str(words.dtype))}")
    if not torch.isfinite(words).all():
        raise UserError("Cones concept tensor 'embeddings' contains NaN or infinity")
    unknown = [k for k in tensors if k != "embeddings" and not (k.startswith("unet.") and k.endswith(".shut"))]
    if unknown:
        raise UserError(f"Cones concept file has unexpected tensor {unknown[0]!r}; expected embeddings and unet.<module>.shut")
    modules = kv_modules(base.unet) if base is not None else {}
    for module, indices in neurons_of(tensors).items():
        key = shut_key(module)
        if not KV_MODULES.fullmatch(module):
            raise UserError(f"Cones concept tensor {key!r} names a layer that is not an attention K/V projection")
        if indices.dtype != torch.int32 or indices.ndim != 1:
            raise UserError(f"Cones concept tensor {key!r} is {str(indices.dtype)} of shape {tuple(indices.shape)}; expected 1-d int32")
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise UserError(f"Cones concept tensor {key!r} is not sorted and unique")
        if base is not None:
            if module not in modules:
                raise UserError(f"Cones concept tensor {key!r} names a layer this base model does not have")
            size = modules[module].weight.numel()
            if indices.numel() and (int(indices[0]) < 0 or int(indices[-1]) >= size):
                raise UserError(f"Cones concept tensor {key!r} has indices outside the layer's {size} weights")
    if base is not None and words.shape[2] != base.text_encoder.get_input_embeddings().weight.shape[1]:
        raise UserError(f"Cones concept embeddings are {words.shape[2]}-d; this base's text encoder uses "
                        f"{base.text_encoder.get_input_embeddings().weight.shape[1]}-d")


# ---------------------------------------------------------------------------------------------
# torch glue: the searched layers, their working copies, shutting


def kv_modules(unet: nn.Module) -> dict[str, nn.Linear]:
    """Module name -> the linear layer of every K/V projection searched (the base layer under a peft wrapper)."""
    found = {}
    for name, module in unet.named_modules():
        if KV_MODULES.fullmatch(name):
            found[name] = getattr(module, "base_layer", module)
    return found


class WorkingLinear(nn.Module):
    """A searched K/V layer during the search: an fp32 working copy of its weight, applied in the layer's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().float().clone())  # [out, in]
        self.bias = linear.bias
        self.dtype = linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(self.dtype), self.bias)


@dataclass
class _Slot:
    parent: nn.Module
    attribute: str
    original: nn.Module
    working: WorkingLinear


def _slots(unet: nn.Module, names: list[str]) -> list[_Slot]:
    slots = []
    for name in names:
        module = unet.get_submodule(name)
        if hasattr(module, "base_layer"):  # a peft LoRA wrapper: swap the layer under it
            parent, attribute, original = module, "base_layer", module.base_layer
        else:
            parent_name, attribute = name.rsplit(".", 1)
            parent, original = unet.get_submodule(parent_name), module
        slots.append(_Slot(parent, attribute, original, WorkingLinear(original)))
    return slots


def _place(slots: list[_Slot], working: bool) -> None:
    for slot in slots:
        setattr(slot.parent, slot.attribute, slot.working if working else slot.original)


@contextmanager
def working_copies(unet: nn.Module, names: list[str]):
    """Swap the named K/V layers for fp32 `WorkingLinear` copies; the original layers (never
    written) are put back afterwards, also on error or cancel. Yields module name -> working layer."""
    slots = _slots(unet, names)
    _place(slots, working=True)
    try:
        yield dict(zip(names, slots))
    finally:
        _place(slots, working=False)


@contextmanager
def _eval_after(module: nn.Module):
    try:
        yield
    finally:
        module.eval()


@contextmanager
def shut_neurons(unet: nn.Module, neurons: dict[str, torch.Tensor]):
    """Run with `neurons` (module -> flat indices) set to 0 in the UNet's weights; restored exactly after."""
    layers = kv_modules(unet)
    saved = []
    with torch.no_grad():
        for name, indices in neurons.items():
            flat = layers[name].weight.data.view(-1)
            index = indices.to(flat.device, torch.long)
            saved.append((flat, index, flat[index].clone()))
            flat[index] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            for flat, index, values in saved:
                flat[index] = values


# ---------------------------------------------------------------------------------------------
# The concept loss


def random_streams(config: TrainConfig, dim: int) -> tuple[random.Random, torch.Generator, torch.Tensor]:
    """The search's randomness from `seed`: the batch RNG, the noise generator, and the identifier
    vector drawn first from the generator (as ED-LoRA draws V_rand)."""
    rng = random.Random(config.seed)
    generator = torch.Generator("cpu").manual_seed(config.seed)
    identifier = torch.randn(dim, generator=generator) * config.rand_init_std  # [d]
    return rng, generator, identifier


def diffusion_loss(base: BaseModel, batch, generator: torch.Generator, noise_scheduler, noise_offset: float) -> torch.Tensor:
    """The masked diffusion loss of one batch, as `train_concept` computes it (step 5b), same random draws."""
    pixels, loss_mask, _, prompts = batch
    with torch.no_grad():
        posterior = base.vae.encode(pixels.to(base.device, base.dtype)).latent_dist
        latents = posterior.sample(generator=generator).float() * base.vae.config.scaling_factor
        # the text encoder is not searched: its output is a constant of the loss
        context = encode_layerwise(base.tokenizer, base.text_encoder, prompts)
    noise = torch.randn(latents.shape, generator=generator)
    noise = noise + noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=generator)
    noise = noise.to(base.device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(base.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    prediction = base.unet(noisy.to(base.dtype), timesteps, encoder_hidden_states=context.to(base.dtype)).sample
    return masked_mse(prediction, target, loss_mask.to(base.device))


def check_cones_config(config: TrainConfig, photo_count: int) -> TrainConfig:
    """Validate a Cones search's settings (before any model work); returns it with `steps` (passes) resolved."""
    if config.kind != "cones":
        raise UserError(f"find_concept_neurons needs kind 'cones', got {config.kind!r}; use train_concept for other kinds")
    if not config.cones_shrink >= 0:
        raise UserError(f"cones_shrink must be 0 or more (the soft-shrink rate rho, e.g. 2e-5), got {config.cones_shrink}")
    if isinstance(config.cones_max_neurons, bool) or not isinstance(config.cones_max_neurons, int) or config.cones_max_neurons < 1:
        raise UserError(f"cones_max_neurons must be a positive integer (how many weights a concept may shut),"
                        f" got {config.cones_max_neurons!r}")
    return check_train_config(config, photo_count)


def _register_words(base: BaseModel, config: TrainConfig, identifier: torch.Tensor) -> torch.Tensor:
    """Put <name>'s two words (identifier, class word) into the text encoder; returns them as [2, 1, d]."""
    words = torch.stack([identifier, _class_embedding(base, config.class_word)])[:, None]  # [2, 1, d]
    add_concept_tokens(base.tokenizer, base.text_encoder, config.name, words.expand(-1, NUM_LAYERS, -1))
    install_layerwise_attention(base.unet)
    base.loaded_concepts.pop(config.name, None)  # its tokens changed under any earlier load of that name
    for model in (base.text_encoder, base.unet):
        set_active_adapters(model, [])  # the base model's own weights are what is searched
    return words


def replay_losses(base: BaseModel, photos: list[Image.Image], config: TrainConfig, masks: list[Image.Image] | None = None,
                  neurons: dict[str, torch.Tensor] | None = None, passes: int | None = None) -> list[float]:
    """The diffusion loss of the search's own first `passes` batches (same augmentation, noise and
    timesteps as `find_concept_neurons` with `config`) on the base weights with `neurons` shut.

    Measures what the search optimises: shutting the concept neurons should lower it. Registers
    the concept's words in `base` as the search does; the weights are restored after.
    """
    config = check_cones_config(config, len(photos))
    passes = passes or config.steps
    resolution = config.resolution or base.native_resolution
    rng, generator, identifier = random_streams(config, base.text_encoder.get_input_embeddings().weight.shape[1])
    _register_words(base, config, identifier)
    companions, prior_scenes = [], []
    if config.multi_subject_probability > 0 or config.prior_probability > 0:
        companions, prior_scenes = sample_companions(base, config, resolution)
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
    losses = []
    with torch.no_grad(), shut_neurons(base.unet, neurons or {}):
        for _ in range(passes):
            batch = _make_batch(photos, masks, config, resolution, resolution // base.vae_scale_factor, rng, companions, prior_scenes)
            losses.append(diffusion_loss(base, batch, generator, noise_scheduler, config.noise_offset).item())
    return losses


# ---------------------------------------------------------------------------------------------
# The search


def find_concept_neurons(
    base: BaseModel,
    photos: list[Image.Image],
    config: TrainConfig,
    masks: list[Image.Image] | None = None,
    callback: Callable[[TrainProgress], None] | None = None,
    cancel: threading.Event | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> TrainResult:
    """Find the concept neurons of `photos` (config.kind "cones"); the base's weights are unchanged after.

    The concept's words stay registered in `base` (as training leaves a concept's tokens); its
    neurons are not shut there (the lead's `apply_concept` does that from the returned tensors), and
    every LoRA adapter in `base` is left off. Runs in one process on the plain UNet (not a compiled
    one: the swapped layers would recompile it every call).

    Args:
        base: the base model; fp16/bf16 UNets are searched through fp32 working copies.
        photos: RGB images of the subject (see `train.load_training_set`).
        config: TrainConfig with kind "cones". `steps` is the number of passes (None: ED-LoRA's
            500 examples per photo / batch_size; the Cones authors used ~1000, the port 50-100);
            `cones_shrink` the soft-shrink rate rho (2e-5, the port's default; larger moves the
            working weights further towards their shut state between passes); `cones_max_neurons`
            the most weights shut (also at most MAX_SHUT_FRACTION of those searched). The batch,
            augmentation, noise offset, seed, checkpoint and preview settings act as in training.
        masks: optional subject masks, one per photo (white = subject), for the masked loss.
        callback: called after every pass with a TrainProgress (embedding_norm: the two words'
            mean norm, constant; embeddings_frozen: always True, nothing is trained).
        cancel: set it to stop; a checkpoint is written first and Cancelled is raised.
        checkpoint_dir: where checkpoints go (every `checkpoint_every` passes and on cancel).
        resume: continue from the checkpoint in `checkpoint_dir` if there is one.

    Returns TrainResult with a Concept (kind "cones") and tensors {"embeddings": [2, 1, d] float32,
    "unet.<module>.shut": int32 sorted unique flat indices}, one key per K/V module with neurons.
    """
    # 1. Check inputs
    config = check_cones_config(config, len(photos))
    if masks is not None and len(masks) != len(photos):
        raise UserError(f"{len(masks)} masks for {len(photos)} photos; give one mask per photo")
    resolution = config.resolution or base.native_resolution
    if resolution % (base.vae_scale_factor * 8):
        raise UserError(f"--resolution {resolution} must be a multiple of {base.vae_scale_factor * 8}")
    latent_size = resolution // base.vae_scale_factor
    _class_embedding(base, config.class_word)  # a class word of several CLIP tokens is refused here
    uses_companions = config.multi_subject_probability > 0 or config.prior_probability > 0
    if uses_companions:
        _check_companion_tokens(base.tokenizer, companion_words(config))
    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir else None
    payload = None
    if resume and checkpoint_path is not None and checkpoint_path.exists():
        payload = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        ignored = ("steps", "checkpoint_every", "preview_every")
        saved = {k: v for k, v in payload["config"].items() if k not in ignored}
        if saved != {k: v for k, v in asdict(config).items() if k not in ignored}:
            raise UserError(f"the checkpoint in {checkpoint_dir} was made with other settings; train without --resume to start over")

    # 2. Companions and prior scenes (only when the config asks for them), before the concept exists
    companions, prior_scenes = [], []
    if payload is not None and uses_companions:
        companions, prior_scenes = _images_from_state(payload["companions"]), _images_from_state(payload["prior_scenes"])
    elif uses_companions:
        companions, prior_scenes = sample_companions(base, config, resolution)

    # 3. The concept's words, the searched layers and their scores, all randomness from the seed
    rng, generator, identifier = random_streams(config, base.text_encoder.get_input_embeddings().weight.shape[1])
    words = _register_words(base, config, identifier)
    layers = kv_modules(base.unet)
    if not layers:
        raise UserError("this base model's UNet has no attention K/V projections (attn1/attn2 to_k, to_v) for Cones to search")
    names = list(layers)
    searched = sum(layer.weight.numel() for layer in layers.values())
    limit = neuron_limit(searched, config.cones_max_neurons)
    scores = {name: torch.zeros(layer.weight.shape, dtype=torch.float32, device=base.device) for name, layer in layers.items()}
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
    loss_scale = FP16_LOSS_SCALE if base.dtype == torch.float16 else 1.0
    total, step, losses, skipped = config.steps, 0, [], 0
    word_norm = words.norm(dim=-1).mean().item()

    # 4. Resume (the working weights are restored into their copies in step 5)
    if payload is not None:
        for name in names:
            scores[name].copy_(payload["scores"][name])
        rng.setstate(payload["python_rng"])
        generator.set_state(payload["torch_rng"])
        step, losses, loss_scale, skipped = payload["step"], payload["losses"], payload["loss_scale"], payload["skipped"]
        logger.info("resumed the Cones search of %s at pass %d of %d", config.name, step, total)

    plan = memory_plan(base, "train")
    started, start_step = time.perf_counter(), step
    preview_seconds: list[float] = []
    with working_copies(base.unet, names) as slots:
        working = {name: slot.working.weight for name, slot in slots.items()}
        if payload is not None:
            with torch.no_grad():
                for name in names:
                    working[name].copy_(payload["working"][name])

        def checkpoint() -> None:
            if checkpoint_path is None:
                return
            _save_checkpoint(checkpoint_path, {
                "config": asdict(config), "step": step, "losses": losses, "loss_scale": loss_scale, "skipped": skipped,
                "scores": {n: s.cpu() for n, s in scores.items()}, "working": {n: w.detach().cpu() for n, w in working.items()},
                "python_rng": rng.getstate(), "torch_rng": generator.get_state(),
                "companions": _images_to_state(companions), "prior_scenes": _images_to_state(prior_scenes),
            })

        def preview_now() -> Image.Image:
            """A sample with the neurons found so far shut in the original weights."""
            _place(list(slots.values()), working=False)
            try:
                with shut_neurons(base.unet, top_neurons(scores, limit)):
                    return _preview(base, config)
            finally:
                _place(list(slots.values()), working=True)

        # 5. The passes
        base.unet.train()  # no dropout in SD; train() only matters for modules that check it
        with gradient_checkpointing(base, plan.gradient_checkpointing), tf32_matmuls(base), _eval_after(base.unet):
            while step < total:
                if cancel is not None and cancel.is_set():
                    checkpoint()
                    raise Cancelled(f"the Cones search of {config.name} was cancelled at pass {step} of {total}")
                # 5a. Concept loss and the gradients of the working K/V weights
                batch = _make_batch(photos, masks, config, resolution, latent_size, rng, companions, prior_scenes)
                loss = diffusion_loss(base, batch, generator, noise_scheduler, config.noise_offset)
                for weight in working.values():
                    weight.grad = None
                (loss * loss_scale).backward()  # scaled with an fp16 UNet, so small gradients do not flush to zero
                # 5b. Score and soft shrink: s += theta * g, theta -= rho * theta^2 * g
                with torch.no_grad():
                    grads = {name: weight.grad / loss_scale for name, weight in working.items()}
                    finite = loss_scale == 1.0 or bool(torch.stack([g.isfinite().all() for g in grads.values()]).all())
                    if finite:
                        for name, weight in working.items():
                            scores[name].add_(weight * grads[name])
                            weight.addcmul_(weight * weight, grads[name], value=-config.cones_shrink)
                    else:  # an fp16 overflow: this pass's gradients are unusable, the next pass uses half the scale
                        loss_scale /= 2
                        skipped += 1
                for weight in working.values():
                    weight.grad = None
                step += 1
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise UserError(f"the Cones search diverged at pass {step - 1} (loss {loss_value}); lower cones_shrink")
                losses.append(loss_value)

                # 5c. Report, preview, checkpoint
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
                    checkpoint()
                preview = None
                if config.preview_every and step % config.preview_every == 0:
                    preview_started = time.perf_counter()
                    preview = preview_now()
                    preview_seconds.append(time.perf_counter() - preview_started)
                if callback is not None:
                    eta = training_eta(time.perf_counter() - started - sum(preview_seconds), step - start_step, step, total,
                                       preview_seconds, config)
                    callback(TrainProgress(step, total, loss_value, eta, word_norm, True, preview))

    # 6. Wrap up: the neurons, a preview with them shut, the concept's tensors
    neurons = top_neurons(scores, limit)
    if skipped:
        logger.warning("%d of %d Cones passes overflowed in fp16 and were skipped", skipped, total)
    with shut_neurons(base.unet, neurons):
        preview = _preview(base, config)
    count = sum(int(i.numel()) for i in neurons.values())
    tensors = {"embeddings": words.float().contiguous()}
    tensors.update({shut_key(name): indices.contiguous() for name, indices in neurons.items()})
    concept = Concept(
        name=config.name,
        class_word=config.class_word,
        base_model=base.name,
        fingerprint=base.fingerprint,
        photo_count=len(photos),
        settings={**asdict(config), "resolution": resolution, "neurons": count, "neuron_limit": limit, "searched_weights": searched,
                  "skipped_passes": skipped, "final_loss": losses[-1] if losses else None},
        is_test_model=base.is_test_model,
        kind="cones",
    )
    if checkpoint_path is not None and checkpoint_path.exists():
        checkpoint_path.unlink()
    return TrainResult(concept=concept, tensors=tensors, preview=preview, losses=losses, embeddings_frozen_at=None,
                       seconds=time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# Several concepts: the union of their neurons


def merge_cones(base: BaseModel, names: list[str], tensors: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict]:
    """Shut the union of the concepts' neurons (Cones' multi-concept combination).

    `tensors[i]` is concept `names[i]`'s file. Returns the fused updates {"unet.<module>": float32
    W - W0 [out, in], CPU} for every module any concept shuts, W0 being `base`'s weights, and a
    report in `fusion.fusion_report`'s shape. Its errors are relative weight errors per layer
    against each concept's own shut layer (`relative_weight_error`: nonzero where another concept
    shuts entries too); "weight" is the weight-averaging baseline W0 + mean_i dW_i. It adds
    "neurons" (per concept), "union" and "shared" (neurons shut by more than one concept).
    Concept tokens are not part of the updates: each concept's embeddings are its own.
    """
    from .fusion import fusion_report

    if len(names) != len(tensors):
        raise UserError(f"{len(names)} concept names for {len(tensors)} concept files")
    for name, concept_tensors in zip(names, tensors):
        try:
            check_cones_tensors(concept_tensors, base)
        except UserError as error:
            raise UserError(f"concept <{name}>: {error}") from None
    layers = kv_modules(base.unet)
    per_concept = [neurons_of(t) for t in tensors]
    modules = sorted(set().union(*per_concept))
    updates, errors, union_count, shared = {}, {}, 0, 0
    for module in modules:
        w0 = layers[module].weight.detach()
        sets = [n[module] for n in per_concept if module in n]
        union = union_shut(sets)
        union_count += int(union.numel())
        shared += sum(int(s.numel()) for s in sets) - int(union.numel())  # counted once per extra concept
        merged = shut_delta(w0, union)
        own = [shut_delta(w0, n[module]) if module in n else torch.zeros_like(merged) for n in per_concept]
        average = torch.stack(own).mean(0)
        errors[f"unet.{module}"] = {
            "method": [relative_weight_error(w0, merged, o) for o in own],
            "weight": [relative_weight_error(w0, average, o) for o in own],
        }
        updates[f"unet.{module}"] = merged.cpu().contiguous()
    report = fusion_report(errors, names, "cones") if modules else {"method": "cones", "concepts": names, "summary": {}, "layers": {},
                                                                   "outliers": []}
    report["error"] = "relative weight error against each concept's own shut weights"
    report["neurons"] = {name: sum(int(i.numel()) for i in n.values()) for name, n in zip(names, per_concept)}
    report["union"] = union_count
    report["shared"] = shared
    return updates, report
