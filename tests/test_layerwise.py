"""pipelines.layerwise: concept tokens, layer-wise prompt encoding, layer l reads copy l."""

from __future__ import annotations

import pytest
import torch

import pipelines.layerwise as layerwise
from pipelines.errors import UserError
from pipelines.layerwise import (
    NUM_LAYERS,
    LayerwiseAttnProcessor,
    add_concept_tokens,
    concept_tokens,
    concepts_in,
    cross_attention_layers,
    encode_layerwise,
    expand_prompt,
    install_layerwise_attention,
    known_concepts,
    select_layer,
)

SEQ = 77


def distinct_vectors(seed: int = 0, dim: int = 32) -> torch.Tensor:
    """[2, 16, d] concept vectors, every layer different, at the scale of CLIP's token table."""
    return torch.randn(2, NUM_LAYERS, dim, generator=torch.Generator().manual_seed(seed)) * 0.5


# ---------------------------------------------------------------------------------------------
# Pure functions


def test_concept_tokens_are_word_major():
    tokens = concept_tokens("mochi")
    assert len(tokens) == 32
    assert tokens[:3] == ["<mochi-r0>", "<mochi-r1>", "<mochi-r2>"]
    assert tokens[15] == "<mochi-r15>" and tokens[16] == "<mochi-c0>" and tokens[31] == "<mochi-c15>"


def test_concepts_in_keeps_first_appearance_order():
    assert concepts_in("<tama> and <mochi> with <tama>") == ["tama", "mochi"]
    assert concepts_in("a photo of a dog, <not a concept>") == []
    assert concepts_in("a photo of a dog, <NotAConcept>") == ["notaconcept"]  # a name, if an unknown one


def test_expand_prompt_replaces_each_concept_by_its_layer_tokens():
    assert expand_prompt("a <mochi> on a <tama>", 7, {"mochi", "tama"}) == "a <mochi-r7> <mochi-c7> on a <tama-r7> <tama-c7>"
    with pytest.raises(UserError, match=r"unknown concept <ghost> in prompt 'a <ghost>'; known: mochi"):
        expand_prompt("a <ghost>", 0, {"mochi"})


def test_select_layer_takes_the_layer_slice():
    states = torch.arange(2 * NUM_LAYERS * 3 * 1, dtype=torch.float32).view(2, NUM_LAYERS * 3, 1)
    assert torch.equal(select_layer(states, 5), states[:, 15:18])
    with pytest.raises(ValueError, match="divisible by 16"):
        select_layer(torch.zeros(1, 77, 4), 0)


# ---------------------------------------------------------------------------------------------
# The token table


def test_concept_token_ids_map_to_their_vectors(base):
    """Token <name-wL> reads vectors[w, L]; the base vocabulary is untouched."""
    vectors = distinct_vectors()
    base_rows = base.text_encoder.get_input_embeddings().weight.detach().clone()
    add_concept_tokens(base.tokenizer, base.text_encoder, "mochi", vectors)
    add_concept_tokens(base.tokenizer, base.text_encoder, "tama", distinct_vectors(1))
    assert known_concepts(base.text_encoder) == ["mochi", "tama"]
    table = base.text_encoder.get_input_embeddings()
    ids = torch.tensor([base.tokenizer.convert_tokens_to_ids(["<mochi-r3>", "<mochi-c3>", "<tama-c15>", "dog</w>"])])
    assert ids[0, :3].tolist() == [49408 + 3, 49408 + 16 + 3, 49408 + 32 + 31]
    out = table(ids)[0]
    assert torch.equal(out[0], vectors[0, 3])
    assert torch.equal(out[1], vectors[1, 3])
    assert torch.equal(out[2], distinct_vectors(1)[1, 15])
    assert torch.equal(out[3], base_rows[1929])
    assert torch.equal(table.weight, base_rows)


def test_add_concept_tokens_checks_shape_and_replaces_in_place(base):
    with pytest.raises(UserError, match=r"shape \(2, 16, 16\), this base needs \(2, 16, 32\)"):
        add_concept_tokens(base.tokenizer, base.text_encoder, "mochi", torch.zeros(2, 16, 16))
    add_concept_tokens(base.tokenizer, base.text_encoder, "mochi", distinct_vectors(0))
    add_concept_tokens(base.tokenizer, base.text_encoder, "mochi", distinct_vectors(2))  # same name again
    assert len(base.tokenizer) == 49408 + 32  # ids are kept, not added twice
    table = base.text_encoder.get_input_embeddings()
    assert torch.equal(table.concept_vectors["mochi"], distinct_vectors(2))


# ---------------------------------------------------------------------------------------------
# Encoding


