"""pipelines.__main__: the command line, run in-process (plus one real subprocess for exit codes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.__main__ import main
from pipelines.concept import Concept, ConceptLibrary
from pipelines.sample import read_png_metadata

from conftest import procedural_photo

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def keep_sigint_handler():
    """`train` installs a Ctrl-C handler for its process; put pytest's back afterwards."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


@pytest.fixture
def photos_dir(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):  # three photos: no "few photos" warning
        procedural_photo(i).save(folder / f"mochi{i}.png")
    return folder


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def train_args(photos, library, *extra):
    return ["train", "--base", "tiny", "--images", photos, "--name", "mochi", "--class-word", "dog",
            "--device", "cpu", "--library", library, *extra]


# ---------------------------------------------------------------------------------------------
# The done-when flow


def test_tiny_model_train_list_generate(capsys, tmp_path, photos_dir):
    """tiny-model DIR; train --steps 30; concepts list --json; generate --steps 4 writes a PNG."""
    model = tmp_path / "tiny"
    code, out, _ = run(capsys, "tiny-model", model)
    assert code == 0 and str(model) in out
    assert (model / "model_index.json").exists() and (model / "menagerie_test_model.json").exists()

    library = tmp_path / "library"
    code, out, err = run(capsys, "train", "--base", model, "--images", photos_dir, "--name", "mochi", "--class-word", "dog",
                         "--steps", "30", "--device", "cpu", "--library", library)
    assert code == 0, err
    assert "saved concept <mochi> (dog, 3 photos, 30 steps" in out
    assert "tiny random test model" in out
    assert sorted(os.listdir(library / "mochi")) == ["concept.json", "concept.safetensors", "preview.png"]
    assert not (library / ".checkpoints" / "mochi" / "checkpoint.pt").exists()

    code, out, _ = run(capsys, "concepts", "list", "--json", "--library", library)
    assert code == 0
    (listed,) = json.loads(out)
    assert (listed["name"], listed["class_word"], listed["token"], listed["photo_count"]) == ("mochi", "dog", "<mochi>", 3)
    assert listed["settings"]["steps"] == 30 and listed["is_test_model"] is True

    image = tmp_path / "out" / "mochi.png"
    code, out, err = run(capsys, "generate", "--base", model, "--library", library, "--prompt", "a photo of <mochi> on a beach",
                         "--steps", "4", "--out", image, "--device", "cpu")
    assert code == 0, err
    assert f"wrote {image}" in out and "note:" in out
    with Image.open(image) as png:
        assert png.size == (64, 64) and png.mode == "RGB"
    meta = read_png_metadata(image)
    assert meta["prompt"] == "a photo of <mochi> on a beach"
    assert (meta["steps"], meta["seed"], meta["concepts"]) == (4, 0, ["mochi"])


# ---------------------------------------------------------------------------------------------
# generate


def test_generate_png_metadata_and_seeds(capsys, tmp_path, tiny_dir):
    """`--base tiny` uses the cached model; same seed -> same pixels, another seed -> others."""
    library = tmp_path / "library"

    def generate(name, seed):
        path = tmp_path / name
        code, _, err = run(capsys, "generate", "--base", "tiny", "--library", library, "--prompt", "a photo of a dog",
                           "--steps", "2", "--seed", seed, "--out", path, "--device", "cpu")
        assert code == 0, err
        return path

    first, again, other = generate("a.png", 5), generate("b.png", 5), generate("c.png", 6)
    meta = read_png_metadata(first)
    assert (meta["prompt"], meta["seed"], meta["steps"], meta["concepts"]) == ("a photo of a dog", 5, 2, [])
    assert meta["base_model"] == "tiny" and meta["width"] == 64 and meta["index"] == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert not np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(other)))
    assert read_png_metadata(other)["seed"] == 6
    # Mix-of-Show's standard negative prompt unless one is given ('' turns it off)
    assert meta["negative_prompt"].startswith("longbody, lowres, bad anatomy") and meta["negative_prompt"].endswith("low quality")
    code, _, err = run(capsys, "generate", "--base", "tiny", "--library", library, "--prompt", "a photo of a dog",
                       "--negative-prompt", "", "--steps", "2", "--seed", 5, "--out", tmp_path / "d.png", "--device", "cpu")
    assert code == 0, err
    assert read_png_metadata(tmp_path / "d.png")["negative_prompt"] == ""
    assert not np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(tmp_path / "d.png")))


