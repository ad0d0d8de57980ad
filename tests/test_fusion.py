"""Gradient fusion (Mix-of-Show section 3.3.2, closed form) and weight averaging.

The math is checked on small float64 problems against an independent solver (LBFGS from W0, what
Mix-of-Show runs) and against the normal equations; the pipeline is checked on the tiny random model
with two short-trained concepts: what fuse_concepts stores, caches, reloads and reports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import fusion
from pipelines.__main__ import main
from pipelines.base import build_tiny_model, load_base
from pipelines.concept import ConceptLibrary
from pipelines.edlora import apply_concept, lora_layers, set_active_adapters, text_module_name
from pipelines.errors import UserError
from pipelines.fusion import (
    FUSED_RECORD,
    FUSED_WEIGHTS,
    REPORT_FILE,
    FusionConfig,
    GramRecorder,
    concept_deltas,
    fuse_concepts,
    fuse_layer,
    fusion_prompts,
    gram_pinv,
    input_group,
    linear_of,
    load_fused,
    relative_output_error,
    weight_average,
)
from pipelines.layerwise import NUM_LAYERS, concept_tokens, cross_attention_layers, expand_prompt, known_concepts
from pipelines.train import TrainConfig, train_concept
from safetensors.torch import load_file

NAMES = ["mochi", "tama"]
TEXT_Q = "encoder.layers.1.self_attn.q_proj"  # transformers 5 names CLIPTextModel's layers without text_model.
UNET_K = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
UNET_OUT = "up_blocks.2.attentions.1.transformer_blocks.0.attn1.to_out.0"
UNET_Q2 = "mid_block.attentions.0.transformer_blocks.0.attn2.to_q"
LORA_KEY = re.compile(
    r"(text_encoder\.(text_model\.)?encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"
    r"|unet\..*\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
    r"|concepts\.(mochi|tama))"
)


# ---------------------------------------------------------------------------------------------
# Fixtures: one tiny model and one library of two concepts for the whole module


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one OpenMP thread for tiny ops


@pytest.fixture(autouse=True)
def keep_sigint():
    """`python -m pipelines fuse` installs its own Ctrl-C handler; give pytest its own back."""
    saved = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, saved)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("fusion-model") / "tiny")


def fresh(model_dir):
    return load_base(str(model_dir), device="cpu")


def layer_of(model, name: str) -> torch.nn.Linear:
    """`linear_of` for a layer named as files name it (transformers 4.x adds `text_model.`)."""
    return linear_of(model, text_module_name(model, name))


def stored_weights(folder, model_dir) -> dict[str, torch.Tensor]:
    """The weights a stored fused model means: W0 + the stored float32 update, computed as
    `load_fused` does; concept tokens as stored."""
    plain = fresh(model_dir)
    out = {}
    for key, tensor in load_file(Path(folder) / FUSED_WEIGHTS).items():
        if key.startswith("concepts."):
            out[key] = tensor
            continue
        prefix, module = key.split(".", 1)
        assert tensor.dtype == torch.float32, key  # updates are kept in float32 whatever the base's dtype
        model = plain.text_encoder if prefix == "text_encoder" else plain.unet
        out[key] = layer_of(model, module).weight.detach().float() + tensor
    return out


def random_photo(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def library(model_dir, tmp_path_factory):
    """Two concepts trained for a few steps on different photos and seeds.

    After 4 steps at lr 1e-4 the LoRA deltas are ~1e-4 of W0, so every fusion method reproduces
    each concept to ~1e-5 and comparisons between methods say nothing. The trained lora_B tensors
    are therefore replaced by random ones (a different draw per concept) of the size of W0, which
    makes the two concepts' deltas large and different, as they are after a real training run.
    """
    lib = ConceptLibrary(tmp_path_factory.mktemp("fusion-library"))
    for index, name in enumerate(NAMES):
        base = fresh(model_dir)
        photos = [random_photo(10 * index), random_photo(10 * index + 1)]
        result = train_concept(base, photos, TrainConfig(name=name, class_word="dog", steps=4, batch_size=1, seed=index,
                                                         preview_steps=1, checkpoint_every=0))
        generator = torch.Generator().manual_seed(100 + index)
        tensors = {k: (torch.randn(v.shape, generator=generator) * 0.5 if ".lora_B." in k else v) for k, v in result.tensors.items()}
        lib.save(result.concept, tensors, result.preview)
    return lib


@pytest.fixture(scope="module")
def fused(model_dir, library):
    """Gradient fusion of both concepts on a fresh base; (FusedModel, the base it made fused).

    With the solve near-exact (rcond 1e-6): these tests check the math, fits included. The product's
    default cutoff (1e-3) regularises, and its effect is measured in the toy world.
    """
    base = fresh(model_dir)
    return fuse_concepts(base, library, NAMES, FusionConfig(rcond=1e-6)), base


def deltas_of(library, prefix: str) -> list[dict[str, torch.Tensor]]:
    return [concept_deltas(library.weights(n), prefix) for n in NAMES]


# ---------------------------------------------------------------------------------------------
# The math on small float64 problems


def random_problem(seed: int, out: int = 6, inp: int = 10, rows=(2, 3, 3)):
    """W0, deltas dW_i and inputs X_i (as columns, `[in, n_i]`) of a random fusion problem."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, inp, generator=g, dtype=torch.float64)
    deltas = [torch.randn(out, inp, generator=g, dtype=torch.float64) for _ in rows]
    xs = [torch.randn(inp, n, generator=g, dtype=torch.float64) for n in rows]
    return w0, deltas, xs


