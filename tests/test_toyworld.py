"""Quality tests in the toy world: do concepts, fusion, regions and isolation really work?

The toy model (assets/toyworld/model, trained from scratch by bench/toyworld/train.py) draws dogs,
cats and birds; the oracle (bench/toyworld/oracle.py) says which animal and which pet is where.
Each pet has a belly colour no word names (bench/toyworld/world.py): only a LoRA can carry it, so
it is what fusion has to keep. Thresholds come from the measurements in docs/toyworld.md (32
images a cell, on the GPU) with margin, and sit between the method's rate and the rate under a
planted fault (bench/toyworld/faults.py), which these tests were run against:
- same-layer (every layer fed copy 0): test_stored_concepts_draw_their_pets fails;
- average-fusion (solve replaced by weight averaging): test_gradient_fusion_... fails;
- no-regions (boxes ignored): test_regional_... fails;
- no-layout and class-word-matching (issue 12): test_isolated_boxes_... fails (swap, merged).
The fusion, regional and isolated tests use concepts trained on the GPU with the same recipe
(assets/toyworld/pets, `train_pet`); the ED-LoRA test trains its own on the CPU.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from bench.toyworld import world
from bench.toyworld.evaluate import (PET_STEPS, ROOT, image_rates, isolated_run, load_world, plain_run, regional_run,
                                     sample, train_pet)
from bench.toyworld.model import load_tokenizer
from bench.toyworld.oracle import score_image
from bench.toyworld.world import PETS_BY_NAME, Look

SAMPLES = 8
STORED_PETS = ROOT / "assets" / "toyworld" / "pets"
# Thresholds. Measured on the GPU at 48 images (docs/toyworld.md), then on this CPU by these tests,
# then under the planted fault on this CPU:
BOTH_CLASSES_PRESENCE = 0.5
STORED_MATCH = 0.55  # <rex> 0.70 / 0.68 / same-layer 0.30; <bolt> 0.74 / 0.72
EDLORA_MATCH, EDLORA_MARGIN = 0.5, 0.2  # <rex> 0.70 vs "a dog" 0.26 (the stored, GPU-trained <rex>)
FUSED_MATCH = 0.5  # rex+bolt+mimi, mean over the pets: gradient 0.65 / 0.61 / same-layer 0.33
FUSED_BELLY_MARGIN = 0.15  # belly, gradient minus weight averaging: 0.35 / 0.25 / average-fusion 0.00
REGIONAL_PLACED = 0.5  # mean over rex+bolt, rex+mimi: 0.70 / 0.63 / no-regions 0.34
ISOLATED_BLEEDING_DROP = 0.2  # rex+mimi, plain minus isolated: 0.36 / 0.56 / same-layer 0.00
# Isolated Diffusion with boxes, rex+bolt (two dogs), 12 images, box by box, on this CPU: separate /
# merged / swap 0.83 / 0.00 / 0.17; no-layout fault (boxes ignored) 0.67 / 0.25 / 0.46; class-word
# matching fault 0.58 / 0.25 / 0.42 (docs/toyworld.md, planted faults).
BOXED_SAMPLES = 12
BOXED_SEPARATE = 0.6
BOXED_MERGED = 0.2
BOXED_SWAP = 0.3


# ---------------------------------------------------------------------------------------------
# The world itself


def test_every_world_word_is_one_token():
    tokenizer = load_tokenizer(world_model_dir() / "tokenizer")
    for word in world.vocabulary():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def world_model_dir():
    from bench.toyworld.evaluate import MODEL_DIR
    return MODEL_DIR


def test_pets_never_appear_in_base_scenes():
    rng = np.random.default_rng(0)
    looks = {animal.look for _ in range(3000) for animal in world.random_scene(rng).animals}
    assert not looks & world.PET_WORD_LOOKS  # not even a pet's look without its belly
    assert all(look.belly is None for look in looks)  # no base scene shows a belly
    assert len({look.cls for look in looks}) == 3 and len(looks) > 200  # the rest of the world is there


def test_render_is_deterministic_and_labels_cover_the_animals():
    scene = world.random_scene(np.random.default_rng(5))
    image, instance = world.render(scene)
    again, instance_again = world.render(scene)
    assert np.array_equal(image, again) and np.array_equal(instance, instance_again)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    for index in range(1, len(scene.animals) + 1):
        assert (instance == index).sum() > 20


def test_pet_photos_vary():
    photos = world.pet_photos("rex", 6)
    assert len({p.tobytes() for p in photos}) == 6


def test_pet_photos_show_the_belly_below_the_body_colour():
    rng = np.random.default_rng(1)
    for pet in world.PETS:
        scene = world.pet_photo_scene(rng, pet)
        image, instance = world.render(scene)
        ys, _ = np.nonzero(instance == 1)
        belly = np.abs(image.astype(int) - world.COLOURS[pet.look.belly]).sum(-1) < 30
        body = np.abs(image.astype(int) - world.COLOURS[pet.look.colour]).sum(-1) < 30
        on_pet = instance == 1
        assert (belly & on_pet).sum() > 0.1 * on_pet.sum(), pet.name
        assert np.nonzero(belly & on_pet)[0].mean() > np.nonzero(body & on_pet)[0].mean(), pet.name  # lower in the image


# ---------------------------------------------------------------------------------------------
# The oracle


@pytest.fixture(scope="module")
def toy():
    """(base model, oracle) of the toy world."""
    return load_world()


def test_oracle_reads_renders(toy):
    _, oracle = toy
    rng = np.random.default_rng(123)
    scenes = [world.random_scene(rng, max_animals=2) for _ in range(60)]
    images, _ = world.render_many(scenes)
    scores = [score_image(found, [a.look for a in s.animals]) for found, s in zip(oracle.describe(list(images)), scenes)]
    presence = np.mean([p for s in scores for p in s.present])
    identity = np.mean([p for s in scores for p in s.identified])
    assert presence >= 0.9, presence
    assert identity >= 0.75, identity


def test_oracle_identifies_each_pet_from_its_photos(toy):
    _, oracle = toy
    for pet in world.PETS:
        found = oracle.describe(world.pet_photos(pet, 8, seed=9))
        rate = np.mean([any(f.pet == pet.name for f in fs) for fs in found])
        assert rate >= 0.75, (pet.name, rate)


# ---------------------------------------------------------------------------------------------
# The methods


def test_base_model_draws_the_classes_it_is_asked_for(toy):
    base, oracle = toy
    for cls in world.CLASSES:
        rate = image_rates(oracle, sample(base, None, f"a {cls} on the grass", SAMPLES), [Look(cls, "?")]).presence
        assert rate >= 0.6, (cls, rate)


def test_base_model_draws_a_dog_and_a_cat_together(toy):
    base, oracle = toy
    rates = image_rates(oracle, sample(base, None, "a dog and a cat on the grass", SAMPLES), [Look("dog", "?"), Look("cat", "?")])
    assert rates.presence >= BOTH_CLASSES_PRESENCE, rates


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A library holding the five stored pets (copied: fused models are cached inside the library)."""
    from pipelines.concept import ConceptLibrary

    root = tmp_path_factory.mktemp("toy-library") / "library"
    shutil.copytree(STORED_PETS, root)
    return ConceptLibrary(root)


