"""Export a concept for A1111, Forge and ComfyUI: a kohya LoRA file plus a textual-inversion embedding.

Those tools know two kinds of file that a Menagerie concept can become:
- a **kohya LoRA** (kohya-ss/sd-scripts networks/lora.py): `<lora_name>.lora_down.weight`,
  `.lora_up.weight` and `.alpha`, where `lora_name` is the module path with dots as underscores,
  prefixed `lora_unet_` or (SD1.x) `lora_te_`. The tools apply `up @ down * alpha / rank`, so
  `alpha = rank` reproduces ED-LoRA's scale 1.0 (delta = B @ A).
- a **textual-inversion embedding** (A1111 modules/textual_inversion/textual_inversion.py): a few
  vectors fed at the text-encoder input wherever the embedding's name appears in the prompt.

ED-LoRA's tokens are layer-wise (Mix-of-Show section 3.3.1): V_rand and V_class each have one vector
per UNet cross-attention layer (16). An embedding file has one vector per token for all layers, so
the export collapses the 16 copies into one: their mean or one layer's copy (`textual_inversion_vectors`),
or "distil", the pair whose cross-attention keys and values come closest to the layer-wise ones in
every layer (`distilled_vectors`, which needs the base model). That loses identity; the toy world
measures how much (docs/toyworld.md, "Export to A1111").
"""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import torch
from safetensors.torch import save_file

from .edlora import TEXT_MODEL_LEVEL, apply_concept, canonical_keys, lora_rank_of, set_active_adapters, split_state_dict
from . import KIND_NAMES
from .errors import UserError
from .files import write_atomic
from .layerwise import NUM_LAYERS, WORDS, concept_tokens, concept_words, cross_attention_layers, expand_prompt

COLLAPSE_RULE = re.compile(r"mean|distil|layer:(\d+)")
DEFAULT_COLLAPSE = "mean"  # measured in the toy world against a mid layer: docs/toyworld_export.json
# "distil" (`distilled_vectors`): the prompts whose cross-attention keys and values the one pair should
# reproduce. Mix-of-Show's fusion prompts ("photo of a <c>", "<c>") plus the README's "a <c> <class>"
# and one with words after the concept (causal attention: those positions change with it too).
DISTIL_TEMPLATES = ("photo of a {}", "{}", "a {} {class_word}", "a photo of a {} {class_word} in the garden")
DISTIL_STEPS = 300  # Adam steps from the mean
DISTIL_LR = 1e-2  # Adam step size on the token vectors


# ---------------------------------------------------------------------------------------------
# The LoRA


