"""Regionally controllable sampling (Mix-of-Show section 3.4).

Boxes are rasterised onto every UNet level (odd sizes included), mixed into the cross-attention
output, and run end to end through `python -m pipelines generate` on the tiny random model.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention
from PIL import Image

from pipelines.__main__ import main
from pipelines.base import build_tiny_model, load_base
from pipelines.concept import ConceptLibrary
from pipelines.errors import UserError
from pipelines.layout import BoundedSelfAttnProcessor
from pipelines.layerwise import NUM_LAYERS, LayerwiseAttnProcessor, cross_attention_layers, install_layerwise_attention
from pipelines.regional import (
    Region,
    RegionalAttnProcessor,
    box_mask,
    check_regions,
    install_regional_attention,
    load_regions,
    mix_region_outputs,
    parse_region,
    region_masks,
    unet_grids,
)
from pipelines.sample import read_png_metadata
from pipelines.train import TrainConfig, train_concept


# ---------------------------------------------------------------------------------------------
# Fixtures


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one OpenMP thread for tiny ops


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("regional-model") / "tiny")


@pytest.fixture(scope="module")
def library(model_dir, tmp_path_factory):
    """<mochi> and <tama> trained for a few steps (different photos and seeds); <kiki> is a copy of
    <mochi> under another name, a concept of the library that a fused model of the other two lacks."""
    lib = ConceptLibrary(tmp_path_factory.mktemp("regional-library"))
    for index, name in enumerate(["mochi", "tama"]):
        base = load_base(str(model_dir), device="cpu")
        photos = [Image.fromarray(np.random.RandomState(10 * index + k).randint(0, 256, (64, 64, 3), dtype=np.uint8)) for k in range(2)]
        result = train_concept(base, photos, TrainConfig(name=name, class_word="dog", steps=3, batch_size=1, seed=index,
                                                         preview_steps=1, checkpoint_every=0))
        lib.save(result.concept, result.tensors, result.preview)
        if name == "mochi":
            result.concept.name = "kiki"
            lib.save(result.concept, result.tensors, result.preview)
    return lib


def generate(model_dir, library, out, *extra) -> int:
    return main(["generate", "--base", str(model_dir), "--library", str(library.root), "--device", "cpu",
                 "--steps", "2", "--seed", "3", "--out", str(out), *extra])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


# ---------------------------------------------------------------------------------------------
# Rasterising boxes


def test_unet_grids():
    assert unet_grids(8, 8) == [(8, 8), (4, 4), (2, 2), (1, 1)]
    # 520x360 pixels: latent 65 wide, 45 high; each stride-2 conv rounds up
    assert unet_grids(45, 65) == [(45, 65), (23, 33), (12, 17), (6, 9)]
    assert unet_grids(5, 3, levels=3) == [(5, 3), (3, 2), (2, 1)]


@pytest.mark.parametrize("grid_w,grid_h", [(64, 32), (32, 16), (16, 8), (8, 4), (2, 2)])
def test_box_mask_halves_of_even_grids(grid_w, grid_h):
    left = box_mask((0, 0, 256, 256), 512, 256, grid_w, grid_h)
    assert left.shape == (grid_h, grid_w) and left.dtype == torch.bool
    assert left[:, : grid_w // 2].all() and not left[:, grid_w // 2 :].any()
    top = box_mask((0, 0, 512, 128), 512, 256, grid_w, grid_h)
    assert top[: grid_h // 2].all() and not top[grid_h // 2 :].any()
    assert box_mask((0, 0, 512, 256), 512, 256, grid_w, grid_h).all()


def test_box_mask_odd_grids_hand_checked():
    """520x360 image. A cell is in a box when its centre is in [x0, x1) x [y0, y1).

    Left half x < 260: centres (j + 0.5) * 520 / w, so j < w // 2 for odd w (the middle column's centre
    is exactly 260 and goes right): 32, 16, 8, 4 columns of 65, 33, 17, 9. Top band y < 100: centres
    (i + 0.5) * 360 / h < 100 gives 12 of 45 rows (centre 8i + 4), 6 of 23, 3 of 12 (30i + 15), 2 of 6.
    """
    grids = unet_grids(45, 65)
    for (h, w), left_cols, top_rows in zip(grids, (32, 16, 8, 4), (12, 6, 3, 2)):
        left = box_mask((0, 0, 260, 360), 520, 360, w, h)
        right = box_mask((260, 0, 520, 360), 520, 360, w, h)
        assert left.shape == (h, w)
        assert left[:, :left_cols].all() and not left[:, left_cols:].any(), (h, w)
        assert torch.equal(left ^ right, torch.ones(h, w, dtype=torch.bool))  # a partition: no gap, no overlap
        top = box_mask((0, 0, 520, 100), 520, 360, w, h)
        assert top[:top_rows].all() and not top[top_rows:].any(), (h, w)


def test_tiny_box_keeps_one_cell_at_every_level():
    # (100, 100)-(102, 102): at 65x45 the cell centred at (100, 100) is inside; coarser grids have no
    # centre inside and take the cell holding the box's centre (101, 101): column int(101 * w / 520).
    expected = [(12, 12), (6, 6), (3, 3), (1, 1)]
    for (h, w), cell in zip(unet_grids(45, 65), expected):
        mask = box_mask((100, 100, 102, 102), 520, 360, w, h)
        assert mask.sum() == 1 and mask[cell], (h, w)
    corner = box_mask((518, 358, 520, 360), 520, 360, 9, 6)  # bottom-right corner, coarsest grid
    assert corner.sum() == 1 and corner[5, 8]


def test_region_masks_are_keyed_by_token_count():
    regions = [Region((0, 0, 260, 360), "a"), Region((200, 100, 520, 300), "b")]
    masks = region_masks(regions, 520, 360, 45, 65)
    assert sorted(masks) == sorted([45 * 65, 23 * 33, 12 * 17, 6 * 9])
    for h, w in unet_grids(45, 65):
        stacked = masks[h * w]
        assert stacked.shape == (2, h * w) and stacked.dtype == torch.float32
        for r, region in enumerate(regions):
            assert torch.equal(stacked[r], box_mask(region.box, 520, 360, w, h).flatten().float())


def test_unet_levels_match_region_masks_at_odd_size(model_dir):
    """The real UNet's cross-attention token counts at a 65x45 latent are exactly the mask keys."""
    base = load_base(str(model_dir), device="cpu")
    regions = [Region((0, 0, 260, 360), "a"), Region((100, 100, 102, 102), "b")]
    masks = region_masks(regions, 520, 360, 45, 65)
    seen = []
    for _, module in cross_attention_layers(base.unet):
        module.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(args[0].shape[1]) if args else
                                         seen.append(kwargs["hidden_states"].shape[1]), with_kwargs=True)
    install_regional_attention(base.unet)
    g = torch.Generator().manual_seed(0)
    context = torch.randn(1, NUM_LAYERS * 77, 32, generator=g)
    region_context = torch.randn(2, 1, NUM_LAYERS * 77, 32, generator=g)
    with torch.no_grad():
        out = base.unet(torch.randn(1, 4, 45, 65, generator=g), 10, encoder_hidden_states=context,
                        cross_attention_kwargs={"region_context": region_context, "region_masks": masks}).sample
    assert out.shape == (1, 4, 45, 65) and torch.isfinite(out).all()
    assert len(seen) == NUM_LAYERS and set(seen) == set(masks)


