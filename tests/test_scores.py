"""pipelines.scores: hand-computed score formulas, tiny random CLIP/DINO loaded by the real loader,
evaluate() end to end with a fake detector, the offline error, and `python -m pipelines evaluate`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import hub
from pipelines.__main__ import main
from pipelines.concept import Concept, ConceptLibrary
from pipelines.detect import Detection
from pipelines.errors import UserError
from pipelines.sample import save_png
from pipelines.scores import (
    DEFAULT_CLIP, DEFAULT_DINO, ScoreModels, assign_crops, build_tiny_clip, build_tiny_dino, class_caption, clip_i,
    clip_image_embeddings, clip_t, clip_text_embeddings, cosine_similarity, cp_clip, crop_box, dino_crop,
    dino_embeddings, dino_i, evaluate, keep_boxes, load_score_models, load_scorer, model_problem, parse_concept_arg, plan_images,
    prompt_concepts, reference_similarity, score_images, subject_collapse_rate, ti_clip,
)

from conftest import fake_concept_tensors, procedural_photo

T = torch.tensor


# ---------------------------------------------------------------------------------------------
# Formulas on synthetic embeddings


def test_cosine_similarity_by_hand():
    sim = cosine_similarity(T([[1.0, 0.0], [0.0, 2.0]]), T([[3.0, 4.0]]))
    assert sim.shape == (2, 1)
    assert sim[:, 0].tolist() == pytest.approx([0.6, 0.8])


def test_clip_t_is_clipscore_and_ti_clip_the_raw_cosine():
    image = T([1.0, 0.0])
    assert clip_t(image, T([3.0, 4.0])) == pytest.approx(2.5 * 0.6)  # w * cos
    assert clip_t(image, T([-3.0, 4.0])) == 0.0  # a negative cosine is clipped to 0
    assert ti_clip(image, T([3.0, 4.0])) == pytest.approx(0.6)
    assert ti_clip(image, T([-3.0, 4.0])) == pytest.approx(-0.6)  # Gen4Gen's raw cosine keeps the sign


def test_clip_i_and_dino_i_are_the_mean_cosine_over_references():
    refs = T([[2.0, 0.0], [0.0, 1.0], [3.0, 4.0]])  # cosines with [1, 0]: 1, 0, 0.6
    assert clip_i(T([1.0, 0.0]), refs) == pytest.approx((1 + 0 + 0.6) / 3)
    assert dino_i(T([1.0, 0.0]), refs) == pytest.approx((1 + 0 + 0.6) / 3)
    assert clip_i(T([-1.0, 0.0]), refs) == pytest.approx(-1.6 / 3)  # raw cosines, no clipping (CustomConcept101)


def test_reference_similarity_is_one_mean_per_crop_and_concept():
    crops = T([[1.0, 0.0], [0.0, 1.0]])
    sim = reference_similarity(crops, [T([[1.0, 0.0], [1.0, 1.0]]), T([[0.0, 5.0]])])
    half = 1 / math.sqrt(2)
    assert sim.tolist() == [pytest.approx([(1 + half) / 2, 0.0]), pytest.approx([half / 2, 1.0])]


def test_assign_crops_maximises_the_total_not_greedily():
    # greedy would give crop 0 to concept 0 (0.9) and leave crop 1 with 0.1 for concept 1: total 1.0;
    # the best assignment is crop 1 -> concept 0, crop 0 -> concept 1: 0.85 + 0.8 = 1.65
    assert assign_crops(T([[0.9, 0.8], [0.85, 0.1]])) == [1, 0]


def test_assign_crops_leaves_concepts_without_a_crop_missing():
    assert assign_crops(T([[0.2, 0.7, 0.4]])) == [None, 0, None]
    assert assign_crops(torch.zeros(0, 2)) == [None, None]
    assert assign_crops(T([[0.1], [0.9], [0.3]])) == [1]  # extra crops are left out


def test_cp_clip_by_hand():
    assert cp_clip(T([[0.6, 0.2], [0.3, 0.5]]), [0, 1]) == pytest.approx((0.6 + 0.5) / 2)
    assert cp_clip(T([[0.6, 0.2]]), [0, None]) == pytest.approx(0.6 / 2)  # a missing subject scores zero
    assert cp_clip(torch.zeros(0, 3), [None, None, None]) == 0.0


def test_cp_clip_counts_a_pet_drawn_twice_once():
    # two crops of the same pet (both close to concept 0): Gen4Gen's max-per-crop rule would give
    # (0.8 + 0.75) / 2 = 0.775; one crop per concept gives (0.8 + 0.3) / 2
    similarity = T([[0.8, 0.3], [0.75, 0.3]])
    assert cp_clip(similarity, assign_crops(similarity)) == pytest.approx(0.55)


def test_subject_collapse_rate_by_hand():
    dino = T([[0.7, 0.2], [0.1, 0.45]])
    assert subject_collapse_rate(dino, [0, 1]) == 0.5  # 0.45 < 0.5 collapsed, 0.7 kept
    assert subject_collapse_rate(dino, [0, 1], threshold=0.4) == 0.0
    assert subject_collapse_rate(T([[0.9, 0.1]]), [0, None]) == 0.5  # a missing subject has collapsed
    assert subject_collapse_rate(T([[0.5, 0.5]]), [0, None], threshold=0.5) == 0.5  # exactly 0.5 is kept


# ---------------------------------------------------------------------------------------------
# Captions, crops and arguments


def test_class_caption_replaces_tokens_and_their_class_word():
    words = {"mochi": "dog", "tama": "cat"}
    assert class_caption("a photo of <mochi> dog and <Tama> on a beach", words) == "a photo of dog and cat on a beach"
    assert class_caption("<mochi> <mochi> dog", words) == "dog dog"
    assert class_caption("a dog and a cat", words) == "a dog and a cat"


def test_prompt_concepts_in_order_once_lowercase():
    assert prompt_concepts("<Mochi> dog and <tama> cat and <mochi>") == ["mochi", "tama"]
    assert prompt_concepts("a dog") == []


def test_dino_crop_resizes_the_short_side_then_takes_the_centre():
    pixels = np.zeros((50, 100, 3), np.uint8)
    pixels[:, :50] = (255, 0, 0)
    pixels[:, 50:] = (0, 0, 255)
    view = dino_crop(Image.fromarray(pixels), 224)
    assert view.size == (224, 224)
    # resized to 512 x 256, the crop starts at x = 144, so the colour edge (x = 256) lands at 112
    row = np.asarray(view)[112]
    assert tuple(row[100]) == (255, 0, 0) and tuple(row[124]) == (0, 0, 255)


def test_keep_boxes_keeps_the_best_k_per_class_word():
    found = [Detection("dog", (0, 0, 1, 1), 0.9), Detection("bird", (0, 0, 1, 1), 0.85), Detection("dog", (0, 0, 2, 2), 0.8),
             Detection("cat", (0, 0, 3, 3), 0.7), Detection("dog", (0, 0, 4, 4), 0.6)]
    kept = keep_boxes(found, ["dog", "cat", "dog"])
    assert [(d.label, d.score) for d in kept] == [("dog", 0.9), ("dog", 0.8), ("cat", 0.7)]


def test_crop_box_rounds_outwards_and_clips():
    image = Image.new("RGB", (16, 16))
    assert crop_box(image, (1.5, 2.2, 10.1, 20.0)).size == (10, 14)  # x 1..11, y 2..16
    assert crop_box(image, (20, 20, 30, 30)) is None


def test_parse_concept_arg():
    assert parse_concept_arg("Mochi=photos/m") == ("mochi", None, "photos/m")
    assert parse_concept_arg("<mochi>:Dog=photos/m") == ("mochi", "dog", "photos/m")
    with pytest.raises(UserError, match="must look like 'mochi=photos/mochi'"):
        parse_concept_arg("mochi")


# ---------------------------------------------------------------------------------------------
# Tiny random models through the real loader


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("score-models")
    return build_tiny_clip(root / "clip"), build_tiny_dino(root / "dino")


def fake_detector(boxes: dict):
    """A detector that finds `boxes` ({label: [box, ...]}), best first as listed."""

    def find(image, labels):
        found = [Detection(label, box, 0.9 - 0.1 * i) for label in labels for i, box in enumerate(boxes.get(label, []))]
        return sorted(found, key=lambda d: -d.score)

    return find


@pytest.fixture(scope="module")
def models(model_dirs):
    clip_dir, dino_dir = model_dirs
    return ScoreModels(clip=load_scorer("clip", str(clip_dir)), dino=load_scorer("dino", str(dino_dir)), detector=None,
                       device=torch.device("cpu"), names={"clip": str(clip_dir), "dino": str(dino_dir), "detector": None})


def with_detector(models, detector):
    return ScoreModels(clip=models.clip, dino=models.dino, detector=detector, device=models.device,
                       names={**models.names, "detector": "fake"})


def test_loader_reads_a_saved_folder(models):
    clip_processor, clip_model = models.clip
    _, dino_model = models.dino
    assert type(clip_model).__name__ == "CLIPModel" and type(dino_model).__name__ == "ViTModel"
    assert dino_model.pooler is None  # the CLS token is the feature
    images = [procedural_photo(0), procedural_photo(1, size=(48, 64))]
    assert clip_image_embeddings(models, images).shape == (2, 16)  # projection_dim
    assert clip_text_embeddings(models, ["a dog", "a cat on a sofa"]).shape == (2, 16)
    assert dino_embeddings(models, images).shape == (2, 32)  # hidden size


def test_clip_embeddings_equal_transformers_own_feature_methods(models):
    processor, model = models.clip
    image, text = procedural_photo(3), "a dog on the grass"
    with torch.no_grad():
        image_out = model.get_image_features(**processor.image_processor([image], return_tensors="pt"))
        text_out = model.get_text_features(**processor.tokenizer([text], return_tensors="pt"))
    image_features = image_out if torch.is_tensor(image_out) else image_out.pooler_output  # transformers 4 / 5
    text_features = text_out if torch.is_tensor(text_out) else text_out.pooler_output
    assert torch.allclose(clip_image_embeddings(models, [image]), image_features, atol=1e-5)
    assert torch.allclose(clip_text_embeddings(models, [text]), text_features, atol=1e-5)


def test_dino_embedding_is_the_cls_token_of_the_normalised_centre_view(models):
    processor, model = models.dino
    image = procedural_photo(4, size=(80, 40))
    view = np.asarray(dino_crop(image, 32), np.float32) / 255
    pixels = (view - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])  # ImageNet, by hand
    with torch.no_grad():
        cls = model(pixel_values=torch.from_numpy(pixels).permute(2, 0, 1)[None].float()).last_hidden_state[0, 0]
    assert torch.allclose(dino_embeddings(models, [image])[0], cls, atol=1e-5)


@pytest.mark.parametrize("kind, name", [("clip", DEFAULT_CLIP), ("dino", DEFAULT_DINO)])
def test_an_uncached_hub_model_is_a_one_line_error_offline(kind, name):
    if hub.cached(name, "config.json"):
        pytest.skip(f"{name} is in this machine's Hugging Face cache")
    with pytest.raises(UserError) as error:
        load_scorer(kind, name)
    message = str(error.value)
    assert "\n" not in message and name in message and f"hf download {name}" in message and f"--{kind} tiny" in message
    assert name in model_problem(kind, name)


def test_a_folder_that_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(UserError, match="is a folder but not a transformers CLIP model"):
        load_scorer("clip", str(tmp_path))
    assert model_problem("clip", str(tmp_path)) is None  # a folder is the loader's to judge


# ---------------------------------------------------------------------------------------------
# evaluate() end to end


def two_pets():
    """A 64x32 image: pet A's picture on the left half, pet B's on the right; and A's and B's photos."""
    a, b = procedural_photo(1, size=(32, 32)), procedural_photo(2, size=(32, 32))
    scene = Image.new("RGB", (64, 32))
    scene.paste(a, (0, 0))
    scene.paste(b, (32, 0))
    return scene, a, b


def test_evaluate_with_a_detector_matches_crops_to_concepts(models):
    scene, a, b = two_pets()
    concepts = {"rex": ("dog", [a]), "mimi": ("cat", [b])}
    # image 1: both found (the cat listed first, plus a worse second dog that is not kept); image 2: only the dog
    both = fake_detector({"cat": [(32, 0, 64, 32)], "dog": [(0, 0, 32, 32), (10, 0, 42, 32)]})
    result = evaluate([scene], "a photo of <rex> dog and <mimi>", concepts, with_detector(models, both))
    row = result["images"][0]
    assert row["caption"] == "a photo of dog and cat"
    # each crop is exactly its concept's only reference photo: similarity 1 to its own concept
    assert row["concepts"]["rex"]["box"] == [0, 0, 32, 32] and row["concepts"]["mimi"]["box"] == [32, 0, 64, 32]
    assert row["concepts"]["rex"]["crop_clip"] == pytest.approx(1.0, abs=1e-4)
    assert row["concepts"]["mimi"]["crop_dino"] == pytest.approx(1.0, abs=1e-4)
    assert row["cp_clip"] == pytest.approx(1.0, abs=1e-4)
    assert row["scr"] == 0.0

    dog_only = fake_detector({"dog": [(0, 0, 32, 32)]})
    row = evaluate([scene], "a photo of <rex> dog and <mimi>", concepts, with_detector(models, dog_only))["images"][0]
    missing = row["concepts"]["mimi"]
    assert missing["box"] is None and missing["crop_clip"] == 0.0 and missing["collapsed"] is True
    assert row["cp_clip"] == pytest.approx(0.5, abs=1e-4)  # (1 + 0) / 2
    assert row["scr"] == 0.5


def test_evaluate_whole_image_scores_and_means(models):
    scene, a, b = two_pets()
    other = procedural_photo(7, size=(64, 32))
    concepts = {"rex": ("dog", [scene]), "mimi": ("cat", [scene, other])}
    result = evaluate([scene, other], ["<rex> dog and <mimi> cat", "<rex> dog"], concepts, models)
    first, second = result["images"]
    assert first["concepts"]["rex"]["clip_i"] == pytest.approx(1.0, abs=1e-4)  # the image is rex's only photo
    assert first["concepts"]["rex"]["dino_i"] == pytest.approx(1.0, abs=1e-4)
    # mimi's photos are the image and another: the mean of 1 and that cosine
    other_cos = cosine_similarity(clip_image_embeddings(models, [scene]), clip_image_embeddings(models, [other]))[0, 0].item()
    assert first["concepts"]["mimi"]["clip_i"] == pytest.approx((1 + other_cos) / 2, abs=1e-4)
    assert first["clip_i"] == pytest.approx((1 + (1 + other_cos) / 2) / 2, abs=1e-4)
    assert list(second["concepts"]) == ["rex"]  # the second prompt names rex only
    assert first["clip_t"] == pytest.approx(2.5 * max(first["ti_clip"], 0), abs=1e-6)
    text = clip_text_embeddings(models, ["dog and cat"])[0]
    assert first["ti_clip"] == pytest.approx(ti_clip(clip_image_embeddings(models, [scene])[0], text), abs=1e-5)
    assert first["cp_clip"] is None and first["scr"] is None  # no detector
    assert result["mean"]["clip_t"] == pytest.approx((first["clip_t"] + second["clip_t"]) / 2)
    assert result["mean"]["cp_clip"] is None
    assert result["concepts"]["mimi"]["clip_i"] == pytest.approx(first["concepts"]["mimi"]["clip_i"])  # in one image only


def test_tiny_names_load_all_three_models_and_crop_with_grounding_dino(one_thread):
    models = load_score_models(clip="tiny", dino="tiny", detector="tiny", device="cpu")
    assert models.names == {"clip": "tiny", "dino": "tiny", "detector": "tiny"}
    result = evaluate([procedural_photo(0)], "a <rex> dog", {"rex": ("dog", [procedural_photo(1)])}, models)
    row, rex = result["images"][0], result["images"][0]["concepts"]["rex"]
    assert "random test models" in result["note"]
    # one concept: CP-CLIP is its crop's CLIP similarity (0 when the random detector finds nothing), SCR its collapse
    assert row["cp_clip"] == pytest.approx(rex["crop_clip"]) and row["scr"] == float(rex["collapsed"])
    assert rex["box"] is None or (0 <= rex["box"][0] < rex["box"][2] <= 64 and 0 <= rex["box"][1] < rex["box"][3] <= 64)


def test_plan_images_reads_menagerie_pngs(tmp_path):
    concepts = {"rex": ("dog", [procedural_photo(0)]), "mimi": ("cat", [procedural_photo(1)])}
    isolated = save_png(procedural_photo(2), tmp_path / "a.png", {"prompt": "a dog and a cat", "concepts": ["rex", "mimi"]})
    single = save_png(procedural_photo(3), tmp_path / "b.png", {"prompt": "<rex> dog on grass", "concepts": ["rex"]})
    plan = plan_images([isolated, single], None, concepts)
    assert [(r.prompt, r.concepts) for r in plan] == [("a dog and a cat", ["rex", "mimi"]), ("<rex> dog on grass", ["rex"])]
    plain = tmp_path / "c.png"
    procedural_photo(4).save(plain)
    with pytest.raises(UserError, match="carries no prompt .*pass --prompt"):
        plan_images([plain], None, concepts)
    assert plan_images([plain], "a dog", concepts)[0].concepts == ["rex", "mimi"]  # no tokens, no metadata: all
    stranger = save_png(procedural_photo(5), tmp_path / "d.png", {"prompt": "x", "concepts": ["rex", "tama"]})
    with pytest.raises(UserError, match=r"shows <tama>; give reference photos for each: --concept tama=DIR"):
        plan_images([stranger], None, concepts)
    with pytest.raises(UserError, match="has no reference photos"):
        plan_images([isolated], None, {"rex": ("dog", [])})


def test_score_images_gives_one_row_per_file(models, tmp_path):
    scene, a, b = two_pets()
    path = save_png(scene, tmp_path / "x.png", {"prompt": "<rex> dog and <mimi> cat", "concepts": ["rex", "mimi"]})
    rows = score_images([str(path)], {"rex": ("dog", [a]), "mimi": ("cat", [b])}, models)
    assert len(rows) == 1 and rows[0]["image"] == str(path) and rows[0]["caption"] == "dog and cat"


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_evaluate_writes_json_and_prints_a_table(model_dirs, tmp_path, capsys):
    clip_dir, dino_dir = model_dirs
    scene, a, b = two_pets()
    images = tmp_path / "images"
    save_png(scene, images / "one.png", {"prompt": "a photo of <rex> dog and <mimi> cat", "concepts": ["rex", "mimi"]})
    save_png(procedural_photo(9, size=(64, 32)), images / "two.png", {"prompt": "<rex> dog", "concepts": ["rex"]})
    for name, photo in (("rex", a), ("mimi", b)):
        (tmp_path / name).mkdir()
        photo.save(tmp_path / name / "0.png")
    library = ConceptLibrary(tmp_path / "library")  # rex's class word comes from the library
    library.save(Concept(name="rex", class_word="dog", base_model="tiny", fingerprint="0" * 16, photo_count=1),
                 fake_concept_tensors())
    out = tmp_path / "scores.json"
    code = main(["evaluate", "--images", str(images), "--concept", f"rex={tmp_path / 'rex'}",
                 "--concept", f"mimi:cat={tmp_path / 'mimi'}", "--library", str(tmp_path / "library"),
                 "--clip", str(clip_dir), "--dino", str(dino_dir), "--detector", "none", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads(out.read_text())
    assert [row["caption"] for row in result["images"]] == ["a photo of dog and cat", "dog"]
    assert list(result["images"][1]["concepts"]) == ["rex"]
    assert result["mean"]["cp_clip"] is None and result["models"]["detector"] is None
    lines = printed.splitlines()
    assert lines[0].split() == ["image", "CLIP-T", "TI-CLIP", "CLIP-I", "DINO-I", "CP-CLIP", "SCR@0.5"]
    assert lines[1].split()[0] == "one.png" and lines[3].split()[0] == "mean"
    assert float(lines[3].split()[1]) == pytest.approx(result["mean"]["clip_t"], abs=1e-4)
    assert f"wrote {out}" in printed


def test_cli_evaluate_bad_input_is_one_line(tmp_path, capsys):
    procedural_photo(0).save(tmp_path / "x.png")
    args = ["evaluate", "--images", str(tmp_path / "x.png"), "--out", str(tmp_path / "s.json"), "--library", str(tmp_path / "lib")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the concept library keeps no training photos" in err
    assert main(args + ["--concept", f"rex={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "concept 'rex' is not in the library" in err and "--concept rex:dog=" in err
