"""Scores for personalised multi-subject images: CLIP-T, CLIP-I and DINO-I (CustomConcept101),
CP-CLIP and TI-CLIP (Gen4Gen) and the subject collapse rate SCR@0.5.

    models = load_score_models()          # CLIP ViT-B/32, DINO ViT-S/16, Grounding DINO
    result = evaluate(images, "a photo of <mochi> dog and <tama> cat", {"mochi": ("dog", photos), ...}, models)
    result["mean"]["cp_clip"], result["images"][0]["concepts"]["mochi"]["dino_crop"]

Per generated image (cos = cosine similarity of two embeddings; "references" = a concept's photos):

- CLIP-T, text alignment: 2.5 * max(cos(CLIP(image), CLIP(caption)), 0) with OpenAI CLIP ViT-B/32:
  CLIPScore (Hessel et al. 2021) as `adobe-research/custom-diffusion:customconcept101/evaluate.py`
  (`get_clip_score`, w=2.5, no caption prefix) computes it. The caption is the prompt with each
  concept token, and the class word written right after it, replaced by the class word ("<mochi> dog"
  -> "dog", "<mochi>" -> "dog"), as `TencentARC/Mix-of-Show:scripts/evaluation_scripts/generate_caption.py`
  does: CLIP cannot read our tokens. (Mix-of-Show's evaluation also prefixes "A photo depicts ".)
- CLIP-I, image alignment: the mean of the raw cosines between CLIP(image) and CLIP(photo) over the
  concept's references (CustomConcept101 `clipeval_image`). With several concepts, one score per
  concept on the whole image (CustomConcept101's multi-concept rule); the image's CLIP-I is their mean.
- DINO-I: the same with DINO ViT-S/16's CLS feature (Caron et al. 2021; `dinoeval_image`: resize the
  shorter side to 256, bicubic, centre-crop 224, ImageNet normalisation).
- TI-CLIP (Gen4Gen, Yeh et al. 2024, arXiv 2402.15504, section 4): the raw cosine of CLIP(image) and
  CLIP(caption). With the same caption it is CLIP-T / 2.5 wherever the cosine is positive; it is
  reported on Gen4Gen's scale, where it should stay flat while CP-CLIP rises.
- CP-CLIP (Gen4Gen): a detector crops the image (for each class word, its best boxes); a crop's
  similarity to a concept is the CLIP-I of the crop; crops are assigned to concepts one to one, and
  CP-CLIP = (sum of the assigned crops' similarities) / (number of concepts): a missing subject scores
  zero, extra detections are free.
- SCR@0.5, subject collapse rate ("When Identities Collapse", arXiv 2603.26078): a concept has
  collapsed when its assigned crop's DINO similarity to its references is below 0.5, or no crop is
  assigned to it; SCR = collapsed concepts / concepts, 0 (every subject kept) to 1.

Where this differs from the sources (shared/research/anchors_2026.md, sections 4.2-4.5):
- Grounding DINO (`pipelines/detect.py`, boxes only) finds the crops, not Gen4Gen's OWL-ViT; a class
  word keeps as many boxes as concepts share it (Gen4Gen keeps one per class, so two dogs were one).
- Gen4Gen credits each crop to its best concept, so one pet drawn twice scores for two concepts; here
  crops and concepts are matched one to one (Hungarian, `scipy.optimize.linear_sum_assignment`) on the
  crops' DINO similarity, as anchors_2026.md section 4.5 recommends, and one matching serves CP-CLIP
  and SCR.
- The SCR paper embeds the whole image with DINOv2; here DINO ViT-S/16 embeds the matched crop (the
  detection-aware variant of anchors_2026.md section 4.4). Its cosines are on another scale than
  DINOv2's, so compare SCR values computed the same way only.

The library keeps no training photos (`pipelines/concept.py` stores embeddings, LoRA, a record and a
preview), so the references are passed in: `--concept NAME=DIR` on the command line.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from . import DEFAULT_DETECTOR, hub
from .errors import UserError
from .files import write_atomic

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # CLIP ViT-B/32, as CustomConcept101, Mix-of-Show and Gen4Gen
DEFAULT_DINO = "facebook/dino-vits16"  # DINO ViT-S/16, CustomConcept101's `dino_vits16`
TINY = "tiny"  # random test models, built offline
CLIPSCORE_WEIGHT = 2.5  # CLIPScore's w (Hessel et al. 2021), used by CustomConcept101
COLLAPSE_THRESHOLD = 0.5  # SCR@0.5: the middle of the paper's thresholds {0.4, 0.5, 0.6}
DINO_RESIZE_RATIO = 256 / 224  # CustomConcept101 resizes to 256 before its 224 centre crop
BATCH = 32  # images per forward pass
SCORES = ("clip_t", "ti_clip", "clip_i", "dino_i", "cp_clip", "scr")  # an image's scores, in table order


# ---------------------------------------------------------------------------------------------
# Pure math on embeddings


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`[n, d]` x `[m, d]` -> `[n, m]` cosines."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


def clip_t(image_embedding: torch.Tensor, text_embedding: torch.Tensor, weight: float = CLIPSCORE_WEIGHT) -> float:
    """CLIP-T (CLIPScore): `weight * max(cos(image, text), 0)`; CustomConcept101 `get_clip_score`."""
    cosine = cosine_similarity(image_embedding[None], text_embedding[None])[0, 0].item()
    return weight * max(cosine, 0.0)


def ti_clip(image_embedding: torch.Tensor, text_embedding: torch.Tensor) -> float:
    """TI-CLIP (Gen4Gen): the raw cosine of the whole image's and the prompt's CLIP embeddings."""
    return cosine_similarity(image_embedding[None], text_embedding[None])[0, 0].item()


def reference_similarity(embeddings: torch.Tensor, references: list[torch.Tensor]) -> torch.Tensor:
    """`[n, d]` images x m concepts' references (`[r_j, d]` each) -> `[n, m]`: the mean cosine of
    each image with each concept's references (Gen4Gen's S_ij, CustomConcept101's image alignment)."""
    if not references:
        return torch.zeros(len(embeddings), 0)
    return torch.stack([cosine_similarity(embeddings, refs).mean(dim=1) for refs in references], dim=1)