def test_prompt_without_concept_gives_16_identical_copies(base):
    """No concept: one ordinary CLIP encoding repeated for all layers."""
    context = encode_layerwise(base.tokenizer, base.text_encoder, ["a photo of a dog", "a cat"])
    assert context.shape == (2, NUM_LAYERS * SEQ, 32)
    copies = context.view(2, NUM_LAYERS, SEQ, 32)
    ids = base.tokenizer(["a photo of a dog"], padding="max_length", max_length=SEQ, return_tensors="pt").input_ids
    plain = base.text_encoder(ids)[0][0]
    for layer in range(NUM_LAYERS):
        assert torch.equal(copies[0, layer], plain)
    assert not torch.allclose(copies[0, 0], copies[1, 0])


def test_prompt_with_concept_gives_16_different_copies(base):
    """A concept with 16 different layer vectors gives 16 different encodings."""
    add_concept_tokens(base.tokenizer, base.text_encoder, "mochi", distinct_vectors())
    context = encode_layerwise(base.tokenizer, base.text_encoder, ["a photo of <mochi>"])
    copies = context.view(NUM_LAYERS, SEQ, 32)
    for i in range(NUM_LAYERS):
        for j in range(i + 1, NUM_LAYERS):
            assert not torch.allclose(copies[i], copies[j], atol=1e-4), (i, j)
    # tokens before the concept ("<bos> a photo of") see no concept under CLIP's causal mask
    assert torch.allclose(copies[0, :4], copies[9, :4], atol=1e-6)


def test_copy_l_is_the_prompt_with_layer_l_vectors(fresh_base):
    """Copy 5 equals encoding the prompt with a concept whose every layer holds layer 5's vectors."""
    vectors = distinct_vectors()
    layered = fresh_base()
    add_concept_tokens(layered.tokenizer, layered.text_encoder, "mochi", vectors)
    copy5 = encode_layerwise(layered.tokenizer, layered.text_encoder, ["a photo of <mochi> on grass"]).view(NUM_LAYERS, SEQ, 32)[5]

    flat = fresh_base()
    add_concept_tokens(flat.tokenizer, flat.text_encoder, "mochi", vectors[:, 5:6].expand(-1, NUM_LAYERS, -1))
    flat_copies = encode_layerwise(flat.tokenizer, flat.text_encoder, ["a photo of <mochi> on grass"]).view(NUM_LAYERS, SEQ, 32)
    for layer in range(NUM_LAYERS):
        assert torch.allclose(flat_copies[layer], copy5, atol=1e-6)


def test_unknown_concept_in_prompt_is_a_user_error(base):
    add_concept_tokens(base.tokenizer, base.text_encoder, "mochi", distinct_vectors())
    with pytest.raises(UserError, match=r"unknown concept <tama>.*known: mochi"):
        encode_layerwise(base.tokenizer, base.text_encoder, ["<mochi> and <tama>"])


def test_a_concept_written_with_capitals_is_the_same_concept(base):
    """`<Mochi>` used to pass as plain text (a silent miss); it resolves to <mochi>."""
    add_concept_tokens(base.tokenizer, base.text_encoder, "mochi", distinct_vectors())
    assert concepts_in("<Mochi> and <MOCHI> on <mochi>'s mat") == ["mochi"]
    assert expand_prompt("a <Mochi>", 3, {"mochi"}) == "a <mochi-r3> <mochi-c3>"
    upper = encode_layerwise(base.tokenizer, base.text_encoder, ["a photo of <Mochi>"])
    lower = encode_layerwise(base.tokenizer, base.text_encoder, ["a photo of <mochi>"])
    assert torch.equal(upper, lower)
    with pytest.raises(UserError, match=r"unknown concept <tama>"):
        encode_layerwise(base.tokenizer, base.text_encoder, ["<Tama>"])


def test_a_concept_past_clips_77_tokens_is_an_error_and_plain_words_a_warning(base):
    """CLIP reads 75 tokens between start and end of text; the rest used to be cut off silently."""
    add_concept_tokens(base.tokenizer, base.text_encoder, "mochi", distinct_vectors())
    filler = " ".join(["grass"] * 74)
    with pytest.raises(UserError, match=r"<mochi> would be cut off") as error:
        encode_layerwise(base.tokenizer, base.text_encoder, [f"{filler} <mochi>"])  # the concept's tokens are 75 and 76
    assert "\n" not in str(error.value)
    with pytest.warns(layerwise.PromptTooLong, match=r"ignored: 'sky sky'"):
        context = encode_layerwise(base.tokenizer, base.text_encoder, [f"<mochi> {' '.join(['grass'] * 73)} sky sky"])
    assert context.shape == (1, NUM_LAYERS * SEQ, 32)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 73 words + the concept's 2 tokens = 75: fits, no warning
        encode_layerwise(base.tokenizer, base.text_encoder, [f"<mochi> {' '.join(['grass'] * 73)}"])


# ---------------------------------------------------------------------------------------------
# Attention: layer l reads copy l


