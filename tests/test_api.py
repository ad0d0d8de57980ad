"""The studio as a script sees it: `python app.py --base tiny` on a free port, driven by gradio_client.

The named endpoints (/concepts, /train, /fuse, /generate) are the only ones listed; a concept is
trained from uploaded photos (<mochi> is written straight into the library beforehand, to keep
this fast), the two are fused, and a regional generation with two boxes returns a PNG of the
asked size whose Menagerie metadata names both concepts and the fused model. Bad requests come
back as errors naming the problem. The server's log is kept in tests/artifacts/browser/api-server.log.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from conftest import procedural_photo
from pipelines.concept import ConceptLibrary
from pipelines.sample import read_png_metadata
from test_browser import start_studio

gradio_client = pytest.importorskip("gradio_client")
from gradio_client.exceptions import AppError  # noqa: E402 (after the skip above)

ENDPOINTS = {"/concepts", "/train", "/fuse", "/generate"}


@pytest.fixture(scope="module")
def server(trained, isolated_env, tmp_path_factory):
    """The studio on the tiny model, with <mochi> (dog, trained in-process by conftest) in its library."""
    root = tmp_path_factory.mktemp("api-studio")
    ConceptLibrary(root / "concepts").save(trained.concept, trained.tensors, trained.preview)
    yield from start_studio(["--base", "tiny"], root, isolated_env["cache"], "api-server.log")


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return gradio_client.Client(server["url"], verbose=False, download_files=str(tmp_path_factory.mktemp("api-downloads")))


@pytest.fixture(scope="module")
def trained_over_api(client, tmp_path_factory):
    """<tama> (cat) trained through /train from three uploaded photos, in the fastest setting the studio accepts."""
    folder = tmp_path_factory.mktemp("api-photos")
    photos = []
    for i in range(3):
        procedural_photo(i + 10).save(folder / f"tama{i}.png")
        photos.append(gradio_client.handle_file(str(folder / f"tama{i}.png")))
    return client.predict(photos=photos, name="Tama", class_word="cat", steps=1, batch_size=1, api_name="/train")


@pytest.fixture(scope="module")
def fused(client, trained_over_api):
    return client.predict(concepts=["mochi", "<tama>"], method="gradient", api_name="/fuse")


def test_the_api_lists_exactly_the_named_endpoints_with_their_parameters(client):
    info = client.view_api(print_info=False, return_format="dict")
    assert set(info["named_endpoints"]) == ENDPOINTS and not info["unnamed_endpoints"]  # the page's events are private
    parameters = {name: [p["parameter_name"] for p in endpoint["parameters"]] for name, endpoint in info["named_endpoints"].items()}
    assert parameters["/generate"] == ["prompt", "boxes", "mode", "negative_prompt", "width", "height", "seed", "steps",
                                       "guidance", "num_images", "fused", "settings"]
    assert parameters["/train"][:3] == ["photos", "name", "class_word"] and parameters["/fuse"] == ["concepts", "method"]
    assert info["named_endpoints"]["/generate"]["parameters"][0]["python_type"]["type"] == "str"
    assert info["named_endpoints"]["/train"]["parameters"][0]["python_type"]["type"] == "list[filepath]"


def test_train_from_uploaded_photos_adds_the_concept_to_the_library(client, trained_over_api, server):
    name, preview, status = trained_over_api
    assert name == "tama"  # "Tama" is stored lowercase, with a note
    assert "trained <tama> (cat) in 1 steps" in status and "'Tama' is stored as 'tama'" in status, status
    with Image.open(preview) as image:
        assert image.size == (64, 64)  # the tiny model's native size
    assert (server["root"] / "concepts" / "tama" / "concept.safetensors").exists()
    records = client.predict(api_name="/concepts")
    assert [(r["name"], r["class_word"], r["photo_count"]) for r in records] == [("mochi", "dog", 2), ("tama", "cat", 3)]


def test_fuse_returns_the_fused_model_and_its_report(fused, server):
    fused_id, report, status = fused
    assert status == "fused <mochi> + <tama> (gradient)"
    assert (server["root"] / "concepts" / ".fused" / fused_id).is_dir()
    assert set(report) == {"mochi", "tama"}
    assert all(0 <= r["mean_relative_error"] <= r["max_relative_error"] for r in report.values())


def test_generate_regionally_with_two_boxes_returns_a_png_that_names_the_concepts(client, fused, server):
    fused_id = fused[0]
    boxes = [{"label": "<mochi>", "xmin": 0, "ymin": 0, "xmax": 32, "ymax": 48},
             {"label": "tama", "xmin": 32, "ymin": 0, "xmax": 64, "ymax": 48, "negative_prompt": "blurry"}]
    images, status = client.predict(prompt="a dog and a cat in a hot spring", boxes=boxes, mode="regional", width=64, height=48,
                                    seed=5, steps=2, fused=fused_id, api_name="/generate")
    assert status == "1 image(s), regional, seed 5", status
    assert len(images) == 1
    with Image.open(images[0]) as image:
        assert image.size == (64, 48)
    metadata = read_png_metadata(images[0])
    assert sorted(metadata["concepts"]) == ["mochi", "tama"] and Path(metadata["fused"]).name == fused_id
    assert metadata["regions"] == [
        {"box": [0, 0, 32, 48], "prompt": "a photo of <mochi> dog", "negative_prompt": ""},
        {"box": [32, 0, 64, 48], "prompt": "a photo of <tama> cat", "negative_prompt": "blurry"}]
    assert (metadata["seed"], metadata["steps"], metadata["width"], metadata["height"]) == (5, 2, 64, 48)
    assert (server["root"] / "outputs" / Path(images[0]).name).exists()  # saved by the studio, in its history


@pytest.mark.parametrize("call, fragment", [
    (dict(api_name="/generate", prompt="a dog", boxes=[{"label": "<rex>", "xmin": 0, "ymin": 0, "xmax": 32, "ymax": 64}]),
     "box 1 names the concept <rex>, which is not in the library"),
    (dict(api_name="/generate", prompt="a dog", boxes='[{"label": "<mochi>", "xmin": 0, "ymin": 0, "xmax": 80, "ymax": 64}]'),
     "box 1 (<mochi>) (0, 0, 80, 64) is off the 64x64 canvas"),
    (dict(api_name="/generate", prompt="a dog", boxes=[{"label": "<mochi>", "x0": 0}]), "box 1 has unknown key(s) x0"),
    (dict(api_name="/generate", prompt="a photo of <rex>"), "unknown concept 'rex'"),
    (dict(api_name="/generate", prompt="a dog", mode="sideways"), "mode 'sideways' is not known"),
    (dict(api_name="/generate", prompt="a dog", fused="nope"), "fused model 'nope' is not in the library"),
    (dict(api_name="/generate", prompt="a dog", settings={"colour": 1}), "setting 'colour' is not known"),
    (dict(api_name="/fuse", concepts=["mochi", "rex"]), "unknown concept 'rex'"),
    (dict(api_name="/train", photos=[], name="rex", class_word="dog"), "no photos given"),
])
def test_a_bad_request_is_an_error_naming_the_problem(client, call, fragment):
    with pytest.raises(AppError) as error:
        client.predict(**call)
    assert fragment in str(error.value), str(error.value)
