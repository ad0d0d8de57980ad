"""Custom Diffusion's multi-concept merge (Kumari et al., "Multi-Concept Customization of Text-to-Image
Diffusion", CVPR 2023, section 3.2, "constrained optimization to merge concepts"), in closed form as in
github.com/adobe-research/custom-diffusion src/composenW.py and src/diffusers_composenW.py (`gdupdateWexact`).

A Custom Diffusion concept n changes only the cross-attention K and V projections of the UNet, W0 -> W0 + dW_n,
and those read nothing but the text features. For each such layer the merge looks for one W that

    minimises  || C_reg W^T - C_reg W0^T ||_F        (regularization captions: keep what the base says)
    subject to C W^T = V                             (every concept's own K/V on its own target words)

C_reg `[s, in]` holds the text features of every token of the regularization captions; C = [C_1; ...; C_N] stacks
each concept's target features and V = [C_1 (W0 + dW_1)^T; ...; C_N (W0 + dW_N)^T] what its own layer makes of them.
With M = C_reg^T C_reg, the Lagrange conditions give (the paper's closed form, composenW's `gdupdateWexact`)

    W = W0 + (V^T - W0 C^T) (C M^-1 C^T)^-1 C M^-1 .

As in composenW: the solve is per layer, in float64 here; target rows whose features repeat exactly are dropped,
keeping the first with its value (two concepts with the same tokens); the regularization rows are all tokens
after start-of-text, end-of-text included; a target prompt contributes its rows from the concept's first token on
(diffusers_composenW cuts "photo of a" off the same way). CLIP's attention is causal, so the words before the
concept (and start-of-text) read the same for every concept; the base already answers for them, and constraining
them to concept n's K/V would fight the other concepts.

Where this departs from composenW:
- Captions: composenW reads 200 LAION captions (data/regularization_captions.txt). Offline we generate 200
  deterministic everyday captions from templates x subjects x scenes (`regularization_captions`), plus a few that
  name each concept's class word, so that "a dog" keeps meaning the base's dog after the merge.
- Ridge: composenW LU-factors M as it is. M is singular when the captions' features span fewer than `in`
  directions (the tiny test model: in = 32; a short caption list), so M + RIDGE * tr(M)/in * I is used: changes
  along directions no caption visits cost a little, not nothing. RIDGE = 1e-6 of M's mean eigenvalue: the cost
  of a direction the captions use with eigenvalue mu becomes mu + ridge, so one with mu >= 1e-4 of the mean is
  reweighted by at most 1%; the solution moves only where M alone has (almost) no answer.
- Least squares: composenW inverts C M^-1 C^T. Near-duplicate target rows make it ill-conditioned, and an exact
  inverse would amplify rounding in the features; its eigen-directions below RCOND of the largest are dropped
  (`fusion.gram_pinv`), so the constraints along them hold in the least-squares sense.
- Layer-wise tokens: our concept tokens have one vector per cross-attention layer (P+ / ED-LoRA layout), so
  layer l's targets come from copy l of each prompt (`layerwise.expand_prompt`). Custom Diffusion's modifier token
  is one vector, stored in all 16 layers, so its copies agree and this is composenW's setup.
"""

from __future__ import annotations

import torch

from .errors import UserError
from .fusion import _encode_unpadded, float64_device, fusion_prompts, fusion_report, gram_pinv, linear_of, relative_output_error
from .edlora import set_active_adapters
from .layerwise import concept_tokens, concept_words, concepts_in, cross_attention_layers, expand_prompt

METHOD = "custom-diffusion"
KV_LEAVES = ("to_k", "to_v")  # what Custom Diffusion trains (diffusers' --freeze_model crossattn_kv)
# Ridge added to M = C_reg^T C_reg, relative to its mean eigenvalue tr(M)/in (see the module docstring).
RIDGE = 1e-6
# Eigen-directions of C M^-1 C^T below RCOND * its largest are dropped: a numerical guard, not a modelling choice.
# Such a direction is a combination of target rows that nearly cancels (rows agreeing to ~1e-4 relative);
# solving it exactly would amplify the rounding of the features (float32 or float16 text encoder) by 1e8.
RCOND = 1e-8
CAPTION_BATCH = 64  # captions encoded per text-encoder call

# ---------------------------------------------------------------------------------------------
# Regularization captions (offline stand-in for composenW's LAION caption file)

