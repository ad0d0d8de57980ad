"""Menagerie studio: the Gradio app.

A thin layer over `pipelines`: it composes widgets and calls library functions, nothing more.
This first version shows the base model setting and the concept library; training, fusion and
generation tabs come on top of the same functions the CLI uses.

    python app.py                     # default Hub base model (loaded when first needed)
    python app.py --base tiny         # built-in random test model: runs offline, images are noise
    python app.py --port 7860 --concepts-dir ./concepts
"""

from __future__ import annotations

import argparse
import os

import gradio as gr

from pipelines.__main__ import default_library
from pipelines.base import DEFAULT_BASE, TINY
from pipelines.concept import ConceptLibrary
from pipelines.errors import UserError


def library_rows(library: ConceptLibrary) -> tuple[list, list[list]]:
    """Gallery items (preview, caption) and table rows for every concept in the library."""
    gallery, rows = [], []
    for concept in library.list():
        preview = library.preview_path(concept.name)
        caption = f"{concept.token} · {concept.class_word} · {concept.photo_count} photos"
        if concept.is_test_model:
            caption += " · test model (noise)"
        if preview is not None:
            gallery.append((str(preview), caption))
        rows.append([concept.token, concept.class_word, concept.photo_count, concept.base_model, concept.created])
    return gallery, rows


def build_app(base_name: str, library_dir: str) -> gr.Blocks:
    library = ConceptLibrary(library_dir)

    def refresh():
        try:
            return library_rows(library)
        except UserError as error:
            raise gr.Error(str(error)) from None

    with gr.Blocks(title="Menagerie") as demo:
        gr.Markdown("# Menagerie\nYour own pets, together in one picture: train each pet as a concept, then compose them.")
        if base_name == TINY:
            gr.Markdown(
                "**Test model in use (`--base tiny`): a tiny random network. Every image it makes is noise;"
                " it exists so every flow runs offline.**",
                elem_id="test-model-banner",
            )
        gr.Markdown(f"Base model: `{base_name}` · concept library: `{library.root}`")
        with gr.Tab("Concepts"):
            gallery = gr.Gallery(label="Concept library", columns=4, height="auto")
            table = gr.Dataframe(headers=["concept", "class", "photos", "base model", "created"], label="Concepts", interactive=False)
            refresh_button = gr.Button("Refresh")
            refresh_button.click(refresh, outputs=[gallery, table])
        demo.load(refresh, outputs=[gallery, table])
    return demo


def main() -> None:
    parser = argparse.ArgumentParser(description="Menagerie studio")
    parser.add_argument("--base", default=os.environ.get("MENAGERIE_BASE", DEFAULT_BASE), help="Hub id, diffusers folder, checkpoint file or 'tiny'")
    parser.add_argument("--concepts-dir", default=default_library(), help="concept library folder")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--share", action="store_true")
    args = parser.parse_args()
    demo = build_app(args.base, args.concepts_dir)
    demo.queue(default_concurrency_limit=1).launch(server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
