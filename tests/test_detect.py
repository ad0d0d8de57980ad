"""pipelines.detect: Grounding DINO post-processing on synthetic tensors, the tiny random detector and
segmenter end to end (boxes, masks, thresholds, caching), drawing, and `python -m pipelines detect`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import pipelines.detect as detect_module
from pipelines.__main__ import main
from pipelines.detect import (
    Detection,
    box_iou,
    cxcywh_to_xyxy,
    detect,
    draw_detections,
    label_scores,
    label_token_spans,
    load_model,
    non_max_suppression,
    select_detections,
    subject_mask,
)
from pipelines.errors import UserError
from conftest import one_line_error

LOW = dict(box_threshold=0.05, text_threshold=0.05)  # the tiny random detector scores most boxes high
TINY = dict(detector="tiny", segmenter="tiny", device="cpu")


@pytest.fixture(scope="module")
def image():
    """A non-square 80x64 (W x H) noise picture."""
    return Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 80, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------
# Post-processing on synthetic tensors

CLS, SEP, DOT, A, DOG, CAT, BIG = 101, 102, 1012, 1037, 3899, 4937, 2502


def test_label_token_spans_single_and_multi_token_labels():
    # "[CLS] a dog . a cat . [SEP]": labels "a dog" and "a cat" are two tokens each
    ids = [CLS, A, DOG, DOT, A, CAT, DOT, SEP]
    assert label_token_spans(ids, [[A, DOG], [A, CAT]]) == [[1, 2], [4, 5]]
    # "[CLS] dog . cat . [SEP]"
    assert label_token_spans([CLS, DOG, DOT, CAT, DOT, SEP], [[DOG], [CAT]]) == [[1], [3]]
    # a one-token label that also occurs inside an earlier label is found at its own place, in order
    ids = [CLS, BIG, DOG, DOT, DOG, DOT, SEP]
    assert label_token_spans(ids, [[BIG, DOG], [DOG]]) == [[1, 2], [4]]
    # the same label twice: two different spans
    assert label_token_spans([CLS, DOG, DOT, DOG, DOT, SEP], [[DOG], [DOG]]) == [[1], [3]]
    # [CLS] is skipped even if it equals a label id
    assert label_token_spans([CLS, DOG, DOT, SEP], [[DOG]], start=1) == [[1]]


def test_label_token_spans_missing_label_raises():
    with pytest.raises(ValueError):
        label_token_spans([CLS, DOG, DOT, SEP], [[CAT]])
    with pytest.raises(ValueError):  # labels must appear in order
        label_token_spans([CLS, DOG, DOT, CAT, DOT, SEP], [[CAT], [DOG]])


def test_label_token_spans_on_the_tiny_processor():
    """The real processor's prompt: each span decodes back to its label, multi-token labels included."""
    processor, _ = load_model("detector", "tiny", torch.device("cpu"))
    labels = ["dog", "cat", "kitten puppy", "zebra"]  # "zebra" is not in the vocabulary: letter pieces
    ids = processor(images=Image.new("RGB", (64, 64)), text=[labels], return_tensors="pt")["input_ids"][0].tolist()
    label_ids = [processor.tokenizer(label, add_special_tokens=False).input_ids for label in labels]
    assert len(label_ids[2]) == 2 and len(label_ids[3]) > 1
    spans = label_token_spans(ids, label_ids)
    for label, span in zip(labels, spans):
        assert processor.tokenizer.decode([ids[i] for i in span]).replace(" ", "") == label.replace(" ", "")
        assert span == list(range(span[0], span[-1] + 1))
    assert all(a[-1] < b[0] for a, b in zip(spans, spans[1:]))


def test_label_scores_max_over_a_labels_tokens():
    probs = torch.tensor([
        [0.0, 0.1, 0.9, 0.2, 0.3, 0.0],
        [0.0, 0.7, 0.1, 0.6, 0.8, 0.0],
    ])
    scores = label_scores(probs, [[1], [3, 4], [1, 2]])
    assert scores.shape == (2, 3)
    assert torch.equal(scores, torch.tensor([[0.1, 0.3, 0.9], [0.7, 0.8, 0.7]]))