CAPTION_TEMPLATES = (
    "a photo of {subject} {scene}",
    "{subject} {scene}",
    "a close-up photo of {subject} {scene}",
    "a blurry photo of {subject} {scene}",
    "a painting of {subject} {scene}",
    "{subject} {scene} at sunset",
    "a black and white photo of {subject} {scene}",
    "a wide shot of {subject} {scene}",
)
CAPTION_SUBJECTS = (
    "a red bicycle", "a cup of coffee", "an old man", "a young woman", "two children", "a wooden chair",
    "a bowl of fruit", "a yellow taxi", "a tall building", "a sailing boat", "a vintage car", "a stack of books",
    "a laptop", "a bunch of flowers", "a loaf of bread", "a pair of shoes", "a guitar", "a street lamp",
    "a mountain cabin", "a plate of pasta", "a group of friends", "a family", "a train", "an umbrella", "a teapot",
    "a clock tower", "a backpack", "a birthday cake", "a stone bridge", "a lighthouse", "a garden bench", "a horse",
    "a flock of birds", "a fishing boat", "a pizza", "a motorcycle", "a house plant", "a desk lamp", "a snowman",
    "a kite",
)
CAPTION_SCENES = (
    "on a beach", "in a kitchen", "on a city street", "in a park", "in the snow", "on a wooden table",
    "in a living room", "at night", "in the rain", "in a forest", "by a lake", "in an office", "on a mountain road",
    "in a market", "at the train station", "in a garden", "on a rooftop", "in a cafe", "in the desert", "on a farm",
    "under a bridge", "in a museum", "on the deck of a ship", "in a classroom", "at a wedding",
)
NUM_GENERIC_CAPTIONS = 200  # composenW reads the first 200 lines of its caption file
CAPTIONS_PER_CLASS_WORD = 20  # a tenth of the generic ones per class word


