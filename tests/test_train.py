"""pipelines.train: photos, augmentation, loss, and the ED-LoRA training loop on the tiny model."""

from __future__ import annotations

import random
import threading
import time
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import pipelines.train as train_module
from pipelines.edlora import lora_layers, lora_parameters
from pipelines.errors import Cancelled, UserError
from pipelines.layerwise import (
    LayerwiseAttnProcessor,
    add_concept_tokens,
    cross_attention_layers,
    encode_layerwise,
    install_layerwise_attention,
    known_concepts,
)
from pipelines.train import (
    CHECKPOINT_FILE,
    OBJECT_TEMPLATES,
    ConceptAttentionMaps,
    attention_regulariser,
    caption,
    composite_caption,
    concept_token_positions,
    default_steps,
    embedding_norm,
    find_masks,
    find_photos,
    load_photo,
    load_training_set,
    make_composite,
    masked_mse,
    prior_scene_prompts,
    recording_cross_attention,
    resize_crop_paste,
    to_tensors,
    train_concept,
)

from conftest import procedural_photo, quick_config


@pytest.fixture(scope="module")
def pristine_base(tiny_dir):
    """A base shared by tests whose training is refused before it touches the model."""
    from pipelines.base import load_base

    return load_base(str(tiny_dir), device="cpu")


def concept_vectors(base, name="mochi"):
    return base.text_encoder.get_input_embeddings().concept_vectors[name]


# ---------------------------------------------------------------------------------------------
# Photos


def test_find_photos_sorts_images_and_skips_other_files(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in find_photos([tmp_path])] == ["a.jpg", "b.png"]