def clip_i(image_embedding: torch.Tensor, reference_embeddings: torch.Tensor) -> float:
    """CLIP-I: the mean cosine of the image with every reference photo (CustomConcept101 `clipeval_image`)."""
    return reference_similarity(image_embedding[None], [reference_embeddings])[0, 0].item()


def dino_i(image_embedding: torch.Tensor, reference_embeddings: torch.Tensor) -> float:
    """DINO-I: CLIP-I's formula on DINO ViT-S/16 CLS features (CustomConcept101 `dinoeval_image`)."""
    return clip_i(image_embedding, reference_embeddings)


def assign_crops(similarity: torch.Tensor) -> list[int | None]:
    """`[crops, concepts]` similarities -> for each concept, the index of its crop, or None.

    One crop per concept and one concept per crop, with the largest total similarity (Hungarian
    assignment); with fewer crops than concepts, the concepts left over get None (missing).
    """
    from scipy.optimize import linear_sum_assignment

    assignment: list[int | None] = [None] * similarity.shape[1]
    if similarity.shape[0] == 0:
        return assignment
    rows, cols = linear_sum_assignment(similarity.double().numpy(), maximize=True)
    for crop, concept in zip(rows.tolist(), cols.tolist()):
        assignment[concept] = crop
    return assignment


def matched_similarity(similarity: torch.Tensor, assignment: list[int | None]) -> list[float]:
    """Each concept's similarity to its assigned crop; 0 for a concept with none (a missing subject)."""
    return [0.0 if crop is None else similarity[crop, j].item() for j, crop in enumerate(assignment)]


def cp_clip(similarity: torch.Tensor, assignment: list[int | None]) -> float:
    """CP-CLIP (Gen4Gen): the assigned crops' CLIP similarities summed, divided by the number of concepts.

    similarity: `[crops, concepts]` CLIP similarities of the crops to each concept's references.
    """
    scores = matched_similarity(similarity, assignment)
    return sum(scores) / len(scores)


