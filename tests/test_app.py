"""The studio's handlers on the tiny model, without a browser: training, library actions, fusion,
regional and isolated generation, reuse of settings, history, status, and every catalogued error."""

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import app
from pipelines.concept import Concept, ConceptLibrary
from pipelines.errors import UserError
from pipelines.jobs import CANCELLED, DONE, FAILED, QUEUED
from pipelines.sample import read_png_metadata
from pipelines.train import TrainConfig


def _save_concept(library: ConceptLibrary, name: str) -> None:
    tensors = {
        "embeddings": torch.zeros(2, 16, 8),
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8),
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 4),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 8),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(8, 4),
    }
    concept = Concept(name=name, class_word="dog", base_model="tiny", fingerprint="x", photo_count=3, is_test_model=True)
    library.save(concept, tensors, Image.new("RGB", (16, 16), (200, 10, 10)))


def test_library_rows_show_each_concept_with_preview(tmp_path):
    library = ConceptLibrary(tmp_path)
    _save_concept(library, "mochi")
    _save_concept(library, "tama")
    gallery, rows = app.library_rows(library)
    assert [row[0] for row in rows] == ["<mochi>", "<tama>"]
    assert rows[0][1:3] == ["dog", 3]
    assert len(gallery) == 2 and gallery[0][0].endswith("mochi/preview.png")
    assert "test model" in gallery[0][1]


def test_app_builds_with_title_tabs_and_test_model_banner(tmp_path):
    demo = app.build_app("tiny", str(tmp_path / "lib"), str(tmp_path / "out"))
    assert demo.title == "Menagerie"
    config = demo.get_config_file()
    labels = [c.get("props", {}).get("label") for c in config["components"]]
    for tab in ("Concepts", "Compose", "Generate"):
        assert tab in labels
    texts = " ".join(str(c.get("props", {}).get("value", "")) for c in config["components"])
    assert "noise" in texts  # the tiny-model banner


def _damage(folder: Path, how: str) -> None:
    if how == "truncated":
        weights = folder / "concept.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "garbage":
        (folder / "concept.safetensors").write_bytes(bytes(range(256)) * 4)
    elif how == "bad json":
        (folder / "concept.json").write_text("{oops")


def _one_line_user_error(call, *fragments) -> str:
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    return message


@pytest.mark.parametrize("how", ["truncated", "garbage", "bad json"])
def test_a_damaged_concept_is_shown_with_its_problem_and_refused_in_one_line(tmp_path, how):
    library = ConceptLibrary(tmp_path / "lib")
    _save_concept(library, "mochi")
    _save_concept(library, "rex")
    _damage(library.root / "rex", how)
    # the library table: the good concept as before, the damaged one with its problem; no gallery item
    gallery, rows = app.library_rows(library)
    assert [row[0] for row in rows] == ["<mochi>", "<rex>"] and rows[0][1:3] == ["dog", 3] and rows[0][-1] == ""
    assert "concept 'rex' is damaged" in rows[1][-1] and "delete it" in rows[1][-1]
    assert len(gallery) == 1 and "mochi" in gallery[0][0]
    # the page: Delete can pick it, Compose and the canvas cannot; the page's poll shows the table
    demo = app.build_app("tiny", str(library.root), str(tmp_path / "out"))
    props = {c["props"].get("elem_id"): c["props"] for c in demo.get_config_file()["components"] if c.get("props", {}).get("elem_id")}
    assert [value for _, value in props["library-concept"]["choices"]] == ["mochi", "rex"]
    assert [value for _, value in props["compose-concepts"]["choices"]] == ["mochi"]
    assert [label for label, _ in props["canvas"]["label_list"]] == ["<mochi>"]
    poll = next(f for f in demo.fns.values() if f.name == "poll")
    shown = {getattr(k, "elem_id", None): v for k, v in poll.fn(-1, None).items()}
    assert shown["library-table"] == rows
    # every use of it is refused before queueing, in one line naming it
    studio = demo.studio
    box = app.BoxRow("<rex>", (0, 0, 32, 64), "a photo of <rex> dog", find="dog")
    for use in (lambda: studio.submit_generation(generation(rows=(box,))),
                lambda: studio.submit_generation(generation(mode=app.ISOLATED, rows=(box,))),
                lambda: studio.submit_generation(generation(prompt="a photo of <rex> dog")),
                lambda: studio.submit_fusion(["mochi", "rex"], "gradient"),
                lambda: studio.export("rex"),
                lambda: studio.rename("rex", "rex2")):
        _one_line_user_error(use, "concept 'rex' is damaged")
    assert studio.jobs.jobs() == []
    assert app.concept_of("<rex>", library) is None and app.concept_of("<mochi>", library) == "mochi"
    drawn = {"image": app.blank_canvas(64, 64), "boxes": [{"label": "<rex>", "xmin": 0, "ymin": 0, "xmax": 100, "ymax": 100}]}
    assert app.rows_from_annotator(drawn, 64, 64, [], library)[0].prompt == ""  # refused at Generate, with the reason
    # the good concept still works, and the damaged one can be deleted
    assert Path(studio.export("mochi")).exists()
    assert studio.delete("rex") == "deleted <rex>"
    assert [row[0] for row in app.library_rows(library)[1]] == ["<mochi>"]


