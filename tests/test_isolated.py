"""pipelines.isolated: Isolated Diffusion's formulas on synthetic tensors, peft's mixed-adapter batch,
the whole isolate path on the tiny model with a stand-in detector of known masks, and the CLI
(`isolate`, `train --auto-mask`) with the tiny random detector and segmenter."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
from PIL import Image

import pipelines.isolated as isolated_module
from pipelines.__main__ import main
from pipelines.base import load_base
from pipelines.concept import ConceptLibrary
from pipelines.detect import Detection
from pipelines.edlora import apply_concept, lora_layers, set_active_adapters
from pipelines.errors import UserError
from pipelines.isolated import (
    BASE_ADAPTER,
    IsolateConfig,
    Subject,
    branch_latents,
    combine_attachments,
    disjoint_masks,
    fuse_predictions,
    isolate,
    latent_masks,
    layout_step_index,
    mixed_adapters,
    parse_subject,
    save_stages,
    word_in_prompt,
)
from pipelines.layerwise import encode_layerwise, install_layerwise_attention
from pipelines.sample import (SampleConfig, decode_latents, denoise, initial_latents, make_scheduler, read_png_metadata,
                              sample_loaded)
from pipelines.train import TrainConfig, train_concept

from conftest import one_line_error, procedural_photo

PROMPT = "a dog and a cat on the grass"
SUBJECTS = (Subject("dog", "a photo of <mochi> dog"), Subject("cat", "a photo of <tama> cat"))


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def library(tiny_dir, tmp_path_factory):
    """<mochi> (dog) and <tama> (cat) trained briefly on the session tiny model, with LoRA learning
    rates high enough that each concept visibly changes the UNet's output."""
    lib = ConceptLibrary(tmp_path_factory.mktemp("isolated-library"))
    for index, (name, word) in enumerate([("mochi", "dog"), ("tama", "cat")]):
        base = load_base(str(tiny_dir), device="cpu")
        photos = [procedural_photo(2 * index), procedural_photo(2 * index + 1)]
        result = train_concept(base, photos, TrainConfig(name=name, class_word=word, steps=3, batch_size=1, seed=index,
                                                         lr_unet_lora=3e-2, lr_text_lora=1e-3, preview_steps=1,
                                                         checkpoint_every=0))
        lib.save(result.concept, result.tensors, result.preview)
    return lib


@pytest.fixture(scope="module")
def pristine_base(tiny_dir):
    """Shared by tests whose isolate call is refused before it touches the model."""
    return load_base(str(tiny_dir), device="cpu")


@pytest.fixture
def keep_sigint_handler():
    """`train` installs a Ctrl-C handler for its process; put pytest's back afterwards."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def column_mask(width: int, height: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[:, x0:x1] = True
    return mask


def stand_in(*found):
    """A detector returning fixed detections: (label, x0, x1, score) column bands of the image, or
    (label, None, None, score) for a detection without a mask. Records the labels it was asked for."""
    calls = []

    def detector(image, labels):
        calls.append((image.size, list(labels)))
        width, height = image.size
        out = []
        for label, x0, x1, score in found:
            if x0 is None:
                out.append(Detection(label, (0.0, 0.0, 8.0, 8.0), score, None))
            else:
                out.append(Detection(label, (float(x0), 0.0, float(x1), float(height)), score, column_mask(width, height, x0, x1)))
        return out

    detector.calls = calls
    return detector


def spy(monkeypatch, name):
    """Wrap pipelines.isolated.<name>, recording each call's arguments."""
    original = getattr(isolated_module, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(isolated_module, name, wrapper)
    return calls


# ---------------------------------------------------------------------------------------------
# Pure functions


def test_combine_attachments_hand_computed():
    g = torch.Generator().manual_seed(0)
    u, b, a1, a2 = (torch.randn(1, 4, 3, 3, generator=g) for _ in range(4))
    scale = 5.0
    expected = (1 - scale) * u + scale * b + scale * (a1 - b) + scale * (a2 - b)
    assert torch.allclose(combine_attachments(u, b, [a1, a2], scale), expected, atol=1e-5)
    # one attachment equal to the base adds nothing
    assert torch.allclose(combine_attachments(u, b, [b.clone()], scale), combine_attachments(u, b, [], scale))
    # a hand-sized case: l = 2, u = 1, base = 3, attachments 4 and 6 -> -1 + 6 + 2 + 6 = 13
    one = torch.ones(1, 1, 1, 1)
    assert combine_attachments(one, 3 * one, [4 * one, 6 * one], 2.0).item() == pytest.approx(13.0)


def test_combine_attachments_without_attachments_is_cfg():
    g = torch.Generator().manual_seed(1)
    u, c = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 4, 5, 5, generator=g)
    for scale in (1.0, 7.5):
        assert torch.allclose(combine_attachments(u, c, [], scale), u + scale * (c - u), atol=1e-5)
    assert torch.equal(combine_attachments(u, c, [], 1.0), c)


