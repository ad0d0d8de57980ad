"""The command line: `python -m pipelines SUBCOMMAND ...`.

    tiny-model DIR                       write the tiny random test model
    train --base B --images DIR ...      train an ED-LoRA concept into the library
    concepts list|show|rename|delete|export|import
    concepts import-lora F --trigger ohwx | import-mixofshow F   a LoRA file or a Mix-of-Show checkpoint as a concept
    generate --prompt "... <mochi> ..."  sample an image (PNG with its settings), optionally with regions
                                         (--region; kept apart by --layout-self-attention/-bootstrap/-guidance)
    fuse --concepts mochi,tama           fuse concepts into one model (gradient fusion or weight averaging)
    export-checkpoint --fused DIR --out F.safetensors   a fused model as one A1111/ComfyUI checkpoint + embeddings
    detect --image X --labels dog,cat    find subjects (Grounding DINO + SAM)
    isolate --prompt ... --subject ...   Isolated Diffusion with detector-found subjects, optionally one --box each
    evaluate --images DIR --concept mochi=photos/mochi --out scores.json   CLIP-T/I, DINO-I, CP-CLIP, TI-CLIP, SCR

A user error prints one line and exits with status 2; Ctrl-C during training writes a checkpoint
(resume with --resume) and exits with status 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import warnings
from dataclasses import asdict, replace
from pathlib import Path

from . import KIND_NAMES

DEFAULT_LIBRARY = Path(__file__).resolve().parent.parent / "concepts"


def default_library() -> str:
    return os.environ.get("MENAGERIE_LIBRARY", str(DEFAULT_LIBRARY))


def _quiet_libraries() -> None:
    """Keep library chatter (progress bars of loaders, optional-dependency notices) off the console."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    # The variables above reach only a library not imported yet; the parser may have imported one.
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


# ---------------------------------------------------------------------------------------------
# Subcommands


def cmd_tiny_model(args) -> None:
    from .base import build_tiny_model

    out = build_tiny_model(args.dir, seed=args.seed)
    print(f"wrote tiny random test model to {out} (its images are noise; for tests and offline demos)")


def load_configured_base(args):
    """Load --base on --device (this process's own GPU under `accelerate launch`), then apply
    --memory and --compile (validated first, so a typo fails before the model loads)."""
    from .base import load_base
    from .performance import check_performance, compile_cache_dir, configure_performance, distributed_device

    check_performance(args.memory, args.compile)
    base = load_base(args.base, device=distributed_device(args.device), dtype=args.dtype)
    library = getattr(args, "library", None)
    configure_performance(base, memory=args.memory, compile=args.compile,
                          compile_cache=compile_cache_dir(library) if library else None)
    return base


def cmd_train(args) -> None:
    from tqdm import tqdm

    from .concept import ConceptLibrary, check_name, normalise_name
    from .errors import UserError
    from .performance import world
    from .train import (
        TrainConfig, check_train_config, find_masks, find_photos, load_training_set, parse_companions, train_concept,
    )

    # 1. Check everything that needs no model
    library = ConceptLibrary(args.library)
    args.name, note = normalise_name(args.name)  # "Buddy" trains <buddy>, with a note
    if note:
        print(f"note: {note}", file=sys.stderr)
    check_name(args.name)
    if args.name in library.names() and not args.overwrite:
        raise UserError(f"concept {args.name!r} already exists in {library.root}; pass --overwrite or choose another --name")
    photo_paths = find_photos(args.images)
    if args.masks and args.auto_mask:
        raise UserError("give either --masks or --auto-mask, not both")
    mask_paths = find_masks(args.masks, photo_paths) if args.masks else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        photos, masks = load_training_set(photo_paths, mask_paths)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    if args.auto_mask:
        from .detect import subject_mask

        masks = []
        for path, photo in zip(photo_paths, photos):
            mask = subject_mask(photo, args.class_word, detector=args.detector, segmenter=args.segmenter, device=args.device)
            if mask is None:
                print(f"warning: no {args.class_word} found in {path.name}; its loss covers the whole photo", file=sys.stderr)
            masks.append(mask)
    config = TrainConfig(
        name=args.name, class_word=args.class_word, steps=args.steps, batch_size=args.batch_size,
        resolution=args.resolution, rank=args.rank, lr_embedding=args.lr_embedding,
        lr_text_lora=args.lr_text_lora, lr_unet_lora=args.lr_unet_lora, seed=args.seed,
        checkpoint_every=args.checkpoint_every, attn_reg_weight=args.attn_reg_weight,
        multi_subject_probability=args.multi_subject_probability, prior_probability=args.prior_probability,
        companions=parse_companions(args.companions), kind=args.kind, lr_kv=args.lr_kv,
        class_prior_probability=args.class_prior_probability, cones_max_neurons=args.cones_max_neurons,
    )

    check_train_config(config, len(photos))  # bad settings fail before the model loads

    # 2. Train, with a progress bar; Ctrl-C sets the cancel event so a checkpoint is written
    base = load_configured_base(args)
    cancel = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: cancel.set())
    checkpoint_dir = library.root / ".checkpoints" / args.name
    bar = None  # made at the first step, so settings refused by train_concept leave no empty bar

    def report(progress) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=progress.total, desc=f"training <{args.name}>", unit="step", dynamic_ncols=True)
        bar.n = progress.step
        bar.set_postfix(loss=f"{progress.loss:.4f}", emb_norm=f"{progress.embedding_norm:.3f}", refresh=False)
        bar.refresh()

    try:
        result = train_concept(base, photos, config, masks=masks, callback=report, cancel=cancel,
                               checkpoint_dir=checkpoint_dir, resume=args.resume)
    finally:
        if bar is not None:
            bar.close()
    if world().rank > 0:  # under a multi-process launch, only the first process saves and prints
        return
    library.save(result.concept, result.tensors, result.preview, overwrite=True)
    loss = f", final loss {result.losses[-1]:.4f}" if result.losses else ""
    print(f"saved concept <{args.name}> ({args.class_word}, {len(photos)} photos, {config.steps or len(result.losses)} steps{loss},"
          f" {KIND_NAMES[config.kind]}, {human_size(library.size(args.name))}) to {library.root / args.name}")
    if base.is_test_model:
        print("note: trained on the tiny random test model; its previews are noise")


