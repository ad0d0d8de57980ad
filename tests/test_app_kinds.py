"""The studio's concept kinds (issue 16) through app.py, without a browser, on the tiny model: the kind
dropdown of the training form (a Custom Diffusion concept trained through the page's handler), the
library's kind, group and size columns, the merges Compose offers for each pair of kinds (and the
refusal of kinds that do not merge, before any job), and the group form: composites previewed at once,
a two-pet joint group trained as a job, cancelled and resumed from its checkpoint."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch
from PIL import Image

import app
from conftest import procedural_photo
from pipelines.base import load_base
from pipelines.concept import WEIGHTS_FILE, Concept
from pipelines.errors import UserError
from pipelines.jobs import CANCELLED, DONE, RUNNING
from pipelines.layerwise import NUM_LAYERS
from pipelines.train import CHECKPOINT_FILE

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one OpenMP thread for tiny ops

TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # a cross-attention K projection of the tiny UNet


@pytest.fixture(scope="module")
def studio(tiny_dir, tmp_path_factory):
    """A tiny studio; its page (built once) reaches it as `studio.page`, photos of two pets as `studio.photos`."""
    root = tmp_path_factory.mktemp("kinds")
    studio = app.Studio("tiny", root / "lib", root / "out")
    studio.page = app.build_app("tiny", str(root / "lib"), studio=studio)
    studio.photos = {}
    for pet, seeds in (("dog", (0, 1, 2)), ("cat", (3, 4))):
        studio.photos[pet] = []
        for seed in seeds:
            path = root / f"{pet}{seed}.png"
            procedural_photo(seed).save(path)
            studio.photos[pet].append(str(path))
    studio.base_fingerprint = load_base(str(tiny_dir), device="cpu").fingerprint
    studio.root = root
    return studio


def handler(page, name: str):
    """The page's event handler `name` (the function a click runs)."""
    return next(f for f in page.fns.values() if f.name == name)


def form_values(handler_fn, **given) -> dict:
    """A dict-input handler's values: each input's default, or `given[key]` for the input whose elem_id
    (dashes as underscores) or label is `key`."""
    values = {}
    for component in handler_fn.inputs:
        keys = {(component.elem_id or "").replace("-", "_"), getattr(component, "label", None)}
        chosen = [given[k] for k in keys if k in given]
        values[component] = chosen[0] if chosen else component.value
    return values


def finished(studio, state, timeout: float = 120):
    done = studio.jobs.wait(state.id, timeout=timeout)
    assert done is not None and not done.active, done
    return done


def save_concept(studio, name: str, kind: str, tensors: dict, group: str = "", members: tuple = ()) -> None:
    concept = Concept(name=name, class_word="dog", base_model="tiny", fingerprint=studio.base_fingerprint, photo_count=3,
                      is_test_model=True, kind=kind, group=group, members=list(members))
    studio.library.save(concept, tensors, Image.new("RGB", (16, 16)), overwrite=True)
    studio.library_changed()


def edlora_tensors(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"embeddings": torch.randn(2, NUM_LAYERS, 32, generator=g),
            "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 32, generator=g),
            "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 4, generator=g),
            f"unet.{TO_K}.lora_A.weight": torch.randn(4, 32, generator=g),
            f"unet.{TO_K}.lora_B.weight": torch.randn(32, 4, generator=g)}


def cones_tensors(seed: int, indices: list[int]) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"embeddings": torch.randn(2, 1, 32, generator=g), f"unet.{TO_K}.shut": torch.tensor(sorted(indices), dtype=torch.int32)}


# ---------------------------------------------------------------------------------------------
# One pet, of a chosen kind