def grams_of(xs):
    return [x @ x.T for x in xs]


def test_fuse_layer_equals_lbfgs_started_at_w0():
    # 8 input columns in 10 dimensions: sum G_i has rank 8, the problem is under-determined and
    # only the start at W0 picks the solution; LBFGS with Mix-of-Show's settings must land on ours.
    w0, deltas, xs = random_problem(0)
    assert torch.linalg.matrix_rank(sum(grams_of(xs))) == 8
    expected = fuse_layer(w0, deltas, grams_of(xs))

    w = w0.clone().requires_grad_(True)
    targets = [(w0 + d) @ x for d, x in zip(deltas, xs)]
    optimizer = torch.optim.LBFGS([w], lr=1, max_iter=500, history_size=25, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-16, tolerance_change=1e-16)

    def closure():
        optimizer.zero_grad()
        loss = sum(((t - w @ x) ** 2).sum() for t, x in zip(targets, xs))
        loss.backward()
        return loss

    optimizer.step(closure)
    found = w.detach()
    assert torch.linalg.norm(found - expected) / torch.linalg.norm(expected) < 1e-6
    # and the answer is not something simpler that LBFGS would also be close to
    assert torch.linalg.norm(weight_average(w0, deltas) - expected) / torch.linalg.norm(expected) > 1e-2


@pytest.mark.parametrize("rows", [(2, 3, 3), (5, 6, 7)], ids=["rank-deficient", "full-rank"])
def test_normal_equations_hold(rows):
    w0, deltas, xs = random_problem(1, rows=rows)
    grams = grams_of(xs)
    w = fuse_layer(w0, deltas, grams)
    lhs = (w - w0) @ sum(grams)
    rhs = sum(d @ g for d, g in zip(deltas, grams))
    assert torch.allclose(lhs, rhs, rtol=0, atol=1e-9 * rhs.abs().max())
    assert w.dtype == torch.float64


def test_null_space_of_gram_sum_keeps_w0():
    w0, deltas, xs = random_problem(2, rows=(2, 3, 2))  # rank 7 of 10: a 3-dim null space
    grams = grams_of(xs)
    w = fuse_layer(w0, deltas, grams)
    _, s, vh = torch.linalg.svd(torch.cat(xs, dim=1).T)  # rows of vh past the rank span the null space
    null = vh[7:].T  # [10, 3]
    assert torch.allclose(sum(grams) @ null, torch.zeros(10, 3, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(w @ null, w0 @ null, atol=1e-10)
    # along the inputs' directions W does move
    assert not torch.allclose(w @ xs[0], w0 @ xs[0], atol=1e-3)


@pytest.mark.parametrize("columns", [4, 15], ids=["rank-deficient", "full-rank"])
def test_single_concept_is_reproduced_on_its_inputs(columns):
    w0, (delta,), (x,) = random_problem(3, rows=(columns,))
    w = fuse_layer(w0, [delta], [x @ x.T])
    assert torch.allclose(w @ x, (w0 + delta) @ x, rtol=0, atol=1e-9)
    if columns >= x.shape[0]:
        assert torch.allclose(w, w0 + delta, atol=1e-9)


def test_fuse_layer_rejects_mismatched_lists():
    w0, deltas, xs = random_problem(4)
    with pytest.raises(ValueError):
        fuse_layer(w0, deltas, grams_of(xs)[:2])
    with pytest.raises(ValueError):
        fuse_layer(w0, [], [])


def test_gram_pinv_drops_eigenvalues_below_rcond():
    g = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    eigenvalues = torch.tensor([1.0, 0.5, 1e-3, 1e-8], dtype=torch.float64)
    gram = q @ torch.diag(eigenvalues) @ q.T
    kept = torch.tensor([1.0, 2.0, 1e3, 0.0], dtype=torch.float64)  # 1e-8 < 1e-6 * 1: dropped
    assert torch.allclose(gram_pinv(gram, rcond=1e-6), q @ torch.diag(kept) @ q.T, atol=1e-6)
    kept_all = torch.tensor([1.0, 2.0, 1e3, 1e8], dtype=torch.float64)  # 1e-8 > 1e-9 * 1: kept
    assert torch.allclose(gram_pinv(gram, rcond=1e-9), q @ torch.diag(kept_all) @ q.T, rtol=1e-5, atol=1e-5)
    cut_more = torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=torch.float64)  # 1e-3 < 1e-2: dropped too
    assert torch.allclose(gram_pinv(gram, rcond=1e-2), q @ torch.diag(cut_more) @ q.T, atol=1e-9)
    assert torch.equal(gram_pinv(torch.zeros(3, 3)), torch.zeros(3, 3, dtype=torch.float64))


def test_rcond_controls_fuse_layer():
    # A direction seen only with a tiny eigenvalue counts as unseen: W keeps W0 there.
    g = torch.Generator().manual_seed(6)
    w0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    delta = torch.randn(3, 4, generator=g, dtype=torch.float64)
    gram = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1e-9], dtype=torch.float64))
    w = fuse_layer(w0, [delta], [gram], rcond=1e-6)
    assert torch.allclose(w[:, :3], (w0 + delta)[:, :3], atol=1e-12)
    assert torch.allclose(w[:, 3], w0[:, 3], atol=1e-12)
    w = fuse_layer(w0, [delta], [gram], rcond=1e-12)
    assert torch.allclose(w, w0 + delta, atol=1e-9)