def test_generate_several_images_are_numbered(capsys, tmp_path):
    code, out, err = run(capsys, "generate", "--base", "tiny", "--library", tmp_path / "lib", "--prompt", "a dog",
                         "--steps", "1", "--num-images", "2", "--out", tmp_path / "dog.png", "--device", "cpu")
    assert code == 0, err
    assert [read_png_metadata(tmp_path / f"dog_{i}.png")["index"] for i in (1, 2)] == [0, 1]
    assert not (tmp_path / "dog.png").exists()


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--prompt", "a photo of <ghost>"], ["unknown concept 'ghost'"]),
        (["--prompt", "a dog", "--width", "60"], ["--width 60 must be a positive multiple of 8"]),
        (["--prompt", "a dog", "--height", "100"], ["--height 100 must be a positive multiple of 8"]),
        (["--prompt", "a dog", "--width", "0"], ["--width 0 must be a positive multiple of 8"]),
        (["--prompt", "a dog", "--steps", "0"], ["--steps 0 must be between 1 and 1000"]),
        (["--prompt", "", "--steps", "1"], ["the prompt is empty"]),
    ],
)
def test_generate_user_errors(capsys, tmp_path, extra, fragments):
    code, _, err = run(capsys, "generate", "--base", "tiny", "--library", tmp_path / "lib", "--out", tmp_path / "x.png",
                       "--device", "cpu", *extra)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "x.png").exists()


def test_generate_base_errors(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--base", tmp_path / "missing-model", "--prompt", "a dog", "--out", tmp_path / "x.png",
                       "--library", tmp_path / "lib")
    assert_one_line_error(code, err, "missing-model", "does not exist")
    code, _, err = run(capsys, "generate", "--base", "menagerie-tests/not-cached", "--prompt", "a dog", "--out", tmp_path / "x.png",
                       "--library", tmp_path / "lib", "--device", "cpu")
    assert_one_line_error(code, err, "not in the local Hugging Face cache", "--base tiny")
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "generate", "--base", "tiny", "--prompt", "a dog", "--out", tmp_path / "x.png",
                           "--library", tmp_path / "lib", "--device", "cuda")
        assert_one_line_error(code, err, "--device 'cuda'", "no CUDA GPU", "use --device cpu")


# ---------------------------------------------------------------------------------------------
# train: bad inputs, each one clear line


def test_train_folder_without_images(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no photos")
    code, _, err = run(capsys, *train_args(empty, tmp_path / "lib"))
    assert_one_line_error(code, err, "no images found in", str(empty))


def test_train_unreadable_image_names_the_file(capsys, tmp_path, photos_dir):
    (photos_dir / "broken.jpg").write_text("not really a JPEG")
    code, _, err = run(capsys, *train_args(photos_dir, tmp_path / "lib"))
    assert_one_line_error(code, err, "cannot read image", "broken.jpg")


def test_train_missing_base(capsys, tmp_path, photos_dir):
    code, _, err = run(capsys, "train", "--base", tmp_path / "nowhere", "--images", photos_dir, "--name", "mochi",
                       "--class-word", "dog", "--library", tmp_path / "lib")
    assert_one_line_error(code, err, "nowhere", "does not exist")


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--class-word", "xylophonists"], ["class word 'xylophonists' is 4 tokens for CLIP"]),
        (["--class-word", "hot dog"], ["class word 'hot dog' is not valid"]),
        (["--name", "Mochi!"], ["concept name 'Mochi!' is not valid"]),
        (["--steps", "0"], ["--steps must be at least 1, got 0"]),
        (["--resolution", "100"], ["--resolution 100 must be a multiple of 64"]),
        (["--multi-subject-probability", "1.5"], ["multi_subject_probability must be between 0 and 1", "got 1.5"]),
        (["--prior-probability", "0.5", "--companions", " , "], ["companions is empty"]),
        (["--prior-probability", "0.5", "--companions", "cat,xylophonists"], ["companion 'xylophonists' is 4 tokens for CLIP"]),
        (["--attn-reg-weight", "-1"], ["attn_reg_weight must be 0 or more"]),
    ],
)
def test_train_bad_settings(capsys, tmp_path, photos_dir, extra, fragments):
    code, _, err = run(capsys, *train_args(photos_dir, tmp_path / "lib"), *extra)
    assert_one_line_error(code, err, *fragments)
    assert ConceptLibrary(tmp_path / "lib").names() == []


