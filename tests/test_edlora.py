"""pipelines.edlora: which layers get LoRA, rank/scale, concept tensors, applying a concept."""

from __future__ import annotations

import re

import pytest
import torch

from pipelines.edlora import (
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    add_lora,
    apply_concept,
    check_concept_tensors,
    concept_state_dict,
    lora_config,
    lora_layers,
    lora_parameters,
    set_active_adapters,
)
from pipelines.errors import UserError
from pipelines.layerwise import encode_layerwise, install_layerwise_attention
from pipelines.train import train_concept

from conftest import procedural_photo, quick_config

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module")
def trained_base(tiny_dir):
    """A base that trained concept 'mochi' for 2 steps (inspected, never mutated, by these tests)."""
    from pipelines.base import load_base

    base = load_base(str(tiny_dir), device="cpu")
    result = train_concept(base, [procedural_photo(0)], quick_config(steps=2, lr_text_lora=1e-3))
    return base, result


def expected_unet_lora_names(unet) -> set[str]:
    """attn1/attn2 q/k/v/out of every transformer block, found without the code under test."""
    blocks = [n for n, _ in unet.named_modules() if re.fullmatch(r".*transformer_blocks\.\d+", n)]
    assert len(blocks) == 16
    return {f"{block}.{attn}.{proj}" for block in blocks for attn in ("attn1", "attn2") for proj in PROJECTIONS}


def fixed_unet_output(base, prompt="a photo of <mochi>"):
    install_layerwise_attention(base.unet)
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        context = encode_layerwise(base.tokenizer, base.text_encoder, [prompt])
        return base.unet(latents, torch.tensor([300]), encoder_hidden_states=context).sample


# ---------------------------------------------------------------------------------------------
# Where LoRA goes


def test_unet_lora_is_exactly_attn1_attn2_qkvo_of_16_blocks(trained_base, fresh_base):
    base, _ = trained_base
    names = set(lora_layers(base.unet))
    assert len(names) == 128
    assert names == expected_unet_lora_names(fresh_base().unet)
    assert not any(part in name for name in names for part in ("ff.", "proj_in", "proj_out", "conv", "time_emb"))


