"""Menagerie: multi-concept personalisation of text-to-image diffusion (Mix-of-Show family).

Modules, one idea each: `base` (load or build base models), `layerwise` (layer-wise prompt
encoding), `edlora` (ED-LoRA concept weights on a base model), `concept` (the concept library on
disk), `train` (ED-LoRA training), `sample` (text-to-image sampling), `regional`, `layout` and
`isolated` (keeping subjects apart), `fusion` (gradient fusion), `detect` (Grounding DINO + SAM),
`performance` (memory modes, compile), `export`, `single_file` and `lora_import` (other tools'
files), `scores` (CLIP/DINO metrics), `__main__` (the CLI).
"""

__version__ = "0.1.0"

# The default models, here where `python app.py --help` can read them without importing torch
DEFAULT_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # pipelines.base
DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"  # pipelines.detect: Grounding DINO
DEFAULT_SEGMENTER = "facebook/sam-vit-base"  # pipelines.detect: SAM

# Speed and memory settings (pipelines.performance), here for the same reason
MEMORY_MODES = ("auto", "high", "low", "lowest")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune-no-cudagraphs")

# Concept kinds (pipelines.edlora.KINDS) as people call them; here so `--help` and listings need no torch
KIND_NAMES = {"edlora": "ED-LoRA", "lora": "imported LoRA", "custom-diffusion": "Custom Diffusion", "cones": "Cones",
              "joint": "joint group (Gen4Gen)"}