def test_cxcywh_to_xyxy_converts_and_clips():
    boxes = torch.tensor([
        [0.5, 0.5, 0.2, 0.4],  # inside: centre (50, 25), 20 x 20 pixels
        [0.05, 0.9, 0.2, 0.4],  # sticks out left and bottom
        [1.0, 0.0, 0.5, 0.5],  # centred on the top-right corner
    ])
    xyxy = cxcywh_to_xyxy(boxes, width=100, height=50)
    expected = torch.tensor([
        [40.0, 15.0, 60.0, 35.0],
        [0.0, 35.0, 15.0, 50.0],
        [75.0, 0.0, 100.0, 12.5],
    ])
    assert torch.allclose(xyxy, expected, atol=1e-5)


def test_box_iou_hand_checked():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 5.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    iou = box_iou(a, b)
    assert iou.shape == (2, 4)
    # overlap 5x5 = 25 of union 100 + 100 - 25 = 175; disjoint; half contained: 50 / 100; identical
    assert torch.allclose(iou[0], torch.tensor([25 / 175, 0.0, 0.5, 1.0]))
    assert torch.equal(iou[0], iou[1])
    assert box_iou(torch.tensor([[0.0, 0.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0, 0.0]])).item() == 0.0


def test_nms_keeps_the_best_of_overlapping_and_both_disjoint():
    boxes = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],
        [1.0, 1.0, 11.0, 11.0],  # IoU with box 0 = 81 / 119 > 0.5
        [50.0, 50.0, 60.0, 60.0],  # disjoint from both
        [0.0, 0.0, 10.0, 5.0],  # IoU with box 0 = 0.5 exactly: not above, kept
    ])
    scores = torch.tensor([0.6, 0.9, 0.3, 0.5])
    assert non_max_suppression(boxes, scores, iou=0.5) == [1, 3, 2]  # box 0 suppressed by the better box 1
    assert non_max_suppression(boxes[[0, 2]], torch.tensor([0.1, 0.2])) == [1, 0]
    assert sorted(non_max_suppression(boxes, scores, iou=0.9)) == [0, 1, 2, 3]


def test_select_detections_thresholds_best_label_order_and_cap():
    labels = ["dog", "cat"]
    scores = torch.tensor([
        [0.90, 0.10],  # q0 dog 0.9
        [0.70, 0.95],  # q1 cat 0.95: its best label, though dog is above the thresholds too
        [0.45, 0.00],  # q2 passes box (0.3) but not text (0.5)
        [0.20, 0.25],  # q3 fails both
        [0.80, 0.00],  # q4 dog 0.8, overlaps q0: suppressed
        [0.60, 0.00],  # q5 dog 0.6, disjoint
        [0.55, 0.00],  # q6 dog 0.55, disjoint: the 3rd dog, over max_per_label=2
        [0.00, 0.52],  # q7 cat 0.52, disjoint from q1
    ])
    boxes = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],
        [0.0, 0.0, 10.0, 10.0],
        [30.0, 30.0, 40.0, 40.0],
        [30.0, 0.0, 40.0, 10.0],
        [1.0, 1.0, 10.0, 10.0],
        [20.0, 20.0, 30.0, 30.0],
        [40.0, 40.0, 50.0, 50.0],
        [60.0, 0.0, 70.0, 10.0],
    ])
    out = select_detections(scores, boxes, labels, box_threshold=0.3, text_threshold=0.5, max_per_label=2)
    assert [(label, round(score, 4)) for label, _, score in out] == [("cat", 0.95), ("dog", 0.9), ("dog", 0.6), ("cat", 0.52)]
    assert out[0][1] == (0.0, 0.0, 10.0, 10.0) and out[2][1] == (20.0, 20.0, 30.0, 30.0)
    # the text threshold alone: q2 comes back with a lower one; the box threshold alone drops more
    assert ("dog", 0.45) in [(l, round(s, 4)) for l, _, s in select_detections(scores, boxes, labels, 0.3, 0.4, max_per_label=5)]
    high_box = select_detections(scores, boxes, labels, box_threshold=0.85, text_threshold=0.0)
    assert [(l, round(s, 4)) for l, _, s in high_box] == [("cat", 0.95), ("dog", 0.9)]
    # without the cap the third dog is kept
    assert len([d for d in select_detections(scores, boxes, labels, 0.3, 0.5, max_per_label=5) if d[0] == "dog"]) == 3
    assert select_detections(scores, boxes, labels, 0.99, 0.0) == []


