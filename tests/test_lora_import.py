"""pipelines.lora_import: LoRA files in every naming and Mix-of-Show checkpoints become concepts.

One set of random LoRA deltas is written in each naming (kohya, A1111's LDM block names, diffusers,
old diffusers, peft); each import must give back those deltas, sample like the LoRA loaded by
diffusers' own `load_lora_weights` with the prompt "trigger class", and take part in fusion.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines.base import load_base
from pipelines.concept import Concept, ConceptLibrary, trigger_prompt_to_concept
from pipelines.edlora import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_lora, apply_concept, set_active_adapters
from pipelines.errors import UserError
from pipelines.layerwise import concept_tokens, encode_layerwise, expand_prompt
from pipelines.lora_import import (config_scale, fold_alphas, import_lora, import_mix_of_show, naming_of,
                                   phrase_ids)
from pipelines.regional import Region
from pipelines.sample import DEFAULT_NEGATIVE_PROMPT, SampleConfig, generate, initial_latents, make_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")

TRIGGER, CLASS_WORD = "zwx", "dog"  # "zwx" is two CLIP tokens: the concept has three words
UNET_LAYER = re.compile(r".*attentions\.\d\.(transformer_blocks\.0\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))|proj_in|proj_out)")
TEXT_LAYERS = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.out_proj", "encoder.layers.0.mlp.fc1",
               "encoder.layers.1.self_attn.k_proj", "encoder.layers.1.self_attn.v_proj", "encoder.layers.1.mlp.fc2"]
ATTENTION = re.compile(r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|self_attn\.(q|k|v|out)_proj)$")
STEPS = 3


# ---------------------------------------------------------------------------------------------
# One set of LoRA deltas, written in every naming


@pytest.fixture(scope="module")
def ro_base(tiny_dir):
    """A tiny base that imports only read (they never load a concept into it)."""
    return load_base(str(tiny_dir), device="cpu")


@pytest.fixture(scope="module")
def truth(ro_base):
    """Concept layer ("unet.<module>", "text_encoder.<module>") -> (A [r, in], B [out, r], is 1x1 conv): delta = B A.

    Every transformer layer kohya adapts by default: attention, feed-forward, proj_in/proj_out (1x1
    convs here, rank 2), and CLIP attention and MLP layers (in transformers 5 naming)."""
    g = torch.Generator().manual_seed(0)
    layers = {}
    for name, module in ro_base.unet.named_modules():
        if UNET_LAYER.fullmatch(name):
            conv = isinstance(module, torch.nn.Conv2d)
            rank = 2 if conv else 4
            fan_in, fan_out = (module.in_channels, module.out_channels) if conv else (module.in_features, module.out_features)
            layers[f"unet.{name}"] = (torch.randn(rank, fan_in, generator=g) * 0.3, torch.randn(fan_out, rank, generator=g) * 0.3, conv)
    for name in TEXT_LAYERS:
        module = ro_base.text_encoder.get_submodule(("text_model." if hasattr(ro_base.text_encoder, "text_model") else "") + name)
        layers[f"text_encoder.{name}"] = (torch.randn(4, module.in_features, generator=g) * 0.3,
                                          torch.randn(module.out_features, 4, generator=g) * 0.3, False)
    return layers


def file_module(layer: str) -> str:
    """A concept layer as files name the module: the text encoder with transformers 4's "text_model." level."""
    part, module = layer.split(".", 1)
    return f"text_model.{module}" if part == "text_encoder" else module


def ldm_module(module: str) -> str:
    """diffusers UNet module -> the original SD layout's (A1111) names: 2 layers per down block, 3 per up block."""
    if m := re.fullmatch(r"down_blocks\.(\d)\.attentions\.(\d)\.(.*)", module):
        return f"input_blocks.{3 * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.*)", module):
        return f"middle_block.1.{m[1]}"
    m = re.fullmatch(r"up_blocks\.(\d)\.attentions\.(\d)\.(.*)", module)
    return f"output_blocks.{3 * int(m[1]) + int(m[2])}.1.{m[3]}"