def test_relative_output_error_from_grams_equals_direct():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64)  # activations as rows
    target = torch.randn(5, 8, generator=g, dtype=torch.float64)
    w = target + 0.1 * torch.randn(5, 8, generator=g, dtype=torch.float64)
    direct = torch.linalg.norm(x @ w.T - x @ target.T) / torch.linalg.norm(x @ target.T)
    assert relative_output_error(w, target, x.T @ x) == pytest.approx(float(direct), rel=1e-10)
    assert relative_output_error(target, target, x.T @ x) == 0.0
    # float32 inputs are promoted, not truncated
    assert relative_output_error(w.float(), target.float(), (x.T @ x).float()) == pytest.approx(float(direct), rel=1e-5)


def test_weight_average_is_w0_plus_mean_delta():
    w0, deltas, _ = random_problem(8)
    assert torch.allclose(weight_average(w0, deltas), w0 + sum(deltas) / 3, atol=1e-12)
    assert torch.allclose(weight_average(w0.float(), [d.float() for d in deltas]), w0 + sum(deltas) / 3, atol=1e-5)
    assert torch.allclose(weight_average(w0, deltas, [0.5, 0.25, 0.25]), w0 + 0.5 * deltas[0] + 0.25 * (deltas[1] + deltas[2]), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Gram recording


def test_input_group_names():
    tb = "down_blocks.0.attentions.0.transformer_blocks.0"
    assert {input_group(f"{tb}.attn1.{p}") for p in ("to_q", "to_k", "to_v")} == {f"{tb}.attn1.qkv"}
    assert {input_group(f"{tb}.attn2.{p}") for p in ("to_k", "to_v")} == {f"{tb}.attn2.kv"}
    assert input_group(f"{tb}.attn2.to_q") == f"{tb}.attn2.q"
    assert input_group(f"{tb}.attn1.to_out.0") == f"{tb}.attn1.to_out.0"
    assert input_group(f"{tb}.attn2.to_out.0") == f"{tb}.attn2.to_out.0"
    layer = "text_model.encoder.layers.0.self_attn"
    assert {input_group(f"{layer}.{p}") for p in ("q_proj", "k_proj", "v_proj")} == {f"{layer}.qkv"}
    assert input_group(f"{layer}.out_proj") == f"{layer}.out_proj"
    assert input_group("text_model.encoder.layers.1.self_attn.q_proj") != input_group(f"{layer}.q_proj")


def test_gram_recorder_on_a_linear_layer():
    torch.manual_seed(0)
    linear = torch.nn.Linear(5, 3)
    batches = [torch.randn(2, 4, 5), torch.randn(7, 5)]
    recorder = GramRecorder({"lin": linear})
    for x in batches:
        linear(x)
    grams = recorder.close()
    rows = torch.cat([b.reshape(-1, 5) for b in batches]).double()
    assert set(grams) == {"lin"}
    assert recorder.rows["lin"] == 15
    assert torch.allclose(grams["lin"], rows.T @ rows, atol=1e-5)
    linear(torch.randn(3, 5))  # closed: hooks removed
    assert torch.allclose(recorder.grams["lin"].double(), rows.T @ rows, atol=1e-5)


def test_gram_recorder_on_unet_attention(model_dir):
    base = fresh(model_dir)
    block = "down_blocks.2.attentions.0.transformer_blocks.0"
    names = [f"{block}.attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")]
    modules = {n: base.unet.get_submodule(n) for n in names}
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: captured[n].append(args[0].detach().clone()))
               for n, m in modules.items()]
    from pipelines.layerwise import install_layerwise_attention

    install_layerwise_attention(base.unet)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 16 * 77, 32, generator=g)
    with torch.no_grad(), fusion.recording(modules) as recorder:
        base.unet(latents, 10, encoder_hidden_states=context)
        base.unet(latents, 500, encoder_hidden_states=context)
        grams = {k: v.double() for k, v in recorder.grams.items()}
    for h in handles:
        h.remove()

    assert set(grams) == {f"{block}.attn1.qkv", f"{block}.attn1.to_out.0", f"{block}.attn2.q",
                          f"{block}.attn2.kv", f"{block}.attn2.to_out.0"}
    for name in names:
        x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured[name]]).double()
        gram = grams[input_group(name)]
        assert torch.allclose(gram, x.T @ x, rtol=1e-4, atol=1e-3), name
    # the cross-attention K/V Gram is of the text (32 wide), its Q Gram of the image tokens (64 wide)
    assert grams[f"{block}.attn2.kv"].shape == (32, 32)
    assert grams[f"{block}.attn2.q"].shape == (64, 64)
    assert not torch.allclose(grams[f"{block}.attn2.q"], grams[f"{block}.attn1.qkv"])


# ---------------------------------------------------------------------------------------------
# fuse_concepts on the tiny model