def unet_inputs(base, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    return latents, torch.tensor([500])


def test_processors_installed_in_order_on_cross_attention_only(base):
    install_layerwise_attention(base.unet)
    layers = cross_attention_layers(base.unet)
    for index, (name, module) in enumerate(layers):
        assert isinstance(module.processor, LayerwiseAttnProcessor)
        assert module.processor.layer == index, name
    self_attention = [m for n, m in base.unet.named_modules() if n.endswith("attn1")]
    assert len(self_attention) == 16
    assert not any(isinstance(m.processor, LayerwiseAttnProcessor) for m in self_attention)


def test_each_cross_attention_layer_receives_its_own_copy(base, monkeypatch):
    """Fill copy l with the value l; every attn2 module l must attend to a context of all l's."""
    install_layerwise_attention(base.unet)
    seen: list[tuple[int, set]] = []
    real_select = layerwise.select_layer

    def spy(states, layer):
        context = real_select(states, layer)
        seen.append((layer, set(context.unique().tolist())))
        return context

    monkeypatch.setattr(layerwise, "select_layer", spy)
    context = torch.arange(NUM_LAYERS, dtype=torch.float32).repeat_interleave(SEQ)[None, :, None].expand(1, -1, 32)
    latents, t = unet_inputs(base)
    with torch.no_grad():
        base.unet(latents, t, encoder_hidden_states=context.contiguous())
    # the UNet runs its cross-attention layers in ED-LoRA's order, each once
    assert [layer for layer, _ in seen] == list(range(NUM_LAYERS))
    for layer, values in seen:
        assert values == {float(layer)}


def test_perturbing_layer_5_vectors_changes_only_layer_5_onwards(fresh_base):
    """Changing only a concept's layer-5 vectors changes copy 5 only; the first attn2 output that
    changes is layer 5's (layers 0-4 run before it and see identical inputs), and the UNet output changes."""
    prompt = ["a photo of <mochi>"]
    vectors = distinct_vectors()
    bumped = vectors.clone()
    bumped[:, 5] = distinct_vectors(seed=7)[:, 5]  # (a constant shift would vanish in CLIP's LayerNorms)

    def run(concept_vectors):
        base = fresh_base()
        add_concept_tokens(base.tokenizer, base.text_encoder, "mochi", concept_vectors)
        install_layerwise_attention(base.unet)
        outputs = {}

        def record(index):
            def hook(module, args, output):
                outputs[index] = output.detach().clone()
            return hook

        hooks = [module.register_forward_hook(record(index)) for index, (_, module) in enumerate(cross_attention_layers(base.unet))]
        with torch.no_grad():
            context = encode_layerwise(base.tokenizer, base.text_encoder, prompt)
            latents, t = unet_inputs(base)
            sample = base.unet(latents, t, encoder_hidden_states=context).sample
        for hook in hooks:
            hook.remove()
        return context.view(NUM_LAYERS, SEQ, 32), outputs, sample

    context_a, attn_a, sample_a = run(vectors)
    context_b, attn_b, sample_b = run(bumped)
    changed_copies = [layer for layer in range(NUM_LAYERS) if not torch.equal(context_a[layer], context_b[layer])]
    assert changed_copies == [5]
    changed_layers = [layer for layer in range(NUM_LAYERS) if not torch.allclose(attn_a[layer], attn_b[layer], atol=1e-6)]
    assert changed_layers[0] == 5
    assert all(torch.equal(attn_a[layer], attn_b[layer]) for layer in range(5))
    assert (sample_a - sample_b).abs().max() > 1e-4


def test_layerwise_context_equals_feeding_each_layer_its_own_prompt(base):
    """With concept-free prompts P_l in copy l, cross-attention l's output equals a plain (non
    layer-wise) run of that attention module on P_l."""
    prompts = [f"a photo of {word}" for word in ("a dog", "a cat", "a bird", "the sea")] * 4
    ids = base.tokenizer(prompts, padding="max_length", max_length=SEQ, return_tensors="pt").input_ids
    with torch.no_grad():
        per_layer = base.text_encoder(ids)[0]  # [16, 77, d]
    context = per_layer.reshape(1, NUM_LAYERS * SEQ, 32)
    install_layerwise_attention(base.unet)
    inputs, outputs = {}, {}
    layers = cross_attention_layers(base.unet)

    def record(index):
        def hook(module, args, kwargs, output):
            inputs[index] = args[0] if args else kwargs["hidden_states"]
            outputs[index] = output
        return hook

    hooks = [module.register_forward_hook(record(index), with_kwargs=True) for index, (_, module) in enumerate(layers)]
    latents, t = unet_inputs(base)
    with torch.no_grad():
        base.unet(latents, t, encoder_hidden_states=context)
    for hook in hooks:
        hook.remove()
    from diffusers.models.attention_processor import AttnProcessor2_0

    for index, (_, module) in enumerate(layers):
        module.set_processor(AttnProcessor2_0())
        with torch.no_grad():
            plain = module(inputs[index], encoder_hidden_states=per_layer[index][None])
            wrong = module(inputs[index], encoder_hidden_states=per_layer[(index + 1) % NUM_LAYERS][None])
        assert torch.allclose(plain, outputs[index], atol=1e-6), index
        assert not torch.allclose(wrong, outputs[index], atol=1e-4), index
