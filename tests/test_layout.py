"""pipelines.layout (one subject per box) and the bounded cross-attention of pipelines.layerwise.

Everything here is a pure function or an attention processor on tiny inputs, checked against
values worked out by hand or against a brute-force computation written out in the test.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from pipelines.errors import UserError
from pipelines.layerwise import NUM_LAYERS, LayerwiseAttnProcessor, concept_tokens
from pipelines.layout import (
    DEFAULT_LAYOUT,
    NO_LAYOUT,
    BoundedSelfAttnProcessor,
    LayoutControl,
    bootstrap_latent,
    bounded_cross_attention_bias,
    bounded_loss,
    bounded_self_attention_bias,
    box_iou,
    box_pixels,
    box_term,
    boxes_spanned,
    centre_inside,
    centring_shift,
    check_layout_control,
    cross_attention_biases,
    label_word_positions,
    match_detections_to_boxes,
    mix_box_predictions,
    parse_box,
    self_attention_biases,
    split_mask_by_boxes,
    subject_token_masks,
    subject_word_positions,
)
from pipelines.regional import unet_grids

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one OpenMP thread for tiny ops


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """CLIP's real vocab.json and merges.txt, written offline exactly as `build_tiny_model` writes them
    (building the whole tiny model would cost ~9 s for a tokenizer)."""
    from pipelines.base import write_clip_tokenizer_files

    folder = tmp_path_factory.mktemp("clip-tokenizer")
    write_clip_tokenizer_files(folder)
    return folder


def make_tokenizer(folder):
    from transformers import CLIPTokenizer

    # the same construction as pipelines.base.build_tiny_model
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77)


@pytest.fixture(scope="module")
def tokenizer(clip_files):
    """A shared, never-mutated CLIP tokenizer."""
    return make_tokenizer(clip_files)


def tokens_at(tokenizer, prompt: str, positions: list[int]) -> list[str]:
    ids = tokenizer(prompt, truncation=True).input_ids
    return [tokenizer.convert_ids_to_tokens(ids)[p] for p in positions]


def masks_of(*subjects: set[int], tokens: int) -> torch.Tensor:
    """`[S, tokens]` bool subject masks from sets of token indices."""
    out = torch.zeros(len(subjects), tokens, dtype=torch.bool)
    for i, members in enumerate(subjects):
        out[i, sorted(members)] = True
    return out


def blocked_pairs(bias: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(q), int(k)) for q, k in torch.nonzero(torch.isinf(bias))}


def brute_attention(attn: Attention, hidden: torch.Tensor, context: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax attention written out: weights exp(q.k / sqrt(d)) on allowed keys only, renormalised.

    hidden [B, N, C], context [B, S, Cc], allowed broadcastable to [B, N, S] (bool).
    """
    batch, tokens, channels = hidden.shape
    heads = attn.heads
    d = channels // heads
    q = attn.to_q(hidden).view(batch, tokens, heads, d)
    k = attn.to_k(context).view(batch, context.shape[1], heads, d)
    v = attn.to_v(context).view(batch, context.shape[1], heads, d)
    logits = torch.einsum("bnhd,bshd->bhns", q, k) / math.sqrt(d)
    weights = torch.exp(logits - logits.amax(-1, keepdim=True)) * allowed.expand(batch, tokens, -1)[:, None].float()
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.einsum("bhns,bshd->bnhd", weights, v).reshape(batch, tokens, channels)
    return attn.to_out[0](out)


@pytest.fixture
def self_attn():
    torch.manual_seed(0)
    return Attention(query_dim=8, heads=2, dim_head=4).eval()


@pytest.fixture
def cross_attn():
    torch.manual_seed(1)
    return Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4).eval()


# ---------------------------------------------------------------------------------------------
# Bounded self-attention: the bias


def test_self_bias_blocks_exactly_the_pairs_of_two_disjoint_boxes():
    """Tokens 0,1 in box A, 2,3 in box B, 4 background: only A<->B pairs are blocked, both ways."""
    bias = bounded_self_attention_bias(masks_of({0, 1}, {2, 3}, tokens=5))
    assert bias.shape == (5, 5)
    assert blocked_pairs(bias) == {(0, 2), (0, 3), (1, 2), (1, 3), (2, 0), (3, 0), (2, 1), (3, 1)}
    assert set(bias[torch.isfinite(bias)].tolist()) == {0.0}  # additive: 0 or -inf, nothing else


