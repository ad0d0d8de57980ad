"""Concept kinds beside ED-LoRA (issue 16): their file forms, how they load, train, merge and reach the CLI.

Custom Diffusion (modifier token + dense cross-attention K/V), joint groups (Gen4Gen / MuDI: one
model trained on composites of every pet) and Cones' file form, on the tiny random model. The
merge math itself is tested in test_custom_diffusion.py and test_cones.py; the toy-world quality
of each kind in test_toyworld_kinds.py.
"""

from __future__ import annotations

import json
import signal
import threading

import pytest
import torch
from PIL import Image

from pipelines.__main__ import main
from pipelines.concept import ConceptLibrary
from pipelines.edlora import (apply_concept, check_concept_tensors, dense_as_lora, expand_concept_tensors, set_active_adapters,
                              shut_update)
from pipelines.errors import Cancelled, UserError
from pipelines.fusion import fuse_concepts, load_fused, merge_methods
from pipelines.layerwise import cross_attention_layers, encode_layerwise
from pipelines.sample import SampleConfig, generate
from pipelines.train import CHECKPOINT_FILE, GroupMember, TrainConfig, train_concept, train_group

from conftest import procedural_photo

pytestmark = pytest.mark.usefixtures("one_thread")


def cd_config(**overrides) -> TrainConfig:
    settings = dict(name="mochi", class_word="dog", steps=3, batch_size=1, crop_probability=0.0, preview_steps=1,
                    kind="custom-diffusion", lr_kv=1e-2)
    settings.update(overrides)
    return TrainConfig(**settings)


def group_config(**overrides) -> TrainConfig:
    settings = dict(name="duo", class_word="dog", steps=3, batch_size=2, crop_probability=0.0, preview_steps=1, kind="joint",
                    multi_subject_probability=0.5)
    settings.update(overrides)
    return TrainConfig(**settings)


def pets() -> list[GroupMember]:
    left = Image.new("L", (64, 64), 0)
    left.paste(255, (8, 8, 40, 56))
    return [GroupMember("aa", "dog", [procedural_photo(0), procedural_photo(1)], [left, left]),
            GroupMember("bb", "cat", [procedural_photo(2)])]


def kv_modules(base) -> list[str]:
    return [f"{name}.{proj}" for name, _ in cross_attention_layers(base.unet) for proj in ("to_k", "to_v")]


# ---------------------------------------------------------------------------------------------
# File forms and loading


def test_dense_updates_load_as_exact_lora_factors():
    for shape in ((3, 5), (5, 3), (4, 4)):
        delta = torch.randn(*shape, dtype=torch.float64)
        down, up = dense_as_lora(delta)
        assert down.shape == (min(shape), shape[1]) and up.shape == (shape[0], min(shape))
        assert torch.equal(up @ down, delta)


def test_shut_update_zeroes_exactly_the_indexed_weights():
    weight = torch.arange(1.0, 13.0).reshape(3, 4)
    update = shut_update(weight, torch.tensor([0, 5, 11], dtype=torch.int32))
    shut = weight + update
    assert shut.reshape(-1)[[0, 5, 11]].eq(0).all()
    assert torch.equal(shut.reshape(-1)[[1, 2, 3, 4, 6, 7, 8, 9, 10]], weight.reshape(-1)[[1, 2, 3, 4, 6, 7, 8, 9, 10]])


def test_custom_diffusion_concept_samples_as_base_with_updated_kv(fresh_base):
    """Loading a Custom Diffusion file = the base with W0 + delta in its K/V layers, and the concept's tokens."""
    base = fresh_base()
    module = kv_modules(base)[0]
    weight = base.unet.get_submodule(module).weight
    delta = torch.randn_like(weight) * 0.1
    tensors = {"embeddings": torch.randn(2, 16, 32) * 0.1, f"unet.{module}.delta": delta}
    check_concept_tensors(tensors, base, kind="custom-diffusion")
    apply_concept(base, "mochi", tensors, lora_scale=0.5)  # the scale does not apply to these kinds
    set_active_adapters(base.unet, ["mochi"])
    x = torch.randn(3, weight.shape[1])
    layer = base.unet.get_submodule(module)
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ (weight + delta).T, atol=1e-5)
        set_active_adapters(base.unet, [])
        assert torch.allclose(layer(x), x @ weight.T, atol=1e-6)


