"""The concept library on disk.

    <library>/<name>/concept.safetensors   layer-wise embeddings + LoRA weights (see `edlora`)
    <library>/<name>/concept.json          name, class word, tokens, base model and fingerprint, ...
    <library>/<name>/preview.png           a sample made at the end of training

Writes are atomic at the level of a whole concept: a new version is written into a hidden staging
folder and swapped in with renames; if a crash lands between the two renames, opening the library
restores the previous version. An export is one `.safetensors` file carrying the tensors, the
record (as safetensors metadata) and the preview.

A damaged entry (a torn or garbage weights file, a missing or invalid record, a format from a newer
Menagerie) never breaks the listing: `list` leaves it out, `damaged` says what is wrong with it, and
using it raises a one-line UserError naming the concept; `delete` still removes it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .edlora import KINDS, check_concept_tensors
from .errors import UserError
from .layerwise import WORD_LABELS

WEIGHTS_FILE = "concept.safetensors"
RECORD_FILE = "concept.json"
PREVIEW_FILE = "preview.png"
NAME_RULE = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
FORMAT = "menagerie-edlora-v1"
RECORD_FIELDS = {"name": str, "class_word": str, "base_model": str, "fingerprint": str, "photo_count": int}  # required
DAMAGED_FIX = "delete it and train it again, or import it from an export"


def check_name(name: str, what: str = "concept name") -> str:
    """A concept name is 1-40 characters of a-z, 0-9, '_' and '-', starting with a letter or digit."""
    if not isinstance(name, str) or not NAME_RULE.fullmatch(name):
        raise UserError(
            f"{what} {name!r} is not valid: use 1-40 lowercase letters, digits, '_' or '-', starting with a letter or digit"
        )
    return name


def normalise_name(name: str) -> tuple[str, str]:
    """A concept name as typed, made what the library stores: stripped, lower-case, without the
    <...> that prompts put around it ("Buddy" -> "buddy"). Returns (name, a note saying so, or "");
    `check_name` still refuses what stays invalid ("my dog", "../x").
    """
    typed = name if isinstance(name, str) else ""
    cleaned = typed.strip()
    if cleaned.startswith("<") and cleaned.endswith(">"):
        cleaned = cleaned[1:-1].strip()
    cleaned = cleaned.lower()
    if not NAME_RULE.fullmatch(cleaned):
        return name, ""
    if cleaned == typed.strip():
        return cleaned, ""
    return cleaned, f"concept name {typed.strip()!r} is stored as {cleaned!r} (names are lowercase); prompts name it <{cleaned}>"


def check_class_word(word: str) -> str:
    if not isinstance(word, str) or not re.fullmatch(r"[a-z]+", word.strip().lower()):
        raise UserError(f"class word {word!r} is not valid: use one plain word such as dog or cat")
    return word.strip().lower()


@dataclass
class Concept:
    """The record of one trained concept (concept.json)."""

    name: str
    class_word: str
    base_model: str  # Hub id, path or "tiny" it was trained on
    fingerprint: str  # architecture fingerprint of that base (see base.architecture_fingerprint)
    photo_count: int
    settings: dict = field(default_factory=dict)  # the TrainConfig used, as a dict
    created: str = ""  # ISO 8601, UTC
    format: str = FORMAT
    is_test_model: bool = False  # trained on the tiny random model: previews are noise
    # "edlora" (trained here, or imported from Mix-of-Show) or "lora" (an imported LoRA file, pipelines.lora_import)
    kind: str = "edlora"
    word_count: int = 2  # words of <name>: V_rand and V_class; an imported LoRA's "trigger class" tokens
    trigger: str = ""  # an imported LoRA's trigger word(s), e.g. "ohwx"; <name> stands for "trigger class_word"
    trigger_prompt: str = ""  # an imported LoRA's prompt as trained, e.g. "photo of ohwx dog"; fusion encodes it
    source_format: str = ""  # an import's key naming: kohya, a1111-ldm, diffusers, diffusers-old, peft, mix-of-show
    # A group trained together (Gen4Gen / MuDI joint concept, or Custom Diffusion's joint training):
    # the group's name and all its members' names, this one included; "" and [] for a concept trained alone
    group: str = ""
    members: list = field(default_factory=list)

    @property
    def token(self) -> str:
        """How prompts refer to the concept."""
        return f"<{self.name}>"

    @property
    def concept_prompt(self) -> str:
        """The trigger prompt with its "trigger class" phrase written as <name> ("" for ED-LoRA)."""
        if not self.trigger_prompt:
            return ""
        return trigger_prompt_to_concept(self.trigger_prompt, self.trigger, self.class_word, self.name)

    def to_json(self) -> dict:
        record = asdict(self)
        record["token"] = self.token
        # V_rand, V_class (or an imported LoRA's phrase tokens), 16 layer tokens each
        record["words"] = [f"<{self.name}-{label}*>" for label in WORD_LABELS[: self.word_count]]
        return record

    @classmethod
    def from_json(cls, record: dict) -> "Concept":
        if not isinstance(record, dict):
            raise UserError(f"concept record is a JSON {type(record).__name__}, not an object")
        if not isinstance(record.get("format", FORMAT), str):
            raise UserError(f"concept record field 'format' is {record['format']!r}; expected text")
        if record.get("format", FORMAT) != FORMAT:
            raise newer_format_error("concept record", record["format"])
        known = {f for f in cls.__dataclass_fields__}
        missing = [f for f in RECORD_FIELDS if f not in record]
        if missing:
            raise UserError(f"concept record lacks {', '.join(missing)}")
        for key, kind in RECORD_FIELDS.items():
            if not isinstance(record[key], kind) or isinstance(record[key], bool):
                raise UserError(f"concept record field {key!r} is {record[key]!r}; expected {'an integer' if kind is int else 'text'}")
        if not isinstance(record.get("settings", {}), dict):
            raise UserError(f"concept record field 'settings' is {record['settings']!r}; expected an object")
        if record.get("kind", "edlora") not in KINDS:
            raise UserError(f"concept record field 'kind' is {record['kind']!r}; expected one of {', '.join(KINDS)}")
        members = record.get("members", [])
        if not isinstance(record.get("group", ""), str) or not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise UserError("concept record fields 'group' and 'members' must be text and a list of names")
        count = record.get("word_count", 2)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= len(WORD_LABELS):
            raise UserError(f"concept record field 'word_count' is {count!r}; expected an integer from 1 to {len(WORD_LABELS)}")
        return cls(**{k: v for k, v in record.items() if k in known})


def trigger_prompt_to_concept(prompt: str, trigger: str, class_word: str, name: str) -> str:
    """`prompt` with its first "trigger class_word" phrase (any case and spacing) replaced by <name>.

    Raises UserError when the phrase is not there: the prompt must name the subject as trained.
    """
    phrase = r"\s+".join(re.escape(word) for word in f"{trigger} {class_word}".split())
    match = re.search(rf"(?<![\w<])({phrase})(?![\w>])", prompt, re.IGNORECASE)
    if match is None:
        raise UserError(f"trigger prompt {prompt!r} does not name the subject as {trigger + ' ' + class_word!r};"
                        f" write the trigger word and then the class word, e.g. 'photo of {trigger} {class_word}'")
    return prompt[: match.start()] + f"<{name}>" + prompt[match.end():]


def newer_format_error(what: str, found) -> UserError:
    """A file written by a newer Menagerie (or not by Menagerie): not damaged, but not readable here."""
    return UserError(f"{what} has format {found!r}, which this version of Menagerie cannot read (it reads {FORMAT!r});"
                     f" update Menagerie to use it")


def damaged_error(name: str, problem: str) -> UserError:
    """The one-line error for a concept whose files are damaged: which concept, what is wrong, the fix."""
    return UserError(" ".join(f"concept {name!r} is damaged: {problem}; {DAMAGED_FIX}".split()))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ConceptLibrary:
    """A folder of concepts. Every method validates names and raises UserError on bad input."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self._recover()

    # -- reading ---------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Every concept folder, damaged ones included (`list` holds only the usable ones)."""
        return sorted(p.name for p in self.root.iterdir() if NAME_RULE.fullmatch(p.name) and self._exists(p.name))

    def _exists(self, name: str) -> bool:
        folder = self.root / name
        return folder.is_dir() and ((folder / RECORD_FILE).exists() or (folder / WEIGHTS_FILE).exists())

    def list(self) -> list[Concept]:
        """The records of the usable concepts; damaged ones are left out (see `damaged`)."""
        concepts = []
        for name in self.names():
            try:
                concepts.append(self.get(name))
            except UserError:
                continue
        return concepts

    def damaged(self) -> dict[str, str]:
        """Concept name -> the one-line error that using it raises, for every damaged concept."""
        problems = {}
        for name in self.names():
            try:
                self.get(name)
            except UserError as error:
                problems[name] = str(error)
        return problems

    def path(self, name: str) -> Path:
        return self.root / check_name(name)

    def get(self, name: str) -> Concept:
        """The record of a usable concept. Reads concept.json and the weights file's header, not its tensors.

        Raises UserError for an unknown concept, and a one-line one naming the concept for a damaged one.
        """
        folder = self.path(name)
        if not self._exists(name):
            known = ", ".join(self.names()) or "none"
            raise UserError(f"unknown concept {name!r} in library {self.root} (known: {known})")
        if not (folder / RECORD_FILE).is_file():
            raise damaged_error(name, f"its {RECORD_FILE} is missing")
        try:
            record = json.loads((folder / RECORD_FILE).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise damaged_error(name, f"its {RECORD_FILE} is unreadable ({error})") from None
        if isinstance(record, dict) and isinstance(record.get("format"), str) and record["format"] != FORMAT:
            raise newer_format_error(f"concept {name!r}: its {RECORD_FILE}", record["format"])
        try:
            concept = Concept.from_json(record)
        except UserError as error:
            raise damaged_error(name, f"its {RECORD_FILE} is not a valid record ({error})") from None
        self._check_weights_header(name)
        concept.name = name  # the folder name is the truth
        return concept

    def _check_weights_header(self, name: str) -> None:
        """The weights file exists and its safetensors header parses and covers the file (a torn file fails)."""
        path = self.path(name) / WEIGHTS_FILE
        if not path.is_file():
            raise damaged_error(name, f"it has no {WEIGHTS_FILE}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                keys, metadata = set(handle.keys()), handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as error:
            raise damaged_error(name, f"its {WEIGHTS_FILE} is not a readable .safetensors file ({error})") from None
        if metadata.get("format", FORMAT) != FORMAT:
            raise newer_format_error(f"concept {name!r}: its {WEIGHTS_FILE}", metadata["format"])
        if "embeddings" not in keys:
            raise damaged_error(name, f"its {WEIGHTS_FILE} holds no 'embeddings' tensor")

    def weights(self, name: str, base=None) -> dict[str, torch.Tensor]:
        """The concept's tensors, checked (`edlora.check_concept_tensors`); with `base`, also that they fit it.

        Every problem is a one-line UserError naming the concept.
        """
        path = self.path(name) / WEIGHTS_FILE
        if not path.is_file():
            raise damaged_error(name, f"it has no {WEIGHTS_FILE}")
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError) as error:  # a torn file, a corrupt header
            raise damaged_error(name, f"its {WEIGHTS_FILE} is not a readable .safetensors file ({error})") from None
        kind = self._kind(name)
        try:
            check_concept_tensors(tensors, kind=kind)
        except UserError as error:
            raise damaged_error(name, f"its {WEIGHTS_FILE} is wrong ({error})") from None
        if base is not None:
            try:
                check_concept_tensors(tensors, base, kind=kind)
            except UserError as error:
                raise UserError(" ".join(f"concept {name!r} does not fit the base model {base.name}: {error};"
                                         f" use the base it was trained on, or retrain it on this one".split())) from None
        return tensors

    def _kind(self, name: str) -> str:
        """The record's kind ("edlora" when it does not say, or the record cannot be read)."""
        try:
            record = json.loads((self.path(name) / RECORD_FILE).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return "edlora"
        kind = record.get("kind", "edlora") if isinstance(record, dict) else "edlora"
        return kind if kind in KINDS else "edlora"

    def size(self, name: str) -> int:
        """Bytes of a concept's weights file (what a concept costs to store; 0 when it has none)."""
        path = self.path(name) / WEIGHTS_FILE
        return path.stat().st_size if path.is_file() else 0

    def preview_path(self, name: str) -> Path | None:
        path = self.path(name) / PREVIEW_FILE
        return path if path.exists() else None

    # -- writing ---------------------------------------------------------------------------------

    def save(self, concept: Concept, tensors: dict[str, torch.Tensor], preview: Image.Image | None = None, overwrite: bool = True) -> Path:
        """Write a concept atomically; an existing one of the same name is replaced only if overwrite."""
        check_name(concept.name)
        check_concept_tensors(tensors, kind=concept.kind)
        if tensors["embeddings"].shape[0] != concept.word_count:
            raise UserError(f"concept {concept.name!r} has {tensors['embeddings'].shape[0]} words of embeddings but its record"
                            f" says {concept.word_count}")
        target = self.root / concept.name
        if target.exists() and not overwrite:
            raise UserError(f"concept {concept.name!r} already exists in {self.root}; choose another name or delete it first")
        if not concept.created:
            concept.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        staging = self.root / f".staging-{concept.name}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, staging / WEIGHTS_FILE, metadata={"format": FORMAT})
            _write_json(staging / RECORD_FILE, concept.to_json())
            if preview is not None:
                preview.save(staging / PREVIEW_FILE)
            _fsync_dir(staging)
            self._swap_in(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return target

    def _swap_in(self, staging: Path, target: Path) -> None:
        """Replace `target` by `staging` with two renames; `_recover` mends a crash between them."""
        old = self.root / f".old-{target.name}"
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
        _fsync_dir(self.root)
        if old.exists():
            shutil.rmtree(old)

    def _recover(self) -> None:
        """Undo what a crash left: restore `.old-<name>` if `<name>` is gone, drop staging and trash."""
        for entry in self.root.iterdir():
            if entry.name.startswith(".old-"):
                target = self.root / entry.name[len(".old-"):]
                if target.exists():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    os.replace(entry, target)
            elif entry.name.startswith((".staging-", ".trash-")):
                shutil.rmtree(entry, ignore_errors=True)

    def delete(self, name: str) -> None:
        """Remove a concept, a damaged one too."""
        if not self._exists(check_name(name)):
            self.get(name)  # raises: unknown concept
        trash = self.root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
        os.replace(self.path(name), trash)  # one rename: the concept is gone or still whole
        shutil.rmtree(trash, ignore_errors=True)

    def rename(self, old: str, new: str) -> Concept:
        concept = self.get(old)
        check_name(new, "new name")
        if concept.group:  # its siblings' records name it; a half-renamed group would not merge as one
            raise UserError(f"<{old}> is a member of the group {concept.group!r} ({', '.join(concept.members)}), which knows its"
                            f" members by name; train the group again with the new name")
        if (self.root / new).exists():
            raise UserError(f"cannot rename {old!r} to {new!r}: a concept named {new!r} already exists")
        staging = self.root / f".staging-{new}-{uuid.uuid4().hex[:8]}"
        shutil.copytree(self.path(old), staging)
        concept.name = new
        _write_json(staging / RECORD_FILE, concept.to_json())
        os.replace(staging, self.root / new)
        self.delete(old)
        return concept

    # -- export / import -------------------------------------------------------------------------

    def export(self, name: str, out_file: str | os.PathLike) -> Path:
        """One `.safetensors` file: the tensors, the record in metadata, the preview as a uint8 tensor."""
        concept = self.get(name)
        tensors = dict(self.weights(name))
        preview = self.preview_path(name)
        if preview is not None:
            tensors["preview"] = torch.from_numpy(np.array(Image.open(preview).convert("RGB")))
        out_file = Path(out_file).expanduser()
        if out_file.suffix != ".safetensors":
            raise UserError(f"export file {str(out_file)!r} must end in .safetensors")
        out_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_file.with_name(f".{out_file.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            save_file(tensors, tmp, metadata={"format": FORMAT, "concept": json.dumps(concept.to_json(), sort_keys=True)})
            os.replace(tmp, out_file)
        finally:
            tmp.unlink(missing_ok=True)
        return out_file

    def import_file(self, file: str | os.PathLike, name: str | None = None, base=None, overwrite: bool = False) -> Concept:
        """Import an exported concept; with `base`, refuse it unless it was trained on that base's architecture.

        `base` is a loaded `BaseModel` (its fingerprint and every tensor's shape are checked) or a
        `base.Architecture` read from a base's configs (`base.architecture_of`: the fingerprint only,
        no weights loaded).
        """
        file = Path(file).expanduser()
        if not file.is_file():
            raise UserError(f"import file {str(file)!r} does not exist")
        try:
            with safe_open(str(file), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(file)
        except (SafetensorError, OSError, ValueError) as error:  # a corrupt header, a torn file
            raise UserError(f"{file.name} is not a readable .safetensors file ({type(error).__name__}: {error})") from None
        if metadata.get("format") != FORMAT or "concept" not in metadata:
            raise UserError(f"{file.name} is not a Menagerie concept export (format {metadata.get('format')!r})")
        try:
            concept = Concept.from_json(json.loads(metadata["concept"]))
        except json.JSONDecodeError:
            raise UserError(f"{file.name}: the concept record in its metadata is not valid JSON") from None
        if base is not None and concept.fingerprint != base.fingerprint:
            raise UserError(
                f"concept {concept.name!r} was trained on another architecture ({concept.base_model}, fingerprint"
                f" {concept.fingerprint}); the current base {base.name} has fingerprint {base.fingerprint}. Import it"
                f" into a library used with that base model instead"
            )
        preview = tensors.pop("preview", None)
        check_concept_tensors(tensors, base if hasattr(base, "unet") else None, kind=concept.kind)
        concept.name = check_name(name or concept.name)
        image = Image.fromarray(preview.numpy()) if preview is not None else None
        self.save(concept, tensors, image, overwrite=overwrite)
        return concept


def check_compatible(concept: Concept, base) -> None:
    """Refuse a concept trained on another architecture than `base`'s."""
    if concept.fingerprint != base.fingerprint:
        raise UserError(
            f"concept {concept.name!r} was trained on {concept.base_model} (architecture {concept.fingerprint});"
            f" the base model {base.name} has architecture {base.fingerprint}. Use --base {concept.base_model}"
            f" or retrain the concept on this base"
        )