def test_branch_latents_replace_only_the_other_subjects_regions():
    latent = torch.arange(1 * 2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)
    noise = -torch.ones(1, 2, 4, 6) * 100
    regions = [(slice(None), slice(0, 2)), (slice(None), slice(2, 4)), (slice(0, 2), slice(4, 6))]
    masks = torch.zeros(3, 1, 4, 6)
    for i, (rows, cols) in enumerate(regions):
        masks[i, 0, rows, cols] = 1
    background = masks.sum(0)[0] == 0  # rows 2-3 of columns 4-5
    out = branch_latents(latent, noise, masks)
    assert out.shape == (3, 2, 4, 6)
    for i in range(3):
        own = masks[i, 0].bool()
        assert torch.equal(out[i][:, own], latent[0][:, own])
        assert torch.equal(out[i][:, background], latent[0][:, background])
        for j in range(3):
            if j != i:
                other = masks[j, 0].bool()
                assert torch.equal(out[i][:, other], noise[0][:, other])


def test_fuse_predictions_takes_each_branch_inside_its_mask():
    g = torch.Generator().manual_seed(2)
    eps_background = torch.randn(1, 4, 4, 4, generator=g)
    eps_subjects = torch.randn(2, 4, 4, 4, generator=g)
    masks = torch.zeros(2, 1, 4, 4)
    masks[0, 0, :, :2] = 1
    masks[1, 0, :2, 2:] = 1
    fused = fuse_predictions(eps_background, eps_subjects, masks)
    assert fused.shape == (1, 4, 4, 4)
    assert torch.equal(fused[0, :, :, :2], eps_subjects[0, :, :, :2])
    assert torch.equal(fused[0, :, :2, 2:], eps_subjects[1, :, :2, 2:])
    assert torch.equal(fused[0, :, 2:, 2:], eps_background[0, :, 2:, 2:])
    # no subjects' masks: the background prediction
    assert torch.equal(fuse_predictions(eps_background, eps_subjects, torch.zeros(2, 1, 4, 4)), eps_background)


def test_disjoint_masks_earlier_masks_keep_shared_pixels():
    first = column_mask(8, 4, 0, 5)
    second = column_mask(8, 4, 3, 8)
    third = column_mask(8, 4, 0, 8)
    out = disjoint_masks([first, second, third])
    assert np.array_equal(out[0], first)
    assert np.array_equal(out[1], column_mask(8, 4, 5, 8))
    assert not out[2].any()
    assert not (out[0] & out[1]).any()
    assert np.array_equal(second, column_mask(8, 4, 3, 8))  # inputs untouched
    assert disjoint_masks([]) == []


def test_latent_masks_half_coverage_hand_checked():
    """24x16 image, 8-pixel cells -> a 2x3 latent grid; a cell is in when >= 32 of its 64 pixels are."""
    mask = np.zeros((16, 24), bool)
    mask[0:8, 0:4] = True  # cell (0, 0): exactly half -> in
    mask[0:8, 8:11] = True  # cell (0, 1): 24 pixels -> out
    mask[8:16, 16:24] = True  # cell (1, 2): full -> in
    mask[8:12, 0:7] = True  # cell (1, 0): 28 pixels -> out
    mask[8:13, 8:15] = True  # cell (1, 1): 35 pixels -> in
    out = latent_masks([mask, ~mask], 2, 3)
    assert out.shape == (2, 1, 2, 3) and out.dtype == torch.float32
    assert out[0, 0].tolist() == [[1, 0, 0], [0, 1, 1]]
    # the complement: cell (0, 0) is half in both and goes to the earlier mask (they must stay disjoint)
    assert out[1, 0].tolist() == [[0, 1, 1], [1, 0, 0]]


def test_latent_masks_stay_disjoint_on_a_cell_split_half_and_half():
    """Two image masks sharing a boundary in the middle of a cell: without the tie going to the earlier
    mask, both claim the cell and the fused prediction there is the sum of two branches."""
    left, right = column_mask(16, 16, 0, 4), column_mask(16, 16, 4, 16)
    masks = latent_masks(disjoint_masks([left, right]), 2, 2)
    assert masks.sum(0).max() == 1
    assert masks[0, 0].tolist() == [[1, 0], [1, 0]] and masks[1, 0].tolist() == [[0, 1], [0, 1]]
    fused = fuse_predictions(torch.zeros(1, 1, 2, 2), torch.ones(2, 1, 2, 2), masks)
    assert torch.equal(fused, torch.ones(1, 1, 2, 2))