def test_folder_without_images_is_a_user_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no photos here")
    with pytest.raises(UserError, match="no images found in .*; add JPEG/PNG/WebP photos"):
        find_photos([tmp_path])
    with pytest.raises(UserError, match="does not exist"):
        find_photos([tmp_path / "missing"])


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_text("this is not a JPEG")
    with pytest.raises(UserError, match=r"cannot read image '.*broken\.jpg'.*replace it with a JPEG or PNG"):
        load_photo(bad)


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored landscape with EXIF orientation 6 (rotate 90) loads as portrait."""
    path = tmp_path / "phone.jpg"
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    image.paste((10, 10, 200), (0, 0, 10, 20))  # blue band on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif.tobytes(), quality=95)
    loaded = load_photo(path)
    assert loaded.size == (20, 40)
    assert loaded.mode == "RGB"
    top = np.asarray(loaded)[:5, :, 2].mean()
    bottom = np.asarray(loaded)[-5:, :, 2].mean()
    assert top > 150 > bottom  # orientation 6: the left edge becomes the top


def test_rgba_and_grey_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 4, 8))  # left half fully transparent
    rgba.save(tmp_path / "alpha.png")
    loaded = np.asarray(load_photo(tmp_path / "alpha.png"))
    assert loaded.shape == (8, 8, 3)
    assert (loaded[:, :4] == 255).all()  # transparent -> white
    assert (loaded[:, 4:] == [255, 0, 0]).all()
    Image.new("L", (8, 6), 77).save(tmp_path / "grey.png")
    grey = load_photo(tmp_path / "grey.png")
    assert grey.mode == "RGB" and grey.size == (8, 6)
    assert (np.asarray(grey) == 77).all()


def test_masks_are_matched_by_stem_and_checked(tmp_path):
    photos_dir, masks_dir = tmp_path / "photos", tmp_path / "masks"
    photos_dir.mkdir()
    masks_dir.mkdir()
    procedural_photo(0).save(photos_dir / "one.png")
    procedural_photo(1).save(photos_dir / "two.jpg")
    photos = find_photos([photos_dir])
    Image.new("L", (64, 64), 255).save(masks_dir / "one.png")
    with pytest.raises(UserError, match=r"no mask for photo two\.jpg .*two\.png"):
        find_masks(masks_dir, photos)
    Image.new("L", (32, 32), 255).save(masks_dir / "two.png")
    masks = find_masks(masks_dir, photos)
    with pytest.raises(UserError, match=r"mask two\.png is 32x32, its photo 64x64"):
        load_training_set(photos, masks)
    Image.new("L", (64, 64), 0).save(masks_dir / "two.png")
    with pytest.raises(UserError, match=r"mask two\.png is empty"):
        load_training_set(photos, masks)


def test_fewer_than_three_photos_warn(tmp_path):
    paths = []
    for i in range(2):
        procedural_photo(i).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        photos, masks = load_training_set(paths)
    assert [p.size for p in photos] == [(64, 64), (64, 64)] and masks is None
    assert [str(w.message) for w in caught] == ["only 2 photo(s): identity is learned better from 3 or more"]
    procedural_photo(2).save(tmp_path / "2.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_training_set(paths + [tmp_path / "2.png"])


# ---------------------------------------------------------------------------------------------
# Pure helpers, against hand-derived numbers


def test_default_steps_is_500_examples_per_photo():
    assert default_steps(5, 2) == 1250
    assert default_steps(3, 4) == 375
    assert default_steps(1, 3) == 167


def test_masked_mse_normalises_by_mask_area():
    prediction = torch.zeros(2, 4, 2, 2)
    target = torch.ones(2, 4, 2, 2)
    target[0, :, 0, 0] = 3.0  # error 9 on one pixel of sample 0
    mask = torch.zeros(2, 1, 2, 2)
    mask[0, 0, 0, :] = 1.0  # sample 0: two pixels, errors 9 and 1 -> 5
    # sample 1: empty mask -> 0 (area clamped to 1)
    assert masked_mse(prediction, target, mask).item() == pytest.approx((5.0 + 0.0) / 2)
    mask[1] = 1.0  # sample 1: four pixels of error 1 -> 1
    assert masked_mse(prediction, target, mask).item() == pytest.approx((5.0 + 1.0) / 2)


def test_embedding_norm_is_mean_l2_norm():
    vectors = torch.zeros(2, 16, 4)
    vectors[0] = 3.0  # norm 6
    vectors[1, :, 0] = 2.0  # norm 2
    assert embedding_norm(vectors) == pytest.approx(4.0)


def test_resize_crop_paste_geometry():
    """Landscape, no crop: resized to 64x32 and pasted at a random height; the pasted mask says where."""
    image = procedural_photo(0, (128, 64))
    canvas, subject, pasted = resize_crop_paste(image, None, 64, 0.0, random.Random(1))
    assert canvas.size == (64, 64) and subject is None
    area = np.asarray(pasted) > 127
    assert area.sum() == 64 * 32
    rows = np.where(area.any(axis=1))[0]
    assert rows.max() - rows.min() + 1 == 32
    assert (np.asarray(canvas)[~area] == 0).all()  # black outside the pasted area
    # crop always: a 64-wide crop of the 128x64 resize fills the whole canvas
    mask = Image.new("L", (128, 64), 0)
    mask.paste(255, (0, 0, 64, 64))
    canvas, subject, pasted = resize_crop_paste(image, mask, 64, 1.0, random.Random(1))
    assert (np.asarray(pasted) == 255).all()
    assert subject.size == (64, 64) and 0 < (np.asarray(subject) > 127).sum() <= 64 * 64


def test_portrait_crop_keeps_the_top():
    """Portrait crops keep the top part (where a head is), never the bottom alone."""
    image = Image.new("RGB", (64, 128), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 64, 16))  # white top band
    for seed in range(5):
        canvas, _, pasted = resize_crop_paste(image, None, 64, 1.0, random.Random(seed))
        area = np.asarray(pasted) > 127
        rows = np.where(area.any(axis=1))[0]
        assert (np.asarray(canvas)[rows.min(), area[rows.min()]] > 200).all()


def test_to_tensors_scales_pixels_and_downsamples_mask():
    canvas = Image.new("RGB", (64, 64), (255, 0, 128))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    pixels, small = to_tensors(canvas, mask, 8)
    assert pixels.shape == (3, 64, 64) and small.shape == (1, 8, 8)
    assert pixels[0].eq(1.0).all() and pixels[1].eq(-1.0).all()
    assert small[0, :, :4].eq(1).all() and small[0, :, 4:].eq(0).all()


def test_caption_uses_object_templates_with_the_token():
    text = caption("mochi", random.Random(0))
    assert "<mochi>" in text
    assert text in {t.format("<mochi>") for t in OBJECT_TEMPLATES}


def test_default_batches_draw_as_before_composites_existed(photo):
    """With composites and prior scenes off, a batch draws photo, augmentation and template from the
    RNG in the original order, so a seed keeps its results."""
    config = quick_config(batch_size=3, crop_probability=0.5)
    photos = [photo, procedural_photo(1)]
    pixels, loss_masks, subject_masks, prompts = train_module._make_batch(photos, None, config, 64, 8, random.Random(5))
    rng = random.Random(5)
    for i in range(3):
        index = rng.randrange(2)
        canvas, _, pasted = resize_crop_paste(photos[index], None, 64, 0.5, rng)
        expected_pixels, expected_mask = to_tensors(canvas, pasted, 8)
        assert torch.equal(pixels[i], expected_pixels) and torch.equal(loss_masks[i], expected_mask)
        assert prompts[i] == caption("mochi", rng)
    assert subject_masks.eq(1).all()  # no subject masks: nothing for the regulariser


# ---------------------------------------------------------------------------------------------
# Concepts that share the frame: the attention regulariser, composites, prior scenes


def test_attention_regulariser_is_zero_inside_the_mask_and_positive_outside():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0  # the subject: left half
    fine, coarse = torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 4, 4)
    fine[..., :4] = torch.rand(1, 2, 8, 4, generator=torch.Generator().manual_seed(0)) + 0.1
    coarse[..., :2] = 0.5
    inside = {64: fine.flatten(2), 16: coarse.flatten(2)}
    assert attention_regulariser(inside, mask, 0.01).item() == 0.0

    # uniform maps are 1 everywhere once divided by their max: mean outside 1 for each word,
    # weight * (1 + 1) per resolution, two resolutions
    uniform = {64: torch.full((1, 2, 64), 0.3), 16: torch.full((1, 2, 16), 0.1)}
    assert attention_regulariser(uniform, mask, 0.01).item() == pytest.approx(0.04)
    assert attention_regulariser(uniform, mask, 0.5).item() == pytest.approx(2.0)

    # one V_rand pixel outside at half the map's max: normalised 0.5 there, over 32 outside pixels
    leaking = fine.clone()
    leaking[0, 0, 0, 7] = 0.5 * fine[0, 0].max()
    leaking = {64: leaking.flatten(2).requires_grad_(True), 16: coarse.flatten(2)}
    value = attention_regulariser(leaking, mask, 0.01)
    assert value.item() == pytest.approx(0.01 * 0.5 / 32)
    value.backward()
    assert leaking[64].grad[0, 0, 7] > 0  # lowering the leak lowers the loss

    # examples whose mask covers everything (no subject mask, no concept) or nothing are skipped
    two = {tokens: torch.cat([maps, maps]) for tokens, maps in uniform.items()}
    for other in (torch.ones_like(mask), torch.zeros_like(mask)):
        assert attention_regulariser(two, torch.cat([mask, other]), 0.01).item() == pytest.approx(0.04)
        assert attention_regulariser(uniform, other, 0.01).item() == 0.0


def test_concept_token_positions_and_recorded_maps_per_resolution(base):
    """The recorder keeps `[B, 2, N]` head-averaged maps of V_rand and V_class for each layer, grouped
    by token count (the tiny UNet's latent is 8x8: 5 layers at 8x8, 4x4 and 2x2, the mid layer at
    1x1), changes no layer's output, and its processors leave when it is done."""
    vectors = 0.1 * torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    add_concept_tokens(base.tokenizer, base.text_encoder, "mochi", vectors)
    install_layerwise_attention(base.unet)
    prompts = ["a photo of <mochi>", "a cat and a <mochi> on grass"]
    positions = concept_token_positions(base.tokenizer, prompts, "mochi")
    assert positions.tolist() == [[4, 5], [5, 6]]  # after <start>: a photo of | a cat and a
    assert concept_token_positions(base.tokenizer, ["a photo of a dog"], "mochi").tolist() == [[-1, -1]]

    inputs = {}
    mid = dict(cross_attention_layers(base.unet))["mid_block.attentions.0.transformer_blocks.0.attn2"]
    mid.register_forward_pre_hook(lambda module, args, kwargs: inputs.update(hidden=args[0]), with_kwargs=True)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([10, 500])
    before = [module.processor for _, module in cross_attention_layers(base.unet)]
    store = ConceptAttentionMaps()
    with torch.no_grad():
        context = encode_layerwise(base.tokenizer, base.text_encoder, prompts)
        expected = base.unet(latents, timesteps, encoder_hidden_states=context).sample
        with recording_cross_attention(base.unet, store):
            store.start(positions)
            recorded = base.unet(latents, timesteps, encoder_hidden_states=context).sample
    assert [module.processor for _, module in cross_attention_layers(base.unet)] == before
    assert all(isinstance(p, LayerwiseAttnProcessor) for p in before)
    torch.testing.assert_close(recorded, expected, atol=1e-5, rtol=1e-4)  # explicit softmax = SDPA

    assert {tokens: len(layers) for tokens, layers in store.maps.items()} == {64: 5, 16: 5, 4: 5, 1: 1}
    maps = store.by_resolution()
    for tokens, word_maps in maps.items():
        assert word_maps.shape == (2, 2, tokens)
        assert ((word_maps > 0) & (word_maps < 1)).all()
    # the mid layer (layer 6) by hand: softmax(Q K^T / sqrt(d)) on copy 6, mean over heads, two columns
    with torch.no_grad():
        heads, query = mid.heads, mid.to_q(inputs["hidden"])
        key = mid.to_k(context.view(2, 16, 77, -1)[:, 6])
        q = query.view(2, -1, heads, query.shape[-1] // heads).transpose(1, 2)
        k = key.view(2, 77, heads, key.shape[-1] // heads).transpose(1, 2)
        probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1).mean(1)  # [B, 1, 77]
    by_hand = torch.stack([probs[b, :, positions[b]].T for b in range(2)])  # [B, 2, 1]
    torch.testing.assert_close(maps[1], by_hand, atol=1e-6, rtol=1e-5)


def test_regulariser_uses_the_subject_mask_and_adds_to_the_loss(fresh_base, monkeypatch):
    """With subject masks the loss gains weight * (L_rand + L_class), computed against the subject
    mask (not the pasted area), with maps at every resolution even after a preview; without
    masks, or at weight 0, it is not computed. Training processors are put back afterwards."""
    calls = []
    real = train_module.attention_regulariser

    def spy(maps, subject_masks, weight):
        value = real(maps, subject_masks, weight)
        calls.append((sorted(maps), subject_masks.clone(), weight, value.item()))
        return value

    monkeypatch.setattr(train_module, "attention_regulariser", spy)
    landscape = procedural_photo(0, (128, 64))  # pasted as a 64x32 band
    mask = Image.new("L", (128, 64), 0)
    mask.paste(255, (0, 0, 64, 64))  # the subject: the band's left half
    config = quick_config(steps=2, preview_every=1)
    base = fresh_base()
    with_reg = train_concept(base, [landscape], config, masks=[mask])
    assert all(isinstance(module.processor, LayerwiseAttnProcessor) for _, module in cross_attention_layers(base.unet))
    assert [(keys, weight) for keys, _, weight, _ in calls] == [([1, 4, 16, 64], 0.01)] * 2
    _, subject_mask, _, value = calls[0]
    assert subject_mask.sum() == 16 and subject_mask[..., 4:].sum() == 0  # 4x4 latent pixels; the band has 4x8
    assert value > 0  # an untrained concept's attention spreads over the whole picture

    without = train_concept(fresh_base(), [landscape], replace(config, attn_reg_weight=0.0, steps=1), masks=[mask])
    train_concept(fresh_base(), [landscape], replace(config, steps=1))
    assert len(calls) == 2
    assert with_reg.losses[0] == pytest.approx(without.losses[0] + value, abs=1e-5)


def test_make_composite_puts_the_pet_in_its_half_at_three_quarters_to_full_fit():
    pet = Image.new("RGB", (40, 80), (255, 0, 0))
    cut = Image.new("L", (40, 80), 0)
    cut.paste(255, (10, 0, 30, 60))  # the pet: a 20x60 cut-out of its tile
    companion = Image.new("RGB", (64, 64), (0, 0, 255))
    sides = set()
    for seed in range(12):
        canvas, pet_area, pet_on_left = make_composite(pet, cut, companion, 128, random.Random(seed))
        sides.add(pet_on_left)
        pixels, area = np.asarray(canvas), np.asarray(pet_area) > 127
        own, other = (slice(0, 64), slice(64, 128)) if pet_on_left else (slice(64, 128), slice(0, 64))
        assert area.any() and not area[:, other].any()
        rows, cols = np.where(area)
        fit = min(64 / 20, 128 / 60)  # height-bound in a 64x128 half
        assert 0.75 * 60 * fit - 1 <= rows.max() - rows.min() + 1 <= 60 * fit + 1
        assert (rows.max() - rows.min() + 1) / (cols.max() - cols.min() + 1) == pytest.approx(3, rel=0.1)
        red, blue = (pixels == [255, 0, 0]).all(-1), (pixels == [0, 0, 255]).all(-1)
        assert np.array_equal(red, area)  # the cut-out itself, not its tile
        assert blue[:, other].any() and not blue[:, own].any()
        blue_cols = np.where(blue.any(axis=0))[0]
        assert 48 - 1 <= blue_cols.max() - blue_cols.min() + 1 <= 64  # 64x64 fits a 64-wide half at 1
        assert (pixels[~(red | blue)] == 0).all()  # black canvas elsewhere
    assert sides == {True, False}
    assert composite_caption("rex", "cat", True, random.Random(0)) in {t.format("<rex> and a cat") for t in OBJECT_TEMPLATES}
    assert composite_caption("rex", "cat", False, random.Random(0)) in {t.format("cat and a <rex>") for t in OBJECT_TEMPLATES}


def test_composite_examples_mask_only_the_pet_and_name_it_on_its_side(photo):
    config = quick_config(batch_size=8, multi_subject_probability=1.0)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    companions = [("cat", Image.new("RGB", (128, 128), (0, 0, 255)))]
    _, loss_masks, subject_masks, prompts = train_module._make_batch([photo], [mask], config, 128, 16, random.Random(0), companions)
    sides = set()
    for loss_mask, subject_mask, prompt in zip(loss_masks, subject_masks, prompts):
        assert torch.equal(loss_mask, subject_mask)  # the pet's pasted subject mask, for both
        on_left, on_right = loss_mask[0, :, :8].any().item(), loss_mask[0, :, 8:].any().item()
        assert on_left != on_right
        sides.add(on_left)
        pair = "<mochi> and a cat" if on_left else "cat and a <mochi>"
        assert prompt in {t.format(pair) for t in OBJECT_TEMPLATES}
        assert 5 * 5 <= loss_mask.sum() <= 9 * 9  # the 64-pixel subject at 0.75-1 in a 16-latent
    assert sides == {True, False}

    # without masks the pet is its whole photo tile: a rectangle; no regulariser mask
    _, loss_masks, subject_masks, _ = train_module._make_batch([photo], None, config, 128, 16, random.Random(0), companions)
    for loss_mask in loss_masks:
        rows, cols = torch.where(loss_mask[0] > 0)
        assert loss_mask.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert not (loss_mask[0, :, :8].any() and loss_mask[0, :, 8:].any())
    assert subject_masks.eq(1).all()


def test_prior_examples_keep_their_caption_and_whole_image_loss(photo):
    scene = Image.new("RGB", (64, 64), (10, 200, 30))
    config = quick_config(batch_size=3, prior_probability=1.0)
    pixels, loss_masks, subject_masks, prompts = train_module._make_batch(
        [photo], [Image.new("L", (64, 64), 255)], config, 64, 8, random.Random(0), prior_scenes=[("a photo of a dog and a cat", scene)])
    assert prompts == ["a photo of a dog and a cat"] * 3
    assert loss_masks.eq(1).all() and subject_masks.eq(1).all()
    assert torch.equal(pixels[0], to_tensors(scene, scene.convert("L"), 8)[0])


def test_companions_and_prior_scenes_come_from_the_base_model_once(fresh_base, photo, trained, monkeypatch):
    """Made at the start with no concept: the trained concept's tokens do not exist yet and every
    adapter (here another concept's, loaded before) is off; each distinct prompt is one batch."""
    from pipelines.edlora import apply_concept

    calls = []
    real_sample = train_module.sample_loaded

    def sample_spy(base, config, *args, **kwargs):
        active = [name for name, layer in lora_layers(base.unet).items() if not layer.disable_adapters]
        calls.append(dict(prompt=config.prompt, n=config.num_images, steps=config.steps, size=(config.width, config.height),
                          concepts=known_concepts(base.text_encoder), active=active))
        return real_sample(base, config, *args, **kwargs)

    seen = []
    real_encode = train_module.encode_layerwise

    def encode_spy(tokenizer, text_encoder, prompts):
        seen.extend(prompts)
        return real_encode(tokenizer, text_encoder, prompts)

    monkeypatch.setattr(train_module, "sample_loaded", sample_spy)
    monkeypatch.setattr(train_module, "encode_layerwise", encode_spy)
    assert train_module.COMPANION_SAMPLE_STEPS == 20
    monkeypatch.setattr(train_module, "COMPANION_SAMPLE_STEPS", 2)  # the tiny model draws noise either way
    base = fresh_base()
    apply_concept(base, "other", trained.tensors)
    config = quick_config(steps=4, batch_size=2, companions=("cat",), companion_images=3, prior_images=4,
                          multi_subject_probability=0.5, prior_probability=0.5)
    train_concept(base, [photo], config)
    *made, preview = calls
    assert [(c["prompt"], c["n"]) for c in made] == [
        ("a photo of a cat", 2), ("a photo of a dog", 1),  # the companion, then the own class word
        ("a photo of a cat and a cat", 2), ("a photo of a cat and a dog", 1), ("a photo of a dog and a dog", 1),
    ]
    assert all(c["steps"] == 2 and c["size"] == (64, 64) and c["concepts"] == ["other"] and c["active"] == [] for c in made)
    assert preview["prompt"] == "a photo of <mochi>"

    scenes = set(prior_scene_prompts(("cat", "dog"), 4))
    pairs = ("<mochi> and a cat", "cat and a <mochi>", "<mochi> and a dog", "dog and a <mochi>")
    composites = {t.format(pair) for t in OBJECT_TEMPLATES for pair in pairs}
    assert len(seen) == 8 and set(seen) <= scenes | composites
    assert set(seen) & scenes and set(seen) & composites


# ---------------------------------------------------------------------------------------------
# Configuration errors (raised before the base is touched)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(steps=0), "--steps must be at least 1, got 0"),
        (dict(batch_size=0), "batch size must be a positive integer, got 0"),
        (dict(lr_unet_lora=-1e-4), "lr_unet_lora must be 0 or more"),
        (dict(name="Mochi!"), "concept name 'Mochi!' is not valid"),
        (dict(class_word="hot dog"), "class word 'hot dog' is not valid"),
        (dict(class_word="xylophonists"), r"class word 'xylophonists' is 4 tokens for CLIP; choose a common single word"),
        (dict(resolution=96), "--resolution 96 must be a multiple of 64"),
        (dict(attn_reg_weight=-0.01), "attn_reg_weight must be 0 or more"),
        (dict(multi_subject_probability=1.5), r"multi_subject_probability must be between 0 and 1 .*, got 1.5"),
        (dict(prior_probability=-0.1), r"prior_probability must be between 0 and 1 .*, got -0.1"),
        (dict(multi_subject_probability=0.6, prior_probability=0.6), r"multi_subject_probability \+ prior_probability \+ class_prior_probability must be at most 1"),
        (dict(prior_probability=0.5, companions=()), "companions is empty; name at least one other animal"),
        (dict(multi_subject_probability=0.5, companions=("cat", "hot dog")), "companion 'hot dog' is not valid: use one plain word"),
        (dict(multi_subject_probability=0.5, companions=("xylophonists",)), r"companion 'xylophonists' is 4 tokens for CLIP; choose a common"),
        (dict(prior_probability=0.5, prior_images=0), "prior_images must be an integer from 1 to 64, got 0"),
    ],
)
def test_bad_training_settings_are_user_errors(pristine_base, photo, overrides, message):
    with pytest.raises(UserError, match=message):
        train_concept(pristine_base, [photo], quick_config(**overrides))
    assert len(pristine_base.tokenizer) == 49408  # refused before anything was added to the base