# ---------------------------------------------------------------------------------------------
# Pure helpers: canvas and box table


def test_boxes_drawn_on_the_canvas_become_image_pixels_with_default_prompts(tmp_path):
    library = ConceptLibrary(tmp_path)
    _save_concept(library, "mochi")
    scale = app.canvas_scale(64, 32)  # 512 / 64 = 8 canvas pixels per image pixel
    value = {"image": app.blank_canvas(64, 32), "boxes": [
        {"label": "<mochi>", "xmin": 8 * scale, "ymin": 0, "xmax": 40 * scale, "ymax": 32 * scale},
        {"label": "a red ball", "xmin": 0, "ymin": 4 * scale, "xmax": 100 * scale, "ymax": 12 * scale},  # past the edge
    ]}
    rows = app.rows_from_annotator(value, 64, 32, [], library)
    assert rows[0] == app.BoxRow("<mochi>", (8, 0, 40, 32), "a photo of <mochi> dog", "", "dog")
    assert rows[1] == app.BoxRow("a red ball", (0, 4, 64, 12), "a red ball", "", "a red ball")
    # an edited prompt survives moving the box
    edited = [app.replace(rows[0], prompt="<mochi> dog wearing a hat"), rows[1]]
    value["boxes"][0]["xmin"] = 0
    moved = app.rows_from_annotator(value, 64, 32, edited, library)
    assert moved[0].prompt == "<mochi> dog wearing a hat" and moved[0].box == (0, 0, 40, 32)
    # the table round-trips, and the annotator value puts the boxes back on the canvas
    assert app.rows_from_table(app.rows_to_table(moved)) == moved
    boxes = app.annotator_value(64, 32, moved)["boxes"]
    assert (boxes[0]["xmax"], boxes[0]["ymax"]) == (40 * scale, 32 * scale)


@pytest.mark.parametrize("row, fragment", [
    (app.BoxRow("", (0, 0, 8, 8), "something"), "box 1 has no label"),
    (app.BoxRow("<rex>", (0, 0, 8, 8), "a photo of <rex> dog"), "<rex>, which is not in the library"),
    (app.BoxRow("<mochi>", (0, 0, 8, 8), ""), "empty prompt"),
])
def test_bad_boxes_are_refused_with_a_message(tmp_path, row, fragment):
    library = ConceptLibrary(tmp_path)
    _save_concept(library, "mochi")
    with pytest.raises(UserError, match=fragment.replace("<", "<").replace("(", r"\(")):
        app.check_rows([row], library)


def test_progress_html_shows_step_loss_eta_and_queue_place():
    running = app.JobState(id=1, kind="train", title="training <mochi>", status="running", step=3, total=12, loss=0.1234, eta_seconds=75)
    text = app.progress_html(running)
    assert "step 3 / 12" in text and "loss 0.1234" in text and "ETA 1:15" in text and "width:25.0%" in text
    assert "number 2 in the queue" in app.progress_html(app.replace(running, status=QUEUED, position=2))
    assert "&lt;mochi&gt;" in text  # escaped, so a concept token does not become an HTML tag


def test_base_problem_says_how_to_fix_a_missing_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert app.base_problem("tiny") is None
    offline = app.base_problem("someone/not-cached-model")
    assert "not in the local Hugging Face cache" in offline and "hf download someone/not-cached-model" in offline
    assert "does not exist" in app.base_problem(str(tmp_path / "nothing.safetensors"))
    studio = app.Studio("someone/not-cached-model", tmp_path / "lib", tmp_path / "out")
    status = studio.status_markdown()
    assert "cannot be loaded" in status and "--base tiny" in status
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):  # and a job says the same
        studio.models.get()


def test_offline_status_does_not_contradict_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    status = app.Studio("someone/not-cached-model", tmp_path / "lib", tmp_path / "out").status_markdown()
    assert "cannot be loaded" in status and "not loaded yet" not in status
    assert "not loaded yet" in app.Studio("tiny", tmp_path / "lib2", tmp_path / "out2").status_markdown()


def test_an_unloadable_detector_is_said_up_front_and_refused_at_once(tmp_path, monkeypatch, photo):
    """Offline and uncached, the detector used to retry the Hub for minutes under "loading the base
    model" and then advise a flag the app did not have."""
    import socket

    from pipelines import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_probe", None)

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    studio = app.Studio("tiny", tmp_path / "lib", tmp_path / "out", detector="someone/not-cached-detector")
    status = studio.status_markdown()
    assert "detector** cannot be loaded" in status and "python app.py --detector" in status
    rows = (app.BoxRow("dog", (0, 0, 32, 64), "a dog", find="dog"),)
    with pytest.raises(UserError, match="needs the detector, which cannot be loaded"):
        studio.submit_generation(app.GenerationRequest(mode=app.ISOLATED, prompt="a dog", rows=rows, width=64, height=64))
    with pytest.raises(UserError, match="untick"):
        studio.submit_training([photo], TrainConfig(name="mochi", class_word="dog"), auto_mask=True)
    assert studio.jobs.jobs() == []  # nothing was queued
    assert app.Studio("tiny", tmp_path / "lib", tmp_path / "out").detector_problem is None  # tiny detectors build offline


