"""Custom Diffusion's closed-form merge (Kumari et al. CVPR 2023, src/composenW.py).

The pure solve is checked against a brute-force solve of its KKT system on random float64 problems; the
pipeline on the tiny random model, with concepts of random modifier tokens and K/V updates loaded by
`edlora.apply_concept`, against outputs computed independently (the concepts' own peft layers on padded
layer-wise encodings).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipelines.custom_diffusion import (
    CAPTION_SCENES,
    CAPTION_SUBJECTS,
    CAPTIONS_PER_CLASS_WORD,
    NUM_GENERIC_CAPTIONS,
    RIDGE,
    caption_features,
    constrained_merge,
    merge_custom_diffusion,
    regularization_captions,
)
from pipelines.edlora import apply_concept, set_active_adapters
from pipelines.errors import UserError
from pipelines.fusion import fusion_prompts, linear_of
from pipelines.layerwise import NUM_LAYERS, concept_tokens, cross_attention_layers, encode_layerwise, select_layer


# ---------------------------------------------------------------------------------------------
# The pure solve


def random_problem(out=5, dim=7, s=20, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, dim, generator=g, dtype=torch.float64)
    c_reg = torch.randn(s, dim, generator=g, dtype=torch.float64)
    c = torch.randn(n, dim, generator=g, dtype=torch.float64)
    v = torch.randn(n, out, generator=g, dtype=torch.float64)
    return w0, c_reg, c, v


def kkt_solve(w0, m, c, v):
    """min (W - W0) M (W - W0)^T s.t. C W^T = V by brute force: [[2M, C^T], [C, 0]] [W^T; L] = [2M W0^T; V]."""
    dim, n = m.shape[0], c.shape[0]
    kkt = torch.zeros(dim + n, dim + n, dtype=torch.float64)
    kkt[:dim, :dim], kkt[:dim, dim:], kkt[dim:, :dim] = 2 * m, c.T, c
    rhs = torch.cat([2 * m @ w0.T, v])
    return torch.linalg.solve(kkt, rhs)[:dim].T


@pytest.mark.parametrize("seed,out,dim,s,n", [(0, 5, 7, 20, 3), (1, 8, 6, 30, 5), (2, 3, 9, 50, 1)])
def test_constrained_merge_equals_the_kkt_solve(seed, out, dim, s, n):
    w0, c_reg, c, v = random_problem(out, dim, s, n, seed)
    w = constrained_merge(w0, c_reg, c, v, ridge=0.0, rcond=0.0)
    expected = kkt_solve(w0, c_reg.T @ c_reg, c, v)
    assert w.dtype == torch.float64 and w.shape == (out, dim)
    assert (w - expected).abs().max() < 1e-8 * expected.abs().max()
    assert (c @ w.T - v).abs().max() < 1e-10 * v.abs().max()  # the constraints hold exactly


def test_ridge_is_relative_to_the_mean_eigenvalue_and_handles_singular_captions():
    w0, c_reg, c, v = random_problem(out=4, dim=9, s=3, n=2, seed=3)  # 3 caption rows: M has rank 3 of 9
    w = constrained_merge(w0, c_reg, c, v)  # the default ridge
    m = c_reg.T @ c_reg
    expected = kkt_solve(w0, m + RIDGE * torch.trace(m) / 9 * torch.eye(9, dtype=torch.float64), c, v)
    assert torch.isfinite(w).all()
    assert (w - expected).abs().max() < 1e-8 * expected.abs().max()
    assert (c @ w.T - v).abs().max() < 1e-9 * v.abs().max()
    with pytest.raises(UserError, match=r"span fewer than all 9 directions.*use ridge > 0"):
        constrained_merge(w0, c_reg, c, v, ridge=0.0)


def test_targets_the_base_already_meets_leave_w0():
    w0, c_reg, c, _ = random_problem(seed=4)
    assert torch.allclose(constrained_merge(w0, c_reg, c, c @ w0.T), w0, rtol=0, atol=1e-12)


def test_one_concept_whose_rows_span_the_input_gets_its_own_weight():
    # n = in independent target rows pin W down completely: W = W0 + dW, whatever the captions
    w0, c_reg, _, _ = random_problem(out=4, dim=6, s=15, seed=5)
    g = torch.Generator().manual_seed(6)
    c = torch.randn(6, 6, generator=g, dtype=torch.float64)
    delta = torch.randn(4, 6, generator=g, dtype=torch.float64)
    w = constrained_merge(w0, c_reg, c, c @ (w0 + delta).T, rcond=0.0)
    assert (w - (w0 + delta)).abs().max() < 1e-9


def test_a_change_the_captions_never_see_is_free():
    # targets orthogonal to every caption row: the merge meets them without moving the captions' outputs
    g = torch.Generator().manual_seed(7)
    w0 = torch.randn(4, 6, generator=g, dtype=torch.float64)
    c_reg = torch.cat([torch.randn(20, 3, generator=g, dtype=torch.float64), torch.zeros(20, 3, dtype=torch.float64)], 1)
    c = torch.cat([torch.zeros(2, 3, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)], 1)
    v = torch.randn(2, 4, generator=g, dtype=torch.float64)
    w = constrained_merge(w0, c_reg, c, v)
    assert (c @ w.T - v).abs().max() < 1e-10
    assert (c_reg @ (w - w0).T).abs().max() < 1e-12


def test_repeated_rows_are_dropped_keeping_the_first():
    w0, c_reg, c, v = random_problem(n=3, seed=8)
    once = constrained_merge(w0, c_reg, c, v)
    conflicting = constrained_merge(w0, c_reg, torch.cat([c, c[:1]]), torch.cat([v, v[:1] + 5.0]))
    assert (conflicting - once).abs().max() < 1e-12  # composenW keeps the first row's value


def test_near_duplicate_rows_stay_finite_and_meet_consistent_targets():
    w0, c_reg, c, _ = random_problem(out=4, dim=7, s=25, n=2, seed=9)
    g = torch.Generator().manual_seed(10)
    target = w0 + torch.randn(4, 7, generator=g, dtype=torch.float64)
    near = torch.cat([c, c[:1] + 1e-9 * torch.randn(1, 7, generator=g, dtype=torch.float64)])
    w = constrained_merge(w0, c_reg, near, near @ target.T)
    single = constrained_merge(w0, c_reg, c, c @ target.T)
    assert torch.isfinite(w).all()
    assert (w - single).abs().max() < 1e-6  # the near-duplicate direction is dropped, not fitted with huge weights
    assert (near @ w.T - near @ target.T).abs().max() < 1e-6


@pytest.mark.parametrize("shapes,fragment", [
    (((4, 7), (20, 6), (3, 7), (3, 4)), "c_reg has shape (20, 6); the layer's weight (4, 7) needs [s, 7]"),
    (((4, 7), (20, 7), (3, 5), (3, 4)), "c_targets has shape (3, 5); the layer's weight (4, 7) needs [n, 7]"),
    (((4, 7), (20, 7), (3, 7), (2, 4)), "v_targets has shape (2, 4); 3 target rows of a layer with 4 outputs need (3, 4)"),
    (((4, 7), (20, 7), (0, 7), (0, 4)), "c_targets has shape (0, 7)"),
    (((4, 7, 1), (20, 7), (3, 7), (3, 4)), "w0 must be a [out, in] weight; it has shape (4, 7, 1)"),
])
def test_shapes_that_do_not_fit_are_user_errors(shapes, fragment):
    w0, c_reg, c, v = (torch.zeros(s, dtype=torch.float64) for s in shapes)
    with pytest.raises(UserError) as error:
        constrained_merge(w0, c_reg, c, v)
    assert fragment in str(error.value)


def test_bad_ridge_and_rcond_are_user_errors():
    w0, c_reg, c, v = random_problem()
    with pytest.raises(UserError, match=r"ridge=-1.0 must be >= 0"):
        constrained_merge(w0, c_reg, c, v, ridge=-1.0)
    with pytest.raises(UserError, match=r"rcond=1.5 must be in \[0, 1\)"):
        constrained_merge(w0, c_reg, c, v, rcond=1.5)


# ---------------------------------------------------------------------------------------------
# Regularization captions


def test_regularization_captions_are_deterministic_distinct_and_cover_every_subject_and_scene():
    captions = regularization_captions()
    assert captions == regularization_captions()
    assert len(captions) == NUM_GENERIC_CAPTIONS == len(set(captions)) == 200
    assert all(any(subject in c for c in captions) for subject in CAPTION_SUBJECTS)
    assert all(any(scene in c for c in captions) for scene in CAPTION_SCENES)
    with_classes = regularization_captions(["dog", "elephant", "dog", " "])
    assert with_classes[:200] == captions
    extra = with_classes[200:]
    assert len(extra) == 2 * CAPTIONS_PER_CLASS_WORD == len(set(extra))
    assert sum("a dog" in c for c in extra) == sum("an elephant" in c for c in extra) == CAPTIONS_PER_CLASS_WORD


# ---------------------------------------------------------------------------------------------
# The merge on the tiny model


def kv_modules(base) -> list[str]:
    return [f"{parent}.{leaf}" for parent, _ in cross_attention_layers(base.unet) for leaf in ("to_k", "to_v")]


def cd_concept(base, seed: int, modules: list[str] | None = None, scale: float = 0.1,
               layerwise: bool = False) -> dict[str, torch.Tensor]:
    """A Custom Diffusion file's tensors: a random modifier word and a class word (the same in all 16 layers, or
    with `layerwise` one vector per layer, so that a mix-up of layers shows), random K/V updates of `modules`
    (default all)."""
    g = torch.Generator().manual_seed(seed)
    dim = base.text_encoder.config.hidden_size
    embeddings = torch.randn(2, NUM_LAYERS if layerwise else 1, dim, generator=g)
    tensors = {"embeddings": embeddings.expand(2, NUM_LAYERS, dim).contiguous()}
    for module in modules or kv_modules(base):
        shape = linear_of(base.unet, module).weight.shape
        tensors[f"unet.{module}.delta"] = scale * torch.randn(shape, generator=g)
    return tensors


def load(base, concepts: dict[str, dict]) -> None:
    for name, tensors in concepts.items():
        apply_concept(base, name, tensors)


def target_rows(base, name: str, prompt: str) -> list[torch.Tensor]:
    """Concept `name`'s rows of `prompt` for each cross-attention layer, independently: the padded layer-wise
    encoding the sampler uses, from the concept's first token to end-of-text."""
    context = encode_layerwise(base.tokenizer, base.text_encoder, [prompt])  # [1, 16 * 77, d]
    ids = base.tokenizer(prompt.replace(f"<{name}>", " ".join(concept_tokens(name)[::NUM_LAYERS]))).input_ids  # layer 0's words
    own = set(base.tokenizer.convert_tokens_to_ids(concept_tokens(name)))
    first = next(i for i, token in enumerate(ids) if token in own)
    return [select_layer(context, layer)[0, first : len(ids)] for layer in range(NUM_LAYERS)]