def test_self_bias_pixel_in_both_boxes_sees_and_is_seen_by_both():
    """Token 2 lies in A and B: it shares a box with everyone, so only 0,1 <-> 3 stay blocked."""
    bias = bounded_self_attention_bias(masks_of({0, 1, 2}, {2, 3}, tokens=5))
    assert blocked_pairs(bias) == {(0, 3), (1, 3), (3, 0), (3, 1)}
    assert torch.all(bias[2] == 0) and torch.all(bias[:, 2] == 0)


def test_self_bias_on_a_4x4_grid_matches_brute_force_and_spares_background():
    """Top-left and bottom-right quadrants of a 32x32 image on a 4x4 token grid."""
    masks = subject_token_masks([(0, 0, 16, 16), (16, 16, 32, 32)], 32, 32, 4, 4)[16]
    box_a = {r * 4 + c for r in (0, 1) for c in (0, 1)}
    box_b = {r * 4 + c for r in (2, 3) for c in (2, 3)}
    assert masks[0].nonzero().flatten().tolist() == sorted(box_a)
    assert masks[1].nonzero().flatten().tolist() == sorted(box_b)
    bias = bounded_self_attention_bias(masks)
    expected = {(q, k) for q in range(16) for k in range(16) if (q in box_a and k in box_b) or (q in box_b and k in box_a)}
    assert blocked_pairs(bias) == expected
    background = [t for t in range(16) if t not in box_a | box_b]  # top-right and bottom-left quadrants
    assert len(background) == 8
    for t in background:
        assert torch.all(bias[t] == 0) and torch.all(bias[:, t] == 0)
    assert torch.all(torch.diagonal(bias) == 0)  # a token always sees itself


def test_self_biases_keyed_by_unet_token_counts_and_no_row_fully_blocked():
    boxes = [(0, 0, 40, 64), (40, 0, 72, 64)]  # 72x64 image, latent 8x9: odd grid sizes downstream
    biases = self_attention_biases(boxes, 72, 64, 8, 9)
    assert set(biases) == {h * w for h, w in unet_grids(8, 9)} == {72, 20, 6, 2}
    for tokens, bias in biases.items():
        assert bias.shape == (tokens, tokens) and bias.dtype == torch.float32
        assert torch.isfinite(bias).any(-1).all(), f"a fully blocked query row at {tokens} tokens"
        assert torch.equal(bias, bias.T)  # "q may not see k" is symmetric for self-attention
    assert torch.isinf(biases[72]).any()  # the finest level really separates the boxes


def test_self_biases_dtype_argument():
    biases = self_attention_biases([(0, 0, 32, 64), (32, 0, 64, 64)], 64, 64, 8, 8, dtype=torch.float16)
    bias = biases[64]
    assert bias.dtype == torch.float16
    assert torch.isinf(bias).sum() == 2 * 32 * 32  # left half x right half, both ways, all 64 tokens in a box


# ---------------------------------------------------------------------------------------------
# Bounded self-attention: the processor


def test_self_processor_without_bias_is_plain_sdpa(self_attn):
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = AttnProcessor2_0()(self_attn, x)
        assert torch.equal(BoundedSelfAttnProcessor()(self_attn, x, self_attention_bias=None), plain)
        assert torch.equal(BoundedSelfAttnProcessor()(self_attn, x), plain)


def test_self_processor_with_zero_bias_equals_plain_sdpa(self_attn):
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = AttnProcessor2_0()(self_attn, x)
        zero = BoundedSelfAttnProcessor()(self_attn, x, self_attention_bias={4: torch.zeros(4, 4)})
    torch.testing.assert_close(zero, plain, atol=1e-6, rtol=1e-5)


def test_self_processor_with_blocking_bias_equals_brute_force_masked_attention(self_attn):
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(4))
    masks = masks_of({0, 1}, {2}, tokens=4)  # token 3 is background
    bias = bounded_self_attention_bias(masks)
    allowed = torch.isfinite(bias)
    with torch.no_grad():
        bounded = BoundedSelfAttnProcessor()(self_attn, x, self_attention_bias={4: bias})
        expected = brute_attention(self_attn, x, x, allowed[None])
        unbounded = brute_attention(self_attn, x, x, torch.ones(1, 4, 4, dtype=torch.bool))
    torch.testing.assert_close(bounded, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(bounded, unbounded, atol=1e-3)  # the mask changed something
    torch.testing.assert_close(bounded[:, 3], unbounded[:, 3], atol=1e-5, rtol=1e-5)  # background row untouched


def test_self_processor_ignores_a_bias_for_another_token_count(self_attn):
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(5))
    blocking = bounded_self_attention_bias(masks_of({0}, {1}, tokens=9))
    with torch.no_grad():
        assert torch.equal(BoundedSelfAttnProcessor()(self_attn, x, self_attention_bias={9: blocking}),
                           AttnProcessor2_0()(self_attn, x))


