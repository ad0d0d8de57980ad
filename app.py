"""Menagerie studio: the Gradio app.

A thin layer over `pipelines`: it turns widgets into the same config dataclasses the CLI builds,
sends every piece of GPU work through one background job queue (`pipelines.jobs`), and shows the
results. It adds no ML of its own.

    python app.py                     # default Hub base model (loaded when first needed)
    python app.py --base tiny         # built-in random test model: runs offline, images are noise
    python app.py --demo              # the toy world (pipelines/demo.py): a small real model, offline, on a CPU
    python app.py --port 7860 --concepts-dir ./concepts --outputs-dir ./outputs
    python app.py --safety-checker on # screen every image (the default on Hugging Face Spaces)
    python app.py --clip DIR --dino DIR  # local CLIP and DINO folders for the Score action (offline)

Tabs: Concepts (train a pet from photos; the library, exported for A1111/ComfyUI/Forge too, and imports
of LoRA files and Mix-of-Show checkpoints), Compose (fuse concepts; export a fused model as one
checkpoint), Generate (regional or isolated sampling with boxes drawn on a canvas; history of past
images; scores of them against reference photos).
"""

from __future__ import annotations

import argparse
import functools
import gc
import html
import json
import os
import random
import shutil
import time
import typing
import uuid
import warnings
import zipfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path


# ---------------------------------------------------------------------------------------------
# The command line, read before the heavy imports below: `python app.py --help` answers at once


def persistent_dir() -> Path | None:
    """Spaces' persistent storage (/data), when the Space has it; the disk beside the app is wiped on restart."""
    data = Path("/data")
    if os.environ.get("SPACE_ID") and data.is_dir() and os.access(data, os.W_OK):
        return data / "menagerie"
    return None


def build_parser() -> argparse.ArgumentParser:
    """The studio's command line. It imports nothing heavy (no gradio, torch or model code), so
    `python app.py --help` and a mistyped flag answer at once; `main` parses the same flags."""
    from pipelines import COMPILE_MODES, DEFAULT_BASE, DEFAULT_DETECTOR, DEFAULT_SEGMENTER, MEMORY_MODES
    from pipelines.__main__ import default_library

    storage = persistent_dir()
    parser = argparse.ArgumentParser(description="Menagerie studio")
    parser.add_argument("--base", default=os.environ.get("MENAGERIE_BASE", DEFAULT_BASE), help="Hub id, diffusers folder, checkpoint file or 'tiny'")
    parser.add_argument("--concepts-dir", default=str(storage / "concepts") if storage else default_library(), help="concept library folder")
    parser.add_argument("--outputs-dir", default=str(storage / "outputs") if storage else "outputs", help="where generated images are saved")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--share", action="store_true")
    parser.add_argument("--safety-checker", choices=["on", "off"], default=None,
                        help="screen every generated image with Stable Diffusion's safety checker (flagged ones turn black);"
                             " default: on when running on Hugging Face Spaces, off elsewhere")
    parser.add_argument("--detector", default=None,
                        help=f"Grounding DINO for Isolated mode and automatic masks: Hub id, local folder or 'tiny' (default {DEFAULT_DETECTOR})")
    parser.add_argument("--segmenter", default=None, help=f"SAM: Hub id, local folder or 'tiny' (default {DEFAULT_SEGMENTER})")
    parser.add_argument("--clip", default=None,
                        help="CLIP for the Score action (CLIP-T, CLIP-I, CP-CLIP, TI-CLIP): Hub id, local folder or 'tiny'"
                             " (default openai/clip-vit-base-patch32; 'tiny' with --base tiny)")
    parser.add_argument("--dino", default=None,
                        help="DINO ViT for the Score action (DINO-I, SCR): Hub id, local folder or 'tiny'"
                             " (default facebook/dino-vits16; 'tiny' with --base tiny)")
    parser.add_argument("--memory", default="auto", choices=MEMORY_MODES,
                        help="GPU memory mode: auto (per job, from the free memory), high, low or lowest (README, Hardware)")
    parser.add_argument("--compile", nargs="?", const="reduce-overhead", default="off", choices=COMPILE_MODES,
                        help="torch.compile the UNet (bare --compile: reduce-overhead, CUDA graphs: 2-2.8x faster training"
                             " steps on a large GPU after a 2-3 minute first compile; cached beside the library for later runs)")
    parser.add_argument("--demo", action="store_true",
                        help="the offline demo on the toy world (docs/toyworld.md): a small real model, stock pets, the oracle as"
                             " detector; runs on a CPU. The default on a Space without a GPU")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad flags answer here, before gradio and torch load (seconds)

import gradio as gr  # noqa: E402 (after the command line above, on purpose)
import torch
from gradio.data_classes import FileData
from gradio_image_annotation import image_annotator
from PIL import Image, ImageDraw

from pipelines.base import (DEFAULT_BASE, TEST_MODEL_NOTE, TINY, _is_hub_id, _offline_help, architecture_of, default_dtype,
                            load_base, native_resolution_of, resolve_device)
from pipelines.concept import WEIGHTS_FILE, ConceptLibrary, check_class_word, check_name, normalise_name
from pipelines.detect import DEFAULT_DETECTOR, DEFAULT_SEGMENTER, model_problem, subject_mask
from pipelines.errors import UserError
from pipelines.export import COLLAPSE_LOSS_NOTE, export_for_webui
from pipelines.files import write_atomic
from pipelines.composites import load_backgrounds, preview_composites
from pipelines.cones import check_cones_config
from pipelines.edlora import KIND_NAMES
from pipelines.fusion import (FUSED_FORMAT, METHODS, REPORT_FILE, FusionConfig, cache_key, fuse_concepts, list_fused, merge_methods,
                              resolve_method)
from pipelines.isolated import BOX_T_LAY, LAYOUT_CROSS_ATTENTION, IsolateConfig, Subject, describe_boxes, isolate, save_stages
from pipelines.jobs import DONE, FAILED, QUEUED, RUNNING, Job, JobQueue, JobState
from pipelines.layerwise import concepts_in
from pipelines.layout import DEFAULT_LAYOUT, LayoutControl
from pipelines.lora_import import check_trigger, import_lora, import_mix_of_show
from pipelines.performance import compile_cache_dir, configure_performance
from pipelines.regional import Region
from pipelines.safety import blocked_note, configure_safety, safety_enabled
from pipelines.sample import DEFAULT_NEGATIVE_PROMPT, SampleConfig, generate, read_png_metadata, save_png
from pipelines.scores import DEFAULT_CLIP, DEFAULT_DINO, load_score_models, score_images
from pipelines.scores import model_problem as score_model_problem
from pipelines.single_file import check_out_path, export_paths, export_fused_checkpoint
from pipelines.train import (GroupMember, TrainConfig, check_train_config, load_photo, load_training_set, parse_companions,
                             train_concept, train_group)

REGIONAL = "Regional (Mix-of-Show)"
ISOLATED = "Isolated (detector-guided)"
CANVAS_SIDE = 512  # the drawing canvas' long side in pixels, whatever the image size
BOX_COLUMNS = ["label", "x0", "y0", "x1", "y1", "prompt", "negative prompt", "find (isolated)"]
HISTORY_LIMIT = 60  # newest images shown in the history gallery
POLL_SECONDS = 1.0
# Export and import (issue 17): the formats the library's export dialog and import form offer
MENAGERIE_FORMAT = "Menagerie (.safetensors)"
WEBUI_FORMAT = "A1111, ComfyUI, Forge (LoRA + embedding, .zip)"
LORA_FILE = "LoRA file (kohya, A1111, diffusers, peft)"
MIX_OF_SHOW_FILE = "Mix-of-Show checkpoint (.pth)"
IMPORT_KINDS = {LORA_FILE: "lora", MIX_OF_SHOW_FILE: "mix-of-show"}
# Concept kinds (issue 16): the training form's choices, one line on what each is and stores, and each merge's name
TRAIN_KINDS = {"ED-LoRA": "edlora", "Custom Diffusion": "custom-diffusion", "Cones": "cones"}
KIND_NOTES = {
    "edlora": "ED-LoRA (Mix-of-Show): two layer-wise words and a rank-4 LoRA on the text encoder's and UNet's attention."
              " About 4 MB at SD1.5 size; fuses with other ED-LoRA concepts and imported LoRAs.",
    "custom-diffusion": "Custom Diffusion (Kumari et al. 2023): one trained modifier word and the UNet's cross-attention K/V"
                        " weights, stored dense. About 75 MB at SD1.5 size; merges only with other Custom Diffusion concepts.",
    "cones": "Cones (Liu et al. 2023): trains no weights; finds the base model's concept neurons for the pet and shuts them."
             " About 0.1 MB (at most 20,000 indices); merges only with other Cones concepts.",
}
GROUP_KINDS = {"Joint (Gen4Gen)": "joint", "Custom Diffusion, joint": "custom-diffusion"}
MAX_GROUP_PETS = 3  # the group form's pet slots
GROUP_COMPOSITE_CHANCE = 0.5  # chance a group's training example is a composite of all its pets (train-group's default)
COMPOSITE_PREVIEWS = 8  # composites the group form's preview shows
METHOD_LABELS = {"gradient": "gradient fusion (Mix-of-Show)", "weight": "weight averaging",
                 "custom-diffusion": "Custom Diffusion's closed-form merge", "cones": "Cones: the union of the concept neurons",
                 "group": "the group's shared weights, as trained together"}
LIBRARY_COLUMNS = ["concept", "class", "photos", "base model", "kind", "group", "size", "created", "problem"]
# Scores: the table's columns in pipelines.scores' keys, and the reference uploads the page has room for
SCORE_COLUMNS = {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino_i": "DINO-I", "cp_clip": "CP-CLIP", "ti_clip": "TI-CLIP", "scr": "SCR"}
SCORE_SLOTS = 6  # concepts per scored batch of images
DEMO_SCORE_NOTE = ("Scores need the real CLIP (ViT-B/32) and DINO (ViT-S/16) models, which judge photographs; the demo's"
                   " toy world is judged by its own oracle instead (docs/toyworld.md). Start the studio on a real base model"
                   " (python app.py) to score images")


# ---------------------------------------------------------------------------------------------
# Where the studio runs: Hugging Face Spaces, ZeroGPU, persistent storage


def on_zero_gpu() -> bool:
    """True on Spaces' shared ZeroGPU hardware (GPU bursts per call; no room for training)."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


try:  # @spaces.GPU attaches a GPU on ZeroGPU Spaces and does nothing anywhere else
    import spaces

    gpu_task = spaces.GPU(duration=120)
except ImportError:
    def gpu_task(function):
        return function


def base_problem(name: str) -> str | None:
    """Why `name` cannot be loaded, said before anyone clicks, or None if it can (or may) load."""
    if name == TINY:
        return None
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return None if (path / "model_index.json").exists() else f"--base {name!r} is a folder but not a diffusers model (no model_index.json)"
    if path.is_file():
        return None if path.suffix in (".safetensors", ".ckpt") else f"--base {name!r} must be a .safetensors or .ckpt file"
    if not _is_hub_id(name):
        return f"--base {name!r} does not exist; give a Hub id, a diffusers folder or a .safetensors/.ckpt file"
    from pipelines.hub import cached, offline_by_setting

    return _offline_help(name) if offline_by_setting() and not cached(name, "model_index.json") else None


# ---------------------------------------------------------------------------------------------
# The base model in memory


class BaseModels:
    """The one base model in memory, loaded when a job first needs it.

    Training adds its concept's adapters to the base and fusion writes fused weights into it, so
    a job that needs another state gets a fresh load (the old model is dropped first, to free
    memory). Only the job worker calls `get`, one job at a time, so the model needs no lock.
    """

    def __init__(self, name: str, safety_checker: bool = False, memory: str = "auto", compile: str = "off",
                 compile_cache: Path | None = None):
        self.name = name
        self.safety_checker = safety_checker  # screen every generated image (pipelines.safety)
        self.memory, self.compile, self.compile_cache = memory, compile, compile_cache  # pipelines.performance
        self.model = None
        self.trained_in = False  # a training run left its adapters in `model`
        self.error: str | None = None  # the last load failure, for the status panel

    def get(self, fused: str | None = None, fresh: bool = False, dtype: torch.dtype | None = None):
        """A base whose fused weights are `fused` (a folder) or that holds no fused model at all, its
        UNet and VAE in `dtype` (None: load_base's default, fp16 on a GPU and float32 on the CPU)."""
        model = self.model
        wanted = dtype or default_dtype(resolve_device(None))
        if (model is None or fresh or self.trained_in or (model.fused is not None and model.fused != fused)
                or model.dtype != wanted):
            self.model = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            try:
                model = load_base(self.name, dtype=dtype)
            except UserError as error:
                self.error = str(error)
                raise
            configure_safety(model, self.safety_checker)  # on and not loadable: the job fails, no image goes unscreened
            configure_performance(model, memory=self.memory, compile=self.compile, compile_cache=self.compile_cache)
            self.model = model
            self.error, self.trained_in = None, False
        return self.model

    def fused_folder(self, library: ConceptLibrary, names: list[str], method: str = "auto") -> str | None:
        """Where the fused model of `names` is cached, None for fewer than two concepts; `method`
        "auto" is the merge the concepts' kinds allow first, as `fuse_concepts` resolves it.

        The folder name hashes the base's name and architecture, which any loaded state shares.
        """
        if len(names) < 2:
            return None
        method = resolve_method([library.get(name) for name in names], method)  # kinds that cannot merge: said here
        model = self.model or self.get()
        return str(library.root / ".fused" / cache_key(model, library, names, FusionConfig(method=method)))


# ---------------------------------------------------------------------------------------------
# What the forms hold


@dataclass(frozen=True)
class BoxRow:
    """One row of the box table: a box on the image (pixels) and what goes in it."""

    label: str  # a concept token such as <mochi>, or free text
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels
    prompt: str
    negative_prompt: str = ""
    find: str = ""  # Isolated mode: the word the detector looks for (a concept's class word)


@dataclass(frozen=True)
class GenerationRequest:
    mode: str  # REGIONAL or ISOLATED
    prompt: str
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    width: int = 512
    height: int = 512
    seed: int = 0
    steps: int = 30
    guidance: float = 7.5
    num_images: int = 1
    rows: tuple[BoxRow, ...] = ()
    fused: str | None = None  # a fused model folder; None: fuse on the fly when several concepts are used
    t_lay: float = BOX_T_LAY  # the studio isolates in boxes
    box_threshold: float = 0.35
    text_threshold: float = 0.25
    # Advanced layout, Regional: shares of the steps (pipelines.layout.LayoutControl)
    bounded_self_attention: float = DEFAULT_LAYOUT.self_attention
    bootstrap: float = DEFAULT_LAYOUT.bootstrap
    bounded_guidance: float = DEFAULT_LAYOUT.guidance
    # Advanced layout, Isolated (pipelines.isolated.IsolateConfig)
    layout_self_attention: float = IsolateConfig.layout_self_attention
    layout_cross_attention: str = IsolateConfig.layout_cross_attention
    layout_retries: int = IsolateConfig.layout_retries
    added_bootstrap: float = IsolateConfig.added_bootstrap


@dataclass
class GenerationOutput:
    images: list[str] = field(default_factory=list)  # saved PNG paths
    stages: list[tuple[str, str]] = field(default_factory=list)  # Isolated: (path, caption) of each stage
    boxes: list[str] = field(default_factory=list)  # Isolated: what became of each box, one line each
    message: str = ""


def training_recipe(studio: "Studio") -> dict:
    """The training forms' defaults: Mix-of-Show's learning rates and 0 steps (500 per photo / batch
    size), Custom Diffusion's learning rate and class-prior chance and Cones' neuron cap as
    `TrainConfig` has them; the demo's toy recipe in demo mode. The API's `train` uses the same."""
    return {"steps": 0, "lr_embedding": 1e-3, "lr_text_lora": 1e-5, "lr_unet_lora": 1e-4, "lr_kv": TrainConfig.lr_kv,
            "class_prior_probability": TrainConfig.class_prior_probability, "cones_max_neurons": TrainConfig.cones_max_neurons,
            **(studio.demo.training if studio.demo else {})}


def generation_defaults(studio: "Studio") -> GenerationRequest:
    """The Generate form's defaults (the demo's sampling settings in demo mode); the API's `generate` uses the same."""
    return GenerationRequest(**{"mode": REGIONAL, "prompt": "", **(studio.demo.sampling if studio.demo else {})})


# ---------------------------------------------------------------------------------------------
# Pure helpers: the canvas, the box table, formatting


def canvas_scale(width: int, height: int) -> float:
    """Canvas pixels per image pixel: the canvas' long side is CANVAS_SIDE."""
    return CANVAS_SIDE / max(width, height)


def blank_canvas(width: int, height: int) -> Image.Image:
    """A light grid at canvas size, with the image's aspect ratio, to draw boxes on."""
    scale = canvas_scale(width, height)
    size = (round(width * scale), round(height * scale))
    canvas = Image.new("RGB", size, (246, 246, 243))
    draw = ImageDraw.Draw(canvas)
    for x in range(0, size[0], 32):
        draw.line([(x, 0), (x, size[1])], fill=(228, 228, 222))
    for y in range(0, size[1], 32):
        draw.line([(0, y), (size[0], y)], fill=(228, 228, 222))
    return canvas


def annotator_value(width: int, height: int, rows: list[BoxRow]) -> dict:
    """The annotator's value: a blank canvas and the rows' boxes scaled onto it."""
    scale = canvas_scale(width, height)
    boxes = [{"label": row.label, "color": label_color(row.label),
              "xmin": round(row.box[0] * scale), "ymin": round(row.box[1] * scale),
              "xmax": round(row.box[2] * scale), "ymax": round(row.box[3] * scale)} for row in rows]
    return {"image": blank_canvas(width, height), "boxes": boxes}


PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 160, 160)]