def test_layout_step_index():
    timesteps = torch.tensor([999, 799, 599, 399, 199])
    assert layout_step_index(timesteps, 0.75, 1000) == 2  # first <= 750
    assert layout_step_index(timesteps, 0.8, 1000) == 1  # 799 <= 800
    assert layout_step_index(timesteps, 0.598, 1000) == 3  # 599 > 598
    assert layout_step_index(timesteps, 0.9999, 1000) == 1  # index 0 would leave no layout step: at least 1
    assert layout_step_index(timesteps, 0.01, 1000) == 4  # none below: the last step
    assert layout_step_index(torch.tensor([801, 601, 401, 201]), 0.75, 1000) == 1  # 4 steps of SD's "leading" spacing


@pytest.mark.parametrize("word,prompt,expected", [
    ("dog", "a dog and a cat", True),
    ("Dog", "A DOG, running.", True),
    ("dog", "dog", True),
    ("dog", "a photo of <mochi> dog", True),
    ("dog", "a hotdog stand", False),
    ("dog", "two dogs", True),  # plurals and simple inflections are mentions of the label
    ("cat", "two cats on a sofa", True),
    ("puppy", "three puppies", True),
    ("fox", "two foxes", True),
    ("mouse", "two mice", True),
    ("cats", "a cat on a mat", True),
    ("teddy bear", "two teddy bears", True),
    ("dog", "a doggy", False),
    ("cat", "a caterpillar", False),
    ("dog", "a dog_house", False),
    ("mochi", "a photo of <mochi> dog", False),  # a concept token is not the word
    ("cat", "<cat> on a mat", False),
    ("teddy bear", "a teddy bear and a doll", True),
    ("teddy bear", "a teddy and a bear", False),
    ("c++", "I like c++ a lot", True),  # regex characters are escaped
])
def test_word_in_prompt(word, prompt, expected):
    assert word_in_prompt(word, prompt) is expected


def test_parse_subject():
    assert parse_subject("dog=<mochi> dog") == Subject("dog", "<mochi> dog")
    assert parse_subject("  cat =  a photo of <tama> cat ") == Subject("cat", "a photo of <tama> cat")
    assert parse_subject("dog=a dog = happy") == Subject("dog", "a dog = happy")  # only the first '=' splits
    for bad in ("dog", "=<mochi> dog", "dog=", " = ", ""):
        with pytest.raises(UserError, match="must look like"):
            parse_subject(bad)


@pytest.mark.parametrize("overrides,message", [
    (dict(subjects=(Subject("bird", "a bird"),)), "does not appear in the prompt"),
    (dict(subjects=(Subject("dog", "a dog"), Subject("dog", "a puppy")), attachments=("dog=wearing a hat",)), "several subjects share"),
    (dict(subjects=(Subject("dog", "<mochi> dog"),), attachments=("cat=wearing a hat",)), "not a --subject"),
    (dict(subjects=(), attachments=("dog=wearing a hat",)), "not a --subject"),
    (dict(t_lay=0.0), "--t-lay"),
    (dict(t_lay=1.0), "--t-lay"),
    (dict(steps=1), "--steps"),
    (dict(prompt="   "), "empty"),
    (dict(width=60), "60"),
    (dict(subjects=(Subject("dog", "<nobody> dog"),)), "unknown concept"),
    (dict(subjects=(Subject("dog", "<mochi> <tama> dog"),)), "several concepts"),
    (dict(prompt="a <mochi> dog and a cat", subjects=(Subject("dog", "<mochi> dog"),)), "full prompt names <mochi>"),
])
def test_isolate_refuses_bad_configs(pristine_base, library, overrides, message):
    settings = dict(prompt=PROMPT, subjects=SUBJECTS, steps=4)
    settings.update(overrides)

    def never(image, labels):
        raise AssertionError("the detector must not run for a refused config")

    with pytest.raises(UserError, match=message):
        isolate(pristine_base, library, IsolateConfig(**settings), detector=never)


def test_box_labels_match_plurals_in_the_prompt(pristine_base):
    """"two cats on a sofa" with two boxes labelled cat, "three puppies" with puppy: accepted."""
    from pipelines.isolated import check_isolate_config

    cats = IsolateConfig(prompt="two cats on a sofa", subjects=(Subject("cat", "a photo of a cat"),) * 2,
                         boxes=((0, 0, 32, 64), (32, 0, 64, 64)), steps=4, width=64, height=64)
    assert check_isolate_config(cats, pristine_base) == (64, 64)
    puppies = IsolateConfig(prompt="three puppies and two foxes", subjects=(Subject("puppy", "a puppy"), Subject("fox", "a fox")),
                            steps=4, width=64, height=64)
    assert check_isolate_config(puppies, pristine_base) == (64, 64)
    with pytest.raises(UserError, match="subject label 'cat' does not appear in the prompt"):
        check_isolate_config(IsolateConfig(prompt="a caterpillar", subjects=(Subject("cat", "a cat"),), steps=4), pristine_base)


# ---------------------------------------------------------------------------------------------
# peft's mixed-adapter batch