# ---------------------------------------------------------------------------------------------
# Mixing


def test_mix_region_outputs():
    g = torch.Generator().manual_seed(0)
    global_out = torch.randn(2, 6, 3, generator=g)
    region_out = torch.randn(2, 2, 6, 3, generator=g)
    masks = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.float32)
    mixed = mix_region_outputs(global_out, region_out, masks)
    assert mixed.shape == global_out.shape
    for n in (3, 5):  # outside every box
        assert torch.equal(mixed[:, n], global_out[:, n])
    for n in (0, 4):  # only region 0
        assert torch.allclose(mixed[:, n], region_out[0, :, n])
    assert torch.allclose(mixed[:, 2], region_out[1, :, 2])  # only region 1
    assert torch.allclose(mixed[:, 1], (region_out[0, :, 1] + region_out[1, :, 1]) / 2)  # overlap: the mean


# ---------------------------------------------------------------------------------------------
# The attention processor on real diffusers attention layers


def call(attn, processor, hidden, context, **kwargs):
    attn.set_processor(processor)
    with torch.no_grad():
        return attn(hidden, encoder_hidden_states=context, **kwargs)


def layerwise_context(*shape, seed):
    """Layer-wise encodings whose 16 copies all differ, so using the wrong layer shows."""
    return torch.randn(*shape, NUM_LAYERS * 77, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def unet_attention(model_dir):
    base = load_base(str(model_dir), device="cpu")
    layer = 7  # mid block: 64 channels
    return layer, cross_attention_layers(base.unet)[layer][1]


def test_full_canvas_region_with_global_prompt_is_exactly_plain(attention):
    layer, attn = attention
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 12, attn.to_q.in_features, generator=g)  # a 3x4 grid, CFG batch of 2
    context = layerwise_context(2, seed=2)
    masks = region_masks([Region((0, 0, 32, 24), "p")], 32, 24, 3, 4)
    plain = call(attn, LayerwiseAttnProcessor(layer), hidden, context)
    regional = call(attn, RegionalAttnProcessor(layer), hidden, context, region_context=context[None], region_masks=masks)
    assert torch.equal(regional, plain)
    # without regions it is the plain processor too
    assert torch.equal(call(attn, RegionalAttnProcessor(layer), hidden, context), plain)
    # and the layer matters: another copy of the layer-wise prompt gives another output
    assert not torch.allclose(call(attn, LayerwiseAttnProcessor(layer + 1), hidden, context), plain)