def regularization_captions(class_words: tuple[str, ...] | list[str] = ()) -> list[str]:
    """About 200 everyday captions, then CAPTIONS_PER_CLASS_WORD naming each class word ("a photo of a dog ...").

    Deterministic, with no duplicates: caption i pairs subject i mod 40 with scene (7 i + i // 40) mod 25, so the
    200 (subject, scene) pairs are distinct and every subject and scene appears, in a template chosen by i.
    """
    n_subjects, n_scenes = len(CAPTION_SUBJECTS), len(CAPTION_SCENES)
    captions = []
    for i in range(NUM_GENERIC_CAPTIONS):
        subject = CAPTION_SUBJECTS[i % n_subjects]
        scene = CAPTION_SCENES[(7 * i + i // n_subjects) % n_scenes]
        captions.append(CAPTION_TEMPLATES[i % len(CAPTION_TEMPLATES)].format(subject=subject, scene=scene))
    for word in dict.fromkeys(w.strip() for w in class_words if w.strip()):
        article = "an" if word[0].lower() in "aeiou" else "a"
        for i in range(CAPTIONS_PER_CLASS_WORD):
            scene = CAPTION_SCENES[(3 * i) % n_scenes]
            captions.append(CAPTION_TEMPLATES[i % len(CAPTION_TEMPLATES)].format(subject=f"{article} {word}", scene=scene))
    return list(dict.fromkeys(captions))


# ---------------------------------------------------------------------------------------------
# The math: pure functions of tensors


def unique_rows(c_targets: torch.Tensor, v_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Target rows with exactly repeated features dropped, the first kept with its value (as composenW does)."""
    seen, keep = set(), []
    for i, row in enumerate(c_targets.detach().cpu().numpy()):
        key = row.tobytes()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return c_targets[keep], v_targets[keep]


def constrained_merge(w0: torch.Tensor, c_reg: torch.Tensor, c_targets: torch.Tensor, v_targets: torch.Tensor,
                      ridge: float = RIDGE, rcond: float = RCOND) -> torch.Tensor:
    """Custom Diffusion's merged weight of one layer, float64 `[out, in]`:

        argmin_W ||C_reg W^T - C_reg W0^T||_F  s.t.  C W^T = V
        = W0 + (V^T - W0 C^T) (C M^-1 C^T)^+ C M^-1,   M = C_reg^T C_reg + ridge * tr/in * I.

    Args:
        w0: base weight `[out, in]`.
        c_reg: regularization features, one row per token `[s, in]`.
        c_targets: the concepts' target features `[n, in]`; exactly repeated rows are dropped (`unique_rows`).
        v_targets: what each target row must come out as, `[n, out]` (C_n (W0 + dW_n)^T for concept n's rows).
        ridge: added to M as `ridge` times its mean eigenvalue (default RIDGE = 1e-6); 0 is composenW's exact
            solve and needs a non-singular M (captions spanning all `in` directions).
        rcond: eigen-directions of C M^-1 C^T below `rcond` times its largest are dropped (default RCOND = 1e-8);
            constraints along them hold in the least-squares sense. 0 keeps all.
    Raises:
        UserError: shapes that do not fit each other, a bad ridge or rcond, or M singular with ridge 0.
    """
    check_merge_inputs(w0, c_reg, c_targets, v_targets, ridge, rcond)
    w0, c_reg, c, v = (t.double() for t in (w0, c_reg, c_targets, v_targets))
    c, v = unique_rows(c, v)
    dim = w0.shape[1]
    m = c_reg.T @ c_reg  # [in, in]
    m = m + ridge * (torch.trace(m) / dim) * torch.eye(dim, dtype=m.dtype, device=m.device)
    factor, info = torch.linalg.cholesky_ex(m)
    if int(info) != 0:
        raise UserError(f"the regularization captions' features span fewer than all {dim} directions of this layer's"
                        f" input, so the merge has no unique answer with ridge={ridge}; use ridge > 0 (default {RIDGE})"
                        f" or more captions")
    m_inv_ct = torch.cholesky_solve(c.T, factor)  # M^-1 C^T [in, n]
    s = c @ m_inv_ct  # C M^-1 C^T [n, n]
    residual = v.T - w0 @ c.T  # V^T - W0 C^T [out, n]
    return w0 + residual @ gram_pinv(s, rcond) @ m_inv_ct.T


def check_merge_inputs(w0: torch.Tensor, c_reg: torch.Tensor, c_targets: torch.Tensor, v_targets: torch.Tensor,
                       ridge: float, rcond: float) -> None:
    """Shapes of `constrained_merge`'s arguments against each other; UserError naming the one that does not fit."""
    if w0.ndim != 2:
        raise UserError(f"w0 must be a [out, in] weight; it has shape {tuple(w0.shape)}")
    out_features, in_features = w0.shape
    if c_reg.ndim != 2 or c_reg.shape[1] != in_features or c_reg.shape[0] == 0:
        raise UserError(f"c_reg has shape {tuple(c_reg.shape)}; the layer's weight {tuple(w0.shape)}"
                        f" needs [s, {in_features}], s >= 1")
    if c_targets.ndim != 2 or c_targets.shape[1] != in_features or c_targets.shape[0] == 0:
        raise UserError(f"c_targets has shape {tuple(c_targets.shape)}; the layer's weight {tuple(w0.shape)}"
                        f" needs [n, {in_features}], n >= 1")
    if tuple(v_targets.shape) != (c_targets.shape[0], out_features):
        raise UserError(f"v_targets has shape {tuple(v_targets.shape)}; {c_targets.shape[0]} target rows of a layer with"
                        f" {out_features} outputs need {(c_targets.shape[0], out_features)}")
    if not ridge >= 0:
        raise UserError(f"ridge={ridge} must be >= 0 (default {RIDGE})")
    if not 0 <= rcond < 1:
        raise UserError(f"rcond={rcond} must be in [0, 1) (default {RCOND})")


def relative_change(w: torch.Tensor, w0: torch.Tensor, features: torch.Tensor) -> float:
    """||X W^T - X W0^T|| / ||X W0^T||: how far a layer's outputs on the rows of X moved from the base's."""
    features = features.double()
    return float((features @ (w.double() - w0.double()).T).norm() / (features @ w0.double().T).norm().clamp(min=1e-300))


# ---------------------------------------------------------------------------------------------
# Glue: text features, concepts' deltas


def caption_features(base, captions: list[str]) -> torch.Tensor:
    """Text-encoder outputs of every token of `captions` after start-of-text, end-of-text included, `[s, d]`.

    Captions are batched and padded; CLIP's causal mask means no padding reaches the rows kept. A caption names no
    concept, so its 16 layer-wise copies are one text: the rows serve every cross-attention layer.
    """
    limit = base.text_encoder.config.max_position_embeddings
    eos = base.tokenizer.eos_token_id
    rows = []
    for start in range(0, len(captions), CAPTION_BATCH):
        batch = captions[start : start + CAPTION_BATCH]
        ids = base.tokenizer(batch, padding=True, truncation=True, max_length=limit, return_tensors="pt").input_ids
        hidden = base.text_encoder(ids.to(base.device))[0]  # [B, T, d]
        ends = (ids == eos).int().argmax(dim=1)  # the first end-of-text (CLIP pads with it too)
        rows += [hidden[i, 1 : int(end) + 1] for i, end in enumerate(ends)]
    return torch.cat(rows).double().cpu()


def target_features(base, name: str, prompt: str, layers: int) -> list[torch.Tensor]:
    """Concept `name`'s target rows of `prompt` for each cross-attention layer: copy l's text-encoder outputs from
    the concept's first token to end-of-text, `[rows, d]` per layer (composenW's "a photo of" cut, generalised)."""
    words = concept_words(base.text_encoder)
    texts = [expand_prompt(prompt, layer, words) for layer in range(layers)]
    ids, hidden = _encode_unpadded(base, texts)  # [L, T], [L, T, d]
    own = set(base.tokenizer.convert_tokens_to_ids(concept_tokens(name, words[name])))
    first = next((i for i, token in enumerate(ids[0].tolist()) if token in own), None)
    if first is None:
        raise UserError(f"target prompt {prompt!r} of concept <{name}> does not name <{name}>")
    return [hidden[layer, first:].double().cpu() for layer in range(layers)]


def kv_deltas(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module name -> dense update dW `[out, in]` float64 of a Custom Diffusion concept's `unet.<module>.delta` keys."""
    deltas = {key[len("unet.") : -len(".delta")]: value.double() for key, value in tensors.items()
              if key.startswith("unet.") and key.endswith(".delta")}
    if not deltas:
        raise UserError(f"concept <{name}> has no unet.<layer>.delta tensors; the Custom Diffusion merge takes"
                        f" Custom Diffusion concepts (cross-attention K/V updates)")
    return deltas


def kv_layer_index(base, names: list[str], deltas: list[dict[str, torch.Tensor]]) -> dict[str, int]:
    """Every module any concept updates -> its cross-attention layer's index (the layer-wise copy it reads),
    checking that it is a to_k/to_v of this UNet's cross-attention and that each delta fits its weight."""
    order = {parent: layer for layer, (parent, _) in enumerate(cross_attention_layers(base.unet))}
    index = {}
    for name, concept in zip(names, deltas):
        for module, delta in concept.items():
            parent, _, leaf = module.rpartition(".")
            if parent not in order or leaf not in KV_LEAVES:
                raise UserError(f"concept <{name}> updates unet.{module}; the Custom Diffusion merge takes only the"
                                f" cross-attention to_k/to_v layers of this UNet (…attn2.to_k, …attn2.to_v)")
            shape = tuple(linear_of(base.unet, module).weight.shape)
            if tuple(delta.shape) != shape:
                raise UserError(f"concept <{name}>'s unet.{module}.delta has shape {tuple(delta.shape)};"
                                f" this base's layer needs {shape}")
            index[module] = order[parent]
    return dict(sorted(index.items()))


def check_concepts(base, names: list[str], tensors: list[dict[str, torch.Tensor]], prompts: dict[str, list[str]],
                   captions: list[str]) -> None:
    """Everything `merge_custom_diffusion` needs, checked before any text is encoded."""
    if not names:
        raise UserError("no concepts to merge; name at least one Custom Diffusion concept")
    if len(set(names)) != len(names):
        raise UserError(f"a concept is named twice in {', '.join(names)}")
    if len(tensors) != len(names):
        raise UserError(f"{len(names)} concept names but {len(tensors)} tensor sets; give one per concept")
    if getattr(base, "fused", None) is not None:
        raise UserError(f"this base model already holds the fused model {base.fused}; load the base again before merging")
    loaded = concept_words(base.text_encoder)
    for name in names:
        if name not in loaded:
            raise UserError(f"concept <{name}> is not loaded into this base; load it with edlora.apply_concept first")
        if not prompts.get(name):
            raise UserError(f"concept <{name}> has no target prompts")
        for prompt in prompts[name]:
            if name not in concepts_in(prompt):
                raise UserError(f"target prompt {prompt!r} of concept <{name}> does not name <{name}>")
    if not captions:
        raise UserError("no regularization captions; use regularization_captions() or give at least one")
    named = [c for c in captions if concepts_in(c)]
    if named:
        raise UserError(f"regularization caption {named[0]!r} names a concept; captions must be plain text")


# ---------------------------------------------------------------------------------------------
# Entry point


def merge_custom_diffusion(base, names: list[str], tensors: list[dict[str, torch.Tensor]],
                           prompts: dict[str, list[str]] | None = None, captions: list[str] | None = None,
                           ridge: float = RIDGE, rcond: float = RCOND) -> tuple[dict[str, torch.Tensor], dict]:
    """Merge Custom Diffusion concepts already loaded into `base` (tokens; `edlora.apply_concept`) into one set of
    cross-attention K/V weights, composenW's closed form per layer.

    Args:
        base: the base model, not fused; its own K/V weights are W0. Text-encoder adapters are switched off
            (Custom Diffusion's text encoder is frozen) and stay off.
        names: the concepts, in the order they are reported; `tensors[i]` holds names[i]'s file tensors with its
            `unet.<module>.delta` K/V updates `[out, in]`. A concept without a delta on a layer another one
            updates wants W0 there (dW = 0).
        prompts: name -> target prompts naming `<name>`; a name left out (default: all) gets
            `fusion.fusion_prompts(name)` ("photo of a <name>", "<name>"), composenW's "photo of a <new1> cat"
            and "<new1> cat" (a Custom Diffusion concept's two words are the modifier and the class word).
        captions: regularization captions; default `regularization_captions()` (no class words: pass
            `regularization_captions(class_words)` to keep the class words' own meaning too).
        ridge, rcond: see `constrained_merge`.
    Returns:
        (updates, report): updates {"unet.<module>": W - W0, float32 on the CPU}, ready for `fusion._save_fused`;
        report in `fusion.fusion_report`'s shape (method "custom-diffusion": per layer and concept the relative
        output error on the concept's target rows, beside weight averaging's) plus, per layer,
        "regularization_change" (relative change of the outputs on the caption rows), the same for the plain
        sum of the deltas, the target rows kept and the exact duplicates dropped.
    Raises:
        UserError: no concepts, a concept not loaded or without K/V deltas, a delta on another layer or of
            another shape, a prompt not naming its concept, no captions, bad ridge/rcond.
    """
    # 1. Check inputs
    prompts = {name: list((prompts or {}).get(name) or fusion_prompts(name)) for name in names}
    captions = list(regularization_captions() if captions is None else captions)
    check_concepts(base, names, tensors, prompts, captions)
    if not ridge >= 0 or not 0 <= rcond < 1:
        raise UserError(f"ridge={ridge} must be >= 0 and rcond={rcond} in [0, 1) (defaults {RIDGE}, {RCOND})")
    deltas = [kv_deltas(name, t) for name, t in zip(names, tensors)]
    layer_of = kv_layer_index(base, names, deltas)
    layers = len(cross_attention_layers(base.unet))
    device = float64_device(base.device)

    # 2. Text features: the captions' (shared by all layers), each concept's per layer
    set_active_adapters(base.text_encoder, [])
    with torch.no_grad():
        c_reg = caption_features(base, captions).to(device)
        targets = []  # per concept: per layer [rows, d]
        for name in names:
            per_prompt = [target_features(base, name, prompt, layers) for prompt in prompts[name]]
            targets.append([torch.cat([p[layer] for p in per_prompt]).to(device) for layer in range(layers)])

    # 3. Solve each K/V layer
    updates, errors, extras = {}, {}, {}
    for module, layer in layer_of.items():
        w0 = linear_of(base.unet, module).weight.detach().to(device, torch.float64)
        layer_deltas = [d[module].to(device) if module in d else torch.zeros_like(w0) for d in deltas]
        c_n = [t[layer] for t in targets]
        v_n = [c @ (w0 + d).T for c, d in zip(c_n, layer_deltas)]
        c_all, v_all = torch.cat(c_n), torch.cat(v_n)
        w = constrained_merge(w0, c_reg, c_all, v_all, ridge, rcond)
        average = w0 + sum(layer_deltas) / len(layer_deltas)
        kept = unique_rows(c_all, v_all)[0].shape[0]
        key = f"unet.{module}"
        updates[key] = (w - w0).float().cpu().contiguous()
        errors[key] = {
            "method": [relative_output_error(w, w0 + d, c.T @ c) for d, c in zip(layer_deltas, c_n)],
            "weight": [relative_output_error(average, w0 + d, c.T @ c) for d, c in zip(layer_deltas, c_n)],
        }
        extras[key] = {
            "regularization_change": relative_change(w, w0, c_reg),
            "sum_of_deltas_regularization_change": relative_change(w0 + sum(layer_deltas), w0, c_reg),
            "target_rows": kept, "duplicate_rows": c_all.shape[0] - kept,
        }

    # 4. Report: fusion's shape, plus the regularization side
    report = fusion_report(errors, names, METHOD)
    for key, row in extras.items():
        report["layers"][key].update(row)
    changes = [row["regularization_change"] for row in extras.values()]
    summed = [row["sum_of_deltas_regularization_change"] for row in extras.values()]
    report["regularization"] = {
        "captions": len(captions), "rows": c_reg.shape[0], "ridge": ridge, "rcond": rcond,
        "mean_relative_change": sum(changes) / len(changes), "max_relative_change": max(changes),
        "sum_of_deltas_mean_relative_change": sum(summed) / len(summed),
    }
    return updates, report
