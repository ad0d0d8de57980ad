"""pipelines.base: the tiny model on disk, loading bases, devices, fingerprints."""

from __future__ import annotations

import json

import pytest
import torch

from pipelines.base import (
    BaseModel,
    architecture_fingerprint,
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


def test_cuda_default_dtype_is_fp16_where_bf16_is_only_emulated(monkeypatch):
    """`is_bf16_supported()` counts emulation (T4, V100, RTX 20xx): those cards must get fp16.
    A stand-in for such a card says yes only when emulation counts."""
    from pipelines.base import default_dtype

    def emulated_only(including_emulation: bool = True) -> bool:
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", emulated_only)
    assert default_dtype(torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and later
    assert default_dtype(torch.device("cuda")) == torch.bfloat16
    assert default_dtype(torch.device("mps")) == torch.float16 and default_dtype(torch.device("cpu")) == torch.float32


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
    for module in (base.unet, base.text_encoder, base.vae):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