def test_mask_count_must_match_photos(pristine_base, photo):
    with pytest.raises(UserError, match="1 masks for 2 photos"):
        train_concept(pristine_base, [photo, photo], quick_config(), masks=[Image.new("L", (64, 64), 255)])


# ---------------------------------------------------------------------------------------------
# Training: initialisation, groups, loss, freeze, resume


def test_embeddings_start_from_class_word_and_one_random_draw(fresh_base, photo):
    """With all learning rates 0 the result holds the init: V_class = the class word's row in every
    layer; V_rand = one small random vector shared by all 16 layers, scaled by rand_init_std."""
    zero = dict(steps=1, lr_embedding=0.0, lr_text_lora=0.0, lr_unet_lora=0.0)
    base = fresh_base()
    dog_row = base.text_encoder.get_input_embeddings().weight[1929].detach().clone()
    result = train_concept(base, [photo], quick_config(**zero))
    embeddings = result.tensors["embeddings"]
    assert embeddings.shape == (2, 16, 32)
    for layer in range(16):
        assert torch.equal(embeddings[1, layer], dog_row)
        assert torch.equal(embeddings[0, layer], embeddings[0, 0])
    v_rand = embeddings[0, 0]
    assert 0.007 < v_rand.std().item() < 0.019  # N(0, 0.013^2), 32 samples
    assert 0.04 < v_rand.norm().item() < 0.11  # about 0.013 * sqrt(32) = 0.074
    assert result.embeddings_frozen_at is None

    doubled = train_concept(fresh_base(), [photo], quick_config(**zero, rand_init_std=0.026)).tensors["embeddings"]
    assert torch.allclose(doubled[0], 2 * embeddings[0], atol=1e-8)  # same draw, twice the scale
    other_seed = train_concept(fresh_base(), [photo], quick_config(**zero, seed=1)).tensors["embeddings"]
    assert not torch.allclose(other_seed[0, 0], v_rand)
    assert torch.equal(other_seed[1], embeddings[1])


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that remembers itself and each step's learning rates."""

    made: list["RecordingAdamW"] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_history: list[list[float]] = []
        RecordingAdamW.made.append(self)

    def step(self, closure=None):
        self.lr_history.append([group["lr"] for group in self.param_groups])
        return super().step(closure)