def test_text_encoder_lora_is_exactly_qkvo_of_each_clip_layer(trained_base):
    base, _ = trained_base
    layers = base.text_encoder.config.num_hidden_layers
    expected = {f"encoder.layers.{i}.self_attn.{p}" for i in range(layers) for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    names = {n.removeprefix("text_model.") for n in lora_layers(base.text_encoder)}  # transformers 4.x's extra level
    assert len(names) == 4 * layers == 8
    assert names == expected
    assert not any("fc1" in n or "fc2" in n for n in names)


def test_lora_rank_4_scale_1(trained_base):
    base, _ = trained_base
    for model in (base.unet, base.text_encoder):
        for name, layer in lora_layers(model).items():
            assert layer.r["mochi"] == 4, name
            assert layer.scaling["mochi"] == 1.0, name
            assert layer.lora_A["mochi"].weight.shape == (4, layer.in_features)
            assert layer.lora_B["mochi"].weight.shape == (layer.out_features, 4)
            assert isinstance(layer.lora_dropout["mochi"], torch.nn.Identity)


def test_concept_tensors_hold_embeddings_and_every_lora(trained_base):
    _, result = trained_base
    tensors = result.tensors
    assert tensors["embeddings"].shape == (2, 16, 32)
    unet = [k for k in tensors if k.startswith("unet.")]
    text = [k for k in tensors if k.startswith("text_encoder.")]
    assert len(unet) == 256 and len(text) == 16 and len(tensors) == 273
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in tensors
    assert "text_encoder.encoder.layers.1.self_attn.out_proj.lora_B.weight" in tensors
    for key, value in tensors.items():
        assert value.dtype == torch.float32 and value.device.type == "cpu" and value.is_contiguous(), key
    # B starts at zero (peft/Mix-of-Show init) and moved in training; A is a random Kaiming init
    assert all(tensors[k].abs().sum() > 0 for k in unet + text)
    check_concept_tensors(tensors)


def test_fresh_lora_leaves_the_base_output_unchanged(base):
    """B = 0 at init, so adding adapters is a no-op until training (step 0 equals the base)."""
    before = fixed_unet_output(base, "a photo of a dog")
    add_lora(base.unet, "x", UNET_TARGETS)
    add_lora(base.text_encoder, "x", TEXT_ENCODER_TARGETS)
    assert len(lora_parameters(base.unet, "x")) == 256
    assert torch.equal(fixed_unet_output(base, "a photo of a dog"), before)


def test_lora_rank_must_be_positive():
    with pytest.raises(UserError, match="rank must be a positive integer, got 0"):
        lora_config(UNET_TARGETS, rank=0)


# ---------------------------------------------------------------------------------------------
# Applying a concept


def test_apply_concept_reproduces_the_trained_model(trained_base, fresh_base):
    """A fresh base + apply_concept(scale 1.0) gives the trained base's exact tensors and outputs."""
    trained, result = trained_base
    base = fresh_base()
    apply_concept(base, "mochi", result.tensors, lora_scale=1.0)
    vectors = base.text_encoder.get_input_embeddings().concept_vectors["mochi"]
    reloaded = concept_state_dict(base, "mochi", vectors)
    assert reloaded.keys() == result.tensors.keys()
    for key in reloaded:
        assert torch.equal(reloaded[key], result.tensors[key]), key
    assert all(not p.requires_grad for p in lora_parameters(base.unet, "mochi"))
    assert torch.allclose(fixed_unet_output(base), fixed_unet_output(trained), atol=1e-6)


def test_lora_scale_multiplies_only_lora_b(trained_base, base):
    _, result = trained_base
    apply_concept(base, "mochi", result.tensors, lora_scale=0.5)
    vectors = base.text_encoder.get_input_embeddings().concept_vectors["mochi"]
    loaded = concept_state_dict(base, "mochi", vectors)
    for key, value in result.tensors.items():
        expected = value * 0.5 if ".lora_B." in key else value
        assert torch.allclose(loaded[key], expected, atol=1e-7), key


def test_set_active_adapters_switches_concepts_off_and_on(trained_base, base):
    _, result = trained_base
    plain = fixed_unet_output(base, "a photo of a dog")
    apply_concept(base, "mochi", result.tensors, lora_scale=1.0)
    with_lora = fixed_unet_output(base, "a photo of a dog")
    assert not torch.allclose(with_lora, plain, atol=1e-6)
    for model in (base.unet, base.text_encoder):
        set_active_adapters(model, [])
    assert torch.allclose(fixed_unet_output(base, "a photo of a dog"), plain, atol=1e-6)
    for model in (base.unet, base.text_encoder):
        set_active_adapters(model, ["mochi"])
    assert torch.allclose(fixed_unet_output(base, "a photo of a dog"), with_lora, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Checking tensors


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.pop("embeddings"), "no 'embeddings' tensor"),
        (lambda t: t.__setitem__("embeddings", torch.zeros(2, 8, 32)), r"shape \(2, 8, 32\); expected \[2, 16, d\]"),
        (lambda t: t.__setitem__("embeddings", torch.zeros(2, 16, 32, dtype=torch.int64)), "'embeddings' has dtype torch.int64"),
        (lambda t: t["embeddings"].__setitem__((0, 0, 0), float("nan")), "'embeddings' contains NaN"),
        (lambda t: t.__setitem__("vae.decoder.lora_A.weight", torch.zeros(4, 4)), "unexpected tensors, e.g. 'vae.decoder"),
        (lambda t: [t.pop(k) for k in list(t) if k.startswith("unet.")], "lacks its text-encoder or UNet LoRA"),
        (lambda t: t.__setitem__("unet.x.lora_A.weight", torch.zeros(8, 64)), r"inconsistent ranks \[4, 8\]"),
    ],
)
def test_check_concept_tensors_refuses_bad_files(fake_tensors, mutate, message):
    tensors = fake_tensors()
    mutate(tensors)
    with pytest.raises(UserError, match=message):
        check_concept_tensors(tensors)


def test_check_concept_tensors_against_a_base_names_the_bad_tensor(fake_tensors, base):
    check_concept_tensors(fake_tensors(), base)  # the fake tensors fit the tiny model
    tensors = fake_tensors()
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_q.lora_A.weight"
    tensors[key] = torch.zeros(4, 65)
    with pytest.raises(UserError, match=re.escape(f"concept tensor {key} has shape (4, 65); this base needs (4, 64)")):
        check_concept_tensors(tensors, base)
    tensors = fake_tensors()
    tensors["unet.no_such_block.to_q.lora_A.weight"] = torch.zeros(4, 64)
    with pytest.raises(UserError, match="names a layer this base model does not have"):
        check_concept_tensors(tensors, base)
    with pytest.raises(UserError, match="concept embeddings are 48-d; this base's text encoder uses 32-d"):
        check_concept_tensors(fake_tensors(dim=48), base)