def factors(a: torch.Tensor, b: torch.Tensor, conv: bool, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The file's (down, up) for delta = scale * up down = B A: up = B / scale, 4-d for a conv."""
    up = b / scale
    return (a[:, :, None, None], up[:, :, None, None]) if conv else (a, up)


def kohya_file(truth, path: Path, ldm: bool = False) -> Path:
    """kohya/A1111 naming, alpha 1 (scale 1 / rank), fp16 as kohya saves."""
    tensors = {}
    for layer, (a, b, conv) in truth.items():
        part, module = layer.split(".", 1)
        if part == "unet":
            name = "lora_unet_" + (ldm_module(module) if ldm else module).replace(".", "_")
        else:
            name = "lora_te_" + file_module(layer).replace(".", "_")
        down, up = factors(a, b, conv, scale=1.0 / a.shape[0])
        tensors.update({f"{name}.lora_down.weight": down.half(), f"{name}.lora_up.weight": up.half(),
                        f"{name}.alpha": torch.tensor(1.0)})
    save_file(tensors, path)
    return path


def diffusers_file(truth, path: Path) -> Path:
    """diffusers naming with its lora_adapter_metadata: lora_alpha 8 over rank 4 (scale 2), proj layers alpha 1 over rank 2."""
    tensors = {}
    for layer, (a, b, conv) in truth.items():
        part, _ = layer.split(".", 1)
        down, up = factors(a, b, conv, scale=0.5 if conv else 2.0)
        tensors.update({f"{part}.{file_module(layer)}.lora_A.weight": down, f"{part}.{file_module(layer)}.lora_B.weight": up})
    # the LoraConfig of each model, as diffusers' save_lora_weights packs it (target modules as training scripts name them)
    metadata = {"unet.r": 4, "unet.lora_alpha": 8, "unet.target_modules": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                                                                           "ff.net.2", "proj_in", "proj_out"],
                "unet.rank_pattern": {"proj_in": 2, "proj_out": 2}, "unet.alpha_pattern": {"proj_in": 1, "proj_out": 1},
                "text_encoder.r": 4, "text_encoder.lora_alpha": 8,
                "text_encoder.target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"lora_adapter_metadata": json.dumps(metadata)})
    return path


def old_diffusers_file(truth, path: Path) -> Path:
    """diffusers before peft: attention processors' to_q_lora.down (UNet and CLIP), .lora.down for other UNet
    layers, lora_linear_layer.down for CLIP's MLP; scale 1."""
    tensors = {}
    for layer, (a, b, conv) in truth.items():
        part, module = layer.split(".", 1)
        down, up = factors(a, b, conv)
        if part == "unet" and ATTENTION.search(module):
            attention, leaf = re.fullmatch(r"(.*attn[12])\.(to_q|to_k|to_v|to_out)(\.0)?", module).groups()[:2]
            stem = f"unet.{attention}.processor.{leaf}_lora"
            keys = (f"{stem}.down.weight", f"{stem}.up.weight")
        elif part == "unet":
            keys = (f"unet.{module}.lora.down.weight", f"unet.{module}.lora.up.weight")
        elif ATTENTION.search(module):
            attention, leaf = re.fullmatch(r"(.*self_attn)\.(q|k|v|out)_proj", file_module(layer)).groups()
            stem = f"text_encoder.{attention}.to_{leaf}_lora"
            keys = (f"{stem}.down.weight", f"{stem}.up.weight")
        else:
            keys = (f"text_encoder.{file_module(layer)}.lora_linear_layer.down.weight",
                    f"text_encoder.{file_module(layer)}.lora_linear_layer.up.weight")
        tensors.update({keys[0]: down, keys[1]: up})
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def peft_file(truth, folder: Path) -> Path:
    """A peft PeftModel save of the UNet alone (adapter_model.safetensors + adapter_config.json, alpha 2 over
    rank 4), its 1x1 conv factors written 2-d as a linear-projection UNet would have them."""
    folder.mkdir(exist_ok=True)
    tensors = {}
    for layer, (a, b, _) in truth.items():
        if layer.startswith("unet."):
            down, up = factors(a, b, False, scale=1.0 if a.shape[0] == 2 else 0.5)
            tensors.update({f"base_model.model.{layer[5:]}.lora_A.weight": down, f"base_model.model.{layer[5:]}.lora_B.weight": up})
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 2, "rank_pattern": {"proj_in": 2, "proj_out": 2},
                                                            "alpha_pattern": {"proj_in": 2, "proj_out": 2}, "peft_type": "LORA"}))
    return folder / "adapter_model.safetensors"


WRITERS = {
    "kohya": lambda truth, d: kohya_file(truth, d / "kohya.safetensors"),
    "a1111-ldm": lambda truth, d: kohya_file(truth, d / "a1111.safetensors", ldm=True),
    "diffusers": lambda truth, d: diffusers_file(truth, d / "diffusers.safetensors"),
    "diffusers-old": lambda truth, d: old_diffusers_file(truth, d / "old.safetensors"),
    "peft": lambda truth, d: peft_file(truth, d / "peft"),
}