def parse_pet(text: str) -> tuple[str, str, str]:
    """`--pet NAME=CLASS:DIR` -> (name, class word, photo folder)."""
    from .errors import UserError

    name, _, rest = text.partition("=")
    class_word, _, folder = rest.partition(":")
    if not name or not class_word or not folder:
        raise UserError(f"--pet {text!r} is not NAME=CLASS:DIR, e.g. --pet mochi=dog:photos/mochi")
    return name.strip(), class_word.strip(), folder.strip()


def cmd_train_group(args) -> None:
    from tqdm import tqdm

    from .composites import composite_grid, preview_composites
    from .concept import ConceptLibrary, check_name
    from .errors import UserError
    from .train import GroupMember, TrainConfig, check_train_config, find_masks, find_photos, load_photo, load_training_set, train_group

    # 1. Check everything that needs no model
    library = ConceptLibrary(args.library)
    check_name(args.name, "group name")
    pets = [parse_pet(text) for text in args.pet]
    if len(pets) < 2:
        raise UserError("a group needs two or more --pet NAME=CLASS:DIR")
    members = []
    for name, class_word, folder in pets:
        check_name(name, "pet name")
        if name in library.names() and not args.overwrite:
            raise UserError(f"concept {name!r} already exists in {library.root}; pass --overwrite or choose another name")
        photo_paths = find_photos([folder], flag="--pet")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            photos, masks = load_training_set(photo_paths, find_masks(Path(args.masks) / name, photo_paths) if args.masks else None)
        for warning in caught:
            print(f"warning: <{name}>: {warning.message}", file=sys.stderr)
        members.append(GroupMember(name, class_word, photos, masks))
    backgrounds = [load_photo(p) for p in find_photos([args.backgrounds], flag="--backgrounds")] if args.backgrounds else None
    config = TrainConfig(name=args.name, class_word=members[0].class_word, steps=args.steps, batch_size=args.batch_size,
                         resolution=args.resolution, seed=args.seed, checkpoint_every=args.checkpoint_every, kind=args.kind,
                         multi_subject_probability=args.composite_probability, lr_kv=args.lr_kv)
    check_train_config(config, sum(len(m.photos) for m in members))
    if args.preview:  # composites only, no model: what training will see
        size = args.resolution or 512
        images = preview_composites([(m.photos, m.masks) for m in members], backgrounds, size, 8, args.seed)
        composite_grid(images, 4).save(args.preview)
        print(f"wrote a preview of 8 composites to {args.preview}")
        return

    # 2. Train, with a progress bar; Ctrl-C sets the cancel event so a checkpoint is written
    base = load_configured_base(args)
    cancel = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: cancel.set())
    bar = None

    def report(progress) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=progress.total, desc=f"training group {args.name}", unit="step", dynamic_ncols=True)
        bar.n = progress.step
        bar.set_postfix(loss=f"{progress.loss:.4f}", refresh=False)
        bar.refresh()

    try:
        results = train_group(base, members, config, backgrounds=backgrounds, background_prompt=args.background_prompt,
                              callback=report, cancel=cancel, checkpoint_dir=library.root / ".checkpoints" / args.name,
                              resume=args.resume)
    finally:
        if bar is not None:
            bar.close()
    for result in results:
        library.save(result.concept, result.tensors, result.preview, overwrite=True)
    print(f"saved group {args.name} ({KIND_NAMES[config.kind]}): {', '.join('<' + r.concept.name + '>' for r in results)} to {library.root}")
    if base.is_test_model:
        print("note: trained on the tiny random test model; its previews are noise")