def label_color(label: str) -> tuple[int, int, int]:
    return PALETTE[sum(label.encode()) % len(PALETTE)]


def concept_of(label: str, library: ConceptLibrary) -> str | None:
    """The usable concept a box label names (`<mochi>` or `mochi`), or None for free text (or a
    concept the library lacks or holds damaged, which Generate refuses with its reason)."""
    text = label.strip()
    names = concepts_in(text)
    usable = usable_names(library)
    if len(names) == 1 and text == f"<{names[0]}>":
        return names[0] if names[0] in usable else None
    return text if text in usable else None


def default_row(label: str, box: tuple[int, int, int, int], library: ConceptLibrary) -> BoxRow:
    """A new box's prompt: "a photo of <mochi> dog" for a concept, the label itself for free text."""
    name = concept_of(label, library)
    if name is None:
        return BoxRow(label=label, box=box, prompt=label, find=label)
    class_word = library.get(name).class_word
    return BoxRow(label=f"<{name}>", box=box, prompt=f"a photo of <{name}> {class_word}", find=class_word)


def rows_from_annotator(value: dict | None, width: int, height: int, previous: list[BoxRow], library: ConceptLibrary) -> list[BoxRow]:
    """The box table after a drawing change: boxes in image pixels; prompts edited earlier are kept
    for boxes whose label did not change (matched in order)."""
    if not value or not value.get("boxes"):
        return []
    image = value.get("image")
    image_width = image.width if isinstance(image, Image.Image) else round(width * canvas_scale(width, height))
    scale = image_width / width  # canvas pixels per image pixel
    unused = list(previous)
    rows = []
    for box in value["boxes"]:
        label = str(box.get("label") or "").strip()
        pixels = tuple(min(max(round(box[key] / scale), 0), limit) for key, limit in
                       (("xmin", width), ("ymin", height), ("xmax", width), ("ymax", height)))
        earlier = next((row for row in unused if row.label == label and label), None)
        if earlier is not None:
            unused.remove(earlier)
            rows.append(replace(earlier, box=pixels))
        elif label and concept_of(label, library) is None and concepts_in(label):
            rows.append(BoxRow(label=label, box=pixels, prompt="", find=""))  # an unknown <concept>: refused at Generate
        else:
            rows.append(default_row(label, pixels, library) if label else BoxRow(label="", box=pixels, prompt=""))
    return rows


def scale_rows(rows: list[BoxRow], old_size: tuple[int, int], new_size: tuple[int, int]) -> list[BoxRow]:
    """The boxes after the image is resized from `old_size` to `new_size` (width, height): each keeps
    its place and its share of the image (clamping instead turned boxes into zero-area ones)."""
    (old_w, old_h), (new_w, new_h) = old_size, new_size
    sx, sy = new_w / max(old_w, 1), new_h / max(old_h, 1)
    scaled = []
    for row in rows:
        x0, y0 = min(round(row.box[0] * sx), new_w - 1), min(round(row.box[1] * sy), new_h - 1)
        x1, y1 = max(min(round(row.box[2] * sx), new_w), x0 + 1), max(min(round(row.box[3] * sy), new_h), y0 + 1)
        scaled.append(replace(row, box=(x0, y0, x1, y1)))
    return scaled


def rows_to_table(rows: list[BoxRow]) -> list[list]:
    return [[r.label, *r.box, r.prompt, r.negative_prompt, r.find] for r in rows]


def rows_from_table(table) -> list[BoxRow]:
    """Rows back from the (possibly edited) table; a pandas DataFrame or a list of lists."""
    values = table.values.tolist() if hasattr(table, "values") else list(table or [])
    rows = []
    for i, values_row in enumerate(values, start=1):
        cells = ["" if cell is None or (isinstance(cell, float) and cell != cell) else cell for cell in values_row]
        if not any(str(c).strip() for c in cells):
            continue  # the editor's empty trailing row
        label, x0, y0, x1, y1, prompt, negative, find = (cells + [""] * len(BOX_COLUMNS))[: len(BOX_COLUMNS)]
        try:
            box = tuple(int(round(float(v))) for v in (x0, y0, x1, y1))
        except (TypeError, ValueError):
            raise UserError(f"box {i}: x0, y0, x1, y1 must be numbers of pixels, got {[x0, y0, x1, y1]}") from None
        rows.append(BoxRow(str(label).strip(), box, str(prompt).strip(), str(negative).strip(), str(find).strip()))
    return rows


def check_rows(rows: list[BoxRow], library: ConceptLibrary) -> None:
    """Refuse boxes without a label or prompt, and labels naming a concept the library lacks or holds damaged."""
    known, damaged = library.names(), library.damaged()
    for i, row in enumerate(rows, start=1):
        if not row.label:
            raise UserError(f"box {i} has no label; click the box, press E and pick a concept (or type what it is)")
        for name in concepts_in(row.label) + concepts_in(row.prompt) + concepts_in(row.negative_prompt):
            if name in damaged:
                raise UserError(f"box {i}: {damaged[name]}")
            if name not in known:
                raise UserError(f"box {i} names the concept <{name}>, which is not in the library"
                                f" (known: {', '.join('<' + n + '>' for n in known) or 'none yet; train one in Concepts'})")
        if not row.prompt:
            raise UserError(f"box {i} ({row.label}) has an empty prompt; describe what goes in it")


def regions_of(rows: list[BoxRow]) -> list[Region]:
    return [Region(box=row.box, prompt=row.prompt, negative_prompt=row.negative_prompt) for row in rows]


def layout_of(request: GenerationRequest) -> LayoutControl:
    """Regional mode's layout control: the form's shares, the rest as DEFAULT_LAYOUT."""
    return replace(DEFAULT_LAYOUT, self_attention=request.bounded_self_attention, bootstrap=request.bootstrap,
                   guidance=request.bounded_guidance)


def isolate_config(request: GenerationRequest, index: int = 0) -> IsolateConfig:
    """Isolated mode's config for image `index` (seed + index): one subject per box, in its box."""
    rows = list(request.rows)
    return IsolateConfig(prompt=request.prompt, subjects=subjects_of(rows), negative_prompt=request.negative_prompt,
                         t_lay=request.t_lay, steps=request.steps, guidance=request.guidance, seed=request.seed + index,
                         width=request.width, height=request.height, box_threshold=request.box_threshold,
                         text_threshold=request.text_threshold, boxes=tuple(row.box for row in rows),
                         layout_self_attention=request.layout_self_attention,
                         layout_cross_attention=request.layout_cross_attention, layout_retries=request.layout_retries,
                         added_bootstrap=request.added_bootstrap)


def stage_caption(path: Path, index: int, boxes: bool) -> str:
    """A stage image's caption in the Isolated gallery."""
    name = {"layout": "layout (plain sample)", "final": "final",
            "detections": "boxes: matched / split / added" if boxes else "detections"}.get(path.stem, path.stem.replace("_", " "))
    return f"image {index + 1}: {name}"


def subjects_of(rows: list[BoxRow]) -> tuple[Subject, ...]:
    """Isolated mode: one subject per box; the detector looks for its `find` word in the layout."""
    for i, row in enumerate(rows, start=1):
        if not row.find:
            raise UserError(f"box {i} ({row.label}) has no 'find' word; write what the detector should look for, e.g. dog")
    return tuple(Subject(label=row.find, prompt=row.prompt) for row in rows)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class StepClock:
    """A sampler callback `(step, total)` that reports progress with an ETA from the steps so far."""

    def __init__(self, job: Job, stage: str):
        self.job, self.stage = job, stage
        self.started: float | None = None
        self.steps = 0

    def __call__(self, step: int, total: int) -> None:
        now = time.perf_counter()
        if self.started is None:
            self.started = now  # the first report comes after the first step: time from there
        self.steps = step
        per_step = (now - self.started) / (step - 1) if step > 1 else None
        self.job.update(step=step, total=total, stage=self.stage, eta_seconds=per_step * (total - step) if per_step else None)

    def seconds_per_step(self) -> float | None:
        return (time.perf_counter() - self.started) / (self.steps - 1) if self.started is not None and self.steps > 1 else None


def speed_key(kind: str, base, request: GenerationRequest) -> tuple:
    """Jobs whose steps cost alike: the same kind, base, device, image size, images and boxes."""
    return (kind, base.name, str(base.device), request.width, request.height, request.num_images, len(request.rows), request.mode)


class SpeedLog:
    """Seconds per denoising step as measured by finished jobs, by `speed_key`; the last one counts."""

    def __init__(self):
        self._seconds: dict[tuple, float] = {}

    def record(self, key: tuple, seconds_per_step: float | None) -> None:
        if seconds_per_step:
            self._seconds[key] = seconds_per_step

    def get(self, key: tuple, default=None):
        return self._seconds.get(key, default)

    def nearest(self, kind: str, name: str, device: str, pixels: int) -> float | None:
        """Seconds per step of the measured job of this kind, base and device closest in image area,
        scaled to `pixels` (a step's cost grows about linearly with the area)."""
        found = [(abs(k[3] * k[4] - pixels), v * pixels / (k[3] * k[4] * k[5] or 1)) for k, v in self._seconds.items()
                 if k[:3] == (kind, name, device)]
        return min(found)[1] if found else None


def generation_estimate(studio: "Studio", mode: str, width: int, height: int, steps: int, num_images: int) -> str:
    """What a generation will cost, said before it starts: measured speed if this studio has one,
    and a warning for a canvas much larger than the model's native size on a CPU."""
    device = studio.models.model.device if studio.models.model is not None else resolve_device(None)
    native = studio.default_size
    lines = []
    per_step = studio.speeds.nearest("generate", studio.base_name, str(device), width * height)
    if per_step:
        layouts = 2 if mode == ISOLATED else 1  # isolation samples a layout, then the branches
        lines.append(f"Estimated time: about {format_seconds(per_step * steps * num_images * layouts)}"
                     f" (measured by this studio's last job on {device.type}).")
    elif device.type == "cpu" and native >= 512:
        lines.append(f"On a CPU a {native} px model takes several seconds a step: {steps} steps x {num_images} image(s)"
                     f" run for minutes. The first job measures it.")
    area = (width * height) / (native * native)
    if device.type == "cpu" and area > 1.5:
        lines.append(f"⚠ {width}x{height} is {area:.0f}x the area of this model's native {native}x{native} on a CPU:"
                     f" expect it to take about {area:.0f} times as long, and models draw best near their native size.")
    return "\n\n".join(lines)


def training_estimate(studio: "Studio", photo_count: int, steps: int, batch_size: int) -> str:
    """What a training run will cost, said before it starts (default steps: 500 per photo / batch)."""
    from pipelines.train import default_steps

    steps = steps or (default_steps(photo_count, batch_size) if photo_count else 0)
    if not steps:
        return ""
    device = studio.models.model.device if studio.models.model is not None else resolve_device(None)
    per_step = studio.speeds.get(("train", studio.base_name, str(device), batch_size))
    if per_step:
        return f"{steps} steps: about {format_seconds(per_step * steps)} (measured by this studio's last training on {device.type})."
    if device.type == "cpu" and studio.default_size >= 512:
        return (f"⚠ {steps} steps on a CPU: an SD1.5 training step takes tens of seconds there, so this would run for"
                f" hours. Train on a GPU, or try `python app.py --demo` (the toy world trains a pet in minutes on a CPU).")
    return f"{steps} steps; the first training on this machine measures how long a step takes."


def history_items(paths: list[str]) -> list[tuple[str, str]]:
    """Gallery items for saved images, each captioned with its prompt, mode and seed (from its PNG)."""
    items = []
    for path in paths:
        try:
            metadata = read_png_metadata(path)
        except (OSError, ValueError):
            metadata = {}
        caption = f"{metadata.get('prompt', '')} · {metadata.get('method', '')} · seed {metadata.get('seed', '?')}" if metadata else ""
        items.append((path, caption[:120]))
    return items


def progress_html(state: JobState | None, idle: str = "") -> str:
    """A job's state as a progress bar with step, loss and ETA, a queue place, or its outcome."""
    if state is None:
        return f"<div class='job-idle'>{html.escape(idle)}</div>"
    title = html.escape(state.title)
    if state.status == QUEUED:
        return f"<div class='job-queued'>⏳ {title}: waiting, number {state.position} in the queue (one GPU job runs at a time)</div>"
    if state.status == RUNNING:
        fraction = state.step / state.total if state.total else 0.0
        details = [f"step {state.step} / {state.total}" if state.total else "starting"]
        if state.loss is not None:
            details.append(f"loss {state.loss:.4f}")
        if state.eta_seconds is not None and state.step:
            details.append(f"ETA {format_seconds(state.eta_seconds)}")
        if state.stage:
            details.append(html.escape(state.stage))
        return (f"<div class='job-running'><b>{title}</b> · {' · '.join(details)}"
                f"<div class='job-bar'><div style='width:{100 * fraction:.1f}%'></div></div></div>")
    if state.status == DONE:
        note = f" <span class='job-note'>⚠ {html.escape(state.message)}</span>" if state.message else ""
        return f"<div class='job-done'>✓ {title}: done{note}</div>"
    icon = "⚠" if state.status == FAILED else "■"
    return f"<div class='job-{state.status}'>{icon} {title}: {state.status}. {html.escape(state.message)}</div>"


def cancel_html(studio: "Studio", kind: str, idle: str) -> str:
    """Cancel the newest job of `kind` and show it once stopped (10 s at most). The job's own stream
    also shows its last state, and this answer may reach the page after it: it must not say "running"."""
    state = studio.cancel_latest(kind)
    if state is not None and state.active:
        state = studio.jobs.wait(state.id, timeout=10)
    return progress_html(state, idle)


def done_html(message: str) -> str:
    """A finished action's message for an HTML status line; concept names like <mochi> stay visible."""
    return f"<div class='library-done'>✓ {html.escape(message)}</div>"


def error_html(error: Exception) -> str:
    return f"<div class='job-failed'>⚠ {html.escape(str(error))}</div>"


def queue_markdown(states: list[JobState]) -> str:
    active = [s for s in states if s.active]
    if not active:
        return "GPU queue: empty"
    lines = [f"- {'running' if s.status == RUNNING else f'waiting ({s.position})'}: {s.title}" for s in active]
    return "GPU queue:\n" + "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The studio: jobs and library actions, no layout