def test_report_gradient_fusion_beats_weight_averaging(fused):
    result, _ = fused
    summary = result.report["summary"]
    assert set(summary) == set(NAMES)
    for name in NAMES:
        row = summary[name]
        assert row["weight_average_mean_relative_error"] > 0.05  # the deltas really differ
        assert row["mean_relative_error"] < row["weight_average_mean_relative_error"], (name, row)
        assert row["mean_relative_error"] < 0.5 * row["weight_average_mean_relative_error"], (name, row)
        assert row["max_relative_error"] >= row["mean_relative_error"]
    layers = result.report["layers"]
    assert len(layers) == 8 + 128  # 2 CLIP layers x q/k/v/out, 16 transformer blocks x attn1/attn2 x q/k/v/out
    # cross-attention K/V see 6 text rows per concept in 32 dimensions: both concepts fit (up to rcond)
    kv = [v for k, v in layers.items() if k.endswith(("attn2.to_k", "attn2.to_v"))]
    assert len(kv) == 32
    for row in kv:
        for name in NAMES:
            assert row["method"][name] < 1e-2
            assert row["weight"][name] > 0.1


def test_fused_folder_holds_only_changed_layers(fused, library):
    result, _ = fused
    folder = result.folder
    assert folder.parent == library.root / ".fused"
    for file in (FUSED_WEIGHTS, FUSED_RECORD, REPORT_FILE):
        assert (folder / file).is_file()
    tensors = load_file(folder / FUSED_WEIGHTS)  # updates, keyed as the weights they change
    odd = [k for k in tensors if not LORA_KEY.fullmatch(k)]
    assert not odd, odd[:5]
    assert not [k for k in tensors if re.search(r"(ff|conv|norm|proj_in|proj_out|bias|embed)", k)]
    lora_modules = {f"{prefix}.{m}" for prefix in ("text_encoder", "unet") for m in concept_deltas(library.weights("mochi"), prefix)}
    assert set(tensors) == lora_modules | {"concepts.mochi", "concepts.tama"}
    for name in NAMES:
        assert torch.equal(tensors[f"concepts.{name}"], library.weights(name)["embeddings"])
    record = json.loads((folder / FUSED_RECORD).read_text())
    assert record["concepts"] == NAMES and record["method"] == "gradient" and record["key"] == folder.name
    assert json.loads((folder / REPORT_FILE).read_text()) == json.loads(json.dumps(result.report))


def test_fused_base_holds_the_stored_weights(fused, model_dir):
    result, base = fused
    tensors = stored_weights(result.folder, model_dir)
    plain = fresh(model_dir)
    for key, tensor in tensors.items():
        if key.startswith("concepts."):
            continue
        prefix, module = key.split(".", 1)
        model, reference = (base.text_encoder, plain.text_encoder) if prefix == "text_encoder" else (base.unet, plain.unet)
        weight = layer_of(model, module).weight
        assert torch.equal(weight, tensor), key
        assert not torch.allclose(weight, layer_of(reference, module).weight), key
    # adapters are off: the fused base's output is the plain linear with the fused weight
    layer = base.unet.get_submodule(UNET_K)
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ tensors[f"unet.{UNET_K}"].T, atol=1e-5)
    assert known_concepts(base.text_encoder) == NAMES


def test_text_encoder_stage_matches_an_independent_computation(fused, model_dir, library):
    """Recompute one CLIP layer's fusion with a hand-made capture of Mix-of-Show's inputs: each
    concept's own model on "photo of a <c>" and "<c>", all 16 layer-wise variants, unpadded."""
    result, _ = fused
    base = fresh(model_dir)
    for name in NAMES:
        apply_concept(base, name, library.weights(name), lora_scale=1.0)
    module = base.text_encoder.get_submodule(text_module_name(base.text_encoder, TEXT_Q))
    rows: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda mod, args: rows.append(args[0].detach()[0]))
    grams = []
    with torch.no_grad():
        for name in NAMES:
            rows.clear()
            set_active_adapters(base.text_encoder, [name])
            for prompt in fusion_prompts(name):
                for layer in range(NUM_LAYERS):
                    ids = base.tokenizer(expand_prompt(prompt, layer, set(NAMES)), return_tensors="pt").input_ids
                    base.text_encoder(ids)
            x = torch.cat(rows).double()
            grams.append(x.T @ x)
    handle.remove()
    assert len(rows) == 2 * NUM_LAYERS
    w0 = layer_of(base.text_encoder, TEXT_Q).weight
    deltas = [d[TEXT_Q] for d in deltas_of(library, "text_encoder")]
    expected = fuse_layer(w0, deltas, grams)
    stored = stored_weights(result.folder, model_dir)[f"text_encoder.{TEXT_Q}"].double()
    # Compared where it matters, on the recorded inputs: the pipeline accumulates Grams in float32, and
    # directions seen with eigenvalues ~1e-5 of the largest amplify that rounding in W itself (~1e-3).
    assert relative_output_error(stored, expected, sum(grams)) < 1e-4
    assert torch.linalg.norm(stored - expected) / torch.linalg.norm(expected) < 1e-2
    w0_error = relative_output_error(w0, expected, sum(grams))
    assert w0_error > 0.1  # the fused layer is far from W0: the agreement above is not trivial