def test_merge_reproduces_each_concepts_kv_and_stays_nearer_the_base_than_the_sum(fresh_base):
    base = fresh_base()
    concepts = {"mochi": cd_concept(base, 1, layerwise=True), "tama": cd_concept(base, 2, layerwise=True)}
    load(base, concepts)
    updates, report = merge_custom_diffusion(base, list(concepts), list(concepts.values()), captions=regularization_captions(["dog"]))

    modules = kv_modules(base)
    assert sorted(updates) == sorted(f"unet.{m}" for m in modules)
    layer_of = {f"{p}.{leaf}": i for i, (p, _) in enumerate(cross_attention_layers(base.unet)) for leaf in ("to_k", "to_v")}
    captions = caption_features(base, regularization_captions(["dog"])[::10]).float()
    with torch.no_grad():
        rows_of = {(name, prompt): target_rows(base, name, prompt) for name in concepts for prompt in fusion_prompts(name)}
        for module in modules:
            update = updates[f"unet.{module}"]
            layer = linear_of(base.unet, module)
            assert update.dtype == torch.float32 and update.device.type == "cpu" and update.shape == layer.weight.shape
            merged = layer.weight + update
            for name in concepts:
                set_active_adapters(base.unet, [name])  # the concept's own layer: W0 x + B A x through peft
                for prompt in fusion_prompts(name):
                    rows = rows_of[name, prompt][layer_of[module]]
                    own = base.unet.get_submodule(module)(rows)
                    assert (F.linear(rows, merged) - own).norm() / own.norm() < 1e-4, (module, name, prompt)
            # on the captions the merge moves the outputs less than adding both updates does
            summed = sum(concepts[n][f"unet.{module}.delta"] for n in concepts)
            assert (captions @ update.T).norm() < (captions @ summed.T).norm()
    set_active_adapters(base.unet, [])

    assert report["method"] == "custom-diffusion" and report["concepts"] == ["mochi", "tama"]
    for row in report["summary"].values():
        assert row["max_relative_error"] < 1e-6 < row["weight_average_mean_relative_error"]
    for key, row in report["layers"].items():
        assert row["regularization_change"] < row["sum_of_deltas_regularization_change"]
        assert row["target_rows"] == 12 and row["duplicate_rows"] == 0  # 2 concepts x (3 + 3) rows, "photo of a" cut off
    assert report["regularization"]["captions"] == 200 + 20 and report["outliers"] == []