def expected_layers(truth, naming: str) -> dict:
    if naming == "peft":  # a UNet adapter alone
        return {k: v for k, v in truth.items() if k.startswith("unet.")}
    return truth


@pytest.fixture(scope="module")
def work_base(tiny_dir):
    """A tiny base the sampling tests load concepts into (each samples with exactly its own concepts)."""
    return load_base(str(tiny_dir), device="cpu")


@pytest.fixture(scope="module")
def files(truth, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-files")
    return {naming: write(truth, folder) for naming, write in WRITERS.items()}


@pytest.fixture(scope="module")
def imported(files, ro_base, tmp_path_factory):
    """A library holding each file imported under its naming's name."""
    library = ConceptLibrary(tmp_path_factory.mktemp("lora-library"))
    for naming, file in files.items():
        import_lora(library, file, naming.replace("-", ""), CLASS_WORD, TRIGGER, ro_base,
                    trigger_prompt=f"a photo of {TRIGGER} {CLASS_WORD} on the grass")
    return library


# ---------------------------------------------------------------------------------------------
# Pure functions


def test_naming_of_each_kind_of_key():
    assert naming_of(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]) == "kohya"
    assert naming_of(["lora_unet_input_blocks_1_1_proj_in.alpha", "lora_te_text_model_x.lora_up.weight"]) == "a1111-ldm"
    assert naming_of(["unet.down_blocks.0.attn1.to_q.lora_A.weight"]) == "diffusers"
    assert naming_of(["unet.down_blocks.0.attn1.processor.to_q_lora.down.weight"]) == "diffusers-old"
    assert naming_of(["base_model.model.down_blocks.0.attn1.to_q.lora_A.weight"]) == "peft"
    with pytest.raises(UserError, match="mixes kohya keys"):
        naming_of(["lora_unet_x.lora_down.weight", "unet.x.lora_A.weight"])


def test_fold_alphas_hand_checked():
    """kohya's scale alpha / rank goes into the up factor; alpha 0 means scale 1; fp16 becomes fp32."""
    raw = {"a.lora_down.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "a.lora_up.weight": torch.tensor([[1.0, -2.0]]).half(),
           "a.alpha": torch.tensor(1.0), "b.lora_down.weight": torch.ones(1, 2), "b.lora_up.weight": torch.full((3, 1), 5.0),
           "b.alpha": torch.tensor(0.0)}
    out = fold_alphas(raw)
    assert set(out) == {"a.lora_down.weight", "a.lora_up.weight", "b.lora_down.weight", "b.lora_up.weight"}
    assert torch.equal(out["a.lora_up.weight"], torch.tensor([[0.5, -1.0]]))  # alpha 1 over rank 2
    assert out["a.lora_up.weight"].dtype == torch.float32
    assert torch.equal(out["b.lora_up.weight"], torch.full((3, 1), 5.0))
    with pytest.raises(UserError, match="layer 'c' has down but no up factor"):
        fold_alphas({"c.lora_down.weight": torch.ones(1, 2)})


def test_config_scale_reads_patterns_and_rslora():
    config = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"proj_in": 1}}
    assert config_scale(config, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 4) == 2.0
    assert config_scale(config, "down_blocks.0.attentions.0.proj_in", 2) == 0.5
    assert config_scale({"lora_alpha": 8, "use_rslora": True}, "x", 16) == 2.0  # alpha / sqrt(r)
    assert config_scale({}, "x", 4) == 1.0


def test_trigger_prompt_names_the_subject_as_trained():
    assert trigger_prompt_to_concept("a photo of ZWX   dog, on grass", "zwx", "dog", "rex") == "a photo of <rex>, on grass"
    with pytest.raises(UserError, match="does not name the subject as 'zwx dog'"):
        trigger_prompt_to_concept("a photo of zwxdog", "zwx", "dog", "rex")
    with pytest.raises(UserError, match="does not name the subject"):
        trigger_prompt_to_concept("a photo of a dog", "zwx", "dog", "rex")


def test_expand_prompt_gives_each_concept_its_word_count():
    assert expand_prompt("a <kx> and <ed>", 4, {"kx": 3, "ed": 2}) == "a <kx-r4> <kx-c4> <kx-a4> and <ed-r4> <ed-c4>"
    assert concept_tokens("kx", 3)[32:34] == ["<kx-a0>", "<kx-a1>"]


# ---------------------------------------------------------------------------------------------
# Importing each naming