def test_loaders_go_to_the_cache_only_when_the_hub_does_not_answer(monkeypatch):
    import socket

    from pipelines import detect, hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_probe", None)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("unreachable")))
    seen = []
    from transformers import AutoProcessor

    def spy(source, local_files_only=False, **kwargs):
        seen.append(local_files_only)
        raise OSError("not cached")

    monkeypatch.setattr(AutoProcessor, "from_pretrained", spy)
    with pytest.raises(UserError, match="cannot be downloaded here"):
        detect.load_model("detector", "someone/not-cached-detector", torch.device("cpu"))
    assert seen == [True]  # no minutes of retries: the cache only
    assert hub.offline() and not hub.hub_reachable()


def test_a_generation_can_be_cancelled_and_reports_its_eta(tmp_path):
    studio = app.Studio("tiny", tmp_path / "lib", tmp_path / "out")
    assert studio.cancel_latest("generate") is None  # nothing to cancel
    state = studio.submit_generation(app.GenerationRequest(mode=app.REGIONAL, prompt="a dog", width=64, height=64, steps=100))
    while studio.jobs.snapshot(state.id).step < 2:  # sampling has started (and reports an ETA)
        assert studio.jobs.snapshot(state.id).active, studio.jobs.snapshot(state.id).message
        time.sleep(0.05)
    assert studio.jobs.snapshot(state.id).eta_seconds is not None
    studio.cancel_latest("generate")
    finished = studio.jobs.wait(state.id, timeout=120)
    assert finished.status == "cancelled" and finished.step < 100
    assert list(studio.outputs.glob("*.png")) == []  # nothing half-made was saved


def test_messages_keep_concept_names_and_history_has_captions(tmp_path):
    assert "&lt;mochi&gt;" in app.done_html("renamed <mochi> to <kuro>") and "&lt;kuro&gt;" in app.done_html("renamed <mochi> to <kuro>")
    from pipelines.sample import save_png

    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", {"prompt": "a <mochi> dog", "method": "regional", "seed": 7})
    (item,) = app.history_items([str(path)])
    assert item == (str(path), "a <mochi> dog · regional · seed 7")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert app.history_items([str(tmp_path / "plain.png")]) == [(str(tmp_path / "plain.png"), "")]


def test_resizing_scales_the_boxes_instead_of_clamping_them():
    rows = [app.BoxRow("<mochi>", (0, 0, 256, 512), "a"), app.BoxRow("<tama>", (256, 128, 512, 512), "b")]
    small = app.scale_rows(rows, (512, 512), (64, 64))
    assert [r.box for r in small] == [(0, 0, 32, 64), (32, 16, 64, 64)]
    assert [r.box for r in app.scale_rows(small, (64, 64), (128, 96))] == [(0, 0, 64, 96), (64, 24, 128, 96)]
    tiny = app.scale_rows([app.BoxRow("x", (10, 10, 11, 11), "")], (512, 512), (32, 32))
    (x0, y0, x1, y1), = [r.box for r in tiny]
    assert x1 > x0 and y1 > y0  # never zero area
    assert small[0].label == "<mochi>" and small[1].prompt == "b"


def test_canvas_starts_at_the_bases_native_size(tmp_path):
    assert app.Studio("tiny", tmp_path / "a", tmp_path / "o").default_size == 64
    toy = Path(app.__file__).resolve().parent / "assets" / "toyworld" / "model"
    assert app.Studio(str(toy), tmp_path / "b", tmp_path / "o").default_size == 64  # the toy world: 64 px, not 512
    assert app.Studio("stable-diffusion-v1-5/stable-diffusion-v1-5", tmp_path / "c", tmp_path / "o").default_size == 512


def test_estimates_before_starting_warn_about_a_large_canvas_on_a_cpu(tmp_path):
    studio = app.Studio("tiny", tmp_path / "lib", tmp_path / "out")
    assert app.generation_estimate(studio, app.REGIONAL, 64, 64, 30, 1) == ""  # native size, nothing measured yet
    warning = app.generation_estimate(studio, app.REGIONAL, 512, 512, 30, 1)
    assert "64x the area" in warning and "64x64" in warning
    studio.speeds.record(("generate", "tiny", "cpu", 64, 64, 1, 0, app.REGIONAL), 0.5)
    assert "about 0:15" in app.generation_estimate(studio, app.REGIONAL, 64, 64, 30, 1)  # 30 steps x 0.5 s
    assert "about 1:00" in app.generation_estimate(studio, app.REGIONAL, 128, 64, 30, 2)  # 2x area, 2 images
    sd = app.Studio("stable-diffusion-v1-5/stable-diffusion-v1-5", tmp_path / "lib", tmp_path / "out")
    assert "minutes" in app.generation_estimate(sd, app.REGIONAL, 512, 512, 30, 1)
    assert "hours" in app.training_estimate(sd, 5, 0, 2) and "1250 steps" in app.training_estimate(sd, 5, 0, 2)
    studio.speeds.record(("train", "tiny", "cpu", 2), 0.1)
    assert "about 0:10" in app.training_estimate(studio, 3, 100, 2)


def test_training_is_refused_on_zero_gpu_with_a_duplicate_hint(tmp_path, monkeypatch, photo):
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    studio = app.Studio("tiny", tmp_path / "lib", tmp_path / "out")
    with pytest.raises(UserError, match="Duplicate the Space onto a GPU"):
        studio.submit_training([], TrainConfig(name="mochi", class_word="dog"))


