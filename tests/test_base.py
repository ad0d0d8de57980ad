"""pipelines.base: the tiny model on disk, loading bases, devices, fingerprints."""

from __future__ import annotations

import json

import pytest
import torch

from pipelines.base import (
    BaseModel,
    architecture_fingerprint,
    default_dtype,
    ensure_tiny_model,
    load_base,
    parse_dtype,
    resolve_device,
)
from pipelines.errors import UserError
from pipelines.layerwise import cross_attention_layers


def test_load_tiny_by_name_uses_the_cache(tiny_dir):
    """`load_base("tiny")` finds the model in $MENAGERIE_CACHE and describes it as a 64-px test model."""
    assert ensure_tiny_model() == tiny_dir  # already built there: nothing is rebuilt
    base = load_base("tiny", device="cpu")
    assert isinstance(base, BaseModel)
    assert base.name == "tiny"
    assert base.is_test_model is True
    assert base.native_resolution == 64
    assert base.vae_scale_factor == 8
    assert base.dtype == torch.float32 and base.device == torch.device("cpu")
    assert not any(p.requires_grad for p in base.unet.parameters())
    assert not any(p.requires_grad for p in base.text_encoder.parameters())


def test_tiny_unet_has_sd15_cross_attention_layout(base):
    """16 cross-attention layers in ED-LoRA order: 6 down, 1 mid, 9 up."""
    names = [name for name, _ in cross_attention_layers(base.unet)]
    assert len(names) == 16
    parts = [name.split(".")[0] for name in names]
    assert parts == ["down_blocks"] * 6 + ["mid_block"] + ["up_blocks"] * 9
    assert names[0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert names[6] == "mid_block.attentions.0.transformer_blocks.0.attn2"
    assert names[-1] == "up_blocks.3.attentions.2.transformer_blocks.0.attn2"
    # within each part, blocks come in index order (not lexicographic or registration order)
    assert names == sorted(names, key=lambda n: (["down_blocks", "mid_block", "up_blocks"].index(n.split(".")[0]), n))


def test_tiny_model_folder_has_real_clip_tokenizer_files(tiny_dir):
    """The folder is a standard diffusers model with CLIP's vocab.json/merges.txt (49408 tokens)."""
    assert (tiny_dir / "model_index.json").exists()
    assert (tiny_dir / "menagerie_test_model.json").exists()
    vocab = json.loads((tiny_dir / "tokenizer" / "vocab.json").read_text())
    assert len(vocab) == 49408
    assert sorted(vocab.values()) == list(range(49408))
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["dog</w>"] == 1929
    merges = (tiny_dir / "tokenizer" / "merges.txt").read_text().splitlines()
    assert merges[0].startswith("#version")
    assert len(merges) - 1 == 48894  # 49408 - 512 byte tokens - 2 special tokens


def test_tiny_tokenizer_gives_real_clip_ids(base):
    """The tiny tokenizer encodes like SD1.5's CLIP tokenizer (so prompts tokenize realistically)."""
    assert base.tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert len(base.tokenizer) == 49408
    assert base.text_encoder.get_input_embeddings().weight.shape == (49408, 32)


def test_fingerprint_is_stable_and_architecture_only(base, fresh_base):
    """Same architecture -> same fingerprint; LoRA adapters don't change it; other shapes do."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipelines.edlora import TEXT_ENCODER_TARGETS, add_lora

    assert len(base.fingerprint) == 16
    assert fresh_base().fingerprint == base.fingerprint
    add_lora(base.text_encoder, "x", TEXT_ENCODER_TARGETS)
    assert architecture_fingerprint(base.unet, base.text_encoder) == base.fingerprint
    wider = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=77))
    assert architecture_fingerprint(base.unet, wider) != base.fingerprint


def test_architecture_from_configs_is_the_loaded_fingerprint(base, tiny_dir, tmp_path):
    """`architecture_of` reads configs only (what the studio checks an import against before the base loads)."""
    from pipelines.base import SD15_CONFIG_DIR, architecture_of

    assert architecture_of("tiny").fingerprint == base.fingerprint
    assert architecture_of(str(tiny_dir)).fingerprint == base.fingerprint
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"not read")  # a single file is SD1.5's architecture or does not load at all
    assert architecture_of(str(single)).fingerprint == architecture_of(str(SD15_CONFIG_DIR)).fingerprint != base.fingerprint
    assert architecture_of("someone/not-cached-model") is None and architecture_of(str(tmp_path / "nowhere")) is None


def test_missing_base_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_base(str(tmp_path / "no-such-model"), device="cpu")


def test_folder_that_is_not_a_diffusers_model_is_refused(tmp_path):
    with pytest.raises(UserError, match="not a diffusers model"):
        load_base(str(tmp_path), device="cpu")


def test_single_file_with_wrong_suffix_is_refused(tmp_path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0" * 16)
    with pytest.raises(UserError, match=r"\.safetensors or \.ckpt"):
        load_base(str(weights), device="cpu")


def test_uncached_hub_id_offline_says_how_to_get_it(monkeypatch):
    """With HF_HUB_OFFLINE=1 an uncached Hub id fails fast, explaining download and `--base tiny`."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as error:
        load_base("menagerie-tests/definitely-not-cached-model", device="cpu")
    message = str(error.value)
    assert "menagerie-tests/definitely-not-cached-model" in message
    assert "cannot be downloaded" in message and "hf download" in message
    assert "--base tiny" in message
    assert "\n" not in message


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(UserError, match="not a device name"):
        resolve_device("banana")


def test_parse_dtype():
    cpu = torch.device("cpu")
    assert parse_dtype(None, cpu) == torch.float32
    assert parse_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(UserError, match="--dtype 'fp64' is not known"):
        parse_dtype("fp64", cpu)


def test_gpu_default_dtype_is_fp16_on_every_card(monkeypatch, caplog):
    """fp16 on every GPU (bf16 rounds merged updates 8x more coarsely; cards before Ampere only
    emulate it); asking for bf16 on an emulating card warns. A stand-in for such a card says yes
    to `is_bf16_supported` only when emulation counts."""
    from pipelines.base import default_dtype

    def emulated_only(including_emulation: bool = True) -> bool:
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", emulated_only)
    assert default_dtype(torch.device("cuda")) == torch.float16
    with caplog.at_level("WARNING"):
        assert parse_dtype("bf16", torch.device("cuda")) == torch.bfloat16
    assert "only emulates bf16" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and later
    assert default_dtype(torch.device("cuda")) == torch.float16
    assert default_dtype(torch.device("mps")) == torch.float16 and default_dtype(torch.device("cpu")) == torch.float32


def folded_update_error(weight_dtype: torch.dtype, update_size: float) -> float:
    """Relative error of a weight update W0 + dW after it is written into weights of `weight_dtype`
    (a synthetic layer: W0 ~ 0.03, as in CLIP and UNet attention projections)."""
    generator = torch.Generator().manual_seed(0)
    w0 = (torch.randn(320, 768, generator=generator) * 0.03).to(weight_dtype).float()
    update = torch.randn(320, 768, generator=generator) * update_size
    kept = (w0 + update).to(weight_dtype).float() - w0
    return float((kept - update).norm() / update.norm())


def test_small_updates_survive_in_the_dtypes_menagerie_keeps(tiny_dir):
    """A text-LoRA-sized update (1e-4 of weights ~0.03) is rounded away in bf16 (45% error) and
    badly kept in fp16 (6%); the text encoder therefore stays float32 whatever the dtype, and the
    UNet's half precision is fp16, which keeps UNet-sized updates (1e-3) to 0.6% where bf16 loses 5%."""
    assert folded_update_error(torch.bfloat16, 1e-4) > 0.3
    assert folded_update_error(torch.float16, 1e-4) > 0.05
    assert folded_update_error(torch.float32, 1e-4) < 1e-3
    assert folded_update_error(torch.bfloat16, 1e-3) > 0.04
    assert folded_update_error(torch.float16, 1e-3) < 0.01
    for dtype in ("fp16", "bf16"):
        base = load_base("tiny", device="cpu", dtype=dtype)
        assert {p.dtype for p in base.text_encoder.parameters()} == {torch.float32}
        assert {p.dtype for p in base.unet.parameters()} == {base.dtype} == {p.dtype for p in base.vae.parameters()}
    assert default_dtype(torch.device("cuda")) == torch.float16


def test_load_base_casts_to_the_dtype_even_if_diffusers_ignores_it(tiny_dir, monkeypatch):
    """diffusers 0.35-0.39 ignore `dtype=` (with a warning) and load float32; the loaded model must
    still be in the dtype `BaseModel.dtype` reports."""
    from diffusers import StableDiffusionPipeline

    real = StableDiffusionPipeline.from_pretrained.__func__

    def ignoring_dtype(cls, *args, **kwargs):
        kwargs.pop("dtype", None)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", classmethod(ignoring_dtype))
    base = load_base("tiny", device="cpu", dtype="bf16")
    assert base.dtype == torch.bfloat16
    for module in (base.unet, base.vae):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in base.text_encoder.parameters()} == {torch.float32}  # see test_small_updates_survive...