def test_cones_concept_shuts_its_neurons_when_loaded(fresh_base):
    base = fresh_base()
    module = kv_modules(base)[1]
    weight = base.unet.get_submodule(module).weight.detach().clone()
    indices = torch.tensor([1, 7, 40, 100], dtype=torch.int32)
    tensors = {"embeddings": torch.randn(2, 1, 32) * 0.1, f"unet.{module}.shut": indices}
    expanded = expand_concept_tensors(tensors, base)
    assert expanded["embeddings"].shape == (2, 16, 32)  # one vector, every layer
    apply_concept(base, "cone", tensors)
    set_active_adapters(base.unet, ["cone"])
    shut = weight.clone().reshape(-1)
    shut[indices.long()] = 0
    x = torch.randn(2, weight.shape[1])
    with torch.no_grad():
        assert torch.allclose(base.unet.get_submodule(module)(x), x @ shut.reshape(weight.shape).T, atol=1e-6)


@pytest.mark.parametrize(
    "kind, tensors, message",
    [
        ("cones", {"embeddings": torch.zeros(2, 1, 32), "unet.x.shut": torch.tensor([3, 1], dtype=torch.int32)}, "sorted, distinct"),
        ("cones", {"embeddings": torch.zeros(2, 1, 32), "unet.x.shut": torch.tensor([1.0, 3.0])}, "1-d int32"),
        ("cones", {"embeddings": torch.zeros(2, 16, 32), "unet.x.shut": torch.tensor([1], dtype=torch.int32)}, "[2, 1, d]"),
        ("custom-diffusion", {"embeddings": torch.zeros(2, 16, 32)}, "holds no unet.<layer>.delta"),
        ("custom-diffusion", {"embeddings": torch.zeros(2, 16, 32), "unet.x.delta": torch.tensor([float("nan")]).expand(2, 2)}, "NaN"),
        ("custom-diffusion", {"embeddings": torch.zeros(2, 16, 32), "text_encoder.x.delta": torch.zeros(2, 2)}, "is not a unet."),
    ],
)
def test_bad_kind_files_are_refused_with_what_is_wrong(kind, tensors, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(".", r"\.")):
        check_concept_tensors(tensors, kind=kind)


def test_kind_files_that_do_not_fit_the_base_are_refused(fresh_base):
    base = fresh_base()
    module = kv_modules(base)[0]
    size = base.unet.get_submodule(module).weight.numel()
    with pytest.raises(UserError, match="indexes past"):
        check_concept_tensors({"embeddings": torch.zeros(2, 1, 32), f"unet.{module}.shut": torch.tensor([size], dtype=torch.int32)},
                              base, kind="cones")
    with pytest.raises(UserError, match="this base needs"):
        check_concept_tensors({"embeddings": torch.zeros(2, 16, 32), f"unet.{module}.delta": torch.zeros(3, 3)}, base,
                              kind="custom-diffusion")
    with pytest.raises(UserError, match="does not have"):
        check_concept_tensors({"embeddings": torch.zeros(2, 16, 32), "unet.nowhere.to_k.delta": torch.zeros(3, 3)}, base,
                              kind="custom-diffusion")


# ---------------------------------------------------------------------------------------------
# Training


def test_custom_diffusion_trains_the_modifier_and_kv_only(fresh_base):
    base = fresh_base()
    result = train_concept(base, [procedural_photo(0)], cd_config(class_prior_probability=0.5, class_images=2))
    assert result.concept.kind == "custom-diffusion"
    deltas = {k for k in result.tensors if k != "embeddings"}
    assert deltas == {f"unet.{m}.delta" for m in kv_modules(base)}  # every cross-attention K/V, nothing else
    assert all(result.tensors[k].abs().max() > 0 for k in deltas)  # all of them trained
    embeddings = result.tensors["embeddings"]
    assert embeddings.shape == (2, 16, 32)
    assert torch.equal(embeddings[0], embeddings[0, :1].expand(16, -1))  # one modifier vector, tied over layers
    table = base.text_encoder.get_input_embeddings().base_table.weight
    dog = table[base.tokenizer("dog", add_special_tokens=False).input_ids[0]]
    assert torch.allclose(embeddings[1], dog.expand(16, -1))  # the class word stays the class word
    assert len(result.losses) == 3