def test_cross_attention_kv_stage_matches_an_independent_computation(fused, model_dir, library):
    """Cross-attention K/V of layer l: the *fused* text encoder's outputs for the layer-l variant of
    both prompts, at the concept tokens and the end-of-text token (Mix-of-Show step 3)."""
    result, fused_base = fused  # its text encoder is the fused one, adapters off
    layer = [n for n, _ in cross_attention_layers(fused_base.unet)].index(UNET_K.rsplit(".", 1)[0])
    grams = []
    with torch.no_grad():
        for name in NAMES:
            concept_ids = set(fused_base.tokenizer.convert_tokens_to_ids(concept_tokens(name)))
            rows = []
            for prompt in fusion_prompts(name):
                ids = fused_base.tokenizer(expand_prompt(prompt, layer, set(NAMES)), return_tensors="pt").input_ids
                hidden = fused_base.text_encoder(ids)[0][0]
                keep = [i for i, t in enumerate(ids[0].tolist()) if t in concept_ids or t == fused_base.tokenizer.eos_token_id]
                assert len(keep) == 3  # <c-r_l>, <c-c_l>, end of text
                rows.append(hidden[keep])
            x = torch.cat(rows).double()
            grams.append(x.T @ x)
    w0 = layer_of(fresh(model_dir).unet, UNET_K).weight
    deltas = [d[UNET_K] for d in deltas_of(library, "unet")]
    expected = fuse_layer(w0, deltas, grams)
    stored = stored_weights(result.folder, model_dir)[f"unet.{UNET_K}"].double()
    assert relative_output_error(stored, expected, sum(grams)) < 1e-4
    assert relative_output_error(w0, expected, sum(grams)) > 0.1
    for delta, gram in zip(deltas, grams):  # 12 rows in 32 dimensions: each concept is reproduced
        assert relative_output_error(stored, w0.double() + delta, gram) < 1e-2


def test_unet_spatial_stage_matches_an_independent_computation(fused, model_dir, library):
    """Other UNet layers: one 20-step DPM-Solver++ sample per concept of "photo of a <c>" without CFG,
    fused text encoder and K/V, the concept's own LoRA on the spatial layers (Mix-of-Show step 4)."""
    from pipelines.layerwise import encode_layerwise
    from pipelines.sample import make_scheduler

    result, _ = fused
    stored = stored_weights(result.folder, model_dir)
    base = fresh(model_dir)
    w0 = {n: layer_of(base.unet, n).weight.detach().clone() for n in (UNET_OUT, UNET_Q2)}
    for name in NAMES:
        apply_concept(base, name, library.weights(name), lora_scale=1.0)
    set_active_adapters(base.text_encoder, [])
    with torch.no_grad():
        for key, tensor in stored.items():
            prefix, module = key.split(".", 1)
            if prefix == "text_encoder" or module.endswith(("attn2.to_k", "attn2.to_v")):
                layer_of(base.text_encoder if prefix == "text_encoder" else base.unet, module).weight.copy_(tensor)
    captured = {n: [] for n in w0}
    for n in w0:
        base.unet.get_submodule(n).register_forward_pre_hook(lambda mod, args, n=n: captured[n].append(args[0].detach().reshape(-1, args[0].shape[-1])))
    grams = {n: [] for n in w0}
    config = FusionConfig()
    for index, name in enumerate(NAMES):
        set_active_adapters(base.unet, [name])
        for layer_name, layer in lora_layers(base.unet).items():
            if layer_name.endswith(("attn2.to_k", "attn2.to_v")):
                layer.enable_adapters(False)  # K/V are fused already
        for n in w0:
            captured[n].clear()
        scheduler = make_scheduler("dpm++", base.scheduler_config)
        scheduler.set_timesteps(config.spatial_steps)
        with torch.no_grad():
            context = encode_layerwise(base.tokenizer, base.text_encoder, [f"photo of a <{name}>"])
            generator = torch.Generator("cpu").manual_seed(config.seed + index)
            latents = torch.randn((1, 4, 8, 8), generator=generator) * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                noise = base.unet(scheduler.scale_model_input(latents, t), t, encoder_hidden_states=context).sample
                latents = scheduler.step(noise, t, latents).prev_sample
        for n in w0:
            assert len(captured[n]) == config.spatial_steps
            x = torch.cat(captured[n]).double()
            grams[n].append(x.T @ x)
    for n in w0:
        deltas = [d[n] for d in deltas_of(library, "unet")]
        expected = fuse_layer(w0[n], deltas, grams[n])
        assert relative_output_error(stored[f"unet.{n}"].double(), expected, sum(grams[n])) < 1e-3, n
        assert relative_output_error(w0[n], expected, sum(grams[n])) > 0.1, n


def test_second_call_hits_the_cache(fused, model_dir, library, monkeypatch):
    result, _ = fused
    record_before = (result.folder / FUSED_RECORD).read_text()

    def no_solving(*args, **kwargs):
        raise AssertionError("fusion recomputed despite a cached result")

    monkeypatch.setattr(fusion, "_solve", no_solving)
    base = fresh(model_dir)
    again = fuse_concepts(base, library, NAMES, FusionConfig(rcond=1e-6))
    assert again.folder == result.folder
    assert (result.folder / FUSED_RECORD).read_text() == record_before
    stored = stored_weights(result.folder, model_dir)
    assert torch.equal(layer_of(base.unet, UNET_OUT).weight, stored[f"unet.{UNET_OUT}"])
    assert again.report["summary"] == json.loads(json.dumps(result.report["summary"]))
    # other settings are another fused model: not served from this cache
    with pytest.raises(AssertionError, match="recomputed"):
        fuse_concepts(fresh(model_dir), library, NAMES, FusionConfig(rcond=1e-5))


