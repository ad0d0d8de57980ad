"""Keeping subjects apart: one subject per box (see shared/research/layout_control.md).

The failure this module fights: two boxes, one merged animal. Self-attention lets one body grow
across both boxes, and personalised concepts pull every picture toward one big animal. The tools,
each a small pure function or processor over the user's boxes:

- **Bounded self-attention** (Dahary et al., "Be Yourself: Bounded Attention for Multi-Subject
  T2I Generation", ECCV 2024, `_convert_boxes_to_masks` and the self-attention mask of its
  `forward`): a query inside subject i's box never sees keys inside another subject's box; the
  background sees everything; a pixel in two boxes belongs to both. An additive 0/-inf mask on
  every `attn1`, in both halves of classifier-free guidance.
- **Bootstrapping** (Bar-Tal et al., MultiDiffusion, ICML 2023, region-based `bootstrapping`):
  during the first steps each box is denoised in its own branch with its own prompt, with the
  latent outside the box replaced by a noised constant-colour latent, so the box starts with a
  subject of its own; optionally the branch is shifted so the box sits in the middle of the canvas
  (StreamMultiDiffusion's mask-centring), where the model likes to draw a lone subject.
- **Bounded cross-attention** (Bounded Attention's cross mask, over one shared prompt): a pixel
  in subject i's box does not read the other subjects' words, so "a dog and a cat" puts each
  class in its own box (isolated sampling's layout; measured in docs/toyworld.md).
- **Matching detections to boxes** (our Isolated Diffusion with boxes): an optimal assignment on
  box IoU among detections of the box's class word (never by the word alone: two dogs must work),
  a detection spanning two boxes counts as merged, and it can be split by the boxes.

Boxes are pixel boxes (x0, y0, x1, y1) as in `regional.Region`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .errors import UserError
from .layerwise import attention_with_bias
from .regional import box_mask, unet_grids

Box = tuple[int, int, int, int]

# A detection spans two boxes when at least this share of its mask lies in each (the same rule
# the toy-world oracle uses for "merged").
SPAN_SHARE = 0.2
# A detection is accepted for a box when their IoU reaches this, or when its centre lies in the box
# (a user's box is often much larger than the animal drawn in it, so IoU alone rejects good matches).
MIN_IOU = 0.3


@dataclass(frozen=True)
class LayoutControl:
    """How sampling keeps subjects apart; every setting is a share of the denoising steps, from the start.

    All zero is Mix-of-Show's regional sampler exactly as before. Measured defaults are in
    `DEFAULT_LAYOUT` (docs/toyworld.md has the table they come from).
    """

    self_attention: float = 0.0  # steps with bounded self-attention masks between subjects' boxes
    bootstrap: float = 0.0  # steps with each box denoised in its own bootstrapped branch
    centre: bool = True  # bootstrapped branches are shifted so the box sits in the middle of the canvas
    guidance: float = 0.0  # steps that first move the latent along Bounded Attention's loss (costly)
    guidance_iterations: int = 5  # gradient steps per guided step (Bounded Attention: up to 5)

    def steps(self, total: int) -> dict[str, int]:
        """Each share as a number of steps of a `total`-step schedule (rounded, at least 1 if on)."""
        def count(share: float) -> int:
            return 0 if share <= 0 else max(1, min(total, round(share * total)))
        return {"self_attention": count(self.self_attention), "bootstrap": count(self.bootstrap),
                "guidance": count(self.guidance)}

    def is_off(self) -> bool:
        return self.self_attention <= 0 and self.bootstrap <= 0 and self.guidance <= 0

    def to_json(self) -> dict:
        return asdict(self)


NO_LAYOUT = LayoutControl()
# What the studio and the command line use unless told otherwise (measured in docs/toyworld.md).
DEFAULT_LAYOUT = LayoutControl(self_attention=1.0)


def check_layout_control(control: LayoutControl) -> None:
    for name in ("self_attention", "bootstrap", "guidance"):
        value = getattr(control, name)
        if not 0 <= value <= 1:
            raise UserError(f"layout setting {name.replace('_', '-')} {value} must be a share of the steps between 0 and 1")
    if not 1 <= control.guidance_iterations <= 20:
        raise UserError(f"guidance iterations {control.guidance_iterations} must be between 1 and 20 (Bounded Attention uses 5)")


def parse_box(text: str) -> Box:
    """'x0,y0,x1,y1' (pixels) -> a box; the canvas check comes later, with the image size."""
    try:
        box = tuple(int(round(float(v))) for v in text.split(","))
    except (ValueError, OverflowError):
        raise UserError(f"--box {text!r} must be four numbers x0,y0,x1,y1 in pixels") from None
    if len(box) != 4:
        raise UserError(f"--box {text!r} must be four numbers x0,y0,x1,y1 in pixels")
    return box


# ---------------------------------------------------------------------------------------------
# Bounded self-attention


def subject_token_masks(boxes: list[Box], width: int, height: int, latent_h: int, latent_w: int) -> dict[int, torch.Tensor]:
    """Token count of each UNet level -> `[S, tokens]` bool: which tokens lie in each subject's box."""
    masks = {}
    for grid_h, grid_w in unet_grids(latent_h, latent_w):
        masks[grid_h * grid_w] = torch.stack([box_mask(box, width, height, grid_w, grid_h).flatten() for box in boxes])
    return masks