def test_merged_adapter_matches_unmerged_lora_and_restores_weights_exactly(trained_base, base):
    """Folding the UNet LoRA into the weights gives the unmerged output; the originals come back bit for bit."""
    from pipelines.edlora import lora_layers, merged_adapter

    _, result = trained_base
    tensors = {k: (torch.randn_like(v) * 0.2 if ".lora_B." in k else v) for k, v in result.tensors.items()}  # a visible delta
    apply_concept(base, "mochi", tensors, lora_scale=1.0)
    set_active_adapters(base.unet, ["mochi"])
    unmerged = fixed_unet_output(base, "a photo of a dog")
    originals = {name: layer.get_base_layer().weight.clone() for name, layer in lora_layers(base.unet).items()}
    with merged_adapter(base.unet, "mochi"):
        merged = fixed_unet_output(base, "a photo of a dog")
        changed = [n for n, layer in lora_layers(base.unet).items() if not torch.equal(layer.get_base_layer().weight, originals[n])]
    assert torch.allclose(merged, unmerged, atol=1e-5)
    assert len(changed) == 128  # every UNet LoRA layer was folded
    for name, layer in lora_layers(base.unet).items():
        assert torch.equal(layer.get_base_layer().weight, originals[name]), name
    set_active_adapters(base.unet, [])
    assert not torch.allclose(fixed_unet_output(base, "a photo of a dog"), unmerged, atol=1e-4)


def test_unwrapped_merge_runs_without_peft_wrappers_and_puts_them_back(trained_base, base):
    """With `unwrap`, the UNet runs plain linears holding the folded weights: the same output, no
    LoRA wrapper inside while it runs, and afterwards every wrapper and weight is back."""
    from pipelines.edlora import lora_layers, merged_adapter

    _, result = trained_base
    tensors = {k: (torch.randn_like(v) * 0.2 if ".lora_B." in k else v) for k, v in result.tensors.items()}
    apply_concept(base, "mochi", tensors, lora_scale=1.0)
    layers_before = lora_layers(base.unet)
    originals = {name: layer.get_base_layer().weight.clone() for name, layer in layers_before.items()}
    with merged_adapter(base.unet, "mochi"):
        wrapped = fixed_unet_output(base, "a photo of a dog")
    with merged_adapter(base.unet, "mochi", unwrap=True):
        assert lora_layers(base.unet) == {}  # plain linears only
        unwrapped = fixed_unet_output(base, "a photo of a dog")
    assert torch.equal(unwrapped, wrapped)
    assert lora_layers(base.unet) == layers_before  # the same wrapper objects, in the same places
    for name, layer in lora_layers(base.unet).items():
        assert torch.equal(layer.get_base_layer().weight, originals[name]), name


def test_concept_files_name_text_layers_the_same_under_transformers_4_and_5(fresh_base):
    """transformers 5 dropped CLIPTextModel's `text_model.` level; a concept file written under one
    version must load under the other (and its architecture fingerprint must not change)."""
    from pipelines.base import architecture_fingerprint
    from pipelines.edlora import canonical_keys, keys_for_model

    file_keys = {"embeddings": torch.zeros(1), "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(1),
                 "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(1)}
    legacy = {k.replace("text_encoder.", "text_encoder.text_model.", 1): v for k, v in file_keys.items()}
    assert canonical_keys(legacy).keys() == file_keys.keys() == canonical_keys(file_keys).keys()

    class Legacy(torch.nn.Module):  # the 4.x layout: the same model one level down
        def __init__(self, inner):
            super().__init__()
            self.text_model = inner

    base = fresh_base()
    flat = getattr(base.text_encoder, "text_model", base.text_encoder)  # the 5.x layout (4.x: its inner transformer)
    wrapped = Legacy(flat)
    assert keys_for_model(legacy, flat).keys() == file_keys.keys()  # a 5.x model: file naming
    assert keys_for_model(file_keys, wrapped).keys() == legacy.keys()
    assert architecture_fingerprint(base.unet, wrapped) == architecture_fingerprint(base.unet, flat)