def test_the_kind_dropdown_trains_a_custom_diffusion_concept_into_the_library(studio):
    page = studio.page
    note, edlora_row, custom_row, cones_row = handler(page, "on_kind").fn("custom-diffusion")
    assert "Custom Diffusion" in note and "75 MB" in note
    assert (edlora_row["visible"], custom_row["visible"], cones_row["visible"]) == (False, True, False)
    assert "Cones" in handler(page, "on_kind").fn("cones")[0]

    on_train = next(f for f in page.fns.values() if f.name == "on_train" and any(c.elem_id == "train-kind" for c in f.inputs))
    values = form_values(on_train, train_photos=studio.photos["dog"], train_name="Rex", train_class="dog", train_kind="custom-diffusion",
                         train_steps=2, **{"Batch size": 1, "Preview every N steps (0: about five per run)": 2})
    shown = on_train.fn(values)
    assert "training &lt;rex&gt; (Custom Diffusion)" in shown
    done = finished(studio, studio.jobs.latest("train"))
    assert done.status == DONE, done.message
    assert (done.step, done.total) == (2, 2) and len(done.previews) == 1
    concept = studio.library.get("rex")
    assert concept.kind == "custom-diffusion" and concept.settings["lr_kv"] == app.TrainConfig.lr_kv and concept.group == ""
    tensors = studio.library.weights("rex")
    deltas = [k for k in tensors if k.endswith(".delta")]
    assert deltas and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in deltas)  # only the cross-attention K/V
    assert tensors["embeddings"].shape == (2, NUM_LAYERS, 32)
    # the library table: its kind and the size of its file
    row = next(r for r in app.library_rows(studio.library)[1] if r[0] == "<rex>")
    size = (studio.library.path("rex") / WEIGHTS_FILE).stat().st_size
    assert dict(zip(app.LIBRARY_COLUMNS, row))["kind"] == "Custom Diffusion"
    assert dict(zip(app.LIBRARY_COLUMNS, row))["size"] == app.human_size(size) and app.human_size(size).endswith("KB")


def test_a_kind_that_is_not_one_pets_is_refused_before_queueing(studio):
    before = len(studio.jobs.jobs())
    with pytest.raises(UserError, match="kind 'joint' is not one pet's; pick ED-LoRA"):
        studio.submit_training(studio.photos["dog"], app.TrainConfig(name="solo", class_word="dog", kind="joint"))
    with pytest.raises(UserError, match="cones_max_neurons must be a positive integer"):
        studio.submit_training(studio.photos["dog"], app.TrainConfig(name="solo", class_word="dog", kind="cones", cones_max_neurons=0))
    assert len(studio.jobs.jobs()) == before


# ---------------------------------------------------------------------------------------------
# The library: kind, group, size


def test_human_sizes():
    assert [app.human_size(n) for n in (812, 6042, 98_304, 4_400_000, 80_000_000, 3 * 1024**3)] == [
        "812 B", "5.9 KB", "96.0 KB", "4.2 MB", "76.3 MB", "3.0 GB"]


def test_library_rows_show_kind_group_and_file_size(studio):
    save_concept(studio, "lib-edlora", "edlora", edlora_tensors(0))
    save_concept(studio, "lib-cones", "cones", cones_tensors(1, [0, 5, 7]))
    save_concept(studio, "lib-a", "joint", edlora_tensors(2), group="duo", members=("lib-a", "lib-b"))
    rows = {r[0]: dict(zip(app.LIBRARY_COLUMNS, r)) for r in app.library_rows(studio.library)[1]}
    assert len(app.LIBRARY_COLUMNS) == len(rows["<lib-a>"]) and app.LIBRARY_COLUMNS[-1] == "problem"
    assert [rows[f"<{n}>"]["kind"] for n in ("lib-edlora", "lib-cones", "lib-a")] == ["ED-LoRA", "Cones", "joint group (Gen4Gen)"]
    assert (rows["<lib-a>"]["group"], rows["<lib-edlora>"]["group"]) == ("duo (with <lib-b>)", "")
    for name in ("lib-edlora", "lib-cones", "lib-a"):
        assert rows[f"<{name}>"]["size"] == app.human_size((studio.library.path(name) / WEIGHTS_FILE).stat().st_size)
    assert rows["<lib-cones>"]["size"].endswith(" B")  # three int32 indices and 64 floats: under a kilobyte
    gallery = dict((caption.split(" · ")[0], caption) for _, caption in app.library_rows(studio.library)[0])
    assert "Cones" in gallery["<lib-cones>"]
    for name in ("lib-edlora", "lib-cones", "lib-a"):
        studio.delete(name)


# ---------------------------------------------------------------------------------------------
# Compose: the merges each pair of kinds allows