def test_concept_order_is_one_cached_model_with_the_same_weights(fused, model_dir, library, tmp_path):
    """[tama, mochi] (the studio lists boxes newest first) is the cached [mochi, tama]; fused afresh
    into another folder it stores exactly the same updates (each concept's sample seeded the same)."""
    result, _ = fused
    base = fresh(model_dir)
    config = FusionConfig(rcond=1e-6)
    assert fusion.cache_key(base, library, NAMES[::-1], config) == fusion.cache_key(base, library, NAMES, config)
    cached = sorted(p.name for p in (library.root / ".fused").iterdir())
    again = fuse_concepts(base, library, NAMES[::-1], config)
    assert again.folder == result.folder and again.concepts == NAMES
    assert sorted(p.name for p in (library.root / ".fused").iterdir()) == cached  # no second entry
    afresh = fuse_concepts(fresh(model_dir), library, NAMES[::-1], config, out_dir=tmp_path / "reversed")
    assert afresh.concepts == NAMES and afresh.report["concepts"] == NAMES
    stored, reversed_ = load_file(result.folder / FUSED_WEIGHTS), load_file(tmp_path / "reversed" / FUSED_WEIGHTS)
    assert stored.keys() == reversed_.keys()
    for key in stored:
        assert torch.equal(stored[key], reversed_[key]), key


def test_unknown_concept_in_the_cache_key_is_a_user_error(model_dir, library):
    """The studio computes the fused folder before fusing: a concept gone from the library is named, not a missing file."""
    with pytest.raises(UserError, match=r"unknown concept 'nobody' in library .* \(known: mochi, tama\)"):
        fusion.cache_key(fresh(model_dir), library, ["mochi", "nobody"], FusionConfig())


def test_load_fused_writes_exactly_the_stored_weights(fused, model_dir):
    result, _ = fused
    stored = stored_weights(result.folder, model_dir)
    plain = fresh(model_dir)
    base = fresh(model_dir)
    loaded = load_fused(base, result.folder)
    assert loaded.concepts == NAMES and loaded.method == "gradient"
    for key in (f"text_encoder.{TEXT_Q}", f"unet.{UNET_K}", f"unet.{UNET_OUT}"):
        prefix, module = key.split(".", 1)
        model = base.text_encoder if prefix == "text_encoder" else base.unet
        assert torch.equal(layer_of(model, module).weight, stored[key])
    # everything not stored is untouched
    changed = {k.split(".", 1)[1] + ".weight" for k in stored if k.startswith("unet.")}
    reference = dict(plain.unet.named_parameters())
    for name, param in base.unet.named_parameters():
        if name not in changed:
            assert torch.equal(param, reference[name]), name
    assert known_concepts(base.text_encoder) == NAMES
    table = base.text_encoder.get_input_embeddings()
    assert torch.equal(table.concept_vectors["tama"].detach(), stored["concepts.tama"])