def test_self_processor_receives_its_bias_through_attention_forward(self_attn):
    """diffusers' Attention.forward passes the keyword on (it filters by the processor's signature)."""
    x = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(6))
    bias = {4: bounded_self_attention_bias(masks_of({0, 1}, {2, 3}, tokens=4))}
    processor = BoundedSelfAttnProcessor()
    self_attn.set_processor(processor)
    with torch.no_grad():
        through_forward = self_attn(x, self_attention_bias=bias, cross_attention_bias=None)
        direct = processor(self_attn, x, self_attention_bias=bias)
    assert torch.equal(through_forward, direct)


# ---------------------------------------------------------------------------------------------
# Bounded cross-attention: the bias


def test_cross_bias_blocks_other_subjects_words_and_background():
    """Tokens 0,1 in box A (word 2), 2,3 in box B (word 5), 4 background; prompt length 8."""
    masks = masks_of({0, 1}, {2, 3}, tokens=5)
    bias = bounded_cross_attention_bias(masks, [[2], [5]], 8)
    assert bias.shape == (5, 8)
    assert blocked_pairs(bias) == {(0, 5), (1, 5), (2, 2), (3, 2), (4, 2), (4, 5)}


def test_cross_bias_without_block_background_leaves_background_free():
    masks = masks_of({0, 1}, {2, 3}, tokens=5)
    bias = bounded_cross_attention_bias(masks, [[2], [5]], 8, block_background=False)
    assert blocked_pairs(bias) == {(0, 5), (1, 5), (2, 2), (3, 2)}
    assert torch.all(bias[4] == 0)


def test_cross_bias_word_shared_by_two_subjects_stays_visible_in_both_boxes():
    """Word 6 belongs to A and B ("two dogs"): visible from both boxes, hidden only from the background."""
    masks = masks_of({0, 1}, {2, 3}, tokens=5)
    bias = bounded_cross_attention_bias(masks, [[2, 6], [5, 6]], 8)
    assert torch.all(bias[:4, 6] == 0)
    assert bias[4, 6] == NEG_INF
    assert blocked_pairs(bias) == {(0, 5), (1, 5), (2, 2), (3, 2), (4, 2), (4, 5), (4, 6)}
    both_shared = bounded_cross_attention_bias(masks, [[2], [2]], 8, block_background=False)
    assert torch.all(both_shared == 0)  # the same word for both subjects bounds nothing between them


def test_cross_bias_pixel_in_both_boxes_sees_both_words_and_positions_past_length_are_dropped():
    masks = masks_of({0, 1}, {1, 2}, tokens=3)  # token 1 in both boxes
    bias = bounded_cross_attention_bias(masks, [[2, 9], [4]], 6)  # position 9 lies past the 6 tokens
    assert bias.shape == (3, 6)
    assert blocked_pairs(bias) == {(0, 4), (2, 2)}
    assert torch.isfinite(bias).any(-1).all()  # start of text and fillers stay visible


def test_cross_biases_per_level_with_unconditional_half_unbounded():
    """Top-left quadrant (word 2) and right half (word 5) of a 32x32 image, latent 4x4, 8 tokens."""
    boxes = [(0, 0, 16, 16), (16, 0, 32, 32)]
    biases = cross_attention_biases(boxes, [[2], [5]], 8, 32, 32, 4, 4)
    assert set(biases) == {h * w for h, w in unet_grids(4, 4)} == {16, 4, 1}
    for tokens, bias in biases.items():
        assert bias.shape == (2, 1, tokens, 8)
        assert torch.all(bias[0] == 0), "the unconditional half must be unbounded"
    cond = biases[16][1, 0]
    box_a = {r * 4 + c for r in (0, 1) for c in (0, 1)}
    box_b = {r * 4 + c for r in range(4) for c in (2, 3)}
    background = set(range(16)) - box_a - box_b  # bottom-left quadrant
    expected = {(t, 5) for t in box_a} | {(t, 2) for t in box_b} | {(t, w) for t in background for w in (2, 5)}
    assert blocked_pairs(cond) == expected
    # each level's conditional half is the single-level bias of that level's masks
    masks = subject_token_masks(boxes, 32, 32, 4, 4)
    for tokens, bias in biases.items():
        assert torch.equal(bias[1, 0], bounded_cross_attention_bias(masks[tokens], [[2], [5]], 8))