def test_custom_diffusion_resumes_to_the_uninterrupted_result(fresh_base, tmp_path):
    config = cd_config(steps=6, checkpoint_every=3)
    photos = [procedural_photo(0), procedural_photo(1)]
    uninterrupted = train_concept(fresh_base(), photos, config)
    cancel = threading.Event()
    with pytest.raises(Cancelled):
        train_concept(fresh_base(), photos, config, callback=lambda p: p.step == 4 and cancel.set(), cancel=cancel,
                      checkpoint_dir=tmp_path)
    assert (tmp_path / CHECKPOINT_FILE).exists()
    resumed = train_concept(fresh_base(), photos, config, checkpoint_dir=tmp_path, resume=True)
    assert resumed.losses == uninterrupted.losses
    for key, value in uninterrupted.tensors.items():
        assert torch.equal(resumed.tensors[key], value), key


def test_group_members_share_one_lora_and_keep_their_own_words(fresh_base):
    base = fresh_base()
    seen = []
    results = train_group(base, pets(), group_config(), background_prompt="on the grass", callback=lambda p: seen.append(p.step))
    assert seen == [1, 2, 3]
    a, b = results
    assert (a.concept.name, b.concept.name) == ("aa", "bb")
    for r in results:
        assert r.concept.kind == "joint" and r.concept.group == "duo" and r.concept.members == ["aa", "bb"]
    lora = [k for k in a.tensors if k != "embeddings"]
    assert lora and set(lora) == set(b.tensors) - {"embeddings"}
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in lora)  # one shared LoRA
    assert not torch.equal(a.tensors["embeddings"], b.tensors["embeddings"])  # each pet its own words
    check_concept_tensors(a.tensors, base, kind="joint")


def test_group_composites_name_every_pet_and_weigh_each_pet_alone(fresh_base, monkeypatch):
    """Composite examples caption both pets and give the loss one region per pet (plus a drawn background)."""
    import pipelines.train as train_module

    seen = []
    real = train_module.region_masked_mse

    def spy(prediction, target, regions):
        seen.append(regions.clone())
        return real(prediction, target, regions)

    monkeypatch.setattr(train_module, "region_masked_mse", spy)
    captions = []
    real_encode = train_module.encode_layerwise
    monkeypatch.setattr(train_module, "encode_layerwise", lambda tok, enc, prompts: captions.extend(prompts) or real_encode(tok, enc, prompts))
    train_group(fresh_base(), pets(), group_config(multi_subject_probability=1.0, steps=2))
    assert all("<aa>" in c and "<bb>" in c for c in captions[:4])
    regions = torch.cat(seen)
    assert regions.shape[1:] == (3, 8, 8)  # aa, bb, background
    assert (regions[:, 0].sum((1, 2)) > 0).all() and (regions[:, 1].sum((1, 2)) > 0).all()
    assert (regions[:, 0] * regions[:, 1]).sum() == 0  # the pets never share a pixel
    assert regions[:, 2].sum() == 0  # black backgrounds (no prompt, no photos) are not trained on


def test_region_loss_weighs_each_region_equally():
    from pipelines.train import masked_mse, region_masked_mse

    prediction, target = torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4)
    target[:, :, 0, 0] = 2.0  # error 4 on one pixel of region 0 (1 pixel), none in region 1 (15 pixels)
    regions = torch.zeros(1, 2, 4, 4)
    regions[0, 0, 0, 0] = 1
    regions[0, 1] = 1 - regions[0, 0]
    assert region_masked_mse(prediction, target, regions).item() == pytest.approx((4.0 + 0.0) / 2)
    assert masked_mse(prediction, target, regions.sum(1, keepdim=True)).item() == pytest.approx(4.0 / 16)
    single = regions[:, :1]
    assert region_masked_mse(prediction, target, single).item() == masked_mse(prediction, target, single).item()


@pytest.mark.parametrize(
    "members, overrides, message",
    [
        (lambda: pets()[:1], {}, "at least two pets"),
        (lambda: [pets()[0], pets()[0]], {}, "named twice"),
        (lambda: pets(), {"name": "aa"}, "also a pet's"),
        (lambda: pets(), {"multi_subject_probability": 0.0}, "composites"),
        (lambda: pets(), {"kind": "cones"}, "joint or custom-diffusion"),
        (lambda: [GroupMember("aa", "dog", []), pets()[1]], {}, "no photos"),
    ],
)
def test_bad_groups_are_refused_before_training(fresh_base, members, overrides, message):
    with pytest.raises(UserError, match=message):
        train_group(fresh_base(), members(), group_config(**overrides))