def test_load_fused_refuses_other_folders(fused, model_dir, tmp_path):
    with pytest.raises(UserError, match="not a fused model folder"):
        load_fused(fresh(model_dir), tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(fused[0].folder, copy)
    record = json.loads((copy / FUSED_RECORD).read_text())
    record["fingerprint"] = "0123456789abcdef"
    (copy / FUSED_RECORD).write_text(json.dumps(record))
    with pytest.raises(UserError, match="architecture"):
        load_fused(fresh(model_dir), copy)


def test_cli_weight_method_is_w0_plus_mean_delta(fused, model_dir, library, tmp_path):
    out = tmp_path / "weight"
    assert main(["fuse", "--base", str(model_dir), "--library", str(library.root), "--concepts", "mochi,tama",
                 "--method", "weight", "--out", str(out), "--device", "cpu"]) == 0
    stored = stored_weights(out, model_dir)
    gradient = stored_weights(fused[0].folder, model_dir)
    plain = fresh(model_dir)
    for prefix, model, module in (("unet", plain.unet, UNET_K), ("unet", plain.unet, UNET_OUT), ("text_encoder", plain.text_encoder, TEXT_Q)):
        w0 = layer_of(model, module).weight.double()
        mean = sum(d[module] for d in deltas_of(library, prefix)) / 2
        assert torch.allclose(stored[f"{prefix}.{module}"].double(), w0 + mean, atol=1e-6)
        assert not torch.allclose(gradient[f"{prefix}.{module}"], stored[f"{prefix}.{module}"], atol=1e-3)
    record = json.loads((out / FUSED_RECORD).read_text())
    report = json.loads((out / REPORT_FILE).read_text())
    assert record["method"] == "weight" and report["method"] == "weight"
    for row in report["summary"].values():  # the method is weight averaging: both columns agree
        assert row["mean_relative_error"] == pytest.approx(row["weight_average_mean_relative_error"])


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.fixture
def other_base_library(library, tmp_path):
    """A copy of the library where <tama> says it was trained on another base model."""
    copy = ConceptLibrary(tmp_path / "mixed")
    for name in NAMES:
        shutil.copytree(library.path(name), copy.path(name))
    record = json.loads((copy.path("tama") / "concept.json").read_text())
    record["fingerprint"] = "fedcba9876543210"
    record["base_model"] = "some/other-model"
    (copy.path("tama") / "concept.json").write_text(json.dumps(record))
    return copy


def test_fuse_errors(model_dir, library, other_base_library):
    base = fresh(model_dir)  # every check fires before the base is touched
    with pytest.raises(UserError, match="unknown concept 'nope'"):
        fuse_concepts(base, library, ["mochi", "nope"])
    with pytest.raises(UserError, match="different base models"):
        fuse_concepts(base, other_base_library, NAMES)
    with pytest.raises(UserError, match="no concepts selected"):
        fuse_concepts(base, library, [])
    with pytest.raises(UserError, match="method"):
        fuse_concepts(base, library, NAMES, FusionConfig(method="average"))
    with pytest.raises(UserError, match="named twice"):
        fuse_concepts(base, library, ["mochi", "mochi"])
    with pytest.raises(UserError, match="trained on some/other-model"):
        fuse_concepts(base, other_base_library, ["tama"])
    assert not (other_base_library.root / ".fused").exists()


def test_cli_fuse_writes_report(fused, model_dir, library, tmp_path, capsys):
    report_path = tmp_path / "r.json"
    assert main(["fuse", "--base", str(model_dir), "--library", str(library.root), "--concepts", "mochi,tama",
                 "--report", str(report_path), "--device", "cpu"]) == 0
    report = json.loads(report_path.read_text())
    assert set(report["summary"]) == set(NAMES)
    assert report["method"] == "gradient" and report["concepts"] == NAMES
    assert "<mochi>" in capsys.readouterr().out


def test_cli_fuse_refuses_different_base_models(model_dir, other_base_library, tmp_path, capsys):
    code = main(["fuse", "--base", str(model_dir), "--library", str(other_base_library.root), "--concepts", "mochi,tama",
                 "--report", str(tmp_path / "r.json"), "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "different base models" in errors[0] and err.endswith(errors[0])
    assert not (tmp_path / "r.json").exists()
    assert main(["fuse", "--base", str(model_dir), "--library", str(other_base_library.root), "--concepts", "mochi,ghost",
                 "--device", "cpu"]) == 2


def test_fusion_solve_on_mps_runs_in_float64_on_the_cpu():
    """Apple's MPS has no float64: the solve must move to the CPU there. On this machine a tensor
    moved to "mps" raises, so `_solve` asked for MPS works only if it never goes there."""
    assert fusion.float64_device("mps") == torch.device("cpu")
    assert fusion.float64_device(torch.device("cpu")) == torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    w0 = {"layer": torch.randn(3, 4, generator=generator)}
    deltas = [{"layer": 0.1 * torch.randn(3, 4, generator=generator, dtype=torch.float64)} for _ in range(2)]
    grams = []
    for _ in range(2):
        x = torch.randn(8, 4, generator=generator, dtype=torch.float64)
        grams.append({fusion.input_group("layer"): x.T @ x})
    fused, report = fusion._solve(w0, deltas, grams, FusionConfig(), torch.device("mps"))
    expected = fuse_layer(w0["layer"].double(), [d["layer"] for d in deltas], [g[fusion.input_group("layer")] for g in grams],
                          rcond=FusionConfig().rcond)
    assert fused["layer"].device.type == "cpu" and fused["layer"].dtype == torch.float64
    assert torch.allclose(fused["layer"], expected)


# ---------------------------------------------------------------------------------------------
# Stored as float32 updates: fits any base of the architecture, survives half precision


@pytest.fixture(scope="module")
def other_weights_dir(tmp_path_factory):
    """A second base of the same architecture with other weights (as two SD1.5 fine-tunes are)."""
    return build_tiny_model(tmp_path_factory.mktemp("fusion-other-weights") / "tiny", seed=1)


def test_fused_model_on_another_base_adds_its_updates_with_a_note(fused, model_dir, other_weights_dir):
    """Fused weights W written into another fine-tune would replace its layers with the first
    base's; the stored updates W - W0 are added to the other base's own weights instead."""
    result, _ = fused
    updates = load_file(result.folder / FUSED_WEIGHTS)
    other = fresh(other_weights_dir)
    assert other.fingerprint == fresh(model_dir).fingerprint  # same architecture: the fingerprint cannot tell
    before = {k: layer_of(other.unet if k.startswith("unet.") else other.text_encoder, k.split(".", 1)[1]).weight.detach().clone()
              for k in updates if not k.startswith("concepts.")}
    made_on = stored_weights(result.folder, model_dir)
    loaded = load_fused(other, result.folder)
    for key, w0 in before.items():
        prefix, module = key.split(".", 1)
        weight = layer_of(other.unet if prefix == "unet" else other.text_encoder, module).weight
        assert torch.allclose(weight, w0 + updates[key], atol=1e-6), key
        assert not torch.allclose(weight, made_on[key], atol=1e-3), key  # not the first base's weights
    assert "applied to" in loaded.note and str(model_dir) in loaded.note
    assert load_fused(other, result.folder).note == loaded.note  # loading again neither re-adds nor forgets
    assert torch.allclose(layer_of(other.unet, UNET_K).weight, before[f"unet.{UNET_K}"] + updates[f"unet.{UNET_K}"], atol=1e-6)
    assert load_fused(fresh(model_dir), result.folder).note == ""  # on the base it was made on: no note
    on_bf16 = load_base(str(model_dir), device="cpu", dtype="bf16")  # the same base in another dtype is the same base
    assert load_fused(on_bf16, result.folder).note == ""


def test_fused_updates_survive_a_half_precision_base(model_dir, library, tmp_path):
    """Fusing on a bf16 base stores float32 updates (text-LoRA-sized changes vanish in bf16), and
    the text encoder, which holds the smallest updates, stays float32 and takes them exactly."""
    base = load_base(str(model_dir), device="cpu", dtype="bf16")
    result = fuse_concepts(base, library, NAMES, FusionConfig(method="weight"), out_dir=tmp_path / "bf16")
    updates = load_file(result.folder / FUSED_WEIGHTS)
    assert {v.dtype for v in updates.values()} == {torch.float32}
    mean = sum(d[TEXT_Q] for d in deltas_of(library, "text_encoder")) / 2
    assert torch.allclose(updates[f"text_encoder.{TEXT_Q}"].double(), mean, atol=1e-6)
    small = 1e-4 * mean / mean.abs().max()  # rescaled to a text-LoRA-sized change: kept to float32 precision
    fresh_bf16 = load_base(str(model_dir), device="cpu", dtype="bf16")
    before = layer_of(fresh_bf16.text_encoder, TEXT_Q).weight.detach().double()
    fusion._apply_updates(fresh_bf16.text_encoder, {text_module_name(fresh_bf16.text_encoder, TEXT_Q): small.float()})
    kept = layer_of(fresh_bf16.text_encoder, TEXT_Q).weight.double() - before
    assert float((kept - small).norm() / small.norm()) < 1e-3


def test_older_format_and_other_architectures_are_refused_and_not_listed(fused, model_dir, library, tmp_path):
    from pipelines.fusion import list_fused

    result, _ = fused
    base = fresh(model_dir)
    listed = [r["folder"] for r in list_fused(library, base)]  # this and whatever other tests fused
    assert str(result.folder) in listed
    old = library.root / ".fused" / "old-format"
    shutil.copytree(result.folder, old)
    record = json.loads((old / FUSED_RECORD).read_text())
    (old / FUSED_RECORD).write_text(json.dumps({**record, "format": "menagerie-fused-v1"}))
    foreign = library.root / ".fused" / "foreign"
    shutil.copytree(result.folder, foreign)
    (foreign / FUSED_RECORD).write_text(json.dumps({**record, "fingerprint": "0123456789abcdef"}))
    broken = library.root / ".fused" / "broken"
    shutil.copytree(result.folder, broken)
    (broken / FUSED_RECORD).write_text("{not json")
    try:
        assert [r["folder"] for r in list_fused(library, base)] == listed
        assert len(list_fused(library)) == len(listed) + 2  # without a base: every readable record
        with pytest.raises(UserError, match="older Menagerie") as error:
            load_fused(base, old)
        assert "mochi, tama" in str(error.value) and "\n" not in str(error.value)
        with pytest.raises(UserError, match="cannot be read"):
            load_fused(base, broken)
        assert base.fused is None
    finally:
        for folder in (old, foreign, broken):
            shutil.rmtree(folder)


# ---------------------------------------------------------------------------------------------
# The report flags layers far above their peers


def test_outlier_layers_flags_only_layers_far_above_their_kind():
    from pipelines.fusion import layer_kind, outlier_layers

    assert layer_kind("text_encoder.text_model.encoder.layers.0.self_attn.q_proj") == "text encoder"
    assert layer_kind(f"unet.{UNET_K}") == "UNet K/V"
    assert layer_kind(f"unet.{UNET_OUT}") == "UNet"
    errors = {f"text_encoder.layers.{i}.q_proj": [0.002, 0.003] for i in range(8)}
    errors.update({f"unet.down.{i}.attn2.to_k": [0.06, 0.07] for i in range(8)})  # K/V: higher, but all of them
    errors.update({f"unet.down.{i}.attn1.to_q": [0.02, 0.02] for i in range(8)})
    assert outlier_layers(errors, ["a", "b"]) == []  # healthy: 3x between kinds is not an outlier
    errors["unet.down.3.attn1.to_q"] = [0.02, 0.5]  # 25x its peers for concept b
    errors["text_encoder.layers.5.q_proj"] = [0.04, 0.003]  # 20x its peers, but under the floor
    errors["unet.down.2.attn2.to_k"] = [0.3, 0.07]  # 5x its K/V peers: not flagged
    flagged = outlier_layers(errors, ["a", "b"])
    assert [(r["layer"], r["concept"]) for r in flagged] == [("unet.down.3.attn1.to_q", "b")]
    assert flagged[0]["relative_error"] == 0.5 and flagged[0]["median_of_kind"] == pytest.approx(0.02)
    assert outlier_layers(errors, ["a", "b"], floor=0.01)[-1]["layer"] == "text_encoder.layers.5.q_proj"


def test_fusion_report_lists_outliers_and_cli_takes_rcond(fused, model_dir, library, tmp_path, capsys):
    result, _ = fused
    assert result.report["outliers"] == fusion.outlier_layers(
        {k: [v["method"][n] for n in NAMES] for k, v in result.report["layers"].items()}, NAMES)
    assert main(["fuse", "--base", str(model_dir), "--library", str(library.root), "--concepts", "mochi,tama",
                 "--rcond", "2", "--device", "cpu"]) == 2
    assert "--rcond 2.0 is out of range" in capsys.readouterr().err
    out = tmp_path / "rcond"
    assert main(["fuse", "--base", str(model_dir), "--library", str(library.root), "--concepts", "mochi,tama",
                 "--rcond", "1e-2", "--method", "gradient", "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads((out / FUSED_RECORD).read_text())["config"]["rcond"] == 1e-2