@pytest.mark.parametrize("naming", list(WRITERS))
def test_import_gives_back_the_source_deltas(imported, truth, ro_base, naming):
    """B A of every imported layer equals the source delta (fp16 kohya factors: to fp16 precision)."""
    name = naming.replace("-", "")
    record = imported.get(name)
    assert (record.kind, record.source_format, record.trigger, record.word_count) == ("lora", naming, TRIGGER, 3)
    tensors = imported.weights(name, ro_base)
    expected = expected_layers(truth, naming)
    assert {k.rsplit(".lora_", 1)[0] for k in tensors if k != "embeddings"} == set(expected)
    tolerance = 2e-3 if naming in ("kohya", "a1111-ldm") else 1e-5  # kohya's files are fp16
    for layer, (a, b, conv) in expected.items():
        down, up = tensors[f"{layer}.lora_A.weight"], tensors[f"{layer}.lora_B.weight"]
        assert down.ndim == (4 if conv else 2)  # as the base's layer: proj_in is a 1x1 conv here
        delta = up.flatten(1) @ down.flatten(1)
        assert torch.allclose(delta, b @ a, rtol=tolerance, atol=tolerance), layer
    # the words are the base's own embeddings of "zwx dog", in all 16 layers
    ids = phrase_ids(ro_base.tokenizer, f"{TRIGGER} {CLASS_WORD}")
    rows = ro_base.text_encoder.get_input_embeddings().weight[ids].detach()
    assert torch.equal(tensors["embeddings"], rows[:, None].expand(-1, 16, -1))


def test_concept_encodes_exactly_as_the_trigger_phrase(imported, work_base):
    """With the text LoRA off, "<name>" encodes as "zwx dog"; with it on, still the same as the phrase."""
    base = work_base
    apply_concept(base, "kohya", imported.weights("kohya", base))
    set_active_adapters(base.text_encoder, [])
    with torch.no_grad():
        ours = encode_layerwise(base.tokenizer, base.text_encoder, ["a photo of <kohya> on the grass"])
        phrase = encode_layerwise(base.tokenizer, base.text_encoder, [f"a photo of {TRIGGER} {CLASS_WORD} on the grass"])
        assert torch.allclose(ours, phrase, rtol=0, atol=1e-6)
        set_active_adapters(base.text_encoder, ["kohya"])
        with_lora = encode_layerwise(base.tokenizer, base.text_encoder, ["a photo of <kohya> on the grass"])
        phrase_lora = encode_layerwise(base.tokenizer, base.text_encoder, [f"a photo of {TRIGGER} {CLASS_WORD} on the grass"])
    assert torch.allclose(with_lora, phrase_lora, rtol=0, atol=1e-6)
    assert (with_lora - ours).abs().max() > 1e-2  # and the text LoRA acts


def test_imported_concept_samples_plain_and_regional(imported, work_base, ro_base):
    """Plain and regional images with the imported concept differ from the same prompts without it."""
    base = work_base
    settings = dict(steps=STEPS, width=64, height=64, seed=3)
    regions = lambda prompt: [Region((0, 0, 32, 64), prompt)]  # noqa: E731
    plain = np.asarray(generate(base, imported, SampleConfig(prompt="a photo of <peft> on the grass", **settings)).images[0], float)
    regional = np.asarray(generate(base, imported, SampleConfig(prompt="a dog on the grass", **settings),
                                   regions=regions("a photo of <diffusersold>")).images[0], float)
    bare = ro_base  # the same prompts, written out, on the base alone (no concept loaded into it)
    plain_base = np.asarray(generate(bare, imported, SampleConfig(prompt=f"a photo of {TRIGGER} dog on the grass", **settings)).images[0], float)
    regional_base = np.asarray(generate(bare, imported, SampleConfig(prompt="a dog on the grass", **settings),
                                        regions=regions(f"a photo of {TRIGGER} dog")).images[0], float)
    assert np.abs(plain - plain_base).mean() > 2
    assert np.abs(regional[:, :32] - regional_base[:, :32]).mean() > 2  # inside the box


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_dir, ro_base):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("dpm++", ro_base.scheduler_config)  # Menagerie's DPM-Solver++
    return pipe