def test_persistent_storage_is_used_on_spaces(monkeypatch, tmp_path):
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert app.persistent_dir() is None


# ---------------------------------------------------------------------------------------------
# The studio on the tiny model: one library trained through the job queue, shared by the tests below


def quick(name: str, class_word: str = "dog", **overrides) -> TrainConfig:
    settings = dict(name=name, class_word=class_word, steps=3, batch_size=1, crop_probability=0.0, preview_steps=2, preview_every=2)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def studio(tiny_dir, tmp_path_factory):
    """A studio on the tiny model with <mochi> (dog) and <tama> (cat) trained through its queue."""
    root = tmp_path_factory.mktemp("studio")
    photos = []
    for i in range(3):
        from conftest import procedural_photo

        path = root / f"photo{i}.png"
        procedural_photo(i).save(path)
        photos.append(str(path))
    studio = app.Studio("tiny", root / "lib", root / "out")
    first = studio.submit_training(photos, quick("mochi"))
    while studio.jobs.snapshot(first.id).status == QUEUED:  # until the worker has taken it
        time.sleep(0.01)
    second = studio.submit_training(photos[:2], quick("tama", "cat"))
    studio.first_states = (first, studio.jobs.snapshot(second.id))  # the second waits while the first runs
    for state in (first, second):
        finished = studio.jobs.wait(state.id, timeout=300)
        assert finished.status == DONE, finished.message
    return studio


def test_training_runs_in_the_queue_with_progress_previews_and_saves_the_concept(studio):
    first, second_at_submit = studio.first_states
    assert second_at_submit.status == QUEUED and second_at_submit.position == 1
    done = studio.jobs.snapshot(first.id)
    assert (done.step, done.total) == (3, 3) and done.loss is not None
    assert len(done.previews) == 1 and Path(done.previews[0]).exists()  # preview_every=2 of 3 steps
    assert studio.library.names() == ["mochi", "tama"]
    assert studio.library.get("tama").photo_count == 2
    tama = studio.jobs.latest("train")
    assert "only 2 photo(s)" in tama.message  # the loader's warning reaches the page
    gallery, rows = app.library_rows(studio.library)
    assert len(gallery) == 2 and rows[0][0] == "<mochi>"


def test_training_with_automatic_masks_uses_the_detector(studio, tmp_path, make_photo):
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"p{i}.png"))
        make_photo(i).save(paths[-1])
    state = studio.submit_training(paths, quick("automask", steps=1, preview_every=0), auto_mask=True)
    done = studio.jobs.wait(state.id, timeout=120)
    assert done.status == DONE, done.message
    assert "automask" in studio.library.names()
    studio.delete("automask")


@pytest.mark.parametrize("photos, config, fragment", [
    ([], quick("rex"), "no photos given"),
    (None, quick("mochi"), "already exists"),
    (None, quick("Bad Name"), "is not valid"),
])
def test_bad_training_requests_are_refused_before_queueing(studio, tmp_path, photos, config, fragment):
    if photos is None:
        photos = [str(tmp_path / "p.png")]
        Image.new("RGB", (64, 64)).save(photos[0])
    before = len(studio.jobs.jobs())
    with pytest.raises(UserError, match=fragment):
        studio.submit_training(photos, config)
    assert len(studio.jobs.jobs()) == before