def test_train_lowercases_a_capitalised_name_with_a_note(capsys, tmp_path, photos_dir):
    code, out, err = run(capsys, *train_args(photos_dir, tmp_path / "lib"), "--name", "Buddy", "--steps", "2")
    assert code == 0, err
    assert "note: concept name 'Buddy' is stored as 'buddy'" in err and "saved concept <buddy>" in out
    assert ConceptLibrary(tmp_path / "lib").names() == ["buddy"]


def test_train_refuses_existing_concept_without_overwrite(capsys, tmp_path, photos_dir, fake_tensors):
    library = ConceptLibrary(tmp_path / "lib")
    library.save(Concept("mochi", "dog", "tiny", "x", 1), fake_tensors())
    code, _, err = run(capsys, *train_args(photos_dir, library.root))
    assert_one_line_error(code, err, "concept 'mochi' already exists", "--overwrite")


def test_cancelled_training_exits_130(capsys, tmp_path, photos_dir, monkeypatch):
    import pipelines.train
    from pipelines.errors import Cancelled

    def cancelled(*args, **kwargs):
        raise Cancelled("training of mochi cancelled at step 3 of 30")

    monkeypatch.setattr(pipelines.train, "train_concept", cancelled)
    code, _, err = run(capsys, *train_args(photos_dir, tmp_path / "lib"))
    assert code == 130
    assert err.strip().splitlines()[-1] == ("stopped: training of mochi cancelled at step 3 of 30; run the same command"
                                             " with --resume to continue")


# ---------------------------------------------------------------------------------------------
# concepts


@pytest.fixture
def small_library(tmp_path, fake_tensors):
    library = ConceptLibrary(tmp_path / "lib")
    library.save(Concept("mochi", "dog", "tiny", "0123456789abcdef", 3), fake_tensors(), Image.new("RGB", (4, 4), (5, 6, 7)))
    library.save(Concept("tama", "cat", "tiny", "0123456789abcdef", 2), fake_tensors(seed=1))
    return library


def test_concepts_list_show_rename_delete(capsys, small_library):
    root = small_library.root
    code, out, _ = run(capsys, "concepts", "list", "--library", root)
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split()[:2] == ["<mochi>", "dog"] and lines[1].split()[:2] == ["<tama>", "cat"]

    code, out, _ = run(capsys, "concepts", "show", "tama", "--library", root)
    shown = json.loads(out)
    assert code == 0 and shown["class_word"] == "cat" and shown["photo_count"] == 2 and shown["path"] == str(root / "tama")

    code, out, _ = run(capsys, "concepts", "rename", "tama", "kuro", "--library", root)
    assert code == 0 and "renamed <tama> to <kuro>" in out
    assert small_library.names() == ["kuro", "mochi"]

    code, out, _ = run(capsys, "concepts", "delete", "kuro", "--library", root)
    assert code == 0 and small_library.names() == ["mochi"]

    code, _, err = run(capsys, "concepts", "show", "kuro", "--library", root)
    assert_one_line_error(code, err, "unknown concept 'kuro'", "known: mochi")
    code, _, err = run(capsys, "concepts", "rename", "mochi", "Bad Name", "--library", root)
    assert_one_line_error(code, err, "new name 'Bad Name' is not valid")
    code, _, err = run(capsys, "concepts", "delete", "../mochi", "--library", root)
    assert_one_line_error(code, err, "is not valid")
    assert small_library.names() == ["mochi"]


def test_concepts_list_shows_a_damaged_concept_beside_the_good_ones(capsys, small_library):
    root = small_library.root
    (root / "tama" / "concept.safetensors").write_bytes(b"not a safetensors file")
    code, out, _ = run(capsys, "concepts", "list", "--library", root)
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2 and lines[0].split()[:2] == ["<mochi>", "dog"]
    assert lines[1].startswith("<tama>") and "damaged" in lines[1] and "concepts delete tama" in lines[1]
    code, out, _ = run(capsys, "concepts", "list", "--json", "--library", root)
    records = json.loads(out)
    assert [r["name"] for r in records] == ["mochi", "tama"] and "problem" in records[1]