@pytest.mark.parametrize("naming", ["kohya", "diffusers"])
def test_sampling_equals_diffusers_load_lora_weights(imported, files, work_base, diffusers_pipe, naming):
    """Menagerie with <name> = diffusers' StableDiffusionPipeline + load_lora_weights(file) with the prompt
    "zwx dog": the same text encodings (1e-5) and the same pixels (at most 1/255, uint8 rounding).

    kohya's alpha / rank and diffusers' metadata alphas are read as diffusers reads them. (The A1111 file
    holds kohya's deltas, test_import_gives_back_the_source_deltas; the LoRA moves the picture far
    beyond this tolerance, test_imported_concept_samples_plain_and_regional.)"""
    import diffusers
    from packaging.version import Version

    if naming == "diffusers" and Version(diffusers.__version__) < Version("0.36"):
        pytest.skip("diffusers < 0.36 fails on a LoRA file's own adapter metadata (KeyError 'rank_pattern')")
    base, pipe = work_base, diffusers_pipe
    name = naming.replace("-", "")
    prompt = "a photo of <{}> on the grass"
    config = SampleConfig(prompt=prompt.format(name), steps=STEPS, width=64, height=64, seed=5)
    ours = np.asarray(generate(base, imported, config).images[0], float)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(files[naming].parent), weight_name=files[naming].name)  # diffusers < 0.36 needs weight_name offline
    written_out = prompt.format("").replace("<>", f"{TRIGGER} {CLASS_WORD}")
    with torch.no_grad():
        theirs_text, _ = pipe.encode_prompt(written_out, "cpu", 1, False)
        ours_text = encode_layerwise(base.tokenizer, base.text_encoder, [config.prompt])[:, :77]
    assert torch.allclose(ours_text, theirs_text, rtol=0, atol=1e-5)
    latents = initial_latents(base, 1, 64, 64, config.seed)
    theirs = pipe(written_out, negative_prompt=DEFAULT_NEGATIVE_PROMPT, num_inference_steps=STEPS, guidance_scale=config.guidance,
                  latents=latents, output_type="np").images[0] * 255
    assert np.abs(ours - theirs).max() <= 1.0


# ---------------------------------------------------------------------------------------------
# Fusion and isolation with an imported concept


def edlora_tensors(base, seed: int = 1) -> dict[str, torch.Tensor]:
    """A random ED-LoRA concept for the tiny base: [2, 16, d] and rank-4 LoRA on exactly ED-LoRA's layers."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"embeddings": torch.randn(2, 16, base.text_encoder.config.hidden_size, generator=g) * 0.3}
    for prefix, model, pattern in (("unet", base.unet, UNET_TARGETS), ("text_encoder", base.text_encoder, TEXT_ENCODER_TARGETS)):
        for name, module in model.named_modules():
            if re.fullmatch(pattern, name):
                name = name.removeprefix("text_model.")
                tensors[f"{prefix}.{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=g) * 0.3
                tensors[f"{prefix}.{name}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=g) * 0.3
    return tensors


@pytest.fixture(scope="module")
def pair_library(files, ro_base, tmp_path_factory):
    """An imported kohya LoRA <kx> (more layers than ED-LoRA, 1x1 convs) beside an ED-LoRA concept <ed>."""
    library = ConceptLibrary(tmp_path_factory.mktemp("pair-library"))
    import_lora(library, files["kohya"], "kx", CLASS_WORD, TRIGGER, ro_base, trigger_prompt=f"a photo of {TRIGGER} dog on a beach")
    library.save(Concept("ed", "cat", ro_base.name, ro_base.fingerprint, 0), edlora_tensors(ro_base))
    return library


def test_weight_fusion_of_imported_and_edlora_concepts_is_the_average(pair_library, fresh_base):
    """Weight averaging over the union of layers: a layer only <kx> adapts moves by half its delta
    (a 1x1 conv included, stored in the conv's own shape), a shared layer by the mean of both."""
    from pipelines.fusion import FUSED_WEIGHTS, FusionConfig, concept_deltas, fuse_concepts

    base = fresh_base()
    fused = fuse_concepts(base, pair_library, ["kx", "ed"], FusionConfig(method="weight", spatial_steps=2))
    updates = load_file(fused.folder / FUSED_WEIGHTS)
    kx, ed = (concept_deltas(pair_library.weights(n), "unet") for n in ("kx", "ed"))
    proj = "down_blocks.0.attentions.0.proj_in"
    assert updates[f"unet.{proj}"].shape == base.unet.get_submodule(proj).weight.shape  # [out, in, 1, 1]
    assert torch.allclose(updates[f"unet.{proj}"].flatten(1).double(), kx[proj] / 2, atol=1e-6)
    shared = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    assert torch.allclose(updates[f"unet.{shared}"].double(), (kx[shared] + ed[shared]) / 2, atol=1e-6)
    fc1 = concept_deltas(pair_library.weights("kx"), "text_encoder")["encoder.layers.0.mlp.fc1"]
    assert torch.allclose(updates["text_encoder.encoder.layers.0.mlp.fc1"].double(), fc1 / 2, atol=1e-6)
    assert sorted(fused.record["concepts"]) == ["ed", "kx"]


def test_gradient_fusion_uses_the_trigger_prompt_and_solves_every_layer(pair_library, fresh_base, monkeypatch):
    import pipelines.fusion as fusion

    calls = []
    original = fusion.fusion_prompts
    monkeypatch.setattr(fusion, "fusion_prompts", lambda *args: calls.append(args) or original(*args))
    base = fresh_base()
    fused = fusion.fuse_concepts(base, pair_library, ["kx", "ed"], fusion.FusionConfig(spatial_steps=2))
    assert ("kx", "a photo of <kx> on a beach") in calls and ("ed", "") in calls
    layers = fused.report["layers"]
    for layer in ("unet.down_blocks.0.attentions.0.proj_in", "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2",
                  "text_encoder.encoder.layers.1.mlp.fc2", "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q"):
        errors = (layers.get(layer) or layers[layer.replace("text_encoder.", "text_encoder.text_model.", 1)])["method"]  # transformers 4.x names
        assert all(np.isfinite(v) and v < 1.0 for v in errors.values()), (layer, errors)
    # the closed form fits the summed objective at least as well as averaging, layer by layer
    for layer, row in layers.items():
        assert sum(row["method"].values()) <= sum(row["weight"].values()) + 1e-6, layer


def test_conv_gram_sums_over_pixels():
    """A 1x1 conv is a linear over pixels: its input Gram is X^T X with one row per pixel."""
    from pipelines.fusion import GramRecorder

    conv = torch.nn.Conv2d(3, 5, 1)
    x = torch.randn(2, 3, 4, 6)
    recorder = GramRecorder({"proj_in": conv})
    conv(x)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.allclose(recorder.close()["proj_in"], (rows.T @ rows).double(), atol=1e-5)


def test_isolated_rows_add_a_conv_lora_as_peft_does():
    """Isolated Diffusion's per-row LoRA hook on a 1x1 conv equals peft's own forward for that row."""
    from pipelines.isolated import BASE_ADAPTER, mixed_adapters

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 1))
    add_lora(model, "kx", ["0"], rank=2)
    for p in (model[0].lora_A["kx"].weight, model[0].lora_B["kx"].weight):
        p.data = torch.randn_like(p)
    x = torch.randn(2, 3, 4, 4)
    set_active_adapters(model, ["kx"])
    with torch.no_grad():
        with_lora = model(x)
        set_active_adapters(model, [])
        plain = model(x)
        with mixed_adapters(model, ["kx", BASE_ADAPTER]):
            mixed = model(x)
    assert torch.allclose(mixed[0], with_lora[0], atol=1e-5)
    assert torch.allclose(mixed[1], plain[1], atol=1e-6)
    assert (with_lora - plain).abs().max() > 0.1


