"""pipelines.sample: input checks, seeded sampling, concepts in prompts, PNG metadata."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
from PIL import Image

from pipelines.concept import ConceptLibrary
from pipelines.errors import Cancelled, UserError
from pipelines.sample import SampleConfig, check_sample_config, generate, read_png_metadata, sample_loaded, save_png


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.fixture
def library(tmp_path, trained):
    library = ConceptLibrary(tmp_path / "library")
    library.save(dataclasses.replace(trained.concept), trained.tensors, trained.preview)
    return library


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(width=60), "--width 60 must be a positive multiple of 8"),
        (dict(height=100), "--height 100 must be a positive multiple of 8"),
        (dict(width=-8), "--width -8 must be a positive multiple of 8"),
        (dict(width=0), "--width 0 must be a positive multiple of 8"),
        (dict(steps=0), "--steps 0 must be between 1 and 1000"),
        (dict(num_images=65), "--num-images 65 must be between 1 and 64"),
        (dict(guidance=-1.0), "--guidance -1.0 must be 0 or more"),
        (dict(prompt="   "), "the prompt is empty"),
        (dict(scheduler="plms"), "--scheduler 'plms' is not known; use one of dpm\\+\\+, ddim, euler"),
    ],
)
def test_bad_sample_settings_are_user_errors(base, overrides, message):
    config = SampleConfig(**{"prompt": "a photo of a dog", **overrides})
    with pytest.raises(UserError, match=message):
        check_sample_config(config, base)


def test_size_defaults_to_native_and_accepts_multiples_of_8(base):
    assert check_sample_config(SampleConfig(prompt="a dog"), base) == (64, 64)
    assert check_sample_config(SampleConfig(prompt="a dog", width=48, height=80), base) == (48, 80)


def test_same_seed_same_pixels_other_seed_differs(base):
    config = SampleConfig(prompt="a photo of a dog", steps=2)
    first = sample_loaded(base, config)[0]
    again = sample_loaded(base, config)[0]
    other = sample_loaded(base, dataclasses.replace(config, seed=1))[0]
    assert first.size == (64, 64) and first.mode == "RGB"
    assert np.array_equal(pixels(first), pixels(again))
    assert np.abs(pixels(first) - pixels(other)).max() > 0


def test_non_square_sizes_several_images_and_schedulers(base):
    steps_seen = []
    images = sample_loaded(base, SampleConfig(prompt="a dog", steps=2, width=48, height=32, num_images=2, scheduler="ddim"),
                           callback=lambda i, n: steps_seen.append((i, n)))
    assert [im.size for im in images] == [(48, 32), (48, 32)]
    assert steps_seen == [(1, 2), (2, 2)]
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))  # different noise per image
    (euler,) = sample_loaded(base, SampleConfig(prompt="a dog", steps=2, scheduler="euler"))
    assert euler.size == (64, 64)


def test_cancel_stops_sampling(base):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        sample_loaded(base, SampleConfig(prompt="a dog", steps=2), cancel=cancel)


def test_generate_with_a_trained_concept(fresh_base, library):
    """The concept's tokens and LoRA are loaded; its strength (lora_scale) changes the picture."""
    config = SampleConfig(prompt="a photo of <mochi>", steps=2)
    result = generate(fresh_base(), library, config)
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    meta = result.metadata
    assert meta["concepts"] == ["mochi"] and meta["method"] == "plain" and meta["fused"] is None
    # one LoRA scale in every mode: 1.0, as fused models and isolated branches apply it
    assert (meta["prompt"], meta["seed"], meta["steps"], meta["lora_scale"]) == ("a photo of <mochi>", 0, 2, 1.0)
    assert (meta["width"], meta["height"]) == (64, 64)
    assert "random test model" in meta["note"]
    again = generate(fresh_base(), library, config).images[0]
    assert np.array_equal(pixels(again), pixels(result.images[0]))
    no_lora = generate(fresh_base(), library, dataclasses.replace(config, lora_scale=0.0)).images[0]
    assert np.abs(pixels(no_lora) - pixels(result.images[0])).max() > 0