@pytest.mark.parametrize("extra", [
    ["generate", "--prompt", "<mochi> and <nobody> on the grass"],
    ["generate", "--prompt", "a dog and a cat", "--region", "0,0,32,64|a photo of <mochi> dog", "--region", "32,0,64,64|<nobody> cat"],
    ["isolate", "--prompt", "a dog and a cat", "--subject", "dog=a photo of <mochi> dog", "--subject", "cat=<nobody> cat",
     "--box", "0,0,32,64", "--box", "32,0,64,64", "--detector", "tiny", "--segmenter", "tiny"],
])
def test_an_unknown_concept_beside_a_known_one_is_named_in_one_line(capsys, tmp_path, small_library, extra):
    code, _, err = run(capsys, *extra, "--base", "tiny", "--device", "cpu", "--steps", "2", "--width", "64", "--height", "64",
                       "--library", small_library.root, "--out", tmp_path / "out.png")
    assert_one_line_error(code, err, "unknown concept 'nobody'", "(known: mochi, tama)")
    assert not (tmp_path / "out.png").exists()


def test_concepts_import_notes_an_architecture_the_library_does_not_have(capsys, tmp_path, small_library, fake_tensors):
    """Without --base nothing is refused (a library may serve several bases), but the odd one out is said."""
    file = tmp_path / "rex.safetensors"
    other = ConceptLibrary(tmp_path / "other")
    other.save(Concept("rex", "dog", "/models/sd2", "fedcba9876543210", 3), fake_tensors())
    other.export("rex", file)
    code, out, err = run(capsys, "concepts", "import", file, "--library", small_library.root)
    assert code == 0 and "imported <rex> (dog)" in out
    assert err.startswith("note: <rex> was trained on /models/sd2, an architecture none of the library's other concepts has")
    assert "--base /models/sd2" in err
    code, out, err = run(capsys, "concepts", "import", file, "--name", "rex2", "--library", tmp_path / "other")
    assert code == 0 and err == ""  # a library of its architecture: nothing to say


def test_concepts_list_empty(capsys, tmp_path):
    code, out, _ = run(capsys, "concepts", "list", "--library", tmp_path / "empty")
    assert code == 0 and out.startswith("no concepts in")
    code, out, _ = run(capsys, "concepts", "list", "--json", "--library", tmp_path / "empty")
    assert json.loads(out) == []


def test_concepts_export_import(capsys, tmp_path, small_library):
    file = tmp_path / "mochi.safetensors"
    code, out, _ = run(capsys, "concepts", "export", "mochi", file, "--library", small_library.root)
    assert code == 0 and file.exists()
    other = tmp_path / "other"
    code, out, _ = run(capsys, "concepts", "import", file, "--name", "mochi2", "--library", other)
    assert code == 0 and "imported <mochi2> (dog)" in out
    assert ConceptLibrary(other).names() == ["mochi2"]
    # --base checks the architecture: these concepts carry a made-up fingerprint
    code, _, err = run(capsys, "concepts", "import", file, "--base", "tiny", "--library", tmp_path / "third")
    assert_one_line_error(code, err, "trained on another architecture")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk" * 10)
    code, _, err = run(capsys, "concepts", "import", junk, "--library", other)
    assert_one_line_error(code, err, "junk.safetensors is not a readable .safetensors file")
    code, _, err = run(capsys, "concepts", "export", "mochi", tmp_path / "mochi.zip", "--library", small_library.root)
    assert_one_line_error(code, err, "must end in .safetensors")


# ---------------------------------------------------------------------------------------------
# A real process