def subject_collapse_rate(similarity: torch.Tensor, assignment: list[int | None], threshold: float = COLLAPSE_THRESHOLD) -> float:
    """SCR@threshold: the share of concepts whose assigned crop's DINO similarity is below `threshold`
    (a concept with no crop has collapsed)."""
    scores = matched_similarity(similarity, assignment)
    return sum(score < threshold for score in scores) / len(scores)


# ---------------------------------------------------------------------------------------------
# Captions, crops and inputs


TOKEN = re.compile(r"<([^<>\s]+)>")


def prompt_concepts(prompt: str) -> list[str]:
    """The concept names a prompt writes as <name>, lowercase, in order, each once."""
    return list(dict.fromkeys(name.lower() for name in TOKEN.findall(prompt)))


def class_caption(prompt: str, class_words: dict[str, str]) -> str:
    """The prompt with each <name> (and the class word written after it) replaced by its class word.

    "a photo of <mochi> dog and <tama>" with {"mochi": "dog", "tama": "cat"} -> "a photo of dog and cat"
    (Mix-of-Show's `generate_caption.py` mapping). Names match case-insensitively, as in sampling.
    """
    for name, word in class_words.items():
        pattern = re.compile(rf"<{re.escape(name)}>(\s+{re.escape(word)}\b)?", re.IGNORECASE)
        prompt = pattern.sub(word, prompt)
    return prompt