def test_stored_concepts_draw_their_pets(toy, stored):
    _, oracle = toy
    base, _ = load_world()
    for pet in ("rex", "bolt"):
        rates = image_rates(oracle, sample(base, stored, f"a <{pet}> on the beach", SAMPLES), [PETS_BY_NAME[pet].look])
        assert rates.match >= STORED_MATCH, (pet, rates)


def test_edlora_learns_a_pet_far_above_the_class_word(toy, tmp_path):
    from pipelines.concept import ConceptLibrary

    _, oracle = toy
    library = ConceptLibrary(tmp_path / "library")
    train_pet(load_world()[0], library, "rex", PET_STEPS)
    base, _ = load_world()
    look = PETS_BY_NAME["rex"].look
    concept = image_rates(oracle, sample(base, library, "a <rex> on the beach", SAMPLES), [look])
    class_word = image_rates(oracle, sample(base, library, "a dog on the beach", SAMPLES), [look])
    assert concept.match >= EDLORA_MATCH, concept
    assert concept.match >= class_word.match + EDLORA_MARGIN, (concept, class_word)


def fused_model(library, pets, method="gradient"):
    from pipelines.fusion import FusionConfig, fuse_concepts

    base, _ = load_world()
    return fuse_concepts(base, library, list(pets), FusionConfig(method=method)).folder