def test_mixed_adapters_runs_each_row_with_its_own_concept(fresh_base, library):
    base = fresh_base()
    for name in ("mochi", "tama"):
        apply_concept(base, name, library.weights(name))
    install_layerwise_attention(base.unet)
    unet = base.unet
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        context = encode_layerwise(base.tokenizer, base.text_encoder, ["a dog"])
        t = torch.tensor(500)

        def alone(adapters):
            set_active_adapters(unet, adapters)
            out = unet(latent, t, encoder_hidden_states=context).sample
            set_active_adapters(unet, [])
            return out[0]

        ref = {"mochi": alone(["mochi"]), "tama": alone(["tama"]), BASE_ADAPTER: alone([])}
        assert (ref["mochi"] - ref[BASE_ADAPTER]).abs().max() > 1e-3  # the concepts do change the output
        assert (ref["mochi"] - ref["tama"]).abs().max() > 1e-3

        for rows in (["mochi", BASE_ADAPTER], ["tama", "mochi", BASE_ADAPTER, "tama"]):
            with mixed_adapters(unet, rows):
                out = unet(latent.repeat(len(rows), 1, 1, 1), t, encoder_hidden_states=context.repeat(len(rows), 1, 1)).sample
            for row, adapter in zip(out, rows):
                assert torch.allclose(row, ref[adapter], atol=1e-5), adapter
            assert (out[0] - out[1]).abs().max() > 1e-3  # identical inputs, different outputs per row

    # afterwards: adapters off, no hook left; a plain call is the base model again
    layers = lora_layers(unet)
    assert layers and all(layer.disable_adapters for layer in layers.values())
    assert all(not layer._forward_pre_hooks for layer in layers.values())
    with torch.no_grad():
        assert torch.allclose(unet(latent, t, encoder_hidden_states=context).sample[0], ref[BASE_ADAPTER], atol=1e-6)
    # cleaned up on an exception too
    with pytest.raises(RuntimeError, match="boom"):
        with mixed_adapters(unet, ["mochi", "tama"]):
            raise RuntimeError("boom")
    assert all(layer.disable_adapters and not layer._forward_pre_hooks for layer in layers.values())
    # all rows the base: adapters are simply off
    with mixed_adapters(unet, [BASE_ADAPTER, BASE_ADAPTER]):
        assert all(layer.disable_adapters for layer in layers.values())


# ---------------------------------------------------------------------------------------------
# isolate on the tiny model