def test_cross_biases_block_background_false_and_dtype():
    biases = cross_attention_biases([(0, 0, 16, 16), (16, 0, 32, 32)], [[2], [5]], 8, 32, 32, 4, 4,
                                    dtype=torch.float16, block_background=False)
    cond = biases[16][1, 0]
    assert biases[16].dtype == torch.float16
    assert torch.all(cond[[8, 9, 12, 13]] == 0)  # bottom-left quadrant: background, free
    assert cond[0, 5] == NEG_INF and cond[2, 2] == NEG_INF


# ---------------------------------------------------------------------------------------------
# Label word positions (real CLIP tokenizer)


def test_label_positions_dog_and_cat(tokenizer):
    prompt = "a dog and a cat on the grass"
    positions = label_word_positions(tokenizer, prompt, ["dog", "cat"])
    assert positions == [[2], [5]]
    assert tokens_at(tokenizer, prompt, [2, 5]) == ["dog</w>", "cat</w>"]


def test_label_positions_two_mentions_of_one_label_go_in_order(tokenizer):
    prompt = "a dog and a dog"
    positions = label_word_positions(tokenizer, prompt, ["dog", "dog"])
    assert positions == [[2], [5]]
    assert tokens_at(tokenizer, prompt, [2, 5]) == ["dog</w>", "dog</w>"]


def test_label_positions_plural_is_shared_by_all_subjects_of_the_label(tokenizer):
    prompt = "two dogs on a sofa"
    positions = label_word_positions(tokenizer, prompt, ["dog", "dog"])
    assert positions == [[2], [2]]
    assert tokens_at(tokenizer, prompt, [2]) == ["dogs</w>"]


@pytest.mark.parametrize("prompt, labels, words", [
    ("two cats on a sofa", ["cat", "cat"], [["cats"], ["cats"]]),  # one plural mention: shared by both boxes
    ("three puppies and a fox", ["puppy", "fox"], [["puppies"], ["fox"]]),
    ("a fox and two foxes", ["fox", "fox"], [["fox"], ["foxes"]]),  # as many mentions as boxes: one each, in order
    ("two mice and a cat", ["mouse", "cat"], [["mice"], ["cat"]]),
    ("a cat and a dog", ["cats", "dog"], [["cat"], ["dog"]]),  # a plural label finds the singular
    ("two dachshunds on the grass", ["dachshund"], [["dach", "shun", "ds"]]),  # a word of several tokens: all of them
    ("a caterpillar and a hotdog", ["cat", "dog"], [[], []]),  # parts of other words are no mention
])
def test_label_positions_match_simple_inflections(tokenizer, prompt, labels, words):
    positions = label_word_positions(tokenizer, prompt, labels)
    assert [[t.removesuffix("</w>") for t in tokens_at(tokenizer, prompt, p)] for p in positions] == words


def test_label_positions_skip_concept_tokens(clip_files):
    """A concept's tokens (added to the tokenizer) are words of their own, never a mention."""
    tokenizer = make_tokenizer(clip_files)
    tokenizer.add_tokens(["<mochi-r0>", "<mochi-c0>"])
    prompt = "<mochi-r0> <mochi-c0> dog and two cats"
    positions = label_word_positions(tokenizer, prompt, ["dog", "cat"])
    assert [tokens_at(tokenizer, prompt, p) for p in positions] == [["dog</w>"], ["cats</w>"]]
    assert positions == [[3], [6]]


def test_label_positions_interleaved_labels(tokenizer):
    prompt = "a dog, a cat and a dog"
    positions = label_word_positions(tokenizer, prompt, ["dog", "cat", "dog"])
    words = tokenizer.convert_ids_to_tokens(tokenizer(prompt).input_ids)
    assert [words[p[0]] for p in positions] == ["dog</w>", "cat</w>", "dog</w>"]
    assert positions[0] != positions[2]


def test_label_positions_feed_the_cross_bias_of_a_real_prompt(tokenizer):
    """End to end on the pure side: the dog box never sees "cat", the cat box never sees "dog"."""
    words = label_word_positions(tokenizer, "a dog and a cat on the grass", ["dog", "cat"])
    cond = cross_attention_biases([(0, 0, 32, 64), (32, 0, 64, 64)], words, 77, 64, 64, 8, 8)[64][1, 0]
    left = [r * 8 + c for r in range(8) for c in range(4)]
    right = [r * 8 + c for r in range(8) for c in range(4, 8)]
    assert torch.all(cond[left, 5] == NEG_INF) and torch.all(cond[left, 2] == 0)
    assert torch.all(cond[right, 2] == NEG_INF) and torch.all(cond[right, 5] == 0)
    assert torch.isinf(cond).sum() == 64  # nothing else blocked (no background at this layout)


# ---------------------------------------------------------------------------------------------
# Bounded cross-attention: the layer-wise processor


LENGTH = 5  # tokens per layer-wise copy in these tests