def test_a_joint_kind_is_not_trained_alone(fresh_base):
    with pytest.raises(UserError, match="train-group"):
        train_concept(fresh_base(), [procedural_photo(0)], cd_config(kind="joint"))


# ---------------------------------------------------------------------------------------------
# Merging and sampling


def test_merge_methods_follow_the_kinds():
    assert merge_methods(["edlora", "lora"], ["", ""]) == ["gradient", "weight"]
    assert merge_methods(["joint", "joint"], ["duo", "duo"]) == ["group"]
    assert merge_methods(["joint", "joint"], ["duo", "trio"]) == ["gradient", "weight"]  # two groups: LoRA-shaped
    assert merge_methods(["joint", "edlora"], ["duo", ""]) == ["gradient", "weight"]
    assert merge_methods(["custom-diffusion"] * 2, ["", ""]) == ["custom-diffusion"]
    assert merge_methods(["custom-diffusion"] * 2, ["g", "g"]) == ["group"]
    assert merge_methods(["cones", "cones"], ["", ""]) == ["cones"]
    assert merge_methods(["cones", "edlora"], ["", ""]) == []
    assert merge_methods(["custom-diffusion", "edlora"], ["", ""]) == []


@pytest.fixture(scope="module")
def kinds_library(tiny_dir, tmp_path_factory):
    """A library with a joint pair (aa, bb), two Custom Diffusion concepts and one ED-LoRA concept (read only)."""
    from pipelines.base import load_base

    def fresh_base():
        return load_base(str(tiny_dir), device="cpu")

    torch.set_num_threads(1)
    library = ConceptLibrary(tmp_path_factory.mktemp("kinds") / "library")
    for result in train_group(fresh_base(), pets(), group_config()):
        library.save(result.concept, result.tensors, result.preview)
    for name, seed in (("cd1", 0), ("cd2", 1)):
        result = train_concept(fresh_base(), [procedural_photo(seed)], cd_config(name=name, seed=seed))
        library.save(result.concept, result.tensors, result.preview)
    result = train_concept(fresh_base(), [procedural_photo(3)], TrainConfig(name="ed", class_word="cat", steps=2, batch_size=1,
                                                                            preview_steps=1))
    library.save(result.concept, result.tensors, result.preview)
    return library


def test_each_kind_merges_its_own_way_and_samples(fresh_base, kinds_library):
    base = fresh_base()
    group = generate(base, kinds_library, SampleConfig(prompt="a photo of <aa> and <bb>", steps=2, negative_prompt=""))
    assert group.metadata["fusion_method"] == "group"
    # the group's merge writes exactly the shared LoRA: W - W0 = B A of either member's file
    fused = load_fused(fresh_base(), group.metadata["fused"])
    stored = json.loads((fused.folder / "fused.json").read_text())
    assert stored["method"] == "group" and stored["concepts"] == ["aa", "bb"]
    from safetensors.torch import load_file

    updates = load_file(fused.folder / "fused.safetensors")
    shared = kinds_library.weights("aa")
    key = next(k for k in shared if k.startswith("unet.") and k.endswith("lora_A.weight"))
    module = key[: -len(".lora_A.weight")]
    assert torch.allclose(updates[module], shared[module + ".lora_B.weight"] @ shared[key], atol=1e-6)

    merged = fuse_concepts(fresh_base(), kinds_library, ["cd1", "cd2"])
    assert merged.method == "custom-diffusion"
    assert (merged.folder / "fused.safetensors").exists()
    images = generate(fresh_base(), kinds_library, SampleConfig(prompt="<cd1> and <cd2>", steps=2, negative_prompt="")).images
    assert len(images) == 1


def test_kinds_that_cannot_merge_are_refused_with_a_message(fresh_base, kinds_library):
    with pytest.raises(UserError, match="cannot be merged.*Custom Diffusion"):
        generate(fresh_base(), kinds_library, SampleConfig(prompt="<cd1> and <ed>", steps=2, negative_prompt=""))
    with pytest.raises(UserError, match="does not merge"):
        from pipelines.fusion import FusionConfig

        fuse_concepts(fresh_base(), kinds_library, ["cd1", "cd2"], FusionConfig(method="gradient"))


