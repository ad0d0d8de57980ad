"""pipelines.safety: the safety checker on every generated image, its default, and its errors.

A tiny random `StableDiffusionSafetyChecker` (diffusers' class, a 2-layer CLIP vision tower) is
saved into copies of the tiny model. Its concept thresholds decide everything: at -2 every
cosine similarity (at least -1) is above them, so every image is flagged; at 2 none can be.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.__main__ import build_parser, main
from pipelines.base import load_base
from pipelines.concept import ConceptLibrary
from pipelines.detect import Detection
from pipelines.errors import UserError
from pipelines.isolated import IsolateConfig, Subject, isolate
from pipelines.safety import SAFETY_CHECKER_REPO, configure_safety, safety_enabled
from pipelines.sample import SampleConfig, generate, read_png_metadata

from conftest import one_line_error

CONFIG = SampleConfig(prompt="a dog on the grass", steps=2, num_images=2, seed=1)


def save_tiny_checker(folder: Path, threshold: float) -> None:
    """A random tiny safety checker whose 17 + 3 concept thresholds are all `threshold`, with its
    image processor, in `folder`/safety_checker and `folder`/feature_extractor (as SD1.5 has them)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=tower, vision_config={**tower, "image_size": 32, "patch_size": 4},
                                                      projection_dim=32))
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    checker.save_pretrained(folder / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder / "feature_extractor")


@pytest.fixture(scope="module")
def checked(tiny_dir, tmp_path_factory):
    """Copies of the tiny model with a checker that flags every image ("all") or none ("none")."""
    root = tmp_path_factory.mktemp("checked-models")
    folders = {}
    for kind, threshold in (("all", -2.0), ("none", 2.0)):
        folders[kind] = root / kind
        shutil.copytree(tiny_dir, folders[kind])
        save_tiny_checker(folders[kind], threshold)
    return folders


@pytest.fixture
def library(tmp_path):
    return ConceptLibrary(tmp_path / "lib")


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(image.convert("RGB")) for image in images]


def test_flagged_images_turn_black_and_are_named(checked, library):
    base = load_base(str(checked["all"]), device="cpu")
    configure_safety(base, True)
    assert base.safety_checker.source == f"{checked['all']}/safety_checker"  # the base's own checker, found first
    assert base.safety_checker.dtype == torch.float32  # fp32 on the CPU
    result = generate(base, library, CONFIG)
    assert result.blocked == [0, 1] and result.metadata["blocked"] == [0, 1]
    assert all(image.size == (64, 64) and not array.any() for image, array in zip(result.images, pixels(result.images)))
    configure_safety(base, False)  # the same weights, unscreened: not black at all
    assert all(array.any() for array in pixels(generate(base, library, CONFIG).images))


def test_unflagged_or_unchecked_images_are_bit_identical(checked, library, monkeypatch):
    base = load_base(str(checked["none"]), device="cpu")
    without = generate(base, library, CONFIG)
    configure_safety(base, True)
    calls = []
    forward = base.safety_checker.model.forward
    monkeypatch.setattr(base.safety_checker.model, "forward", lambda **kwargs: calls.append(kwargs) or forward(**kwargs))
    checked_result = generate(base, library, CONFIG)
    assert len(calls) == 1 and calls[0]["clip_input"].shape == (2, 3, 32, 32)  # it ran, once, on both images
    assert checked_result.blocked == [] and "blocked" not in checked_result.metadata
    assert all(np.array_equal(a, b) for a, b in zip(pixels(checked_result.images), pixels(without.images)))
    flagging = load_base(str(checked["all"]), device="cpu")  # the same tiny weights; its checker is never switched on
    assert all(np.array_equal(a, b) for a, b in zip(pixels(generate(flagging, library, CONFIG).images), pixels(without.images)))


def test_isolated_layout_and_final_are_screened(checked, library):
    base = load_base(str(checked["all"]), device="cpu")
    configure_safety(base, True)
    config = IsolateConfig(prompt="a dog on the grass", subjects=(Subject("dog", "a photo of a dog"),), steps=4)
    mask = np.zeros((64, 64), bool)
    mask[:, :32] = True
    result = isolate(base, library, config, detector=lambda image, labels: [Detection("dog", (0.0, 0.0, 32.0, 64.0), 0.9, mask)])
    assert result.blocked == ["layout", "final image"] and result.metadata["blocked"] == ["layout", "final image"]
    assert not np.asarray(result.layout).any() and not np.asarray(result.final).any()
    assert "the safety checker blocked the layout and the final image" in result.message
    nothing = isolate(base, library, config, detector=lambda image, labels: [])  # the layout is returned as the final image
    assert nothing.blocked == ["image"] and not np.asarray(nothing.final).any()
    assert nothing.message.startswith("no subject was found") and nothing.message.endswith("the safety checker blocked the image (black)")