def layerwise_inputs(seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 4, 8, generator=g)
    context = torch.randn(2, NUM_LAYERS * LENGTH, 6, generator=g)
    return hidden, context


def copy_of_layer(context: torch.Tensor, layer: int) -> torch.Tensor:
    return context[:, layer * LENGTH:(layer + 1) * LENGTH]  # the layout, written out independently of select_layer


def test_layerwise_zero_cross_bias_equals_no_bias(cross_attn):
    hidden, context = layerwise_inputs()
    processor = LayerwiseAttnProcessor(3)
    with torch.no_grad():
        plain = processor(cross_attn, hidden, context)
        zero = processor(cross_attn, hidden, context, cross_attention_bias={4: torch.zeros(2, 1, 4, LENGTH)})
        reference = AttnProcessor2_0()(cross_attn, hidden, copy_of_layer(context, 3))
    torch.testing.assert_close(zero, plain, atol=1e-6, rtol=1e-5)
    assert torch.equal(plain, reference)


def test_layerwise_blocking_cross_bias_equals_brute_force_on_the_layer_copy(cross_attn):
    hidden, context = layerwise_inputs(8)
    allowed = torch.ones(2, 4, LENGTH, dtype=torch.bool)
    allowed[1, :2, 3] = False  # image 1, tokens 0,1 may not see word 3
    allowed[1, 2:, 1] = False
    allowed[0, 3, 4] = False
    bias = torch.zeros(2, 1, 4, LENGTH).masked_fill(~allowed[:, None], NEG_INF)
    with torch.no_grad():
        bounded = LayerwiseAttnProcessor(11)(cross_attn, hidden, context, cross_attention_bias={4: bias})
        expected = brute_attention(cross_attn, hidden, copy_of_layer(context, 11), allowed)
        other_layer = brute_attention(cross_attn, hidden, copy_of_layer(context, 10), allowed)
    torch.testing.assert_close(bounded, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(bounded, other_layer, atol=1e-3)  # it really read copy 11


def test_layerwise_ignores_a_cross_bias_for_another_token_count(cross_attn):
    hidden, context = layerwise_inputs(9)
    blocking = torch.full((2, 1, 16, LENGTH), NEG_INF)
    blocking[..., 0] = 0
    processor = LayerwiseAttnProcessor(0)
    with torch.no_grad():
        assert torch.equal(processor(cross_attn, hidden, context, cross_attention_bias={16: blocking}),
                           processor(cross_attn, hidden, context))


def test_layerwise_with_cross_attention_biases_bounds_only_the_conditional_half(cross_attn):
    """The biases of `cross_attention_biases` (latent 2x2: 4 tokens) through the processor:
    image 0 (unconditional) as without bias, image 1 as brute force under the box bounds."""
    hidden, context = layerwise_inputs(10)
    biases = cross_attention_biases([(0, 0, 8, 16), (8, 0, 16, 16)], [[1], [3]], LENGTH, 16, 16, 2, 2)
    # left box holds tokens 0 and 2 (left column), right box tokens 1 and 3
    allowed = torch.ones(2, 4, LENGTH, dtype=torch.bool)
    allowed[1, [0, 2], 3] = False
    allowed[1, [1, 3], 1] = False
    assert torch.equal(torch.isfinite(biases[4][:, 0]), allowed)
    processor = LayerwiseAttnProcessor(5)
    with torch.no_grad():
        bounded = processor(cross_attn, hidden, context, cross_attention_bias=biases)
        plain = processor(cross_attn, hidden, context)
        expected = brute_attention(cross_attn, hidden, copy_of_layer(context, 5), allowed)
    torch.testing.assert_close(bounded, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bounded[0], plain[0], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(bounded[1], plain[1], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Matching detections to boxes


LEFT, RIGHT = (0, 0, 32, 64), (32, 0, 64, 64)


def test_box_iou_hand_values():
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 4, 4), (0, 0, 4, 4)) == 1.0
    assert box_iou((0, 0, 4, 4), (0, 0, 2, 4)) == pytest.approx(0.5)
    assert box_iou((0, 0, 2, 2), (2, 0, 4, 2)) == 0.0  # touching edges
    assert box_iou((0, 0, 2, 2), (5, 5, 6, 6)) == 0.0
    assert box_iou((1, 1, 1, 1), (1, 1, 1, 1)) == 0.0  # zero area, no division by zero
    assert box_iou((0.0, 0.0, 1.5, 2.0), (0.5, 0.0, 2.0, 2.0)) == pytest.approx(2.0 / 4.0)


def test_centre_inside_is_half_open():
    assert centre_inside((0, 0, 4, 4), (2, 2, 10, 10))  # centre (2, 2) on the box's start edge
    assert not centre_inside((6, 6, 14, 14), (0, 0, 10, 10))  # centre (10, 10) on its end edge
    assert centre_inside((8, 8, 9, 9), (0, 0, 10, 10))
    assert not centre_inside((0, 20, 4, 24), (0, 0, 10, 10))


def test_two_dogs_swapped_left_right_map_to_their_own_boxes():
    """Detections listed right dog first: matching goes by position, not by list order or label."""
    right_dog, left_dog = (36, 4, 60, 60), (4, 4, 28, 60)
    assert match_detections_to_boxes([right_dog, left_dog], ["dog", "dog"], [LEFT, RIGHT], ["dog", "dog"]) == [1, 0]
    assert match_detections_to_boxes([left_dog, right_dog], ["dog", "dog"], [LEFT, RIGHT], ["dog", "dog"]) == [0, 1]


def test_matching_needs_the_class_word():
    dog, cat = (4, 4, 28, 60), (36, 4, 60, 60)
    assert match_detections_to_boxes([cat, dog], ["cat", "dog"], [LEFT, RIGHT], ["dog", "cat"]) == [1, 0]
    # the only detection in the left box is a cat: the dog box gets nothing
    assert match_detections_to_boxes([(4, 4, 28, 60)], ["cat"], [LEFT], ["dog"]) == [None]


def test_matching_box_without_detection_gets_none():
    left_dog = (4, 4, 28, 60)
    assert match_detections_to_boxes([left_dog], ["dog"], [LEFT, RIGHT], ["dog", "dog"]) == [0, None]
    assert match_detections_to_boxes([], [], [LEFT, RIGHT], ["dog", "dog"]) == [None, None]
    assert match_detections_to_boxes([left_dog], ["dog"], [], []) == []


def test_matching_accepts_small_detection_by_centre_and_rejects_far_low_iou():
    big = (0, 0, 64, 64)
    small_inside = (28, 28, 36, 36)  # IoU 64 / 4096, far below MIN_IOU, centre inside
    assert box_iou(big, small_inside) < 0.3
    assert match_detections_to_boxes([small_inside], ["dog"], [big], ["dog"]) == [0]
    sliver = (30, 0, 70, 40)  # centre (50, 20) outside (0, 0, 40, 40), IoU 400/2800
    assert match_detections_to_boxes([sliver], ["dog"], [(0, 0, 40, 40)], ["dog"]) == [None]


def test_matching_is_an_optimal_assignment_not_greedy():
    """Box A's best detection (d0) is box B's only option: greedy per box would leave B empty,
    the optimal assignment gives A its second choice d1 and B d0."""
    box_a, box_b = (0, 0, 40, 40), (30, 0, 70, 40)
    d0, d1 = (10, 0, 50, 40), (0, 0, 20, 40)
    assert box_iou(box_a, d0) == pytest.approx(0.6) and box_iou(box_a, d1) == pytest.approx(0.5)
    assert box_iou(box_b, d0) == pytest.approx(1 / 3) and box_iou(box_b, d1) == 0.0
    assert match_detections_to_boxes([d0, d1], ["dog", "dog"], [box_a, box_b], ["dog", "dog"]) == [1, 0]


def test_boxes_spanned_by_a_merged_detection():
    """One detection lying half in each box spans both: that is a merge."""
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:50, 16:48] = True  # 16 columns in each half
    assert boxes_spanned(mask, [LEFT, RIGHT]) == [0, 1]


