"""The app starts and shows the concept library (the studio proper is its own issue)."""

import torch
from PIL import Image

import app
from pipelines.concept import Concept, ConceptLibrary


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


def test_app_builds_with_title_and_concepts_tab(tmp_path):
    demo = app.build_app("tiny", str(tmp_path))
    assert demo.title == "Menagerie"
    config = demo.get_config_file()
    labels = [c.get("props", {}).get("label") for c in config["components"]]
    assert "Concepts" in labels
    texts = " ".join(str(c.get("props", {}).get("value", "")) for c in config["components"])
    assert "noise" in texts  # the tiny-model banner
