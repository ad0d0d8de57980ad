"""A fused model exported as one single-file checkpoint in the original SD layout (pipelines.single_file).

Round trip on the tiny model: two concepts fused, exported, loaded back by diffusers'
`from_single_file` (offline: the tiny model's folder gives the configs) must hold Menagerie's fused
weights bit for bit and sample the same images. The key layout is checked on the tiny model and
on SD1.5's own configs (meta tensors, no weights), against diffusers' loader's conversion back.
"""

from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import one_line_error
from pipelines import export as export_module
from pipelines.__main__ import main
from pipelines.base import SD15_CONFIG_DIR, load_base
from pipelines.concept import Concept, ConceptLibrary
from pipelines.edlora import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_lora, concept_state_dict
from pipelines.errors import UserError
from pipelines.export import textual_inversion_vectors
from pipelines.fusion import FUSED_RECORD, FUSED_WEIGHTS, FusionConfig, fuse_concepts, linear_of
from pipelines.layerwise import NUM_LAYERS
from pipelines.sample import SampleConfig, initial_latents, make_scheduler, sample_loaded
from pipelines.single_file import (
    CHECKPOINT_FORMAT, CLIP_VOCAB_SIZE, export_fused_checkpoint, export_paths, original_sd_state_dict, plain_state_dict,
    text_encoder_original, unet_original, vae_original,
)

NAMES = ["mochi", "tama"]
UNET_K = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
TOKEN_EMBEDDING = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one OpenMP thread for tiny ops


# ---------------------------------------------------------------------------------------------
# Fixtures: two concepts, their fusion and its export, once for the module


@pytest.fixture(scope="module")
def library(tiny_dir, tmp_path_factory):
    """Two concepts with random LoRAs (no training: only their weights matter here).

    <mochi>'s 16 layer copies are equal, so collapsing them to one embedding loses nothing and
    A1111-style sampling with the exported embedding must equal Menagerie's layer-wise sampling;
    <tama>'s differ per layer, as trained ones do.
    """
    lib = ConceptLibrary(tmp_path_factory.mktemp("single-file-library"))
    base = load_base(str(tiny_dir), device="cpu")
    generator = torch.Generator().manual_seed(0)
    for name in NAMES:
        add_lora(base.text_encoder, name, TEXT_ENCODER_TARGETS)
        add_lora(base.unet, name, UNET_TARGETS)
        for key, param in [*base.text_encoder.named_parameters(), *base.unet.named_parameters()]:
            if f".lora_B.{name}." in key:  # peft starts B at zero: a LoRA that changes nothing
                param.data = torch.randn(param.shape, generator=generator) * 0.1
        if name == "mochi":
            embeddings = torch.randn(2, 1, 32, generator=generator).expand(2, NUM_LAYERS, 32).clone()
        else:
            embeddings = torch.randn(2, NUM_LAYERS, 32, generator=generator)
        concept = Concept(name=name, class_word="dog", base_model=str(tiny_dir), fingerprint=base.fingerprint, photo_count=1)
        lib.save(concept, concept_state_dict(base, name, embeddings))
    return lib


@pytest.fixture(scope="module")
def fused_folder(tiny_dir, library):
    base = load_base(str(tiny_dir), device="cpu")
    return fuse_concepts(base, library, NAMES, FusionConfig(spatial_steps=2)).folder


@pytest.fixture(scope="module")
def exported(tiny_dir, fused_folder, tmp_path_factory):
    """(Menagerie's fused model, the checkpoint it was exported to)."""
    base = load_base(str(tiny_dir), device="cpu")
    out = export_fused_checkpoint(base, fused_folder, tmp_path_factory.mktemp("export") / "pets.safetensors")
    return base, out


@pytest.fixture(scope="module")
def loaded(tiny_dir, exported):
    """The exported file loaded by diffusers, offline: the configs come from the tiny model's folder."""
    from diffusers import StableDiffusionPipeline

    base, out = exported
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_dir), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("dpm++", base.scheduler_config)  # Menagerie's default sampler
    return pipe


@pytest.fixture(scope="module")
def plain(tiny_dir):
    """A base that holds no fused model; refusals must leave it so."""
    return load_base(str(tiny_dir), device="cpu")


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(int)


# ---------------------------------------------------------------------------------------------
# Round trip through diffusers' from_single_file