def kohya_lora_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A concept's LoRA tensors (peft naming, `edlora`) in kohya's SD1.5 naming, with `.alpha = rank`.

    `unet.<path>.lora_A.weight` becomes `lora_unet_<path with _>.lora_down.weight` (B: `lora_up`) and
    `text_encoder.encoder.layers.N...` becomes `lora_te_text_model_encoder_layers_N...`: kohya names
    the text encoder by transformers 4's module paths, with their `text_model.` level. The
    embeddings are not part of the LoRA (see `textual_inversion_vectors`).
    """
    from diffusers.utils import convert_state_dict_to_kohya

    _, text, unet = split_state_dict(canonical_keys(tensors))
    peft = {f"unet.{k}": v for k, v in unet.items()}
    peft.update({f"text_encoder.{TEXT_MODEL_LEVEL}{k}": v for k, v in text.items()})
    kohya = {}
    for key, value in convert_state_dict_to_kohya(peft).items():
        # diffusers names every text encoder `lora_te1_` (SDXL's first); SD1.x files say `lora_te_`
        if key.startswith("lora_te1_"):
            key = "lora_te_" + key[len("lora_te1_"):]
        if key.endswith(".alpha"):  # diffusers writes the layer's rank as int64; kohya a float scalar
            value = torch.tensor(float(value))
        kohya[key] = value.detach().float().cpu().contiguous()
    return kohya


# ---------------------------------------------------------------------------------------------
# The embedding


def textual_inversion_vectors(embeddings: torch.Tensor, how: str = DEFAULT_COLLAPSE) -> torch.Tensor:
    """One textual-inversion embedding `[n, d]` from a concept's layer-wise `[n, 16, d]`: n = 2
    (V_rand, V_class) for ED-LoRA, n = the words of "trigger class" for an imported LoRA (whose 16
    copies are equal, so nothing is lost there).

    Args:
        embeddings: a concept's layer-wise token vectors `[n, 16, d]` (`concept.safetensors["embeddings"]`).
        how: "mean" averages the 16 layer copies of each word; "layer:<i>" takes the copy of
            cross-attention layer i (0-5 down blocks, 6 the mid block, 7-15 up blocks). Either way
            the result is lossy: every layer now reads the same two vectors. ("distil" needs the base
            model: `distilled_vectors`.)
    """
    if embeddings.ndim != 3 or embeddings.shape[0] < 1 or embeddings.shape[1] != NUM_LAYERS:
        raise UserError(f"concept embeddings have shape {tuple(embeddings.shape)}; expected [words, {NUM_LAYERS}, d]")
    layer = check_collapse(how)
    if how == "distil":
        raise UserError("embedding collapse 'distil' needs the base model: use distilled_vectors(base, ...) or"
                        " export_for_webui(..., base=...)")
    if how == "mean":
        return embeddings.float().mean(dim=1)  # [n, d]
    return embeddings[:, layer].float().clone()  # [n, d]


def check_collapse(how: str) -> int | None:
    """Validate a collapse name ("mean", "distil" or "layer:<i>"); returns i for "layer:<i>", else None."""
    match = COLLAPSE_RULE.fullmatch(how) if isinstance(how, str) else None
    if match is None:
        raise UserError(f"embedding collapse {how!r} is not valid: use 'mean', 'distil' or 'layer:<i>' with i in 0-{NUM_LAYERS - 1}")
    if match.group(1) is None:
        return None
    layer = int(match.group(1))
    if layer >= NUM_LAYERS:
        raise UserError(f"embedding collapse {how!r} names layer {layer}; layers are 0-{NUM_LAYERS - 1}")
    return layer


def key_value_objective(base, name: str, tensors: dict[str, torch.Tensor], class_word: str,
                        templates: tuple[str, ...] = DISTIL_TEMPLATES):
    """The distillation objective of concept `name`: a function of one pair of token vectors `[n, d]`.

    For each template prompt p and cross-attention layer l, layer l of the full concept reads its
    own copy's encoding c_l(p); an exported embedding gives every layer one encoding c(p; v). The
    objective is the relative squared error of the keys and values the UNet computes from them,

        sum_{p,l} ||K_l c(p; v) - K_l c_l(p)||^2 + ||V_l c(p; v) - V_l c_l(p)||^2  /  sum_{p,l} ||K_l c_l||^2 + ||V_l c_l||^2

    with the concept's LoRA in the text encoder and in K_l, V_l (scale 1.0, as exported). Positions
    are the concept's words and everything after them, padding included (a webui feeds all 77 to
    the UNet); under CLIP's causal attention the positions before the concept do not change.

    Loads the concept into `base` as sampling does (`apply_concept`), and leaves it loaded.
    Returns `objective(vectors [n, d]) -> scalar tensor`, differentiable in `vectors`.
    """
    if base.fused is not None:
        raise UserError(f"the base model holds the fused model {base.fused}; load the base again to distil an embedding")
    # 1. The concept as the export has it: LoRA at scale 1.0 in the text encoder and the UNet
    apply_concept(base, name, tensors, lora_scale=1.0)
    for model in (base.text_encoder, base.unet):
        set_active_adapters(model, [name])
    words = concept_words(base.text_encoder)[name]
    layers = [module for _, module in cross_attention_layers(base.unet)]
    token_ids = base.tokenizer.convert_tokens_to_ids(concept_tokens(name, words))
    first_copy = token_ids[::NUM_LAYERS]  # the layer-0 token of each word

    # 2. Token ids of each prompt's 16 copies, padded to 77 as the webuis pad
    prompts = [template.format(f"<{name}>", class_word=class_word) for template in templates]
    texts = [expand_prompt(prompt, layer, {name: words}) for prompt in prompts for layer in range(NUM_LAYERS)]
    limit = base.text_encoder.config.max_position_embeddings
    ids = base.tokenizer(texts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt").input_ids
    ids = ids.view(len(prompts), NUM_LAYERS, limit).to(base.device)  # [P, 16, 77]
    is_first = (ids[:, 0, :, None] == torch.tensor(first_copy, device=base.device)).any(-1)  # [P, 77]
    changed = (is_first.cumsum(dim=1) > 0).float()[..., None]  # [P, 77, 1]: the concept and every later position

    def keys_values(layer, hidden: torch.Tensor) -> torch.Tensor:  # [P, 77, d] -> [P, 77, k + v], masked
        hidden = hidden.to(layer.to_k.weight.dtype)
        return torch.cat([layer.to_k(hidden), layer.to_v(hidden)], dim=-1).float() * changed

    # 3. Targets: layer l's keys and values of copy l
    with torch.no_grad():
        hidden = base.text_encoder(ids.flatten(0, 1))[0].unflatten(0, (len(prompts), NUM_LAYERS))  # [P, 16, 77, d]
        targets = [keys_values(layer, hidden[:, index]) for index, layer in enumerate(layers)]
        scale = sum(float(target.square().sum()) for target in targets)

    # 4. The candidate: copy 0's ids with each word's input vector replaced by `vectors`
    def objective(vectors: torch.Tensor) -> torch.Tensor:
        def put(module, args, output):  # forward hook of the token table: [P, 77, d]
            for word, token in enumerate(first_copy):
                output = torch.where((args[0] == token)[..., None], vectors[word].to(output.dtype), output)
            return output

        handle = base.text_encoder.get_input_embeddings().register_forward_hook(put)
        try:
            hidden = base.text_encoder(ids[:, 0])[0]  # [P, 77, d]
        finally:
            handle.remove()
        return sum((keys_values(layer, hidden) - target).square().sum() for layer, target in zip(layers, targets)) / scale

    return objective


def distilled_vectors(base, name: str, tensors: dict[str, torch.Tensor], class_word: str, steps: int = DISTIL_STEPS,
                      lr: float = DISTIL_LR) -> torch.Tensor:
    """The one pair of token vectors `[n, d]` whose cross-attention keys and values come closest to
    the layer-wise concept's in every layer (`key_value_objective`): a textual-inversion embedding
    distilled through the concept's own frozen text encoder and UNet K/V, on `base`.

    Args:
        base: the base model the concept was trained on (`pipelines.base.load_base`); the concept is
            loaded into it (`apply_concept`) and stays loaded.
        name, tensors: the concept's name and tensors (`ConceptLibrary.weights`).
        class_word: the concept's class word, used in the template prompts (`DISTIL_TEMPLATES`).
        steps: Adam steps from the mean of the 16 copies (default 300). More steps fit closer; each
            is one text-encoder pass of 4 prompts (milliseconds on the toy model, on a GPU at SD size).
        lr: Adam step size (default 1e-2).
    Returns:
        float32 `[n, d]` on the CPU: the best pair seen, so never worse on the objective than the
        mean (which it returns when the 16 copies are already equal). Deterministic: no randomness.
    """
    if steps < 0 or lr <= 0:
        raise UserError(f"distillation needs steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    objective = key_value_objective(base, name, tensors, class_word)
    embeddings = tensors["embeddings"].float()
    vectors = embeddings.mean(dim=1).to(base.device).requires_grad_(True)  # [n, d], starting at the mean
    optimizer = torch.optim.Adam([vectors], lr=lr)
    best, best_loss = vectors.detach().clone(), float("inf")
    for step in range(steps + 1):  # the last pass only scores the last step
        loss = objective(vectors)
        if loss.item() < best_loss:
            best, best_loss = vectors.detach().clone(), loss.item()
        if best_loss < 1e-10:  # exact already (16 equal copies): nothing to fit
            break
        if step < steps:
            # autograd.grad, not backward: no gradients pile up on the frozen (maybe shared) base weights
            (vectors.grad,) = torch.autograd.grad(loss, [vectors])
            optimizer.step()
    return best.cpu()


def save_a1111_embedding(path: str | os.PathLike, token: str, vectors: torch.Tensor) -> Path:
    """Write a textual-inversion embedding `[n, d]` that A1111, Forge, ComfyUI and diffusers all load.

    `.pt`: A1111's own layout (what its `Embedding.save` writes): `string_to_param {'*': vectors}`,
    `string_to_token`, `name`, `step`, `sd_checkpoint`, `sd_checkpoint_name`. diffusers'
    `load_textual_inversion` reads it (the "A1111" branch). `.safetensors` cannot hold nested dicts:
    there one tensor `emb_params` (the civitai convention), read by A1111 and diffusers as a
    one-key dict and by ComfyUI by that name. A1111 and ComfyUI name the embedding after the file,
    so `token` (`name`) matters to diffusers only. The write is atomic.
    """
    path = Path(path).expanduser()
    if path.suffix not in (".pt", ".safetensors"):
        raise UserError(f"embedding file {str(path)!r} must end in .pt or .safetensors")
    if vectors.ndim != 2:
        raise UserError(f"embedding vectors have shape {tuple(vectors.shape)}; expected [n_vectors, d]")
    vectors = vectors.detach().float().cpu().contiguous()
    if path.suffix == ".safetensors":
        return write_atomic(path, lambda tmp: save_file({"emb_params": vectors}, tmp, metadata={"name": token}))
    a1111 = {
        "string_to_token": {"*": 265},  # A1111 writes the id of '*'; no loader reads it
        "string_to_param": {"*": vectors},
        "name": token,
        "step": 0,
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
    }
    return write_atomic(path, lambda tmp: torch.save(a1111, tmp))


# ---------------------------------------------------------------------------------------------
# The export


LORA_SUFFIX = "_lora"  # <name>_lora.safetensors beside the embedding <name>.safetensors
# Measured in the toy world (docs/toyworld.md, "Export to A1111", docs/toyworld_export.json); for README.txt and the app.
COLLAPSE_LOSS_NOTE = ("The embedding is lossy: Menagerie gives each of the 16 cross-attention layers its own pair of"
                      " token vectors, an embedding file has one pair for all layers. In Menagerie's toy world"
                      " (11 pets, 16 images each) the exported LoRA + embedding kept attribute match 0.51 with the"
                      " distilled embedding and 0.43 with the mean one against 0.66 with the full concept, exact"
                      " identity in 0.02 / 0.01 of images against 0.12, and the pet's unnamed trait (belly) 0.05"
                      " against 0.47: expect a generic {class_word} with some of the pet's look. Sample in Menagerie"
                      " for the full concept.")


def collapse_words(how: str) -> str:
    """What an embedding collapsed by `how` is, in words (README.txt)."""
    if how == "mean":
        return "the mean of the 16 layer copies"
    if how == "distil":
        return ("distilled from the 16 layer copies: the pair whose cross-attention keys and values come closest"
                " to the full concept's in every layer")
    return "the copy of " + how.replace(":", " ")


def usage_note(name: str, class_word: str, base_model: str, rank: int, how: str) -> str:
    """README.txt of a webui export: where each file goes in each tool, and the prompt."""
    lora, embedding = f"{name}{LORA_SUFFIX}", name
    return f"""<{name}>: a Menagerie concept (ED-LoRA, a {class_word}) exported for A1111, Forge, ComfyUI and diffusers.