def test_user_error_in_a_real_process_exits_2_with_one_line(tmp_path, isolated_env):
    """`python -m pipelines` prints one line, no traceback and no library chatter, and exits 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MENAGERIE_CACHE": str(isolated_env["cache"])}
    env.pop("TRANSFORMERS_VERBOSITY", None)  # the CLI itself must keep libraries quiet
    env.pop("DIFFUSERS_VERBOSITY", None)
    process = subprocess.run(
        [sys.executable, "-m", "pipelines", "generate", "--base", str(tmp_path / "no-model"), "--prompt", "a dog",
         "--out", str(tmp_path / "x.png"), "--library", str(tmp_path / "lib"), "--device", "cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert process.returncode == 2
    assert process.stdout == ""
    assert "Traceback" not in process.stderr
    lines = process.stderr.strip().splitlines()
    assert lines == [f"error: --base {str(tmp_path / 'no-model')!r} does not exist; give a Hub id, a diffusers folder"
                     f" or a .safetensors/.ckpt file"]


def test_train_flags_for_concepts_that_share_the_frame_reach_the_config(capsys, tmp_path, photos_dir, monkeypatch):
    import pipelines.train
    from pipelines.errors import Cancelled

    seen = []

    def capture(base, photos, config, **kwargs):
        seen.append(config)
        raise Cancelled("stopped by the test")

    monkeypatch.setattr(pipelines.train, "train_concept", capture)
    code, _, _ = run(capsys, *train_args(photos_dir, tmp_path / "lib"), "--attn-reg-weight", "0.02",
                     "--multi-subject-probability", "0.3", "--prior-probability", "0.2", "--companions", "cat, bird")
    assert code == 130
    (config,) = seen
    assert (config.attn_reg_weight, config.multi_subject_probability, config.prior_probability, config.companions) == (
        0.02, 0.3, 0.2, ("cat", "bird"))


# ---------------------------------------------------------------------------------------------
# Keeping subjects apart: layout settings of generate, boxes of isolate


def test_generate_layout_flags_reach_the_png(capsys, tmp_path):
    """--layout-* shares travel to generate() and into the PNG; unset ones keep DEFAULT_LAYOUT's."""
    from pipelines.layout import DEFAULT_LAYOUT

    path = tmp_path / "pets.png"
    code, out, err = run(capsys, "generate", "--base", "tiny", "--library", tmp_path / "lib", "--prompt", "a dog and a cat",
                         "--steps", "2", "--region", "0,0,32,64|a dog|", "--region", "32,0,64,64|a cat|",
                         "--layout-self-attention", "1", "--layout-bootstrap", "0.2", "--out", path, "--device", "cpu")
    assert code == 0, err
    assert f"wrote {path}" in out
    layout = read_png_metadata(path)["layout"]
    assert (layout["self_attention"], layout["bootstrap"], layout["guidance"]) == (1.0, 0.2, DEFAULT_LAYOUT.guidance)
    assert (layout["centre"], layout["guidance_iterations"]) == (DEFAULT_LAYOUT.centre, DEFAULT_LAYOUT.guidance_iterations)


def stand_in_detect(*layouts):
    """A stand-in for pipelines.detect.detect: the n-th call returns layouts[n] (the last one
    again after that), each a list of (label, x0, x1) column bands with their masks."""
    from pipelines.detect import Detection

    calls = []

    def detect(image, labels, **kwargs):
        calls.append(list(labels))
        width, height = image.size
        found = []
        for label, x0, x1 in layouts[min(len(calls), len(layouts)) - 1]:
            mask = np.zeros((height, width), bool)
            mask[:, x0:x1] = True
            found.append(Detection(label, (float(x0), 0.0, float(x1), float(height)), 0.9, mask))
        return found

    detect.calls = calls
    return detect


FOUR_PETS = ["--prompt", "a dog, a dog, a cat and a bird on the grass", "--subject", "dog=a photo of a dog",
             "--subject", "dog=a photo of a brown dog", "--subject", "cat=a photo of a cat", "--subject", "bird=a photo of a bird",
             "--box", "0,0,16,64", "--box", "16,0,32,64", "--box", "32,0,48,64", "--box", "48,0,64,64"]


def isolate_argv(tmp_path, *extra):
    return ["isolate", "--base", "tiny", "--library", tmp_path / "lib", "--detector", "tiny", "--segmenter", "tiny",
            "--steps", "4", "--device", "cpu", "--out", tmp_path / "out.png", *extra]