def test_identical_concepts_merge_to_their_delta(fresh_base):
    base = fresh_base()
    mochi = cd_concept(base, 3)
    same_words = dict(mochi)  # the same embeddings and deltas: every target row repeats exactly
    other_words = {**mochi, "embeddings": cd_concept(base, 4)["embeddings"]}  # the same deltas, other tokens
    load(base, {"mochi": mochi, "twin": same_words, "kin": other_words})
    alone, _ = merge_custom_diffusion(base, ["mochi"], [mochi])
    twins, report = merge_custom_diffusion(base, ["mochi", "twin"], [mochi, same_words])
    assert all(row["duplicate_rows"] == 6 for row in report["layers"].values())
    assert all((twins[k] - alone[k]).abs().max() < 1e-6 for k in alone)

    kin, report = merge_custom_diffusion(base, ["mochi", "kin"], [mochi, other_words])
    module = kv_modules(base)[5]
    layer = linear_of(base.unet, module)
    delta = mochi[f"unet.{module}.delta"]
    for name in ("mochi", "kin"):
        with torch.no_grad():
            rows = torch.cat([target_rows(base, name, p)[2] for p in fusion_prompts(name)])
            assert (rows @ kin[f"unet.{module}"].T - rows @ delta.T).norm() / (rows @ delta.T).norm() < 1e-4


