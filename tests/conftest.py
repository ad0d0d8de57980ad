"""Shared fixtures: one tiny random model per session, fresh base models, photos, a trained concept.

Everything runs offline on the CPU. The tiny model is built once into a session cache that
`$MENAGERIE_CACHE` points at, so `--base tiny` and `load_base("tiny")` find it without touching ~.
Tests that mutate a base (training, applying a concept) load their own with `fresh_base()`.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported anywhere
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.base import build_tiny_model, load_base
from pipelines.train import TrainConfig, train_concept

# The tiny model's ops are too small to gain from a second thread (one thread measured ~20% faster
# on 2 cores), and spinning OpenMP threads slow to a crawl when other processes share the CPU.
torch.set_num_threads(1)


def pytest_configure(config):
    # diffusers' DPM-Solver trips a numpy 2 deprecation on every sample; it is not ours to fix
    config.addinivalue_line("filterwarnings", "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny-model ops are microseconds; with 2 cores shared by other jobs, OpenMP threads spinning
    against each other make every op ~100x slower. Modules of tiny ops use one thread."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory):
    """Point the model cache and the default library at session temp folders, offline."""
    cache = tmp_path_factory.mktemp("menagerie-cache")
    library = tmp_path_factory.mktemp("default-library")
    saved = {k: os.environ.get(k) for k in ("MENAGERIE_CACHE", "MENAGERIE_LIBRARY", "HF_HUB_OFFLINE")}
    os.environ.update(MENAGERIE_CACHE=str(cache), MENAGERIE_LIBRARY=str(library), HF_HUB_OFFLINE="1")
    yield {"cache": cache, "library": library}
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_dir(isolated_env):
    """The tiny random model, built once, where `load_base("tiny")` looks for it."""
    return build_tiny_model(isolated_env["cache"] / "tiny-model-v1")


@pytest.fixture
def fresh_base(tiny_dir):
    """A loader of unshared tiny base models (about 0.7 s each) for tests that mutate them."""

    def load():
        return load_base(str(tiny_dir), device="cpu")

    return load


@pytest.fixture
def base(fresh_base):
    return fresh_base()


def procedural_photo(seed: int = 0, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A deterministic RGB test picture: gradients plus a disc whose place depends on `seed`."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.RandomState(seed)
    cx, cy = rng.randint(w // 4, 3 * w // 4), rng.randint(h // 4, 3 * h // 4)
    disc = ((x - cx) ** 2 + (y - cy) ** 2) < (min(w, h) // 4) ** 2
    pixels = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), disc * 255], axis=-1).astype("uint8")
    return Image.fromarray(pixels)


@pytest.fixture
def make_photo():
    return procedural_photo


@pytest.fixture
def photo():
    return procedural_photo(0)


def quick_config(**overrides) -> TrainConfig:
    """A TrainConfig that runs in a second or two on the tiny model."""
    settings = dict(name="mochi", class_word="dog", steps=3, batch_size=1, crop_probability=0.0, preview_steps=1)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture
def config_factory():
    return quick_config


@pytest.fixture(scope="session")
def trained(tiny_dir):
    """One short training run shared read-only by library, export and sampling tests."""
    base = load_base(str(tiny_dir), device="cpu")
    return train_concept(base, [procedural_photo(0), procedural_photo(1)], quick_config(steps=4, preview_steps=2))


def fake_concept_tensors(dim: int = 32, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Structurally valid concept tensors (no base needed) for library tests."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embeddings": torch.randn(2, 16, dim, generator=g),
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(rank, dim, generator=g),
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(dim, rank, generator=g),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_q.lora_A.weight": torch.randn(rank, 64, generator=g),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_q.lora_B.weight": torch.randn(64, rank, generator=g),
    }


@pytest.fixture
def fake_tensors():
    return fake_concept_tensors


def one_line_error(capsys, code, *fragments):
    """A CLI user error: exit status 2 and one 'error: ...' line on stderr holding `fragments`, no traceback."""
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for fragment in fragments:
        assert fragment in err, err
    return err