def test_isolate_each_subject_region_comes_from_its_branch(fresh_base, library, tmp_path, monkeypatch):
    """Stand-in detections: dog = pixel columns 0-24, cat = 40-64 of the 64x64 layout (latent columns 0-2
    and 5-7), background in between. A worse dog box and the cat come first in the detector's list."""
    base = fresh_base()
    detector = stand_in(("cat", 40, 64, 0.95), ("dog", 24, 40, 0.5), ("dog", 0, 24, 0.9))
    rows = spy(monkeypatch, "mixed_adapters")
    branched = spy(monkeypatch, "branch_latents")
    progress = []
    config = IsolateConfig(prompt=PROMPT, subjects=SUBJECTS, steps=6, seed=3)
    result = isolate(base, library, config, detector=detector, callback=lambda *a: progress.append(a))

    # the branches start from the layout's latent at its layout step (recomputed here by plain CFG
    # sampling stopped there) with fresh noise from seed + 1 in the other subject's region
    ((latent_at_lay, noise, latent_mask),) = branched
    scheduler = make_scheduler("dpm++", base.scheduler_config)
    scheduler.set_timesteps(6)
    lay_index = layout_step_index(scheduler.timesteps, 0.75, 1000)
    with torch.no_grad():
        set_active_adapters(base.unet, [])
        context = torch.cat([encode_layerwise(base.tokenizer, base.text_encoder, [t]) for t in (config.negative_prompt, PROMPT)])
        x = initial_latents(base, 1, 64, 64, 3) * scheduler.init_noise_sigma
        for t in scheduler.timesteps[:lay_index]:
            eps_u, eps_c = base.unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
            x = scheduler.step(eps_u + config.guidance * (eps_c - eps_u), t, x).prev_sample
    assert torch.allclose(latent_at_lay, x, rtol=0, atol=1e-5)
    assert torch.equal(noise, torch.randn(x.shape, generator=torch.Generator().manual_seed(4)) * scheduler.init_noise_sigma)
    assert latent_mask[:, 0, 0].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1, 1, 1]]

    assert detector.calls == [((64, 64), ["dog", "cat"])]
    assert [(d.label, d.score) for d in result.detections] == [("dog", 0.9), ("cat", 0.95)]  # subject order, best box
    assert list(result.masks) == ["dog", "cat"]
    assert np.array_equal(result.masks["dog"], column_mask(64, 64, 0, 24))
    assert np.array_equal(result.masks["cat"], column_mask(64, 64, 40, 64))
    assert result.missing == [] and result.message == ""

    # one UNet batch per step: [uncond, prompt] for the background, then each branch with its own concept
    assert [args[1] for args in rows] == [[BASE_ADAPTER] * 2 + ["mochi"] * 2 + ["tama"] * 2]

    latents = result.latents
    assert latents.shape == (3, 4, 8, 8)
    background, dog, cat = latents
    assert torch.allclose(background[:, :, 0:3], dog[:, :, 0:3], rtol=0, atol=1e-6)
    assert torch.allclose(background[:, :, 5:8], cat[:, :, 5:8], rtol=0, atol=1e-6)
    for branch in (dog, cat):  # outside every mask the background runs on its own
        assert (background[:, :, 3:5] - branch[:, :, 3:5]).abs().max() > 1e-2
    assert (dog[:, :, 5:8] - cat[:, :, 5:8]).abs().max() > 1e-2  # the dog branch had noise where the cat is
    assert (background[:, :, 0:3] - cat[:, :, 0:3]).abs().max() > 1e-2

    # the final image is the background latent decoded; the layout is a plain sample of the prompt
    assert result.final.size == result.layout.size == (64, 64)
    assert np.array_equal(np.asarray(result.final), np.asarray(decode_latents(base, latents[:1])[0]))
    plain = sample_loaded(base, SampleConfig(prompt=PROMPT, steps=6, seed=3, guidance=config.guidance))[0]
    assert np.array_equal(np.asarray(result.layout), np.asarray(plain))
    assert not np.array_equal(np.asarray(result.final), np.asarray(result.layout))

    # layout for all 6 steps, isolation from the layout step on: t_lay 0.75 of the tiny model's
    # 6-step schedule [853, 711, 569, 427, 285, 143] ("leading" spacing) is step 1
    meta = result.metadata
    assert meta["method"] == "isolated" and meta["layout_step"] == 1
    assert [p for p in progress if p[0] == "layout"] == [("layout", i, 6) for i in range(1, 7)]
    assert [p for p in progress if p[0] == "isolate"] == [("isolate", i, 5) for i in range(1, 6)]
    assert meta["concepts"] == ["mochi", "tama"] and [s["label"] for s in meta["subjects"]] == ["dog", "cat"]
    assert [d["label"] for d in meta["detections"]] == ["dog", "cat"] and meta["missing"] == []

    written = save_stages(result, tmp_path / "stages")
    names = sorted(p.name for p in written)
    assert names == ["detections.png", "final.png", "layout.png", "mask_cat.png", "mask_dog.png"]
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == names
    for stage in ("layout", "final", "detections"):
        stage_meta = read_png_metadata(tmp_path / "stages" / f"{stage}.png")
        assert stage_meta["method"] == "isolated" and stage_meta["stage"] == stage and stage_meta["prompt"] == PROMPT
    assert np.array_equal(np.asarray(Image.open(tmp_path / "stages" / "final.png").convert("RGB")), np.asarray(result.final))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "stages" / "mask_dog.png")), result.masks["dog"].astype(np.uint8) * 255)


def test_isolate_with_attachments_batches_every_prompt(fresh_base, library, monkeypatch):
    """A subject attachment joins its branch, a plain one the background; each adds its difference."""
    base = fresh_base()
    rows = spy(monkeypatch, "mixed_adapters")
    combined = spy(monkeypatch, "combine_attachments")
    config = IsolateConfig(prompt=PROMPT, subjects=SUBJECTS, attachments=("dog=a <mochi> dog wearing a red scarf", "at sunset"),
                           steps=4, seed=1)
    result = isolate(base, library, config, detector=stand_in(("dog", 0, 32, 0.9), ("cat", 32, 64, 0.8)))
    assert [args[1] for args in rows] == [[BASE_ADAPTER] * 3 + ["mochi"] * 3 + ["tama"] * 2]
    steps = 4 - result.metadata["layout_step"]
    assert [len(args[2]) for args in combined] == [1, 1, 0] * steps  # background, dog, cat
    background, dog, cat = result.latents
    assert torch.allclose(background[:, :, :4], dog[:, :, :4], rtol=0, atol=1e-6)
    assert torch.allclose(background[:, :, 4:], cat[:, :, 4:], rtol=0, atol=1e-6)


def test_nothing_found_returns_the_layout(fresh_base, library, tmp_path):
    base = fresh_base()
    for detector in (stand_in(), stand_in(("dog", None, None, 0.9))):  # nothing; a box without a mask
        result = isolate(base, library, IsolateConfig(prompt=PROMPT, subjects=SUBJECTS, steps=4), detector=detector)
        assert result.missing == ["dog", "cat"]
        assert "no subject was found" in result.message and "dog" in result.message and "cat" in result.message
        assert np.array_equal(np.asarray(result.final), np.asarray(result.layout))
        assert result.detections == [] and result.masks == {} and result.latents is None
        assert result.metadata["method"] == "isolated" and result.metadata["missing"] == ["dog", "cat"]
    written = save_stages(result, tmp_path / "stages")
    assert sorted(p.name for p in written) == ["detections.png", "final.png", "layout.png"]


