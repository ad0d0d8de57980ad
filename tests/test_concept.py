"""pipelines.concept: the library on disk, atomic saves, crash recovery, export and import."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import pipelines.concept as concept_module
from pipelines.base import architecture_fingerprint
from pipelines.concept import Concept, ConceptLibrary, check_class_word, check_compatible, check_name
from pipelines.errors import UserError
from conftest import fake_concept_tensors


def record(name="mochi", photo_count=3, fingerprint="0123456789abcdef", **extra) -> Concept:
    return Concept(name=name, class_word="dog", base_model="tiny", fingerprint=fingerprint, photo_count=photo_count, **extra)


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def leftovers(root) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


@pytest.fixture
def library(tmp_path):
    return ConceptLibrary(tmp_path / "library")


# ---------------------------------------------------------------------------------------------
# Names and records


@pytest.mark.parametrize("name", ["Mochi", "-mochi", "_x", "mo chi", "", "a" * 41, "../evil", "mochi/", "<mochi>", "möchi"])
def test_invalid_names_are_refused(name):
    with pytest.raises(UserError, match="is not valid: use 1-40 lowercase letters"):
        check_name(name)


@pytest.mark.parametrize("name", ["mochi", "m", "tama_2", "9lives", "a" * 40, "x-y"])
def test_valid_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("typed, stored, noted", [
    ("Buddy", "buddy", True), ("<Mochi>", "mochi", True), ("  rex ", "rex", False), ("rex", "rex", False),
    ("My Dog", "My Dog", False), ("../x", "../x", False),  # still invalid: left for check_name to refuse as typed
])
def test_entry_points_lowercase_a_name_with_a_note(typed, stored, noted):
    from pipelines.concept import normalise_name

    name, note = normalise_name(typed)
    assert name == stored and bool(note) == noted
    if noted:
        assert f"is stored as {stored!r}" in note and f"<{stored}>" in note


def test_class_word_is_normalised_or_refused():
    assert check_class_word(" Dog ") == "dog"
    for bad in ("hot dog", "dog2", "", "chien!"):
        with pytest.raises(UserError, match="is not valid: use one plain word"):
            check_class_word(bad)


def test_record_json_round_trip():
    concept = record(settings={"steps": 3}, created="2024-01-01T00:00:00Z")
    data = concept.to_json()
    assert data["token"] == "<mochi>" and data["words"] == ["<mochi-r*>", "<mochi-c*>"]
    assert Concept.from_json(json.loads(json.dumps(data))) == concept
    with pytest.raises(UserError, match="concept record lacks fingerprint, photo_count"):
        Concept.from_json({"name": "x", "class_word": "dog", "base_model": "tiny"})


# ---------------------------------------------------------------------------------------------
# Library operations


def test_save_list_show(library, fake_tensors):
    preview = Image.new("RGB", (8, 8), (1, 2, 3))
    folder = library.save(record("tama", photo_count=2), fake_tensors(seed=1))
    library.save(record("mochi"), fake_tensors(), preview)
    assert folder == library.root / "tama"
    assert sorted(os.listdir(library.root / "mochi")) == ["concept.json", "concept.safetensors", "preview.png"]
    assert library.names() == ["mochi", "tama"]
    assert [c.name for c in library.list()] == ["mochi", "tama"]
    shown = library.get("tama")
    assert (shown.class_word, shown.photo_count, shown.base_model) == ("dog", 2, "tiny")
    assert shown.created.endswith("Z")
    assert_same_tensors(library.weights("tama"), fake_tensors(seed=1))
    assert library.preview_path("tama") is None
    assert np.array_equal(np.asarray(Image.open(library.preview_path("mochi"))), np.asarray(preview))
    assert leftovers(library.root) == []


def test_save_refuses_existing_name_without_overwrite(library, fake_tensors):
    library.save(record(), fake_tensors())
    with pytest.raises(UserError, match="concept 'mochi' already exists"):
        library.save(record(photo_count=9), fake_tensors(seed=5), overwrite=False)
    assert library.get("mochi").photo_count == 3
    library.save(record(photo_count=9), fake_tensors(seed=5))
    assert library.get("mochi").photo_count == 9
    assert_same_tensors(library.weights("mochi"), fake_tensors(seed=5))


def test_save_refuses_bad_tensors_and_names(library, fake_tensors):
    tensors = fake_tensors()
    del tensors["embeddings"]
    with pytest.raises(UserError, match="no 'embeddings' tensor"):
        library.save(record(), tensors)
    with pytest.raises(UserError, match="is not valid"):
        library.save(record("Bad Name"), fake_tensors())
    assert library.names() == [] and leftovers(library.root) == []


def test_rename(library, fake_tensors):
    library.save(record("mochi"), fake_tensors(), Image.new("RGB", (4, 4)))
    library.save(record("tama"), fake_tensors(seed=1))
    renamed = library.rename("mochi", "kuro")
    assert renamed.name == "kuro"
    assert library.names() == ["kuro", "tama"]
    data = json.loads((library.root / "kuro" / "concept.json").read_text())
    assert data["name"] == "kuro" and data["token"] == "<kuro>"
    assert_same_tensors(library.weights("kuro"), fake_tensors())
    assert library.preview_path("kuro") is not None
    with pytest.raises(UserError, match="a concept named 'tama' already exists"):
        library.rename("kuro", "tama")
    with pytest.raises(UserError, match="new name 'Kuro!' is not valid"):
        library.rename("kuro", "Kuro!")
    with pytest.raises(UserError, match="unknown concept 'mochi'"):
        library.rename("mochi", "x")
    assert leftovers(library.root) == []


def test_delete_and_unknown_concepts(library, fake_tensors):
    library.save(record("mochi"), fake_tensors())
    library.save(record("tama"), fake_tensors())
    library.delete("mochi")
    assert library.names() == ["tama"]
    assert not (library.root / "mochi").exists() and leftovers(library.root) == []
    with pytest.raises(UserError, match=r"unknown concept 'mochi' in library .* \(known: tama\)"):
        library.get("mochi")
    with pytest.raises(UserError, match="unknown concept 'mochi'"):
        library.delete("mochi")
    with pytest.raises(UserError, match="is not valid"):
        library.get("../tama")


def test_unreadable_record_is_a_user_error(library, fake_tensors):
    library.save(record(), fake_tensors())
    (library.root / "mochi" / "concept.json").write_text("{not json")
    with pytest.raises(UserError, match="concept.json is unreadable"):
        library.get("mochi")
    (library.root / "mochi" / "concept.safetensors").unlink()
    with pytest.raises(UserError, match="has no concept.safetensors; delete it and train it again"):
        library.weights("mochi")


# ---------------------------------------------------------------------------------------------
# Damaged entries: listed, named in one-line errors, deletable; the rest of the library works


def damage(folder, how: str) -> None:
    weights, record_file = folder / "concept.safetensors", folder / "concept.json"
    data = json.loads(record_file.read_text())
    if how == "truncated":  # a copy that stopped halfway
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "garbage":
        weights.write_bytes(bytes(range(256)) * 8)
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "no weights":
        weights.unlink()
    elif how == "bad json":
        record_file.write_text('{"name": "rex", "class_word": ')
    elif how == "not an object":
        record_file.write_text("[1, 2]")
    elif how == "missing fields":
        record_file.write_text(json.dumps({k: v for k, v in data.items() if k not in ("class_word", "photo_count")}))
    elif how == "wrong field type":
        record_file.write_text(json.dumps({**data, "photo_count": "three"}))
    elif how == "no record":
        record_file.unlink()
    elif how == "binary record":
        record_file.write_bytes(b"\xff\xfe\x00garbage")
    elif how == "nan tensors":  # a whole file whose numbers are not: found only when the tensors are read
        tensors = load_file(weights)
        tensors["embeddings"][0, 0, 0] = float("nan")
        save_file(tensors, weights, metadata={"format": "menagerie-edlora-v1"})
    else:
        raise ValueError(how)


def assert_one_line_error(call, *fragments) -> str:
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


DAMAGES = ["truncated", "garbage", "empty", "no weights", "bad json", "not an object", "missing fields", "wrong field type",
           "no record", "binary record"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_concept_is_listed_as_damaged_and_refused_by_name(library, fake_tensors, tmp_path, how):
    library.save(record("mochi"), fake_tensors(), Image.new("RGB", (4, 4)))
    library.save(record("rex"), fake_tensors(seed=3))
    library.save(record("tama"), fake_tensors(seed=1))
    damage(library.root / "rex", how)
    # the listing works: the good concepts as before, the damaged one with its reason
    assert library.names() == ["mochi", "rex", "tama"]
    assert [c.name for c in library.list()] == ["mochi", "tama"]
    problems = library.damaged()
    assert list(problems) == ["rex"] and "concept 'rex' is damaged" in problems["rex"] and "\n" not in problems["rex"]
    assert "delete it" in problems["rex"]
    # every use of it: one line, naming it
    for use in (lambda: library.get("rex"), lambda: library.export("rex", tmp_path / "rex.safetensors"),
                lambda: library.rename("rex", "rex2")):
        assert assert_one_line_error(use, "concept 'rex' is damaged") == problems["rex"]
    if how in ("truncated", "garbage", "empty", "no weights"):
        assert_one_line_error(lambda: library.weights("rex"), "concept 'rex' is damaged", "concept.safetensors")
    assert not (tmp_path / "rex.safetensors").exists() and library.names() == ["mochi", "rex", "tama"]
    # the good ones still work
    assert_same_tensors(library.weights("mochi"), fake_tensors())
    assert library.export("mochi", tmp_path / "mochi.safetensors").exists()
    library.rename("tama", "kuro")
    # and the damaged one can be deleted
    library.delete("rex")
    assert library.names() == ["kuro", "mochi"] and library.damaged() == {} and leftovers(library.root) == []


def test_a_record_of_a_newer_format_asks_for_an_update(library, fake_tensors):
    library.save(record("mochi"), fake_tensors())
    library.save(record("rex"), fake_tensors(seed=3))
    path = library.root / "rex" / "concept.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format": "menagerie-edlora-v9"}))
    message = assert_one_line_error(lambda: library.get("rex"), "concept 'rex'", "'menagerie-edlora-v9'", "update Menagerie")
    assert library.damaged() == {"rex": message} and [c.name for c in library.list()] == ["mochi"]
    # the weights file's own format tag too
    save_file(fake_tensors(seed=3), library.root / "rex" / "concept.safetensors", metadata={"format": "menagerie-edlora-v9"})
    path.write_text(json.dumps(record("rex").to_json()))
    assert_one_line_error(lambda: library.get("rex"), "concept 'rex'", "concept.safetensors has format 'menagerie-edlora-v9'")


def test_wrong_tensors_are_refused_naming_the_concept(library, fake_tensors, base):
    """A weights file whose header is whole but whose tensors are wrong: found when the tensors are read."""
    library.save(record("rex"), fake_tensors())
    tensors = fake_tensors()
    tensors["embeddings"][0, 0, 0] = float("nan")
    save_file(tensors, library.root / "rex" / "concept.safetensors", metadata={"format": "menagerie-edlora-v1"})
    assert_one_line_error(lambda: library.weights("rex"), "concept 'rex' is damaged", "'embeddings' contains NaN")
    # whole tensors of another shape than the base's: the concept is named, with the fix
    save_file(fake_concept_tensors(dim=48), library.root / "rex" / "concept.safetensors", metadata={"format": "menagerie-edlora-v1"})
    library.weights("rex")  # structurally fine
    assert_one_line_error(lambda: library.weights("rex", base), "concept 'rex' does not fit the base model",
                          "48-d; this base's text encoder uses 32-d")


@pytest.mark.parametrize("how", ["truncated", "garbage", "bad json", "nan tensors"])
def test_generating_with_a_damaged_concept_is_a_one_line_error_and_the_rest_works(tmp_path, trained, fresh_base, how):
    """Plain and regional generation, isolation and fusion: the damaged concept is named, nothing is
    loaded for it, and the good concept generates afterwards on the same base."""
    from pipelines.fusion import fuse_concepts
    from pipelines.isolated import IsolateConfig, Subject, isolate
    from pipelines.regional import Region
    from pipelines.sample import SampleConfig, generate

    library = ConceptLibrary(tmp_path / "library")
    library.save(dataclasses.replace(trained.concept), trained.tensors, trained.preview)
    library.save(dataclasses.replace(trained.concept, name="rex"), trained.tensors)
    damage(library.root / "rex", how)
    base = fresh_base()
    tokens = len(base.tokenizer)

    def no_detector(image, labels):
        raise AssertionError("the detector must not run for a damaged concept")

    regions = [Region(box=(0, 0, 32, 64), prompt="<mochi> dog"), Region(box=(32, 0, 64, 64), prompt="<rex> dog")]
    for use in (lambda: generate(base, library, SampleConfig(prompt="a photo of <rex> dog", steps=2)),
                lambda: generate(base, library, SampleConfig(prompt="<mochi> and <rex>", steps=2), regions=regions),
                lambda: isolate(base, library, IsolateConfig(prompt="a dog", subjects=(Subject("dog", "a photo of <rex> dog"),),
                                                             steps=2), detector=no_detector),
                lambda: fuse_concepts(base, library, ["mochi", "rex"])):
        assert_one_line_error(use, "concept 'rex' is damaged")
    assert len(base.tokenizer) == tokens and "rex" not in base.loaded_concepts
    result = generate(base, library, SampleConfig(prompt="a photo of <mochi> dog", steps=2))
    assert result.metadata["concepts"] == ["mochi"] and result.images[0].size == (64, 64)


def test_folders_that_are_not_concepts_are_not_listed(library, fake_tensors):
    library.save(record("mochi"), fake_tensors())
    (library.root / "Holiday Photos").mkdir()
    (library.root / "Holiday Photos" / "concept.json").write_text("{}")  # not a concept name: never a concept
    (library.root / "notes").mkdir()  # neither record nor weights
    assert library.names() == ["mochi"] and library.damaged() == {}


# ---------------------------------------------------------------------------------------------
# Crashes mid-save


def version_two(fake_tensors):
    return record(photo_count=7), fake_tensors(seed=2)


def assert_version_one_intact(root, fake_tensors):
    reopened = ConceptLibrary(root)
    assert reopened.names() == ["mochi"]
    assert reopened.get("mochi").photo_count == 3
    assert_same_tensors(reopened.weights("mochi"), fake_tensors())
    assert leftovers(root) == []


def test_crash_while_writing_weights_keeps_old_version(library, fake_tensors, monkeypatch):
    library.save(record(), fake_tensors())

    def half_written(tensors, path, metadata=None):
        with open(path, "wb") as file:
            file.write(b"\x00" * 100)  # a torn write
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(concept_module, "save_file", half_written)
    with pytest.raises(OSError, match="simulated"):
        library.save(*version_two(fake_tensors))
    monkeypatch.undo()
    assert_version_one_intact(library.root, fake_tensors)


def failing_replace(monkeypatch, fail_on_call: int):
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((str(src), str(dst)))
        if len(calls) == fail_on_call:
            raise OSError("power cut (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(concept_module.os, "replace", replace)
    return calls


def test_crash_before_the_first_rename_keeps_old_version(library, fake_tensors, monkeypatch):
    library.save(record(), fake_tensors())
    failing_replace(monkeypatch, fail_on_call=1)
    with pytest.raises(OSError, match="simulated"):
        library.save(*version_two(fake_tensors))
    monkeypatch.undo()
    assert library.names() == ["mochi"]
    assert_version_one_intact(library.root, fake_tensors)


def test_crash_between_the_two_renames_is_recovered_on_open(library, fake_tensors, monkeypatch):
    """First rename (old version aside) done, second (new version in) fails: the concept is
    briefly missing; the next ConceptLibrary() puts the old version back."""
    library.save(record(), fake_tensors())
    calls = failing_replace(monkeypatch, fail_on_call=2)
    with pytest.raises(OSError, match="simulated"):
        library.save(*version_two(fake_tensors))
    monkeypatch.undo()
    assert calls[0][1].endswith(".old-mochi") and ".staging-mochi-" in calls[1][0]
    assert not (library.root / "mochi").exists()
    assert leftovers(library.root) == [".old-mochi"]  # the staging copy was cleaned up
    assert_version_one_intact(library.root, fake_tensors)


def test_open_drops_stale_old_copy_and_staging(library, fake_tensors):
    """A crash after the swap (while deleting the old copy) leaves the new version in place."""
    library.save(record(photo_count=7), fake_tensors(seed=2))
    (library.root / ".old-mochi").mkdir()
    (library.root / ".old-mochi" / "concept.json").write_text("{}")
    (library.root / ".staging-tama-1234abcd").mkdir()
    (library.root / ".trash-kiki-1234abcd").mkdir()  # an interrupted delete
    reopened = ConceptLibrary(library.root)
    assert reopened.names() == ["mochi"] and reopened.get("mochi").photo_count == 7
    assert leftovers(library.root) == []


# ---------------------------------------------------------------------------------------------
# Export and import


@pytest.fixture
def trained_library(tmp_path, trained):
    library = ConceptLibrary(tmp_path / "trained-library")
    library.save(dataclasses.replace(trained.concept), trained.tensors, trained.preview)
    return library


def test_export_import_round_trips_bit_for_bit(trained_library, trained, tmp_path):
    exported = trained_library.export("mochi", tmp_path / "out" / "mochi.safetensors")
    assert exported.exists() and leftovers(exported.parent) == []
    other = ConceptLibrary(tmp_path / "other")
    imported = other.import_file(exported)
    assert imported.name == "mochi"
    assert_same_tensors(other.weights("mochi"), trained.tensors)
    assert other.get("mochi").to_json() == trained_library.get("mochi").to_json()
    original = np.asarray(Image.open(trained_library.preview_path("mochi")))
    assert np.array_equal(np.asarray(Image.open(other.preview_path("mochi"))), original)
    assert np.array_equal(original, np.asarray(trained.preview))


def test_import_under_another_name(trained_library, trained, tmp_path):
    exported = trained_library.export("mochi", tmp_path / "mochi.safetensors")
    imported = trained_library.import_file(exported, name="mochi-copy")
    assert imported.name == "mochi-copy"
    assert trained_library.names() == ["mochi", "mochi-copy"]
    assert trained_library.get("mochi-copy").to_json()["token"] == "<mochi-copy>"
    assert_same_tensors(trained_library.weights("mochi-copy"), trained.tensors)
    with pytest.raises(UserError, match="concept 'mochi' already exists"):
        trained_library.import_file(exported)
    with pytest.raises(UserError, match="is not valid"):
        trained_library.import_file(exported, name="Not Valid")


def test_export_needs_safetensors_suffix(trained_library, tmp_path):
    with pytest.raises(UserError, match=r"must end in \.safetensors"):
        trained_library.export("mochi", tmp_path / "mochi.pt")
    assert not (tmp_path / "mochi.pt").exists()


def other_architecture(base):
    """The tiny base with a 48-d text encoder: a real model of another architecture."""
    from transformers import CLIPTextConfig, CLIPTextModel

    wider = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=77))
    return dataclasses.replace(base, name="wide-test", text_encoder=wider, fingerprint=architecture_fingerprint(base.unet, wider))


def test_import_onto_another_architecture_is_refused(trained_library, tmp_path, base):
    exported = trained_library.export("mochi", tmp_path / "mochi.safetensors")
    other = ConceptLibrary(tmp_path / "other")
    other.import_file(exported, base=base)  # the same architecture is fine
    wide = other_architecture(base)
    assert wide.fingerprint != base.fingerprint
    with pytest.raises(UserError, match=r"was trained on another architecture .*fingerprint " + base.fingerprint
                       + r".* has fingerprint " + wide.fingerprint):
        other.import_file(exported, name="wide", base=wide)
    # even with a forged fingerprint, the shapes are checked tensor by tensor
    forged = dataclasses.replace(wide, fingerprint=base.fingerprint)
    with pytest.raises(UserError, match="concept embeddings are 32-d; this base's text encoder uses 48-d"):
        other.import_file(exported, name="wide", base=forged)
    assert other.names() == ["mochi"]
    concept = other.get("mochi")
    with pytest.raises(UserError, match=re.escape(f"Use --base {concept.base_model} or retrain the concept on this base")):
        check_compatible(concept, wide)
    check_compatible(concept, base)


def test_corrupt_or_foreign_files_are_refused(tmp_path, library, fake_tensors):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match=r"corrupt\.safetensors is not a readable \.safetensors file"):
        library.import_file(corrupt)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, foreign)
    with pytest.raises(UserError, match=r"foreign\.safetensors is not a Menagerie concept export \(format None\)"):
        library.import_file(foreign)
    bad_json = tmp_path / "bad_json.safetensors"
    save_file(fake_tensors(), bad_json, metadata={"format": "menagerie-edlora-v1", "concept": "{oops"})
    with pytest.raises(UserError, match="not valid JSON"):
        library.import_file(bad_json)
    nan = tmp_path / "nan.safetensors"
    tensors = fake_tensors()
    tensors["embeddings"][0, 0, 0] = float("nan")
    save_file(tensors, nan, metadata={"format": "menagerie-edlora-v1", "concept": json.dumps(record().to_json())})
    with pytest.raises(UserError, match="'embeddings' contains NaN"):
        library.import_file(nan)
    with pytest.raises(UserError, match="does not exist"):
        library.import_file(tmp_path / "missing.safetensors")
    assert library.names() == [] and leftovers(library.root) == []
    assert load_file(foreign)["weight"].shape == (3,)  # refused files are left alone