def test_detection_to_json():
    mask = np.zeros((4, 5), bool)
    mask[1:3, 1:4] = True
    record = Detection("dog", (1.234, 2.0, 3.0, 4.0), 0.876543, mask).to_json()
    assert record == {"label": "dog", "box": [1.23, 2.0, 3.0, 4.0], "score": 0.8765, "mask_pixels": 6}
    assert Detection("cat", (0, 0, 1, 1), 0.5).to_json()["mask_pixels"] is None


# ---------------------------------------------------------------------------------------------
# The tiny random detector and segmenter


def test_detect_on_tiny_models(image):
    found = detect(image, ["dog", "cat"], **TINY, box_threshold=0.3, text_threshold=0.2)
    assert found, "the tiny random detector scores most boxes high; nothing found means the pipeline broke"
    assert all(isinstance(d, Detection) for d in found)
    assert {d.label for d in found} <= {"dog", "cat"}
    scores = [d.score for d in found]
    assert scores == sorted(scores, reverse=True)
    assert all(0.3 < s <= 1 for s in scores)
    for d in found:
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 <= x1 <= 80 and 0 <= y0 <= y1 <= 64
        assert isinstance(d.mask, np.ndarray) and d.mask.dtype == bool and d.mask.shape == (64, 80)
    assert any(d.mask.any() for d in found)
    for label in ("dog", "cat"):
        assert sum(d.label == label for d in found) <= detect_module.MAX_PER_LABEL


def test_raising_the_box_threshold_never_adds_detections(image):
    """Greedy NMS decides each box from better ones only, so a higher threshold just drops the tail."""
    low = detect(image, ["dog", "cat"], **TINY, box_threshold=0.0, text_threshold=0.0)
    previous = len(low)
    for threshold in (0.3, 0.6, 0.9, 0.999):
        high = detect(image, ["dog", "cat"], **TINY, box_threshold=threshold, text_threshold=0.0)
        assert len(high) <= previous
        previous = len(high)
        expected = [(d.label, d.box, d.score) for d in low if d.score > threshold]
        assert [(d.label, d.box, d.score) for d in high] == expected
    assert len(low) > len(detect(image, ["dog", "cat"], **TINY, box_threshold=0.999, text_threshold=0.0))


def test_without_segmenter_masks_are_none(image):
    found = detect(image, ["dog"], detector="tiny", segmenter=None, device="cpu", **LOW)
    assert found and all(d.mask is None for d in found) and {d.label for d in found} == {"dog"}
    with_masks = detect(image, ["dog"], **TINY, **LOW)
    assert [(d.box, d.score) for d in found] == [(d.box, d.score) for d in with_masks]


@pytest.mark.parametrize("labels", [[], [""], ["  ", ""], ["dog", "a.cat"], ["dog."]])
def test_bad_labels_raise(image, labels):
    with pytest.raises(UserError):
        detect(image, labels, **TINY)