def test_single_file_holds_the_fused_weights_exactly(exported, loaded, plain):
    base, _ = exported
    for part in ("unet", "vae", "text_encoder"):
        ours, theirs = plain_state_dict(getattr(base, part)), getattr(loaded, part).state_dict()
        assert set(ours) == set(theirs), part
        for key, value in ours.items():
            if key.endswith("token_embedding.weight"):  # a test below may add embedding rows to `loaded`
                value, other = value[:CLIP_VOCAB_SIZE], theirs[key][:CLIP_VOCAB_SIZE]
            else:
                other = theirs[key]
            assert torch.equal(value, other), f"{part}.{key}"
    # and those are the fused weights, not the base's
    fused = linear_of(loaded.unet, UNET_K).weight
    assert (fused - linear_of(plain.unet, UNET_K).weight).abs().max() > 1e-3


def test_single_file_samples_the_same_images(exported, loaded):
    # Menagerie's own sampling of the fused model vs diffusers' pipeline on the exported file:
    # same scheduler, latents and prompts. Measured: identical pixels; tolerance 1/255.
    base, _ = exported
    config = SampleConfig(prompt="a photo of a dog on a beach", negative_prompt="blurry", steps=3, seed=1)
    ours = sample_loaded(base, config)[0]
    theirs = loaded(config.prompt, negative_prompt=config.negative_prompt, num_inference_steps=config.steps,
                    guidance_scale=config.guidance, latents=initial_latents(base, 1, 64, 64, config.seed),
                    height=64, width=64).images[0]
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1
    assert pixels(ours).std() > 10  # an image, not a constant


def test_embeddings_round_trip_through_load_textual_inversion(exported, loaded, fused_folder):
    base, out = exported
    _, embeddings_dir, _ = export_paths(out)
    stored = load_file(fused_folder / FUSED_WEIGHTS)
    assert sorted(p.name for p in embeddings_dir.iterdir()) == ["mochi.safetensors", "tama.safetensors"]
    for name in NAMES:
        loaded.load_textual_inversion(str(embeddings_dir / f"{name}.safetensors"), token=name)
        ids = loaded.tokenizer.convert_tokens_to_ids([name, f"{name}_1"])  # diffusers' names of a 2-vector embedding
        rows = loaded.text_encoder.get_input_embeddings().weight[ids].detach()
        assert torch.equal(rows, textual_inversion_vectors(stored[f"concepts.{name}"]))
    # <tama>'s layer copies differ: the embedding is their mean, equal to none of them
    tama = stored["concepts.tama"]
    assert all((tama[:, layer] - tama.mean(1)).abs().max() > 1e-2 for layer in range(NUM_LAYERS))
    # <mochi>'s copies are equal, so the collapse is exact: A1111-style sampling with the embedding
    # equals Menagerie's layer-wise sampling of <mochi> (measured identical; tolerance 1/255)
    config = SampleConfig(prompt="a photo of <mochi> on a beach", negative_prompt="", steps=3, seed=2)
    ours = sample_loaded(base, config)[0]
    theirs = loaded("a photo of mochi on a beach", negative_prompt="", num_inference_steps=config.steps,
                    guidance_scale=config.guidance, latents=initial_latents(base, 1, 64, 64, config.seed),
                    height=64, width=64).images[0]
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1
    without = loaded("a photo of a dog on a beach", negative_prompt="", num_inference_steps=config.steps,
                     guidance_scale=config.guidance, latents=initial_latents(base, 1, 64, 64, config.seed),
                     height=64, width=64).images[0]
    assert np.abs(pixels(theirs) - pixels(without)).max() > 10  # the embedding does act


# ---------------------------------------------------------------------------------------------
# Layout