def test_isolated_sampling_with_an_imported_concept_in_a_box(pair_library, work_base, monkeypatch):
    """Isolated Diffusion with boxes runs the dog's branch with <kx>'s LoRA (its 1x1 conv layers through
    the per-row hook, test_isolated_rows_add_a_conv_lora_as_peft_does) beside an ED-LoRA concept's branch."""
    import pipelines.isolated as isolated
    from pipelines.detect import Detection
    from pipelines.isolated import IsolateConfig, Subject, isolate

    def detector(image, labels):
        width, height = image.size
        out = []
        for label, (x0, x1) in (("dog", (0, 32)), ("cat", (32, 64))):
            mask = np.zeros((height, width), bool)
            mask[:, x0:x1] = True
            out.append(Detection(label, (float(x0), 0.0, float(x1), float(height)), 0.9, mask))
        return out

    rows = []
    mixed = isolated.mixed_adapters
    monkeypatch.setattr(isolated, "mixed_adapters", lambda unet, names: rows.append(list(names)) or mixed(unet, names))
    config = IsolateConfig(prompt="a dog and a cat on the grass", subjects=(Subject("dog", "a photo of <kx>"), Subject("cat", "a photo of <ed> cat")),
                           boxes=((0, 0, 32, 64), (32, 0, 64, 64)), steps=4, seed=1, width=64, height=64, layout_retries=0)
    result = isolate(work_base, pair_library, config, detector=detector)
    assert rows and {"kx", "ed"} <= set(rows[-1])
    assert [a.status for a in result.assignments] == ["matched", "matched"]


# ---------------------------------------------------------------------------------------------
# Mix-of-Show checkpoints