def test_compose_offers_the_merges_the_kinds_allow_and_refuses_the_rest_before_any_job(studio):
    save_concept(studio, "ed-a", "edlora", edlora_tensors(3))
    save_concept(studio, "ed-b", "edlora", edlora_tensors(4))
    save_concept(studio, "cd-a", "custom-diffusion", {"embeddings": torch.randn(2, NUM_LAYERS, 32), f"unet.{TO_K}.delta": torch.randn(32, 32)})
    save_concept(studio, "cd-b", "custom-diffusion", {"embeddings": torch.randn(2, NUM_LAYERS, 32), f"unet.{TO_K}.delta": torch.randn(32, 32)})
    save_concept(studio, "co-a", "cones", cones_tensors(5, [1, 2, 3]))
    save_concept(studio, "co-b", "cones", cones_tensors(6, [3, 40]))
    on_concepts = handler(studio.page, "on_concepts").fn

    def offered(names):
        update, note = on_concepts(names, "auto")
        return [value for _, value in update["choices"]], update["value"], note

    assert offered(["ed-a", "ed-b"]) == (["auto", "gradient", "weight"], "auto", "")
    assert offered(["cd-a", "cd-b"]) == (["auto", "custom-diffusion"], "auto", "")
    assert offered(["co-a", "co-b"]) == (["auto", "cones"], "auto", "")
    choices, _ = app.merge_choices(studio.library, ["co-a", "co-b"])
    assert choices[0] == ("automatic (Cones: the union of the concept neurons)", "auto")
    assert on_concepts(["ed-a", "ed-b"], "weight")[0]["value"] == "weight"  # a choice still allowed is kept
    assert on_concepts(["cd-a", "cd-b"], "weight")[0]["value"] == "auto"  # one no longer allowed falls back
    # ED-LoRA + Custom Diffusion: only "auto", a message on the page, and Fuse refuses before queueing
    values, _, note = offered(["ed-a", "cd-a"])
    assert values == ["auto"] and "cannot be merged into one model" in note
    assert "&lt;cd-a&gt; (Custom Diffusion)" in note and "&lt;ed-a&gt; (ED-LoRA)" in note
    before = len(studio.jobs.jobs())
    with pytest.raises(UserError, match=r"cannot be merged into one model: <ed-a> \(ED-LoRA\), <cd-a> \(Custom Diffusion\)"):
        studio.submit_fusion(["ed-a", "cd-a"], "auto")
    with pytest.raises(UserError, match="their kind allows cones"):
        studio.submit_fusion(["co-a", "co-b"], "gradient")
    assert len(studio.jobs.jobs()) == before
    two_kinds = app.GenerationRequest(mode=app.REGIONAL, prompt="<ed-a> and <cd-a> in a garden", width=64, height=64, steps=2)
    with pytest.raises(UserError, match="cannot be merged into one model.*or use isolated sampling"):
        studio.submit_generation(two_kinds)  # Regional would fuse them on the fly
    fuse = handler(studio.page, "on_fuse").fn
    shown = list(fuse(["ed-a", "cd-a"], "auto"))
    assert len(shown) == 1 and "cannot be merged" in next(iter(shown[0].values())) and len(studio.jobs.jobs()) == before
    # an allowed merge runs as a job: Cones' union of the two concepts' neurons, "auto" resolved before queueing
    state = studio.submit_fusion(["co-a", "co-b"], "auto")
    assert state.title == "fusing <co-a> + <co-b> (cones)"
    done = finished(studio, state)
    assert done.status == DONE, done.message
    record = next(r for r in studio.fused_models() if r["folder"] == done.result)
    assert record["method"] == "cones" and app.fused_report(record)["union"] == 4  # {1, 2, 3} | {3, 40}
    assert studio.models.fused_folder(studio.library, ["co-a", "co-b"]) == done.result  # Generate finds the same cache
    for name in ("ed-a", "ed-b", "cd-a", "cd-b", "co-a", "co-b"):
        studio.delete(name)


# ---------------------------------------------------------------------------------------------
# A group trained together


def pets(studio, names=("mochi", "tama")) -> list[tuple]:
    return [(names[0], "dog", studio.photos["dog"]), (names[1], "cat", studio.photos["cat"]), ("", "", None)]


def test_composite_preview_shows_the_pets_on_the_backgrounds_training_uses(studio):
    images, note = studio.composite_preview(pets(studio), None, "in a garden")
    assert len(images) == app.COMPOSITE_PREVIEWS and all(image.size == (64, 64) for image in images)
    assert "plain black" in note and "draws scenes of 'in a garden'" in note and "leaves out" in note
    black = np.mean([(np.asarray(image).max(axis=2) == 0).mean() for image in images])
    assert black > 0.3  # the pets cover at most two 32 x 64 slots' squares
    green = studio.root / "green.png"
    Image.new("RGB", (80, 80), (20, 200, 40)).save(green)
    images, note = studio.composite_preview(pets(studio), [str(green)], "on a lawn", auto_mask=True)
    close = np.mean([(np.abs(np.asarray(image).astype(int) - (20, 200, 40)).max(axis=2) < 8).mean() for image in images])
    assert close > 0.3 and "plain black" not in note and "cuts it out with the detector's mask" in note
    # through the page's button, and a single pet is refused with what to do
    on_preview = handler(studio.page, "on_preview_composites").fn
    shown, html_note = on_preview("", "", studio.photos["dog"], "", "", studio.photos["cat"], "", "", None, None, "", False, 0)
    assert len(shown) == app.COMPOSITE_PREVIEWS and "composites of pet 1 + pet 2" in html_note
    shown, html_note = on_preview("a", "dog", studio.photos["dog"], "", "", None, "", "", None, None, "", False, 0)
    assert shown == [] and "a group needs two or three pets, 1 given" in html_note