def test_original_key_layout_of_the_tiny_model(exported, tiny_dir):
    base, out = exported
    with safe_open(str(out), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        metadata = handle.metadata()
        dtypes = {handle.get_tensor(key).dtype for key in list(handle.keys())[:50]}
    expected = {
        # the first cross-attention layer's K: [UNet channels 32, text width 32] (SD1.5: [320, 768])
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, 32),
        "model.diffusion_model.input_blocks.3.0.op.weight": (32, 32, 3, 3),  # down block 0's downsampler
        "model.diffusion_model.output_blocks.2.1.conv.weight": (64, 64, 3, 3),  # up block 0 (no attention): .1
        "model.diffusion_model.output_blocks.5.2.conv.weight": (64, 64, 3, 3),  # up block 1: after its attention, .2
        "model.diffusion_model.middle_block.1.proj_in.weight": (64, 64, 1, 1),
        "model.diffusion_model.time_embed.0.weight": (128, 32),
        "model.diffusion_model.out.2.weight": (4, 32, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (32, 32, 1, 1),  # a linear layer in diffusers
        "first_stage_model.decoder.mid.attn_1.proj_out.weight": (32, 32, 1, 1),
        "first_stage_model.decoder.up.3.block.1.conv1.weight": (32, 32, 3, 3),  # diffusers' up_blocks.0
        "first_stage_model.encoder.down.0.downsample.conv.weight": (16, 16, 3, 3),
        TOKEN_EMBEDDING: (CLIP_VOCAB_SIZE, 32),  # the concept tokens' rows are not in it
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (32,),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    # the tiny VAE has 1 resnet per encoder block and 2 per decoder block (SD1.5: 2 and 3)
    assert "first_stage_model.encoder.down.0.block.1.conv1.weight" not in shapes
    assert "first_stage_model.decoder.up.3.block.2.conv1.weight" not in shapes
    assert len(base.tokenizer) == CLIP_VOCAB_SIZE + 2 * NUM_LAYERS * len(NAMES)  # Menagerie's model holds them
    assert not [k for k in shapes if "lora" in k or "concept" in k]
    counts = {prefix: sum(k.startswith(prefix) for k in shapes)
              for prefix in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")}
    assert sum(counts.values()) == len(shapes)
    assert counts["model.diffusion_model."] == len(base.unet.state_dict())
    assert counts["first_stage_model."] == len(base.vae.state_dict())
    assert metadata["format"] == CHECKPOINT_FORMAT and metadata["concepts"] == "mochi,tama"
    assert metadata["dtype"] == "fp32" and dtypes == {torch.float32}
    readme = export_paths(out)[2].read_text()
    for fragment in ("models/Stable-diffusion/", "models/embeddings/", "embedding:mochi", "a photo of mochi on a beach",
                     "collapsed", "identity"):
        assert fragment in readme, fragment


def sd15_models():
    """SD1.5's UNet, VAE and text encoder from assets/sd15's configs, on the meta device (no weights)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = {part: json.loads((SD15_CONFIG_DIR / part / "config.json").read_text()) for part in ("unet", "vae", "text_encoder")}
    with init_empty_weights():
        return (UNet2DConditionModel.from_config(configs["unet"]), AutoencoderKL.from_config(configs["vae"]),
                CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])), configs)


def test_sd15_layout_matches_the_original_and_diffusers_reads_it_back():
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet, vae, text_encoder, configs = sd15_models()
    unet_keys, vae_keys, text_keys = unet_original(unet), vae_original(vae), text_encoder_original(text_encoder)
    # the tensor counts of SD1.5's original checkpoint (v1-5-pruned-emaonly: 1131 with the position_ids buffer)
    assert (len(unet_keys), len(vae_keys), len(text_keys)) == (686, 248, 196)
    expected = {
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "middle_block.2.emb_layers.1.weight": (1280, 1280),
    }
    assert {k: tuple(unet_keys[k].shape) for k in expected} == expected
    assert tuple(vae_keys["decoder.up.0.block.0.nin_shortcut.weight"].shape) == (128, 256, 1, 1)
    assert tuple(vae_keys["encoder.mid.attn_1.v.weight"].shape) == (512, 512, 1, 1)
    assert tuple(text_keys["text_model.embeddings.token_embedding.weight"].shape) == (49408, 768)
    # diffusers' single-file loader maps them back onto exactly the models' own parameters
    for ours, convert, model, config, prefix in (
        (unet_keys, convert_ldm_unet_checkpoint, unet, configs["unet"], "model.diffusion_model."),
        (vae_keys, convert_ldm_vae_checkpoint, vae, configs["vae"], "first_stage_model."),
    ):
        back = convert({prefix + k: v for k, v in ours.items()}, config)
        own = model.state_dict()
        assert set(back) == set(own)
        assert all(back[k].shape == own[k].shape for k in own)


def test_transformers_4_naming_gives_the_same_keys(plain):
    """transformers 4.x's CLIPTextModel holds the same modules one level down, under `text_model`."""

    class CLIPTextModel4(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.text_model = inner

        def get_input_embeddings(self):
            return self.text_model.get_input_embeddings()

    class CLIPTextModel5(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.embeddings, self.encoder, self.final_layer_norm = inner.embeddings, inner.encoder, inner.final_layer_norm

        def get_input_embeddings(self):
            return self.embeddings.token_embedding

    encoder = plain.text_encoder
    if hasattr(encoder, "text_model"):  # transformers 4.x installed: make the 5.x layout from it
        flat, nested = text_encoder_original(CLIPTextModel5(encoder.text_model)), text_encoder_original(encoder)
    else:
        flat, nested = text_encoder_original(encoder), text_encoder_original(CLIPTextModel4(encoder))
    assert flat.keys() == nested.keys()
    assert all(k.startswith("text_model.") for k in flat)
    assert all(torch.equal(flat[k], nested[k]) for k in flat)


def test_resized_vocabulary_is_cut_back(plain):
    """A text encoder whose token matrix was enlarged for added tokens (Mix-of-Show's way) exports
    CLIP's rows only."""
    from transformers import CLIPTextModel

    encoder = CLIPTextModel(plain.text_encoder.config)
    encoder.load_state_dict(plain.text_encoder.state_dict())
    encoder.resize_token_embeddings(CLIP_VOCAB_SIZE + 5)
    tensors = original_sd_state_dict(plain.unet, plain.vae, encoder)
    assert torch.equal(tensors[TOKEN_EMBEDDING], plain.text_encoder.get_input_embeddings().weight[:CLIP_VOCAB_SIZE])


def test_half_writes_fp16(exported, fused_folder, tmp_path):
    base, out = exported  # `base` already holds this fused model: load_fused keeps it as it is
    half = export_fused_checkpoint(base, fused_folder, tmp_path / "half.safetensors", half=True)
    full, small = load_file(out), load_file(half)
    assert {v.dtype for v in small.values()} == {torch.float16}
    assert all(torch.equal(small[k], full[k].half()) for k in full)
    assert half.stat().st_size < 0.6 * out.stat().st_size


# ---------------------------------------------------------------------------------------------
# Refusals: nothing written, the base untouched


def assert_nothing_written(folder):
    assert not folder.exists() or list(folder.iterdir()) == []


def test_missing_fused_folder_is_refused(plain, tmp_path):
    with pytest.raises(UserError, match="not a fused model folder"):
        export_fused_checkpoint(plain, tmp_path / "nowhere", tmp_path / "out" / "pets.safetensors")
    assert_nothing_written(tmp_path / "out")
    assert plain.fused is None


def test_fused_for_another_architecture_is_refused(plain, fused_folder, tmp_path):
    other = tmp_path / "other-fused"
    shutil.copytree(fused_folder, other)
    record = json.loads((other / FUSED_RECORD).read_text())
    record.update(fingerprint="0123456789abcdef", base_model="some/sd2-model")
    (other / FUSED_RECORD).write_text(json.dumps(record))
    with pytest.raises(UserError, match="was made on some/sd2-model"):
        export_fused_checkpoint(plain, other, tmp_path / "out" / "pets.safetensors")
    assert_nothing_written(tmp_path / "out")
    assert plain.fused is None


@pytest.mark.parametrize("target, message", [
    ("blocker/pets.safetensors", "is not a folder this user can write to"),  # the parent is a file
    ("pets.ckpt", "must be a .safetensors file"),
    ("taken.safetensors", "exists and is not a file"),  # a folder of that name
])
def test_unwritable_out_path_is_refused(plain, fused_folder, tmp_path, target, message):
    (tmp_path / "blocker").write_text("a file")
    (tmp_path / "taken.safetensors").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UserError, match=message):
        export_fused_checkpoint(plain, fused_folder, tmp_path / target)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert plain.fused is None


def test_failed_write_leaves_the_previous_export(exported, fused_folder, tmp_path, monkeypatch):
    base, _ = exported
    out = tmp_path / "pets.safetensors"
    out.write_bytes(b"previous export")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "save_a1111_embedding", disk_full)
    with pytest.raises(UserError, match="cannot write the export.*No space left"):
        export_fused_checkpoint(base, fused_folder, out)
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["pets.safetensors"]  # no temporary files left


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_export_checkpoint(tiny_dir, fused_folder, tmp_path, capsys):
    out = tmp_path / "cli" / "pets.safetensors"
    code = main(["export-checkpoint", "--base", str(tiny_dir), "--fused", str(fused_folder), "--out", str(out), "--half"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "fp16" in printed
    _, embeddings, readme = export_paths(out)
    assert load_file(out)[TOKEN_EMBEDDING].dtype == torch.float16
    assert sorted(p.name for p in embeddings.iterdir()) == ["mochi.safetensors", "tama.safetensors"] and readme.is_file()

    code = main(["export-checkpoint", "--base", str(tiny_dir), "--fused", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.safetensors")])
    one_line_error(capsys, code, "not a fused model folder")
    assert not (tmp_path / "x.safetensors").exists()