def test_boxes_spanned_share_threshold_is_inclusive_and_empty_mask_spans_nothing():
    mask = np.zeros((10, 10), dtype=bool)
    mask[0, :] = True  # 10 pixels
    left, right = (0, 0, 8, 10), (8, 0, 10, 10)
    assert boxes_spanned(mask, [left, right]) == [0, 1]  # right holds 2/10 = exactly the 0.2 share
    assert boxes_spanned(mask, [left, (9, 0, 10, 10)]) == [0]  # 1/10 is below it
    assert boxes_spanned(mask, [left, right], share=0.5) == [0]
    assert boxes_spanned(np.zeros((10, 10), dtype=bool), [left, right]) == []


def test_split_mask_by_disjoint_boxes_keeps_each_box_and_drops_outside():
    mask = np.ones((4, 10), dtype=bool)
    left, right = (0, 0, 3, 4), (5, 0, 10, 4)  # columns 3 and 4 lie in no box
    parts = split_mask_by_boxes(mask, [left, right])
    assert len(parts) == 2
    assert np.array_equal(parts[0], box_pixels(left, 10, 4))
    assert np.array_equal(parts[1], box_pixels(right, 10, 4))
    assert not (parts[0] | parts[1])[:, 3:5].any()


def test_split_mask_overlap_goes_to_the_nearer_box_centre():
    """Boxes [0,5) and [3,8) in x, centres 2.5 and 5.5: pixel column 3 (centre 3.5) is nearer the
    first, column 4 (centre 4.5) nearer the second."""
    mask = np.zeros((2, 8), dtype=bool)
    mask[:, 1:7] = True
    parts = split_mask_by_boxes(mask, [(0, 0, 5, 2), (3, 0, 8, 2)])
    assert parts[0][0].tolist() == [False, True, True, True, False, False, False, False]
    assert parts[1][0].tolist() == [False, False, False, False, True, True, True, False]
    assert not (parts[0] & parts[1]).any()
    assert np.array_equal(parts[0] | parts[1], mask)


