"""The studio's ecosystem actions (issue 17) through app.py's functions, without a browser, on the tiny
model: the A1111/ComfyUI export of a concept, a fused model as one checkpoint, LoRA and Mix-of-Show
imports (and their refusals, which leave the library as it was), and the Score action on a generated
PNG with tiny random CLIP/DINO models and a stand-in detector."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import app
from conftest import procedural_photo
from pipelines.base import load_base
from pipelines.concept import Concept
from pipelines.detect import Detection
from pipelines.edlora import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_lora, concept_state_dict
from pipelines.errors import UserError
from pipelines.jobs import DONE, FAILED
from pipelines.layerwise import NUM_LAYERS
from pipelines.sample import read_png_metadata
from pipelines.scores import build_tiny_clip, build_tiny_dino
from pipelines.single_file import CHECKPOINT_FORMAT

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one OpenMP thread for tiny ops

NAMES = {"mochi": "dog", "tama": "cat"}
KOHYA_LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"


def stand_in_detector(image, labels):
    """Finds every asked class word as the left or right half of the image, best first."""
    width, height = image.size
    halves = {"dog": (0.0, 0.0, width / 2, float(height)), "cat": (width / 2, 0.0, float(width), float(height))}
    return [Detection(label, halves.get(label, (0.0, 0.0, float(width), float(height))), 0.9) for label in labels]


@pytest.fixture(scope="module")
def studio(tiny_dir, tmp_path_factory):
    """A tiny studio whose library holds <mochi> (dog) and <tama> (cat) with random LoRAs (no training:
    only their weights matter here), scoring with tiny CLIP and DINO folders and the stand-in detector."""
    root = tmp_path_factory.mktemp("ecosystem")
    base = load_base(str(tiny_dir), device="cpu")
    generator = torch.Generator().manual_seed(0)
    studio = app.Studio("tiny", root / "lib", root / "out", detector=stand_in_detector,
                        clip=str(build_tiny_clip(root / "clip")), dino=str(build_tiny_dino(root / "dino")))
    for name, class_word in NAMES.items():
        add_lora(base.text_encoder, name, TEXT_ENCODER_TARGETS)
        add_lora(base.unet, name, UNET_TARGETS)
        for key, param in [*base.text_encoder.named_parameters(), *base.unet.named_parameters()]:
            if f".lora_B.{name}." in key:  # peft starts B at zero: a LoRA that changes nothing
                param.data = torch.randn(param.shape, generator=generator) * 0.1
        embeddings = torch.randn(2, NUM_LAYERS, base.text_encoder.config.hidden_size, generator=generator)
        concept = Concept(name=name, class_word=class_word, base_model="tiny", fingerprint=base.fingerprint, photo_count=3,
                          is_test_model=True)
        studio.library.save(concept, concept_state_dict(base, name, embeddings), Image.new("RGB", (16, 16)))
    studio.root = root
    return studio


def finished(studio, state):
    done = studio.jobs.wait(state.id, timeout=240)
    assert done is not None and not done.active, done
    return done


# ---------------------------------------------------------------------------------------------
# Export for A1111, ComfyUI and Forge


def test_webui_export_is_a_zip_of_the_lora_the_embedding_and_a_readme(studio):
    done = finished(studio, studio.submit_webui_export("mochi"))
    assert done.status == DONE, done.message
    path = Path(done.result)
    assert path.name == "mochi-webui.zip" and path.parent == studio.outputs / ".exports"
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ["README.txt", "mochi.safetensors", "mochi_lora.safetensors"]
        archive.extractall(studio.root / "unzipped")
    unzipped = studio.root / "unzipped"
    lora = load_file(unzipped / "mochi_lora.safetensors")
    assert lora and all(k.startswith(("lora_unet_", "lora_te_")) for k in lora)  # kohya naming, SD1.x
    alphas = [k for k in lora if k.endswith(".alpha")]
    downs = [k for k in lora if k.endswith(".lora_down.weight")]
    assert alphas and len(alphas) == len(downs) and any(k.startswith("lora_te_") for k in downs)
    embedding = load_file(unzipped / "mochi.safetensors")
    assert list(embedding) == ["emb_params"] and embedding["emb_params"].shape == (2, 32)  # 16 layer copies -> one pair
    # the studio distils the pair (fitted to each layer's keys and values), not the plain mean of the copies
    mean = studio.library.weights("mochi")["embeddings"].mean(dim=1)
    assert (embedding["emb_params"] - mean).abs().max() > 1e-3
    readme = (unzipped / "README.txt").read_text()
    assert "<lora:mochi_lora:1>" in readme and "embedding:mochi" in readme
    # beside the format choice, the page says what the collapse loses with the numbers the download's README measured
    loss = readme.split("What the export loses", 1)[1]
    measured = re.findall(r"\d+\.\d+", loss)
    assert measured and re.findall(r"\d+\.\d+", app.webui_export_note()) == measured
    assert "16" in app.webui_export_note() and "lossy" in app.webui_export_note()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no export folder or temp file left behind


def test_webui_export_refuses_without_a_concept_and_writes_nothing(studio):
    with pytest.raises(UserError, match="pick a concept to export first"):
        studio.submit_webui_export("")
    with pytest.raises(UserError, match="rex"):
        studio.submit_webui_export("rex")
    assert not (studio.outputs / ".exports" / "rex-webui.zip").exists()


# ---------------------------------------------------------------------------------------------
# A fused model as one checkpoint


def test_fused_model_exports_as_one_checkpoint_with_embeddings_and_readme(studio):
    fused = finished(studio, studio.submit_fusion(["mochi", "tama"], "weight"))
    assert fused.status == DONE, fused.message
    folder = fused.result
    state = finished(studio, studio.submit_checkpoint_export(folder))
    assert state.status == DONE, state.message
    assert (state.step, state.total) == (2, 2)
    checkpoint, readme, *embeddings = (Path(p) for p in state.result)
    assert checkpoint == studio.outputs / ".exports" / "checkpoints" / "mochi-tama-weight.safetensors"
    with safe_open(str(checkpoint), framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
        assert handle.get_tensor(next(k for k in keys if k.startswith("model.diffusion_model."))).dtype == torch.float32
    for prefix in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert metadata["format"] == CHECKPOINT_FORMAT and metadata["concepts"] == "mochi,tama"
    assert readme.name == "mochi-tama-weight-README.txt" and "models/Stable-diffusion/" in readme.read_text()
    assert [p.name for p in embeddings] == ["mochi.safetensors", "tama.safetensors"]
    assert load_file(embeddings[0])["emb_params"].shape == (2, 32)
    assert studio.models.model.fused == folder  # the base now holds that fused model, as after a generation with it


def test_checkpoint_export_refuses_without_a_fused_model_before_queueing(studio):
    before = len(studio.jobs.jobs())
    with pytest.raises(UserError, match="no fused model selected"):
        studio.submit_checkpoint_export(None)
    with pytest.raises(UserError, match="is not in the library"):
        studio.submit_checkpoint_export(str(studio.root / "nowhere"))
    assert len(studio.jobs.jobs()) == before


# ---------------------------------------------------------------------------------------------
# Imports


def text_module(base, name: str) -> str:
    """A CLIP layer's path in this transformers' naming (5 dropped the "text_model." level)."""
    return f"text_model.{name}" if hasattr(base.text_encoder, "text_model") else name


def kohya_file(path: Path) -> Path:
    """A small kohya LoRA for the tiny model: one UNet and one text-encoder attention layer, alpha 2 of rank 4."""
    base = load_base("tiny", device="cpu")
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for key, module in ((f"lora_unet_{KOHYA_LAYER.replace('.', '_')}", base.unet.get_submodule(KOHYA_LAYER)),
                        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                         base.text_encoder.get_submodule(text_module(base, "encoder.layers.0.self_attn.q_proj")))):
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, module.in_features, generator=generator)
        tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=generator)
        tensors[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(tensors, path)
    return path


def library_files(studio) -> list[str]:
    return sorted(str(p.relative_to(studio.library.root)) for p in studio.library.root.rglob("*") if ".fused" not in p.parts)


def test_a_kohya_lora_becomes_a_concept_that_stands_for_its_trigger_and_class(studio, tmp_path):
    path = kohya_file(tmp_path / "rex_v2.safetensors")
    version = studio.library_version
    state = finished(studio, studio.submit_import(str(path), "Rex", "dog", "ohwx", "photo of ohwx dog on grass"))
    assert state.status == DONE, state.message
    assert state.result.startswith("imported <rex> (dog) from rex_v2.safetensors, a kohya LoRA")
    assert "'Rex' is stored as 'rex'" in state.message  # the name typed "Rex" is kept lowercase, with a note
    concept = studio.library.get("rex")
    assert (concept.kind, concept.trigger, concept.trigger_prompt) == ("lora", "ohwx", "photo of ohwx dog on grass")
    tensors = studio.library.weights("rex")
    b = tensors[f"unet.{KOHYA_LAYER}.lora_B.weight"]
    assert torch.allclose(b, load_file(path)[f"lora_unet_{KOHYA_LAYER.replace('.', '_')}.lora_up.weight"] * 0.5)  # alpha / rank
    assert studio.library_version > version  # the page's library views redraw
    assert not list((studio.outputs / ".imports").iterdir())  # the staged upload is gone
    studio.delete("rex")


def test_a_mix_of_show_checkpoint_becomes_an_edlora_concept(studio, tmp_path):
    base = load_base("tiny", device="cpu")
    generator = torch.Generator().manual_seed(2)
    params = {"new_concept_embedding": {f"<potter{i}>": torch.randn(NUM_LAYERS, 32, generator=generator) for i in (1, 2)},
              "text_encoder": {}, "unet": {}}
    for part, model, module_name in (("unet", base.unet, KOHYA_LAYER),
                                     ("text_encoder", base.text_encoder, "text_model.encoder.layers.0.self_attn.k_proj")):
        module = model.get_submodule(text_module(base, module_name.removeprefix("text_model.")) if part == "text_encoder" else module_name)
        params[part][f"{module_name}.lora_down.weight"] = torch.randn(4, module.in_features, generator=generator)
        params[part][f"{module_name}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=generator)
    torch.save({"params": params}, tmp_path / "EDLoRA_potter.pth")
    state = finished(studio, studio.submit_import(str(tmp_path / "EDLoRA_potter.pth"), "potter", "man", kind="mix-of-show"))
    assert state.status == DONE, state.message
    assert state.result == "imported <potter> (man) from EDLoRA_potter.pth, a Mix-of-Show checkpoint"
    assert studio.library.get("potter").kind == "edlora"
    assert torch.equal(studio.library.weights("potter")["embeddings"][1], params["new_concept_embedding"]["<potter2>"])
    studio.delete("potter")


@pytest.mark.parametrize("content, fragment", [
    (b"not a safetensors file at all", "is not a readable .safetensors file"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}, "LyCORIS LoHa file (key 'lora_unet_down_"),
    ({"lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 32),
      "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(32, 4)},
     "attn2.to_k, which this base model does not have"),
])
def test_a_bad_lora_file_fails_its_job_with_a_message_and_leaves_the_library(studio, tmp_path, content, fragment):
    path = tmp_path / "bad.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        save_file(content, path)
    before, names = library_files(studio), studio.library.names()
    state = finished(studio, studio.submit_import(str(path), "broken", "dog", "ohwx"))
    assert state.status == FAILED and fragment in state.message and "\n" not in state.message, state.message
    assert "internal error" not in state.message
    assert studio.library.names() == names and library_files(studio) == before
    assert not list((studio.outputs / ".imports").iterdir())


@pytest.mark.parametrize("arguments, fragment", [
    (dict(path=None, name="rex", class_word="dog", trigger="ohwx"), "no file given"),
    (dict(name="", class_word="dog", trigger="ohwx"), "no name given"),
    (dict(name="mochi", class_word="dog", trigger="ohwx"), "already exists"),
    (dict(name="rex", class_word="two words", trigger="ohwx"), "class word"),
    (dict(name="rex", class_word="dog", trigger=""), "trigger word is missing"),
    (dict(name="rex", class_word="dog", trigger="ohwx", kind="lycoris"), "import kind"),
])
def test_bad_import_requests_are_refused_before_queueing(studio, tmp_path, arguments, fragment):
    path = tmp_path / "rex.safetensors"
    path.write_bytes(b"x")
    before = len(studio.jobs.jobs())
    with pytest.raises(UserError, match=fragment):
        studio.submit_import(**{"path": str(path), **arguments})
    assert len(studio.jobs.jobs()) == before and "rex" not in studio.library.names()


# ---------------------------------------------------------------------------------------------
# Scores


@pytest.fixture(scope="module")
def generated(studio):
    rows = (app.BoxRow("<mochi>", (0, 0, 32, 64), "a photo of <mochi> dog", find="dog"),)
    request = app.GenerationRequest(mode=app.REGIONAL, prompt="a <mochi> dog in a garden", width=64, height=64, seed=1,
                                    steps=2, guidance=5.0, rows=rows)
    state = finished(studio, studio.submit_generation(request))
    assert state.status == DONE, state.message
    return state.result.images[0]


def reference_photos(folder: Path) -> list[str]:
    folder.mkdir(exist_ok=True)
    paths = [folder / f"ref{i}.png" for i in range(2)]
    for i, path in enumerate(paths):
        procedural_photo(i).save(path)
    return [str(p) for p in paths]


def test_score_on_a_generated_png_gives_a_table_of_the_six_scores(studio, generated, tmp_path):
    assert studio.score_concepts([generated]) == ["mochi"] == read_png_metadata(generated)["concepts"]
    state = finished(studio, studio.submit_scoring([generated], {"mochi": reference_photos(tmp_path)}))
    assert state.status == DONE, state.message
    (row,) = state.result
    assert all(isinstance(row[key], float) for key in app.SCORE_COLUMNS), row  # the stand-in detector found the dog
    assert 0 <= row["clip_t"] <= 2.5 and row["scr"] in (0.0, 1.0)
    table = app.score_rows(state.result)
    assert table == [[Path(generated).name, *(round(row[key], 4) for key in app.SCORE_COLUMNS)]]
    assert list(app.SCORE_COLUMNS.values()) == ["CLIP-T", "CLIP-I", "DINO-I", "CP-CLIP", "TI-CLIP", "SCR"]
    two = app.score_rows([row, {**row, "cp_clip": None}])
    assert two[-1][0] == "mean" and two[1][4] == "-" and two[-1][4] == round(row["cp_clip"], 4)


def test_score_without_reference_photos_or_images_is_refused_before_queueing(studio, generated):
    before = len(studio.jobs.jobs())
    with pytest.raises(UserError, match="no reference photos of <mochi>"):
        studio.submit_scoring([generated], {})
    with pytest.raises(UserError, match="no image to score"):
        studio.submit_scoring([], {})
    assert len(studio.jobs.jobs()) == before


def test_score_models_that_cannot_load_give_one_line_not_a_traceback(studio, generated, tmp_path, monkeypatch):
    from pipelines import hub

    refs = {"mochi": reference_photos(tmp_path)}
    monkeypatch.setattr(studio, "clip", "openai/clip-vit-base-patch32")
    if not hub.cached(studio.clip, "config.json"):  # offline and uncached: said before queueing, in one line
        with pytest.raises(UserError) as refused:
            studio.submit_scoring([generated], refs)
        message = str(refused.value)
        assert "\n" not in message and "hf download openai/clip-vit-base-patch32" in message and "--clip tiny" in message
    (tmp_path / "not-a-model").mkdir()
    monkeypatch.setattr(studio, "clip", str(tmp_path / "not-a-model"))  # a folder passes the check; loading fails the job
    state = finished(studio, studio.submit_scoring([generated], refs))
    assert state.status == FAILED and "is a folder but not a transformers CLIP model" in state.message
    assert "\n" not in state.message and "Traceback" not in state.message


def test_demo_mode_says_scores_need_the_real_models(studio, generated):
    demo_like = app.Studio("tiny", studio.library.root, studio.outputs, detector=stand_in_detector, demo=object())
    with pytest.raises(UserError, match="Scores need the real CLIP"):
        demo_like.submit_scoring([generated], {"mochi": ["x.png"]})
    assert "Scores need the real CLIP" in app.score_intro(demo_like)


# ---------------------------------------------------------------------------------------------
# The page


def test_the_page_has_the_export_dialog_import_form_checkpoint_button_and_score_section(studio):
    demo = app.build_app("tiny", str(studio.library.root), studio=studio)
    components = demo.get_config_file()["components"]
    by_id = {c["props"].get("elem_id"): c["props"] for c in components if c.get("props", {}).get("elem_id")}
    assert [choice[0] for choice in by_id["export-format"]["choices"]] == [app.MENAGERIE_FORMAT, app.WEBUI_FORMAT]
    assert by_id["export-note"]["value"] == app.webui_export_note() and by_id["export-dialog"]["visible"] is False
    assert [choice[0] for choice in by_id["import-kind"]["choices"]] == [app.LORA_FILE, app.MIX_OF_SHOW_FILE]
    for elem_id in ("import-file", "import-concept-name", "import-class", "import-trigger", "import-prompt", "import-go",
                    "checkpoint-half", "score-button", "score-refs-0"):
        assert elem_id in by_id, elem_id
    assert by_id["checkpoint-button"]["value"] == "Export as one checkpoint (A1111/ComfyUI)"
    assert by_id["score-table"]["headers"] == ["image", "CLIP-T", "CLIP-I", "DINO-I", "CP-CLIP", "TI-CLIP", "SCR"]