def test_optimizer_groups_learning_rates_and_linear_decay(base, photo, monkeypatch):
    """Three AdamW groups: embeddings 1e-3, text LoRA 1e-5, UNet LoRA 1e-4; wd 0.01; linear to 0."""
    RecordingAdamW.made = []
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    train_concept(base, [photo], quick_config(steps=4))
    (optimizer,) = RecordingAdamW.made
    groups = optimizer.param_groups
    assert len(groups) == 3
    assert [g["initial_lr"] for g in groups] == [1e-3, 1e-5, 1e-4]
    assert all(g["weight_decay"] == 0.01 and g["betas"] == (0.9, 0.999) for g in groups)
    expected = [[lr * (4 - k) / 4 for lr in (1e-3, 1e-5, 1e-4)] for k in range(4)]
    assert np.allclose(optimizer.lr_history, expected, rtol=1e-9, atol=0)
    assert [g["lr"] for g in groups] == [0.0, 0.0, 0.0]  # decayed to 0 at the last step

    assert len(groups[0]["params"]) == 1 and groups[0]["params"][0] is concept_vectors(base)
    text = lora_parameters(base.text_encoder, "mochi")
    unet = lora_parameters(base.unet, "mochi")
    assert len(text) == 16 and len(unet) == 256
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in text}
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in unet}
    trainable = {id(p) for p in text + unet + [concept_vectors(base)]}
    frozen = {id(p) for p in list(base.unet.parameters()) + list(base.text_encoder.parameters())} - trainable
    assert len(frozen) > 100
    assert not frozen & {id(p) for g in groups for p in g["params"]}