def test_unreadable_photo_is_refused(studio, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(UserError, match="cannot read image"):
        studio.submit_training([str(bad)], quick("rex"))


def test_cancel_stops_a_training_run_and_keeps_the_library(studio, photo, tmp_path):
    path = tmp_path / "p.png"
    photo.save(path)
    state = studio.submit_training([str(path)], quick("rex", steps=500, preview_every=0))
    studio.cancel_training()
    stopped = studio.jobs.wait(state.id, timeout=60)
    assert stopped.status == CANCELLED
    assert studio.library.names() == ["mochi", "tama"]


def test_rename_export_import_and_delete(studio, tmp_path):
    exported = studio.export("tama")
    assert Path(exported).name == "tama.safetensors"
    assert "imported <tama2>" in studio.import_concept(exported, "tama2")
    assert "renamed <tama2> to <tama3>" == studio.rename("tama2", "tama3")
    version = studio.library_version
    studio.delete("tama3")
    assert studio.library_version == version + 1
    assert studio.library.names() == ["mochi", "tama"]
    with pytest.raises(UserError, match="unknown concept"):
        studio.delete("tama3")
    with pytest.raises(UserError, match="pick a concept"):
        studio.export("")


def test_fusion_job_reports_per_concept_errors(studio):
    with pytest.raises(UserError, match="no concepts selected"):
        studio.submit_fusion([], "gradient")
    with pytest.raises(UserError, match="unknown concept"):
        studio.submit_fusion(["mochi", "rex"], "gradient")
    state = studio.jobs.wait(studio.submit_fusion(["mochi", "tama"], "gradient").id, timeout=300)
    assert state.status == DONE, state.message
    records = studio.fused_models()
    assert [r["concepts"] for r in records] == [["mochi", "tama"]]
    rows = app.report_rows(app.fused_report(records[0]))
    assert [r[0] for r in rows] == ["<mochi>", "<tama>"]
    assert all(0 <= r[1] <= r[2] for r in rows)  # mean error at most the max
    assert app.fused_rows(records)[0][:2] == ["<mochi> + <tama>", "gradient"]


def generation(**overrides) -> app.GenerationRequest:
    settings = dict(mode=app.REGIONAL, prompt="a dog and a cat in a garden", width=64, height=64, seed=3, steps=2, guidance=5.0)
    settings.update(overrides)
    return app.GenerationRequest(**settings)


def test_regional_generation_saves_pngs_that_carry_their_settings(studio):
    rows = (app.BoxRow("<mochi>", (0, 0, 32, 64), "a photo of <mochi> dog", "blurry", "dog"),)
    state = studio.jobs.wait(studio.submit_generation(generation(rows=rows, num_images=2)).id, timeout=300)
    assert state.status == DONE, state.message
    paths = state.result.images
    assert len(paths) == 2 and all(Path(p).exists() for p in paths)
    metadata = read_png_metadata(paths[1])
    assert metadata["regions"] == [{"box": [0, 0, 32, 64], "prompt": "a photo of <mochi> dog", "negative_prompt": "blurry"}]
    assert metadata["index"] == 1 and metadata["concepts"] == ["mochi"]
    # "reuse settings" gives back the same form, boxes and labels included
    assert app.request_from_metadata(metadata, 64) == generation(rows=rows, num_images=2)
    assert paths[0] in studio.history() and paths[1] in studio.history()


def test_two_concepts_fuse_once_and_the_base_is_reused(studio):
    rows = (app.BoxRow("<mochi>", (0, 0, 32, 64), "a photo of <mochi> dog"), app.BoxRow("<tama>", (32, 0, 64, 64), "a photo of <tama> cat"))
    first = studio.jobs.wait(studio.submit_generation(generation(rows=rows)).id, timeout=300)
    assert first.status == DONE, first.message
    model = studio.models.model
    again = studio.jobs.wait(studio.submit_generation(generation(rows=rows, seed=4)).id, timeout=300)
    assert again.status == DONE and studio.models.model is model  # the fused base stayed loaded
    assert read_png_metadata(again.result.images[0])["fused"] == model.fused


def test_compose_lists_only_fused_models_that_fit_the_base_and_shows_flagged_layers(studio):
    import json
    import shutil

    from pipelines.fusion import FUSED_RECORD

    state = studio.jobs.wait(studio.submit_fusion(["mochi", "tama"], "weight").id, timeout=300)
    assert state.status == DONE, state.message
    folder = Path(state.result)
    assert str(folder) in [r["folder"] for r in studio.fused_models()]
    record = json.loads((folder / FUSED_RECORD).read_text())
    strangers = {"other-arch": {**record, "fingerprint": "0123456789abcdef"}, "old-format": {**record, "format": "menagerie-fused-v1"}}
    for name, changed in strangers.items():
        shutil.copytree(folder, folder.parent / name)
        (folder.parent / name / FUSED_RECORD).write_text(json.dumps(changed))
    try:
        listed = [Path(r["folder"]).name for r in studio.fused_models()]
        assert folder.name in listed and not set(strangers) & set(listed)
        loaded, studio.models.model = studio.models.model, None  # before the base loads: those made on its name
        try:
            assert folder.name in [Path(r["folder"]).name for r in studio.fused_models()]
            assert "old-format" not in {Path(r["folder"]).name for r in studio.fused_models()}  # (the fingerprint needs the base)
        finally:
            studio.models.model = loaded
    finally:
        for name in strangers:
            shutil.rmtree(folder.parent / name)
    assert app.report_flags({"outliers": []}) == ""
    flags = app.report_flags({"outliers": [{"layer": "unet.x.attn1.to_q", "concept": "mochi", "relative_error": 0.5,
                                            "median_of_kind": 0.02}]})
    assert "1 layer(s)" in flags and "&lt;mochi&gt;" in flags and "25x" in flags and "--rcond" in flags


@pytest.mark.parametrize("request_, fragment", [
    (generation(prompt="  "), "the prompt is empty"),
    (generation(rows=(app.BoxRow("", (0, 0, 8, 8), "x"),)), "has no label"),
    (generation(rows=(app.BoxRow("<rex>", (0, 0, 8, 8), "a photo of <rex> dog"),)), "not in the library"),
    (generation(mode=app.ISOLATED), "needs subjects"),
])
def test_bad_generation_requests_are_refused_before_queueing(studio, request_, fragment):
    with pytest.raises(UserError, match=fragment):
        studio.submit_generation(request_)


def test_errors_found_by_the_pipeline_fail_the_job_not_the_studio(studio):
    rows = (app.BoxRow("<mochi>", (0, 0, 80, 64), "a photo of <mochi> dog"),)  # past the 64-pixel edge
    failed = studio.jobs.wait(studio.submit_generation(generation(rows=rows)).id, timeout=120)
    assert failed.status == FAILED and "region" in failed.message.lower()
    after = studio.jobs.wait(studio.submit_generation(generation()).id, timeout=120)
    assert after.status == DONE


def test_a_concept_deleted_while_its_generation_waits_fails_the_job_in_one_line(tmp_path, tiny_dir):
    """<rex> beside <mochi>, deleted while the job waits in the queue: the job names the unknown
    concept and the known ones (in regional mode the fused folder is computed first)."""
    import threading

    studio = app.Studio("tiny", tmp_path / "lib", tmp_path / "out")
    _save_concept(studio.library, "mochi")
    _save_concept(studio.library, "rex")
    gate = threading.Event()
    studio.jobs.submit("train", "holding the queue", lambda job: gate.wait(60))
    rows = (app.BoxRow("<rex>", (32, 0, 64, 64), "a photo of <rex> dog", find="dog"),
            app.BoxRow("<mochi>", (0, 0, 32, 64), "a photo of <mochi> dog", find="dog"))
    states = [studio.submit_generation(generation(mode=mode, rows=rows)) for mode in (app.REGIONAL, app.ISOLATED)]
    studio.delete("rex")
    gate.set()
    for state in states:
        failed = studio.jobs.wait(state.id, timeout=120)
        assert failed.status == FAILED, failed
        assert "unknown concept 'rex'" in failed.message and "(known: mochi)" in failed.message, failed.message
        assert "internal error" not in failed.message and "\n" not in failed.message


def test_a_concept_with_broken_tensors_fails_its_job_in_one_line_and_the_library_works_on(studio):
    """Whole header, NaN inside: listed, found when the job reads the tensors, named in the job's message."""
    from safetensors.torch import load_file, save_file

    mochi = studio.library.root / "mochi" / "concept.safetensors"
    studio.library.save(app.replace(studio.library.get("mochi"), name="rex"), load_file(mochi))
    tensors = load_file(mochi)
    tensors["embeddings"][0, 0, 0] = float("nan")
    save_file(tensors, studio.library.root / "rex" / "concept.safetensors", metadata={"format": "menagerie-edlora-v1"})
    assert "rex" in app.usable_names(studio.library)  # the header is whole: listed as usable
    try:
        rows = (app.BoxRow("<rex>", (0, 0, 32, 64), "a photo of <rex> dog", find="dog"),)
        for mode in (app.REGIONAL, app.ISOLATED):
            failed = studio.jobs.wait(studio.submit_generation(generation(mode=mode, rows=rows)).id, timeout=300)
            assert failed.status == FAILED and "concept 'rex' is damaged" in failed.message and "NaN" in failed.message
            assert "\n" not in failed.message
        good = (app.BoxRow("<mochi>", (0, 0, 32, 64), "a photo of <mochi> dog"),)
        assert studio.jobs.wait(studio.submit_generation(generation(rows=good)).id, timeout=300).status == DONE
    finally:
        studio.delete("rex")


def test_isolated_generation_shows_layout_detections_and_final(studio):
    rows = (app.BoxRow("<mochi>", (0, 0, 32, 64), "a photo of <mochi> dog", find="dog"),)
    # the tiny random detector scores most boxes high: low thresholds find the dog
    found = studio.jobs.wait(studio.submit_generation(generation(mode=app.ISOLATED, steps=4, rows=rows, box_threshold=0.05,
                                                                 text_threshold=0.05)).id, timeout=300)
    assert found.status == DONE, found.message
    names = [Path(path).name for path, _ in found.result.stages]
    assert names == ["layout.png", "detections.png", "mask_dog.png", "final.png"]
    assert read_png_metadata(found.result.images[0])["method"] == "isolated"
    assert found.result.boxes[0].startswith("Box 1 (dog): ")
    # a detector that finds nothing: the dog is added in its box, and the page says so
    studio.detector = lambda image, labels: []
    try:
        nothing = studio.jobs.wait(studio.submit_generation(generation(mode=app.ISOLATED, steps=4, rows=rows, layout_retries=0)).id,
                                   timeout=300)
    finally:
        studio.detector = "tiny"
    assert nothing.status == DONE and nothing.message == "box 1 (dog): added"
    assert nothing.result.boxes == ["Box 1 (dog): added: no detection in it, drawn fresh"]
    assert len(nothing.result.images) == 1


def stand_in_detector(*found):
    """A detector returning fixed (label, x0, x1) column bands with their masks; records its calls."""
    from pipelines.detect import Detection

    def detector(image, labels):
        detector.calls.append(list(labels))
        width, height = image.size
        out = []
        for label, x0, x1 in found:
            mask = np.zeros((height, width), bool)
            mask[:, x0:x1] = True
            out.append(Detection(label, (float(x0), 0.0, float(x1), float(height)), 0.9, mask))
        return out

    detector.calls = []
    return detector


def spy_on(monkeypatch, name):
    """Wrap app.<name> (a pipelines entry point), recording each call's keyword arguments and config."""
    original = getattr(app, name)
    calls = []

    def wrapper(base, library, config, **kwargs):
        calls.append({"config": config, **kwargs})
        return original(base, library, config, **kwargs)

    monkeypatch.setattr(app, name, wrapper)
    return calls


def test_isolated_mode_isolates_each_subject_in_its_drawn_box(studio, monkeypatch):
    """The rows' boxes reach isolate() as IsolateConfig.boxes, in row order, with the layout settings;
    the page gets the boxes image and a line per box; the PNG carries it all back to the form."""
    calls = spy_on(monkeypatch, "isolate")
    rows = (app.BoxRow("<mochi>", (0, 0, 32, 64), "a photo of <mochi> dog", find="dog"),
            app.BoxRow("<tama>", (32, 8, 64, 56), "a photo of <tama> cat", find="cat"))
    studio.detector = stand_in_detector(("dog", 2, 30))  # the dog in its box; no cat anywhere
    request = generation(mode=app.ISOLATED, steps=4, rows=rows, layout_self_attention=0.5, layout_retries=0, added_bootstrap=0.4,
                         layout_cross_attention="off")
    try:
        state = studio.jobs.wait(studio.submit_generation(request).id, timeout=300)
    finally:
        studio.detector = "tiny"
    assert state.status == DONE, state.message
    (call,) = calls
    config = call["config"]
    assert config.boxes == ((0, 0, 32, 64), (32, 8, 64, 56))
    assert [(s.label, s.prompt) for s in config.subjects] == [("dog", "a photo of <mochi> dog"), ("cat", "a photo of <tama> cat")]
    assert (config.layout_self_attention, config.layout_retries, config.added_bootstrap) == (0.5, 0, 0.4)
    assert config.layout_cross_attention == "off"
    output = state.result
    assert output.boxes == ["Box 1 (dog): matched, IoU 0.88", "Box 2 (cat): added: no detection in it, drawn fresh"]
    assert ("image 1: boxes: matched / split / added" in [caption for _, caption in output.stages])
    metadata = read_png_metadata(output.images[0])
    assert metadata["boxes"] == [[0, 0, 32, 64], [32, 8, 64, 56]]
    assert [a["status"] for a in metadata["assignments"]] == ["matched", "added"]
    assert app.request_from_metadata(metadata, 64) == request  # "reuse settings" brings the layout settings back


def test_layout_settings_reach_generate_and_come_back(studio, monkeypatch):
    from pipelines.layout import DEFAULT_LAYOUT

    calls = spy_on(monkeypatch, "generate")
    rows = (app.BoxRow("dog", (0, 0, 32, 64), "a dog"), app.BoxRow("cat", (32, 0, 64, 64), "a cat"))
    request = generation(rows=rows, bounded_self_attention=0.5, bootstrap=0.25, bounded_guidance=0.0)
    state = studio.jobs.wait(studio.submit_generation(request).id, timeout=300)
    assert state.status == DONE, state.message
    expected = app.replace(DEFAULT_LAYOUT, self_attention=0.5, bootstrap=0.25, guidance=0.0)
    assert calls[0]["layout"] == expected
    metadata = read_png_metadata(state.result.images[0])
    assert metadata["layout"] == expected.to_json()
    assert app.request_from_metadata(metadata, 64) == request
    # the form's defaults are the pipelines' own
    defaults = app.GenerationRequest(mode=app.REGIONAL, prompt="x")
    assert app.layout_of(defaults) == DEFAULT_LAYOUT


def test_reuse_settings_of_cli_images_brings_back_boxes_and_layout():
    """PNGs from `generate --region --layout-*` and `isolate --box` carry no studio form: it is rebuilt."""
    regional = {"method": "regional", "prompt": "a dog and a cat", "width": 64, "height": 64, "seed": 2, "steps": 4,
                "regions": [{"box": [0, 0, 32, 64], "prompt": "a photo of <mochi> dog", "negative_prompt": ""}],
                "layout": {"self_attention": 0.5, "bootstrap": 0.2, "guidance": 0.1, "centre": True, "guidance_iterations": 5}}
    request = app.request_from_metadata(regional, 64)
    assert (request.bounded_self_attention, request.bootstrap, request.bounded_guidance) == (0.5, 0.2, 0.1)
    assert request.rows == (app.BoxRow("<mochi>", (0, 0, 32, 64), "a photo of <mochi> dog"),)
    isolated = {"method": "isolated", "prompt": "a dog and a cat", "width": 64, "height": 64, "t_lay": 0.7,
                "subjects": [{"label": "dog", "prompt": "a photo of <mochi> dog"}, {"label": "cat", "prompt": "a cat"}],
                "boxes": [[0, 0, 32, 64], [32, 0, 64, 64]], "layout_self_attention": 0.25, "layout_retries": 3,
                "added_bootstrap": 0.1, "layout_cross_attention": "all"}
    request = app.request_from_metadata(isolated, 64)
    assert request.mode == app.ISOLATED and request.t_lay == 0.7
    assert (request.layout_self_attention, request.layout_retries, request.added_bootstrap) == (0.25, 3, 0.1)
    assert request.layout_cross_attention == "all"
    assert request.rows == (app.BoxRow("<mochi>", (0, 0, 32, 64), "a photo of <mochi> dog", find="dog"),
                            app.BoxRow("a cat", (32, 0, 64, 64), "a cat", find="cat"))


def test_advanced_layout_controls_start_at_the_pipelines_defaults(tmp_path):
    from pipelines.isolated import IsolateConfig
    from pipelines.layout import DEFAULT_LAYOUT

    demo = app.build_app("tiny", str(tmp_path / "lib"), str(tmp_path / "out"))
    props = {c["props"].get("elem_id"): c["props"] for c in demo.get_config_file()["components"] if c.get("props", {}).get("elem_id")}
    assert props["layout-advanced"]["open"] is False
    assert [props[key]["value"] for key in ("layout-self-attention", "layout-bootstrap", "layout-guidance")] == [
        DEFAULT_LAYOUT.self_attention, DEFAULT_LAYOUT.bootstrap, DEFAULT_LAYOUT.guidance]
    assert [props[key]["value"] for key in ("isolated-self-attention", "layout-cross-attention", "layout-retries", "added-bootstrap")] == [
        IsolateConfig.layout_self_attention, IsolateConfig.layout_cross_attention, IsolateConfig.layout_retries,
        IsolateConfig.added_bootstrap]


# ---------------------------------------------------------------------------------------------
# Start-up, the server log, names and imports


REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "gradio", "diffusers", "transformers")


