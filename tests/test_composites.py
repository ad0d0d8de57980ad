"""pipelines.composites: group layouts, composites, captions and backgrounds for joint groups."""

from __future__ import annotations

import random
from itertools import combinations

import numpy as np
import pytest
from PIL import Image

import pipelines.composites as composites
from pipelines.composites import (
    GROUP_TEMPLATES,
    PLAIN_BACKGROUND_PROMPT,
    check_members,
    composite_grid,
    draw_backgrounds,
    group_caption,
    group_layout,
    load_backgrounds,
    make_group_composite,
    make_group_example,
    min_box_side,
    plain_backgrounds,
    preview_composites,
)
from pipelines.errors import UserError

RED, GREEN, YELLOW, BLUE = (255, 0, 0), (0, 255, 0), (255, 255, 0), (0, 0, 255)


def disc_mask(size: tuple[int, int], radius_share: float = 0.35) -> Image.Image:
    """A white disc in the middle of a black photo-sized mask."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    inside = (x - w / 2) ** 2 + (y - h / 2) ** 2 < (radius_share * min(w, h)) ** 2
    return Image.fromarray((inside * 255).astype(np.uint8))


def solid_member(colour, size=(40, 30), masked=True):
    """One photo of one flat colour; with a disc mask or none (then the whole tile is the subject)."""
    photo = Image.new("RGB", size, colour)
    return [photo], [disc_mask(size)] if masked else None


def eroded(mask: np.ndarray, r: int) -> np.ndarray:
    """Pixels of `mask` whose (2r+1)^2 neighbourhood lies wholly in it (off the canvas counts as outside)."""
    padded = np.pad(mask, r)
    h, w = mask.shape
    return np.all([padded[r + dy:r + dy + h, r + dx:r + dx + w] for dy in range(-r, r + 1) for dx in range(-r, r + 1)], axis=0)


def overlap(a, b) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


# ---------------------------------------------------------------------------------------------
# Layout


def test_min_box_side_is_gen4gens_minimum_area():
    assert min_box_side(2, 500) == min_box_side(3, 500) == 100  # (H/5)(W/5)
    assert min_box_side(4, 600) == 100  # (H/6)(W/6)
    assert min_box_side(5, 800) == min_box_side(8, 800) == 100  # (H/8)(W/8)
    assert min_box_side(3, 512) == 103  # rounded up, so the area is never below the minimum


@pytest.mark.parametrize("count", [2, 3, 4, 5])
@pytest.mark.parametrize("size", [64, 512])
def test_layout_boxes_stay_inside_never_overlap_and_meet_the_minimum_area(count, size):
    divisor = {2: 5, 3: 5, 4: 6, 5: 8}[count]
    firsts = set()
    for seed in range(200):
        boxes = group_layout(count, size, random.Random(seed))
        assert len(boxes) == count
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            assert (x1 - x0) * (y1 - y0) >= (size / divisor) ** 2
        assert all(overlap(a, b) == 0 for a, b in combinations(boxes, 2))
        firsts.add(min(range(count), key=lambda i: boxes[i][0]))
    assert firsts == set(range(count))  # random order: every subject is leftmost sometimes


def test_layout_is_deterministic_from_the_rng_and_scales_at_random():
    assert group_layout(3, 512, random.Random(7)) == group_layout(3, 512, random.Random(7))
    sides = {b[2] - b[0] for seed in range(50) for b in group_layout(2, 512, random.Random(seed))}
    assert min(sides) >= round(0.75 * 256) and max(sides) <= 256 and len(sides) > 10  # U(0.75, 1) x the half


@pytest.mark.parametrize("count", [0, 9])
def test_layout_refuses_groups_that_do_not_fit(count):
    with pytest.raises(UserError, match=f"{count} pets do not fit side by side on a 512x512 canvas.*1 to 8 members"):
        group_layout(count, 512, random.Random(0))


# ---------------------------------------------------------------------------------------------
# Composites


def test_composite_masks_are_disjoint_and_hold_each_subjects_pixels():
    members = [solid_member(RED), solid_member(GREEN, (30, 50)), solid_member(YELLOW, masked=False)]
    for seed in range(20):
        cutouts = [(photos[0], masks[0] if masks else None) for photos, masks in members]
        canvas, masks, boxes = make_group_composite(cutouts, Image.new("RGB", (80, 60), BLUE), 64, random.Random(seed),
                                                    feather=0)
        pixels = np.asarray(canvas)
        stack = np.stack([np.asarray(m) > 127 for m in masks])  # [3, 64, 64]
        assert canvas.size == (64, 64) and all(m.size == (64, 64) and m.mode == "L" for m in masks)
        assert stack.sum(0).max() == 1  # disjoint
        for colour, subject, box in zip((RED, GREEN, YELLOW), stack, boxes):
            assert subject.any() and (pixels[subject] == colour).all()
            ys, xs = np.nonzero(subject)
            assert box[0] <= xs.min() and xs.max() < box[2] and box[1] <= ys.min() and ys.max() < box[3]
        assert (pixels[~stack.any(0)] == BLUE).all()  # everything else is the background
        x0, y0, x1, y1 = boxes[2]  # the unmasked photo is pasted as a whole tile
        assert stack[2].sum() == (x1 - x0) * (y1 - y0) and abs((x1 - x0) / (y1 - y0) - 40 / 30) < 0.15


def test_feather_softens_only_the_inside_of_the_paste_edge():
    cutouts = [(Image.new("RGB", (48, 48), RED), disc_mask((48, 48), 0.45)), (Image.new("RGB", (48, 48), GREEN), None)]
    canvas, masks, _ = make_group_composite(cutouts, Image.new("RGB", (64, 64), BLUE), 64, random.Random(3), feather=1.0)
    pixels = np.asarray(canvas)
    inside = np.stack([np.asarray(m) > 127 for m in masks])
    assert (pixels[~inside.any(0)] == BLUE).all()
    for colour, subject in zip((RED, GREEN), inside):
        core = eroded(subject, 3)
        assert core.any() and (pixels[core] == colour).all()
        assert (pixels[subject & ~core] != colour).any(axis=-1).any()  # the rim blends with the background


def test_composite_covers_and_crops_the_background_to_the_canvas():
    background = Image.fromarray(np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (100, 1, 3)))  # 200x100 ramp
    canvas, _, _ = make_group_composite([(Image.new("RGB", (4, 4), RED), None)], background, 50, random.Random(0))
    row = np.asarray(canvas)[0, :, 0].astype(int)
    assert canvas.size == (50, 50) and (np.diff(row[row != 255]) >= 0).all()  # a piece of the ramp at half scale


def test_empty_mask_is_refused():
    photo = Image.new("RGB", (20, 20), RED)
    with pytest.raises(UserError, match=r"subject mask is empty \(all black\); the subject must be white"):
        make_group_composite([(photo, Image.new("L", (20, 20)))], Image.new("RGB", (32, 32)), 32, random.Random(0))
    with pytest.raises(UserError, match=r"mochi's mask 2 is empty \(all black\)"):
        check_members([([photo, photo], [disc_mask((20, 20)), Image.new("L", (20, 20))])], names=["mochi"])


def test_check_members_names_the_bad_member():
    photo = Image.new("RGB", (20, 20), RED)
    with pytest.raises(UserError, match="rex has no photos; add 1 or more photos of it"):
        check_members([([photo], None), ([], None)], names=["mochi", "rex"])
    with pytest.raises(UserError, match="member 1 has 2 masks for 1 photos"):
        check_members([([photo], [disc_mask((20, 20))] * 2)])
    with pytest.raises(UserError, match="member 1's mask 1 is 10x10, its photo 20x20"):
        check_members([([photo], [Image.new("L", (10, 10), 255)])])
    check_members([([photo], [disc_mask((20, 20))]), ([photo], None)])  # fine


# ---------------------------------------------------------------------------------------------
# Captions


def test_caption_names_every_subject_in_order_and_states_the_background():
    prompt = group_caption(["<a>", "<b>", "<c>"], ["dog", "cat", "dog"], "on the grass", random.Random(0))
    assert prompt in {t.format("a <a> dog, a <b> cat and a <c> dog on the grass") for t in GROUP_TEMPLATES}
    prompt = group_caption(["<a>", "<b>"], None, " in the garden ", random.Random(0))
    assert prompt in {t.format("a <a> and a <b> in the garden") for t in GROUP_TEMPLATES}
    seen = {group_caption(["<a>"], ["dog"], "on the grass", random.Random(s)) for s in range(40)}
    assert seen == {t.format("a <a> dog on the grass") for t in GROUP_TEMPLATES}


def test_caption_repeats_the_concept_tokens_when_asked():
    prompt = group_caption(["<a>", "<b>"], ["dog", "dog"], "on the grass", random.Random(1), repeat_tokens=True)
    assert prompt.endswith("a <a> dog and a <b> dog on the grass, <a> dog, <b> dog")


def test_caption_refuses_bad_input():
    with pytest.raises(UserError, match="background prompt is empty; Gen4Gen always states the background"):
        group_caption(["<a>"], None, "  ", random.Random(0))
    with pytest.raises(UserError, match="1 class words for 2 tokens"):
        group_caption(["<a>", "<b>"], ["dog"], "on the grass", random.Random(0))


# ---------------------------------------------------------------------------------------------
# Examples and previews


def test_group_example_caption_follows_the_masks_left_to_right_and_is_deterministic():
    members = [solid_member(RED), solid_member(GREEN), solid_member(YELLOW, masked=False)]
    names = ["rex", "mochi", "kiwi"]
    orders = set()
    for seed in range(12):
        canvas, masks, prompt = make_group_example(members, None, names, ["dog", "cat", "dog"], "on the grass", 64,
                                                   random.Random(seed))
        lefts = [np.nonzero(np.asarray(m).any(0))[0].min() for m in masks]
        order = sorted(range(3), key=lambda i: lefts[i])
        words = ["dog", "cat", "dog"]
        expected = ", ".join(f"a <{names[i]}> {words[i]}" for i in order[:2]) + f" and a <{names[order[2]]}> {words[order[2]]}"
        assert prompt.endswith(f"{expected} on the grass")
        assert (np.asarray(canvas)[np.asarray(masks[0]) > 127] != 0).any()  # rex is on the (black) canvas
        orders.add(tuple(order))
        again = make_group_example(members, None, names, ["dog", "cat", "dog"], "on the grass", 64, random.Random(seed))
        assert again[0].tobytes() == canvas.tobytes() and again[2] == prompt
        assert [m.tobytes() for m in again[1]] == [m.tobytes() for m in masks]
    assert len(orders) > 2


def test_group_example_uses_the_backgrounds_and_the_plain_prompt_by_default():
    members = [solid_member(RED), solid_member(GREEN)]
    canvas, masks, prompt = make_group_example(members, [Image.new("RGB", (64, 64), BLUE)], ["a", "b"], None, "", 32,
                                               random.Random(0))
    outside = ~np.stack([np.asarray(m) > 127 for m in masks]).any(0)
    assert (np.asarray(canvas)[outside] == BLUE).all() and prompt.endswith(PLAIN_BACKGROUND_PROMPT)
    with pytest.raises(UserError, match="b has no photos"):
        make_group_example([members[0], ([], None)], None, ["a", "b"], None, "", 32, random.Random(0))


def test_previews_are_deterministic_and_the_grid_has_the_right_size():
    members = [solid_member(RED), solid_member(GREEN, masked=False)]
    backgrounds = plain_backgrounds(3, 16, random.Random(0), flat_colours=True)
    previews = preview_composites(members, backgrounds, 48, 5, seed=4)
    assert len(previews) == 5 and all(p.size == (48, 48) for p in previews)
    assert [p.tobytes() for p in previews] == [p.tobytes() for p in preview_composites(members, backgrounds, 48, 5, seed=4)]
    assert [p.tobytes() for p in previews] != [p.tobytes() for p in preview_composites(members, backgrounds, 48, 5, seed=5)]
    grid = composite_grid(previews, 3)
    assert grid.size == (3 * 48, 2 * 48)
    assert grid.crop((48, 48, 96, 96)).tobytes() == previews[4].tobytes()
    assert composite_grid(previews, 8).size == (5 * 48, 48)
    with pytest.raises(UserError, match="no images to put in a grid"):
        composite_grid([], 2)
    with pytest.raises(UserError, match="member 2 has no photos"):
        preview_composites([members[0], ([], None)], None, 48, 1, seed=0)


# ---------------------------------------------------------------------------------------------
# Backgrounds


def test_plain_backgrounds_are_black_or_flat_colours():
    black = plain_backgrounds(2, 24, random.Random(0))
    assert len(black) == 2 and all(b.size == (24, 24) and not np.asarray(b).any() for b in black)
    flat = plain_backgrounds(4, 24, random.Random(0), flat_colours=True)
    assert all(len(np.unique(np.asarray(b).reshape(-1, 3), axis=0)) == 1 for b in flat)
    assert len({b.getpixel((0, 0)) for b in flat}) > 1


def test_load_backgrounds_blurs_lightly_and_refuses_corrupt_files(tmp_path):
    checker = Image.fromarray(((np.indices((32, 32)).sum(0) % 2) * 255).astype(np.uint8)).convert("RGB")
    checker.save(tmp_path / "scene.png")
    from_path, from_image = load_backgrounds([tmp_path / "scene.png", checker])
    assert from_path.size == (32, 32) and from_path.tobytes() == from_image.tobytes()
    values = np.asarray(from_path)[8:24, 8:24]
    assert 100 < values.min() and values.max() < 160  # the 0/255 checkerboard is blurred towards grey
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"cannot read background '.*broken\.jpg'.*replace it with a JPEG or PNG"):
        load_backgrounds([tmp_path / "scene.png", tmp_path / "broken.jpg"])
    with pytest.raises(UserError, match="no background photos given"):
        load_backgrounds([])


def test_draw_backgrounds_returns_count_images_of_the_resolution(fresh_base, monkeypatch):
    monkeypatch.setattr(composites, "BACKGROUND_SAMPLE_STEPS", 2)
    monkeypatch.setattr(composites, "BACKGROUND_BATCH", 2)  # 3 images: a batch of 2, then 1
    images = draw_backgrounds(fresh_base(), "on the grass", 3, 32, seed=0)
    assert len(images) == 3 and all(image.size == (32, 32) and image.mode == "RGB" for image in images)
    assert images[0].tobytes() != images[1].tobytes()
    with pytest.raises(UserError, match="background prompt is empty"):
        draw_backgrounds(None, " ", 1, 32, seed=0)