def test_training_changes_only_concept_weights(fresh_base, photo):
    """Base vocabulary rows and every frozen UNet/text-encoder weight are bit-identical after training."""
    reference = fresh_base()
    base = fresh_base()
    result = train_concept(base, [photo], quick_config(steps=2))

    def frozen_state(model):
        return {n.replace(".base_layer", ""): p for n, p in model.named_parameters()
                if "lora_" not in n and "concept_vectors" not in n}

    for trained_model, fresh_model in ((base.unet, reference.unet), (base.text_encoder, reference.text_encoder)):
        trained_state, fresh_state = frozen_state(trained_model), frozen_state(fresh_model)
        trained_state = {n.replace("token_embedding.base_table", "token_embedding"): p for n, p in trained_state.items()}
        assert trained_state.keys() == fresh_state.keys()
        for name, param in fresh_state.items():
            assert torch.equal(trained_state[name], param), name
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))


def test_result_record_and_progress_reports(base, photo):
    reports = []
    result = train_concept(base, [photo, procedural_photo(1)], quick_config(steps=3), callback=reports.append)
    assert [r.step for r in reports] == [1, 2, 3] and {r.total for r in reports} == {3}
    assert [r.loss for r in reports] == result.losses
    assert all(r.eta_seconds >= 0 and r.embedding_norm > 0 for r in reports)
    assert reports[-1].eta_seconds > 0  # the final preview is still to come
    record = result.concept
    assert (record.name, record.class_word, record.photo_count) == ("mochi", "dog", 2)
    assert record.fingerprint == base.fingerprint and record.is_test_model is True
    assert record.settings["steps"] == 3 and record.settings["resolution"] == 64
    assert record.settings["final_loss"] == result.losses[-1]
    assert result.preview.size == (64, 64) and result.preview.mode == "RGB"