@pytest.mark.parametrize("argv, code, shown", [(["--help"], 0, "--concepts-dir"), (["--nope"], 2, "unrecognized arguments")])
def test_help_and_bad_flags_answer_before_torch_and_gradio_load(argv, code, shown):
    """`python app.py --help` (or a mistyped flag) parses the command line before the heavy imports."""
    import subprocess
    import sys

    script = ("import runpy, sys\n"
              f"sys.argv = ['app.py', *{argv!r}]\n"
              "try:\n    runpy.run_path('app.py', run_name='__main__')\n"
              "except SystemExit as stop:\n    print('exit', stop.code)\n"
              f"print('loaded', sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = done.stdout.strip().splitlines()
    assert lines[-2:] == [f"exit {code}", "loaded []"], done.stdout + done.stderr
    assert shown in done.stdout + done.stderr


def test_component_file_requests_are_not_printed_to_the_server_log(tmp_path, capsys):
    """gradio prints "id=..., environment=client, type=component, ..." for every canvas file a page loads."""
    import gradio
    import gradio_image_annotation
    from starlette.testclient import TestClient

    component = Path(gradio_image_annotation.__file__).parent / "templates" / "component"
    url = (f"/gradio_api/custom_component/{app.image_annotator.get_component_class_id()}/client/component/"
           f"{sorted(p.name for p in component.iterdir())[0]}")
    vars(gradio.routes).pop("print", None)  # as gradio ships: the builtin print
    before = gradio.Blocks()
    assert TestClient(gradio.routes.App.create_app(before)).get(url).status_code == 200
    assert "environment=client, type=component" in capsys.readouterr().out  # the flood this test is about
    demo = app.build_app("tiny", str(tmp_path / "lib"), str(tmp_path / "out"))
    assert TestClient(gradio.routes.App.create_app(demo)).get(url).status_code == 200
    assert "environment=" not in capsys.readouterr().out
    gradio.routes.print("* Monitoring URL: x *")  # gradio's other messages still reach the log
    assert capsys.readouterr().out == "* Monitoring URL: x *\n"


def test_a_capitalised_concept_name_is_lowercased_with_a_note(tmp_path, tiny_dir):
    from conftest import procedural_photo

    studio = app.Studio("tiny", tmp_path / "lib", tmp_path / "out")
    photos = []
    for i in range(3):
        procedural_photo(i).save(tmp_path / f"photo{i}.png")
        photos.append(str(tmp_path / f"photo{i}.png"))
    state = studio.submit_training(photos, quick("Buddy"))
    assert state.title == "training <buddy>"
    done = studio.jobs.wait(state.id, timeout=300)
    assert done.status == DONE, done.message
    assert studio.library.names() == ["buddy"] and "'Buddy' is stored as 'buddy'" in done.message
    with pytest.raises(UserError, match="concept name 'My Dog' is not valid"):  # still refused: no guessing
        studio.submit_training(photos, quick("My Dog"))


def test_import_refuses_another_architecture_before_the_base_loads(tmp_path, tiny_dir):
    """The studio's base (tiny) is not loaded: its fingerprint comes from its configs."""
    from pipelines.base import load_base

    source = ConceptLibrary(tmp_path / "source")
    _save_concept(source, "rex")  # fingerprint "x": another architecture
    tiny = load_base(str(tiny_dir), device="cpu")
    _save_concept(source, "mochi")
    record = source.get("mochi")
    source.save(app.replace(record, fingerprint=tiny.fingerprint), source.weights("mochi"))
    studio = app.Studio("tiny", tmp_path / "lib", tmp_path / "out")
    with pytest.raises(UserError, match=r"concept 'rex' was trained on another architecture .* fingerprint x\)"):
        studio.import_concept(str(source.export("rex", tmp_path / "rex.safetensors")))
    assert "imported <mochi>" in studio.import_concept(str(source.export("mochi", tmp_path / "mochi.safetensors")))
    assert studio.library.names() == ["mochi"] and studio.models.model is None  # checked without loading the base


def test_library_table_shows_a_short_base_name(tmp_path):
    library = ConceptLibrary(tmp_path / "lib")
    for name, base in (("mochi", "/home/someone/models/my-sd15"), ("tama", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
                       ("rex", "/data/ckpt/dreamshaper_8.safetensors")):
        _save_concept(library, name)
        library.save(app.replace(library.get(name), base_model=base), library.weights(name))
    _, rows = app.library_rows(library)
    assert {row[0]: row[3] for row in rows} == {"<mochi>": "my-sd15", "<tama>": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                                                "<rex>": "dreamshaper_8.safetensors"}
    assert app.short_base_name("tiny") == "tiny" and app.short_base_name("C:\\models\\sd15\\") == "sd15"