def test_load_dtype_keyword_fits_the_installed_diffusers(monkeypatch):
    """`dtype=` exists from diffusers 0.40 (0.35-0.39 ignore it and load float32); before that the
    keyword is `torch_dtype`, which 0.40 on deprecates."""
    import diffusers

    from pipelines.base import dtype_argument

    monkeypatch.setattr(diffusers, "__version__", "0.35.0")
    assert dtype_argument(torch.float16) == {"torch_dtype": torch.float16}
    monkeypatch.setattr(diffusers, "__version__", "0.39.2")
    assert dtype_argument(torch.float16) == {"torch_dtype": torch.float16}
    monkeypatch.setattr(diffusers, "__version__", "0.40.0")
    assert dtype_argument(torch.float16) == {"dtype": torch.float16}
    monkeypatch.setattr(diffusers, "__version__", "0.43.0.dev0")
    assert dtype_argument(torch.float16) == {"dtype": torch.float16}


def test_half_precision_base_keeps_the_text_encoder_weights_exact(tiny_dir):
    """The text encoder loads in float32 from the file, not rounded to half precision and cast back."""
    exact = load_base(str(tiny_dir), device="cpu", dtype="fp32")
    for dtype in ("bf16", "fp16"):
        half = load_base(str(tiny_dir), device="cpu", dtype=dtype)
        reference = dict(exact.text_encoder.named_parameters())
        for name, param in half.text_encoder.named_parameters():
            assert torch.equal(param, reference[name]), (dtype, name)