@pytest.fixture(params=["fresh", "unet"])
def attention(request, unet_attention):
    if request.param == "unet":
        return unet_attention
    torch.manual_seed(0)
    return 4, Attention(query_dim=24, cross_attention_dim=32, heads=3, dim_head=8).eval()


def test_regions_inside_outside_and_overlap(attention):
    layer, attn = attention
    # 64x48 pixels on an 8x6 grid (8 px cells). A covers columns 0-4, rows 0-3; B columns 3-7, rows 2-5.
    regions = [Region((0, 0, 40, 32), "a"), Region((24, 16, 64, 48), "b")]
    masks = region_masks(regions, 64, 48, 6, 8)
    a, b = masks[48].bool()
    assert a.sum() == 20 and b.sum() == 20 and (a & b).sum() == 4
    hidden = torch.randn(1, 48, attn.to_q.in_features, generator=torch.Generator().manual_seed(3))
    context = layerwise_context(1, seed=4)
    region_context = layerwise_context(2, 1, seed=5)
    out = call(attn, RegionalAttnProcessor(layer), hidden, context, region_context=region_context, region_masks=masks)
    plain = LayerwiseAttnProcessor(layer)
    global_only = call(attn, plain, hidden, context)
    only_a = call(attn, plain, hidden, region_context[0])
    only_b = call(attn, plain, hidden, region_context[1])
    outside, just_a, just_b, both = ~a & ~b, a & ~b, b & ~a, a & b
    assert outside.sum() == 12
    assert torch.allclose(out[:, outside], global_only[:, outside], atol=1e-6)
    assert torch.allclose(out[:, just_a], only_a[:, just_a], atol=1e-5)
    assert torch.allclose(out[:, just_b], only_b[:, just_b], atol=1e-5)
    # the mix happens before to_out, an affine map, which keeps means
    assert torch.allclose(out[:, both], (only_a[:, both] + only_b[:, both]) / 2, atol=1e-5)
    # the three references really differ, so the checks above tell the cases apart
    for x, y in ((global_only, only_a), (only_a, only_b), (global_only, only_b)):
        assert not torch.allclose(x, y, atol=1e-3)


def test_cfg_halves_use_their_own_region_prompts(attention):
    layer, attn = attention
    regions = [Region((0, 0, 32, 48), "left")]  # the left half of an 8x6 grid
    masks = region_masks(regions, 64, 48, 6, 8)
    inside = masks[48][0].bool()
    x = torch.randn(1, 48, attn.to_q.in_features, generator=torch.Generator().manual_seed(6))
    hidden = x.repeat(2, 1, 1)  # CFG: the same latents in both halves
    context = layerwise_context(2, seed=7)  # [global negative, global prompt]
    region_context = layerwise_context(1, 2, seed=8)  # region [negative, prompt], different
    out = call(attn, RegionalAttnProcessor(layer), hidden, context, region_context=region_context, region_masks=masks)
    plain = LayerwiseAttnProcessor(layer)
    for half in (0, 1):
        own_region = call(attn, plain, x, region_context[0, half : half + 1])[0]
        other_region = call(attn, plain, x, region_context[0, 1 - half : 2 - half])[0]
        own_global = call(attn, plain, x, context[half : half + 1])[0]
        assert torch.allclose(out[half, inside], own_region[inside], atol=1e-5), half
        assert not torch.allclose(out[half, inside], other_region[inside], atol=1e-3), half
        assert torch.allclose(out[half, ~inside], own_global[~inside], atol=1e-6), half


