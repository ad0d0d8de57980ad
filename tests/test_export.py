"""Export for A1111/ComfyUI (pipelines.export): kohya key names, the collapsed embedding, the files,
and a round trip through diffusers' own loaders on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipelines.__main__ import main
from pipelines.concept import Concept, ConceptLibrary
from pipelines.edlora import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_lora, concept_state_dict, lora_parameters, remove_lora
from pipelines.errors import UserError
from pipelines.export import (distilled_vectors, export_for_webui, key_value_objective, kohya_lora_state_dict, save_a1111_embedding,
                              textual_inversion_vectors)
from pipelines.layerwise import encode_layerwise
from pipelines.sample import SampleConfig, generate, initial_latents, make_scheduler
from conftest import fake_concept_tensors, one_line_error

# ---------------------------------------------------------------------------------------------
# Key names (pure)


def test_kohya_names_alpha_and_delta():
    tensors = fake_concept_tensors(dim=32, rank=4)
    kohya = kohya_lora_state_dict(tensors)
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    unet = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_q"
    assert set(kohya) == {f"{m}.{s}" for m in (te, unet) for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    for module, peft in ((te, "text_encoder.encoder.layers.0.self_attn.q_proj"),
                         (unet, "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_q")):
        assert kohya[f"{module}.alpha"].item() == 4.0 and kohya[f"{module}.alpha"].dtype == torch.float32
        # strength 1.0 in every tool: up @ down * alpha / rank == B @ A, ED-LoRA's delta at scale 1.0
        delta = kohya[f"{module}.lora_up.weight"] @ kohya[f"{module}.lora_down.weight"] * kohya[f"{module}.alpha"] / 4
        assert torch.equal(delta, tensors[f"{peft}.lora_B.weight"] @ tensors[f"{peft}.lora_A.weight"])


def test_kohya_names_of_real_modules_and_transformers4_naming():
    tensors = fake_concept_tensors(dim=32, rank=4)
    tensors["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight"] = torch.ones(4, 32)
    tensors["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight"] = torch.ones(32, 4)
    kohya = kohya_lora_state_dict(tensors)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in kohya
    assert not any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder", "unet")) for k in kohya)
    # a concept written under transformers 4 (`text_encoder.text_model.` keys) exports the same names
    old = {k.replace("text_encoder.", "text_encoder.text_model."): v for k, v in tensors.items()}
    assert kohya_lora_state_dict(old).keys() == kohya.keys()


# ---------------------------------------------------------------------------------------------
# The collapsed embedding (pure)


def test_textual_inversion_vectors_mean_and_layer():
    embeddings = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)
    # word w, layer l, dim j holds 48 w + 3 l + j: the mean over l = 0..15 is 48 w + 22.5 + j
    assert torch.equal(textual_inversion_vectors(embeddings, "mean"), torch.tensor([[22.5, 23.5, 24.5], [70.5, 71.5, 72.5]]))
    assert torch.equal(textual_inversion_vectors(embeddings, "layer:6"), torch.tensor([[18.0, 19, 20], [66, 67, 68]]))
    assert textual_inversion_vectors(embeddings).shape == (2, 3)


@pytest.mark.parametrize("how, fragment", [("median", "'mean', 'distil' or 'layer:<i>'"), ("layer:16", "layers are 0-15"),
                                           ("layer:-1", "'mean', 'distil' or 'layer:<i>'"),
                                           ("distil", "needs the base model: use distilled_vectors(base, ...)")])
def test_textual_inversion_vectors_bad_collapse(how, fragment):
    with pytest.raises(UserError, match="embedding collapse") as error:
        textual_inversion_vectors(torch.zeros(2, 16, 4), how)
    assert fragment in str(error.value)


def test_textual_inversion_vectors_bad_shape_and_any_word_count():
    with pytest.raises(UserError, match=r"shape \(2, 8, 4\); expected \[words, 16, d\]"):
        textual_inversion_vectors(torch.zeros(2, 8, 4))
    # an imported LoRA's "trigger class" words: 3 words, the same vector in every layer -> exactly those words
    words = torch.randn(3, 1, 4).expand(3, 16, 4)
    torch.testing.assert_close(textual_inversion_vectors(words), words[:, 0])


def test_a1111_embedding_layouts(tmp_path):
    vectors = torch.randn(2, 32)
    pt = save_a1111_embedding(tmp_path / "rex.pt", "<rex>", vectors)
    data = torch.load(pt, weights_only=True)  # what A1111's safe unpickler and ComfyUI accept
    assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert list(data["string_to_param"]) == ["*"] and torch.equal(data["string_to_param"]["*"], vectors)
    assert data["name"] == "<rex>"
    st = save_a1111_embedding(tmp_path / "rex.safetensors", "<rex>", vectors)
    assert torch.equal(load_file(st)["emb_params"], vectors) and len(load_file(st)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rex.pt", "rex.safetensors"]  # no temp files left
    with pytest.raises(UserError, match=r"must end in \.pt or \.safetensors"):
        save_a1111_embedding(tmp_path / "rex.bin", "<rex>", vectors)


# ---------------------------------------------------------------------------------------------
# The export and the round trip on the tiny model


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory, one_thread):
    """A concept with random (so clearly visible) LoRA factors whose 16 layer copies are all the
    collapsed vectors, in a library, exported for the webui; and the base it was made on."""
    from pipelines.base import load_base

    base = load_base(str(tiny_dir), device="cpu")
    g = torch.Generator().manual_seed(0)
    for model, targets in ((base.text_encoder, TEXT_ENCODER_TARGETS), (base.unet, UNET_TARGETS)):
        add_lora(model, "rex", targets)
        for param in lora_parameters(model, "rex"):
            param.data = torch.randn(param.shape, generator=g) * 0.3
    layerwise = torch.randn(2, 16, 32, generator=g)
    tensors = concept_state_dict(base, "rex", layerwise)
    layerwise_tensors = dict(tensors)  # 16 different copies: what "distil" has to collapse
    for model in (base.text_encoder, base.unet):
        remove_lora(model, "rex")
    # every layer reads the collapsed pair, so Menagerie and the exported files mean the same model
    vectors = textual_inversion_vectors(layerwise)
    tensors["embeddings"] = vectors[:, None].expand(2, 16, 32).contiguous()
    library = ConceptLibrary(tmp_path_factory.mktemp("export-library"))
    library.save(Concept(name="rex", class_word="dog", base_model=str(tiny_dir), fingerprint=base.fingerprint, photo_count=2),
                 tensors)
    out = export_for_webui(library, "rex", tmp_path_factory.mktemp("webui") / "rex-export")
    return {"base": base, "library": library, "out": out, "tensors": tensors, "vectors": vectors,
            "layerwise_tensors": layerwise_tensors}


def test_export_files_and_metadata(exported):
    out = exported["out"]
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "rex.safetensors", "rex_lora.safetensors"]
    lora = load_file(out / "rex_lora.safetensors")
    assert lora.keys() == kohya_lora_state_dict(exported["tensors"]).keys() and len(lora) == 3 * 136
    with safe_open(str(out / "rex_lora.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_dim"] == metadata["ss_network_alpha"] == "4"
    assert metadata["menagerie_trigger"] == "rex" and metadata["menagerie_class_word"] == "dog"
    assert metadata["ss_sd_model_name"] == exported["library"].get("rex").base_model
    # the mean of 16 equal copies: equal up to float32 rounding of the sum
    assert torch.allclose(load_file(out / "rex.safetensors")["emb_params"], exported["vectors"], rtol=0, atol=1e-6)
    readme = (out / "README.txt").read_text()
    for fragment in ("models/Lora/", "embeddings/", "a rex dog on the beach, <lora:rex_lora:1>", "LoraLoader",
                     "embedding:rex", 'load_lora_weights(".", weight_name="rex_lora.safetensors")',
                     'load_textual_inversion("rex.safetensors", token="<rex>")', "lossy", "0.43 with the mean one against 0.66"):
        assert fragment in readme, fragment


def test_round_trip_through_diffusers_loaders(exported, tiny_dir):
    """Menagerie's sampling of the concept == a stock diffusers pipeline with the exported files
    loaded by `load_lora_weights` and `load_textual_inversion`: same scheduler, seed and steps.
    Tolerance: 1/255 per pixel (Menagerie's image is rounded to uint8, diffusers' is float)."""
    from diffusers import StableDiffusionPipeline

    base, out = exported["base"], exported["out"]
    config = SampleConfig(prompt="a <rex> dog", negative_prompt="", steps=3, guidance=5.0, seed=0)
    ours = np.asarray(generate(base, exported["library"], config).images[0], dtype=np.float32) / 255

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("dpm++", pipe.scheduler.config)
    pipe.load_lora_weights(str(out), weight_name="rex_lora.safetensors", adapter_name="rex")  # diffusers < 0.36 needs weight_name offline
    pipe.load_textual_inversion(str(out / "rex.safetensors"), token="<rex>")
    latents = initial_latents(base, 1, 64, 64, seed=0)

    def theirs() -> np.ndarray:
        return pipe("a <rex> dog", negative_prompt="", num_inference_steps=3, guidance_scale=5.0, latents=latents,
                    output_type="np").images[0]

    assert np.abs(theirs() - ours).max() <= 1 / 255
    # the text side alone (token vectors and text-encoder LoRA): the prompt's encoding, to float32 rounding
    ours_text = encode_layerwise(base.tokenizer, base.text_encoder, ["a <rex> dog"])[:, :77]  # copy 0 of 16 equal ones
    theirs_text = pipe.encode_prompt("a <rex> dog", "cpu", 1, do_classifier_free_guidance=False)[0]
    assert torch.allclose(theirs_text, ours_text, rtol=0, atol=1e-5)
    pipe.disable_lora()  # the comparison sees the LoRA: without it the images differ
    assert np.abs(theirs() - ours).max() > 20 / 255
    pipe.enable_lora()
    # the A1111 .pt layout loads to the same vectors
    save_a1111_embedding(out.parent / "rexpt.pt", "<rexpt>", exported["vectors"])
    pipe.load_textual_inversion(str(out.parent / "rexpt.pt"))  # token from the file's `name`
    ids = pipe.tokenizer.convert_tokens_to_ids(["<rexpt>", "<rexpt>_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), exported["vectors"])


def test_distilled_vectors_fit_keys_and_values_better_than_the_mean(exported, fresh_base):
    """16 different copies: the distilled pair's K/V error is well below the mean's, and the same every run."""
    base, tensors = fresh_base(), exported["layerwise_tensors"]
    objective = key_value_objective(base, "rex", tensors, "dog")
    distilled = distilled_vectors(base, "rex", tensors, "dog", steps=60)
    with torch.no_grad():
        mean, fitted = objective(tensors["embeddings"].mean(dim=1)).item(), objective(distilled).item()
    assert 0 < fitted < 0.8 * mean, (fitted, mean)
    assert distilled.shape == (2, 32) and distilled.dtype == torch.float32
    assert torch.equal(distilled, distilled_vectors(base, "rex", tensors, "dog", steps=60))  # deterministic


def test_distil_of_equal_copies_is_the_mean(exported, fresh_base):
    """16 equal copies: the pair itself reproduces every layer exactly (objective 0), so distil keeps the mean."""
    base, tensors = fresh_base(), exported["tensors"]
    mean = tensors["embeddings"].mean(dim=1)
    with torch.no_grad():
        assert key_value_objective(base, "rex", tensors, "dog")(mean).item() < 1e-10
    assert torch.equal(distilled_vectors(base, "rex", tensors, "dog", steps=20), mean)


def test_export_distil_needs_the_base_and_writes_it(tmp_path, exported, fresh_base):
    library = exported["library"]
    with pytest.raises(UserError, match="'distil' needs the base model <rex> was trained on"):
        export_for_webui(library, "rex", tmp_path / "out", how="distil")
    assert not (tmp_path / "out").exists()
    out = export_for_webui(library, "rex", tmp_path / "out", how="distil", base=fresh_base())
    # the library's rex has 16 equal copies: the distilled pair is their mean
    assert torch.equal(load_file(out / "rex.safetensors")["emb_params"], exported["tensors"]["embeddings"].mean(dim=1))
    assert "This embedding is distilled from the 16 layer copies" in (out / "README.txt").read_text()
    with safe_open(str(out / "rex_lora.safetensors"), framework="pt") as handle:
        assert handle.metadata()["menagerie_embedding_collapse"] == "distil"


def test_export_refuses_unknown_and_damaged(tmp_path, exported):
    library = exported["library"]
    with pytest.raises(UserError, match="unknown concept 'nope'"):
        export_for_webui(library, "nope", tmp_path / "out")
    with pytest.raises(UserError, match="embedding collapse"):
        export_for_webui(library, "rex", tmp_path / "out", how="median")
    damaged = ConceptLibrary(tmp_path / "lib")
    damaged.save(library.get("rex"), exported["tensors"])
    (damaged.path("rex") / "concept.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="concept 'rex' is damaged"):
        export_for_webui(damaged, "rex", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


def test_cli_export_webui(capsys, tmp_path, exported):
    root = exported["library"].root
    assert main(["concepts", "export", "rex", str(tmp_path / "webui"), "--format", "webui", "--library", str(root)]) == 0
    assert "for A1111/Forge/ComfyUI" in capsys.readouterr().out
    assert (tmp_path / "webui" / "rex_lora.safetensors").is_file() and (tmp_path / "webui" / "README.txt").is_file()
    # --collapse distil loads the concept's own base (here the tiny model it names)
    assert main(["concepts", "export", "rex", str(tmp_path / "distil"), "--format", "webui", "--collapse", "distil",
                 "--device", "cpu", "--library", str(root)]) == 0
    assert "distilled" in (tmp_path / "distil" / "README.txt").read_text()
    # the default format is still Menagerie's own one-file export
    assert main(["concepts", "export", "rex", str(tmp_path / "rex.safetensors"), "--library", str(root)]) == 0
    with safe_open(str(tmp_path / "rex.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()["concept"])["name"] == "rex"
    code = main(["concepts", "export", "nope", str(tmp_path / "x"), "--format", "webui", "--library", str(root)])
    one_line_error(capsys, code, "unknown concept 'nope'")