def test_a_concept_without_an_update_on_a_layer_keeps_the_base_there(fresh_base):
    base = fresh_base()
    modules = kv_modules(base)
    only_first = cd_concept(base, 5, modules=modules[:2])
    everywhere = cd_concept(base, 6)
    load(base, {"mochi": only_first, "tama": everywhere})
    updates, report = merge_custom_diffusion(base, ["mochi", "tama"], [only_first, everywhere])
    assert sorted(updates) == sorted(f"unet.{m}" for m in modules)
    module = modules[-1]  # cross-attention layer 15: only tama updates it
    with torch.no_grad():
        rows = torch.cat([target_rows(base, "mochi", p)[NUM_LAYERS - 1] for p in fusion_prompts("mochi")])
        base_out = rows @ linear_of(base.unet, module).weight.T
        assert (rows @ updates[f"unet.{module}"].T).norm() / base_out.norm() < 1e-4
    assert report["layers"][f"unet.{module}"]["method"]["mochi"] < 1e-6


def test_merge_errors_name_the_problem(fresh_base):
    base = fresh_base()
    mochi = cd_concept(base, 7)
    load(base, {"mochi": mochi})
    attn1 = kv_modules(base)[0].replace("attn2", "attn1")
    wrong_shape = {**mochi, f"unet.{kv_modules(base)[0]}.delta": torch.zeros(3, 3)}
    cases = [
        (dict(names=[], tensors=[]), "no concepts to merge"),
        (dict(names=["mochi", "mochi"], tensors=[mochi, mochi]), "a concept is named twice"),
        (dict(names=["mochi"], tensors=[]), "1 concept names but 0 tensor sets"),
        (dict(names=["tama"], tensors=[mochi]), "concept <tama> is not loaded into this base; load it with edlora.apply_concept"),
        (dict(names=["mochi"], tensors=[{"embeddings": mochi["embeddings"]}]), "concept <mochi> has no unet.<layer>.delta tensors"),
        (dict(names=["mochi"], tensors=[{**mochi, f"unet.{attn1}.delta": torch.zeros(1)}]),
         f"concept <mochi> updates unet.{attn1}; the Custom Diffusion merge takes only the cross-attention to_k/to_v"),
        (dict(names=["mochi"], tensors=[wrong_shape]), "delta has shape (3, 3); this base's layer needs"),
        (dict(names=["mochi"], tensors=[mochi], prompts={"mochi": ["a photo of a dog"]}),
         "target prompt 'a photo of a dog' of concept <mochi> does not name <mochi>"),
        (dict(names=["mochi"], tensors=[mochi], captions=[]), "no regularization captions"),
        (dict(names=["mochi"], tensors=[mochi], captions=["a <mochi> on a sofa"]), "names a concept; captions must be plain text"),
        (dict(names=["mochi"], tensors=[mochi], ridge=-1.0), "ridge=-1.0 must be >= 0"),
    ]
    for arguments, fragment in cases:
        with pytest.raises(UserError) as error:
            merge_custom_diffusion(base, **arguments)
        assert fragment in str(error.value), (arguments.get("names"), str(error.value))