def test_install_regional_attention(model_dir):
    base = load_base(str(model_dir), device="cpu")
    install_regional_attention(base.unet)
    cross = cross_attention_layers(base.unet)
    assert [m.processor.layer for _, m in cross] == list(range(NUM_LAYERS))
    assert all(isinstance(m.processor, RegionalAttnProcessor) for _, m in cross)
    self_attn = [m for n, m in base.unet.named_modules() if n.endswith("attn1")]
    assert len(self_attn) == NUM_LAYERS and all(isinstance(m.processor, BoundedSelfAttnProcessor) for m in self_attn)
    install_layerwise_attention(base.unet)
    assert all(isinstance(m.processor, LayerwiseAttnProcessor) for _, m in cross)


# ---------------------------------------------------------------------------------------------
# Parsing and checking


def test_parse_region():
    assert parse_region("0,0,32,64|a red cat") == Region((0, 0, 32, 64), "a red cat", "")
    assert parse_region("8, 16, 40.4, 63.6| a dog |blurry ") == Region((8, 16, 40, 64), "a dog", "blurry")
    for bad in ("0,0,32,64", "0,0,32|a cat", "0,0,32,64,1|a cat", "a,b,c,d|cat", "0,0,32,64|a|b|c", "inf,0,1,1|cat", "nan,0,1,1|cat"):
        with pytest.raises(UserError, match="--region"):
            parse_region(bad)


def test_load_regions(tmp_path):
    path = tmp_path / "regions.json"
    path.write_text(json.dumps([{"box": [0, 0, 32, 64], "prompt": "a <mochi>", "negative_prompt": "blurry"},
                                {"box": [32.2, 0, 64, 64], "prompt": "a cat"}]))
    assert load_regions(path) == [Region((0, 0, 32, 64), "a <mochi>", "blurry"), Region((32, 0, 64, 64), "a cat", "")]
    cases = {
        "missing.json": None,
        "not-json.json": "{box",
        "not-a-list.json": json.dumps({"box": [0, 0, 1, 1], "prompt": "x"}),
        "no-prompt.json": json.dumps([{"box": [0, 0, 1, 1]}]),
        "short-box.json": json.dumps([{"box": [0, 0, 1], "prompt": "x"}]),
        "text-box.json": json.dumps([{"box": ["left", 0, 1, 1], "prompt": "x"}]),
        "null-box.json": json.dumps([{"box": [None, 0, 1, 1], "prompt": "x"}]),
    }
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match="--regions"):
            load_regions(tmp_path / name)


def test_check_regions():
    check_regions([Region((0, 0, 64, 64), "x"), Region((10, 20, 30, 40), "y")], 64, 64)
    for box, message in (((0, 0, 65, 64), "off the 64x64 canvas"), ((-1, 0, 8, 8), "off the"), ((8, 8, 8, 16), "zero area"),
                         ((8, 16, 16, 8), "zero area")):
        with pytest.raises(UserError, match=message):
            check_regions([Region((0, 0, 8, 8), "ok"), Region(box, "x")], 64, 64)
    with pytest.raises(UserError, match="empty prompt"):
        check_regions([Region((0, 0, 8, 8), "  ")], 64, 64)


@pytest.mark.parametrize("args,message", [
    (["--region", "0,0,72,64|a dog"], "region 0 box (0, 0, 72, 64) is off the 64x64 canvas"),
    (["--region", "10,10,10,40|a dog"], "zero area"),
    (["--region", "0,0,32,32|a photo of <ghost>"], "unknown concept 'ghost'"),
    (["--width", "100"], "--width 100 must be a positive multiple of 8"),
    (["--height", "60"], "--height 60 must be a positive multiple of 8"),
    (["--region", "0,0,32|a dog"], "--region"),
], ids=["off-canvas", "zero-area", "unknown-concept", "width", "height", "bad-syntax"])
def test_cli_bad_input_exits_2_with_one_line(model_dir, library, tmp_path, capsys, args, message):
    out = tmp_path / "x.png"
    assert generate(model_dir, library, out, "--prompt", "a photo of a dog", *args) == 2
    assert message in one_line_error(capsys)
    assert not out.exists()


def test_cli_bad_regions_file_exits_2(model_dir, library, tmp_path, capsys):
    path = tmp_path / "regions.json"
    path.write_text(json.dumps([{"box": ["a", 0, 8, 8], "prompt": "x"}]))
    assert generate(model_dir, library, tmp_path / "x.png", "--prompt", "a dog", "--regions", str(path)) == 2
    assert "--regions" in one_line_error(capsys)


# ---------------------------------------------------------------------------------------------
# End to end


