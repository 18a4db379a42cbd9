"""Captioning a project's images with a model, and the one writer every captioner shares.

A `Captioner` turns images into caption texts: the WD tagger (tagger.py) into tag lists, BLIP into a
sentence for photos (headless here; inside the WebUI the WebUI's own interrogator plugs into the same
protocol). `caption_project` runs one over a dataset in batches and merges the results into the
captions already there (skip, append, prepend, overwrite) with the project's activation tags kept
first, all as one undoable edit.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

from .. import paths
from ..errors import LoraMakerError
from ..progress import Progress
from ..project import Project
from . import hub
from .captions import join_tags, read_caption, split_tags
from .curate import activation_tags, dedupe, with_activation
from .history import History
from .http import Http
from .images import ImageRejected, decode, decode_small, flatten

EXISTING_MODES = ("skip", "append", "prepend", "overwrite")


class Captioner(Protocol):
    name: str  # the model, as the history and the report name it
    provider: str  # where it actually runs (e.g. CUDAExecutionProvider, cuda:0, cpu)
    image_size: int | None  # the model's input size, so JPEGs can be decoded smaller; None: full size

    def caption(self, images: list) -> list[str]:
        """One caption text (comma-separated tags or a sentence) per PIL image, in order."""


@dataclass
class CaptionReport:
    model: str
    provider: str
    captioned: int = 0  # images the model ran on
    changed: int = 0  # caption files written
    skipped: int = 0  # images that had a caption and `existing` was skip
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (image name, reason)
    seconds: float = 0.0
    stopped: bool = False

    @property
    def images_per_second(self) -> float:
        return self.captioned / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One line for the user: counts, the speed and where the model ran."""
        unreadable = ", ".join(f"{name}: {reason}" for name, reason in self.unreadable[:5])
        if len(self.unreadable) > 5:
            unreadable += f", and {len(self.unreadable) - 5} more"
        parts = [
            f"{self.model}: captioned {self.captioned} images ({self.changed} captions changed)",
            f"skipped {self.skipped} that had captions" if self.skipped else "",
            f"{len(self.unreadable)} unreadable ({unreadable})" if self.unreadable else "",
            f"{self.seconds:.1f} s, {self.images_per_second:.1f} images/s on {self.provider}",
            "stopped early (undo restores what was written)" if self.stopped else "",
        ]
        return "; ".join(p for p in parts if p)


def merge_caption(existing: str | None, new: str, mode: str, activation: list[str]) -> str:
    """The caption text an image ends up with: `new` merged into `existing` per `mode` (tags compare
    by `tag_key`), duplicates dropped, the activation tags first."""
    old_tags, new_tags = split_tags(existing), split_tags(new)
    if mode == "overwrite" or mode == "skip":  # skip only reaches here for images without a caption
        tags = new_tags or old_tags  # finding nothing is no reason to wipe a caption
    elif mode == "append":
        tags = old_tags + new_tags
    elif mode == "prepend":
        tags = new_tags + old_tags
    else:
        raise LoraMakerError(f"unknown mode for existing captions {mode!r}: use one of {', '.join(EXISTING_MODES)}")
    return join_tags(with_activation(dedupe(tags), activation))