def bounded_self_attention_bias(subject_masks: torch.Tensor) -> torch.Tensor:
    """`[S, N]` bool subject masks -> `[N, N]` additive bias: -inf where query q may not see key k.

    Blocked: q and k both lie in subjects' boxes and share none (Bounded Attention's self mask).
    The background (no box) sees and is seen by everything, so no row is ever fully blocked.
    """
    masks = subject_masks.float()
    share = (masks.T @ masks) > 0  # [N, N]: q and k lie in a common box
    in_subject = subject_masks.any(0)  # [N]
    blocked = in_subject[:, None] & in_subject[None, :] & ~share
    bias = torch.zeros(blocked.shape)
    bias[blocked] = float("-inf")
    return bias


def self_attention_biases(boxes: list[Box], width: int, height: int, latent_h: int, latent_w: int,
                          device=None, dtype=torch.float32) -> dict[int, torch.Tensor]:
    """{tokens: `[N, N]` bias} for every UNet level, ready for `BoundedSelfAttnProcessor`."""
    return {tokens: bounded_self_attention_bias(masks).to(device, dtype)
            for tokens, masks in subject_token_masks(boxes, width, height, latent_h, latent_w).items()}


class BoundedSelfAttnProcessor:
    """Self-attention (attn1) with an optional additive mask per token count, else plain SDPA.

    Call-time input through `cross_attention_kwargs`: `self_attention_bias` {tokens: [N, N]}
    (from `self_attention_biases`), or None to run exactly as `AttnProcessor2_0`.
    The other keyword arguments belong to the cross-attention processors and are ignored here.
    """

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.plain = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 region_context=None, region_masks=None, region_kv=None, self_attention_bias=None,
                 cross_attention_bias=None):
        bias = None if self_attention_bias is None else self_attention_bias.get(hidden_states.shape[1])
        if bias is None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return attention_with_bias(attn, hidden_states, hidden_states, bias)


def bounded_cross_attention_bias(subject_masks: torch.Tensor, subject_words: list[list[int]], length: int,
                                  block_background: bool = True) -> torch.Tensor:
    """`[S, N]` bool subject masks and each subject's word positions -> `[N, length]` additive bias.

    Bounded Attention's cross mask, over one shared prompt: a query inside subject i's box may not
    see the words of any other subject (a word that is also i's stays visible), so "a dog and a cat"
    puts the dog in the dog's box and the cat in the cat's; with `block_background` a query outside
    every box sees no subject word, so no extra animal grows between the boxes. Every other token
    (start of text, fillers, padding) stays visible, so no row is ever fully blocked.
    """
    subjects, tokens = subject_masks.shape
    words = torch.zeros(subjects, length, dtype=torch.bool)
    for i, positions in enumerate(subject_words):
        words[i, [p for p in positions if p < length]] = True
    own = (subject_masks.float().T @ words.float()) > 0  # [N, L]: word belongs to a subject whose box holds q
    any_word = words.any(0)  # [L]
    in_subject = subject_masks.any(0)  # [N]
    blocked = any_word[None, :] & ~own
    if not block_background:
        blocked &= in_subject[:, None]
    bias = torch.zeros(tokens, length)
    bias[blocked] = float("-inf")
    return bias