@pytest.mark.parametrize("group, pet_list, extra, fragment", [
    ("pals", lambda s: pets(s)[:1], {}, "a group needs two or three pets, 1 given"),
    ("mochi", pets, {}, "the group's name 'mochi' is also a pet's"),
    ("pals", lambda s: pets(s, ("mochi", "Mochi")), {}, "<mochi> is named twice in the group"),
    ("pals", lambda s: [("mochi", "", s.photos["dog"]), *pets(s)[1:]], {}, "pet 1 (<mochi>) has no class word"),
    ("pals", pets, {"background_paths": "photos"}, "background photos need a background prompt"),
    ("", pets, {}, "no group name given"),
])
def test_bad_group_requests_are_refused_before_queueing(studio, group, pet_list, extra, fragment):
    if extra.get("background_paths") == "photos":
        extra = {"background_paths": studio.photos["cat"]}
    before = len(studio.jobs.jobs())
    with pytest.raises(UserError, match=re.escape(fragment)):
        studio.submit_group_training(group, pet_list(studio), app.TrainConfig(name="", class_word="", kind="joint",
                                                                              multi_subject_probability=0.5), **extra)
    assert len(studio.jobs.jobs()) == before


def test_the_group_form_trains_two_pets_jointly_and_resumes_after_a_cancel(studio):
    on_train_group = handler(studio.page, "on_train_group")
    given = dict(group_name="pals", group_kind="joint", group_pet1_name="mochi", group_pet1_class="dog",
                 group_pet1_photos=studio.photos["dog"], group_pet2_name="Tama", group_pet2_class="cat",
                 group_pet2_photos=studio.photos["cat"], group_steps=500, **{"Batch size": 1})
    shown = on_train_group.fn(form_values(on_train_group, **given))
    assert "training the group pals (&lt;mochi&gt; + &lt;tama&gt;)" in shown
    state = studio.jobs.latest("train")
    while (now := studio.jobs.snapshot(state.id)).status != RUNNING or not now.step:  # a step or more into the run
        assert now.active, now.message
        time.sleep(0.05)
    studio.cancel_training()
    stopped = finished(studio, state)
    assert stopped.status == CANCELLED and "mochi" not in studio.library.names()
    checkpoint = studio.library.root / ".checkpoints" / "pals" / CHECKPOINT_FILE
    assert checkpoint.exists()
    at = torch.load(checkpoint, map_location="cpu", weights_only=False)["step"]
    assert at >= 1
    # resumed with two more steps to go: it carries on from the checkpoint's step
    on_train_group.fn(form_values(on_train_group, **{**given, "group_steps": at + 2, "group_resume": True,
                                                     "Preview every N steps (0: about five per run)": at + 2}))
    done = finished(studio, studio.jobs.latest("train"))
    assert done.status == DONE, done.message
    assert (done.step, done.total) == (at + 2, at + 2) and len(done.previews) == 1
    assert done.result == ["mochi", "tama"] and not checkpoint.exists()
    for name, class_word in (("mochi", "dog"), ("tama", "cat")):
        concept = studio.library.get(name)
        assert (concept.kind, concept.group, concept.members, concept.class_word) == ("joint", "pals", ["mochi", "tama"], class_word)
    a, b = studio.library.weights("mochi"), studio.library.weights("tama")
    shared = [k for k in a if k != "embeddings"]
    assert shared and all(torch.equal(a[k], b[k]) for k in shared)  # one LoRA for the group
    assert not torch.equal(a["embeddings"], b["embeddings"])  # each pet its own words
    rows = {r[0]: dict(zip(app.LIBRARY_COLUMNS, r)) for r in app.library_rows(studio.library)[1]}
    assert (rows["<mochi>"]["kind"], rows["<mochi>"]["group"]) == ("joint group (Gen4Gen)", "pals (with <tama>)")
    # Compose offers the group's own merge first for its members
    assert [v for _, v in app.merge_choices(studio.library, ["mochi", "tama"])[0]] == ["auto", "group"]