@pytest.mark.parametrize("name", ["box_threshold", "text_threshold"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_thresholds_outside_0_1_raise(image, name, value):
    with pytest.raises(UserError, match="must be in"):
        detect(image, ["dog"], **TINY, **{**LOW, name: value})


def test_models_are_loaded_once(image, monkeypatch):
    import transformers

    detect(image, ["dog"], **TINY, **LOW)  # both models loaded (something is found at these thresholds)
    assert ("detector", "tiny", "float32") in detect_module._MODELS and ("segmenter", "tiny", "float32") in detect_module._MODELS
    calls = []
    for cls in (transformers.AutoModelForZeroShotObjectDetection, transformers.SamModel):
        original = cls.from_pretrained

        def counting(*args, _original=original, **kwargs):
            calls.append(args)
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", counting)
    cached = load_model("detector", "tiny", torch.device("cpu"))
    detect(image, ["dog", "cat"], **TINY, **LOW)
    assert calls == []
    assert load_model("detector", "tiny", torch.device("cpu")) is cached
    # the counter works: an emptied cache loads both again
    monkeypatch.setattr(detect_module, "_MODELS", {})
    detect(image, ["dog"], **TINY, **LOW)
    assert len(calls) == 2


def test_detectors_run_in_fp16_on_cuda_and_fp32_on_the_cpu():
    assert detect_module.detector_dtype(torch.device("cuda")) == torch.float16
    assert detect_module.detector_dtype("cuda:1") == torch.float16
    assert detect_module.detector_dtype(torch.device("cpu")) == torch.float32
    assert detect_module.detector_dtype("mps") == torch.float32
    # loading for a GPU puts nothing on it (this machine has none): fp16 weights wait in CPU memory
    for kind in ("detector", "segmenter"):
        _, model = load_model(kind, "tiny", torch.device("cuda"))
        assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cpu", torch.float16)}
        _, cpu_model = load_model(kind, "tiny", torch.device("cpu"))
        assert {p.dtype for p in cpu_model.parameters()} == {torch.float32}


def test_detection_in_fp16_matches_fp32(image, monkeypatch):
    """The CUDA path's half precision, run on the CPU: inputs are cast to the models' dtype and the
    post-processing is fp32, so the boxes, scores and masks agree with the fp32 run."""
    full = detect(image, ["dog", "cat"], **TINY, box_threshold=0.3, text_threshold=0.2)
    monkeypatch.setattr(detect_module, "detector_dtype", lambda device: torch.float16)
    half = detect(image, ["dog", "cat"], **TINY, box_threshold=0.3, text_threshold=0.2)
    assert next(iter(detect_module._MODELS[("detector", "tiny", "float16")][1].parameters())).dtype == torch.float16
    assert full and [d.label for d in half] == [d.label for d in full]
    for a, b in zip(half, full):
        assert a.box == pytest.approx(b.box, abs=0.5) and a.score == pytest.approx(b.score, abs=0.01)
        assert a.mask.dtype == bool and a.mask.shape == b.mask.shape == (64, 80)
        assert (a.mask != b.mask).mean() < 0.05  # a random SAM's logits sit near its 0 threshold


def test_models_leave_the_job_device_after_each_call(image, monkeypatch):
    """Between jobs the detector and segmenter must not hold GPU memory. With no GPU here, the CPU is
    the job's device and `meta` stands in for the offload device: every parameter has to end there,
    also when the call fails halfway."""
    monkeypatch.setattr(detect_module, "_MODELS", {})  # models parked on `meta` are dropped afterwards
    monkeypatch.setattr(detect_module, "OFFLOAD", torch.device("meta"), raising=False)
    found = detect(image, ["dog"], **TINY, **LOW)
    assert found and all(d.mask is not None for d in found)  # both models ran, on the job's device
    models = [model for _, model in detect_module._MODELS.values()]
    assert len(models) == 2
    assert {p.device.type for model in models for p in model.parameters()} == {"meta"}

    monkeypatch.setattr(detect_module, "_MODELS", {})
    _, sam = load_model("segmenter", "tiny", torch.device("cpu"))
    monkeypatch.setattr(sam, "forward", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory (simulated)")))
    with pytest.raises(torch.OutOfMemoryError):
        detect(image, ["dog"], **TINY, **LOW)
    assert {p.device.type for _, model in detect_module._MODELS.values() for p in model.parameters()} == {"meta"}


def test_unknown_model_name_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--detector"):
        load_model("detector", str(tmp_path / "nothing-here"), torch.device("cpu"))


def test_subject_mask(image, monkeypatch):
    mask = subject_mask(image, "dog", **TINY, **LOW)
    best = detect(image, ["dog"], **TINY, **LOW)[0]
    assert mask.mode == "L" and mask.size == image.size
    assert np.array_equal(np.asarray(mask), best.mask.astype(np.uint8) * 255)
    monkeypatch.setattr(detect_module, "detect", lambda *a, **k: [])
    assert subject_mask(image, "dog") is None


# ---------------------------------------------------------------------------------------------
# Drawing


def test_draw_detections_tints_masks_and_keeps_the_rest(image):
    mask = np.zeros((64, 80), bool)
    mask[30:50, 40:70] = True
    detection = Detection("dog", (38.0, 28.0, 72.0, 52.0), 0.9, mask)
    drawn = draw_detections(image, [detection])
    assert drawn.size == image.size and drawn.mode == "RGB"
    before, after = np.asarray(image).astype(int), np.asarray(drawn).astype(int)
    inside = (slice(42, 50), slice(42, 70))  # inside the mask, below the label text, inside the outline
    assert (before[inside] != after[inside]).any(axis=-1).mean() > 0.9
    color = np.array(detect_module.PALETTE[0])
    assert np.abs(after[inside] - np.round(0.55 * before[inside] + 0.45 * color)).max() <= 1
    assert np.array_equal(before[:20, :30], after[:20, :30])  # far from the box: unchanged
    assert np.array_equal(np.asarray(image), before)  # the input is not modified
    # without a mask only the box outline is drawn
    plain = np.asarray(draw_detections(image, [Detection("dog", (38.0, 28.0, 72.0, 52.0), 0.9)])).astype(int)
    assert np.array_equal(plain[inside], before[inside]) and not np.array_equal(plain, before)


# ---------------------------------------------------------------------------------------------
# python -m pipelines detect


def test_cli_detect_json_and_overlay(capsys, tmp_path, image):
    path = tmp_path / "pets.png"
    image.save(path)
    overlay = tmp_path / "overlay.png"
    argv = ["detect", "--image", str(path), "--labels", "dog,cat", "--detector", "tiny", "--segmenter", "tiny",
            "--device", "cpu", "--box-threshold", "0.05", "--text-threshold", "0.05", "--json"]
    assert main(argv) == 0
    records = json.loads(capsys.readouterr().out)
    assert isinstance(records, list) and records
    for record in records:
        assert set(record) == {"label", "box", "score", "mask_pixels"}
        assert record["label"] in ("dog", "cat") and len(record["box"]) == 4 and record["mask_pixels"] >= 0
    expected = detect(image, ["dog", "cat"], **TINY, **LOW)
    assert [r["label"] for r in records] == [d.label for d in expected]
    assert [r["score"] for r in records] == pytest.approx([d.score for d in expected], abs=1e-4)

    assert main(argv + ["--out", str(overlay)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == records  # "wrote" goes to stderr with --json
    assert str(overlay) in err
    with Image.open(overlay) as png:
        assert png.format == "PNG" and png.size == image.size
        assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(draw_detections(image, expected)))

    assert main(argv[:-1]) == 0  # plain text
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[0] in ("dog", "cat") and "score" in out


def test_cli_detect_missing_image_exits_2(capsys, tmp_path):
    code = main(["detect", "--image", str(tmp_path / "nope.png"), "--labels", "dog", "--detector", "tiny", "--segmenter", "tiny"])
    one_line_error(capsys, code, "nope.png")


def test_cli_detect_bad_labels_exit_2(capsys, tmp_path, image):
    path = tmp_path / "pets.png"
    image.save(path)
    code = main(["detect", "--image", str(path), "--labels", "dog,a.cat", "--detector", "tiny", "--segmenter", "tiny", "--device", "cpu"])
    one_line_error(capsys, code, "'.'")
