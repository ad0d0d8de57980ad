"""The offline demo (`python app.py --demo`, pipelines/demo.py): the studio on the toy world.

The demo library holds the stock pets and is writable without touching assets/; the training
form's examples are the pets' photos; the studio uses 64 px, the toy recipe and the oracle (as the
detector and as auto-mask); a generation of two stock pets in boxes shows both pets' classes to
the oracle; a Space without a GPU starts in demo mode; a base that cannot load points at --demo.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
from bench.toyworld.evaluate import GUIDANCE, ORACLE_PATH, PET_LEARNING_RATES, PET_STEPS, SAMPLE_STEPS, SHAPE_PATH
from bench.toyworld.oracle import Oracle
from bench.toyworld.world import PETS, pet_photos, pet_photos_with_masks
from pipelines.demo import STOCK_PETS, demo_by_default, prepare_demo
from pipelines.detect import subject_mask
from pipelines.jobs import DONE

STOCK = sorted(pet.name for pet in PETS)


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def oracle():
    return Oracle.load(ORACLE_PATH, SHAPE_PATH)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    return app.demo_studio(tmp_path_factory.mktemp("demo"))


def test_the_demo_library_holds_the_stock_pets_and_is_writable_without_touching_assets(tmp_path):
    assets = _checksums(STOCK_PETS)
    world = prepare_demo(tmp_path)
    library = app.ConceptLibrary(world.library)
    assert world.library == tmp_path / "concepts" and world.outputs == tmp_path / "outputs" and world.outputs.is_dir()
    assert library.names() == STOCK and not library.damaged()
    assert library.get("mimi").class_word == "cat"
    # the user's changes stay in the demo library: delete one, replace another, rename a third
    library.delete("kiwi")
    record = json.loads((world.library / "rex" / "concept.json").read_text())
    (world.library / "rex" / "concept.json").write_text(json.dumps({**record, "photo_count": 3}))
    library.rename("luna", "moon")
    assert _checksums(STOCK_PETS) == assets
    # a restart brings back a missing stock pet, and keeps what the user made of the others
    prepare_demo(tmp_path)
    assert library.names() == sorted(["bolt", "kiwi", "luna", "mimi", "moon", "rex"])
    assert library.get("rex").photo_count == 3
    assert _checksums(STOCK_PETS) == assets
    # chosen folders (--concepts-dir, --outputs-dir) are used instead
    other = prepare_demo(tmp_path / "root", tmp_path / "my-lib", tmp_path / "my-out")
    assert other.library == tmp_path / "my-lib" and app.ConceptLibrary(other.library).names() == STOCK
    assert other.outputs == tmp_path / "my-out" and other.outputs.is_dir()


def test_the_examples_are_the_stock_pets_photos_written_once(tmp_path):
    world = prepare_demo(tmp_path)
    assert [(name, cls) for _, name, cls in world.examples] == [(f"my-{pet.name}", pet.look.cls) for pet in PETS]
    for (paths, _, _), pet in zip(world.examples, PETS):
        assert len(paths) == 8
        for path, photo in zip(paths, pet_photos(pet)):
            assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), photo)
    first = world.examples[0][0][0]
    written = Path(first).stat().st_mtime_ns
    again = prepare_demo(tmp_path)
    assert again.examples == world.examples and Path(first).stat().st_mtime_ns == written  # not rewritten
    # the page may serve them, and the toy-world docs the banner links
    served = world.served_paths()
    assert str(Path(first).parent) in served and any(p.endswith("docs/toyworld.md") for p in served)


def test_the_demo_studio_uses_64_px_the_toy_recipe_and_the_oracle(studio):
    world = studio.demo
    assert studio.base_name.endswith("assets/toyworld/model") and not studio.is_test_model
    assert studio.default_size == 64
    assert studio.detector == world.detector and studio.detector_problem is None  # the oracle: nothing to download
    assert not studio.models.safety_checker
    assert "cannot be loaded" not in studio.status_markdown()
    page = app.build_app(studio.base_name, str(world.library), str(world.outputs), studio=studio)
    components = page.get_config_file()["components"]
    props = {c["props"].get("elem_id"): c["props"] for c in components if c.get("props", {}).get("elem_id")}
    # the training form: the toy recipe (PET_STEPS, PET_LEARNING_RATES), and the stock pets' photos as examples
    assert props["train-steps"]["value"] == PET_STEPS == 400
    assert props["train-lr-embedding"]["value"] == PET_LEARNING_RATES["lr_embedding"]
    numbers = {c["props"].get("label"): c["props"].get("value") for c in components if c["type"] == "number"}
    assert numbers["Learning rate, text-encoder LoRA"] == PET_LEARNING_RATES["lr_text_lora"]
    assert numbers["Learning rate, UNet LoRA"] == PET_LEARNING_RATES["lr_unet_lora"]
    examples = next(c["props"] for c in components if c["type"] == "dataset")
    assert len(examples["samples"]) == len(PETS) and "my-rex (dog)" in examples["sample_labels"]
    # the Generate form: 64 px, the toy world's 20 steps at guidance 5, no negative prompt, a prompt in its words
    assert props["generate-steps"]["value"] == SAMPLE_STEPS == 20
    sliders = {c["props"].get("label"): c["props"].get("value") for c in components if c["type"] == "slider"}
    assert sliders["Width"] == sliders["Height"] == 64 and sliders["Guidance"] == GUIDANCE
    assert props["generate-prompt"]["value"] == "a dog and a cat on the grass"
    negatives = [c["props"]["value"] for c in components if str(c["props"].get("label", "")).startswith("Negative prompt")]
    assert negatives == [""]
    # the banner says what the toy world is and links its docs
    banner = props["demo-banner"]["value"]
    for words in ("toy world", "made-up world", "64 px", "oracle", "docs/toyworld.md"):
        assert words in banner, words


def test_auto_mask_in_the_demo_is_the_oracles_mask_of_the_pet(studio):
    photos, masks = pet_photos_with_masks("rex", 3)
    for photo, truth in zip(photos, masks):
        mask = subject_mask(Image.fromarray(photo), "dog", detector=studio.detector, segmenter=studio.segmenter)
        found = np.asarray(mask) > 127
        assert (found & truth).sum() / (found | truth).sum() > 0.8
    assert subject_mask(Image.fromarray(photos[0]), "bird", detector=studio.detector) is None
    # a photo of another size: read at 64 px, the mask scaled back to the photo
    big = Image.fromarray(photos[0]).resize((128, 96))
    mask = subject_mask(big, "dog", detector=studio.detector)
    assert mask.size == (128, 96) and 0.05 < (np.asarray(mask) > 127).mean() < 0.6


def test_a_demo_generation_of_two_stock_pets_in_boxes_shows_both_classes(studio, oracle):
    """Isolated mode (the mode that keeps two pets apart in the toy world) with <rex> and <mimi> in
    side-by-side boxes, the studio's own defaults otherwise; the oracle reads the saved PNG."""
    rows = [app.default_row("<rex>", (2, 16, 30, 62), studio.library), app.default_row("<mimi>", (34, 16, 62, 62), studio.library)]
    assert [row.find for row in rows] == ["dog", "cat"]
    request = app.GenerationRequest(**{**studio.demo.sampling, "mode": app.ISOLATED, "seed": 1, "rows": tuple(rows)})
    started = time.monotonic()
    state = studio.submit_generation(request)
    for state in studio.follow(state.id, interval=0.2):
        pass
    assert state.status == DONE, state.message
    [path] = state.result.images
    image = Image.open(path)
    assert image.size == (64, 64)
    found = oracle.describe([image.convert("RGB")])[0]
    assert {"dog", "cat"} <= {f.look.cls for f in found}, [(f.look.cls, f.box) for f in found]
    assert any("Box 1 (dog)" in line for line in state.result.boxes)
    assert time.monotonic() - started < 120


def test_a_space_without_a_gpu_starts_in_demo_mode(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert not demo_by_default(base_chosen=False)  # not a Space
    monkeypatch.setenv("SPACE_ID", "someone/menagerie")
    assert demo_by_default(base_chosen=False)
    assert not demo_by_default(base_chosen=True)  # --base or $MENAGERIE_BASE chose a model
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert not demo_by_default(base_chosen=False)  # ZeroGPU lends a GPU
    monkeypatch.delenv("SPACES_ZERO_GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not demo_by_default(base_chosen=False)


def test_a_base_that_cannot_be_loaded_points_at_the_demo(tmp_path):
    studio = app.Studio("someone/not-cached-model", tmp_path / "lib", tmp_path / "out", detector="tiny", segmenter="tiny")
    status = studio.status_markdown()
    assert "cannot be loaded" in status and "python app.py --demo" in status