def test_loss_mask_is_the_subject_mask(base, photo, monkeypatch):
    """With a subject mask, the loss weights exactly the subject's latent pixels."""
    seen = []
    real = train_module.region_masked_mse

    def spy(prediction, target, mask):
        seen.append(mask.clone())
        return real(prediction, target, mask)

    monkeypatch.setattr(train_module, "region_masked_mse", spy)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # the subject is the left half
    train_concept(base, [photo], quick_config(steps=1), masks=[mask])
    (loss_mask,) = seen
    assert loss_mask.shape == (1, 1, 8, 8)
    assert loss_mask[0, 0, :, :4].eq(1).all() and loss_mask[0, 0, :, 4:].eq(0).all()


@torch.no_grad()
def fixed_batch_loss(base, photo, name="mochi"):
    """The masked diffusion loss at fixed noise and timesteps (training samples them randomly)."""
    from diffusers import DDPMScheduler

    canvas, _, pasted = resize_crop_paste(photo, None, 64, 0.0, random.Random(0))
    pixels, mask = to_tensors(canvas, pasted, 8)
    count = 8
    latents = base.vae.encode(pixels[None]).latent_dist.mean * base.vae.config.scaling_factor
    latents = latents.repeat(count, 1, 1, 1)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(123))
    timesteps = torch.linspace(50, 950, count).long()
    noisy = DDPMScheduler.from_config(base.scheduler_config).add_noise(latents, noise, timesteps)
    context = encode_layerwise(base.tokenizer, base.text_encoder, [f"a photo of <{name}>"] * count)
    prediction = base.unet(noisy, timesteps, encoder_hidden_states=context).sample
    return masked_mse(prediction, noise, mask[None].expand(count, -1, -1, -1)).item()


def test_loss_falls_on_a_fixed_batch(fresh_base, photo):
    """40 steps on one photo lower the diffusion loss at fixed noise/timesteps by more than 10%."""
    untrained = fresh_base()
    train_concept(untrained, [photo], quick_config(steps=1, lr_embedding=0.0, lr_text_lora=0.0, lr_unet_lora=0.0))
    before = fixed_batch_loss(untrained, photo)
    base = fresh_base()
    train_concept(base, [photo], quick_config(steps=40, lr_unet_lora=2e-2, lr_text_lora=2e-3))
    after = fixed_batch_loss(base, photo)
    assert after < 0.9 * before, (before, after)


