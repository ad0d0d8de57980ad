"""Import LoRA files (kohya, A1111, diffusers, peft) and Mix-of-Show ED-LoRA checkpoints as concepts.

A LoRA file from civitai or a trainer names the same layers in one of these ways:

    naming          example key                                                          alpha
    kohya           lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q  <name>.alpha
                      .lora_down.weight / .lora_up.weight; lora_te_text_model_encoder_... (scale alpha / rank)
    a1111-ldm       lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down  as kohya
                      (the original SD layout's block names)
    diffusers       unet.down_blocks...attn1.to_q.lora_A.weight, text_encoder.text_model  the file's
                      ....q_proj.lora_B.weight                                            lora_adapter_metadata
    diffusers-old   unet...attn1.processor.to_q_lora.down.weight, ...to_q.lora.up.weight,  scale 1
                      text_encoder...self_attn.to_q_lora.down.weight, ...lora_linear_layer.up
    peft            base_model.model.down_blocks...to_q.lora_A.weight (or no prefix)     adapter_config.json

diffusers' own converters map these names to its modules (`StableDiffusionLoraLoaderMixin.lora_state_dict`
for kohya and A1111, the `state_dict_utils` tables for the rest), exactly as `load_lora_weights` does.
Menagerie keeps LoRA at scale 1 (delta = B A), so each layer's alpha / rank is folded into its B.

A LoRA was trained on a prompt like "photo of ohwx dog": its trigger word(s) and a class word. The
concept <name> stands for exactly that phrase: its words are the tokens of "ohwx dog" (often more than
two, "ohwx" alone is two CLIP tokens), and each word's 16 layer-wise vectors are the base's own input
embedding of that token, the same in every layer. A prompt with <name> therefore encodes exactly
as the same prompt with "ohwx dog" written out, on the base it was imported with.

Mix-of-Show (github.com/TencentARC/Mix-of-Show, `mixofshow/pipelines/trainer_edlora.py::delta_state_dict`)
saves `{"params": {"new_concept_embedding": {word: [16, d]}, "text_encoder": {...}, "unet": {...}}}`
with LoRA keys `<module>.lora_down.weight` / `.lora_up.weight` and scale alpha = 1.0 (no / rank).
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .concept import Concept, ConceptLibrary, check_class_word, check_name, trigger_prompt_to_concept
from .edlora import canonical_keys, check_concept_tensors, text_module_name
from .errors import UserError
from .layerwise import NUM_LAYERS, WORD_LABELS

SOURCE_FORMATS = ("kohya", "a1111-ldm", "diffusers", "diffusers-old", "peft", "mix-of-show")

# (down suffix, up suffix) of a LoRA layer's two factors in each naming
FACTOR_SUFFIXES = (
    (".lora_down.weight", ".lora_up.weight"),  # kohya, A1111, Mix-of-Show
    (".lora_A.weight", ".lora_B.weight"),  # peft, diffusers
    (".lora.down.weight", ".lora.up.weight"),  # diffusers 0.2x UNet layers
    ("_lora.down.weight", "_lora.up.weight"),  # diffusers attention processors (to_q_lora)
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),  # diffusers text encoder before peft
)
ALPHA_SUFFIX = ".alpha"

# Keys that mark a file as something other than a plain LoRA for SD1.x: what it is
NOT_PLAIN_LORA = (
    (re.compile(r"hada_"), "a LyCORIS LoHa file"),
    (re.compile(r"lokr_"), "a LyCORIS LoKr file"),
    (re.compile(r"\.lora_mid\."), "a LyCORIS LoCon file with Tucker factors (lora_mid)"),
    (re.compile(r"oft_|\.boft_"), "an OFT/BOFT file"),
    (re.compile(r"dora_scale|lora_magnitude_vector"), "a DoRA file"),
    (re.compile(r"\.diff(_b)?$"), "a file of full weight differences"),
    (re.compile(r"^(lora_te2_|text_encoder_2\.)|label_emb|add_embedding|transformer_blocks[._][1-9]"),
     "an SDXL LoRA (a second text encoder, or SDXL's UNet blocks)"),
    (re.compile(r"^(lora_transformer_|transformer\.|diffusion_model\.)|double_blocks|single_blocks|joint_blocks"),
     "a LoRA for a transformer model (Flux, SD3 or similar)"),
)
PLAIN_LORA_HINT = "Menagerie imports plain LoRA files for Stable Diffusion 1.x (kohya, A1111, diffusers, peft)"

UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.")
TEXT_ROOTS = ("text_model.", "encoder.layers.")
MIX_OF_SHOW_ALPHA = 1.0  # every Mix-of-Show config trains at alpha 1.0: W0 x + 1.0 * up(down(x))


# ---------------------------------------------------------------------------------------------
# Pure functions: naming, alpha, embeddings


def naming_of(keys: list[str]) -> str:
    """The key naming of a LoRA file's keys (one of SOURCE_FORMATS but mix-of-show); UserError if mixed."""
    kohya = [k for k in keys if k.startswith(("lora_unet_", "lora_te_", "lora_te1_"))]
    if kohya:
        if len(kohya) != len(keys):
            other = next(k for k in keys if k not in kohya)
            raise UserError(f"the file mixes kohya keys ({kohya[0]!r}) with others ({other!r}); {PLAIN_LORA_HINT}")
        ldm = any(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", k) for k in keys)
        diffusers_blocks = any(re.match(r"lora_unet_(down_blocks|mid_block|up_blocks)_", k) for k in keys)
        if ldm and diffusers_blocks:
            raise UserError("the file mixes A1111 block names (input_blocks...) with diffusers ones (down_blocks...)")
        return "a1111-ldm" if ldm else "kohya"
    if any(k.endswith(FACTOR_SUFFIXES[2] + FACTOR_SUFFIXES[3] + FACTOR_SUFFIXES[4]) for k in keys):
        return "diffusers-old"
    if any(k.startswith(("unet.", "text_encoder.")) for k in keys):
        return "diffusers"
    return "peft"


def split_factor_key(key: str) -> tuple[str, str] | None:
    """(layer stem, "down" | "up" | "alpha") of a LoRA file key, or None for a key of no known form."""
    for down, up in FACTOR_SUFFIXES:
        if key.endswith(down):
            return key[: -len(down)], "down"
        if key.endswith(up):
            return key[: -len(up)], "up"
    if key.endswith(ALPHA_SUFFIX):
        return key[: -len(ALPHA_SUFFIX)], "alpha"
    return None


def fold_alphas(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The factors in float32 with each layer's alpha / rank folded into its up factor; alpha keys dropped.

    kohya's scale is alpha / rank, with alpha 0 or absent meaning rank (scale 1). Raises UserError
    naming a key of no known form, a factor without its partner, or a bad alpha.
    """
    layers: dict[str, dict[str, str]] = {}
    for key in raw:
        parts = split_factor_key(key)
        if parts is None:
            raise UserError(f"key {key!r} is not a LoRA factor or alpha this importer knows; {PLAIN_LORA_HINT}")
        stem, role = parts
        layers.setdefault(stem, {})[role] = key
    out = {}
    for stem, roles in layers.items():
        if "down" not in roles or "up" not in roles:
            raise UserError(f"layer {stem!r} has {' and '.join(sorted(roles))} but no {'down' if 'down' not in roles else 'up'}"
                            f" factor; the file is incomplete")
        down, up = raw[roles["down"]].float(), raw[roles["up"]].float()
        scale = 1.0
        if "alpha" in roles:
            alpha = raw[roles["alpha"]]
            if alpha.numel() != 1 or not torch.isfinite(alpha).all():
                raise UserError(f"{roles['alpha']!r} should hold one finite number, it holds {tuple(alpha.shape)} values")
            scale = float(alpha) / down.shape[0] if float(alpha) != 0 else 1.0
        out[roles["down"]] = down.contiguous()
        out[roles["up"]] = (up * scale).contiguous()
    return out


def config_scale(config: dict, module: str, rank: int) -> float:
    """alpha / r of one layer under a peft LoraConfig as a dict (lora_alpha, alpha_pattern, use_rslora).

    `rank` is the layer's rank as its tensors have it. A config without lora_alpha means scale 1.
    """
    from peft.utils.other import get_pattern_key

    patterns = config.get("alpha_pattern") or {}
    alpha = config.get("lora_alpha", rank)
    if patterns:
        alpha = patterns.get(get_pattern_key(patterns.keys(), module), alpha)
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def phrase_ids(tokenizer, phrase: str) -> list[int]:
    """The CLIP token ids of a phrase, without start and end of text."""
    return tokenizer(phrase, add_special_tokens=False).input_ids


def phrase_embeddings(base, phrase: str) -> torch.Tensor:
    """`[words, 16, d]`: the base's own input embedding of each token of `phrase`, the same in all 16 layers."""
    table = base.text_encoder.get_input_embeddings().weight  # the base vocabulary (ConceptTokenTable.weight too)
    rows = table[torch.tensor(phrase_ids(base.tokenizer, phrase), device=table.device)].detach().float().cpu()  # [words, d]
    return rows.unsqueeze(1).expand(-1, NUM_LAYERS, -1).contiguous()


# ---------------------------------------------------------------------------------------------
# Reading files


def read_tensor_file(file: Path) -> tuple[dict, dict]:
    """(contents, safetensors metadata) of a .safetensors file, or of a pickled one loaded with
    `torch.load(weights_only=True)` (tensors and plain containers only; no code runs)."""
    if not file.is_file():
        raise UserError(f"import file {str(file)!r} does not exist")
    if file.stat().st_size == 0:
        raise UserError(f"{file.name} is empty (0 bytes)")
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt") as handle:
                metadata = handle.metadata() or {}
            return load_file(file), metadata
        except (SafetensorError, OSError, ValueError) as error:
            raise UserError(f"{file.name} is not a readable .safetensors file ({type(error).__name__}: {error})") from None
    try:
        return torch.load(file, map_location="cpu", weights_only=True), {}
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{file.name} is not a readable weights file (tensors only; {first})") from None


def check_plain_lora(keys: list[str]) -> None:
    """Refuse LyCORIS, DoRA, SDXL and transformer-model files, naming a key that shows it."""
    for pattern, what in NOT_PLAIN_LORA:
        for key in keys:
            if pattern.search(key):
                raise UserError(f"this is {what} (key {key!r}); {PLAIN_LORA_HINT}, and Mix-of-Show checkpoints")


# ---------------------------------------------------------------------------------------------
# Conversion to concept tensors


def to_peft_names(keys: list[str], naming: str, unet_config) -> dict[str, str]:
    """Concept key ("unet.<module>.lora_A.weight", "text_encoder.<module>.lora_B.weight") -> source key.

    diffusers' converters rename keys one to one and never look at the values, so they are given
    the source keys as values: what comes back maps each new name to the key it came from.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    names = {k: k for k in keys}
    if naming in ("kohya", "a1111-ldm"):
        try:  # A1111's input_blocks/output_blocks numbering follows the base's layers_per_block
            names, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(names, unet_config=unet_config)
        except (ValueError, KeyError, IndexError) as error:
            raise UserError(f"diffusers cannot map these kohya/A1111 keys ({type(error).__name__}: {error})") from None
    parts: dict[str, dict[str, str]] = {"unet": {}, "text_encoder": {}}
    for key, source in names.items():
        key = key.removeprefix("base_model.model.")  # a peft PeftModel's save
        prefix = next((p for p in parts if key.startswith(p + ".")), None)
        if prefix is not None:
            key = key[len(prefix) + 1:]
        elif key.startswith(UNET_ROOTS):  # a bare peft key: its part by the module's root
            prefix = "unet"
        elif key.startswith(TEXT_ROOTS):
            prefix = "text_encoder"
        else:
            raise UserError(f"key {source!r} names no UNet or text-encoder layer of Stable Diffusion 1.x; {PLAIN_LORA_HINT}")
        parts[prefix][key] = source
    unet = convert_unet_state_dict_to_peft(parts["unet"])  # .processor., to_q_lora.down, .lora.down -> lora_A
    text = convert_state_dict_to_peft(parts["text_encoder"], original_type=StateDictType.DIFFUSERS_OLD)
    out = {f"unet.{k}": v for k, v in unet.items()}
    out.update({f"text_encoder.{k}": v for k, v in text.items()})
    if len(out) != len(keys):  # e.g. ...to_q.lora_A.weight beside ...processor.to_q_lora.down.weight
        raise UserError("the file names some layer twice, in two namings; it is ambiguous")
    for key, source in out.items():
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise UserError(f"key {source!r} does not map to a LoRA layer (it became {key!r}); {PLAIN_LORA_HINT}")
    return canonical_keys(out)  # "text_encoder.text_model.encoder..." -> "text_encoder.encoder..."


def adapter_config_of(file: Path, metadata: dict, naming: str) -> dict[str, dict]:
    """Per model part ("unet", "text_encoder"), the LoraConfig fields the file states its scales with:
    diffusers' `lora_adapter_metadata` ({"unet.lora_alpha": 8, ...}), or peft's adapter_config.json beside
    an adapter_model file. {} when the file states none (scale 1, as diffusers then loads it)."""
    if "lora_adapter_metadata" in metadata:
        try:
            packed = json.loads(metadata["lora_adapter_metadata"])
        except json.JSONDecodeError:
            raise UserError(f"{file.name}: its lora_adapter_metadata is not valid JSON") from None
        configs: dict[str, dict] = {}
        for key, value in packed.items():
            part, _, field_name = key.partition(".")
            configs.setdefault(part, {})[field_name] = value
        return configs
    peft_config = file.with_name("adapter_config.json")
    if naming == "peft" and file.stem == "adapter_model" and peft_config.is_file():
        try:
            config = json.loads(peft_config.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(f"{peft_config} cannot be read ({error})") from None
        return {"unet": config, "text_encoder": config}
    return {}


def fit_to_base(tensors: dict[str, torch.Tensor], sources: dict[str, str], base) -> dict[str, torch.Tensor]:
    """Check each LoRA layer exists in `base` (naming its source key if not), and write a 1x1 conv
    layer's factors as the base's layer has it: `[r, in, 1, 1]` for a Conv2d, `[r, in]` for a Linear
    (proj_in/proj_out are 1x1 convs in SD1.5 and linears in some configs; the same numbers)."""
    modules = {"unet": dict(base.unet.named_modules()), "text_encoder": dict(base.text_encoder.named_modules())}
    out = {}
    for key, value in tensors.items():
        part, module = key.split(".", 1)
        module = module.rsplit(".lora_", 1)[0]
        name = text_module_name(base.text_encoder, module) if part == "text_encoder" else module
        layer = modules[part].get(name)
        if layer is None:
            raise UserError(f"key {sources[key]!r} names the layer {part}.{module}, which this base model does not have;"
                            f" the LoRA was made for another architecture")
        layer = getattr(layer, "base_layer", layer)
        if isinstance(layer, torch.nn.Conv2d) and value.ndim == 2:
            value = value[:, :, None, None]
        elif isinstance(layer, torch.nn.Linear) and value.ndim == 4 and tuple(value.shape[2:]) == (1, 1):
            value = value[:, :, 0, 0]
        out[key] = value.contiguous()
    return out


def lora_concept_tensors(file: str | Path, base) -> tuple[dict[str, torch.Tensor], str]:
    """(concept LoRA tensors at scale 1, the file's naming) of a LoRA file, checked against `base`.

    Raises UserError for an unreadable or empty file, a key of no known form (naming it), a
    LyCORIS/DoRA/SDXL/transformer-model file, or a layer this base does not have or cannot take.
    """
    file = Path(file).expanduser()
    raw, metadata = read_tensor_file(file)
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw.items()):
        raise UserError(f"{file.name} is not a flat file of named tensors; {PLAIN_LORA_HINT}")
    if not raw:
        raise UserError(f"{file.name} holds no tensors")
    keys = list(raw)
    check_plain_lora(keys)
    naming = naming_of(keys)
    configs = adapter_config_of(file, metadata, naming)
    alphas = [k for k in keys if k.endswith(ALPHA_SUFFIX)]
    if configs and alphas:
        raise UserError(f"{file.name} states its scales twice (alpha keys such as {alphas[0]!r} and a LoRA config); it is ambiguous")
    for part, config in configs.items():
        if config.get("use_dora"):
            raise UserError(f"{file.name} is a DoRA file (its {part} config has use_dora); {PLAIN_LORA_HINT}")
    folded = fold_alphas(raw)
    sources = to_peft_names(list(folded), naming, base.unet.config)
    tensors = {key: folded[source] for key, source in sources.items()}
    for key in [k for k in tensors if k.endswith(".lora_B.weight")]:
        part, module = key.split(".", 1)
        module = module[: -len(".lora_B.weight")]
        if part in configs:
            tensors[key] = tensors[key] * config_scale(configs[part], module, tensors[key].shape[1])
    return fit_to_base(tensors, sources, base), naming


# ---------------------------------------------------------------------------------------------
# Entry points


def check_trigger(trigger: str) -> str:
    trigger = " ".join(trigger.split()) if isinstance(trigger, str) else ""
    if not trigger:
        raise UserError("the trigger word is missing: give the word(s) the LoRA was trained with, e.g. --trigger ohwx"
                        " (civitai lists them as 'trigger words')")
    if "<" in trigger or ">" in trigger:
        raise UserError(f"trigger {trigger!r} contains '<' or '>'; give the plain word(s) the LoRA was trained with")
    return trigger


def _check_new_name(library: ConceptLibrary, name: str, overwrite: bool) -> str:
    check_name(name)
    if name in library.names() and not overwrite:
        raise UserError(f"concept {name!r} already exists in {library.root}; pass --overwrite or choose another --name")
    return name


def _save(library: ConceptLibrary, concept: Concept, tensors: dict[str, torch.Tensor], base, overwrite: bool) -> Concept:
    """Check the whole concept against `base`, then write it atomically (nothing is written on error)."""
    check_concept_tensors(tensors, base, kind=concept.kind)
    library.save(concept, tensors, overwrite=overwrite)
    return concept


def import_lora(library: ConceptLibrary, file: str | Path, name: str, class_word: str, trigger: str, base,
                trigger_prompt: str | None = None, overwrite: bool = False) -> Concept:
    """Import a LoRA file as concept <name>, which then means exactly "<trigger> <class_word>".

    Args:
        library: the concept library to write into (atomically; untouched on any error).
        file: a `.safetensors` LoRA (or `.pt`/`.bin`, read tensors-only) in kohya, A1111, diffusers or peft naming.
        name: the concept's name; prompts write it as <name>.
        class_word: what the subject is ("dog"), as in the LoRA's trained prompt.
        trigger: the LoRA's trigger word(s) ("ohwx"); <name> stands for "trigger class_word".
        base: the loaded base model (SD1.x) the LoRA is for; the words' vectors are its own token embeddings.
        trigger_prompt: a prompt the LoRA was trained on, naming the subject as "trigger class_word"
            (default "photo of a <trigger> <class_word>"); gradient fusion encodes it for this concept.
        overwrite: replace a concept of the same name.
    Raises:
        UserError: a bad name, class word or trigger, a trigger prompt without "trigger class_word",
            and every file problem of `lora_concept_tensors`.
    """
    # 1. Check inputs that need no file
    name = _check_new_name(library, name, overwrite)
    class_word = check_class_word(class_word)
    trigger = check_trigger(trigger)
    trigger_prompt = " ".join((trigger_prompt or f"photo of a {trigger} {class_word}").split())
    trigger_prompt_to_concept(trigger_prompt, trigger, class_word, name)  # raises unless it names "trigger class"
    phrase = f"{trigger} {class_word}"
    words = len(phrase_ids(base.tokenizer, phrase))
    if words > len(WORD_LABELS):
        raise UserError(f"{phrase!r} is {words} CLIP tokens; a concept holds at most {len(WORD_LABELS)}: use a shorter trigger")

    # 2. The LoRA, converted and checked against the base
    tensors, naming = lora_concept_tensors(file, base)

    # 3. The words: the base's own embeddings of "trigger class", so <name> encodes as that phrase
    tensors["embeddings"] = phrase_embeddings(base, phrase)
    ranks = sorted({v.shape[0] for k, v in tensors.items() if k.endswith(".lora_A.weight")})
    concept = Concept(
        name=name, class_word=class_word, base_model=base.name, fingerprint=base.fingerprint, photo_count=0,
        settings={"source_file": Path(file).name, "ranks": ranks, "layers": sum(k.endswith(".lora_A.weight") for k in tensors)},
        is_test_model=base.is_test_model, kind="lora", word_count=words, trigger=trigger, trigger_prompt=trigger_prompt,
        source_format=naming,
    )
    return _save(library, concept, tensors, base, overwrite)


def mix_of_show_tensors(checkpoint, file_name: str) -> tuple[torch.Tensor, list[str], dict[str, torch.Tensor], dict[str, str]]:
    """(embeddings `[words, 16, d]`, Mix-of-Show's word names, LoRA tensors in concept naming, concept
    key -> the checkpoint's key) of a Mix-of-Show checkpoint.

    Token layout: `new_concept_embedding` maps each word ("<potter1>", "<potter2>", in the order of its
    `new_concept_token: <potter1>+<potter2>`, which is V_rand then V_class: prompts write them in that
    order) to `[16, d]`, row l being token `<new{16 k + l}>`, which its EDLoRA_AttnProcessor(l) reads in
    cross-attention layer l, counted down blocks, mid block, up blocks: Menagerie's layer order. So
    word k, layer l becomes embeddings[k, l]. A plain-LoRA run (`enable_edlora: false`) has `[1, d]`
    per word, the same token in every layer: repeated 16 times.
    """
    params = checkpoint.get("params", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(params, dict) or not {"new_concept_embedding", "text_encoder", "unet"} <= set(params):
        found = sorted(params)[:5] if isinstance(params, dict) else type(checkpoint).__name__
        raise UserError(f"{file_name} is not a Mix-of-Show ED-LoRA checkpoint (expected params with new_concept_embedding,"
                        f" text_encoder and unet; found {found})")
    words = params["new_concept_embedding"]
    if not isinstance(words, dict) or not words:
        raise UserError(f"{file_name} holds no concept embedding (new_concept_embedding is empty)")
    rows = []
    for word, value in words.items():
        if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.shape[0] not in (1, NUM_LAYERS):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise UserError(f"{file_name}: the embedding of {word!r} has shape {shape}; expected [16, d] (ED-LoRA) or [1, d]")
        rows.append(value.float().expand(NUM_LAYERS, -1))
    if len({r.shape[1] for r in rows}) != 1 or len(rows) > len(WORD_LABELS):
        raise UserError(f"{file_name}: its {len(rows)} concept words have embeddings of widths {sorted({r.shape[1] for r in rows})}")
    lora, sources = {}, {}
    for part in ("text_encoder", "unet"):
        if not isinstance(params[part], dict):
            raise UserError(f"{file_name}: its {part} entry is a {type(params[part]).__name__}, not a dict of LoRA tensors")
        for key, value in params[part].items():
            match = re.fullmatch(r"(.+)\.lora_(down|up)\.weight", key)
            if match is None or not isinstance(value, torch.Tensor):
                raise UserError(f"{file_name}: key {part}.{key} is not a Mix-of-Show LoRA factor (<layer>.lora_down/.lora_up.weight)")
            stem, factor = match.groups()
            concept_key = f"{part}.{stem}.lora_{'A' if factor == 'down' else 'B'}.weight"
            # Mix-of-Show adds alpha * up(down(x)), alpha = 1.0 and no / rank: B = alpha * up
            lora[concept_key] = (value.float() * (MIX_OF_SHOW_ALPHA if factor == "up" else 1.0)).contiguous()
            sources[concept_key] = f"{part}.{key}"
    # text-encoder layers without transformers 4's "text_model." level, as concept files name them
    return torch.stack(rows).contiguous(), list(words), canonical_keys(lora), canonical_keys(sources)


def import_mix_of_show(library: ConceptLibrary, file: str | Path, name: str, class_word: str, base,
                       overwrite: bool = False) -> Concept:
    """Import a Mix-of-Show ED-LoRA checkpoint (`.pth`, read with `torch.load(weights_only=True)`) as concept <name>.

    Its words become the concept's V_rand/V_class layer-wise tokens (`mix_of_show_tensors` says how),
    its LoRA the concept's, at scale 1.0 (Mix-of-Show samples one ED-LoRA at 0.7; Menagerie at 1.0).
    Raises UserError for a file that is no such checkpoint or does not fit `base`; the library is untouched.
    """
    name = _check_new_name(library, name, overwrite)
    class_word = check_class_word(class_word)
    file = Path(file).expanduser()
    checkpoint, _ = read_tensor_file(file)
    embeddings, words, lora, sources = mix_of_show_tensors(checkpoint, file.name)
    tensors = {"embeddings": embeddings, **fit_to_base(lora, sources, base)}
    # ED-LoRA's shape (two words, one rank, LoRA in both models) stays kind "edlora"; another run of
    # Mix-of-Show's trainer (one word, a text encoder left alone) loads as an imported LoRA does
    kind = "edlora"
    try:
        check_concept_tensors(tensors, kind="edlora")
    except UserError:
        kind = "lora"
    concept = Concept(
        name=name, class_word=class_word, base_model=base.name, fingerprint=base.fingerprint, photo_count=0,
        settings={"source_file": file.name, "mix_of_show_words": words, "lora_alpha": MIX_OF_SHOW_ALPHA},
        is_test_model=base.is_test_model, kind=kind, word_count=len(words), source_format="mix-of-show",
    )
    return _save(library, concept, tensors, base, overwrite)