def _decode(path: Path, size: int | None):
    """(image, None) or (None, why it is unusable)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, f"cannot read: {e.strerror or e}"
    try:
        return (decode_small(data, size)[0] if size else decode(data)), None
    except ImageRejected as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - whatever else a decoder throws, one bad file must not end the run
        return None, f"cannot decode: {type(e).__name__}: {e}"


def _decoded_batches(images: list[Path], size: int | None, batch_size: int, pool: ThreadPoolExecutor) -> Iterator[list]:
    """Batches of (path, image, reason), decoding the next batch in threads while the model runs."""
    pending: deque = deque()
    todo = iter(images)

    def fill() -> None:
        while len(pending) < 2 * batch_size:
            path = next(todo, None)
            if path is None:
                return
            pending.append((path, pool.submit(_decode, path, size)))

    fill()
    while pending:
        batch = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
        fill()
        yield [(path, *future.result()) for path, future in batch]


def caption_project(
    project: Project,
    captioner: Captioner,
    existing: str = "skip",
    progress: Progress | None = None,
    batch_size: int = 8,
    description: str | None = None,
) -> CaptionReport:
    """Caption the dataset's images with `captioner`, merging per `existing` (skip: images with a
    caption are not even run), as one undoable edit. Unreadable images are listed, never fatal; a
    stop request ends the run cleanly after the current batch."""
    if existing not in EXISTING_MODES:
        raise LoraMakerError(f"unknown mode for existing captions {existing!r}: use one of {', '.join(EXISTING_MODES)}")
    if batch_size < 1:
        raise LoraMakerError(f"batch size must be at least 1, got {batch_size}")
    progress = progress or Progress()
    report = CaptionReport(captioner.name, captioner.provider)
    activation = activation_tags(project)

    todo: list[Path] = []
    captions: dict[Path, str | None] = {}
    for image in project.images():
        try:
            captions[image] = read_caption(image)
        except LoraMakerError as e:  # a caption that is not UTF-8: leave it (and its image) alone
            report.unreadable.append((Project.caption_path(image).name, str(e)))
            continue
        if existing == "skip" and captions[image]:
            report.skipped += 1
        else:
            todo.append(image)

    start = time.monotonic()
    verb = description or f"caption with {captioner.name}"
    with History(project).begin(verb) as edit, ThreadPoolExecutor(4) as pool, progress.task(verb, len(todo)) as task:
        for batch in _decoded_batches(todo, captioner.image_size, batch_size, pool):
            if progress.should_stop():
                report.stopped = True
                break
            for path, _, reason in batch:
                if reason:
                    report.unreadable.append((path.name, reason))
            readable = [(path, img) for path, img, _ in batch if img is not None]
            texts = captioner.caption([img for _, img in readable]) if readable else []
            if len(texts) != len(readable):
                raise LoraMakerError(f"{captioner.name} gave {len(texts)} captions for {len(readable)} images")
            for (path, _), text in zip(readable, texts):
                merged = merge_caption(captions[path], text, existing, activation)
                report.changed += edit.set(Project.caption_path(path), merged)
            report.captioned += len(readable)
            report.seconds = time.monotonic() - start
            task.advance(len(batch), f"{report.images_per_second:.1f} img/s")
    report.seconds = time.monotonic() - start
    return report


# -- BLIP (headless) ---------------------------------------------------------------------------------

DEFAULT_BLIP = "Salesforce/blip-image-captioning-large"
# What BlipProcessor + BlipForConditionalGeneration.from_pretrained read (transformers 4.30). The
# tokenizer files beyond vocab.txt are fetched when the repo has them: the fast tokenizer can be
# rebuilt from vocab.txt, and special tokens default to BERT's.
BLIP_FILES = ("config.json", "preprocessor_config.json", "vocab.txt")
BLIP_OPTIONAL_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json")
# Weights come last, so their presence marks a complete download (a cached model then needs no network).
# safetensors where transformers can read them (it does when `safetensors` is installed).
BLIP_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _blip_modules():
    try:
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor
    except ImportError as e:
        raise LoraMakerError(
            f"BLIP captions need torch and transformers ({e.name or e} is missing): "
            "pip install torch transformers, or caption from the WebUI, which uses its own interrogator"
        ) from e
    return torch, BlipProcessor, BlipForConditionalGeneration


def _weights_candidates() -> tuple[str, ...]:
    try:
        import safetensors  # noqa: F401
    except ImportError:
        return BLIP_WEIGHTS[1:]
    return BLIP_WEIGHTS


def blip_folder(name_or_dir: str | None = None, cache_dir: Path | None = None, endpoint: str | None = None,
                http: Http | None = None, progress: Progress | None = None) -> Path:
    """A folder with a BLIP captioning model: `name_or_dir` itself when it is one, else the hub repo
    (DEFAULT_BLIP when None) downloaded into the cache."""
    name = name_or_dir or DEFAULT_BLIP
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise LoraMakerError(f"{local} is no BLIP model folder (no config.json)")
        return local
    if not hub.is_repo_id(name):
        raise LoraMakerError(f"{name!r} is neither a folder nor a Hugging Face repo id (e.g. {DEFAULT_BLIP})")
    cache_dir = Path(cache_dir) if cache_dir else paths.default_model_cache()
    candidates = _weights_candidates()
    folder = hub.repo_dir(cache_dir, name)
    if any((folder / w).is_file() for w in candidates):
        return folder

    def fetch(files) -> Path:
        return hub.download_repo_files(name, files, cache_dir, endpoint=endpoint, http=http, progress=progress)

    fetch(BLIP_FILES)
    for optional in BLIP_OPTIONAL_FILES:
        try:
            fetch([optional])
        except hub.HubFileMissing:
            pass
    for weights in candidates:
        try:
            return fetch([weights])
        except hub.HubFileMissing:
            continue
    raise LoraMakerError(f"repo {name!r} has none of {', '.join(candidates)}: is it a BLIP captioning model?")


class BlipCaptioner:
    """BLIP image captioning through transformers, on CUDA when torch sees a GPU."""

    def __init__(self, folder: Path, name: str, device: str | None = None, max_length: int = 40, num_beams: int = 3):
        torch, BlipProcessor, BlipForConditionalGeneration = _blip_modules()
        self.torch = torch
        self.name = name
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        try:
            self.processor = BlipProcessor.from_pretrained(str(folder))
            self.model = BlipForConditionalGeneration.from_pretrained(str(folder), torch_dtype=self.dtype)
        except Exception as e:  # noqa: BLE001 - transformers and safetensors raise many types for a bad folder
            raise LoraMakerError(
                f"cannot load the BLIP model in {folder}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                "if it was downloaded, delete that folder to fetch it again"
            ) from e
        self.model.to(self.device).eval()
        self.provider = f"torch {self.device}"
        self.image_size = self.processor.image_processor.size.get("height") or None
        self.max_length = max_length
        self.num_beams = num_beams

    def caption(self, images: list) -> list[str]:
        rgb = [flatten(img).convert("RGB") for img in images]
        inputs = self.processor(images=rgb, return_tensors="pt").to(self.device)
        with self.torch.inference_mode():
            out = self.model.generate(
                pixel_values=inputs["pixel_values"].to(self.dtype), max_length=self.max_length, num_beams=self.num_beams
            )
        return [text.strip() for text in self.processor.batch_decode(out, skip_special_tokens=True)]


def load_blip(name_or_dir: str | None = None, cache_dir: Path | None = None, endpoint: str | None = None,
              http: Http | None = None, progress: Progress | None = None, device: str | None = None) -> BlipCaptioner:
    """A BLIP captioner from a local folder or a hub repo (default DEFAULT_BLIP, downloaded once)."""
    _blip_modules()  # say what is missing before downloading a model that cannot run
    folder = blip_folder(name_or_dir, cache_dir, endpoint, http, progress)
    return BlipCaptioner(folder, name_or_dir or DEFAULT_BLIP, device=device)
