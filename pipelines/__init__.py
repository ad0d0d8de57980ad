"""Menagerie: multi-concept personalisation of text-to-image diffusion (Mix-of-Show family).

Modules, one idea each: `base` (load or build base models), `layerwise` (layer-wise prompt
encoding), `edlora` (ED-LoRA concept weights on a base model), `concept` (the concept library on
disk), `train` (ED-LoRA training), `sample` (text-to-image sampling), `__main__` (the CLI).
"""

__version__ = "0.1.0"