Trained on: {base_model}. Use it with that base model (Stable Diffusion 1.5 family).

Files
  {lora}.safetensors   the LoRA: kohya naming, rank {rank}, alpha {rank} (strength 1.0 is the trained strength)
  {embedding}.safetensors   the textual-inversion embedding of the concept's token (2 vectors)
Use both together: the LoRA alone does not know the token, the embedding alone lacks the LoRA.

A1111 and Forge
  Put {lora}.safetensors into models/Lora/ and {embedding}.safetensors into embeddings/.
  Prompt: a {embedding} {class_word} on the beach, <lora:{lora}:1>

ComfyUI
  Put {lora}.safetensors into models/loras/ and {embedding}.safetensors into models/embeddings/.
  Add a LoraLoader node after the checkpoint loader (lora_name {lora}.safetensors, strength_model 1.0,
  strength_clip 1.0) and feed its MODEL and CLIP on. Prompt (CLIPTextEncode): a embedding:{embedding} {class_word} on the beach

diffusers
  from diffusers import StableDiffusionPipeline
  pipe = StableDiffusionPipeline.from_pretrained("{base_model}")
  pipe.load_lora_weights(".", weight_name="{lora}.safetensors")  # run beside the files
  pipe.load_textual_inversion("{embedding}.safetensors", token="<{name}>")
  image = pipe("a <{name}> {class_word} on the beach").images[0]