def test_box_pixels_clips_to_the_canvas():
    mask = box_pixels((-2, 1, 3, 10), 4, 4)
    expected = np.zeros((4, 4), dtype=bool)
    expected[1:4, 0:3] = True
    assert mask.dtype == bool and np.array_equal(mask, expected)
    rows, cols = box_pixels((1, 1, 3, 2), 4, 4).nonzero()  # x in [1, 3), y in [1, 2): row 1, columns 1 and 2
    assert (rows.tolist(), cols.tolist()) == ([1, 1], [1, 2])


# ---------------------------------------------------------------------------------------------
# Bootstrapping


def test_centring_shift_moves_box_centre_to_canvas_centre():
    # 64x64 image, 8x8 latent: box centre (16, 16) px = latent (2, 2); canvas centre (4, 4)
    assert centring_shift((0, 0, 32, 32), 64, 64, 8, 8) == (2, 2)
    assert centring_shift((16, 16, 48, 48), 64, 64, 8, 8) == (0, 0)
    # 128 wide, 64 high, latent 8x16: box centre (112, 16) px = latent column 14, row 2
    assert centring_shift((96, 0, 128, 32), 128, 64, 8, 16) == (2, -6)


def test_centring_shift_rolls_a_box_mask_onto_the_centre():
    from pipelines.regional import box_mask

    box = (0, 0, 32, 32)
    mask = box_mask(box, 64, 64, 8, 8).float()
    rolled = torch.roll(mask, centring_shift(box, 64, 64, 8, 8), dims=(0, 1))
    rows, cols = rolled.nonzero(as_tuple=True)
    assert (rows.float().mean() + 0.5, cols.float().mean() + 0.5) == (4.0, 4.0)


def test_bootstrap_latent_inside_box_keeps_latent_outside_takes_background():
    latent = torch.full((1, 2, 2, 3), 5.0)
    background = torch.full((1, 2, 2, 3), -1.0)
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])[None, None]
    out = bootstrap_latent(latent, mask, background)
    assert out.shape == (1, 2, 2, 3)
    assert out[0, 0].tolist() == [[5.0, 5.0, -1.0], [-1.0, 5.0, -1.0]]
    assert torch.equal(out[0, 0], out[0, 1])


def test_mix_box_predictions_mean_on_overlap_eps_elsewhere():
    eps = torch.full((2, 1, 1, 5), -1.0)
    branch_a, branch_b = torch.full_like(eps, 2.0), torch.full_like(eps, 4.0)
    mask_a = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 5)
    mask_b = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0]).view(1, 1, 1, 5)
    out = mix_box_predictions(eps, [branch_a, branch_b], [mask_a, mask_b])
    assert out.shape == eps.shape
    assert out[0, 0, 0].tolist() == [2.0, 2.0, 3.0, 4.0, -1.0]
    assert torch.equal(out[0], out[1])
    assert torch.equal(mix_box_predictions(eps, [], []), eps)


# ---------------------------------------------------------------------------------------------
# Bounded guidance loss


def test_box_term_hand_values():
    inside = torch.tensor([True, True, False, False])
    mass = torch.tensor([[0.5, 0.5, 0.0, 0.0],   # all inside: 0
                         [0.0, 0.0, 0.5, 0.5],   # all outside: 1
                         [0.5, 0.0, 0.5, 0.0]])  # half: (1 - 0.5 / (0.5 + 2 * 0.5))^2 = 4/9
    torch.testing.assert_close(box_term(mass, inside, 2), torch.tensor([0.0, 1.0, 4 / 9]))