def test_cli_notes_blocked_images_and_saves_them_black(capsys, checked, tmp_path):
    common = ["generate", "--base", str(checked["all"]), "--library", str(tmp_path / "lib"), "--prompt", "a dog",
              "--steps", "2", "--device", "cpu", "--num-images", "2"]
    assert main([*common, "--out", str(tmp_path / "on.png"), "--safety-checker", "on"]) == 0
    out = capsys.readouterr().out
    assert "note: the safety checker blocked image 1, 2 of 2 (black)" in out
    for i in (1, 2):
        assert not pixels([read_image(tmp_path / f"on_{i}.png")])[0].any()
        assert read_png_metadata(tmp_path / f"on_{i}.png")["blocked"] == [0, 1]
    assert main([*common, "--out", str(tmp_path / "off.png"), "--safety-checker", "off"]) == 0
    assert "safety checker" not in capsys.readouterr().out
    assert pixels([read_image(tmp_path / "off_1.png")])[0].any()


def read_image(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def test_studio_shows_which_images_were_blocked(checked, tmp_path):
    import app

    studio = app.Studio(str(checked["all"]), tmp_path / "lib", tmp_path / "out", safety_checker=True)
    assert "**safety checker** on" in studio.status_markdown()
    request = app.GenerationRequest(mode=app.REGIONAL, prompt="a dog", width=64, height=64, steps=2, num_images=2)
    state = studio.jobs.wait(studio.submit_generation(request).id, timeout=300)
    assert state.status == app.DONE, state.message
    assert state.result.message == "the safety checker blocked image 1, 2 of 2 (black)"
    assert all(not pixels([read_image(Path(p))])[0].any() for p in state.result.images)


def test_default_is_on_on_spaces_and_off_elsewhere(monkeypatch, tmp_path):
    import app

    monkeypatch.delenv("SPACE_ID", raising=False)
    assert safety_enabled(None) is False and safety_enabled("on") is True
    assert build_parser().parse_args(["generate", "--prompt", "x", "--out", "x.png"]).safety_checker is None
    assert app.Studio("tiny", tmp_path / "lib", tmp_path / "out").models.safety_checker is False
    monkeypatch.setenv("SPACE_ID", "someone/menagerie")
    assert safety_enabled(None) is True and safety_enabled("off") is False
    assert app.Studio("tiny", tmp_path / "lib", tmp_path / "out").models.safety_checker is True
    assert app.Studio("tiny", tmp_path / "lib", tmp_path / "out", safety_checker=False).models.safety_checker is False


def test_missing_checker_is_a_clear_error_when_on(capsys, tiny_dir, tmp_path, monkeypatch):
    """The tiny model has no checker of its own and the CompVis one is not cached here (offline)."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(SAFETY_CHECKER_REPO, "config.json"), str):
        pytest.skip(f"{SAFETY_CHECKER_REPO} is in this machine's Hugging Face cache")
    monkeypatch.delenv("SPACE_ID", raising=False)
    base = load_base(str(tiny_dir), device="cpu")
    with pytest.raises(UserError) as caught:
        configure_safety(base, True)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("the safety checker cannot be loaded (--safety-checker on)")
    assert f"`hf download {SAFETY_CHECKER_REPO}`" in message and "--safety-checker off" in message
    args = ["generate", "--base", str(tiny_dir), "--library", str(tmp_path / "lib"), "--prompt", "a dog", "--steps", "2",
            "--device", "cpu", "--out", str(tmp_path / "x.png")]
    capsys.readouterr()  # loader progress bars so far
    one_line_error(capsys, main([*args, "--safety-checker", "on"]), "the safety checker cannot be loaded", "hf download")
    assert not (tmp_path / "x.png").exists()
    monkeypatch.setenv("SPACE_ID", "someone/menagerie")  # a public demo does not run without it
    one_line_error(capsys, main(args), "on by default on Hugging Face Spaces", "--safety-checker off")
    assert not (tmp_path / "x.png").exists()
    assert main([*args, "--safety-checker", "off"]) == 0 and (tmp_path / "x.png").exists()