What the export loses
{textwrap.fill(COLLAPSE_LOSS_NOTE.format(class_word=class_word), 100, initial_indent="  ", subsequent_indent="  ")}
{textwrap.fill(f"This embedding is {collapse_words(how)}.", 100, initial_indent="  ", subsequent_indent="  ")}
  Regional and isolated sampling of several concepts, and fusion, are Menagerie's own; these files give one concept.
"""


def export_for_webui(library, name: str, out_dir: str | os.PathLike, how: str = DEFAULT_COLLAPSE, base=None) -> Path:
    """Write concept `name` as files A1111, Forge and ComfyUI load unmodified; returns `out_dir`.

    `out_dir` gets `<name>_lora.safetensors` (kohya LoRA, `kohya_lora_state_dict`, with kohya's
    `ss_*` metadata), `<name>.safetensors` (the embedding: `textual_inversion_vectors(..., how)`, or
    for how="distil" `distilled_vectors` on `base`, the base model the concept was trained on, which
    it then needs) and `README.txt` (usage per tool). Each file is written to a temporary name and
    renamed, and nothing is written unless the concept reads whole: an unknown or damaged concept is
    a UserError.
    """
    # 1. Check inputs: the record, the tensors, the collapse, the folder
    concept = library.get(name)
    kind = getattr(concept, "kind", "edlora")
    if kind == "lora":
        raise UserError(f"concept {name!r} is an imported LoRA, not an ED-LoRA concept; its original file already loads"
                        f" in A1111/ComfyUI (use --format menagerie to export it for another Menagerie library)")
    if kind not in ("edlora", "joint"):  # a joint group's member is ED-LoRA-shaped: its words and the shared LoRA
        raise UserError(f"concept {name!r} is a {KIND_NAMES.get(kind, kind)} concept; A1111 and ComfyUI load LoRAs and"
                        f" embeddings, not its weights (use --format menagerie to export it for another Menagerie library)")
    check_collapse(how)
    if how == "distil" and base is None:
        raise UserError(f"embedding collapse 'distil' needs the base model <{name}> was trained on ({concept.base_model});"
                        f" pass base=load_base(...), or use 'mean'")
    tensors = library.weights(name, base)
    embeddings, _, _ = split_state_dict(tensors)
    rank = lora_rank_of(tensors)
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"export folder {str(out_dir)!r} is a file; give a folder for the webui export")

    # 2. Convert
    if how == "distil":
        vectors = distilled_vectors(base, concept.name, tensors, concept.class_word)
    else:
        vectors = textual_inversion_vectors(embeddings, how)
    lora = kohya_lora_state_dict(tensors)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_base_model_version": "sd_v1",
        "ss_sd_model_name": concept.base_model,
        "ss_output_name": f"{concept.name}{LORA_SUFFIX}",
        "menagerie_concept": concept.name,
        "menagerie_trigger": concept.name,  # the embedding's name: A1111 and ComfyUI name it after its file
        "menagerie_class_word": concept.class_word,
        "menagerie_embedding": f"{concept.name}.safetensors",
        "menagerie_embedding_collapse": how,
    }

    # 3. Write: each file to a temporary name, then renamed into place
    note = usage_note(concept.name, concept.class_word, concept.base_model, rank, how)
    write_atomic(out_dir / f"{concept.name}{LORA_SUFFIX}.safetensors", lambda tmp: save_file(lora, tmp, metadata=metadata))
    save_a1111_embedding(out_dir / f"{concept.name}.safetensors", f"<{concept.name}>", vectors)
    write_atomic(out_dir / "README.txt", lambda tmp: tmp.write_text(note))
    return out_dir