def dino_crop(image: Image.Image, size: int) -> Image.Image:
    """CustomConcept101's DINO view: the shorter side resized to size * 256/224 (bicubic), then the
    centre `size` x `size` (torchvision's Resize(256) + CenterCrop(224) for size 224)."""
    short = round(size * DINO_RESIZE_RATIO)
    width, height = image.size
    if width <= height:
        new_size = (short, int(short * height / width))
    else:
        new_size = (int(short * width / height), short)
    image = image.convert("RGB").resize(new_size, Image.BICUBIC)
    left, top = int(round((new_size[0] - size) / 2.0)), int(round((new_size[1] - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def keep_boxes(detections: list, class_words: list[str]) -> list:
    """The detections kept for cropping: for each class word, its best k, where k concepts have that
    class word (Gen4Gen keeps the best one per class). `detections` are best first."""
    wanted = {word: class_words.count(word) for word in class_words}
    kept = []
    for detection in detections:
        if wanted.get(detection.label, 0) > 0:
            wanted[detection.label] -= 1
            kept.append(detection)
    return kept


def crop_box(image: Image.Image, box) -> Image.Image | None:
    """The pixels of an (x0, y0, x1, y1) box, rounded outwards and clipped; None when empty."""
    x0, y0 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
    x1, y1 = min(int(np.ceil(box[2])), image.width), min(int(np.ceil(box[3])), image.height)
    if x1 <= x0 or y1 <= y0:
        return None
    return image.crop((x0, y0, x1, y1))


def parse_concept_arg(text: str) -> tuple[str, str | None, str]:
    """`--concept NAME=DIR` or `NAME:CLASS=DIR` -> (name, class word or None, folder)."""
    key, sep, folder = text.partition("=")
    name, _, word = key.partition(":")
    name, word = name.strip().strip("<>").lower(), word.strip().lower()
    if not sep or not name or not folder.strip():
        raise UserError(f"--concept {text!r} must look like 'mochi=photos/mochi' (or 'mochi:dog=photos/mochi' for a"
                        f" concept that is not in the library)")
    return name, word or None, folder.strip()


def find_images(inputs: list[str | os.PathLike], flag: str) -> list[Path]:
    """Folders (their image files, sorted) and files; an error naming `flag` if none is left."""
    from .train import find_photos

    return find_photos(inputs, flag, hint=f" ({flag})")


def load_concept_references(specs: list[str], library: str | os.PathLike | None = None) -> dict[str, tuple[str, list[Image.Image]]]:
    """`--concept` values -> {name: (class word, reference photos)}; class words from `library`
    unless given as NAME:CLASS=DIR. The library keeps no training photos, so DIR is required."""
    from .concept import ConceptLibrary, check_class_word
    from .train import load_photo

    if not specs:
        raise UserError("give each concept's reference photos with --concept NAME=DIR (the concept library keeps no"
                        " training photos), e.g. --concept mochi=photos/mochi")
    concepts = {}
    for spec in specs:
        name, word, folder = parse_concept_arg(spec)
        if word is None:
            shelf = ConceptLibrary(library) if library is not None else None
            if shelf is None or name not in shelf.names():
                raise UserError(f"concept {name!r} is not in the library {library}; give its class word:"
                                f" --concept {name}:dog={folder} (or the right --library)")
            word = shelf.get(name).class_word
        photos = [load_photo(p) for p in find_images([folder], f"--concept {name}=")]
        concepts[name] = (check_class_word(word), photos)
    return concepts


# ---------------------------------------------------------------------------------------------
# Tiny random models (offline tests and demos)


def build_tiny_clip(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny random CLIP (ViT-B/32's structure, 32 px) with CLIP's real tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from .base import write_clip_tokenizer_files

    out_dir = Path(out_dir)
    write_clip_tokenizer_files(out_dir)
    tokenizer = CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), pad_token="<|endoftext|>",
                              model_max_length=77)
    torch.manual_seed(seed)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(small, vocab_size=49408, max_position_embeddings=77),
                        vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(config).save_pretrained(out_dir)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    (out_dir / "menagerie_test_model.json").write_text(json.dumps({"kind": "tiny random CLIP"}))
    return out_dir


def build_tiny_dino(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny random ViT (DINO ViT-S/16's structure, 32 px) with DINO's ImageNet normalisation."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                       patch_size=8)
    ViTModel(config, add_pooling_layer=False).save_pretrained(out_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(out_dir)
    (out_dir / "menagerie_test_model.json").write_text(json.dumps({"kind": "tiny random DINO ViT"}))
    return out_dir


# ---------------------------------------------------------------------------------------------
# Loading


FLAGS = {"clip": "--clip", "dino": "--dino"}
_MODELS: dict[tuple[str, str, str], tuple[object, torch.nn.Module]] = {}


def _source(kind: str, name: str) -> str:
    """Where `name` loads from: the built tiny model for "tiny", else the Hub id or folder itself."""
    if name != TINY:
        return os.path.expanduser(name)
    from .base import tiny_model_dir

    folder = tiny_model_dir().parent / f"tiny-score-{kind}-v1"
    if not (folder / "config.json").exists():
        (build_tiny_clip if kind == "clip" else build_tiny_dino)(folder)
    return str(folder)


def load_scorer(kind: str, name: str, device: str | torch.device = "cpu"):
    """(processor, model) for "clip" (CLIPProcessor, CLIPModel) or "dino" (image processor, ViTModel),
    from a Hub id, a local folder or "tiny"; loaded once per (kind, name, device).

    Offline (HF_HUB_OFFLINE or an unreachable Hub) only the local cache is read, and a model not in
    it is a one-line UserError saying how to get it.
    """
    device = torch.device(device)
    key = (kind, name, str(device))
    if key in _MODELS:
        return _MODELS[key]
    from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, ViTModel

    source, flag = _source(kind, name), FLAGS[kind]
    local = Path(source).is_dir()
    local_only = local or hub.offline()  # unreachable Hub: fail at once, not after minutes of retries
    try:
        if kind == "clip":
            processor = CLIPProcessor.from_pretrained(source, local_files_only=local_only)
            model = CLIPModel.from_pretrained(source, local_files_only=local_only)
        else:  # the CLS token is the feature: no pooler head (DINO has none)
            processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_only)
            model = ViTModel.from_pretrained(source, local_files_only=local_only, add_pooling_layer=False)
    except (OSError, ValueError) as error:
        if local:
            raise UserError(f"{flag} {name!r} is a folder but not a transformers {kind.upper()} model ({type(error).__name__});"
                            f" pass a folder written by save_pretrained, or a Hub id") from None
        raise UserError(
            f"{flag} {name!r} could not be loaded ({type(error).__name__}); it is not in the local Hugging Face cache"
            f" and cannot be downloaded here. Download it once with network access (`hf download {name}`), pass a"
            f" local folder, or use {flag} tiny (random test model)"
        ) from None
    _MODELS[key] = (processor, model.to(device).eval())
    return _MODELS[key]


def model_problem(kind: str, name: str) -> str | None:
    """Why the "clip" or "dino" model `name` cannot be loaded here, said before anyone asks for it;
    None when it can (tiny, a local folder, cached, or the Hub answers)."""
    if name == TINY or Path(os.path.expanduser(name)).is_dir():
        return None
    if hub.cached(name, "config.json") or not hub.offline():
        return None
    flag = FLAGS[kind]
    return (f"{flag} {name!r} is not in the local Hugging Face cache and the Hub cannot be reached. Download it once"
            f" (`hf download {name}`), or pass {flag} PATH (a local folder) or {flag} tiny (random, for tests)")


Detector = Callable[[Image.Image, list[str]], list]  # (image, labels) -> [detect.Detection], best first


@dataclass
class ScoreModels:
    """The loaded models `evaluate` uses; build with `load_score_models`."""

    clip: tuple  # (CLIPProcessor, CLIPModel)
    dino: tuple  # (image processor, ViTModel)
    detector: Detector | None  # None: no crops, so no CP-CLIP or SCR
    device: torch.device
    names: dict  # {"clip": ..., "dino": ..., "detector": ...} for the record


def load_score_models(clip: str = DEFAULT_CLIP, dino: str = DEFAULT_DINO, detector: str | Detector | None = DEFAULT_DETECTOR,
                      device: str | torch.device | None = None) -> ScoreModels:
    """Load CLIP, DINO and the detector for `evaluate`.

    Args:
        clip, dino: Hub id, local folder or "tiny" (random test model).
        detector: a Grounding DINO Hub id, folder or "tiny" (run through `detect.detect`, boxes only), a
            callable `(image, labels) -> [Detection]` best first (tests, the toy world's oracle), or None
            to skip the per-subject scores (CP-CLIP, SCR).
        device: "cpu", "cuda", ... (default: the best available).
    """
    from .base import resolve_device

    device = device if isinstance(device, torch.device) else resolve_device(device)
    clip_pair, dino_pair = load_scorer("clip", clip, device), load_scorer("dino", dino, device)
    find = detector
    if isinstance(detector, str):
        from .detect import detect, load_model

        load_model("detector", detector, device)  # a missing detector fails now, not at the first image

        def find(image, labels):
            return detect(image, labels, detector=detector, segmenter=None, device=device)

    elif detector is not None and not callable(detector):
        raise UserError(f"detector {detector!r} must be a Grounding DINO name, a callable or None")
    label = detector if isinstance(detector, str) or detector is None else getattr(detector, "__name__", "callable")
    return ScoreModels(clip=clip_pair, dino=dino_pair, detector=find, device=device,
                       names={"clip": clip, "dino": dino, "detector": label})


# ---------------------------------------------------------------------------------------------
# Embeddings


def _batches(items: list, size: int = BATCH):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def clip_image_embeddings(models: ScoreModels, images: list[Image.Image]) -> torch.Tensor:
    """`[n, d]` CLIP image embeddings (resize 224 bicubic, centre crop, CLIP normalisation: the processor)."""
    processor, model = models.clip
    out = []
    for batch in _batches([image.convert("RGB") for image in images]):
        pixels = processor.image_processor(batch, return_tensors="pt")["pixel_values"].to(models.device)
        # written out rather than get_image_features, whose return type differs between transformers 4 and 5
        out.append(model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def clip_text_embeddings(models: ScoreModels, texts: list[str]) -> torch.Tensor:
    """`[n, d]` CLIP text embeddings; texts past CLIP's 77 tokens are cut, as CustomConcept101's `truncate=True`."""
    processor, model = models.clip
    out = []
    for batch in _batches(texts):
        tokens = processor.tokenizer(batch, padding=True, truncation=True, max_length=77, return_tensors="pt").to(models.device)
        pooled = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        out.append(model.text_projection(pooled).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def dino_embeddings(models: ScoreModels, images: list[Image.Image]) -> torch.Tensor:
    """`[n, d]` DINO CLS features of CustomConcept101's view (`dino_crop`) of each image."""
    processor, model = models.dino
    size = model.config.image_size
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)  # ImageNet's for DINO, as CustomConcept101
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    out = []
    for batch in _batches(images):
        pixels = torch.stack([torch.from_numpy(np.asarray(dino_crop(image, size), dtype=np.float32) / 255.0).permute(2, 0, 1)
                              for image in batch])  # [B, 3, size, size] in 0..1
        pixels = ((pixels - mean) / std).to(models.device)
        out.append(model(pixel_values=pixels).last_hidden_state[:, 0].float().cpu())  # CLS token, after the final norm
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Entry points


@dataclass
class ImageRequest:
    """One image to score: what it is, its prompt and the concepts it should show."""

    label: str  # file path, or "image N" for an image passed in memory
    image: Image.Image | Path
    prompt: str
    concepts: list[str]


def plan_images(images: list, prompt: str | list[str] | None, concepts: dict) -> list[ImageRequest]:
    """Check the inputs and say, per image, its prompt and which concepts it should show.

    The prompt is `prompt` (one for all, or one per image), else the one a Menagerie PNG carries. The
    concepts are those the PNG's metadata lists, else those the prompt names as <name>, else all given.
    """
    from .concept import check_class_word
    from .sample import read_png_metadata

    if not images:
        raise UserError("no images to score")
    if not concepts:
        raise UserError("no concepts given; pass each concept's class word and reference photos (--concept NAME=DIR)")
    for name, (word, photos) in concepts.items():
        check_class_word(word)
        if not photos:
            raise UserError(f"concept {name!r} has no reference photos; give a folder of its photos (--concept {name}=DIR)")
    if isinstance(prompt, list) and len(prompt) != len(images):
        raise UserError(f"{len(prompt)} prompts for {len(images)} images; give one prompt, or one per image")
    requests = []
    for i, image in enumerate(images):
        is_file = isinstance(image, (str, os.PathLike))
        label = str(image) if is_file else f"image {i + 1}"
        try:
            metadata = read_png_metadata(image) if is_file else {}
        except (OSError, ValueError) as error:  # not an image, or a damaged 'menagerie' text chunk
            raise UserError(f"cannot read image {label!r}: {error}; remove it or replace it with a PNG") from None
        text = prompt[i] if isinstance(prompt, list) else prompt if prompt is not None else metadata.get("prompt")
        if not isinstance(text, str):
            raise UserError(f"{label} carries no prompt (it is not a Menagerie PNG); pass --prompt")
        shown = metadata["concepts"] if isinstance(metadata.get("concepts"), list) else prompt_concepts(text) or list(concepts)
        missing = [name for name in shown if name not in concepts]
        if missing:
            raise UserError(f"{label} shows {', '.join('<' + n + '>' for n in missing)}; give reference photos for each:"
                            f" --concept {missing[0]}=DIR")
        requests.append(ImageRequest(label, Path(image) if isinstance(image, (str, os.PathLike)) else image, text, list(shown)))
    return requests


def _score_image(image: Image.Image, request: ImageRequest, concepts: dict, references: dict, models: ScoreModels) -> dict:
    """Every score of one image, with per-concept details."""
    names = request.concepts
    caption = class_caption(request.prompt, {name: word for name, (word, _) in concepts.items()})
    clip_image = clip_image_embeddings(models, [image])[0]
    text = clip_text_embeddings(models, [caption])[0]
    dino_image = dino_embeddings(models, [image])[0]
    row = {"image": request.label, "prompt": request.prompt, "caption": caption,
           "clip_t": clip_t(clip_image, text), "ti_clip": ti_clip(clip_image, text)}
    details = {name: {"clip_i": clip_i(clip_image, references[name][0]), "dino_i": dino_i(dino_image, references[name][1])}
               for name in names}
    row["clip_i"] = float(np.mean([d["clip_i"] for d in details.values()])) if names else None
    row["dino_i"] = float(np.mean([d["dino_i"] for d in details.values()])) if names else None
    row["cp_clip"] = row["scr"] = None
    if models.detector is not None and names:
        class_words = [concepts[name][0] for name in names]
        found = keep_boxes(models.detector(image, sorted(set(class_words))), class_words)
        crops = [(d, crop) for d in found if (crop := crop_box(image, d.box)) is not None]
        clip_refs, dino_refs = [references[n][0] for n in names], [references[n][1] for n in names]
        if crops:
            clip_similarity = reference_similarity(clip_image_embeddings(models, [c for _, c in crops]), clip_refs)
            dino_similarity = reference_similarity(dino_embeddings(models, [c for _, c in crops]), dino_refs)
        else:
            clip_similarity = dino_similarity = torch.zeros(0, len(names))
        assignment = assign_crops(dino_similarity)  # which crop is which concept: by identity (DINO)
        row["cp_clip"] = cp_clip(clip_similarity, assignment)
        row["scr"] = subject_collapse_rate(dino_similarity, assignment)
        for j, (name, crop) in enumerate(zip(names, assignment)):
            details[name].update(
                box=None if crop is None else [round(v, 1) for v in crops[crop][0].box],
                crop_clip=0.0 if crop is None else clip_similarity[crop, j].item(),
                crop_dino=0.0 if crop is None else dino_similarity[crop, j].item(),
                collapsed=crop is None or dino_similarity[crop, j].item() < COLLAPSE_THRESHOLD,
            )
    row["concepts"] = details
    return row


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def evaluate(images: list, prompt: str | list[str] | None, concepts: dict[str, tuple[str, list[Image.Image]]],
             models: ScoreModels) -> dict:
    """Score generated images: CLIP-T, TI-CLIP, CLIP-I, DINO-I, CP-CLIP and SCR@0.5 (module docstring).

    Args:
        images: PIL images, or paths (a Menagerie PNG brings its prompt and concepts).
        prompt: the generation prompt, with concepts as <name>; one for all images, one per image, or
            None to read each PNG's own.
        concepts: {name: (class word, reference photos as PIL images)}.
        models: from `load_score_models`.

    Returns:
        {"images": [one dict per image: "image", "prompt", "caption", the six scores, and "concepts":
        {name: clip_i, dino_i, and with a detector box, crop_clip, crop_dino, collapsed}],
        "mean": {score: mean over images}, "concepts": {name: mean clip_i, dino_i}, "models": {...}}.
        Scores that need a concept or a detector are None without one.
    """
    from .train import load_photo

    # 1. Check inputs
    requests = plan_images(images, prompt, concepts)

    # 2. Embed each concept's references once
    references = {name: (clip_image_embeddings(models, photos), dino_embeddings(models, photos))
                  for name, (_, photos) in concepts.items()}

    # 3. Score each image
    rows = []
    for request in requests:
        image = load_photo(request.image) if isinstance(request.image, Path) else request.image.convert("RGB")
        rows.append(_score_image(image, request, concepts, references, models))

    # 4. Means
    result = {
        "images": rows,
        "mean": {score: _mean([row[score] for row in rows]) for score in SCORES},
        "concepts": {name: {key: _mean([row["concepts"][name][key] for row in rows if name in row["concepts"]])
                            for key in ("clip_i", "dino_i")} for name in concepts},
        "models": dict(models.names),
        "collapse_threshold": COLLAPSE_THRESHOLD,
    }
    if TINY in models.names.values():
        result["note"] = "scored with random test models (tiny): the numbers mean nothing"
    return result


def score_images(paths: list[str], concepts: dict[str, tuple[str, list[Image.Image]]], models: ScoreModels,
                 prompt: str | None = None) -> list[dict]:
    """One dict of scores per image file (see `evaluate`); each Menagerie PNG brings its own prompt
    and concepts, so a gallery of mixed images scores in one call (the studio's Score action)."""
    return evaluate(list(paths), prompt, concepts, models)["images"]


def format_table(result: dict) -> str:
    """The scores of `evaluate` as a text table, one row per image and a mean row."""
    headers = ("image", "CLIP-T", "TI-CLIP", "CLIP-I", "DINO-I", "CP-CLIP", "SCR@0.5")
    rows = [[Path(row["image"]).name] + [row[s] for s in SCORES] for row in result["images"]]
    rows.append(["mean"] + [result["mean"][s] for s in SCORES])
    cells = [[str(c) if isinstance(c, str) else "-" if c is None else f"{c:.4f}" for c in row] for row in rows]
    widths = [max(len(h), *(len(row[k]) for row in cells)) for k, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_scores(result: dict, path: str | os.PathLike) -> Path:
    """Write `evaluate`'s result as JSON (atomically)."""
    text = json.dumps(result, indent=1, sort_keys=True) + "\n"
    return write_atomic(Path(path).expanduser(), lambda tmp: tmp.write_text(text))