def test_generate_samples_one_concept_without_peft_wrappers_on_an_eager_unet(fresh_base, library, monkeypatch):
    """One concept: its UNet LoRA folded in and peft's wrappers swapped out while the UNet runs eager;
    the image is the one the wrapped, folded UNet makes."""
    import pipelines.edlora as edlora

    seen = []
    real = edlora.merged_adapter
    monkeypatch.setattr(edlora, "merged_adapter", lambda model, adapter, unwrap=False: seen.append(unwrap) or real(model, adapter, unwrap))
    config = SampleConfig(prompt="a photo of <mochi>", steps=2)
    unwrapped = generate(fresh_base(), library, config).images[0]
    monkeypatch.setattr(edlora, "merged_adapter", lambda model, adapter, unwrap=False: seen.append(unwrap) or real(model, adapter, False))
    wrapped = generate(fresh_base(), library, config).images[0]
    assert seen == [True, True] and np.array_equal(pixels(unwrapped), pixels(wrapped))


def test_generate_without_concept_on_a_base_with_one_loaded(fresh_base, library):
    """A concept-free prompt after a concept prompt samples the plain base (adapters switched off)."""
    plain = generate(fresh_base(), library, SampleConfig(prompt="a photo of a dog", steps=2)).images[0]
    base = fresh_base()
    generate(base, library, SampleConfig(prompt="a photo of <mochi>", steps=2))
    after = generate(base, library, SampleConfig(prompt="a photo of a dog", steps=2))
    assert after.metadata["concepts"] == [] and after.metadata["method"] == "plain"
    assert np.array_equal(pixels(after.images[0]), pixels(plain))


def test_generate_refuses_unknown_concepts_before_loading(base, library):
    with pytest.raises(UserError, match=r"unknown concept 'ghost' in library .* \(known: mochi\)"):
        generate(base, library, SampleConfig(prompt="a photo of <ghost>", steps=2))
    with pytest.raises(UserError, match=r"unknown concept 'ghost'"):
        generate(base, library, SampleConfig(prompt="a dog", negative_prompt="<ghost>", steps=2))
    with pytest.raises(UserError, match=r"unknown concept 'ghost'"):
        generate(base, library, SampleConfig(prompt="<mochi> and <ghost>", steps=2))
    assert len(base.tokenizer) == 49408  # refused before anything was loaded


def test_generate_refuses_concept_of_another_architecture(base, library, fake_tensors):
    from pipelines.concept import Concept

    library.save(Concept(name="alien", class_word="cat", base_model="sd2", fingerprint="ffffffffffffffff", photo_count=1),
                 fake_tensors())
    with pytest.raises(UserError, match="concept 'alien' was trained on sd2 .*Use --base sd2 or retrain"):
        generate(base, library, SampleConfig(prompt="a photo of <alien>", steps=2))


def test_png_metadata_round_trip(tmp_path):
    metadata = {"prompt": "a photo of <mochi>", "seed": 7, "steps": 4, "concepts": ["mochi"], "guidance": 7.5,
                "negative_prompt": "", "scheduler": "dpm++", "width": 8, "height": 8}
    image = Image.new("RGB", (8, 8), (9, 8, 7))
    path = save_png(image, tmp_path / "sub" / "out.png", metadata)
    assert path.exists() and not any(p.name.startswith(".") for p in path.parent.iterdir())
    assert read_png_metadata(path) == metadata
    with Image.open(path) as reread:
        assert np.array_equal(np.asarray(reread), np.asarray(image))
        assert "Seed: 7" in reread.info["parameters"] and "Steps: 4" in reread.info["parameters"]
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    assert read_png_metadata(tmp_path / "plain.png") == {}