def test_one_subject_missing_still_isolates_the_other(fresh_base, library, monkeypatch):
    base = fresh_base()
    rows = spy(monkeypatch, "mixed_adapters")
    result = isolate(base, library, IsolateConfig(prompt=PROMPT, subjects=SUBJECTS, steps=4),
                     detector=stand_in(("cat", 32, 64, 0.7)))
    assert result.missing == ["dog"]
    assert "dog" in result.message and "cat" not in result.message
    assert [d.label for d in result.detections] == ["cat"] and list(result.masks) == ["cat"]
    assert [args[1] for args in rows] == [[BASE_ADAPTER] * 2 + ["tama"] * 2]
    background, cat = result.latents
    assert torch.allclose(background[:, :, 4:], cat[:, :, 4:], rtol=0, atol=1e-6)
    assert (background[:, :, :4] - cat[:, :, :4]).abs().max() > 1e-2
    assert not np.array_equal(np.asarray(result.final), np.asarray(result.layout))
    assert result.metadata["missing"] == ["dog"] and result.metadata["message"] == result.message


def test_multi_attachment_only(fresh_base, library, monkeypatch):
    """No subjects: no layout and no detector; [uncond, base, attachments] combine from the first step;
    with no attachments it is plain CFG sampling."""
    base = fresh_base()

    def never(image, labels):
        raise AssertionError("no subject: the detector must not run")

    combined = spy(monkeypatch, "combine_attachments")
    config = IsolateConfig(prompt="a dog", attachments=("wearing a red scarf", "with a hat"), steps=4, seed=2)
    result = isolate(base, library, config, detector=never)
    assert isinstance(result.final, Image.Image) and result.final.size == (64, 64)
    assert result.layout is result.final and result.latents.shape == (1, 4, 8, 8)
    assert [len(args[2]) for args in combined] == [2] * 4
    assert result.metadata["method"] == "isolated" and result.detections == [] and result.missing == []

    plain = isolate(base, library, IsolateConfig(prompt="a dog", steps=4, seed=2), detector=never)
    with torch.no_grad():
        cond = encode_layerwise(base.tokenizer, base.text_encoder, ["a dog"])
        uncond = encode_layerwise(base.tokenizer, base.text_encoder, [config.negative_prompt])
        expected = denoise(base, initial_latents(base, 1, 64, 64, 2), cond, uncond, 4, config.guidance)
    assert torch.allclose(plain.latents, expected, atol=1e-4)
    assert (plain.latents - result.latents).abs().max() > 1e-2  # the attachments changed the sample


# ---------------------------------------------------------------------------------------------
# python -m pipelines isolate


def isolate_args(tiny_dir, library, tmp_path, *extra):
    return ["isolate", "--base", str(tiny_dir), "--library", str(library.root), "--prompt", PROMPT,
            "--detector", "tiny", "--segmenter", "tiny", "--out", str(tmp_path / "out.png"), "--steps", "4",
            "--device", "cpu", "--box-threshold", "0.05", "--text-threshold", "0.05", *extra]


def test_cli_isolate_with_the_tiny_detector(capsys, tiny_dir, library, tmp_path):
    stages = tmp_path / "stages"
    code = main(isolate_args(tiny_dir, library, tmp_path, "--subject", "dog=<mochi> dog", "--subject", "cat=<tama> cat",
                             "--stages", str(stages)))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"wrote {tmp_path / 'out.png'}" in out
    for name in ("layout.png", "detections.png", "final.png"):
        assert (stages / name).exists()
    meta = read_png_metadata(tmp_path / "out.png")
    assert meta["method"] == "isolated" and meta["prompt"] == PROMPT and meta["steps"] == 4
    assert [s["prompt"] for s in meta["subjects"]] == ["<mochi> dog", "<tama> cat"]
    # the random detector may or may not find each subject; the files follow what it found
    found = [d["label"] for d in meta.get("detections", [])]
    assert set(found) | set(meta["missing"]) == {"dog", "cat"} and not set(found) & set(meta["missing"])
    for label in ("dog", "cat"):
        assert (stages / f"mask_{label}.png").exists() == (label in found)
    if meta["missing"]:
        assert "note:" in out and all(label in out for label in meta["missing"])
    with Image.open(stages / "layout.png") as layout, Image.open(stages / "final.png") as final:
        assert np.array_equal(np.asarray(layout), np.asarray(final)) == (not found)  # isolation changed it iff found
    with Image.open(tmp_path / "out.png") as final, Image.open(stages / "final.png") as staged:
        assert final.size == (64, 64) and np.array_equal(np.asarray(final), np.asarray(staged))