def test_isolated_sampling_loads_each_kind_per_branch(fresh_base, kinds_library):
    """Isolated Diffusion's branches load each subject's own concept: a CD concept and a group member together."""
    from pipelines.detect import Detection
    from pipelines.isolated import IsolateConfig, Subject, isolate

    def detector(image, labels):
        return [Detection(label, (4.0 + 30 * i, 8.0, 30.0 + 30 * i, 56.0), 0.9, None) for i, label in enumerate(labels)]

    config = IsolateConfig(prompt="a dog and a cat", subjects=(Subject("dog", "a <cd1>"), Subject("cat", "a <aa>")),
                           negative_prompt="", steps=3, boxes=((0, 0, 32, 64), (32, 0, 64, 64)))
    base = fresh_base()
    result = isolate(base, kinds_library, config, detector=detector)  # a merge of these kinds would be refused
    assert result.final.size == (64, 64) and len(result.assignments) == 2
    assert {"cd1", "aa"} <= set(base.loaded_concepts)  # each branch's own concept, no fused model
    assert base.fused is None


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def restore_sigint():
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def test_cli_trains_each_kind_and_lists_kind_and_size(tmp_path, capsys, restore_sigint):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        procedural_photo(i).save(photos / f"p{i}.png")
        procedural_photo(i + 5).save(photos / f"q{i}.png")
    library = tmp_path / "library"
    code = main(["train", "--base", "tiny", "--library", str(library), "--images", str(photos), "--name", "cdpet",
                 "--class-word", "dog", "--steps", "2", "--batch-size", "1", "--kind", "custom-diffusion"])
    out = capsys.readouterr().out
    assert code == 0 and "saved concept <cdpet> (dog, 4 photos, 2 steps" in out and "Custom Diffusion" in out
    pets_dir = {name: tmp_path / name for name in ("aa", "bb")}
    for i, folder in enumerate(pets_dir.values()):
        folder.mkdir()
        procedural_photo(10 + i).save(folder / "x.png")
    code = main(["train-group", "--base", "tiny", "--library", str(library), "--name", "duo", "--pet", f"aa=dog:{pets_dir['aa']}",
                 "--pet", f"bb=cat:{pets_dir['bb']}", "--steps", "2", "--batch-size", "1"])
    assert code == 0 and "saved group duo" in capsys.readouterr().out
    code = main(["concepts", "list", "--library", str(library)])
    listing = capsys.readouterr().out
    assert code == 0
    rows = {line.split()[0]: line for line in listing.splitlines()}
    assert "Custom Diffusion" in rows["<cdpet>"] and "KB" in rows["<cdpet>"]
    assert "joint group" in rows["<aa>"] and "group duo" in rows["<aa>"]
    preview = tmp_path / "preview.png"
    code = main(["train-group", "--library", str(library), "--name", "duo2", "--pet", f"cc=dog:{pets_dir['aa']}",
                 "--pet", f"dd=cat:{pets_dir['bb']}", "--preview", str(preview), "--resolution", "64"])
    assert code == 0 and Image.open(preview).size[0] > 64  # a grid of composites, no model loaded
    code = main(["train-group", "--base", "tiny", "--library", str(library), "--name", "g", "--pet", f"aa=dog:{pets_dir['aa']}"])
    assert code == 2 and "two or more --pet" in capsys.readouterr().err


def test_export_and_rename_know_the_kinds(kinds_library, tmp_path):
    from pipelines.export import export_for_webui

    with pytest.raises(UserError, match="Custom Diffusion concept; A1111"):
        export_for_webui(kinds_library, "cd1", tmp_path / "cd1", how="mean")
    files = export_for_webui(kinds_library, "aa", tmp_path / "aa", how="mean")  # a joint member: its words and the shared LoRA
    assert (tmp_path / "aa" / "aa_lora.safetensors").exists() and files
    with pytest.raises(UserError, match="member of the group 'duo'"):
        kinds_library.rename("aa", "cc")
    assert "aa" in kinds_library.names() and "cc" not in kinds_library.names()


def test_shut_neurons_load_as_low_rank_exact_factors():
    from pipelines.edlora import shut_as_lora

    weight = torch.randn(6, 5)
    indices = torch.tensor([0, 3, 21, 22], dtype=torch.int32)  # rows 0 and 4
    down, up = shut_as_lora(weight, indices)
    assert down.shape == (2, 5) and up.shape == (6, 2)
    assert torch.equal(up @ down, shut_update(weight, indices))