def mix_of_show_checkpoint(base, words: dict[str, torch.Tensor]) -> dict:
    """What Mix-of-Show's `delta_state_dict` saves: {'params': {new_concept_embedding, text_encoder, unet}}."""
    g = torch.Generator().manual_seed(2)
    params = {"new_concept_embedding": words, "text_encoder": {}, "unet": {}}
    for part, model, pattern in (("unet", base.unet, UNET_TARGETS + "|.*proj_in"), ("text_encoder", base.text_encoder, TEXT_ENCODER_TARGETS)):
        for name, module in model.named_modules():
            if re.fullmatch(pattern, name):
                name = name if part == "unet" or name.startswith("text_model.") else f"text_model.{name}"
                conv = isinstance(module, torch.nn.Conv2d)
                fan_in, fan_out = (module.in_channels, module.out_channels) if conv else (module.in_features, module.out_features)
                down, up = torch.randn(4, fan_in, generator=g), torch.randn(fan_out, 4, generator=g)
                params[part][f"{name}.lora_down.weight"] = down[:, :, None, None] if conv else down
                params[part][f"{name}.lora_up.weight"] = up[:, :, None, None] if conv else up
    return {"params": params}


def test_mix_of_show_checkpoint_becomes_an_edlora_concept(ro_base, tmp_path):
    dim = ro_base.text_encoder.config.hidden_size
    words = {"<potter1>": torch.randn(16, dim), "<potter2>": torch.randn(16, dim)}  # V_rand, V_class: 16 layers each
    checkpoint = mix_of_show_checkpoint(ro_base, words)
    torch.save(checkpoint, tmp_path / "EDLoRA_potter.pth")
    library = ConceptLibrary(tmp_path / "lib")
    record = import_mix_of_show(library, tmp_path / "EDLoRA_potter.pth", "potter", "man", ro_base)
    assert (record.kind, record.word_count, record.source_format) == ("edlora", 2, "mix-of-show")
    assert record.settings["mix_of_show_words"] == ["<potter1>", "<potter2>"]
    tensors = library.weights("potter", ro_base)
    assert torch.equal(tensors["embeddings"][0], words["<potter1>"])  # word k, layer l -> embeddings[k, l]
    assert torch.equal(tensors["embeddings"][1, 5], words["<potter2>"][5])
    params = checkpoint["params"]
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    assert torch.equal(tensors[f"unet.{key}.lora_A.weight"], params["unet"][f"{key}.lora_down.weight"])
    assert torch.equal(tensors[f"unet.{key}.lora_B.weight"], params["unet"][f"{key}.lora_up.weight"])  # alpha 1.0
    text = "encoder.layers.1.self_attn.v_proj"
    assert torch.equal(tensors[f"text_encoder.{text}.lora_B.weight"], params["text_encoder"][f"text_model.{text}.lora_up.weight"])
    assert tensors["unet.up_blocks.2.attentions.1.proj_in.lora_A.weight"].shape[2:] == (1, 1)


def test_mix_of_show_plain_lora_run_repeats_its_one_token(ro_base, tmp_path):
    dim = ro_base.text_encoder.config.hidden_size
    words = {"<a1>": torch.randn(1, dim), "<a2>": torch.randn(1, dim)}  # enable_edlora: false
    torch.save(mix_of_show_checkpoint(ro_base, words), tmp_path / "lora.pth")
    library = ConceptLibrary(tmp_path / "lib")
    import_mix_of_show(library, tmp_path / "lora.pth", "a", "dog", ro_base)
    embeddings = library.weights("a")["embeddings"]
    assert torch.equal(embeddings, torch.stack([words["<a1>"], words["<a2>"]]).expand(-1, 16, -1))


# ---------------------------------------------------------------------------------------------
# Refusals: a clear message, and the library untouched


class NotWeights:  # pickled into a .pth, it would run code on load: weights_only refuses it
    pass


def kohya_key(layer: str, suffix: str = "lora_down.weight") -> str:
    return f"lora_unet_{layer.replace('.', '_')}.{suffix}"


KX = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