def test_gradient_fusion_keeps_the_belly_that_weight_averaging_dilutes(toy, stored):
    _, oracle = toy
    group = ("rex", "bolt", "mimi")
    rates = {}
    for method in ("gradient", "weight"):
        folder = fused_model(stored, group, method)
        base, _ = load_world()
        per_pet = [image_rates(oracle, sample(base, stored, f"a <{pet}> on the beach", SAMPLES, fused=folder),
                               [PETS_BY_NAME[pet].look]) for pet in group]
        rates[method] = {"match": np.mean([r.match for r in per_pet]), "belly": np.mean([r.marked for r in per_pet])}
    assert rates["gradient"]["match"] >= FUSED_MATCH, rates
    assert rates["gradient"]["belly"] >= rates["weight"]["belly"] + FUSED_BELLY_MARGIN, rates


def test_regional_sampling_puts_each_pet_in_its_box(toy, stored):
    _, oracle = toy
    placed = []
    for pair in (("rex", "bolt"), ("rex", "mimi")):
        folder = fused_model(stored, pair)
        base, _ = load_world()
        placed.append(regional_run(base, stored, oracle, list(pair), folder, 2 * SAMPLES).placed)
    assert np.mean(placed) >= REGIONAL_PLACED, placed


def test_isolated_diffusion_separates_what_a_plain_prompt_merges(toy, stored):
    _, oracle = toy
    pair = ["rex", "mimi"]
    folder = fused_model(stored, pair)
    base, _ = load_world()
    plain = plain_run(base, stored, oracle, pair, folder, 2 * SAMPLES)
    isolated = isolated_run(base, stored, oracle, pair, folder, 2 * SAMPLES)
    assert isolated.bleeding <= plain.bleeding - ISOLATED_BLEEDING_DROP, (plain, isolated)


# ---------------------------------------------------------------------------------------------
# Several pets, each in its own box (issue 12)


def boxed_isolation_rates(stored, pets, count: int, **options):
    """Isolated Diffusion with one side-by-side box per pet (each pet's own ED-LoRA), scored box by box."""
    from bench.toyworld.evaluate import oracle_detector, side_by_side_boxes
    from bench.toyworld.oracle import layout_rates, score_layout
    from pipelines.isolated import IsolateConfig, Subject, isolate

    base, oracle = load_world()
    looks = [PETS_BY_NAME[p].look for p in pets]
    boxes = side_by_side_boxes(len(pets))
    subjects = tuple(Subject(look.cls, f"a <{p}> {look.cls}") for p, look in zip(pets, looks))
    images = []
    for seed in range(count):
        config = IsolateConfig(prompt=" and ".join(f"a {look.cls}" for look in looks) + " on the grass", subjects=subjects,
                               negative_prompt="", steps=20, guidance=5.0, seed=seed, boxes=tuple(boxes), **options)
        images.append(isolate(base, stored, config, detector=oracle_detector(oracle)).final)
    return layout_rates([score_layout(found, boxes, looks) for found in oracle.describe(images)])


def test_isolated_boxes_give_two_dogs_each_its_own_box(toy, stored):
    rates = boxed_isolation_rates(stored, ("rex", "bolt"), BOXED_SAMPLES)
    assert rates.separate >= BOXED_SEPARATE, rates
    assert rates.merged <= BOXED_MERGED, rates
    assert rates.swap <= BOXED_SWAP, rates