@pytest.mark.parametrize("extra,fragments", [
    (["--subject", "bird=<mochi> dog"], ["'bird'", "does not appear in the prompt"]),
    (["--subject", "dog=<nobody> dog"], ["unknown concept 'nobody'"]),
    (["--subject", "dog"], ["must look like"]),
    (["--subject", "dog=<mochi> dog", "--t-lay", "0"], ["--t-lay 0.0"]),
    (["--subject", "dog=<mochi> dog", "--t-lay", "1"], ["--t-lay 1.0"]),
    (["--subject", "dog=<mochi> dog", "--t-lay", "1.5"], ["--t-lay 1.5"]),
    (["--subject", "dog=<mochi> dog", "--attachment", "cat=wearing a hat"], ["not a --subject"]),
])
def test_cli_isolate_bad_input_exits_2_with_one_line(capsys, tiny_dir, library, tmp_path, extra, fragments):
    code = main(isolate_args(tiny_dir, library, tmp_path, *extra))
    one_line_error(capsys, code, *fragments)
    assert not (tmp_path / "out.png").exists()


def test_cli_isolate_out_must_be_png(capsys, tiny_dir, library, tmp_path):
    argv = isolate_args(tiny_dir, library, tmp_path, "--subject", "dog=<mochi> dog")
    argv[argv.index("--out") + 1] = str(tmp_path / "out.jpg")
    one_line_error(capsys, main(argv), ".png")


# ---------------------------------------------------------------------------------------------
# python -m pipelines train --auto-mask