def cross_attention_biases(boxes: list[Box], subject_words: list[list[int]], length: int, width: int, height: int,
                           latent_h: int, latent_w: int, device=None, dtype=torch.float32,
                           block_background: bool = True) -> dict[int, torch.Tensor]:
    """{tokens: `[2, 1, N, length]` bias} for every UNet level, for a guidance batch of one image
    (isolated sampling's layout): the unconditional half (first, as `sample.denoise` orders it) is
    left unbounded."""
    out = {}
    for tokens, masks in subject_token_masks(boxes, width, height, latent_h, latent_w).items():
        bias = bounded_cross_attention_bias(masks, subject_words, length, block_background)
        out[tokens] = torch.stack([torch.zeros_like(bias), bias])[:, None].to(device, dtype)
    return out


# Plurals that no suffix rule makes; `noun_forms` adds the regular ones.
IRREGULAR_PLURALS = {"mouse": "mice", "goose": "geese", "ox": "oxen", "louse": "lice", "child": "children", "person": "people",
                     "man": "men", "woman": "women", "foot": "feet", "tooth": "teeth", "sheep": "sheep", "deer": "deer",
                     "fish": "fish", "moose": "moose", "bison": "bison"}


def noun_forms(word: str) -> set[str]:
    """`word` lower-cased with its simple English singular and plural forms, so a label and the
    prompt's mention of it match: cat/cats, puppy/puppies, fox/foxes, wolf/wolves, mouse/mice.

    A plural label gives its singular too ("cats" finds "a cat"). The rules over-generate a little
    (a singular is guessed by every rule that fits, "bus" -> "bu"), which is harmless: the forms are
    only compared with the prompt's words.
    """
    word = word.lower()
    singulars = {word} | {s for s, plural in IRREGULAR_PLURALS.items() if plural == word}
    if word.endswith("ies") and len(word) > 4:
        singulars.add(word[:-3] + "y")
    if word.endswith("ves") and len(word) > 4:
        singulars |= {word[:-3] + "f", word[:-3] + "fe"}
    if word.endswith(("ses", "xes", "zes", "ches", "shes", "oes")):
        singulars.add(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        singulars.add(word[:-1])
    forms = set(singulars)
    for singular in singulars:
        forms.add(IRREGULAR_PLURALS.get(singular, singular))
        if singular.endswith(("s", "x", "z", "ch", "sh", "o")):
            forms.add(singular + "es")
        if singular.endswith("y") and len(singular) > 1 and singular[-2] not in "aeiou":
            forms.add(singular[:-1] + "ies")
        elif singular.endswith("fe"):
            forms.add(singular[:-2] + "ves")
        elif singular.endswith("f"):
            forms.add(singular[:-1] + "ves")
        if not singular.endswith(("s", "x", "z", "ch", "sh")):
            forms.add(singular + "s")
    return forms


def prompt_words(tokenizer, text: str, special: bool = True) -> list[tuple[str, list[int]]]:
    """The words of `text` as CLIP tokenizes it: (word, its token positions). A word ends at a token
    marked '</w>' ("dachshunds" is dach + shun + ds</w>); a special or added token (start or end of
    text, a concept's token) is a word of its own."""
    ids = tokenizer(text, add_special_tokens=special, truncation=True).input_ids
    alone = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    words, pieces, positions = [], [], []
    for position, token in enumerate(tokenizer.convert_ids_to_tokens(ids)):
        if token in alone and pieces:
            words.append(("".join(pieces), positions))
            pieces, positions = [], []
        pieces.append(token if token in alone else token.removesuffix("</w>"))
        positions.append(position)
        if token in alone or token.endswith("</w>"):
            words.append(("".join(pieces), positions))
            pieces, positions = [], []
    if pieces:
        words.append(("".join(pieces), positions))
    return words


def label_word_positions(tokenizer, prompt: str, labels: list[str]) -> list[list[int]]:
    """Token positions of each subject's label word in `prompt`, the k-th subject of a label taking
    the k-th mention of it ("a dog and a dog": the first dog is box 0's).

    A mention is a word of the prompt in any of the label's simple forms (`noun_forms`: "cats",
    "puppies", "foxes" for cat, puppy, fox), all its tokens; a label of several words is found by its
    last word. A label mentioned fewer times than it has subjects ("two cats" for two cat boxes) is
    shared by all of them: a plural names the group, not one member, so each of those boxes reads
    every mention, and the bound then keeps only the other labels' words out of them."""
    words = prompt_words(tokenizer, prompt)
    mentions = {}
    for label in set(labels):
        label_words = prompt_words(tokenizer, label, special=False)
        forms = noun_forms(label_words[-1][0]) if label_words else set()
        mentions[label] = [positions for word, positions in words if word in forms]
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        k = seen.get(label, 0)
        seen[label] = k + 1
        found = mentions[label]
        out.append(list(found[k]) if labels.count(label) <= len(found) else [p for positions in found for p in positions])
    return out


def install_bounded_self_attention(unet: torch.nn.Module) -> None:
    """BoundedSelfAttnProcessor on every self-attention layer (it is plain SDPA until given a bias)."""
    for name, module in unet.named_modules():
        if name.endswith("attn1"):
            module.set_processor(BoundedSelfAttnProcessor())


# ---------------------------------------------------------------------------------------------
# Bootstrapping (MultiDiffusion)


def centring_shift(box: Box, width: int, height: int, latent_h: int, latent_w: int) -> tuple[int, int]:
    """Latent rows and columns to roll by so that the box's centre lands on the canvas centre."""
    factor_h, factor_w = height / latent_h, width / latent_w
    centre_y = (box[1] + box[3]) / 2 / factor_h
    centre_x = (box[0] + box[2]) / 2 / factor_w
    return int(round(latent_h / 2 - centre_y)), int(round(latent_w / 2 - centre_x))


def bootstrap_latent(latent: torch.Tensor, mask: torch.Tensor, noised_background: torch.Tensor) -> torch.Tensor:
    """MultiDiffusion's bootstrap: the latent inside the box, a noised plain latent outside.

    latent, noised_background: [B, C, h, w]; mask: [1, 1, h, w] of 0/1.
    """
    return latent * mask + noised_background * (1 - mask)


def mix_box_predictions(eps: torch.Tensor, eps_boxes: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """Inside each box its own branch's prediction (the mean where boxes overlap), elsewhere `eps`."""
    summed = torch.zeros_like(eps)
    cover = torch.zeros_like(eps[:, :1])
    for eps_box, mask in zip(eps_boxes, masks):
        summed = summed + eps_box * mask
        cover = cover + mask
    return torch.where(cover > 0, summed / cover.clamp(min=1), eps)


# ---------------------------------------------------------------------------------------------
# Matching detections to boxes (Isolated Diffusion with boxes)


def box_iou(a: Box | tuple[float, ...], b: Box | tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def centre_inside(detection_box, box: Box) -> bool:
    cx, cy = (detection_box[0] + detection_box[2]) / 2, (detection_box[1] + detection_box[3]) / 2
    return box[0] <= cx < box[2] and box[1] <= cy < box[3]


def match_detections_to_boxes(detection_boxes: list, detection_labels: list[str], boxes: list[Box],
                              box_labels: list[str], min_iou: float = MIN_IOU) -> list[int | None]:
    """For each box, the index of its detection or None: an optimal assignment on IoU.

    A detection may go to a box only if it carries the box's class word and either their IoU
    reaches `min_iou` or its centre lies in the box. Among those, the assignment maximises the
    total IoU (Hungarian, `scipy.optimize.linear_sum_assignment`), so two dogs go to the two dog
    boxes by where they are, not by which scored higher.
    """
    from scipy.optimize import linear_sum_assignment

    if not boxes or not detection_boxes:
        return [None] * len(boxes)
    forbidden = 1e6
    cost = np.full((len(boxes), len(detection_boxes)), forbidden)
    for i, (box, label) in enumerate(zip(boxes, box_labels)):
        for j, (found, found_label) in enumerate(zip(detection_boxes, detection_labels)):
            iou = box_iou(box, found)
            if found_label == label and (iou >= min_iou or centre_inside(found, box)):
                cost[i, j] = 1.0 - iou
    rows, cols = linear_sum_assignment(cost)
    matched: list[int | None] = [None] * len(boxes)
    for i, j in zip(rows, cols):
        if cost[i, j] < forbidden:
            matched[i] = int(j)
    return matched


def boxes_spanned(mask: np.ndarray, boxes: list[Box], share: float = SPAN_SHARE) -> list[int]:
    """Indices of the boxes holding at least `share` of the mask's pixels (two or more: merged)."""
    total = mask.sum()
    if total == 0:
        return []
    return [i for i, (x0, y0, x1, y1) in enumerate(boxes) if mask[y0:y1, x0:x1].sum() >= share * total]


def split_mask_by_boxes(mask: np.ndarray, boxes: list[Box]) -> list[np.ndarray]:
    """One part of `mask` per box: the mask's pixels inside that box, overlaps to the nearer box centre.

    Pixels of the mask outside every box are dropped (they belong to no subject).
    """
    height, width = mask.shape
    ys, xs = np.mgrid[0:height, 0:width]
    distance = np.stack([((xs + 0.5 - (b[0] + b[2]) / 2) ** 2 + (ys + 0.5 - (b[1] + b[3]) / 2) ** 2) for b in boxes])
    inside = np.stack([box_pixels(b, width, height) for b in boxes])
    distance[~inside] = np.inf
    owner = distance.argmin(0)
    covered = inside.any(0)
    return [mask & covered & (owner == i) for i in range(len(boxes))]


def box_pixels(box: Box, width: int, height: int) -> np.ndarray:
    """A pixel box as a bool `[height, width]` mask."""
    mask = np.zeros((height, width), dtype=bool)
    x0, y0, x1, y1 = box
    mask[max(0, y0):min(height, y1), max(0, x0):min(width, x1)] = True
    return mask


class BoxBootstrap:
    """MultiDiffusion's bootstrapping for the first steps of regional sampling, one branch per box.

    At each of its steps, box i's branch sees the current latent inside box i and, outside it, the
    latent of a plain colour noised to the current time with the initial noise (`bootstrap_latent`);
    with `centre`, the branch is rolled so the box sits in the middle of the canvas. All branches
    run in one UNet call with their own prompts (`contexts`, CFG order [negative x n, prompt x n])
    and no regions, and inside box i the branch's prediction replaces the main one.
    """

    def __init__(self, unet, boxes: list[Box], contexts: torch.Tensor, plain_latents: torch.Tensor,
                 initial_noise: torch.Tensor, width: int, height: int, centre: bool, guidance: float):
        latent_h, latent_w = initial_noise.shape[-2:]
        self.unet = unet
        self.contexts = contexts  # [R, 2n, L, d]
        self.plain_latents = plain_latents  # [R, 1, C, h, w]: VAE latents of plain colours
        self.initial_noise = initial_noise  # [n, C, h, w]
        self.masks = [box_mask(box, width, height, latent_w, latent_h).float()[None, None].to(initial_noise.device)
                      for box in boxes]
        self.shifts = [centring_shift(box, width, height, latent_h, latent_w) if centre else (0, 0) for box in boxes]
        self.guidance = guidance

    def predict(self, scheduler, t, latents: torch.Tensor, eps: torch.Tensor, dtype) -> torch.Tensor:
        """The guided prediction `eps` with each box's own branch prediction inside the box."""
        count = latents.shape[0]
        branch_inputs = []
        for mask, plain, shift in zip(self.masks, self.plain_latents, self.shifts):
            noised = scheduler.add_noise(plain.expand_as(latents), self.initial_noise, t.reshape(1))
            branch = torch.roll(bootstrap_latent(latents, mask, noised), shift, dims=(2, 3))
            branch_inputs.append(torch.cat([branch, branch]))  # CFG halves
        model_input = scheduler.scale_model_input(torch.cat(branch_inputs), t)
        context = self.contexts.flatten(0, 1)  # [R * 2n, L, d], same row order as model_input
        out = self.unet(model_input.to(dtype), t, encoder_hidden_states=context.to(dtype)).sample.float()
        eps_boxes = []
        for r, shift in enumerate(self.shifts):
            uncond, cond = out[2 * count * r: 2 * count * (r + 1)].chunk(2)
            guided = uncond + self.guidance * (cond - uncond)
            eps_boxes.append(torch.roll(guided, (-shift[0], -shift[1]), dims=(2, 3)))
        return mix_box_predictions(eps, eps_boxes, self.masks)


def plain_colour_latents(vae, count: int, width: int, height: int, seed: int, dtype) -> torch.Tensor:
    """`[count, 1, C, h, w]`: VAE latents of random plain-colour images (MultiDiffusion's bootstrap)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    colours = torch.rand(count, 3, 1, 1, generator=generator) * 2 - 1
    pixels = colours.expand(count, 3, height, width).to(vae.device, dtype)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean.float() * vae.config.scaling_factor
    return latents[:, None]


# ---------------------------------------------------------------------------------------------
# Bounded guidance (Bounded Attention's loss on the early steps)

GUIDANCE_STEP_SIZES = (8.0, 2.0)  # Bounded Attention's step size for SD, falling linearly over the guided steps
GUIDANCE_STOP = 0.2  # stop a step's iterations once the loss per image and subject falls below this
CROSS_WEIGHT, SELF_WEIGHT = 1.5, 0.5  # its loss: 1.5 cross + 0.5 self
FILLER_WORDS = {"a", "an", "the", "and", "of", "in", "on", "at", "with", "to", "photo", ",", "."}


def box_term(mass: torch.Tensor, inside: torch.Tensor, subjects: int) -> torch.Tensor:
    """(1 - fg / (fg + S bg))^2 per image: `mass` [n, N] over queries, `inside` [N] bool (the box).

    Bounded Attention counts as bg only the background; here bg is every query outside the box,
    other boxes included, because our failure is one body across two boxes (a deliberate change).
    """
    fg = (mass * inside).sum(-1)
    bg = (mass * ~inside).sum(-1)
    return (1 - fg / (fg + subjects * bg).clamp(min=1e-8)) ** 2


def bounded_loss(cross_maps: list[list[torch.Tensor]], self_maps: list[torch.Tensor], box_masks: dict[int, torch.Tensor]) -> torch.Tensor:
    """Bounded Attention's guidance loss, 1.5 cross + 0.5 self, summed over subjects, per image `[n]`.

    cross_maps: per loss layer, per subject, `[n, N]` attention mass on the subject's words;
    self_maps: per loss layer, `[n, N, N]` self-attention probabilities (rows: queries);
    box_masks: {N: [S, N] bool}.
    """
    cross, self_ = [], []
    for maps in cross_maps:
        masks = box_masks[maps[0].shape[-1]]
        cross.append(sum(box_term(m, masks[i], len(maps)) for i, m in enumerate(maps)))
    for probs in self_maps:
        masks = box_masks[probs.shape[-1]]
        # mass each query puts on subject i's keys
        self_.append(sum(box_term(probs[..., masks[i]].sum(-1), masks[i], len(masks)) for i in range(len(masks))))
    loss = 0
    if cross:
        loss = loss + CROSS_WEIGHT * torch.stack(cross).mean(0)
    if self_:
        loss = loss + SELF_WEIGHT * torch.stack(self_).mean(0)
    return loss


def subject_word_positions(tokenizer, prompt: str, known) -> list[int]:
    """Token positions of a region prompt's subject words (concept tokens, class word; not fillers)."""
    from .layerwise import expand_prompt

    ids = tokenizer(expand_prompt(prompt, 0, known), truncation=True).input_ids
    words = tokenizer.convert_ids_to_tokens(ids)
    keep = []
    for position, word in enumerate(words[1:-1], start=1):  # skip start and end of text
        if word.replace("</w>", "") not in FILLER_WORDS:
            keep.append(position)
    return keep or list(range(1, len(ids) - 1))


def loss_layers(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """Bounded Attention's loss layers, generically: the attention modules of the mid block and of
    the first up block with attention (SD1.5: 8x8 and 16x16, its layers 12-19)."""
    layers = [m for n, m in unet.mid_block.named_modules() if n.endswith(("attn1", "attn2"))]
    for block in unet.up_blocks:
        found = [m for n, m in block.named_modules() if n.endswith(("attn1", "attn2"))]
        if found:
            layers += found
            break
    return layers


class BoundedGuidance:
    """Moves the latent along Bounded Attention's loss before each of the first steps.

    Each iteration runs the UNet on the conditional half only, with the regional keyword
    arguments of that half and the bounded self-attention masks, records the attention maps of the
    loss layers through forward pre-hooks (which recompute queries and keys; the processors are
    untouched), and takes z <- z - eta grad L, eta falling from 8 to 2 (SD settings of the paper).
    """

    def __init__(self, unet, layer_of: dict, cond_context: torch.Tensor, cond_kwargs: dict, words: list[list[int]],
                 box_masks: dict[int, torch.Tensor], iterations: int, steps: int):
        self.unet = unet  # the module (hooks need it, not a compiled wrapper)
        self.layer_of = layer_of  # attn2 module -> its layer-wise index
        self.context = cond_context  # [n, L, d]
        self.kwargs = cond_kwargs
        self.words = words  # per subject, positions of its words in its region prompt
        self.box_masks = box_masks  # {N: [S, N] bool} on the device
        self.iterations = iterations
        self.steps = steps
        self.history: list[float] = []  # loss per iteration, for tests and reports

    def _record(self, store: dict):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            n, tokens, channels = hidden.shape
            heads = module.heads
            scale = (channels // heads) ** -0.5
            query = module.to_q(hidden).view(n, tokens, heads, -1).transpose(1, 2)  # [n, h, N, d]
            if module in self.layer_of:  # cross-attention: mass on each subject's words in its own prompt
                _, _, region_key, _ = kwargs["region_kv"][self.layer_of[module]]
                region_key = region_key.view(len(self.words), n, -1, heads, query.shape[-1]).transpose(2, 3)
                maps = []
                for i, positions in enumerate(self.words):
                    probs = (query @ region_key[i].transpose(-1, -2) * scale).softmax(-1)  # [n, h, N, L]
                    maps.append(probs[..., positions].sum(-1).mean(1))  # [n, N]
                store["cross"].append(maps)
            else:  # self-attention under the bounds
                key = module.to_k(hidden).view(n, tokens, heads, -1).transpose(1, 2)
                logits = query @ key.transpose(-1, -2) * scale
                bias = (kwargs.get("self_attention_bias") or {}).get(tokens)
                if bias is not None:
                    logits = logits + bias
                store["self"].append(logits.softmax(-1).mean(1))  # [n, N, N]
        return hook

    def update(self, step: int, scheduler, t, latents: torch.Tensor, dtype) -> torch.Tensor:
        eta = GUIDANCE_STEP_SIZES[0] + (GUIDANCE_STEP_SIZES[1] - GUIDANCE_STEP_SIZES[0]) * step / max(1, self.steps - 1)
        layers = loss_layers(self.unet)
        latents = latents.detach()
        for _ in range(self.iterations):
            store = {"cross": [], "self": []}
            handles = [m.register_forward_pre_hook(self._record(store), with_kwargs=True) for m in layers]
            try:
                with torch.enable_grad():
                    z = latents.clone().requires_grad_(True)
                    model_input = scheduler.scale_model_input(z, t).to(dtype)
                    self.unet(model_input, t, encoder_hidden_states=self.context, cross_attention_kwargs=self.kwargs)
                    loss = bounded_loss(store["cross"], store["self"], self.box_masks).float()
                    per_subject = loss.mean().item() / max(1, len(self.words))
                    self.history.append(per_subject)
                    if per_subject < GUIDANCE_STOP:
                        break
                    grad, = torch.autograd.grad(loss.sum(), z)
            finally:
                for handle in handles:
                    handle.remove()
            latents = latents - eta * grad.float()
        return latents


def cond_half_kwargs(kwargs: dict, count: int) -> dict:
    """The regional keyword arguments of the conditional half of a CFG batch of `count` images."""
    out = dict(kwargs)
    regions = kwargs["region_context"].shape[0]
    out["region_context"] = kwargs["region_context"][:, count:]
    out["region_kv"] = {}
    for layer, (gk, gv, rk, rv) in kwargs["region_kv"].items():
        def half(x):
            return x.view(regions, 2 * count, *x.shape[1:])[:, count:].flatten(0, 1)
        out["region_kv"][layer] = (gk[count:], gv[count:], half(rk), half(rv))
    return out