def human_size(size: int) -> str:
    """Bytes as people read them: 812 B, 98.3 KB, 76.8 MB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def cmd_detect(args) -> None:
    from .detect import detect, draw_detections
    from .train import load_photo

    image = load_photo(args.image)
    labels = [label for label in args.labels.split(",")]
    detections = detect(image, labels, detector=args.detector, segmenter=args.segmenter, device=args.device,
                        box_threshold=args.box_threshold, text_threshold=args.text_threshold)
    if args.out:
        draw_detections(image, detections).save(args.out)
    if args.json:
        print(json.dumps([d.to_json() for d in detections], indent=2))
    else:
        for d in detections:
            print(f"{d.label:<12} score {d.score:.3f}  box {[round(v, 1) for v in d.box]}")
        if not detections:
            print(f"nothing found for {', '.join(labels)}")
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr if args.json else sys.stdout)


def cmd_isolate(args) -> None:
    from .base import TEST_MODEL_NOTE
    from .concept import ConceptLibrary
    from .errors import UserError
    from .isolated import IsolateConfig, describe_boxes, isolate, parse_subject, save_stages
    from .layout import parse_box
    from .safety import configure_safety, safety_enabled
    from .sample import save_png

    config = IsolateConfig(
        prompt=args.prompt, subjects=tuple(parse_subject(s) for s in args.subject or []), attachments=tuple(args.attachment or []),
        negative_prompt=negative_prompt_of(args), t_lay=args.t_lay, steps=args.steps, guidance=args.guidance, seed=args.seed,
        width=args.width, height=args.height, box_threshold=args.box_threshold, text_threshold=args.text_threshold,
        boxes=tuple(parse_box(b) for b in args.box or []), layout_self_attention=args.layout_self_attention,
        layout_cross_attention=args.layout_cross_attention, layout_retries=args.layout_retries,
        added_bootstrap=args.added_bootstrap,
    )
    if Path(args.out).suffix.lower() != ".png":
        raise UserError(f"--out {args.out!r} must be a .png file")
    library = ConceptLibrary(args.library)
    base = load_configured_base(args)
    configure_safety(base, safety_enabled(args.safety_checker))
    result = isolate(base, library, config, detector=args.detector, segmenter=args.segmenter, fused=args.fused)
    save_png(result.final, args.out, result.metadata)
    print(f"wrote {args.out}")
    for line in describe_boxes(result):
        print(f"  {line}")
    if args.stages:
        save_stages(result, args.stages)
        print(f"wrote stages (layout, detections, masks, final) to {args.stages}")
    if result.message:
        print(f"note: {result.message}")
    if result.metadata.get("fused_note"):
        print(f"note: {result.metadata['fused_note']}")
    if base.is_test_model:
        print(f"note: {TEST_MODEL_NOTE}")


def cmd_concepts(args) -> None:
    from .concept import ConceptLibrary

    library = ConceptLibrary(args.library)
    if args.action == "list":
        concepts, damaged = library.list(), library.damaged()
        if args.json:
            print(json.dumps([c.to_json() for c in concepts] + [{"name": n, "problem": p} for n, p in damaged.items()],
                             indent=2, sort_keys=True))
        elif not concepts and not damaged:
            print(f"no concepts in {library.root}")
        else:
            for c in concepts:
                group = f"  group {c.group}" if c.group else ""
                print(f"{c.token:<24} {c.class_word:<10} {KIND_NAMES.get(c.kind, c.kind):<22} {human_size(library.size(c.name)):>9}"
                      f" {c.photo_count:>3} photos  {c.base_model}  {c.created}{group}")
            for name, problem in damaged.items():
                print(f"{'<' + name + '>':<24} damaged: {problem} (`concepts delete {name}` removes it)")
    elif args.action == "show":
        concept = library.get(args.name)
        record = concept.to_json()
        record["path"] = str(library.path(args.name))
        print(json.dumps(record, indent=2, sort_keys=True))
    elif args.action == "rename":
        library.rename(args.name, args.new_name)
        print(f"renamed <{args.name}> to <{args.new_name}>")
    elif args.action == "delete":
        library.delete(args.name)
        print(f"deleted <{args.name}>")
    elif args.action == "export" and args.format == "webui":
        from .export import export_for_webui

        base = None
        if args.collapse == "distil":  # distilled through the concept's text encoder and UNet: needs its base
            from .base import load_base

            base = load_base(args.base or library.get(args.name).base_model, device=args.device)
        out = export_for_webui(library, args.name, args.file, how=args.collapse, base=base)
        print(f"exported <{args.name}> for A1111/Forge/ComfyUI to {out} (LoRA, embedding, README.txt)")
    elif args.action == "export":
        out = library.export(args.name, args.file)
        print(f"exported <{args.name}> to {out}")
    elif args.action == "import":
        base = None
        if args.base:  # its architecture from its configs (no weights); loaded only when they cannot be read
            from .base import architecture_of, load_base

            base = architecture_of(args.base) or load_base(args.base, device=args.device or "cpu")
        concept = library.import_file(args.file, name=args.name, base=base, overwrite=args.overwrite)
        print(f"imported <{concept.name}> ({concept.class_word}) into {library.root}")
        others = {c.fingerprint: c.base_model for c in library.list() if c.name != concept.name}
        if base is None and others and concept.fingerprint not in others:
            print(f"note: <{concept.name}> was trained on {concept.base_model}, an architecture none of the library's other"
                  f" concepts has (they were trained on {', '.join(sorted(set(others.values())))}); generate it with"
                  f" --base {concept.base_model} (import --base BASE refuses files that do not fit BASE)", file=sys.stderr)
    elif args.action in ("import-lora", "import-mixofshow"):
        cmd_import_foreign(args, library)


def cmd_import_foreign(args, library) -> None:
    """`concepts import-lora` / `import-mixofshow`: a LoRA file or a Mix-of-Show checkpoint as a concept."""
    from .base import load_base
    from .concept import check_name, normalise_name
    from .errors import UserError
    from .lora_import import import_lora, import_mix_of_show

    args.name, note = normalise_name(args.name)  # "Rex" imports <rex>, with a note
    if note:
        print(f"note: {note}", file=sys.stderr)
    if check_name(args.name) in library.names() and not args.overwrite:  # before the model loads
        raise UserError(f"concept {args.name!r} already exists in {library.root}; pass --overwrite or choose another --name")
    base = load_base(args.base, device=args.device or "cpu")  # the words are its own token embeddings
    if args.action == "import-lora":
        concept = import_lora(library, args.file, args.name, args.class_word, args.trigger, base, trigger_prompt=args.prompt,
                              overwrite=args.overwrite)
        print(f"imported {Path(args.file).name} ({concept.source_format} naming) as <{concept.name}>: prompts write"
              f" \"{concept.trigger} {concept.class_word}\" as <{concept.name}>; fusion encodes {concept.concept_prompt!r}")
    else:
        concept = import_mix_of_show(library, args.file, args.name, args.class_word, base, overwrite=args.overwrite)
        print(f"imported Mix-of-Show's {' '.join(concept.settings['mix_of_show_words'])} as <{concept.name}> ({concept.class_word})")


def negative_prompt_of(args) -> str:
    from .sample import DEFAULT_NEGATIVE_PROMPT

    return DEFAULT_NEGATIVE_PROMPT if args.negative_prompt is None else args.negative_prompt


def cmd_fuse(args) -> None:
    from tqdm import tqdm

    from .base import load_base
    from .concept import ConceptLibrary
    from .fusion import FusionConfig, fuse_concepts

    library = ConceptLibrary(args.library)
    names = [n.strip() for n in args.concepts.split(",") if n.strip()]
    for name in names:
        library.get(name)  # unknown concepts fail before the model loads
    base = load_base(args.base, device=args.device, dtype=args.dtype)
    bar = None  # made at the first report, so input errors print no empty bar

    def report(stage: str, done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="fusing", unit="pass", dynamic_ncols=True)
        bar.total, bar.n = total, done
        bar.set_description(stage[:60])
        bar.refresh()

    cancel = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: cancel.set())
    try:
        fused = fuse_concepts(base, library, names, FusionConfig(method=args.method, rcond=FusionConfig.rcond if args.rcond is None else args.rcond), out_dir=args.out,
                              callback=report, cancel=cancel)
    finally:
        if bar is not None:
            bar.close()
    print(f"fused {', '.join('<' + n + '>' for n in names)} with {fused.method} fusion into {fused.folder}")
    for name, row in fused.report.get("summary", {}).items():
        print(f"  <{name}>: mean relative output error {row['mean_relative_error']:.4f}"
              f" (weight averaging {row['weight_average_mean_relative_error']:.4f})")
    for row in fused.report.get("outliers", [])[:10]:
        print(f"  flagged: {row['layer']} keeps <{row['concept']}> with relative error {row['relative_error']:.3f},"
              f" {row['relative_error'] / max(row['median_of_kind'], 1e-12):.0f}x its peers' median; try a smaller --rcond")
    if fused.note:
        print(f"note: {fused.note}")
    if args.report:
        Path(args.report).write_text(json.dumps(fused.report, indent=1, sort_keys=True) + "\n")
        print(f"wrote report {args.report}")


def cmd_export_checkpoint(args) -> None:
    from .base import load_base
    from .single_file import check_out_path, export_fused_checkpoint

    out, embeddings, readme = check_out_path(args.out)  # a bad --out fails before the model loads
    base = load_base(args.base, device="cpu", dtype="fp32")  # fp32: the fused updates stay exact
    export_fused_checkpoint(base, args.fused, out, half=args.half)
    print(f"wrote {out} (original SD layout, {'fp16' if args.half else 'fp32'}), embeddings in {embeddings}, usage in {readme}")
    if base.fused_note:
        print(f"note: {base.fused_note}")


def cmd_generate(args) -> None:
    from .base import TEST_MODEL_NOTE
    from .concept import ConceptLibrary
    from .errors import UserError
    from .layout import DEFAULT_LAYOUT, check_layout_control
    from .regional import load_regions, parse_region
    from .safety import blocked_note, configure_safety, safety_enabled
    from .sample import SampleConfig, check_size, generate, save_png

    config = SampleConfig(
        prompt=args.prompt, negative_prompt=negative_prompt_of(args), steps=args.steps, guidance=args.guidance,
        seed=args.seed, width=args.width, height=args.height, num_images=args.num_images,
        scheduler=args.scheduler, lora_scale=args.lora_scale,
    )
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {args.out!r} must be a .png file")
    regions = [parse_region(text) for text in args.region or []]
    if args.regions:
        regions += load_regions(args.regions)
    layout = replace(DEFAULT_LAYOUT, self_attention=args.layout_self_attention, bootstrap=args.layout_bootstrap,
                     guidance=args.layout_guidance)  # LayoutControl; centring and guidance iterations as DEFAULT_LAYOUT
    # sizes and shares fail before the model loads, each under its own flag; 8 stands for "not given" (native size)
    check_size(8 if args.width is None else args.width, 8 if args.height is None else args.height)
    check_layout_control(layout)
    library = ConceptLibrary(args.library)
    base = load_configured_base(args)
    configure_safety(base, safety_enabled(args.safety_checker))
    result = generate(base, library, config, regions=regions, fused=args.fused, layout=layout)
    for i, image in enumerate(result.images):
        path = out if len(result.images) == 1 else out.with_name(f"{out.stem}_{i + 1}{out.suffix}")
        save_png(image, path, {**result.metadata, "seed": config.seed, "index": i})
        print(f"wrote {path}")
    if result.blocked:
        print(f"note: {blocked_note(result.blocked, len(result.images))}")
    if result.metadata.get("fused_note"):
        print(f"note: {result.metadata['fused_note']}")
    if base.is_test_model:
        print(f"note: {TEST_MODEL_NOTE}")


def cmd_evaluate(args) -> None:
    from .scores import evaluate, find_images, format_table, load_concept_references, load_score_models, plan_images, write_scores

    concepts = load_concept_references(args.concept or [], args.library)  # bad input fails before the models load
    paths = find_images(args.images, "--images")
    plan_images(paths, args.prompt, concepts)
    models = load_score_models(clip=args.clip, dino=args.dino, detector=None if args.detector == "none" else args.detector,
                               device=args.device)
    result = evaluate(paths, args.prompt, concepts, models)
    print(format_table(result))
    print(f"wrote {write_scores(result, args.out)}")
    if result.get("note"):
        print(f"note: {result['note']}")


# ---------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    from .base import DEFAULT_BASE, DTYPES
    from .export import DEFAULT_COLLAPSE
    from .isolated import LAYOUT_CROSS_ATTENTION, IsolateConfig as IsolateDefaults
    from .layout import DEFAULT_LAYOUT

    parser = argparse.ArgumentParser(prog="python -m pipelines", description="Menagerie: your own pets, together in one picture.")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_flags(p, base=True):
        if base:
            p.add_argument("--base", default=DEFAULT_BASE, help=f"Hub id, diffusers folder, .safetensors/.ckpt file, or 'tiny' (default {DEFAULT_BASE})")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
        p.add_argument("--dtype", default=None, choices=list(DTYPES), help="weights' precision (default: bf16/fp16 on GPUs, fp32 on CPU)")

    def performance_flags(p):
        from . import COMPILE_MODES, MEMORY_MODES

        p.add_argument("--memory", default="auto", choices=MEMORY_MODES,
                       help="auto (default: chosen from free GPU memory), high, low (gradient checkpointing, 8-bit AdamW"
                            " if bitsandbytes is installed, VAE slicing) or lowest (also keeps the text encoder and VAE on the CPU)")
        p.add_argument("--compile", nargs="?", const="default", default="off", choices=COMPILE_MODES,
                       help="torch.compile the UNet (bare --compile: 'default'; 'reduce-overhead' adds CUDA graphs);"
                            " the first run of each shape compiles for a while, later runs are faster")

    def detector_flags(p):
        from .detect import DEFAULT_DETECTOR, DEFAULT_SEGMENTER

        p.add_argument("--detector", default=DEFAULT_DETECTOR, help=f"Grounding DINO: Hub id, folder or 'tiny' (default {DEFAULT_DETECTOR})")
        p.add_argument("--segmenter", default=DEFAULT_SEGMENTER, help=f"SAM: Hub id, folder or 'tiny' (default {DEFAULT_SEGMENTER})")

    def library_flag(p):
        p.add_argument("--library", default=default_library(), help="concept library folder (default: ./concepts or $MENAGERIE_LIBRARY)")

    def safety_flag(p):
        p.add_argument("--safety-checker", choices=["on", "off"], default=None,
                       help="run Stable Diffusion's safety checker on every image (flagged ones are saved black);"
                            " default: on when running on Hugging Face Spaces (SPACE_ID set), off elsewhere")

    p = sub.add_parser("tiny-model", help="write the tiny random SD1.5-structured test model to DIR")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("train", help="train a concept (ED-LoRA, Custom Diffusion or Cones) from photos of one subject")
    model_flags(p)
    performance_flags(p)
    library_flag(p)
    p.add_argument("--images", nargs="+", required=True, help="folder(s) or files of photos of the subject")
    p.add_argument("--masks", default=None, help="folder of subject masks (white = subject), one per photo, same file stem")
    p.add_argument("--name", required=True, help="concept name; prompts use it as <name>")
    p.add_argument("--class-word", required=True, help="what the subject is, one word: dog, cat, bird...")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 500 x photos / batch size, as Mix-of-Show)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--resolution", type=int, default=None, help="training image size (default: the base's native size)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    p.add_argument("--lr-embedding", type=float, default=1e-3)
    p.add_argument("--lr-text-lora", type=float, default=1e-5)
    p.add_argument("--lr-unet-lora", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (0: only on Ctrl-C)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this concept")
    p.add_argument("--overwrite", action="store_true", help="replace a concept of the same name")
    p.add_argument("--auto-mask", action="store_true", help="find the subject in each photo (Grounding DINO + SAM) for the masked loss")
    p.add_argument("--attn-reg-weight", type=float, default=0.01,
                   help="weight of Mix-of-Show's cross-attention regulariser, which keeps the concept's attention on the"
                        " subject; acts only with --masks or --auto-mask (default 0.01, 0: off)")
    p.add_argument("--multi-subject-probability", type=float, default=0.0,
                   help="chance a training example shows the pet beside another animal drawn by the base model (MuDI Seg-Mix; default 0)")
    p.add_argument("--prior-probability", type=float, default=0.0,
                   help="chance a training example is a two-animal scene drawn by the base model, with no concept (default 0)")
    p.add_argument("--companions", default="dog,cat",
                   help="comma-separated animals for those examples; the class word is always added (default dog,cat)")
    p.add_argument("--kind", default="edlora", choices=["edlora", "custom-diffusion", "cones"],
                   help="edlora (default: Mix-of-Show's ED-LoRA), custom-diffusion (Custom Diffusion: a modifier token and"
                        " the cross-attention K/V, about 77 MB at SD1.5 size), or cones (Cones: concept neurons shut, under 100 KB)")
    p.add_argument("--lr-kv", type=float, default=8e-5, help="Custom Diffusion's learning rate (token and K/V; default 8e-5)")
    p.add_argument("--class-prior-probability", type=float, default=0.0,
                   help="chance a training example is a base-model picture of the class word (prior preservation; default 0)")
    p.add_argument("--cones-max-neurons", type=int, default=20000, help="Cones: most neurons a concept shuts (default 20000)")
    detector_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-group", help="train two or more pets together on composites of them all (Gen4Gen / MuDI joint concept)")
    model_flags(p)
    performance_flags(p)
    library_flag(p)
    p.add_argument("--name", required=True, help="the group's name (each pet is its own concept, <pet>)")
    p.add_argument("--pet", action="append", default=[], required=True, help="NAME=CLASS:DIR, once per pet, e.g. mochi=dog:photos/mochi")
    p.add_argument("--masks", default=None, help="folder with one subfolder of subject masks per pet name (white = subject)")
    p.add_argument("--kind", default="joint", choices=["joint", "custom-diffusion"],
                   help="joint (default: ED-LoRA words per pet, one shared LoRA) or custom-diffusion (its joint training)")
    p.add_argument("--backgrounds", default=None, help="folder of background photos for the composites")
    p.add_argument("--background-prompt", default="",
                   help="what the backgrounds show, e.g. 'on the grass'; without --backgrounds the base model draws them from it"
                        " (neither: black backgrounds, as MuDI's Seg-Mix)")
    p.add_argument("--composite-probability", type=float, default=0.5, help="chance a training example is a composite of all pets (default 0.5)")
    p.add_argument("--preview", default=None, help="only write a grid of 8 composites to this PNG, and train nothing")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 500 x photos / batch size)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--lr-kv", type=float, default=8e-5, help="Custom Diffusion's learning rate (default 8e-5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this group")
    p.add_argument("--overwrite", action="store_true", help="replace concepts of the same names")
    p.set_defaults(func=cmd_train_group)

    p = sub.add_parser("concepts", help="list, show, rename, delete, export or import concepts")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("list")
    library_flag(a)
    a.add_argument("--json", action="store_true", help="print JSON")
    a = actions.add_parser("show")
    library_flag(a)
    a.add_argument("name")
    a = actions.add_parser("rename")
    library_flag(a)
    a.add_argument("name")
    a.add_argument("new_name")
    a = actions.add_parser("delete")
    library_flag(a)
    a.add_argument("name")
    a = actions.add_parser("export")
    library_flag(a)
    a.add_argument("name")
    a.add_argument("file", help="output .safetensors file (menagerie) or folder (webui)")
    a.add_argument("--format", choices=["menagerie", "webui"], default="menagerie",
                   help="menagerie: one file for `concepts import`; webui: a kohya LoRA + embedding + README.txt for"
                        " A1111/Forge/ComfyUI (the embedding collapses the 16 layer-wise tokens: lossy)")
    a.add_argument("--collapse", default="distil",
                   help="webui: how the 16 layer-wise token pairs become one: distil (default; the pair whose cross-attention"
                        " keys/values come closest, best in the toy world, docs/toyworld.md; loads the base model; about 20 s"
                        f" for the toy model on a CPU), {DEFAULT_COLLAPSE} or layer:<i> (0-15)")
    a.add_argument("--base", default=None, help="webui --collapse distil: the base model (default: the one the concept was trained on)")
    a.add_argument("--device", default=None, help="webui --collapse distil: where the base model runs (default: the best available)")
    a = actions.add_parser("import")
    library_flag(a)
    a.add_argument("file", help="a .safetensors file written by export")
    a.add_argument("--name", default=None, help="import under another name")
    a.add_argument("--base", default=None, help="refuse the concept unless it fits this base model's architecture")
    a.add_argument("--device", default=None)
    a.add_argument("--overwrite", action="store_true")
    for action, what in (("import-lora", "a LoRA file (kohya, A1111, diffusers or peft naming; .safetensors)"),
                         ("import-mixofshow", "a Mix-of-Show ED-LoRA checkpoint (.pth)")):
        a = actions.add_parser(action, help=f"import {what} as a concept")
        library_flag(a)
        a.add_argument("file", help=what)
        a.add_argument("--name", required=True, help="concept name; prompts use it as <name>")
        a.add_argument("--class-word", required=True, help="what the subject is, one word: dog, cat, man...")
        if action == "import-lora":
            a.add_argument("--trigger", required=True, help="the LoRA's trigger word(s), e.g. ohwx; <name> means 'TRIGGER CLASS-WORD'")
            a.add_argument("--prompt", default=None, help="a prompt the LoRA was trained on, naming the subject as 'TRIGGER"
                                                          " CLASS-WORD' (default 'photo of a TRIGGER CLASS-WORD'); fusion uses it")
        a.add_argument("--base", default=DEFAULT_BASE, help=f"the SD1.x base the file is for (default {DEFAULT_BASE})")
        a.add_argument("--device", default=None, help="where to load the base (default cpu)")
        a.add_argument("--overwrite", action="store_true", help="replace a concept of the same name")
    p.set_defaults(func=cmd_concepts)

    p = sub.add_parser("generate", help="generate images; prompts name concepts as <name>")
    model_flags(p)
    performance_flags(p)
    library_flag(p)
    safety_flag(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None,
                   help="what to steer away from (default: Mix-of-Show's standard negative prompt; '' for none)")
    p.add_argument("--out", required=True, help="output .png (with several images: name_1.png, name_2.png, ...)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=None, help="pixels, multiple of 8 (default: the base's native size)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--scheduler", default="dpm++", choices=["dpm++", "ddim", "euler"])
    p.add_argument("--lora-scale", type=float, default=1.0,
                   help="strength of a single concept's LoRA (default 1.0, as in every mode; Mix-of-Show suggests 0.7)")
    p.add_argument("--fused", default=None, help="fused model folder (from `fuse`); without it several concepts are fused on the fly")
    p.add_argument("--region", action="append", help="'x0,y0,x1,y1|prompt|negative' box in pixels; repeat for more regions")
    p.add_argument("--regions", default=None, help="JSON file: [{\"box\": [x0,y0,x1,y1], \"prompt\": ..., \"negative_prompt\": ...}]")
    p.add_argument("--layout-self-attention", type=float, default=DEFAULT_LAYOUT.self_attention, metavar="SHARE",
                   help="with regions: share of the steps (0-1, from the first) in which pixels in one box do not attend to"
                        " another box, so one body cannot grow across two boxes; cheap (a masked attention)"
                        f" (default {DEFAULT_LAYOUT.self_attention})")
    p.add_argument("--layout-bootstrap", type=float, default=DEFAULT_LAYOUT.bootstrap, metavar="SHARE",
                   help="with regions: share of the steps in which each box is also denoised alone, on a plain background,"
                        " so it starts with a subject of its own; each box adds a branch to the UNet batch on those steps"
                        f" (default {DEFAULT_LAYOUT.bootstrap})")
    p.add_argument("--layout-guidance", type=float, default=DEFAULT_LAYOUT.guidance, metavar="SHARE",
                   help="with regions: share of the steps whose latent is first moved so each box's attention stays inside"
                        " it (Bounded Attention's loss); slow: several extra UNet passes with gradients per guided step"
                        f" (default {DEFAULT_LAYOUT.guidance})")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("detect", help="find labelled subjects in an image (Grounding DINO boxes, SAM masks)")
    p.add_argument("--image", required=True)
    p.add_argument("--labels", required=True, help="comma-separated, e.g. dog,cat")
    p.add_argument("--json", action="store_true", help="print detections as JSON")
    p.add_argument("--out", default=None, help="write the image with masks and boxes drawn")
    p.add_argument("--box-threshold", type=float, default=0.35)
    p.add_argument("--text-threshold", type=float, default=0.25)
    p.add_argument("--device", default=None)
    detector_flags(p)
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("isolate", help="Isolated Diffusion: layout, detect each subject, re-synthesise each in isolation")
    model_flags(p)
    performance_flags(p)
    library_flag(p)
    safety_flag(p)
    detector_flags(p)
    p.add_argument("--prompt", required=True, help="the full scene, e.g. 'a dog and a cat in a hot spring'")
    p.add_argument("--subject", action="append", help="'label=branch prompt', e.g. 'dog=<mochi> dog'; repeat per subject")
    p.add_argument("--attachment", action="append", help="'label=prompt' for a subject, or a prompt for the whole scene")
    p.add_argument("--negative-prompt", default=None,
                   help="what to steer away from (default: Mix-of-Show's standard negative prompt; '' for none)")
    p.add_argument("--t-lay", type=float, default=None,
                   help="layout time as a fraction of the schedule (0-1; default 0.75, or 0.3 with --box: measured in docs/toyworld.md)")
    p.add_argument("--out", required=True, help="final .png")
    p.add_argument("--stages", default=None, help="folder for layout.png, detections.png, mask_*.png, final.png")
    p.add_argument("--fused", default=None, help="fused model folder (default: each subject's own ED-LoRA)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--box-threshold", type=float, default=0.35)
    p.add_argument("--text-threshold", type=float, default=0.25)
    p.add_argument("--box", action="append",
                   help="'x0,y0,x1,y1' in pixels: where the subject of the same position goes; give one per --subject, in"
                        " order (detections are matched to boxes by position, missed subjects are added in their box)")
    p.add_argument("--layout-self-attention", type=float, default=IsolateDefaults.layout_self_attention,
                   help="with --box: share of layout steps in which subjects' boxes do not attend to each other")
    p.add_argument("--layout-cross-attention", choices=LAYOUT_CROSS_ATTENTION, default=IsolateDefaults.layout_cross_attention,
                   help="with --box, in those steps: 'boxes' (a box's pixels see no other subject's word of the prompt),"
                        " 'all' (and the background sees no subject word), 'off'")
    p.add_argument("--layout-retries", type=int, default=IsolateDefaults.layout_retries,
                   help="with --box: re-sample the layout (next seed) this many times while boxes merge or are missed")
    p.add_argument("--added-bootstrap", type=float, default=IsolateDefaults.added_bootstrap,
                   help="with --box: share of branch steps a subject added in its box is bootstrapped there")
    p.set_defaults(func=cmd_isolate)

    p = sub.add_parser("fuse", help="fuse several concepts into one model (Mix-of-Show gradient fusion, solved in closed form)")
    model_flags(p)
    library_flag(p)
    p.add_argument("--concepts", required=True, help="comma-separated concept names, e.g. mochi,tama")
    p.add_argument("--method", default="auto", choices=["auto", "gradient", "weight", "custom-diffusion", "cones", "group"],
                   help="auto (default): what the concepts' kind allows first: gradient fusion for ED-LoRA and imported LoRAs"
                        " (or weight averaging), Custom Diffusion's closed-form merge, the union of Cones neurons, or a joint"
                        " group's shared weights")
    p.add_argument("--rcond", type=float, default=None,
                   help="eigenvalue cutoff of the gradient-fusion solve, relative to the largest (default 1e-3); a smaller"
                        " value fits each concept's layer inputs more closely, a larger one generalises more (see"
                        " docs/architecture.md); try 1e-4 when the report flags layers")
    p.add_argument("--out", default=None, help="folder for the fused model (default: cached in <library>/.fused/<hash>)")
    p.add_argument("--report", default=None, help="also write the fusion report (JSON) here")
    p.set_defaults(func=cmd_fuse)

    p = sub.add_parser("evaluate", help="score images: CLIP-T, CLIP-I, DINO-I (CustomConcept101), CP-CLIP, TI-CLIP (Gen4Gen), SCR@0.5")
    from .scores import DEFAULT_CLIP, DEFAULT_DETECTOR, DEFAULT_DINO

    library_flag(p)
    p.add_argument("--images", nargs="+", required=True, help="image files or folders (Menagerie PNGs carry their prompt and concepts)")
    p.add_argument("--prompt", default=None, help="the prompt the images were made from (default: each PNG's own)")
    p.add_argument("--concept", action="append",
                   help="NAME=DIR: a concept's reference photos (the library keeps no training photos; the class word comes"
                        " from --library), or NAME:CLASS=DIR for a concept not in the library; repeat per concept")
    p.add_argument("--out", required=True, help="JSON file for every score per image and the means")
    p.add_argument("--clip", default=DEFAULT_CLIP, help=f"CLIP model: Hub id, folder or 'tiny' (default {DEFAULT_CLIP})")
    p.add_argument("--dino", default=DEFAULT_DINO, help=f"DINO ViT model: Hub id, folder or 'tiny' (default {DEFAULT_DINO})")
    p.add_argument("--detector", default=DEFAULT_DETECTOR,
                   help=f"Grounding DINO for the subject crops of CP-CLIP and SCR: Hub id, folder, 'tiny', or 'none' to skip"
                        f" them (default {DEFAULT_DETECTOR})")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export-checkpoint",
                       help="write a fused model as one .safetensors checkpoint in the original SD layout (A1111, ComfyUI,"
                            " Forge, from_single_file), with one textual-inversion embedding per concept")
    p.add_argument("--base", default=DEFAULT_BASE, help=f"the base the fused model goes on (default {DEFAULT_BASE})")
    p.add_argument("--fused", required=True, help="fused model folder (from `fuse`, e.g. <library>/.fused/<hash>)")
    p.add_argument("--out", required=True, help="checkpoint file X.safetensors; X-embeddings/ and X-README.txt go beside it")
    p.add_argument("--half", action="store_true", help="write fp16 (half the size; the smallest fused updates lose a few percent)")
    p.set_defaults(func=cmd_export_checkpoint)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import Cancelled, UserError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    _quiet_libraries()
    try:
        args.func(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Cancelled as stop:
        print(f"stopped: {stop}; run the same command with --resume to continue", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory; use a smaller --batch-size, --resolution or --width/--height", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if "out of memory" not in str(error).lower():  # torch.cuda.OutOfMemoryError is a RuntimeError
            raise
        print("error: out of GPU memory; use a smaller --batch-size, --resolution or --width/--height,"
              " or --device cpu", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