@pytest.fixture
def photos_dir(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        procedural_photo(i).save(folder / f"mochi{i}.png")
    return folder


def train_args(photos, library, *extra):
    return ["train", "--base", "tiny", "--images", str(photos), "--name", "mochi", "--class-word", "dog", "--device", "cpu",
            "--library", str(library), "--steps", "2", "--batch-size", "1", "--checkpoint-every", "0", *extra]


def test_cli_train_auto_mask(capsys, tiny_dir, tmp_path, photos_dir, monkeypatch, keep_sigint_handler):
    import pipelines.train as train_module
    from pipelines.detect import subject_mask

    seen = []
    original = train_module.train_concept

    def recording(base, photos, config, masks=None, **kwargs):
        seen.append(masks)
        return original(base, photos, config, masks=masks, **kwargs)

    monkeypatch.setattr(train_module, "train_concept", recording)
    library = tmp_path / "library"
    code = main(train_args(photos_dir, library, "--auto-mask", "--detector", "tiny", "--segmenter", "tiny"))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "saved concept <mochi> (dog, 3 photos, 2 steps" in out
    assert ConceptLibrary(library).get("mochi").class_word == "dog"
    assert (library / "mochi" / "concept.safetensors").exists()
    (masks,) = seen
    assert len(masks) == 3
    for i, mask in enumerate(masks):
        expected = subject_mask(procedural_photo(i), "dog", detector="tiny", segmenter="tiny", device="cpu")
        if expected is None:
            assert mask is None and f"no dog found in mochi{i}.png" in err
        else:
            assert mask.mode == "L" and mask.size == (64, 64)
            assert np.array_equal(np.asarray(mask), np.asarray(expected))


def test_cli_train_auto_mask_without_a_find_warns(capsys, tiny_dir, tmp_path, photos_dir, monkeypatch, keep_sigint_handler):
    import pipelines.detect as detect_module

    monkeypatch.setattr(detect_module, "subject_mask", lambda *a, **k: None)
    library = tmp_path / "library"
    code = main(train_args(photos_dir, library, "--auto-mask", "--detector", "tiny", "--segmenter", "tiny"))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert all(f"warning: no dog found in mochi{i}.png" in err for i in range(3))
    assert (library / "mochi" / "concept.json").exists()


def test_cli_train_masks_and_auto_mask_exclusive(capsys, tmp_path, photos_dir):
    code = main(train_args(photos_dir, tmp_path / "library", "--auto-mask", "--masks", str(photos_dir)))
    one_line_error(capsys, code, "--masks", "--auto-mask")


def test_two_subjects_of_one_class_each_get_their_own_detection_and_concept(fresh_base, library, monkeypatch):
    """Two dogs: the detector is asked for "dog" once; each subject takes its own detection (best
    score first) and its own concept's rows; masks are keyed "dog" and "dog-2"."""
    base = fresh_base()
    rows = spy(monkeypatch, "mixed_adapters")
    detector = stand_in(("dog", 0, 32, 0.9), ("dog", 32, 64, 0.8))
    subjects = (Subject("dog", "a photo of <mochi> dog"), Subject("dog", "a photo of <tama> dog"))
    result = isolate(base, library, IsolateConfig(prompt="a dog and a dog on the grass", subjects=subjects, steps=4, seed=1),
                     detector=detector)
    assert detector.calls[0][1] == ["dog"]
    assert [args[1] for args in rows] == [[BASE_ADAPTER] * 2 + ["mochi"] * 2 + ["tama"] * 2]
    assert sorted(result.masks) == ["dog", "dog-2"]
    assert result.masks["dog"][:, :32].all() and not result.masks["dog"][:, 32:].any()
    assert result.masks["dog-2"][:, 32:].all() and not result.masks["dog-2"][:, :32].any()
    background, first, second = result.latents
    assert torch.allclose(background[:, :, :4], first[:, :, :4], rtol=0, atol=1e-6)
    assert torch.allclose(background[:, :, 4:], second[:, :, 4:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("setting", ["boxes", "all", "off"])
def test_layout_with_boxes_bounds_each_box_to_its_own_subject_word(fresh_base, library, monkeypatch, setting):
    """With boxes the layout runs with bounded cross-attention: in the dog's box the cat's word is
    -inf and the dog's is not, and the other way round; the unconditional half is untouched;
    "all" also hides both words from the background; "off" passes no cross bias."""
    base = fresh_base()
    seen = []
    real_denoise = isolated_module.denoise

    def recording_denoise(*args, **kwargs):
        seen.append(kwargs.get("cross_attention_bias"))
        return real_denoise(*args, **kwargs)

    monkeypatch.setattr(isolated_module, "denoise", recording_denoise)
    detector = stand_in(("dog", 0, 32, 0.9), ("cat", 32, 64, 0.8))
    subjects = (Subject("dog", "a photo of <mochi> dog"), Subject("cat", "a photo of <tama> cat"))
    config = IsolateConfig(prompt="a dog and a cat on the grass", subjects=subjects, steps=4, seed=1,
                           boxes=((0, 16, 32, 64), (32, 16, 64, 64)), layout_cross_attention=setting)
    isolate(base, library, config, detector=detector)
    bias = seen[0]  # the layout's call (branches are denoised by their own loop)
    if setting == "off":
        assert bias is None
        return
    words = base.tokenizer.convert_ids_to_tokens(base.tokenizer("a dog and a cat on the grass").input_ids)
    dog, cat = words.index("dog</w>"), words.index("cat</w>")
    full = bias[64 * 64 // 64]  # the finest level: an 8x8 latent of the 64 px tiny model
    assert full.shape == (2, 1, 64, base.tokenizer.model_max_length)
    assert (full[0] == 0).all()  # unconditional half
    grid = full[1, 0].reshape(8, 8, -1)
    left, right, background = grid[2:, :4], grid[2:, 4:], grid[:2]  # the boxes start 16 px (2 latent rows) down
    assert torch.isinf(left[..., cat]).all() and (left[..., dog] == 0).all()
    assert torch.isinf(right[..., dog]).all() and (right[..., cat] == 0).all()
    if setting == "all":
        assert torch.isinf(background[..., [dog, cat]]).all()
    else:
        assert (background == 0).all()
    others = [i for i in range(len(words)) if i not in (dog, cat)]
    assert (grid[..., others] == 0).all()  # start of text, fillers and the end stay visible everywhere


def test_layout_cross_bias_finds_the_words_after_a_concept_in_the_full_prompt(fresh_base, library, monkeypatch):
    """With a fused model the full prompt may name concepts: `<mochi>` is encoded as its two tokens,
    so the subjects' words must be found in the expanded prompt, not in the raw text (where
    "<mochi>" is three tokens and every later position is off by one)."""
    from pipelines.layerwise import expand_prompt, known_concepts

    base = fresh_base()
    apply_concept(base, "mochi", library.weights("mochi"))
    seen = []
    real_denoise = isolated_module.denoise
    monkeypatch.setattr(isolated_module, "denoise", lambda *a, **k: seen.append(k["cross_attention_bias"]) or real_denoise(*a, **k))
    prompt = "a <mochi> dog and a cat"
    config = IsolateConfig(prompt=prompt, subjects=(Subject("dog", "a <mochi> dog"), Subject("cat", "a cat")), steps=2,
                           boxes=((0, 0, 32, 64), (32, 0, 64, 64)))
    with torch.no_grad():
        context = encode_layerwise(base.tokenizer, base.text_encoder, [prompt])
        uncond = encode_layerwise(base.tokenizer, base.text_encoder, [""])
    isolated_module.sample_layout(base, config, context, uncond, 64, 64, 0, 1, None, lambda: None)
    tokens = base.tokenizer.convert_ids_to_tokens(base.tokenizer(expand_prompt(prompt, 0, set(known_concepts(base.text_encoder)))).input_ids)
    dog, cat = tokens.index("dog</w>"), tokens.index("cat</w>")
    grid = seen[0][64][1, 0].reshape(8, 8, -1)
    blocked_left = torch.isinf(grid[:, :4]).all(0).all(0).nonzero().flatten().tolist()
    blocked_right = torch.isinf(grid[:, 4:]).all(0).all(0).nonzero().flatten().tolist()
    assert (blocked_left, blocked_right) == ([cat], [dog])