def test_bounded_loss_lower_for_maps_inside_their_boxes():
    """4 tokens, box 0 = {0, 1}, box 1 = {2, 3}; one cross layer, one self layer, one image."""
    box_masks = {4: masks_of({0, 1}, {2, 3}, tokens=4)}
    good_cross = [[torch.tensor([[0.5, 0.5, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.5, 0.5]])]]
    bad_cross = [[good_cross[0][1], good_cross[0][0]]]  # each subject's map in the other box
    block = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]])[None]
    uniform = torch.full((1, 4, 4), 0.25)
    torch.testing.assert_close(bounded_loss(good_cross, [], box_masks), torch.tensor([0.0]))
    torch.testing.assert_close(bounded_loss(bad_cross, [], box_masks), torch.tensor([1.5 * 2]))
    torch.testing.assert_close(bounded_loss([], [block], box_masks), torch.tensor([0.0]))
    # uniform self-attention: each subject's keys get 0.5 of every query: 4/9 per subject
    torch.testing.assert_close(bounded_loss([], [uniform], box_masks), torch.tensor([0.5 * 8 / 9]))
    torch.testing.assert_close(bounded_loss(bad_cross, [uniform], box_masks), torch.tensor([3.0 + 4 / 9]))
    # layers are averaged, not summed
    torch.testing.assert_close(bounded_loss(good_cross + bad_cross, [], box_masks), torch.tensor([1.5]))
    assert bounded_loss(good_cross, [block], box_masks) < bounded_loss(bad_cross, [uniform], box_masks)


# ---------------------------------------------------------------------------------------------
# Subject words, boxes on the command line, layout settings


def test_subject_word_positions_skip_fillers_and_keep_concept_tokens(clip_files):
    tokenizer = make_tokenizer(clip_files)  # its own: concept tokens are added to it
    tokenizer.add_tokens(concept_tokens("mochi"))
    prompt = "a photo of <mochi> dog, on grass"
    positions = subject_word_positions(tokenizer, prompt, {"mochi"})
    assert positions == [4, 5, 6, 9]
    expanded = "a photo of <mochi-r0> <mochi-c0> dog, on grass"
    assert tokens_at(tokenizer, expanded, positions) == ["<mochi-r0>", "<mochi-c0>", "dog</w>", "grass</w>"]


def test_subject_word_positions_all_fillers_fall_back_to_every_word(tokenizer):
    assert subject_word_positions(tokenizer, "a photo of the", set()) == [1, 2, 3, 4]


def test_subject_word_positions_unknown_concept_is_a_user_error(tokenizer):
    with pytest.raises(UserError, match="unknown concept <tama>"):
        subject_word_positions(tokenizer, "<tama> dog", {"mochi"})


def test_parse_box():
    assert parse_box("1,2,3,4") == (1, 2, 3, 4)
    assert parse_box(" 1.6, 2.4 ,30,40 ") == (2, 2, 30, 40)
    for bad in ("1,2,3", "1,2,3,4,5", "a,b,c,d", "", "inf,0,1,1", "nan,0,1,1"):
        with pytest.raises(UserError, match="four numbers"):
            parse_box(bad)


def test_check_layout_control_bounds():
    for ok in (NO_LAYOUT, DEFAULT_LAYOUT, LayoutControl(1, 1, True, 1, 1), LayoutControl(0.5, 0, False, 0, 20)):
        check_layout_control(ok)
    with pytest.raises(UserError, match="self-attention 1.5"):
        check_layout_control(LayoutControl(self_attention=1.5))
    with pytest.raises(UserError, match="bootstrap -0.1"):
        check_layout_control(LayoutControl(bootstrap=-0.1))
    with pytest.raises(UserError, match="guidance 2"):
        check_layout_control(LayoutControl(guidance=2))
    for iterations in (0, 21):
        with pytest.raises(UserError, match="guidance iterations"):
            check_layout_control(LayoutControl(guidance_iterations=iterations))


def test_layout_control_steps():
    assert LayoutControl(self_attention=0.25, bootstrap=1.0, guidance=0.0).steps(20) == {
        "self_attention": 5, "bootstrap": 20, "guidance": 0}
    assert LayoutControl(self_attention=0.01).steps(20)["self_attention"] == 1  # on means at least one step
    assert LayoutControl(guidance=0.3).steps(10)["guidance"] == 3
    assert NO_LAYOUT.steps(30) == {"self_attention": 0, "bootstrap": 0, "guidance": 0}
    assert NO_LAYOUT.is_off() and not DEFAULT_LAYOUT.is_off()
    assert LayoutControl(centre=False, guidance_iterations=3).is_off()  # only shares of steps count
    assert DEFAULT_LAYOUT.to_json() == {"self_attention": 1.0, "bootstrap": 0.0, "centre": True, "guidance": 0.0,
                                        "guidance_iterations": 5}