def test_norm_stop_freezes_embeddings_but_not_lora(fresh_base, photo):
    """The stop fires the first step the mean norm reaches the threshold; afterwards the embeddings
    stay exactly as they were at that step while the LoRA keeps changing."""
    settings = dict(steps=6, lr_embedding=2e-2)
    probe = []
    train_concept(fresh_base(), [photo], quick_config(**settings), callback=probe.append)
    norms = [p.embedding_norm for p in probe]
    assert norms[0] < norms[2] and not any(p.embeddings_frozen for p in probe)  # 0.55 is never reached here
    threshold = norms[2]  # reached first at step 3 in an identical run

    base = fresh_base()
    snapshots = {}

    def snapshot(progress):
        snapshots[progress.step] = (progress.embeddings_frozen, concept_vectors(base).detach().clone(),
                                    lora_parameters(base.unet, "mochi")[1].detach().clone())

    result = train_concept(base, [photo], quick_config(**settings, emb_norm_stop=threshold), callback=snapshot)
    assert result.embeddings_frozen_at == 3
    assert result.concept.settings["embeddings_frozen_at"] == 3
    assert [snapshots[s][0] for s in range(1, 7)] == [False, False, True, True, True, True]
    assert not torch.equal(snapshots[2][1], snapshots[3][1])  # step 3 itself still updated them
    for step in (4, 5, 6):
        assert torch.equal(snapshots[step][1], snapshots[3][1])
    assert torch.equal(result.tensors["embeddings"], snapshots[3][1])
    assert not torch.equal(snapshots[6][2], snapshots[3][2])  # a UNet lora_B kept training


def test_norm_stop_below_the_start_fires_at_step_1(base, photo):
    first = {}
    result = train_concept(base, [photo], quick_config(steps=3, emb_norm_stop=0.0),
                           callback=lambda p: first.setdefault("v", concept_vectors(base).detach().clone()))
    assert result.embeddings_frozen_at == 1
    assert torch.equal(result.tensors["embeddings"], first["v"])


def test_same_seed_same_result_other_seed_differs(fresh_base, photo):
    photos = [photo, procedural_photo(1)]
    config = quick_config(steps=3, crop_probability=0.5)
    a = train_concept(fresh_base(), photos, config)
    b = train_concept(fresh_base(), photos, config)
    c = train_concept(fresh_base(), photos, quick_config(steps=3, crop_probability=0.5, seed=1))
    assert a.losses == b.losses
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert np.array_equal(np.asarray(a.preview), np.asarray(b.preview))
    assert a.losses != c.losses
    assert not torch.equal(a.tensors["embeddings"], c.tensors["embeddings"])


def test_cancel_then_resume_equals_an_uninterrupted_run(fresh_base, photo, tmp_path):
    """Cancel at step 6 of 12 (checkpoint written), resume on a fresh base: bit-identical result."""
    photos = [photo, procedural_photo(1)]
    config = quick_config(steps=12, batch_size=2, crop_probability=0.5, checkpoint_every=4)
    uninterrupted = train_concept(fresh_base(), photos, config)

    cancel = threading.Event()
    checkpoints = tmp_path / "checkpoints"

    def stop_at_6(progress):
        if progress.step == 4:
            assert torch.load(checkpoints / CHECKPOINT_FILE, weights_only=False)["step"] == 4  # periodic one
        if progress.step == 6:
            cancel.set()

    with pytest.raises(Cancelled, match="cancelled at step 6 of 12"):
        train_concept(fresh_base(), photos, config, callback=stop_at_6, cancel=cancel, checkpoint_dir=checkpoints)
    payload = torch.load(checkpoints / CHECKPOINT_FILE, weights_only=False)
    assert payload["step"] == 6 and len(payload["losses"]) == 6

    steps_seen = []
    resumed = train_concept(fresh_base(), photos, config, callback=lambda p: steps_seen.append(p.step),
                            checkpoint_dir=checkpoints, resume=True)
    assert steps_seen == list(range(7, 13))
    assert resumed.losses == uninterrupted.losses
    assert resumed.tensors.keys() == uninterrupted.tensors.keys()
    for key in uninterrupted.tensors:
        assert torch.equal(resumed.tensors[key], uninterrupted.tensors[key]), key
    assert not (checkpoints / CHECKPOINT_FILE).exists()  # removed once training finished


def test_resume_with_other_settings_is_refused(fresh_base, photo, tmp_path):
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        train_concept(fresh_base(), [photo], quick_config(steps=4), callback=lambda p: cancel.set(), cancel=cancel,
                      checkpoint_dir=tmp_path)
    with pytest.raises(UserError, match="made with other settings; train without --resume"):
        train_concept(fresh_base(), [photo], quick_config(steps=4, lr_unet_lora=5e-4), checkpoint_dir=tmp_path, resume=True)