def test_isolate_with_boxes_reports_what_became_of_each_box(capsys, tmp_path, monkeypatch):
    """Four boxes; the first layout has one dog across boxes 1-2 and nothing else, the re-sampled one
    also a cat in box 3: the second layout is kept, the dog is split, the cat matched, the bird added."""
    import pipelines.detect

    detect = stand_in_detect([("dog", 4, 28)], [("dog", 4, 28), ("cat", 34, 46)])
    monkeypatch.setattr(pipelines.detect, "detect", detect)
    monkeypatch.setattr(pipelines.detect, "load_model", lambda *args: None)  # no detector weights needed
    stages = tmp_path / "stages"
    code, out, err = run(capsys, *isolate_argv(tmp_path, *FOUR_PETS, "--layout-retries", "1", "--layout-self-attention", "0.5",
                                               "--layout-cross-attention", "all", "--added-bootstrap", "0.5", "--stages", stages))
    assert code == 0, err
    assert detect.calls == [["dog", "cat", "bird"]] * 2  # one layout, then one retry
    lines = out.splitlines()
    wrote = lines.index(f"wrote {tmp_path / 'out.png'}")
    assert lines[wrote + 1: wrote + 6] == [
        "  Box 1 (dog): split: its detection covered boxes 1, 2, so it was cut along the boxes and this box took its part (IoU 0.43)",
        "  Box 2 (dog-2): split: its detection covered boxes 1, 2, so it was cut along the boxes and this box took its part (IoU 0.43)",
        "  Box 3 (cat): matched, IoU 0.75",
        "  Box 4 (bird): added: no detection in it, drawn fresh",
        "  layout re-sampled 1 time (earlier layouts merged or missed boxes)",
    ]
    assert sorted(p.name for p in stages.iterdir()) == ["detections.png", "final.png", "layout.png", "mask_bird.png",
                                                         "mask_cat.png", "mask_dog-2.png", "mask_dog.png"]
    meta = read_png_metadata(tmp_path / "out.png")
    assert meta["boxes"] == [[0, 0, 16, 64], [16, 0, 32, 64], [32, 0, 48, 64], [48, 0, 64, 64]]
    assert [a["status"] for a in meta["assignments"]] == ["split", "split", "matched", "added"]
    assert (meta["layout_attempts"], meta["layout_retries"], meta["layout_self_attention"], meta["added_bootstrap"]) == (2, 1, 0.5, 0.5)
    assert meta["layout_cross_attention"] == "all"
    # each box's mask is its part of the picture: the split dog is cut at x = 16, the bird fills its box
    dog = np.asarray(Image.open(stages / "mask_dog.png")) > 0
    dog_2 = np.asarray(Image.open(stages / "mask_dog-2.png")) > 0
    bird = np.asarray(Image.open(stages / "mask_bird.png")) > 0
    assert dog[:, 4:16].all() and not dog[:, 16:].any() and dog_2[:, 16:28].all() and not dog_2[:, :16].any()
    assert bird[:, 48:].all() and not bird[:, :48].any()


@pytest.mark.parametrize("extra, fragments", [
    (["--prompt", "a dog and a cat", "--subject", "dog=a dog", "--subject", "cat=a cat", "--box", "0,0,32,64"],
     ["1 boxes for 2 subjects", "one box per subject"]),
    (["--prompt", "a dog", "--subject", "dog=a dog", "--box", "0,0,80,64"], ["box (0, 0, 80, 64) is off the 64x64 canvas"]),
    (["--prompt", "a dog", "--subject", "dog=a dog", "--box", "0,0,32"], ["--box '0,0,32' must be four numbers x0,y0,x1,y1"]),
    (["--prompt", "a dog", "--subject", "dog=a dog", "--box", "0,0,32,64", "--layout-self-attention", "1.5"],
     ["--layout-self-attention 1.5 must be a share of the steps between 0 and 1"]),
    (["--prompt", "a dog", "--subject", "dog=a dog", "--box", "0,0,32,64", "--added-bootstrap", "-0.1"],
     ["--added-bootstrap -0.1 must be a share of the steps between 0 and 1"]),
])
def test_isolate_bad_boxes_and_shares_exit_2(capsys, tmp_path, extra, fragments):
    code, _, err = run(capsys, *isolate_argv(tmp_path, *extra))
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("flag", ["--layout-self-attention", "--layout-bootstrap", "--layout-guidance"])
def test_generate_layout_share_outside_0_1_exits_2_before_loading(capsys, tmp_path, flag):
    code, _, err = run(capsys, "generate", "--base", tmp_path / "no-model", "--library", tmp_path / "lib", "--prompt", "a dog",
                       "--region", "0,0,32,64|a dog|", flag, "1.5", "--out", tmp_path / "x.png")
    name = flag.removeprefix("--layout-")
    assert_one_line_error(code, err, f"{name} 1.5 must be a share of the steps between 0 and 1")  # not the missing model