# ---------------------------------------------------------------------------------------------
# Single checkpoint files, offline


def original_layout(folder) -> dict[str, torch.Tensor]:
    """The weights of a diffusers SD1-structured folder under the keys of an original (CompVis)
    checkpoint: the inverse of the renaming diffusers' single-file loader does (its
    scripts/convert_diffusers_to_original_stable_diffusion.py, written out for SD1's blocks)."""
    from safetensors.torch import load_file

    unet_prefixes = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
                     ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
                     ("middle_block.0.", "mid_block.resnets.0."), ("middle_block.1.", "mid_block.attentions.0."),
                     ("middle_block.2.", "mid_block.resnets.1.")]
    for i in range(4):
        for j in range(2):
            unet_prefixes += [(f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."),
                              (f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}.")]
        for j in range(3):
            unet_prefixes += [(f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."),
                              (f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}.")]
        unet_prefixes += [(f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."),
                          (f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0.")]
    resnet_parts = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."),
                    ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."), ("skip_connection.", "conv_shortcut.")]
    vae_parts = [("mid.attn_1.", "mid_block.attentions.0."), ("mid.block_1.", "mid_block.resnets.0."),
                 ("mid.block_2.", "mid_block.resnets.1."), ("norm_out.", "conv_norm_out."), ("nin_shortcut.", "conv_shortcut.")]
    for i in range(4):
        for j in range(3):
            vae_parts += [(f"down.{i}.block.{j}.", f"down_blocks.{i}.resnets.{j}."), (f"up.{3 - i}.block.{j}.", f"up_blocks.{i}.resnets.{j}.")]
        vae_parts += [(f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."), (f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0.")]
    vae_attention = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]

    checkpoint = {}
    for key, value in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items():
        original, diffusers = next(pair for pair in unet_prefixes if key.startswith(pair[1]))
        rest = key[len(diffusers):]
        if "resnets" in diffusers:
            rest = next((o + rest[len(d):] for o, d in resnet_parts if rest.startswith(d)), rest)
        checkpoint["model.diffusion_model." + original + rest] = value
    for key, value in load_file(folder / "vae" / "diffusion_pytorch_model.safetensors").items():
        for original, diffusers in vae_parts:
            key = key.replace(diffusers, original)
        if ".attn_1." in key:  # the mid-block attention: linear layers in diffusers, 1x1 convolutions originally
            head, rest = key.split(".attn_1.")
            key = head + ".attn_1." + next(o + rest[len(d):] for o, d in vae_attention if rest.startswith(d))
            value = value[:, :, None, None] if value.ndim == 2 else value
        checkpoint["first_stage_model." + key] = value
    for key, value in load_file(folder / "text_encoder" / "model.safetensors").items():
        checkpoint["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    return {key: value.contiguous() for key, value in checkpoint.items()}


@pytest.fixture
def tiny_single_file_config(tiny_dir, tmp_path, monkeypatch):
    """`SD15_CONFIG_DIR` pointed at the tiny model's configs (its JSON files only, like assets/sd15/:
    no weights, no tokenizer vocabulary), so a tiny single file takes SD1.5's code path."""
    import shutil

    import pipelines.base as base_module

    config_dir = tmp_path / "tiny-config"
    for path in tiny_dir.rglob("*.json"):
        if path.name not in ("tokenizer.json", "menagerie_test_model.json"):
            (config_dir / path.relative_to(tiny_dir)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, config_dir / path.relative_to(tiny_dir))
    monkeypatch.setattr(base_module, "SD15_CONFIG_DIR", config_dir)
    return config_dir


def test_shipped_sd15_configs_are_stable_diffusion_1_5(tmp_path, tiny_dir):
    """assets/sd15 (+ the tokenizer files written at load) is SD1.5's diffusers config: the real sizes,
    noise schedule and tokenizer, and models built from it (on the meta device) have SD1.5's exact
    parameter counts (UNet 859,520,964; VAE 83,653,863; CLIP text encoder 123,060,480)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from pipelines.base import SD15_CONFIG_DIR, single_file_config

    folder = single_file_config(tmp_path / "config", SD15_CONFIG_DIR)
    index = StableDiffusionPipeline.load_config(folder)
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["text_encoder"] == ["transformers", "CLIPTextModel"]
    unet = UNet2DConditionModel.load_config(folder, subfolder="unet")
    assert unet["cross_attention_dim"] == 768 and tuple(unet["block_out_channels"]) == (320, 640, 1280, 1280)
    assert unet["in_channels"] == unet["out_channels"] == 4 and unet["sample_size"] == 64 and unet["attention_head_dim"] == 8
    vae = AutoencoderKL.load_config(folder, subfolder="vae")
    assert vae["latent_channels"] == 4 and tuple(vae["block_out_channels"]) == (128, 256, 512, 512) and vae["sample_size"] == 512
    text = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder")
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.intermediate_size) == (12, 768, 12, 3072)
    assert (text.max_position_embeddings, text.vocab_size, text.hidden_act) == (77, 49408, "quick_gelu")
    schedule = PNDMScheduler.from_pretrained(folder, subfolder="scheduler").config
    assert (schedule.beta_schedule, schedule.beta_start, schedule.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert schedule.num_train_timesteps == 1000 and schedule.steps_offset == 1 and schedule.skip_prk_steps
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    reference = CLIPTokenizer.from_pretrained(tiny_dir, subfolder="tokenizer")
    prompt = "a photo of a dog, and a Cat on the grass!"
    assert tokenizer(prompt).input_ids == reference(prompt).input_ids
    assert tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407] and tokenizer.model_max_length == 77
    with torch.device("meta"):
        counts = [sum(p.numel() for p in model.parameters()) for model in (
            UNet2DConditionModel.from_config(unet), AutoencoderKL.from_config(vae), CLIPTextModel(text))]
    assert counts == [859_520_964, 83_653_863, 123_060_480]


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_loads_with_no_network_at_all(tiny_dir, tmp_path, monkeypatch, tiny_single_file_config, suffix):
    """The tiny model written as an original-layout checkpoint loads through the same path as an SD1.5
    file, with every socket refused: each weight, the tokenizer and the schedule equal the folder's."""
    import socket

    from safetensors.torch import save_file

    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_file(original_layout(tiny_dir), path)
    else:
        torch.save({"state_dict": original_layout(tiny_dir), "global_step": 470000}, path)  # as original SD .ckpt files

    def no_network(*args, **kwargs):
        raise OSError("network access during a single-file load")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    loaded = load_base(str(path), device="cpu")
    reference = load_base(str(tiny_dir), device="cpu")
    for part in ("unet", "vae", "text_encoder"):
        got, want = getattr(loaded, part).state_dict(), getattr(reference, part).state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[key], want[key]) for key in want), part
    assert loaded.fingerprint == reference.fingerprint and loaded.scheduler_config == reference.scheduler_config
    assert loaded.tokenizer("a photo of a dog").input_ids == reference.tokenizer("a photo of a dog").input_ids
    assert loaded.is_test_model is False and loaded.name == str(path)


def test_ckpt_with_pickled_objects_says_why_and_how_to_convert(tiny_dir, tmp_path, tiny_single_file_config):
    """An original training .ckpt also pickles Python objects (here argparse.Namespace hyper-parameters,
    as PyTorch Lightning saves them): one line says they are not loaded and gives a conversion command,
    and that command, run as printed, makes a .safetensors file that loads."""
    import argparse
    import shlex
    import subprocess
    import sys

    path = tmp_path / "trained.ckpt"
    torch.save({"state_dict": original_layout(tiny_dir), "hyper_parameters": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(UserError) as caught:
        load_base(str(path), device="cpu")
    message = str(caught.value)
    assert "\n" not in message
    assert "pickled Python objects" in message and "not loaded because unpickling can run any code" in message
    assert f"pass --base {tmp_path / 'trained.safetensors'}" in message
    command = shlex.split(message.split("with ", 1)[1].split(" and pass --base")[0])
    assert command[0] == "python"
    subprocess.run([sys.executable, *command[1:]], check=True, timeout=120)
    converted = load_base(str(tmp_path / "trained.safetensors"), device="cpu")
    assert converted.fingerprint == load_base(str(tiny_dir), device="cpu").fingerprint


@pytest.mark.parametrize("shapes, fragment", [
    ({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
      "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "1024-wide text (SD2.x"),
    ({"conditioner.embedders.1.model.ln_final.weight": (1280,)}, "an SDXL checkpoint"),
    ({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
      "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "9 input channels"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "a LoRA"),
])
def test_single_files_of_other_families_are_refused_by_name(tmp_path, shapes, fragment):
    """Files that are not SD1.x are named for what they are (read from key names and shapes only)."""
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({key: torch.zeros(shape) for key, shape in shapes.items()}, path)
    with pytest.raises(UserError, match="Menagerie loads SD1.5-family models") as caught:
        load_base(str(path), device="cpu")
    assert fragment in str(caught.value)