@pytest.mark.parametrize("contents, message", [
    ({"unet.down_blocks.0.foo.weight": torch.zeros(2)}, "key 'unet.down_blocks.0.foo.weight' is not a LoRA factor"),
    ({kohya_key(KX): torch.zeros(4, 1024), kohya_key(KX, "lora_up.weight"): torch.zeros(32, 4)},
     re.escape("has shape (4, 1024); this base needs (4, 32)")),
    ({kohya_key("foo_bar"): torch.zeros(4, 8), kohya_key("foo_bar", "lora_up.weight"): torch.zeros(8, 4)},
     "key 'lora_unet_foo_bar.lora_down.weight' names the layer unet.foo.bar, which this base model does not have"),
    ({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 8)}, "an SDXL LoRA"),
    ({kohya_key("down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"): torch.zeros(4, 8)}, "an SDXL LoRA"),
    ({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8)}, "Flux, SD3"),
    ({kohya_key(KX, "hada_w1_a"): torch.zeros(4, 8)}, "LyCORIS LoHa"),
    ({kohya_key(KX, "lokr_w1"): torch.zeros(4, 8)}, "LyCORIS LoKr"),
    ({kohya_key(KX, "dora_scale"): torch.zeros(4, 8)}, "a DoRA file"),
    ({kohya_key("down_blocks.0.resnets.0.conv1"): torch.zeros(4, 32, 3, 3),
      kohya_key("down_blocks.0.resnets.0.conv1", "lora_up.weight"): torch.zeros(32, 4, 1, 1)}, re.escape("kernel (3, 3)")),
    ({kohya_key(KX): torch.zeros(4, 32)}, "has down but no up factor"),
    ({}, "holds no tensors"),
])
def test_bad_lora_files_are_refused_and_the_library_untouched(imported, ro_base, tmp_path, contents, message):
    file = tmp_path / "bad.safetensors"
    save_file(contents, file)
    before = imported.names()
    with pytest.raises(UserError, match=message):
        import_lora(imported, file, "bad", CLASS_WORD, TRIGGER, ro_base)
    assert imported.names() == before and not any(p.name.startswith(".") for p in imported.root.iterdir())


def test_bad_files_and_arguments_are_refused(imported, files, ro_base, tmp_path):
    before = imported.names()
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    torch.save({"x": NotWeights()}, tmp_path / "code.pth")
    torch.save(load_file(files["kohya"]), tmp_path / "kohya.pth")
    cases = [
        (lambda: import_lora(imported, tmp_path / "empty.safetensors", "bad", "dog", TRIGGER, ro_base), "empty"),
        (lambda: import_lora(imported, tmp_path / "corrupt.safetensors", "bad", "dog", TRIGGER, ro_base), "not a readable .safetensors file"),
        (lambda: import_lora(imported, tmp_path / "missing.safetensors", "bad", "dog", TRIGGER, ro_base), "does not exist"),
        (lambda: import_lora(imported, files["kohya"], "bad", "dog", "  ", ro_base), "trigger word is missing"),
        (lambda: import_lora(imported, files["kohya"], "bad", "dog", TRIGGER, ro_base, trigger_prompt="a photo of a dog"),
         "does not name the subject as 'zwx dog'"),
        (lambda: import_lora(imported, files["kohya"], "kohya", "dog", TRIGGER, ro_base), "already exists"),
        (lambda: import_lora(imported, files["kohya"], "Bad Name", "dog", TRIGGER, ro_base), "is not valid"),
        (lambda: import_mix_of_show(imported, tmp_path / "code.pth", "bad", "dog", ro_base), "not a readable weights file"),
        (lambda: import_mix_of_show(imported, tmp_path / "kohya.pth", "bad", "dog", ro_base), "not a Mix-of-Show ED-LoRA checkpoint"),
    ]
    for call, message in cases:
        with pytest.raises(UserError, match=message):
            call()
    assert imported.names() == before


def test_cli_import_lora_and_mixofshow(files, ro_base, tiny_dir, tmp_path, capsys):
    from pipelines.__main__ import main

    library = tmp_path / "lib"
    ConceptLibrary(library).save(Concept("potter", "man", ro_base.name, ro_base.fingerprint, 0), edlora_tensors(ro_base))
    code = main(["concepts", "import-lora", str(files["a1111-ldm"]), "--name", "Rex", "--class-word", "dog", "--trigger", TRIGGER,
                 "--prompt", f"photo of {TRIGGER} dog", "--base", str(tiny_dir), "--device", "cpu", "--library", str(library)])
    assert code == 0, capsys.readouterr().err
    record = ConceptLibrary(library).get("rex")
    assert (record.source_format, record.trigger_prompt, record.concept_prompt) == ("a1111-ldm", f"photo of {TRIGGER} dog", "photo of <rex>")
    # a name in use fails before the base loads, for both commands
    for command in (["import-lora", str(files["kohya"]), "--name", "rex", "--trigger", TRIGGER],
                    ["import-mixofshow", str(files["kohya"]), "--name", "potter"]):
        code = main(["concepts", *command, "--class-word", "dog", "--base", "/nonexistent", "--library", str(library)])
        assert code == 2 and "already exists" in capsys.readouterr().err