def test_generate_with_regions(model_dir, library, tmp_path):
    common = ["--prompt", "a photo of a dog", "--negative-prompt", "blurry"]
    assert generate(model_dir, library, tmp_path / "plain.png", *common) == 0
    assert generate(model_dir, library, tmp_path / "full.png", *common, "--region", "0,0,64,64|a photo of a dog|blurry") == 0
    regions_file = tmp_path / "regions.json"
    regions_file.write_text(json.dumps([{"box": [0, 0, 40, 64], "prompt": "a red cat", "negative_prompt": "green"},
                                        {"box": [24, 0, 64, 64], "prompt": "a blue car"}]))
    assert generate(model_dir, library, tmp_path / "two.png", *common, "--regions", str(regions_file)) == 0

    plain, full, two = (pixels(tmp_path / f"{n}.png") for n in ("plain", "full", "two"))
    assert np.array_equal(full, plain)  # a full-canvas region with the global prompts changes no pixel
    assert not np.array_equal(two, plain)

    meta = read_png_metadata(tmp_path / "plain.png")
    assert meta["method"] == "plain" and meta["regions"] == []
    meta = read_png_metadata(tmp_path / "full.png")
    assert meta["method"] == "regional"
    assert meta["regions"] == [{"box": [0, 0, 64, 64], "prompt": "a photo of a dog", "negative_prompt": "blurry"}]
    meta = read_png_metadata(tmp_path / "two.png")
    assert meta["method"] == "regional" and meta["seed"] == 3 and meta["prompt"] == "a photo of a dog"
    assert meta["regions"] == [{"box": [0, 0, 40, 64], "prompt": "a red cat", "negative_prompt": "green"},
                               {"box": [24, 0, 64, 64], "prompt": "a blue car", "negative_prompt": ""}]


def test_generate_with_two_concepts_fuses_on_the_fly(model_dir, library, tmp_path, capsys):
    regions = ["--region", "0,0,32,64|a photo of <mochi>", "--region", "32,0,64,64|a photo of <tama>"]
    assert generate(model_dir, library, tmp_path / "pets.png", "--prompt", "two dogs on a beach", *regions) == 0
    fused = [p for p in (library.root / ".fused").iterdir() if not p.name.startswith(".")]
    assert len(fused) == 1 and (fused[0] / "fused.safetensors").is_file()
    meta = read_png_metadata(tmp_path / "pets.png")
    assert meta["fused"] == str(fused[0]) and meta["fusion_method"] == "gradient"
    assert meta["concepts"] == ["mochi", "tama"] and meta["method"] == "regional"
    assert json.loads((fused[0] / "fused.json").read_text())["concepts"] == ["mochi", "tama"]

    # --fused reuses that model
    assert generate(model_dir, library, tmp_path / "again.png", "--prompt", "two dogs on a beach", *regions,
                    "--fused", str(fused[0])) == 0
    assert read_png_metadata(tmp_path / "again.png")["fused"] == str(fused[0])
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "pets.png"))

    # a concept of the library that the fused model lacks
    capsys.readouterr()
    code = generate(model_dir, library, tmp_path / "no.png", "--prompt", "two dogs", "--fused", str(fused[0]),
                    "--region", "0,0,32,64|a photo of <kiki>")
    assert code == 2
    assert "does not hold <kiki>" in one_line_error(capsys)
    assert not (tmp_path / "no.png").exists()


def test_precomputed_region_kv_gives_the_same_output(model_dir):
    """Projecting the contexts once per image (sampling's fast path) changes no number of any layer."""
    from pipelines.regional import precompute_region_kv

    base = load_base(str(model_dir), device="cpu")
    layers = cross_attention_layers(base.unet)
    context = layerwise_context(2, seed=11)
    region_context = layerwise_context(2, 2, seed=12)
    masks = region_masks([Region((0, 0, 40, 64), "a"), Region((24, 0, 64, 64), "b")], 64, 64, 8, 8)
    kv = precompute_region_kv(base.unet, context, region_context)
    assert sorted(kv) == list(range(NUM_LAYERS))
    for layer in (0, 6, 15):  # a down, the mid and the last up layer
        attn = layers[layer][1]
        tokens = {0: 64, 6: 1, 15: 64}[layer]
        hidden = torch.randn(2, tokens, attn.to_q.in_features, generator=torch.Generator().manual_seed(layer))
        slow = call(attn, RegionalAttnProcessor(layer), hidden, context, region_context=region_context, region_masks=masks)
        fast = call(attn, RegionalAttnProcessor(layer), hidden, context, region_context=region_context, region_masks=masks, region_kv=kv)
        assert torch.equal(fast, slow), layer