def test_composites_priors_and_regulariser_are_deterministic_and_resume_exactly(fresh_base, photo, tmp_path, monkeypatch):
    """With every new option on: the same seed gives the same run, and cancel-then-resume equals an
    uninterrupted run; the resumed run takes its companions from the checkpoint, not the sampler."""
    photos = [photo, procedural_photo(1)]
    masks = [Image.new("L", (64, 64), 0), Image.new("L", (64, 64), 0)]
    masks[0].paste(255, (8, 8, 40, 56))
    masks[1].paste(255, (20, 4, 60, 44))
    config = quick_config(steps=8, batch_size=2, crop_probability=0.5, checkpoint_every=4, multi_subject_probability=0.4,
                          prior_probability=0.3, companion_images=2, prior_images=3)
    monkeypatch.setattr(train_module, "COMPANION_SAMPLE_STEPS", 2)
    uninterrupted = train_concept(fresh_base(), photos, config, masks=masks)
    again = train_concept(fresh_base(), photos, config, masks=masks)
    assert again.losses == uninterrupted.losses
    assert all(torch.equal(again.tensors[k], uninterrupted.tensors[k]) for k in uninterrupted.tensors)

    cancel = threading.Event()
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(Cancelled, match="cancelled at step 5 of 8"):
        train_concept(fresh_base(), photos, config, masks=masks, cancel=cancel, checkpoint_dir=checkpoints,
                      callback=lambda p: p.step == 5 and cancel.set())
    payload = torch.load(checkpoints / CHECKPOINT_FILE, weights_only=False)
    assert [word for word, _ in payload["companions"]] == ["dog", "cat"]
    assert [caption for caption, _ in payload["prior_scenes"]] == prior_scene_prompts(("dog", "cat"), 3)

    prompts = []
    real_sample = train_module.sample_loaded
    monkeypatch.setattr(train_module, "sample_loaded", lambda base, c, *a, **k: prompts.append(c.prompt) or real_sample(base, c, *a, **k))
    resumed = train_concept(fresh_base(), photos, config, masks=masks, checkpoint_dir=checkpoints, resume=True)
    assert prompts == ["a photo of <mochi>"]  # only the final preview
    assert resumed.losses == uninterrupted.losses
    for key in uninterrupted.tensors:
        assert torch.equal(resumed.tensors[key], uninterrupted.tensors[key]), key


# ---------------------------------------------------------------------------------------------
# fp16: the loss is scaled


def test_fp16_gradients_underflow_without_loss_scaling_and_survive_with_it():
    """A gradient of ~1e-9 (an embedding's share after fp16 layers) is zero in fp16 unless the loss is
    scaled; `loss_scaler` keeps it and returns it unscaled to the fp32 parameter."""
    from pipelines.train import loss_scaler

    def embedding_gradient(scaler):
        embedding = torch.nn.Parameter(torch.ones(8))  # an fp32 trainable tensor, as the concept vectors are
        hidden = embedding.half() * torch.full((8,), 3e-5, dtype=torch.float16)  # frozen fp16 weights downstream
        loss = 0.5 * (hidden * torch.full((8,), 3e-5, dtype=torch.float16)).float().sum()  # 0.5: 2^16 x 1 would overflow fp16
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(torch.optim.SGD([embedding], lr=0.0))
        return embedding.grad

    exact = 0.5 * 3e-5 * 3e-5  # 4.5e-10, below fp16's smallest subnormal (6e-8)
    assert torch.all(embedding_gradient(None) == 0)
    scaled = embedding_gradient(loss_scaler(torch.float16, torch.device("cpu")))
    assert torch.allclose(scaled, torch.full((8,), exact), rtol=0.05)
    assert loss_scaler(torch.float16, torch.device("cpu")).is_enabled()
    assert not loss_scaler(torch.bfloat16, torch.device("cpu")).is_enabled()
    assert not loss_scaler(torch.float32, torch.device("cpu")).is_enabled()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_training_scales_the_loss_exactly_when_the_unet_is_fp16(tiny_dir, photo, dtype, monkeypatch):
    from pipelines.base import load_base

    scalers = []
    real = train_module.loss_scaler

    def recording(*args):
        scaler = real(*args)
        calls = []
        original = scaler.scale
        scaler.scale = lambda loss: calls.append(float(loss.detach())) or original(loss)
        scalers.append((scaler, calls))
        return scaler

    monkeypatch.setattr(train_module, "loss_scaler", recording)
    base = load_base(str(tiny_dir), device="cpu", dtype=dtype)
    result = train_concept(base, [photo], quick_config(steps=2))
    (scaler, calls), = scalers
    assert scaler.is_enabled() == (dtype == "fp16")
    assert calls == pytest.approx(result.losses)  # every step's loss went through the scaler
    assert all(np.isfinite(result.losses))
    assert torch.isfinite(result.tensors["embeddings"]).all()


def test_eta_counts_the_previews_to_come_and_the_final_one(base, photo, monkeypatch):
    """The ETA used to leave previews out: it sat at 0:00 while the final preview was drawn."""
    from pipelines.train import training_eta

    config = quick_config(steps=10, preview_every=4, preview_steps=6)
    # 2 s of steps over 4 steps = 0.5 s a step; previews measured at 3 s; after step 4: 6 steps,
    # previews at 8 and the final one to come
    assert training_eta(2.0, 4, 4, 10, [3.0], config) == pytest.approx(0.5 * 6 + 3.0 * 2)
    assert training_eta(2.0, 4, 10, 10, [3.0], config) == pytest.approx(3.0)  # only the final preview is left
    assert training_eta(2.0, 4, 4, 10, [], config) == pytest.approx(0.5 * 6 + 6 * 0.5 / 2 * 2)  # none measured yet
    assert training_eta(2.0, 4, 4, 10, [], replace(config, preview_every=0)) == pytest.approx(0.5 * 6 + 1.5)

    real_preview = train_module._preview

    def slow_preview(*args):
        time.sleep(0.2)
        return real_preview(*args)

    monkeypatch.setattr(train_module, "_preview", slow_preview)
    reports = []
    train_concept(base, [photo], quick_config(steps=2, preview_every=1), callback=reports.append)
    assert reports[-1].eta_seconds >= 0.2  # the final preview, measured at >= 0.2 s, is still to come