class Studio:
    """What the page can ask for; every method calls `pipelines` and returns plain values."""

    def __init__(self, base_name: str, library_dir: str | os.PathLike, outputs_dir: str | os.PathLike,
                 safety_checker: bool | None = None, detector: str | None = None, segmenter: str | None = None, demo=None,
                 clip: str | None = None, dino: str | None = None, memory: str = "auto", compile: str = "off"):
        self.base_name = base_name
        self.demo = demo  # pipelines.demo.Demo in demo mode (the toy world): its examples, form defaults, banner
        self.library = ConceptLibrary(library_dir)
        self.outputs = Path(outputs_dir).expanduser()
        self.outputs.mkdir(parents=True, exist_ok=True)
        # the safety checker: None follows the platform (on for Hugging Face Spaces, off elsewhere)
        self.models = BaseModels(base_name, safety_enabled(None) if safety_checker is None else safety_checker,
                                 memory=memory, compile=compile, compile_cache=compile_cache_dir(library_dir))
        self.jobs = JobQueue()
        self.library_version = 0  # bumped on every change, so polling pages know to redraw
        self.speeds = SpeedLog()  # seconds per denoising step, measured by this studio's jobs, for estimates
        self.load_problem = base_problem(base_name)
        self._native_size: int | None = None  # read from the base's configs on first use
        self.is_test_model = base_name == TINY
        # the test model pairs with random detectors; a problem loading them is found now and said in the status
        self.detector = detector or (TINY if self.is_test_model else DEFAULT_DETECTOR)
        self.segmenter = segmenter or (TINY if self.is_test_model else DEFAULT_SEGMENTER)
        self.detector_problem = (model_problem("detector", self.detector) if isinstance(self.detector, str) else None) or (
            model_problem("segmenter", self.segmenter) if isinstance(self.segmenter, str) else None)
        # the Score action's models (pipelines.scores), loaded with its first job; the test model pairs with random ones
        self.clip = clip or (TINY if self.is_test_model else DEFAULT_CLIP)
        self.dino = dino or (TINY if self.is_test_model else DEFAULT_DINO)

    @property
    def default_size(self) -> int:
        """The canvas's starting size: the base's native size (64 for tiny and the toy world, 512 for SD1.5)."""
        if self.models.model is not None:
            return self.models.model.native_resolution
        if self._native_size is None:
            self._native_size = native_resolution_of(self.base_name)
        return self._native_size

    def library_changed(self) -> None:
        self.library_version += 1

    # -- status ----------------------------------------------------------------------------------

    def status_markdown(self) -> str:
        """Base model, device, dtype and free GPU memory; a load problem said plainly, with its fix."""
        model = self.models.model
        device = model.device if model is not None else resolve_device(None)
        dtype = model.dtype if model is not None else default_dtype(device)
        problem = self.models.error or (self.load_problem if model is None else None)
        state = "loaded" if model is not None else "cannot be loaded" if problem else "not loaded yet (loads with the first job)"
        lines = [f"**Base model** `{self.base_name}`: {state} · **device** {device} · **dtype** {str(dtype).replace('torch.', '')}"]
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            lines[0] += f" · **free GPU memory** {free / 2**30:.1f} of {total / 2**30:.1f} GiB"
        else:
            lines[0] += " · no GPU"
        lines[0] += f" · **safety checker** {'on' if self.models.safety_checker else 'off'}"
        lines[0] += f" · **detector** {'cannot be loaded' if self.detector_problem else 'ready'}"
        if problem:
            lines.append(f"⚠ **The base model cannot be loaded.** {problem}. Restart with `python app.py --base PATH_OR_ID`,"
                         f" or `python app.py --demo` to try the studio offline on a CPU with the toy world (a small real"
                         f" model of simple animals, with pets already trained).")
        if self.detector_problem:
            lines.append(f"⚠ **Isolated mode and automatic masks are off: the detector cannot be loaded.**"
                         f" {self.detector_problem.replace('--detector', 'python app.py --detector').replace('--segmenter', 'python app.py --segmenter')}.")
        if on_zero_gpu():
            lines.append("This Space runs on shared ZeroGPU hardware: generation works, training needs a dedicated GPU.")
        return "\n\n".join(lines)

    # -- Concepts --------------------------------------------------------------------------------

    def _check_training_allowed(self, auto_mask: bool, untick: str) -> None:
        if on_zero_gpu():
            raise UserError("training is off on this shared ZeroGPU Space: a run takes minutes of a dedicated GPU."
                            " Duplicate the Space onto a GPU (⋮ menu → Duplicate this Space, e.g. an A10G) and train there")
        if auto_mask and self.detector_problem:
            raise UserError(f"automatic masks need the detector, which cannot be loaded: {self.detector_problem}; {untick}")

    def submit_training(self, photo_paths: list[str], config: TrainConfig, auto_mask: bool = False,
                        overwrite: bool = False, resume: bool = False) -> JobState:
        """Check the request now (photos readable, settings valid, name free), then queue the training
        of one pet as `config.kind`: "edlora", "custom-diffusion" or "cones" (TRAIN_KINDS)."""
        self._check_training_allowed(auto_mask, "untick 'Find the pet in each photo automatically' to train without masks")
        if config.kind not in TRAIN_KINDS.values():
            raise UserError(f"kind {config.kind!r} is not one pet's; pick {', '.join(f'{k} ({v})' for k, v in TRAIN_KINDS.items())};"
                            f" a group of pets trains in 'Train a group together (Gen4Gen)'")
        if not photo_paths:
            raise UserError("no photos given; drop 3 or more photos of one pet in the photo box")
        photos, notes = load_photos(photo_paths)  # loaded now: upload temp files may vanish
        name, note = normalise_name(config.name)  # "Buddy" trains <buddy>; the note comes with the result
        notes += [note] if note else []
        config = replace(config, name=name)
        config = check_cones_config(config, len(photos)) if config.kind == "cones" else check_train_config(config, len(photos))
        if config.name in self.library.names() and not overwrite:
            raise UserError(f"a concept named <{config.name}> already exists; choose another name or tick 'replace'")
        if not config.preview_every:
            config = replace(config, preview_every=max(1, config.steps // 5))  # about five previews per run
        kind = "" if config.kind == "edlora" else f" ({KIND_NAMES[config.kind]})"
        return self.jobs.submit("train", f"training <{config.name}>{kind}",
                                lambda job: run_training(self, job, photos, config, auto_mask, resume, notes))

    def _train(self, job: Job, photos: list[Image.Image], config: TrainConfig, auto_mask: bool, resume: bool, notes: list[str]) -> str:
        job.update(stage="loading the base model")
        base = self.models.get(fresh=True)
        self.models.trained_in = True  # from here on the base carries this run's adapters (Cones: its words)
        masks = self._find_pets(job, base, photos, config.class_word, notes) if auto_mask else None
        result = train_concept(base, photos, config, masks=masks, callback=self._reporter(job, base, config),
                               cancel=job.cancel_event, checkpoint_dir=self.library.root / ".checkpoints" / config.name, resume=resume)
        self.library.save(result.concept, result.tensors, result.preview, overwrite=True)
        self.library_changed()
        job.update(message="; ".join(notes))
        return config.name

    def submit_group_training(self, group: str, pets: list[tuple[str, str, list[str]]], config: TrainConfig,
                              background_paths: list[str] | None = None, background_prompt: str = "", auto_mask: bool = False,
                              overwrite: bool = False, resume: bool = False) -> JobState:
        """Check a group's request now, then queue training its pets together (`train_group`).

        pets: (name, class word, photo paths) per pet; a slot left wholly empty is skipped, 2 or 3 must remain.
        config: kind "joint" or "custom-diffusion" and the run's settings; its name and class word are set here.
        background_paths: photos of empty scenes (say what they show in `background_prompt`); none with a
            prompt: the base model draws the scenes when training starts; neither: plain black (MuDI).
        """
        self._check_training_allowed(auto_mask, "untick 'Find each pet in its photos automatically' to train without masks")
        background_prompt = (background_prompt or "").strip()
        if not (group or "").strip():
            raise UserError("no group name given; type one, e.g. pals (it names the group's shared weights, not a prompt word)")
        group_name, note = normalise_name(group)
        check_name(group_name, "group name")
        members, notes = group_members(pets)
        notes += [f"group name {group.strip()!r} is stored as {group_name!r}"] if note else []
        names = [m.name for m in members]
        if group_name in names:
            raise UserError(f"the group's name {group_name!r} is also a pet's; give the group its own name, e.g. {'-'.join(names)}")
        taken = [n for n in names if n in self.library.names()]
        if taken and not overwrite:
            raise UserError(f"the library already has {', '.join(f'<{n}>' for n in taken)}; rename the pet(s) or tick 'replace'")
        backgrounds = [load_photo(p) for p in background_paths or []]  # train_group blurs them as Gen4Gen does
        if backgrounds and not background_prompt:
            raise UserError("background photos need a background prompt that says what they show, e.g. 'in a garden'")
        if config.kind not in GROUP_KINDS.values():
            raise UserError(f"a group trains as {' or '.join(f'{k} ({v})' for k, v in GROUP_KINDS.items())}, not {config.kind!r}")
        if not config.multi_subject_probability > 0:
            raise UserError(f"the chance of a composite is {config.multi_subject_probability}: a group learns from composites of"
                            f" its pets; use {GROUP_COMPOSITE_CHANCE} (the default)")
        config = replace(config, name=group_name, class_word=members[0].class_word)
        config = check_train_config(config, sum(len(m.photos) for m in members))
        if not config.preview_every:
            config = replace(config, preview_every=max(1, config.steps // 5))
        return self.jobs.submit("train", f"training the group {group_name} ({' + '.join(f'<{n}>' for n in names)})",
                                lambda job: run_group_training(self, job, members, config, backgrounds, background_prompt,
                                                               auto_mask, resume, notes))

    def _train_group(self, job: Job, members: list[GroupMember], config: TrainConfig, backgrounds: list[Image.Image],
                     background_prompt: str, auto_mask: bool, resume: bool, notes: list[str]) -> list[str]:
        job.update(stage="loading the base model")
        base = self.models.get(fresh=True)
        self.models.trained_in = True
        if auto_mask:
            for i, member in enumerate(members):
                found = self._find_pets(job, base, member.photos, member.class_word, notes, member.name)
                # not found: the whole photo is the pet (as a photo without a mask is pasted whole)
                members[i] = replace(member, masks=[mask or Image.new("L", photo.size, 255) for photo, mask in zip(member.photos, found)])
        if background_prompt and not backgrounds:
            job.update(stage=f"drawing backgrounds: {background_prompt}")
        results = train_group(base, members, config, backgrounds=backgrounds or None, background_prompt=background_prompt,
                              callback=self._reporter(job, base, config), cancel=job.cancel_event,
                              checkpoint_dir=self.library.root / ".checkpoints" / config.name, resume=resume)
        for result in results:
            self.library.save(result.concept, result.tensors, result.preview, overwrite=True)
        self.library_changed()
        job.update(message="; ".join(notes))
        return [result.concept.name for result in results]

    def composite_preview(self, pets: list[tuple[str, str, list[str]]], background_paths: list[str] | None = None,
                          background_prompt: str = "", auto_mask: bool = False, seed: int = 0) -> tuple[list[Image.Image], str]:
        """Composites of the group's pets as training makes them (`preview_composites`), at the base's
        native size, and a line saying what differs from training. Runs at once: no model is needed."""
        background_prompt = (background_prompt or "").strip()
        members, _ = group_members(pets, need_names=False)
        backgrounds = load_backgrounds(background_paths) if background_paths else None  # blurred as training blurs them
        images = preview_composites([(m.photos, None) for m in members], backgrounds, self.default_size, COMPOSITE_PREVIEWS, seed)
        notes = []
        if not backgrounds:
            notes.append("plain black backgrounds (MuDI's Seg-Mix)" + (
                f"; training draws scenes of '{background_prompt}' with the base model when it starts, which"
                f" this preview leaves out" if background_prompt else ""))
        if auto_mask:
            notes.append("each pet is pasted as its whole photo here; training cuts it out with the detector's mask")
        else:
            notes.append("each pet is pasted as its whole photo (tick 'Find each pet in its photos automatically' to cut it out)")
        return images, f"{len(images)} composites of {' + '.join(m.name for m in members)}: " + "; ".join(notes) + "."

    def _find_pets(self, job: Job, base, photos: list[Image.Image], class_word: str, notes: list[str], name: str = "") -> list:
        """The detector's mask of `class_word` in each photo (None where it finds none, with a note)."""
        job.update(stage=f"finding the {class_word} in each photo" + (f" of <{name}>" if name else ""))
        masks = [subject_mask(p, class_word, detector=self.detector, segmenter=self.segmenter, device=base.device) for p in photos]
        missing = [str(i + 1) for i, m in enumerate(masks) if m is None]
        if missing:
            whose = f" of <{name}>" if name else ""
            notes.append(f"no {class_word} found in photo(s) {', '.join(missing)}{whose}; their loss covers the whole photo")
        return masks

    def _reporter(self, job: Job, base, config: TrainConfig):
        """The training callback: the job's step, loss, ETA and previews (saved under outputs/.training)."""
        preview_dir = self.outputs / ".training" / f"{job.id}-{config.name}"
        started = time.perf_counter()

        def report(progress) -> None:
            job.update(step=progress.step, total=progress.total, loss=progress.loss, eta_seconds=progress.eta_seconds,
                       stage="" if progress.step < progress.total else "drawing the final preview and saving")
            self.speeds.record(("train", self.base_name, str(base.device), config.batch_size),
                               (time.perf_counter() - started) / progress.step)
            if progress.preview is not None:
                path = preview_dir / f"step_{progress.step:05d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                progress.preview.save(path)
                job.add_preview(str(path))

        return report

    def cancel_latest(self, kind: str) -> JobState | None:
        """Cancel the newest queued or running job of `kind` ("train", "fuse" or "generate"); None if there is none."""
        latest = self.jobs.latest(kind)
        return self.jobs.cancel(latest.id) if latest is not None and latest.active else None

    def cancel_training(self) -> JobState | None:
        latest = next((s for s in reversed(self.jobs.jobs("train")) if s.active), None)
        return self.jobs.cancel(latest.id) if latest else None

    def rename(self, name: str, new_name: str) -> str:
        if not name:
            raise UserError("pick a concept to rename first")
        self.library.rename(name, new_name.strip())
        self.library_changed()
        return f"renamed <{name}> to <{new_name.strip()}>"

    def delete(self, name: str) -> str:
        if not name:
            raise UserError("pick a concept to delete first")
        self.library.delete(name)
        self.library_changed()
        return f"deleted <{name}>"

    def export(self, name: str) -> str:
        if not name:
            raise UserError("pick a concept to export first")
        return str(self.library.export(name, self.outputs / ".exports" / f"{name}.safetensors"))

    def import_concept(self, path: str, name: str = "") -> str:
        """Refuse a concept of another architecture now, not at Generate: checked against the loaded base,
        or before it loads against the architecture its configs describe (no weights read)."""
        base = self.models.model or architecture_of(self.base_name)
        concept = self.library.import_file(path, name=name.strip() or None, base=base)
        self.library_changed()
        return f"imported <{concept.name}> ({concept.class_word})"

    def submit_webui_export(self, name: str) -> JobState:
        """Queue concept `name` as one zip of what A1111, Forge and ComfyUI load (`export_for_webui`:
        the kohya LoRA, the distilled textual-inversion embedding, README.txt). A job, because
        distilling the embedding runs the base's text encoder; the result is the zip's path."""
        if not name:
            raise UserError("pick a concept to export first")
        self.library.get(name)  # unknown or damaged: refused now
        return self.jobs.submit("export", f"exporting <{name}> for A1111, ComfyUI and Forge",
                                lambda job: run_webui_export(self, job, name))

    def _export_webui(self, job: Job, name: str) -> str:
        job.update(stage="loading the base model", step=0, total=2)
        base = self.models.get()
        job.update(stage="distilling the embedding and writing the files", step=1)
        exports = self.outputs / ".exports"
        folder = exports / f".{name}-webui-{uuid.uuid4().hex[:8]}"  # a fresh folder: the zip holds only this export
        try:
            export_for_webui(self.library, name, folder, how="distil", base=base)
            zipped = str(zip_folder(folder, exports / f"{name}-webui.zip"))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        job.update(step=2)
        return zipped

    def submit_import(self, path: str | None, name: str, class_word: str, trigger: str = "", trigger_prompt: str = "",
                      kind: str = "lora", overwrite: bool = False) -> JobState:
        """Check an import of another tool's file now (file, name, class word, trigger), then queue it:
        it reads the base model's vocabulary and layers, so it waits for the base like any GPU job.

        kind: "lora" (a kohya, A1111, diffusers or peft LoRA; <name> stands for "trigger class_word")
            or "mix-of-show" (Mix-of-Show's ED-LoRA checkpoint, .pth).
        """
        if kind not in IMPORT_KINDS.values():
            raise UserError(f"import kind {kind!r} is not known; use {' or '.join(IMPORT_KINDS.values())}")
        if not path:
            raise UserError("no file given; drop the LoRA (.safetensors) or Mix-of-Show checkpoint (.pth) in the file box")
        source = Path(path)
        if not source.is_file():
            raise UserError(f"import file {source.name!r} is gone; upload it again")
        if not (name or "").strip():
            raise UserError("no name given; type the concept's name, e.g. rex (prompts then write <rex>)")
        name, note = normalise_name(name)
        check_name(name)
        if name in self.library.names() and not overwrite:
            raise UserError(f"a concept named <{name}> already exists; choose another name or tick 'replace'")
        class_word = check_class_word(class_word or "")
        if kind == "lora":
            trigger = check_trigger(trigger or "")
        staged = self.outputs / ".imports" / uuid.uuid4().hex[:8] / source.name  # the upload's temp file may vanish
        staged.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, staged)
        return self.jobs.submit("import", f"importing {source.name} as <{name}>",
                                lambda job: run_import(self, job, kind, staged, name, class_word, trigger,
                                                       trigger_prompt.strip() or None, overwrite, note))

    def _import(self, job: Job, kind: str, file: Path, name: str, class_word: str, trigger: str,
                trigger_prompt: str | None, overwrite: bool, note: str) -> str:
        try:
            job.update(stage="loading the base model")
            base = self.models.model or self.models.get()  # only read (vocabulary, layer shapes): any loaded state fits
            job.update(stage=f"reading {file.name}")
            if kind == "lora":
                concept = import_lora(self.library, file, name, class_word, trigger, base, trigger_prompt=trigger_prompt,
                                      overwrite=overwrite)
                what = f"a {concept.source_format} LoRA; <{concept.name}> stands for \"{concept.trigger} {concept.class_word}\""
            else:
                concept = import_mix_of_show(self.library, file, name, class_word, base, overwrite=overwrite)
                what = "a Mix-of-Show checkpoint"
        finally:
            shutil.rmtree(file.parent, ignore_errors=True)
        self.library_changed()
        job.update(message=note)
        return f"imported <{concept.name}> ({concept.class_word}) from {file.name}, {what}"

    # -- Compose ---------------------------------------------------------------------------------

    def fusion_method(self, names: list[str], method: str = "auto") -> str:
        """The merge `method` names for concepts `names` ("auto": the first their kinds allow), checked
        now: unknown concepts, and kinds that cannot be merged, are refused before any job starts."""
        if len(names) < 2:
            raise UserError("no concepts selected; tick two or more concepts to fuse" if not names else
                            "fusing needs two or more concepts; one concept is used as it is")
        return resolve_method([self.library.get(name) for name in names], method)

    def submit_fusion(self, names: list[str], method: str = "auto") -> JobState:
        method = self.fusion_method(names, method)
        return self.jobs.submit("fuse", f"fusing {' + '.join('<' + n + '>' for n in names)} ({method})",
                                lambda job: run_fusion(self, job, names, method))

    def _fuse(self, job: Job, names: list[str], method: str) -> str:
        job.update(stage="loading the base model")
        base = self.models.get(fused=self.models.fused_folder(self.library, names, method))

        def report(stage: str, done: int, total: int) -> None:
            job.update(stage=stage, step=done, total=total)

        fused = fuse_concepts(base, self.library, names, FusionConfig(method=method), callback=report, cancel=job.cancel_event)
        self.library_changed()
        return str(fused.folder)

    def fused_models(self) -> list[dict]:
        """The cached fused models that fit the base: every one of its architecture once it is loaded;
        before that, those made on the base of this name (loading it only to list would take a minute)."""
        if self.models.model is not None:
            return list_fused(self.library, base=self.models.model)
        return [r for r in list_fused(self.library) if r.get("base_model") == self.models.name and r.get("format") == FUSED_FORMAT]

    def submit_checkpoint_export(self, folder: str | None, half: bool = False) -> JobState:
        """Queue writing the fused model in `folder` as one checkpoint in the original SD layout, with
        an embedding per concept and a README (`export_fused_checkpoint`), under outputs/.exports/checkpoints/."""
        if not folder:
            raise UserError("no fused model selected; click one in the table of fused models first")
        record = next((r for r in self.fused_models() if r["folder"] == str(folder)), None)
        if record is None:
            raise UserError(f"fused model {Path(folder).name!r} is not in the library or does not fit this base; fuse the concepts again")
        stem = f"{'-'.join(record['concepts'])}-{record['method']}"
        stem = stem if len(stem) <= 80 else f"fused-{Path(folder).name}"  # fourteen concepts' names make too long a file name
        out, _, _ = check_out_path(self.outputs / ".exports" / "checkpoints" / f"{stem}.safetensors")
        return self.jobs.submit("export", f"exporting {' + '.join('<' + n + '>' for n in record['concepts'])} as one checkpoint",
                                lambda job: run_checkpoint_export(self, job, str(folder), out, half))

    def _export_checkpoint(self, job: Job, folder: str, out: Path, half: bool) -> list[str]:
        job.update(stage="loading the base model", step=0, total=2)
        # the base becomes the fused model, as for a generation with it; in float32, where the fused
        # updates are exact (a half-precision base has already rounded them; fp16 is written from that)
        base = self.models.get(fused=folder, dtype=torch.float32)
        job.update(stage=f"writing {out.name} ({'fp16' if half else 'fp32'})", step=1)
        checkpoint = export_fused_checkpoint(base, folder, out, half=half)
        _, embeddings, readme = export_paths(checkpoint)
        job.update(step=2)
        return [str(checkpoint), str(readme), *sorted(str(p) for p in embeddings.glob("*.safetensors"))]

    # -- Generate --------------------------------------------------------------------------------

    def submit_generation(self, request: GenerationRequest) -> JobState:
        """Check what the library and the form can check, then queue the generation."""
        if not request.prompt.strip():
            raise UserError("the prompt is empty; describe the whole picture, e.g. 'a dog and a cat in a hot spring'")
        check_rows(list(request.rows), self.library)
        if request.fused is None:
            for name in concepts_in(request.prompt) + concepts_in(request.negative_prompt):
                self.library.get(name)  # unknown or damaged concepts fail now, not in the queue
        if request.mode == ISOLATED and not request.rows:
            raise UserError("Isolated mode needs subjects: draw a box for each pet and label it with its concept")
        if request.mode == ISOLATED and self.detector_problem:
            raise UserError(f"Isolated mode needs the detector, which cannot be loaded: {self.detector_problem}")
        if request.mode not in (REGIONAL, ISOLATED):
            raise UserError(f"unknown mode {request.mode!r}; pick {REGIONAL} or {ISOLATED}")
        names = request_concepts(request)
        if request.mode == REGIONAL and request.fused is None and len(names) > 1:  # fused on the fly: kinds that cannot merge, said now
            resolve_method([self.library.get(name) for name in names], "auto")
        kind = "isolated" if request.mode == ISOLATED else "regional"
        return self.jobs.submit("generate", f"generating ({kind}, seed {request.seed})",
                                lambda job: run_generation(self, job, request))

    def _generate(self, job: Job, request: GenerationRequest) -> GenerationOutput:
        names = request_concepts(request)
        job.update(stage="loading the base model")
        fuses_on_the_fly = request.mode == REGIONAL and request.fused is None and len(names) > 1
        base = self.models.get(fused=request.fused or (self.models.fused_folder(self.library, names) if fuses_on_the_fly else None))
        if fuses_on_the_fly:
            job.update(stage=f"fusing {len(names)} concepts (first time only; cached)")
        if request.mode == ISOLATED:
            return self._isolate(job, base, request)
        config = SampleConfig(prompt=request.prompt, negative_prompt=request.negative_prompt, steps=request.steps,
                              guidance=request.guidance, seed=request.seed, width=request.width, height=request.height,
                              num_images=request.num_images)
        clock = StepClock(job, "sampling")
        result = generate(base, self.library, config, regions=regions_of(list(request.rows)), fused=request.fused,
                          callback=clock, cancel=job.cancel_event, layout=layout_of(request))
        self.speeds.record(speed_key("generate", base, request), clock.seconds_per_step())
        stem = self._new_stem()
        paths = [str(save_png(image, self.outputs / f"{stem}-{i + 1}.png", self._metadata(result.metadata, request, i)))
                 for i, image in enumerate(result.images)]
        note = "; ".join(n for n in (blocked_note(result.blocked, len(result.images)), result.metadata.get("fused_note", "")) if n)
        job.update(message=note)
        return GenerationOutput(images=paths, message=note)

    def _isolate(self, job: Job, base, request: GenerationRequest) -> GenerationOutput:
        output, stem = GenerationOutput(), self._new_stem()
        if isinstance(self.detector, str):  # a named model loads now (the demo's oracle is already there)
            job.update(stage="loading the detector (Grounding DINO + SAM)")
        for i in range(request.num_images):  # isolation makes one image per call: seeds seed, seed + 1, ...
            config = isolate_config(request, i)

            clocks: dict[str, StepClock] = {}  # one per stage (layout, isolate): their steps cost differently

            def report(stage: str, step: int, total: int, index=i) -> None:
                clocks.setdefault(stage, StepClock(job, f"image {index + 1}/{request.num_images}: {stage}"))(step, total)

            result = isolate(base, self.library, config, detector=self.detector, segmenter=self.segmenter,
                             fused=request.fused, callback=report, cancel=job.cancel_event)
            metadata = self._metadata(result.metadata, request, i)
            output.images.append(str(save_png(result.final, self.outputs / f"{stem}-{i + 1}.png", metadata)))
            stages = save_stages(replace(result, metadata=metadata), self.outputs / ".stages" / f"{stem}-{i + 1}")
            output.stages += [(str(p), stage_caption(p, i, bool(result.assignments))) for p in stages]
            lines = describe_boxes(result)
            output.boxes += [f"Image {i + 1}: {line}" for line in lines] if request.num_images > 1 else lines
            if result.message:
                output.message = result.message
        if result.metadata.get("fused_note"):
            output.message = "; ".join(n for n in (output.message, result.metadata["fused_note"]) if n)
        job.update(message=output.message)
        return output

    def _metadata(self, metadata: dict, request: GenerationRequest, index: int) -> dict:
        """The pipeline's record plus the studio's form, so "reuse settings" can restore the boxes."""
        studio = {**asdict(request), "rows": [asdict(row) for row in request.rows]}
        return {**metadata, "index": index, "studio": studio}

    def _new_stem(self) -> str:
        return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"

    def history(self) -> list[str]:
        """Saved images, newest first (they survive restarts: the folder is the record)."""
        images = sorted(self.outputs.glob("*.png"), key=lambda p: p.stat().st_mtime, reverse=True)
        return [str(p) for p in images[:HISTORY_LIMIT]]

    # -- Scores ----------------------------------------------------------------------------------

    def score_concepts(self, paths: list[str]) -> list[str]:
        """The concepts the images show, as their PNGs' settings name them, in order, each once."""
        names = []
        for path in paths:
            try:
                shown = read_png_metadata(path).get("concepts")
            except (OSError, ValueError):
                shown = None
            names += [n for n in shown if isinstance(n, str)] if isinstance(shown, list) else []
        return list(dict.fromkeys(names))

    def submit_scoring(self, paths: list[str], references: dict[str, list[str]]) -> JobState:
        """Check a Score request now (images, a class word and reference photos per concept, models
        loadable), then queue it: CLIP, DINO and the detector run like any GPU job.

        references: {concept name: paths of its reference photos}; the library keeps no training photos.
        """
        if self.demo is not None:
            raise UserError(DEMO_SCORE_NOTE)
        paths = [str(p) for p in paths or [] if p]
        if not paths:
            raise UserError("no image to score; generate one, or click one in Images or History")
        names = self.score_concepts(paths)
        if not names:
            raise UserError("the image(s) name no concept in their settings (not made by this studio with a <concept>);"
                            " scores compare each concept with its reference photos")
        if len(names) > SCORE_SLOTS:
            raise UserError(f"the image(s) show {len(names)} concepts; score at most {SCORE_SLOTS} at a time (click one image)")
        concepts = {}
        for name in names:
            if name not in self.library.names():
                raise UserError(f"the image shows <{name}>, which is not in the library, so its class word is unknown;"
                                f" scores need it to find the pet")
            files = [f for f in references.get(name) or [] if f]
            if not files:
                raise UserError(f"no reference photos of <{name}>; drop a few photos of the pet in its box under Score"
                                f" (the library keeps no training photos)")
            concepts[name] = (self.library.get(name).class_word, [load_photo(f) for f in files])  # loaded now: uploads may vanish
        problem = score_model_problem("clip", self.clip) or score_model_problem("dino", self.dino)  # its --clip/--dino are app.py's too
        if problem:
            raise UserError(problem)
        return self.jobs.submit("score", f"scoring {len(paths)} image(s)", lambda job: run_scoring(self, job, paths, concepts))

    def _score(self, job: Job, paths: list[str], concepts: dict) -> list[dict]:
        job.update(stage="loading CLIP, DINO and the detector")
        detector = None if self.detector_problem else self.detector
        models = load_score_models(self.clip, self.dino, detector)
        job.update(stage=f"scoring {len(paths)} image(s)")
        rows = score_images(paths, concepts, models)
        notes = []
        if detector is None:
            notes.append(f"CP-CLIP and SCR need the detector, which cannot be loaded: {self.detector_problem}")
        if TINY in (self.clip, self.dino):
            notes.append("scored with random test models (tiny): the numbers mean nothing")
        job.update(message="; ".join(notes))
        return rows

    def follow(self, job_id: int, interval: float = 0.3):
        """Yield the job's state until it has finished (the last one yielded is final)."""
        while True:
            state = self.jobs.snapshot(job_id)
            yield state
            if state is None or not state.active:
                return
            time.sleep(interval)


# The work of each job, wrapped for ZeroGPU (which needs module-level functions to attach a GPU to).
@gpu_task
def run_training(studio: Studio, job: Job, photos, config: TrainConfig, auto_mask: bool, resume: bool, notes: list[str]) -> str:
    return studio._train(job, photos, config, auto_mask, resume, notes)


@gpu_task
def run_group_training(studio: Studio, job: Job, members: list[GroupMember], config: TrainConfig, backgrounds: list,
                       background_prompt: str, auto_mask: bool, resume: bool, notes: list[str]) -> list[str]:
    return studio._train_group(job, members, config, backgrounds, background_prompt, auto_mask, resume, notes)


@gpu_task
def run_fusion(studio: Studio, job: Job, names: list[str], method: str) -> str:
    return studio._fuse(job, names, method)


@gpu_task
def run_generation(studio: Studio, job: Job, request: GenerationRequest) -> GenerationOutput:
    return studio._generate(job, request)


@gpu_task
def run_import(studio: Studio, job: Job, *args) -> str:
    return studio._import(job, *args)


@gpu_task
def run_webui_export(studio: Studio, job: Job, name: str) -> str:
    return studio._export_webui(job, name)


@gpu_task
def run_checkpoint_export(studio: Studio, job: Job, folder: str, out: Path, half: bool) -> list[str]:
    return studio._export_checkpoint(job, folder, out, half)


@gpu_task
def run_scoring(studio: Studio, job: Job, paths: list[str], concepts: dict) -> list[dict]:
    return studio._score(job, paths, concepts)


def request_concepts(request: GenerationRequest) -> list[str]:
    """The concepts a generation names (prompt, negative prompt, boxes), each once, in order."""
    return list(dict.fromkeys(concepts_in(request.prompt) + concepts_in(request.negative_prompt)
                              + [n for row in request.rows for n in concepts_in(row.prompt + " " + row.negative_prompt)]))


def load_photos(paths: list[str]) -> tuple[list[Image.Image], list[str]]:
    """Photos read now (an upload's temp file may vanish), and the loader's warnings as notes ("only 2 photos")."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        photos, _ = load_training_set([Path(p) for p in paths])
    return photos, [str(w.message) for w in caught]


def group_members(pets: list[tuple[str, str, list[str]]], need_names: bool = True) -> tuple[list[GroupMember], list[str]]:
    """The group form's pets, (name, class word, photo paths) each, as GroupMembers with their photos
    loaded and names stored lowercase, and notes for the result. A slot left wholly empty is
    skipped; a half-filled one, fewer than two pets or a name given twice is refused.
    need_names=False (the composite preview): only the photos count, and a pet is called "pet N"."""
    members, notes = [], []
    for slot, (name, class_word, paths) in enumerate(pets, start=1):
        name, class_word, paths = (name or "").strip(), (class_word or "").strip(), list(paths or [])
        if not need_names:
            if paths:
                members.append(GroupMember(f"<{name}>" if name else f"pet {slot}", class_word, load_photos(paths)[0]))
            continue
        if not (name or class_word or paths):
            continue
        if not name:
            raise UserError(f"pet {slot} has no name; type one, e.g. mochi (prompts then write <mochi>), or clear its slot")
        if not paths:
            raise UserError(f"pet {slot} (<{name}>) has no photos; drop 3 or more photos of it in its photo box")
        stored, note = normalise_name(name)
        check_name(stored, f"pet {slot}'s name")
        if not class_word:
            raise UserError(f"pet {slot} (<{stored}>) has no class word; type one plain word for what it is, e.g. dog")
        class_word = check_class_word(class_word)
        photos, loaded = load_photos(paths)
        notes += [f"<{stored}>: {n}" for n in loaded] + ([note] if note else [])
        members.append(GroupMember(stored, class_word, photos))
    if len(members) < 2:
        what = "photos" if not need_names else "name, class word and photos"
        raise UserError(f"a group needs two or three pets, {len(members)} given; fill in the {what} of at least two")
    names = [m.name for m in members]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"{', '.join(f'<{n}>' for n in twice)} is named twice in the group; give each pet its own name")
    return members, notes


def zip_folder(folder: Path, out: Path) -> Path:
    """The files of `folder` (not its subfolders) in a zip at `out`, written to a temporary name and renamed."""
    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for file in sorted(p for p in folder.iterdir() if p.is_file()):
                archive.write(file, file.name)

    return write_atomic(out, write)


def request_from_metadata(metadata: dict, default_size: int) -> GenerationRequest:
    """The form that made an image, from its PNG metadata (the studio's own record, or the CLI's)."""
    studio = metadata.get("studio")
    if studio:
        rows = tuple(BoxRow(**{**row, "box": tuple(row["box"])}) for row in studio.get("rows", []))
        known = {f.name for f in fields(GenerationRequest)}  # an image from an older studio may carry retired settings
        return GenerationRequest(**{**{key: value for key, value in studio.items() if key in known}, "rows": rows})

    def label(prompt: str) -> str:
        names = concepts_in(prompt)
        return f"<{names[0]}>" if names else prompt

    isolated = metadata.get("method") == "isolated"
    if isolated:  # the CLI's `isolate --box`: one subject per box
        rows = tuple(BoxRow(label=label(s["prompt"]), box=tuple(box), prompt=s["prompt"], find=s["label"])
                     for s, box in zip(metadata.get("subjects", []), metadata.get("boxes") or []))
    else:
        rows = tuple(BoxRow(label=label(r["prompt"]), box=tuple(r["box"]), prompt=r["prompt"], negative_prompt=r.get("negative_prompt", ""))
                     for r in metadata.get("regions", []))
    layout = metadata.get("layout") or {}
    settings = {"bounded_self_attention": layout.get("self_attention", DEFAULT_LAYOUT.self_attention),
                "bootstrap": layout.get("bootstrap", DEFAULT_LAYOUT.bootstrap),
                "bounded_guidance": layout.get("guidance", DEFAULT_LAYOUT.guidance)}
    if isolated:
        settings.update({key: metadata[key] for key in ("t_lay", "box_threshold", "text_threshold", "layout_self_attention",
                                                        "layout_cross_attention", "layout_retries", "added_bootstrap") if key in metadata})
    return GenerationRequest(
        mode=ISOLATED if isolated else REGIONAL, prompt=metadata.get("prompt", ""),
        negative_prompt=metadata.get("negative_prompt", ""), width=metadata.get("width") or default_size,
        height=metadata.get("height") or default_size, seed=metadata.get("seed", 0), steps=metadata.get("steps", 30),
        guidance=metadata.get("guidance", 7.5), num_images=metadata.get("num_images", 1), rows=rows, **settings)


# ---------------------------------------------------------------------------------------------
# The library as the page shows it


def library_rows(library: ConceptLibrary) -> tuple[list, list[list]]:
    """Gallery items (preview, caption) and table rows for every concept in the library; a damaged
    one has a row saying what is wrong (it can still be picked for Delete) and no gallery item."""
    gallery, rows = [], []
    for concept in library.list():
        preview = library.preview_path(concept.name)
        kind = KIND_NAMES.get(concept.kind, concept.kind)
        caption = f"{concept.token} · {concept.class_word} · {kind} · {concept.photo_count} photos"
        if concept.is_test_model:
            caption += " · test model (noise)"
        if preview is not None:
            gallery.append((str(preview), caption))
        try:
            size = human_size((library.path(concept.name) / WEIGHTS_FILE).stat().st_size)
        except OSError:  # deleted since it was listed: the next redraw drops its row
            size = ""
        rows.append([concept.token, concept.class_word, concept.photo_count, short_base_name(concept.base_model), kind,
                     group_label(concept), size, concept.created, ""])
    for name, problem in library.damaged().items():
        rows.append([f"<{name}>", *[""] * (len(LIBRARY_COLUMNS) - 2), f"⚠ {problem}"])
    return gallery, rows


def human_size(size: int) -> str:
    """A file size as the library table shows it: 812 B, 5.9 KB, 4.4 MB, 1.2 GB (1 KB = 1024 bytes)."""
    if size < 1024:
        return f"{size} B"
    for unit, scale in (("KB", 1024), ("MB", 1024**2), ("GB", 1024**3)):
        if size < scale * 1024 or unit == "GB":
            value = size / scale
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"


def group_label(concept) -> str:
    """The library's group cell: the joint group a concept was trained in, with its fellow members; "" for one trained alone."""
    if not concept.group:
        return ""
    others = [f"<{m}>" for m in concept.members if m != concept.name]
    return f"{concept.group} (with {', '.join(others)})" if others else concept.group


def short_base_name(name: str) -> str:
    """A base model as the library table shows it: a Hub id or "tiny" as it is, a local folder or
    checkpoint file by its own name (not the absolute path of the machine it was trained on)."""
    if name == TINY or _is_hub_id(name):
        return name
    return Path(name.replace("\\", "/").rstrip("/")).name or name  # a Windows path too


def usable_names(library: ConceptLibrary) -> list[str]:
    """The concepts the Compose and Generate pickers offer: damaged ones are left out."""
    return [concept.name for concept in library.list()]


def merge_choices(library: ConceptLibrary, names: list[str]) -> tuple[list[tuple[str, str]], str]:
    """The Compose method control for concepts `names`: ("automatic: <default>", "auto") and each merge
    their kinds allow (`merge_methods`), and "" or why they cannot be merged (then only "auto", which
    Fuse refuses with the same words). Unknown or damaged names are left to Fuse to refuse."""
    try:
        records = [library.get(name) for name in names or []]
    except UserError:
        return [("automatic", "auto")], ""
    allowed = merge_methods([r.kind for r in records], [r.group for r in records])
    if not allowed:
        try:
            resolve_method(records, "auto")
        except UserError as error:
            return [("automatic", "auto")], str(error)
        return [("automatic", "auto")], "these concepts cannot be merged into one model"  # resolve_method always says why
    return [(f"automatic ({METHOD_LABELS[allowed[0]]})", "auto")] + [(METHOD_LABELS[m], m) for m in allowed], ""


def fused_rows(records: list[dict]) -> list[list]:
    return [[" + ".join(f"<{n}>" for n in r["concepts"]), r["method"], r.get("created", ""), Path(r["folder"]).name] for r in records]


def fused_report(record: dict) -> dict:
    """The fusion report stored beside a fused model ({} if it has none)."""
    path = Path(record["folder"]) / REPORT_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def report_rows(report: dict) -> list[list]:
    """Per concept: mean and max relative output error of the method, and of weight averaging."""
    return [[f"<{name}>", round(s["mean_relative_error"], 5), round(s["max_relative_error"], 5),
             round(s["weight_average_mean_relative_error"], 5)] for name, s in report.get("summary", {}).items()]


def report_flags(report: dict) -> str:
    """Markdown warning for the layers the fusion report flags (far above their peers), '' if none."""
    flagged = report.get("outliers", [])
    if not flagged:
        return ""
    lines = [f"- `{r['layer']}` keeps &lt;{r['concept']}&gt; with relative error {r['relative_error']:.3f},"
             f" {r['relative_error'] / max(r['median_of_kind'], 1e-12):.0f}x the median of its kind" for r in flagged[:8]]
    more = f"\n- … and {len(flagged) - 8} more" if len(flagged) > 8 else ""
    return (f"⚠ **{len(flagged)} layer(s) fused far worse than their peers.** One eigenvalue cutoff serves every layer;"
            f" where it drops directions a concept needs, fuse again with a smaller cutoff"
            f" (`python -m pipelines fuse --rcond 1e-4`, docs/architecture.md).\n" + "\n".join(lines) + more)


def webui_export_note() -> str:
    """What the A1111/ComfyUI export loses, as measured in the toy world: the note its README.txt carries."""
    return f"**A1111, ComfyUI, Forge:** {COLLAPSE_LOSS_NOTE.format(class_word='animal of its class')}"


def score_intro(studio: "Studio") -> str:
    """The Score section's explanation; in demo mode, why it does not run there."""
    if studio.demo is not None:
        return f"⚠ {DEMO_SCORE_NOTE}."
    return ("Scores the image you last clicked in Images or History, or the last generation's images: CLIP-T (prompt),"
            " CLIP-I and DINO-I (each pet against its reference photos), CP-CLIP and TI-CLIP (Gen4Gen: detector crops"
            " matched to the pets; a missing pet scores 0) and SCR (the share of pets that collapsed, 0 is best)."
            " The library keeps no training photos: drop a few photos of each pet below. The models"
            f" (`{studio.clip}`, `{studio.dino}`, the detector) load with the first Score.")


def reference_label(name: str, library: ConceptLibrary) -> str:
    """The label of a concept's reference-photo upload."""
    try:
        return f"Reference photos of <{name}> ({library.get(name).class_word})"
    except UserError as error:  # deleted or damaged since the image was made: Score says so too
        return f"<{name}>: cannot be scored ({error})"


def score_rows(rows: list[dict]) -> list[list]:
    """The Score table: one row per image (its file name and six scores, 4 decimals; "-" where a score
    needs a detector or a concept), and a mean row for several images."""
    def cell(value):
        return "-" if value is None else round(float(value), 4)

    table = [[Path(row["image"]).name, *(cell(row[key]) for key in SCORE_COLUMNS)] for row in rows]
    if len(rows) > 1:
        means = [[row[key] for row in rows if row[key] is not None] for key in SCORE_COLUMNS]
        table.append(["mean", *(cell(sum(v) / len(v)) if v else "-" for v in means)])
    return table


def fused_label(record: dict | None) -> str:
    """The Compose tab's line naming the fused model that Export acts on."""
    if not record:
        return "No fused model selected: click one in the table to export it."
    return f"Selected: {' + '.join('&lt;' + n + '&gt;' for n in record['concepts'])} · {record['method']}"


def fused_choices(records: list[dict]) -> list[tuple[str, str]]:
    choices = [("automatic (fuse on the fly, cached)", "")]
    choices += [(f"{' + '.join('<' + n + '>' for n in r['concepts'])} · {r['method']}", r["folder"]) for r in records]
    return choices


# ---------------------------------------------------------------------------------------------
# The page


CSS = """
.job-bar {height: 10px; background: #e5e7eb; border-radius: 5px; overflow: hidden; margin-top: 6px}
.job-bar > div {height: 100%; background: #f97316; transition: width 0.3s}
.job-failed, .job-cancelled {color: #b91c1c}
.job-note {color: #b45309}
#test-model-banner {background: #fef3c7; border-radius: 6px; padding: 4px 12px}
#demo-banner {background: #e0f2fe; border-radius: 6px; padding: 4px 12px}
"""


def toast(message: str) -> None:
    """A warning toast; gradio renders its text as HTML, where a concept name such as <mochi> would vanish."""
    gr.Warning(html.escape(message))


def warn(error: Exception) -> str:
    """Show a user error as a toast and return it for the page's status line."""
    toast(str(error))
    return error_html(error)


def build_concepts_tab(studio: Studio, library_views: list) -> dict:
    """Training forms (one pet of a chosen kind; a group of pets together), progress, previews, cancel;
    the library gallery and its actions."""
    recipe = training_recipe(studio)
    with gr.Row():
        with gr.Column(scale=3):
            photos = gr.File(label="Photos of one pet (drop 3 or more)", file_count="multiple", file_types=["image"], elem_id="train-photos")
            photo_thumbs = gr.Gallery(label="The photos", columns=8, height=120, object_fit="cover", visible=False,
                                      elem_id="train-photo-thumbs")
            with gr.Row():
                name = gr.Textbox(label="Name (prompts use it as <name>)", placeholder="mochi", elem_id="train-name")
                class_word = gr.Textbox(label="Class word", placeholder="dog", elem_id="train-class")
            with gr.Row(equal_height=True):
                kind = gr.Dropdown(label="Kind of concept", choices=list(TRAIN_KINDS.items()), value="edlora", elem_id="train-kind",
                                   scale=1, min_width=160)
                kind_note = gr.Markdown(KIND_NOTES["edlora"], elem_id="train-kind-note")
            auto_mask = gr.Checkbox(label="Find the pet in each photo automatically (detector masks for the loss)")
            with gr.Accordion("Advanced settings", open=False, elem_id="train-advanced"):
                with gr.Row():
                    steps = gr.Number(label="Steps (0: 500 per photo / batch size; Cones: search passes)", value=recipe["steps"],
                                      precision=0, minimum=0, elem_id="train-steps")
                    batch_size = gr.Number(label="Batch size", value=2, precision=0, minimum=1)
                    resolution = gr.Number(label="Resolution (0: the base's own)", value=0, precision=0, minimum=0)
                with gr.Row() as edlora_settings:  # ED-LoRA only
                    rank = gr.Number(label="LoRA rank", value=4, precision=0, minimum=1)
                    lr_embedding = gr.Number(label="Learning rate, embeddings", value=recipe["lr_embedding"], elem_id="train-lr-embedding")
                    lr_text_lora = gr.Number(label="Learning rate, text-encoder LoRA", value=recipe["lr_text_lora"])
                    lr_unet_lora = gr.Number(label="Learning rate, UNet LoRA", value=recipe["lr_unet_lora"])
                with gr.Row(visible=False) as custom_settings:  # Custom Diffusion only
                    lr_kv = gr.Number(label="Learning rate, modifier word and cross-attention K/V", value=recipe["lr_kv"], minimum=0,
                                      elem_id="train-lr-kv")
                    class_prior = gr.Number(label="Chance of a class picture (the base model's own <class word>: prior preservation)",
                                            value=recipe["class_prior_probability"], minimum=0, maximum=1, elem_id="train-class-prior")
                with gr.Row(visible=False) as cones_settings:  # Cones only
                    max_neurons = gr.Number(label="Neuron cap (the most weights the concept shuts; 4 bytes each in its file)",
                                            value=recipe["cones_max_neurons"], precision=0, minimum=1, elem_id="train-max-neurons")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0)
                    preview_every = gr.Number(label="Preview every N steps (0: about five per run)", value=0, precision=0, minimum=0)
                    overwrite = gr.Checkbox(label="Replace a concept of the same name")
                    resume = gr.Checkbox(label="Continue from the last checkpoint (after a cancel)")
                with gr.Row():  # concepts that share the frame (issue 12)
                    attn_reg_weight = gr.Number(label="Attention regulariser weight (acts with masks; 0: off)", value=0.01, minimum=0)
                    multi_subject_probability = gr.Number(label="Chance of a two-animal composite", value=0.0, minimum=0, maximum=1)
                    prior_probability = gr.Number(label="Chance of a two-animal prior scene", value=0.0, minimum=0, maximum=1)
                    companions = gr.Textbox(label="Companion animals (comma-separated)", value="dog, cat")
            train_estimate = gr.Markdown(elem_id="train-estimate")
            with gr.Row():
                train_button = gr.Button("Train", variant="primary", elem_id="train-button")
                cancel_button = gr.Button("Cancel training", elem_id="cancel-button")
            if studio.demo is not None:  # the stock pets' photos, to train a pet of the toy world in minutes
                gr.Examples(studio.demo.examples, [photos, name, class_word], label="Stock pets' photos (click one to fill the form)",
                            elem_id="demo-examples", example_labels=[f"{n} ({c})" for _, n, c in studio.demo.examples])
            group = build_group_form(studio, recipe)
        with gr.Column(scale=2):
            progress = gr.HTML(progress_html(studio.jobs.latest("train"), "No training yet."), elem_id="train-progress")
            previews = gr.Gallery(label="Previews as training goes", columns=5, height=180, elem_id="train-previews")
    gr.Markdown("### Library")
    library_gallery, library_table = library_views
    library_gallery.render()
    library_table.render()
    with gr.Row():
        selected = gr.Dropdown(label="Concept", choices=studio.library.names(), elem_id="library-concept")
        new_name = gr.Textbox(label="New name")
        import_name = gr.Textbox(label="Import as (optional)")
    with gr.Row():
        rename_button = gr.Button("Rename")
        delete_button = gr.Button("Delete", variant="stop")
        export_button = gr.Button("Export…", elem_id="export-button")
        import_button = gr.UploadButton("Import .safetensors", file_types=[".safetensors"])
    with gr.Column(visible=False, variant="panel", elem_id="export-dialog") as export_dialog:  # opened by Export…
        with gr.Row():
            export_format = gr.Radio([MENAGERIE_FORMAT, WEBUI_FORMAT], value=MENAGERIE_FORMAT, label="Export format",
                                     elem_id="export-format", scale=2)
            with gr.Column(scale=3):
                gr.Markdown(webui_export_note(), elem_id="export-note")
        with gr.Row():
            export_go = gr.Button("Export", variant="primary", elem_id="export-go")
            export_close = gr.Button("Close", elem_id="export-close")
    library_status = gr.HTML(elem_id="library-status")  # beside the buttons that change the library, names escaped
    export_file = gr.File(label="Exported concept", visible=True, interactive=False, elem_id="export-file")
    with gr.Accordion("Import a LoRA file or a Mix-of-Show checkpoint", open=False, elem_id="import-other"):
        gr.Markdown("A LoRA for Stable Diffusion 1.x from civitai or a trainer (kohya, A1111, diffusers or peft naming) becomes"
                    " a concept &lt;name&gt; that stands for its trigger word and class word; a Mix-of-Show ED-LoRA checkpoint"
                    " brings its own layer-wise tokens. Either then works in Regional and Isolated mode and in fusion.")
        with gr.Row():
            import_kind = gr.Radio(list(IMPORT_KINDS), value=LORA_FILE, label="File kind", elem_id="import-kind")
            import_file = gr.File(label="LoRA (.safetensors) or Mix-of-Show checkpoint (.pth)",
                                  file_types=[".safetensors", ".pt", ".bin", ".pth"], elem_id="import-file")
        with gr.Row():
            import_as = gr.Textbox(label="Concept name", placeholder="rex", elem_id="import-concept-name")
            import_class = gr.Textbox(label="Class word of the subject", placeholder="dog", elem_id="import-class")
            import_trigger = gr.Textbox(label="Trigger word(s) the LoRA was trained with", placeholder="ohwx", elem_id="import-trigger")
            import_prompt = gr.Textbox(label="A prompt it was trained on (optional; fusion encodes it)",
                                       placeholder="photo of ohwx dog", elem_id="import-prompt")
        with gr.Row():
            import_overwrite = gr.Checkbox(label="Replace an existing concept of this name", elem_id="import-overwrite")
            import_go = gr.Button("Import", variant="primary", elem_id="import-go")
        import_status = gr.HTML(elem_id="import-status")

    form = {photos, name, class_word, kind, auto_mask, steps, batch_size, rank, resolution, lr_embedding, lr_text_lora,
            lr_unet_lora, lr_kv, class_prior, max_neurons, seed, preview_every, overwrite, resume, attn_reg_weight,
            multi_subject_probability, prior_probability, companions}

    def on_train(values: dict) -> str:
        try:
            config = TrainConfig(
                name=values[name].strip(), class_word=values[class_word].strip(), kind=values[kind], steps=int(values[steps]) or None,
                batch_size=int(values[batch_size]), resolution=int(values[resolution]) or None, rank=int(values[rank]),
                lr_embedding=float(values[lr_embedding]), lr_text_lora=float(values[lr_text_lora]),
                lr_unet_lora=float(values[lr_unet_lora]), lr_kv=float(values[lr_kv]), class_prior_probability=float(values[class_prior]),
                cones_max_neurons=int(values[max_neurons]), seed=int(values[seed]), preview_every=int(values[preview_every]),
                attn_reg_weight=float(values[attn_reg_weight]), multi_subject_probability=float(values[multi_subject_probability]),
                prior_probability=float(values[prior_probability]), companions=parse_companions(values[companions] or ""))
            state = studio.submit_training(values[photos] or [], config, values[auto_mask], values[overwrite], values[resume])
        except UserError as error:
            return warn(error)
        return progress_html(state)

    def on_kind(chosen: str):
        return (KIND_NOTES[chosen], gr.update(visible=chosen == "edlora"), gr.update(visible=chosen == "custom-diffusion"),
                gr.update(visible=chosen == "cones"))

    def on_cancel() -> str:
        state = studio.cancel_training()
        return progress_html(state, "No training to cancel.")

    def on_train_estimate(files, n_steps, batch):
        return training_estimate(studio, len(files or []), int(n_steps or 0), max(int(batch or 1), 1))

    for control in (photos, steps, batch_size):
        control.change(on_train_estimate, [photos, steps, batch_size], train_estimate, show_progress="hidden")
    photos.change(lambda files: gr.update(value=list(files or []), visible=bool(files)), photos, photo_thumbs, show_progress="hidden")

    def library_action(action, *args) -> str:
        try:
            return done_html(action(*args))
        except UserError as error:
            return warn(error)

    def on_export(concept: str, chosen: str):
        try:
            if chosen != WEBUI_FORMAT:
                yield studio.export(concept), done_html(f"exported <{concept}>")
                return
            state = studio.submit_webui_export(concept)
        except UserError as error:
            yield None, warn(error)
            return
        for state in studio.follow(state.id):
            yield None, progress_html(state)
        if state.status == DONE:
            yield state.result, done_html(f"exported <{concept}> for A1111, ComfyUI and Forge: the LoRA, the embedding and"
                                          f" README.txt (where each goes) in one zip")
        else:
            yield None, warn(UserError(state.message))

    def on_import_other(kind: str, file: str | None, concept_name: str, word: str, trigger: str, prompt: str, replace_it: bool):
        try:
            state = studio.submit_import(file, concept_name, word, trigger, prompt, IMPORT_KINDS[kind], replace_it)
        except UserError as error:
            yield warn(error)
            return
        for state in studio.follow(state.id):
            yield progress_html(state)
        if state.status == DONE:  # the library views refresh with the next poll (library_changed)
            yield done_html("; ".join(m for m in (state.result, state.message) if m))
        else:
            toast(state.message)

    train_button.click(on_train, inputs=form, outputs=progress, concurrency_limit=None)
    cancel_button.click(on_cancel, outputs=progress, concurrency_limit=None)
    kind.change(on_kind, kind, [kind_note, edlora_settings, custom_settings, cones_settings], show_progress="hidden")
    group["train"].click(group["on_train"], inputs=group["form"], outputs=progress, concurrency_limit=None)
    group["cancel"].click(on_cancel, outputs=progress, concurrency_limit=None)
    rename_button.click(lambda c, n: library_action(studio.rename, c, n), [selected, new_name], library_status)
    delete_button.click(lambda c: library_action(studio.delete, c) if c else "", selected, library_status,
                        js="(c) => (c && confirm('Delete <' + c + '> from the library?')) ? c : null")
    export_button.click(lambda: gr.update(visible=True), None, export_dialog)
    export_close.click(lambda: gr.update(visible=False), None, export_dialog)
    export_go.click(on_export, [selected, export_format], [export_file, library_status], concurrency_limit=None)
    import_kind.change(lambda kind: [gr.update(visible=IMPORT_KINDS[kind] == "lora")] * 2, import_kind, [import_trigger, import_prompt])
    import_go.click(on_import_other, [import_kind, import_file, import_as, import_class, import_trigger, import_prompt, import_overwrite],
                    import_status, concurrency_limit=None)
    import_button.upload(lambda f, n: library_action(studio.import_concept, f, n), [import_button, import_name], library_status)
    return {"progress": progress, "previews": previews, "selected": selected}


def build_group_form(studio: Studio, recipe: dict) -> dict:
    """The "Train a group together" section: 2-3 pets, backgrounds, a preview of the composites, and
    Train group (a job like single training: its progress, previews and cancel are the page's)."""
    with gr.Accordion("Train a group together (Gen4Gen)", open=False, elem_id="group-train"):
        gr.Markdown("Two or three pets that should appear together. One model learns them all from composites of their photos"
                    " (Gen4Gen; MuDI's Seg-Mix), each pet's words on its own pixels, and each pet becomes a concept in the"
                    " library. Joint: ED-LoRA words for each pet and one LoRA shared by the group; Custom Diffusion, joint:"
                    " a modifier word for each pet and one set of cross-attention K/V weights. Members of one group merge"
                    " as they were trained (Compose: the group's shared weights).")
        with gr.Row():
            group_name = gr.Textbox(label="Group name", placeholder="pals", elem_id="group-name")
            group_kind = gr.Dropdown(label="Kind", choices=list(GROUP_KINDS.items()), value="joint", elem_id="group-kind")
        pets = []
        with gr.Row():
            for i in range(MAX_GROUP_PETS):
                with gr.Column(min_width=160):
                    pets.append((
                        gr.Textbox(label=f"Pet {i + 1} name{' (optional)' if i >= 2 else ''}", placeholder=("mochi", "tama", "rex")[i % 3],
                                   elem_id=f"group-pet{i + 1}-name"),
                        gr.Textbox(label=f"Pet {i + 1} class word", placeholder=("dog", "cat", "dog")[i % 3],
                                   elem_id=f"group-pet{i + 1}-class"),
                        gr.File(label=f"Photos of pet {i + 1}", file_count="multiple", file_types=["image"],
                                elem_id=f"group-pet{i + 1}-photos")))
        auto_mask = gr.Checkbox(label="Find each pet in its photos automatically (detector masks: each pet is cut out for the composites)",
                                elem_id="group-auto-mask")
        with gr.Row():
            backgrounds = gr.File(label="Background photos (optional): empty scenes", file_count="multiple", file_types=["image"],
                                  elem_id="group-backgrounds")
            background_prompt = gr.Textbox(label="Background prompt: what the photos show, or what the base model draws without photos",
                                           placeholder="in a garden", elem_id="group-background-prompt")
        gr.Markdown("Backgrounds: your photos of empty scenes, with a prompt saying what they show; or only a prompt, and the"
                    " base model draws 8 scenes when training starts; or neither, and the pets stand on plain black.")
        with gr.Accordion("Group settings", open=False, elem_id="group-advanced"):
            with gr.Row():
                steps = gr.Number(label="Steps (0: 500 per photo / batch size)", value=recipe["steps"], precision=0, minimum=0,
                                  elem_id="group-steps")
                batch_size = gr.Number(label="Batch size", value=2, precision=0, minimum=1)
                composite_chance = gr.Number(label="Chance of a composite of all the pets (else one pet's photo)",
                                             value=GROUP_COMPOSITE_CHANCE, minimum=0, maximum=1, elem_id="group-composite-chance")
                seed = gr.Number(label="Seed (training and the preview)", value=0, precision=0, elem_id="group-seed")
            with gr.Row():
                preview_every = gr.Number(label="Preview every N steps (0: about five per run)", value=0, precision=0, minimum=0)
                overwrite = gr.Checkbox(label="Replace concepts of the same names", elem_id="group-overwrite")
                resume = gr.Checkbox(label="Continue from the last checkpoint (after a cancel)", elem_id="group-resume")
        with gr.Row():
            preview_button = gr.Button("Preview composites", elem_id="group-preview-button")
            train_button = gr.Button("Train group", variant="primary", elem_id="group-train-button")
            cancel_button = gr.Button("Cancel training", elem_id="group-cancel-button")
        preview_note = gr.HTML(elem_id="group-preview-note")
        composites = gr.Gallery(label="Composites as training makes them", columns=4, height=260, object_fit="contain",
                                elem_id="group-composites")
    pet_fields = [field for pet in pets for field in pet]
    form = {group_name, group_kind, *pet_fields, auto_mask, backgrounds, background_prompt, steps, batch_size, composite_chance,
            seed, preview_every, overwrite, resume}

    def on_train_group(values: dict) -> str:
        try:
            config = TrainConfig(
                name=values[group_name].strip(), class_word="", kind=values[group_kind], steps=int(values[steps]) or None,
                batch_size=int(values[batch_size]), multi_subject_probability=float(values[composite_chance]), seed=int(values[seed]),
                preview_every=int(values[preview_every]), lr_embedding=recipe["lr_embedding"], lr_text_lora=recipe["lr_text_lora"],
                lr_unet_lora=recipe["lr_unet_lora"], lr_kv=recipe["lr_kv"])
            state = studio.submit_group_training(values[group_name], [tuple(values[f] for f in pet) for pet in pets], config,
                                                 values[backgrounds], values[background_prompt], values[auto_mask],
                                                 values[overwrite], values[resume])
        except UserError as error:
            return warn(error)
        return progress_html(state)

    def on_preview_composites(*values):
        *fields, backgrounds_given, prompt, masked, preview_seed = values
        try:
            images, note = studio.composite_preview([tuple(fields[i:i + 3]) for i in range(0, len(fields), 3)], backgrounds_given,
                                                    prompt or "", masked, int(preview_seed or 0))
        except UserError as error:
            return [], warn(error)
        return images, f"<div class='job-note'>{html.escape(note)}</div>"

    preview_button.click(on_preview_composites, [*pet_fields, backgrounds, background_prompt, auto_mask, seed], [composites, preview_note],
                         concurrency_limit=None)
    return {"form": form, "on_train": on_train_group, "train": train_button, "cancel": cancel_button}


def build_compose_tab(studio: Studio) -> dict:
    """Pick concepts, fuse them with progress; the cached fused models and their reports."""
    gr.Markdown("Fuse two or more concepts into one model. Each kind merges its own way: ED-LoRA concepts and imported LoRAs"
                " by Mix-of-Show gradient fusion (or weight averaging, to compare), Custom Diffusion concepts by its closed-form"
                " merge, Cones concepts by the union of their neurons, and the members of one group as they were trained;"
                " kinds that do not merge are refused. Generate fuses on the fly when a picture names several concepts;"
                " fusing here first lets you see the report.")
    choices, _ = merge_choices(studio.library, [])
    with gr.Row():
        names = gr.CheckboxGroup(label="Concepts", choices=usable_names(studio.library), elem_id="compose-concepts")
        with gr.Column():
            method = gr.Radio(label="Method (what the chosen concepts' kinds allow)", choices=choices, value="auto",
                              elem_id="compose-method")
            method_note = gr.HTML(elem_id="compose-method-note")
    with gr.Row():
        fuse_button = gr.Button("Fuse", variant="primary", elem_id="fuse-button")
        cancel_fuse_button = gr.Button("Cancel", elem_id="cancel-fuse-button")
    status = gr.HTML(elem_id="fuse-status")
    records = studio.fused_models()
    fused_table = gr.Dataframe(value=fused_rows(records), headers=["concepts", "method", "created", "folder"],
                               label="Fused models (cached in the library; select one for its report)", interactive=False)
    report = gr.Dataframe(headers=["concept", "mean relative error", "max relative error", "weight averaging, mean"],
                          label="Fusion report: relative output error per concept (lower keeps the concept better)",
                          interactive=False, elem_id="fusion-report")
    flags = gr.Markdown(elem_id="fusion-flags")
    selected_fused = gr.State(None)  # the folder of the fused model clicked (or just made)
    with gr.Row():
        with gr.Column(scale=3):
            selected_label = gr.Markdown("No fused model selected: click one in the table to export it.", elem_id="fused-selected")
            gr.Markdown("One `.safetensors` file in the original SD1.5 layout, which A1111, Forge and ComfyUI load as a model,"
                        " with one textual-inversion embedding per pet and a README saying where each goes. "
                        + webui_export_note(), elem_id="checkpoint-note")
        with gr.Column(scale=2):
            half = gr.Checkbox(label="Half precision (fp16: 2 GB instead of 4 GB at SD1.5 size)", elem_id="checkpoint-half")
            checkpoint_button = gr.Button("Export as one checkpoint (A1111/ComfyUI)", elem_id="checkpoint-button")
    checkpoint_status = gr.HTML(elem_id="checkpoint-status")
    checkpoint_files = gr.File(label="The checkpoint, its README and one embedding per pet", file_count="multiple",
                               interactive=False, elem_id="checkpoint-files")

    def on_fuse(concepts: list[str], chosen: str):
        try:
            state = studio.submit_fusion(concepts or [], chosen)
        except UserError as error:
            yield {status: warn(error)}
            return
        for state in studio.follow(state.id):
            yield {status: progress_html(state)}
        records = studio.fused_models()
        shown = next((r for r in records if r["folder"] == state.result), None)
        yield {status: progress_html(state), fused_table: fused_rows(records),
               report: report_rows(fused_report(shown)) if shown else gr.skip(),
               flags: report_flags(fused_report(shown)) if shown else gr.skip(),
               selected_fused: shown["folder"] if shown else gr.skip(), selected_label: fused_label(shown) if shown else gr.skip()}

    def on_concepts(concepts: list[str], chosen: str):
        allowed, problem = merge_choices(studio.library, concepts or [])
        value = chosen if chosen in [value for _, value in allowed] else "auto"
        return gr.update(choices=allowed, value=value), error_html(UserError(problem)) if problem else ""

    def on_select(evt: gr.SelectData):
        records = studio.fused_models()
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        record = records[row] if row < len(records) else None
        shown = fused_report(record) if record else {}
        return report_rows(shown), report_flags(shown), record["folder"] if record else None, fused_label(record)

    def on_export_checkpoint(folder: str | None, in_half: bool):
        try:
            state = studio.submit_checkpoint_export(folder, in_half)
        except UserError as error:
            yield {checkpoint_status: warn(error)}
            return
        for state in studio.follow(state.id):
            yield {checkpoint_status: progress_html(state)}
        if state.status == DONE:
            yield {checkpoint_status: done_html(f"wrote {Path(state.result[0]).name}, {Path(state.result[1]).name} and"
                                                f" {len(state.result) - 2} embedding(s): download them below"),
                   checkpoint_files: state.result}
        else:
            toast(state.message)

    fuse_button.click(on_fuse, [names, method], [status, fused_table, report, flags, selected_fused, selected_label],
                      concurrency_limit=None)
    names.change(on_concepts, [names, method], [method, method_note], show_progress="hidden")
    cancel_fuse_button.click(lambda: cancel_html(studio, "fuse", "No fusion to cancel."), outputs=status,
                             concurrency_limit=None)
    fused_table.select(on_select, None, [report, flags, selected_fused, selected_label])
    checkpoint_button.click(on_export_checkpoint, [selected_fused, half], [checkpoint_status, checkpoint_files], concurrency_limit=None)
    return {"names": names, "fused_table": fused_table}


def build_generate_tab(studio: Studio) -> dict:
    """Mode, prompts, canvas with labelled boxes, box table, settings; results, stages and history."""
    size = studio.default_size
    tokens = [f"<{n}>" for n in usable_names(studio.library)]
    defaults = generation_defaults(studio)
    with gr.Row():
        with gr.Column(scale=3):
            mode = gr.Radio(label="Method", choices=[REGIONAL, ISOLATED], value=REGIONAL, elem_id="generate-mode")
            prompt = gr.Textbox(label="Prompt (the whole picture)", placeholder="a dog and a cat in a hot spring", value=defaults.prompt, elem_id="generate-prompt")
            negative = gr.Textbox(label="Negative prompt (Mix-of-Show's standard one by default)", value=defaults.negative_prompt,
                                  placeholder="blurry, low quality")
            with gr.Row():
                width = gr.Slider(label="Width", minimum=32, maximum=1024, step=8, value=size, elem_id="generate-width")
                height = gr.Slider(label="Height", minimum=32, maximum=1024, step=8, value=size, elem_id="generate-height")
            gr.Markdown("Draw a box for each pet (drag on the canvas), then pick its concept in the dialog. To change a"
                        " box, switch to the hand tool (below the canvas), click the box, then press E to relabel it or"
                        " Delete to remove it; the table below edits its prompts. Regional: each box gets its own prompt."
                        " Isolated: a layout is sampled from the prompt, the detector's finds are matched to the boxes by"
                        " position, and each box's subject is re-drawn in it with its own prompt (a box the detector missed"
                        " gets its subject added there).")
            canvas = image_annotator(value=annotator_value(size, size, []), label_list=tokens,
                                     label_colors=[label_color(t) for t in tokens], image_type="pil", sources=[],
                                     show_clear_button=False, show_remove_button=False, label="Canvas", elem_id="canvas")
            table = gr.Dataframe(headers=BOX_COLUMNS, value=[], label="Boxes (prompts are editable)", interactive=True,
                                 column_count=(len(BOX_COLUMNS), "fixed"), elem_id="box-table")
        with gr.Column(scale=2):
            with gr.Row():
                seed = gr.Number(label="Seed", value=0, precision=0, elem_id="generate-seed")
                random_seed = gr.Checkbox(label="Random seed", value=True)
            with gr.Row():
                steps = gr.Slider(label="Steps", minimum=2, maximum=100, step=1, value=defaults.steps, elem_id="generate-steps")
                guidance = gr.Slider(label="Guidance", minimum=1.0, maximum=15.0, step=0.5, value=defaults.guidance)
                num_images = gr.Slider(label="Images", minimum=1, maximum=8, step=1, value=1)
            fused = gr.Dropdown(label="Fused model", choices=fused_choices(studio.fused_models()), value="")
            with gr.Accordion("Isolated settings", open=False):
                t_lay = gr.Slider(label="Layout time (fraction of the schedule; subjects are redrawn from here)", minimum=0.1,
                                  maximum=0.95, step=0.05, value=BOX_T_LAY)
                box_threshold = gr.Slider(label="Detector box threshold", minimum=0.05, maximum=0.95, step=0.05, value=0.35)
                text_threshold = gr.Slider(label="Detector text threshold", minimum=0.05, maximum=0.95, step=0.05, value=0.25)
            with gr.Accordion("Advanced layout", open=False, elem_id="layout-advanced"):
                gr.Markdown("How sampling keeps each box's pet a separate animal. Shares are of the denoising steps,"
                            " counted from the first; 0 turns a tool off. The defaults are measured on the toy world"
                            " (docs/toyworld.md).")
                with gr.Column(visible=True, elem_id="layout-regional") as regional_layout:
                    bounded_self_attention = gr.Slider(
                        label="Bounded self-attention (share of steps)", minimum=0, maximum=1, step=0.05,
                        value=defaults.bounded_self_attention, elem_id="layout-self-attention",
                        info="pixels in one box do not attend to another box, so one body cannot grow across two boxes")
                    bootstrap = gr.Slider(
                        label="Bootstrapping (share of steps)", minimum=0, maximum=1, step=0.05, value=defaults.bootstrap,
                        elem_id="layout-bootstrap",
                        info="each box is first drawn alone on a plain background, so it starts with a subject of its own")
                    bounded_guidance = gr.Slider(
                        label="Guidance (share of steps; slower)", minimum=0, maximum=1, step=0.05, value=defaults.bounded_guidance,
                        elem_id="layout-guidance",
                        info="moves the latent so each box's attention stays inside it; several extra UNet passes with gradients per guided step")
                with gr.Column(visible=False, elem_id="layout-isolated") as isolated_layout:
                    layout_self_attention = gr.Slider(
                        label="Layout self-attention (share of layout steps)", minimum=0, maximum=1, step=0.05,
                        value=defaults.layout_self_attention, elem_id="isolated-self-attention",
                        info="bounded self-attention between the boxes while the layout is sampled")
                    layout_cross_attention = gr.Radio(
                        list(LAYOUT_CROSS_ATTENTION), value=defaults.layout_cross_attention, label="Layout cross-attention",
                        elem_id="layout-cross-attention",
                        info="in those steps each box sees only its own subject's word of the prompt ('all': and the"
                             " background sees none); 'off' lets every pixel read every word")
                    layout_retries = gr.Slider(
                        label="Layout retries", minimum=0, maximum=5, step=1, value=defaults.layout_retries, elem_id="layout-retries",
                        info="re-sample the layout (next seed) while a box is missed or two boxes merge; each retry costs one more layout")
                    added_bootstrap = gr.Slider(
                        label="Added-subject bootstrap (share of steps)", minimum=0, maximum=1, step=0.05,
                        value=defaults.added_bootstrap, elem_id="added-bootstrap",
                        info="a subject the layout missed is first drawn alone in its box on a plain background")
            estimate = gr.Markdown(generation_estimate(studio, REGIONAL, size, size, 30, 1), elem_id="generate-estimate")
            with gr.Row():
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                cancel_button = gr.Button("Cancel", elem_id="cancel-generate-button")
            status = gr.HTML(elem_id="generate-status")
            results = gr.Gallery(label="Images (click one, then 'Reuse settings')", columns=2, height=360,
                                 buttons=["download", "fullscreen"], elem_id="results")
            stages = gr.Gallery(label="Isolated: layout, boxes with their masks (matched / split / added), final", columns=4,
                                height=200, elem_id="stages")
            box_report = gr.Markdown(elem_id="box-report")
            reuse_button = gr.Button("Reuse settings of the selected image", elem_id="reuse-button")
            with gr.Accordion("Score images (CLIP-T, CLIP-I, DINO-I, CP-CLIP, TI-CLIP, SCR)", open=False, elem_id="score"):
                gr.Markdown(score_intro(studio), elem_id="score-intro")
                score_which = gr.Markdown("Nothing to score yet: generate, or click an image in Images or History.",
                                          elem_id="score-which")
                score_refs = [gr.File(label="Reference photos", file_count="multiple", file_types=["image"], visible=False,
                                      elem_id=f"score-refs-{i}") for i in range(SCORE_SLOTS)]
                score_button = gr.Button("Score", elem_id="score-button")
                score_status = gr.HTML(elem_id="score-status")
                score_table = gr.Dataframe(headers=["image", *SCORE_COLUMNS.values()], label="Scores (higher is better; SCR: lower)",
                                           interactive=False, elem_id="score-table")
    history = gr.Gallery(value=history_items(studio.history()), label="History (saved in the outputs folder)", columns=8, height=240,
                         fit_columns=False, buttons=["download"], elem_id="history")
    selected_image = gr.State(None)
    canvas_size = gr.State((size, size))  # the (width, height) the canvas and the table's boxes are drawn at
    result_paths = gr.State([])
    history_paths = gr.State(studio.history())
    score_paths = gr.State([])  # the images Score acts on: the one last clicked, or the last generation's
    score_names = gr.State([])  # the concept each reference upload is for, in order
    form = {mode, prompt, negative, width, height, seed, random_seed, steps, guidance, num_images, table, fused,
            t_lay, box_threshold, text_threshold, bounded_self_attention, bootstrap, bounded_guidance, layout_self_attention,
            layout_cross_attention, layout_retries, added_bootstrap}

    def on_canvas(value, w, h, current):
        return rows_to_table(rows_from_annotator(value, int(w), int(h), rows_from_table(current), studio.library))

    def on_size(w, h, current, drawn_size):
        """A new width or height (dragged or typed): the canvas is redrawn at it, the boxes scaled with it."""
        new = (int(w), int(h))
        if tuple(drawn_size) == new:
            return gr.skip(), gr.skip(), gr.skip()  # e.g. "reuse settings" set size, canvas and boxes together
        rows = scale_rows(rows_from_table(current), tuple(drawn_size), new)
        return annotator_value(*new, rows), rows_to_table(rows), new

    def on_generate(values: dict):
        try:
            chosen_seed = random.randrange(2**31) if values[random_seed] else int(values[seed])
            request = GenerationRequest(
                mode=values[mode], prompt=values[prompt].strip(), negative_prompt=values[negative].strip(),
                width=int(values[width]), height=int(values[height]), seed=chosen_seed, steps=int(values[steps]),
                guidance=float(values[guidance]), num_images=int(values[num_images]), rows=tuple(rows_from_table(values[table])),
                fused=values[fused] or None, t_lay=float(values[t_lay]), box_threshold=float(values[box_threshold]),
                text_threshold=float(values[text_threshold]), bounded_self_attention=float(values[bounded_self_attention]),
                bootstrap=float(values[bootstrap]), bounded_guidance=float(values[bounded_guidance]),
                layout_self_attention=float(values[layout_self_attention]),
                layout_cross_attention=values[layout_cross_attention], layout_retries=int(values[layout_retries]),
                added_bootstrap=float(values[added_bootstrap]))
            state = studio.submit_generation(request)
        except UserError as error:
            yield {status: warn(error)}
            return
        yield {seed: chosen_seed}
        for state in studio.follow(state.id):
            yield {status: progress_html(state)}
        if state.status != DONE:
            toast(state.message)
            return
        output: GenerationOutput = state.result
        if output.message:
            toast(output.message)
        paths = studio.history()
        yield {results: output.images, result_paths: output.images, stages: output.stages,
               box_report: "\n".join(f"- {line}" for line in output.boxes), history: history_items(paths), history_paths: paths}

    def on_mode(chosen: str):
        return gr.update(visible=chosen != ISOLATED), gr.update(visible=chosen == ISOLATED)

    def on_pick(paths: list[str], evt: gr.SelectData):
        return paths[evt.index] if evt.index is not None and evt.index < len(paths) else None

    def on_reuse(path: str | None):
        if not path:
            return {status: warn(UserError("click an image in Images or History first"))}
        metadata = read_png_metadata(path)
        if not metadata:
            return {status: warn(UserError(f"{Path(path).name} carries no Menagerie settings"))}
        request = request_from_metadata(metadata, studio.default_size)
        rows = list(request.rows)
        return {mode: request.mode, prompt: request.prompt, negative: request.negative_prompt, width: request.width,
                height: request.height, seed: request.seed, random_seed: False, steps: request.steps, guidance: request.guidance,
                num_images: request.num_images, fused: request.fused or "", t_lay: request.t_lay,
                box_threshold: request.box_threshold, text_threshold: request.text_threshold,
                bounded_self_attention: request.bounded_self_attention, bootstrap: request.bootstrap,
                bounded_guidance: request.bounded_guidance, layout_self_attention: request.layout_self_attention,
                layout_cross_attention: request.layout_cross_attention, layout_retries: request.layout_retries, added_bootstrap: request.added_bootstrap,
                canvas: annotator_value(request.width, request.height, rows), table: rows_to_table(rows),
                canvas_size: (request.width, request.height),
                status: f"<div>Settings of {html.escape(Path(path).name)} loaded.</div>"}

    def on_score_targets(paths, shown_names: list[str]):
        """Point Score at `paths` (one path or a list): say which, and give each concept they show an upload."""
        paths = [p for p in ([paths] if isinstance(paths, str) else paths or []) if p]
        names = studio.score_concepts(paths)[:SCORE_SLOTS]
        which = (f"Scoring {html.escape(Path(paths[0]).name)}" + (f" and {len(paths) - 1} more image(s)" if len(paths) > 1 else "")
                 + (f", which show {', '.join('&lt;' + n + '&gt;' for n in names)}" if names else ", which name no concept")
                 if paths else "Nothing to score yet: generate, or click an image in Images or History.")
        update = {score_paths: paths, score_which: which}
        if names != list(shown_names or []):  # other concepts: fresh uploads (the same ones keep their photos)
            update[score_names] = names
            for i, slot in enumerate(score_refs):
                update[slot] = gr.update(visible=i < len(names), value=None,
                                         label=reference_label(names[i], studio.library) if i < len(names) else "Reference photos")
        return update

    def on_score(paths: list[str], shown_names: list[str], *uploads):
        try:
            references = {name: list(files or []) for name, files in zip(shown_names or [], uploads)}
            state = studio.submit_scoring(paths, references)
        except UserError as error:
            yield {score_status: warn(error)}
            return
        for state in studio.follow(state.id):
            yield {score_status: progress_html(state)}
        if state.status != DONE:
            toast(state.message)
            return
        yield {score_status: progress_html(state), score_table: score_rows(state.result)}

    def on_estimate(chosen_mode, w, h, n_steps, n_images):
        return generation_estimate(studio, chosen_mode, int(w), int(h), int(n_steps), int(n_images))

    def on_cancel():
        return cancel_html(studio, "generate", "No generation to cancel.")

    for control in (mode, width, height, steps, num_images):
        control.change(on_estimate, [mode, width, height, steps, num_images], estimate, show_progress="hidden")
    cancel_button.click(on_cancel, outputs=status, concurrency_limit=None)
    canvas.change(on_canvas, [canvas, width, height, table], table)
    width.change(on_size, [width, height, table, canvas_size], [canvas, table, canvas_size])
    height.change(on_size, [width, height, table, canvas_size], [canvas, table, canvas_size])
    mode.change(on_mode, mode, [regional_layout, isolated_layout])
    score_targets = [score_paths, score_names, score_which, *score_refs]
    generate_button.click(on_generate, inputs=form,
                          outputs=[status, seed, results, result_paths, stages, box_report, history, history_paths],
                          concurrency_limit=None)
    result_paths.change(on_score_targets, [result_paths, score_names], score_targets)  # a finished generation
    results.select(on_pick, result_paths, selected_image).then(on_score_targets, [selected_image, score_names], score_targets)
    history.select(on_pick, history_paths, selected_image).then(on_score_targets, [selected_image, score_names], score_targets)
    score_button.click(on_score, [score_paths, score_names, *score_refs], [score_status, score_table], concurrency_limit=None)
    reuse_button.click(on_reuse, selected_image, [mode, prompt, negative, width, height, seed, random_seed, steps, guidance, num_images,
                                                  fused, t_lay, box_threshold, text_threshold, bounded_self_attention, bootstrap,
                                                  bounded_guidance, layout_self_attention, layout_cross_attention,
                                                  layout_retries, added_bootstrap,
                                                  canvas, table, canvas_size, status])
    return {"canvas": canvas, "fused": fused, "history": history, "history_paths": history_paths}


# ---------------------------------------------------------------------------------------------
# The scripting API: named endpoints for gradio_client, plain values in, files and a status out
#
# Each endpoint checks its input like the page does, sends the work through the same job queue
# (so it waits its turn behind the page's jobs, and shows in the page's queue), waits for it and
# returns plain values. A UserError, or a job that fails, reaches the client as a gr.Error with
# the message. The page's own events are private (`hide_page_events`), so `client.view_api()` lists
# exactly these four.

API_MODES = {"regional": REGIONAL, "isolated": ISOLATED}
BOX_KEYS = ("label", "xmin", "ymin", "xmax", "ymax", "prompt", "negative_prompt", "find")
API_SETTINGS = ("t_lay", "box_threshold", "text_threshold", "bounded_self_attention", "bootstrap", "bounded_guidance",
                "layout_self_attention", "layout_cross_attention", "layout_retries", "added_bootstrap")


def api_mode(text: str) -> str:
    """The generation mode an API call names: "regional" or "isolated" (or the page's labels)."""
    chosen = API_MODES.get(str(text).strip().lower(), text)
    if chosen not in (REGIONAL, ISOLATED):
        raise UserError(f"mode {text!r} is not known; use 'regional' (Mix-of-Show) or 'isolated' (detector-guided)")
    return chosen


def uploaded_paths(files: list) -> list[str]:
    """Server paths of files a client uploaded (`gradio_client.handle_file(path)` for each)."""
    paths = []
    for i, item in enumerate(files or [], start=1):
        if not isinstance(item, dict) or not item.get("path"):
            raise UserError(f"photo {i} is not an uploaded file ({str(item)[:60]!r}); pass handle_file('photo.jpg') for each photo")
        paths.append(item["path"])
    return paths


def rows_from_boxes(boxes: list[dict] | str | None, width: int, height: int, library: ConceptLibrary) -> list[BoxRow]:
    """Box-table rows from an API call's boxes: a list (or JSON text) of {label, xmin, ymin, xmax, ymax}
    in image pixels, optionally with prompt, negative_prompt and find. A missing prompt and find
    come from the label as the page fills them ("a photo of <mochi> dog", "dog")."""
    if boxes is None:
        return []
    if isinstance(boxes, str):
        try:
            boxes = json.loads(boxes or "[]")
        except json.JSONDecodeError as error:
            raise UserError(f"boxes is not valid JSON ({error}); give a list of {{label, xmin, ymin, xmax, ymax}}") from None
    if not isinstance(boxes, list):
        raise UserError(f"boxes must be a list of {{label, xmin, ymin, xmax, ymax}}, got {type(boxes).__name__}")
    rows = []
    for i, box in enumerate(boxes, start=1):
        if not isinstance(box, dict):
            raise UserError(f"box {i} must be an object {{label, xmin, ymin, xmax, ymax}}, got {box!r}")
        unknown = sorted(set(box) - set(BOX_KEYS) - {"color"})  # a canvas value's boxes carry a colour too
        if unknown:
            raise UserError(f"box {i} has unknown key(s) {', '.join(unknown)}; use {', '.join(BOX_KEYS)}")
        try:
            x0, y0, x1, y1 = (int(round(float(box[key]))) for key in ("xmin", "ymin", "xmax", "ymax"))
        except KeyError as missing:
            raise UserError(f"box {i} has no {missing.args[0]}; give xmin, ymin, xmax, ymax in image pixels") from None
        except (TypeError, ValueError):
            raise UserError(f"box {i}: xmin, ymin, xmax, ymax must be numbers of pixels, got {box}") from None
        label = str(box.get("label") or "").strip()
        name = f"box {i} ({label})" if label else f"box {i}"
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise UserError(f"{name} ({x0}, {y0}, {x1}, {y1}) is off the {width}x{height} canvas or empty;"
                            f" keep 0 <= xmin < xmax <= {width} and 0 <= ymin < ymax <= {height}")
        row = default_row(label, (x0, y0, x1, y1), library) if label else BoxRow(label="", box=(x0, y0, x1, y1), prompt="")
        given = {key: str(box[key]).strip() for key in ("prompt", "negative_prompt", "find") if box.get(key) is not None}
        rows.append(replace(row, **given))
    return rows


def api_settings(settings: dict | None, defaults: GenerationRequest) -> dict:
    """Advanced generation settings by name (GenerationRequest fields), converted to their types."""
    chosen = {}
    for key, value in (settings or {}).items():
        if key not in API_SETTINGS:
            raise UserError(f"setting {key!r} is not known; use {', '.join(API_SETTINGS)}")
        kind = type(getattr(defaults, key))
        try:
            chosen[key] = kind(value)
        except (TypeError, ValueError):
            raise UserError(f"setting {key} must be a {kind.__name__}, got {value!r}") from None
    return chosen


def fused_folder_of(studio: Studio, fused_id: str) -> str | None:
    """The folder of the cached fused model `fused_id` (its folder's name, as /fuse returns it); None for ""."""
    if not fused_id:
        return None
    folders = [r["folder"] for r in studio.fused_models()]
    found = next((folder for folder in folders if Path(folder).name == fused_id), None)
    if found is None:
        known = ", ".join(Path(folder).name for folder in folders) or "none yet"
        raise UserError(f"fused model {fused_id!r} is not in the library (known: {known}); fuse the concepts with /fuse first")
    return found


def concept_records(library: ConceptLibrary) -> list[dict]:
    """The library for a script: usable concepts, then damaged ones with their problem."""
    records = [{"name": c.name, "token": c.token, "class_word": c.class_word, "photo_count": c.photo_count,
                "base_model": c.base_model, "created": c.created, "kind": c.kind, "group": c.group, "problem": ""}
               for c in library.list()]
    return records + [{"name": name, "token": f"<{name}>", "problem": problem} for name, problem in library.damaged().items()]


def finished_job(studio: Studio, state: JobState) -> JobState:
    """Wait for a submitted job; its failure or cancellation becomes a UserError carrying its message."""
    final = studio.jobs.wait(state.id)
    if final is None:
        raise UserError(f"{state.title}: the job was forgotten before it finished; try again")
    if final.status != DONE:
        raise UserError(f"{final.title}: {final.status}. {final.message}")
    return final


def api_errors(endpoint):
    """An endpoint whose UserErrors reach the client as gr.Error with the same message."""
    # gr.api reads the return type off the signature without evaluating it, and this module's
    # annotations are text (`from __future__ import annotations`): evaluate them first
    endpoint.__annotations__ = typing.get_type_hints(endpoint)

    @functools.wraps(endpoint)
    def call(*args, **kwargs):
        try:
            return endpoint(*args, **kwargs)
        except UserError as error:
            raise gr.Error(str(error), print_exception=False) from None  # the caller's mistake: no traceback in the server log
    return call


def build_api(studio: Studio) -> None:
    """The named endpoints /concepts, /train, /fuse and /generate (see the README's "Script the studio")."""

    def api_concepts() -> list[dict]:
        """The concept library: one record per concept (name, token, class_word, photo_count, base_model,
        created; a damaged concept has only name, token and its problem).

        Returns:
            concepts: list of records, usable concepts first
        """
        return concept_records(studio.library)

    def api_train(photos: list[FileData], name: str, class_word: str, steps: int | None = None, batch_size: int = 2,
                  rank: int = 4, resolution: int | None = None, seed: int = 0, auto_mask: bool = False,
                  overwrite: bool = False, kind: str = "edlora") -> tuple[str, FileData | None, str]:
        """Train a concept from photos of one pet and add it to the library; waits until it is trained.

        Args:
            photos: image files, each as gradio_client.handle_file("photo.jpg"); 3 or more is best
            name: the concept's name; prompts use it as <name> (stored lowercase)
            class_word: one word for what it is, e.g. dog
            steps: training steps; None or 0: the studio's default (500 per photo / batch size; the demo's toy recipe)
            batch_size: photos per step
            rank: LoRA rank
            resolution: training image side in pixels; None: the base's native size
            seed: makes a run repeatable
            auto_mask: find the pet in each photo with the detector (masked loss)
            overwrite: replace a concept of the same name
            kind: "edlora" (ED-LoRA), "custom-diffusion" (Custom Diffusion) or "cones" (Cones)
        Returns:
            name: the concept's name as stored
            preview: its preview image
            status: what happened, with any notes
        """
        recipe = training_recipe(studio)
        config = TrainConfig(name=name.strip(), class_word=class_word.strip(), kind=kind, steps=steps or recipe["steps"] or None,
                             batch_size=batch_size, rank=rank, resolution=resolution or None, seed=seed,
                             lr_embedding=recipe["lr_embedding"], lr_text_lora=recipe["lr_text_lora"], lr_unet_lora=recipe["lr_unet_lora"],
                             lr_kv=recipe["lr_kv"], class_prior_probability=recipe["class_prior_probability"],
                             cones_max_neurons=recipe["cones_max_neurons"])
        done = finished_job(studio, studio.submit_training(uploaded_paths(photos), config, auto_mask, overwrite))
        trained = done.result
        preview = studio.library.preview_path(trained)
        status = f"trained <{trained}> ({studio.library.get(trained).class_word}) in {done.total} steps, final loss {done.loss or 0:.4f}"
        return trained, FileData(path=str(preview)) if preview else None, "; ".join(n for n in (status, done.message) if n)

    def api_fuse(concepts: list[str], method: str = "auto") -> tuple[str, dict, str]:
        """Fuse two or more concepts into one model, each kind its own way; cached in the library, so
        fusing the same concepts again returns at once.

        Args:
            concepts: concept names, e.g. ["mochi", "tama"] (or tokens, "<mochi>")
            method: "auto" (the first merge the concepts' kinds allow), "gradient" (gradient fusion) or "weight"
                (weight averaging) for ED-LoRA and imported LoRAs, "custom-diffusion", "cones", or "group" (a joint
                group's members as trained)
        Returns:
            fused: the fused model's id, for generate's `fused`
            report: per concept, the relative output error of the method and of weight averaging ({} for some merges)
            status: what happened
        """
        if method not in ("auto",) + METHODS:
            raise UserError(f"method {method!r} is not known; use {', '.join(repr(m) for m in ('auto',) + METHODS)}")
        names = [str(c).strip().strip("<>") for c in concepts or []]
        method = studio.fusion_method(names, method)
        done = finished_job(studio, studio.submit_fusion(names, method))
        folder = Path(done.result)
        report = fused_report({"folder": str(folder)})
        return folder.name, report.get("summary", {}), f"fused {' + '.join('<' + n + '>' for n in names)} ({method})"

    def api_generate(prompt: str, boxes: list[dict] | str | None = None, mode: str = "regional",
                     negative_prompt: str | None = None, width: int | None = None, height: int | None = None,
                     seed: int | None = None, steps: int | None = None, guidance: float | None = None, num_images: int = 1,
                     fused: str = "", settings: dict | None = None) -> tuple[list[FileData], str]:
        """Generate images, each concept in its box; waits until they are done. The PNGs carry their settings.

        Args:
            prompt: the whole picture, e.g. "a dog and a cat in a hot spring"; may name concepts as <name>
            boxes: list (or JSON text) of {label, xmin, ymin, xmax, ymax} in image pixels; label: a concept (<mochi>) or
                free text; optional prompt (default "a photo of <mochi> dog"), negative_prompt, find (isolated: the word
                the detector looks for; default the class word)
            mode: "regional" (Mix-of-Show) or "isolated" (detector-guided)
            negative_prompt: None: the studio's default
            width: image width in pixels (multiple of 8); None: the base's native size
            height: image height in pixels (multiple of 8); None: the base's native size
            seed: None: a random one (the status says which); image i uses seed + i
            steps: denoising steps; None: the studio's default
            guidance: classifier-free guidance scale; None: the studio's default
            num_images: how many images
            fused: a fused model's id from fuse; "": fuse the boxes' concepts on the fly (cached)
            settings: advanced layout settings by name, e.g. {"bootstrap": 0.2}: t_lay, box_threshold, text_threshold,
                bounded_self_attention, bootstrap, bounded_guidance, layout_self_attention, layout_cross_attention,
                layout_retries, added_bootstrap
        Returns:
            images: the saved PNGs
            status: mode, seed, what became of each box (isolated) and any notes
        """
        defaults = generation_defaults(studio)
        width, height = width or studio.default_size, height or studio.default_size
        request = replace(
            defaults, mode=api_mode(mode), prompt=prompt.strip(), width=width, height=height, num_images=num_images,
            negative_prompt=defaults.negative_prompt if negative_prompt is None else negative_prompt.strip(),
            seed=random.randrange(2**31) if seed is None else seed, steps=defaults.steps if steps is None else steps,
            guidance=defaults.guidance if guidance is None else guidance, fused=fused_folder_of(studio, fused),
            rows=tuple(rows_from_boxes(boxes, width, height, studio.library)), **api_settings(settings, defaults))
        output: GenerationOutput = finished_job(studio, studio.submit_generation(request)).result
        kind = "isolated" if request.mode == ISOLATED else "regional"
        status = "; ".join([f"{len(output.images)} image(s), {kind}, seed {request.seed}", *output.boxes,
                            *([output.message] if output.message else [])])
        return [FileData(path=path) for path in output.images], status

    # the page only submits and follows jobs, so the endpoints need no Gradio concurrency limit: the job queue runs one at a time
    for name, endpoint in (("concepts", api_concepts), ("train", api_train), ("fuse", api_fuse), ("generate", api_generate)):
        gr.api(api_errors(endpoint), api_name=name, concurrency_limit=None)


def hide_page_events(demo: gr.Blocks) -> None:
    """Make every event registered so far private: the page still calls them, but they stay out of
    the API page and `client.view_api()`, which then show only the endpoints of `build_api`."""
    for block_function in demo.fns.values():
        block_function.api_visibility = "private"


def demo_studio(root: Path | None = None, library_dir: str | None = None, outputs_dir: str | None = None,
                safety_checker: bool = False) -> Studio:
    """The studio on the toy world (`python app.py --demo`, pipelines/demo.py): its model, the stock
    pets in a demo library, and the oracle as detector (it finds masks itself, so no segmenter).
    The safety checker is off unless asked: the toy model draws simple animals at 64 px."""
    from pipelines.demo import prepare_demo

    world = prepare_demo(root, library_dir, outputs_dir)
    return Studio(world.base, world.library, world.outputs, safety_checker, world.detector, world.detector, demo=world)


def quiet_component_file_log() -> None:
    """Keep gradio's request log of custom-component files out of the server log.

    gradio's route for a custom component's files (the canvas, gradio_image_annotation, is one)
    `print`s "id=..., environment=client, type=component, file_name=..." for every file a page
    loads: dozens of lines per visit. A `print` in gradio.routes' own namespace shadows the builtin
    there and drops just those lines.
    """
    import builtins

    import gradio.routes

    def print_except_component_files(*args, **kwargs):
        if args and isinstance(args[0], str) and args[0].startswith("id=") and ", environment=" in args[0]:
            return
        builtins.print(*args, **kwargs)

    gradio.routes.print = print_except_component_files


def build_app(base_name: str, library_dir: str, outputs_dir: str | None = None, studio: Studio | None = None,
              safety_checker: bool | None = None) -> gr.Blocks:
    studio = studio or Studio(base_name, library_dir, outputs_dir or Path(library_dir).parent / "outputs", safety_checker)
    quiet_component_file_log()
    # a checkpoint is 2-4 GB: served from where it was written rather than copied into gradio's cache
    gr.set_static_paths([studio.outputs / ".exports" / "checkpoints"])

    with gr.Blocks(title="Menagerie") as demo:
        gr.Markdown("# Menagerie\nYour own pets, together in one picture: train each pet as a concept, then compose them.")
        if studio.is_test_model:
            gr.Markdown(f"**Test model in use (`--base tiny`): a tiny random network. Every image it makes is noise"
                        f" ({TEST_MODEL_NOTE}); it exists so every flow runs offline.**", elem_id="test-model-banner")
        if studio.demo is not None:
            gr.Markdown(studio.demo.banner(), elem_id="demo-banner")
        status = gr.Markdown(studio.status_markdown(), elem_id="status")
        queue = gr.Markdown(queue_markdown(studio.jobs.jobs()), elem_id="queue")
        library_gallery = gr.Gallery(label="Concepts", columns=6, height=220, object_fit="contain", render=False,
                                     elem_id="library-gallery")  # a fixed height: one concept must not fill the page
        library_table = gr.Dataframe(headers=LIBRARY_COLUMNS, label="Concept details",
                                     interactive=False, render=False, elem_id="library-table")
        with gr.Tab("Concepts"):
            concepts = build_concepts_tab(studio, [library_gallery, library_table])
        with gr.Tab("Compose"):
            compose = build_compose_tab(studio)
        with gr.Tab("Generate"):
            generation = build_generate_tab(studio)
        library_seen = gr.State(-1)
        previews_seen = gr.State(None)
        timer = gr.Timer(POLL_SECONDS)

        def poll(seen_version: int, seen_previews):
            """The page's view of the studio: status, queue, training; the library only when it changed."""
            training = studio.jobs.latest("train")
            update = {status: studio.status_markdown(), queue: queue_markdown(studio.jobs.jobs()),
                      concepts["progress"]: progress_html(training, "No training yet.")}
            preview_key = (training.id, len(training.previews)) if training else None
            if preview_key != seen_previews:
                update[concepts["previews"]] = list(training.previews) if training else []
                update[previews_seen] = preview_key
            if studio.library_version != seen_version:
                update.update(library_views(studio))
                update[library_seen] = studio.library_version
            return update

        def library_views(studio: Studio) -> dict:
            gallery, rows = library_rows(studio.library)
            names, usable = studio.library.names(), usable_names(studio.library)  # a damaged concept can only be deleted
            tokens = [f"<{n}>" for n in usable]
            records = studio.fused_models()
            return {library_gallery: gallery, library_table: rows, concepts["selected"]: gr.update(choices=names, value=None),
                    compose["names"]: gr.update(choices=usable), compose["fused_table"]: fused_rows(records),
                    generation["fused"]: gr.update(choices=fused_choices(records)),
                    generation["canvas"]: gr.update(label_list=tokens, label_colors=[label_color(t) for t in tokens])}

        poll_outputs = [status, queue, concepts["progress"], concepts["previews"], previews_seen, library_gallery, library_table,
                        concepts["selected"], compose["names"], compose["fused_table"], generation["fused"], generation["canvas"], library_seen]
        timer.tick(poll, [library_seen, previews_seen], poll_outputs, concurrency_limit=None, show_progress="hidden")

        def on_page_load():  # a reloaded page shows what was made since the server started, not the start's list
            paths = studio.history()
            return history_items(paths), paths

        demo.load(on_page_load, None, [generation["history"], generation["history_paths"]])
        demo.load(poll, [library_seen, previews_seen], poll_outputs, concurrency_limit=None)
        hide_page_events(demo)  # the page's events so far; the API's below stay public
        build_api(studio)
    demo.studio = studio  # tests and main() reach the studio through the page
    return demo


def main() -> None:
    from pipelines.demo import default_root, demo_by_default

    storage = persistent_dir()
    parser = build_parser()
    args = parser.parse_args()
    if args.demo or demo_by_default(args.base != DEFAULT_BASE):
        if args.base != parser.get_default("base"):
            parser.error("--demo runs on the toy model (assets/toyworld/model); leave out --base")
        chosen = {key: getattr(args, key) for key in ("concepts_dir", "outputs_dir") if getattr(args, key) != parser.get_default(key)}
        studio = demo_studio(default_root(storage), chosen.get("concepts_dir"), chosen.get("outputs_dir"), args.safety_checker == "on")
    else:
        studio = Studio(args.base, args.concepts_dir, args.outputs_dir, safety_enabled(args.safety_checker), args.detector, args.segmenter,
                        clip=args.clip, dino=args.dino, memory=args.memory, compile=args.compile)
    demo = build_app(args.base, args.concepts_dir, args.outputs_dir, studio=studio)
    studio = demo.studio
    demo.queue(default_concurrency_limit=1).launch(
        server_port=args.port, share=args.share, css=CSS,
        allowed_paths=[str(studio.library.root), str(studio.outputs), *(studio.demo.served_paths() if studio.demo else [])])


if __name__ == "__main__":
    main()
