"""The WD tagger (SmilingWolf's WD v2/v3 ONNX models) through onnxruntime: danbooru-style tags for anime
images, written into the captions by the shared captioning writer (captioner.caption_project).

The models' contract, as published with them: one NHWC float32 input `[batch, S, S, 3]` (S = 448) of
0-255 pixels in BGR order, the image padded to a square on white; one output `[batch, tags]` of
probabilities (already sigmoid), whose columns are the rows of `selected_tags.csv`
(`tag_id,name,category,count`; category 9 = rating, 0 = general, 4 = character).
"""

from __future__ import annotations

import csv
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .. import paths
from ..errors import LoraMakerError
from ..progress import Progress
from ..project import Project
from . import hub
from .captioner import EXISTING_MODES, CaptionReport, caption_project
from .captions import META_TAGS, format_tag, join_tags, tag_key
from .http import Http
from .images import flatten

WD_MODELS = (
    "SmilingWolf/wd-eva02-large-tagger-v3",
    "SmilingWolf/wd-vit-large-tagger-v3",
    "SmilingWolf/wd-vit-tagger-v3",
    "SmilingWolf/wd-swinv2-tagger-v3",
    "SmilingWolf/wd-convnext-tagger-v3",
    "SmilingWolf/wd-v1-4-moat-tagger-v2",
    "SmilingWolf/wd-v1-4-swinv2-tagger-v2",
    "SmilingWolf/wd-v1-4-convnext-tagger-v2",
    "SmilingWolf/wd-v1-4-convnextv2-tagger-v2",
    "SmilingWolf/wd-v1-4-vit-tagger-v2",
)
# v3 knows newer characters and tags; swinv2 is close to the large models' accuracy at a third of
# eva02-large's size (~470 MB) and runs at a usable speed on a CPU.
DEFAULT_MODEL = "SmilingWolf/wd-swinv2-tagger-v3"
MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
RATING, GENERAL, CHARACTER = 9, 0, 4
DEFAULT_SIZE = 448  # for a model whose input size is symbolic

@dataclass
class TagOptions:
    threshold: float = 0.35  # general tags above this confidence are written
    character_threshold: float = 0.85  # character tags: higher, a wrong name poisons a LoRA
    include_ratings: bool = False  # also write the most likely rating (general, sensitive, ...), last
    underscores_to_spaces: bool = True  # emoticons like ^_^ keep theirs
    escape_parentheses: bool = True  # `name \(series\)`, so the caption is also a valid prompt
    blacklist: list[str] = field(default_factory=lambda: sorted(META_TAGS))
    existing: str = "skip"  # captions already there: skip, append, prepend or overwrite
    batch_size: int = 8

    def check(self) -> None:
        for label, value in (("threshold", self.threshold), ("character threshold", self.character_threshold)):
            if not 0.0 <= value <= 1.0:
                raise LoraMakerError(f"the {label} is a confidence between 0 and 1, got {value}")
        if self.existing not in EXISTING_MODES:
            raise LoraMakerError(f"unknown mode for existing captions {self.existing!r}: use one of {', '.join(EXISTING_MODES)}")
        if self.batch_size < 1:
            raise LoraMakerError(f"batch size must be at least 1, got {self.batch_size}")


@dataclass
class Prediction:
    """One image's probabilities by tag name (names as in selected_tags.csv)."""

    ratings: dict[str, float]
    general: dict[str, float]
    character: dict[str, float]


def select_tags(prediction: Prediction, options: TagOptions) -> list[str]:
    """The caption tags for a prediction: characters, then general tags, each by falling confidence,
    spelled by `format_tag`, without blacklisted ones; the top rating last when asked for."""
    banned = {tag_key(t) for t in options.blacklist}

    def above(probs: dict[str, float], threshold: float) -> list[str]:
        hits = sorted(((p, n) for n, p in probs.items() if p > threshold), key=lambda pn: -pn[0])
        return [n for _, n in hits if tag_key(n) not in banned]

    names = above(prediction.character, options.character_threshold) + above(prediction.general, options.threshold)
    if options.include_ratings and prediction.ratings:
        names.append(max(prediction.ratings, key=prediction.ratings.get))
    return [format_tag(n, options.underscores_to_spaces, options.escape_parentheses) for n in names]


def prepare(image: Image.Image, size: int):
    """The model's input for one image: transparency on white, padded to a centred square on white,
    resized to `size` (bicubic, as the models were trained), float32 0-255 in BGR order."""
    import numpy as np

    img = flatten(image)
    if img.mode != "RGB":
        img = img.convert("RGB")
    side = max(img.size)
    if img.width != img.height:
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        img = square
    if side != size:
        img = img.resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32)[:, :, ::-1]


def read_labels(path: Path) -> list[tuple[str, int]]:
    """(name, category) per output column, from a selected_tags.csv."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return [(row["name"], int(row["category"])) for row in rows]
    except (KeyError, ValueError, TypeError, UnicodeDecodeError, csv.Error) as e:
        raise LoraMakerError(
            f"{path} is not a tagger's tag list (it needs name and category columns): replace it, or delete it if it was downloaded"
        ) from e


class Tagger:
    """A loaded WD tagger: `predict` gives probabilities, `captioner(options)` caption texts."""

    def __init__(self, session, labels: list[tuple[str, int]], name: str, model_path: Path):
        self.session = session
        self.name = name
        self.model_path = model_path
        self.provider = session.get_providers()[0]  # what onnxruntime really runs on, after any fallback
        model_input, output = session.get_inputs()[0], session.get_outputs()[0]
        shape = model_input.shape
        if len(shape) != 4 or shape[3] != 3 or len(output.shape) != 2:
            raise LoraMakerError(f"{model_path} is not a WD tagger: input {shape}, output {output.shape}")
        self.input_name = model_input.name
        self.image_size = shape[1] if isinstance(shape[1], int) and shape[1] > 0 else DEFAULT_SIZE
        # Some exports fix the batch at 1: feed those one image (group) at a time.
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        if isinstance(output.shape[1], int) and output.shape[1] != len(labels):
            raise LoraMakerError(
                f"{model_path} has {output.shape[1]} outputs but {TAGS_FILE} lists {len(labels)} tags: "
                f"the two files are from different models; delete {model_path.parent} to download them again"
            )
        self.labels = labels
        self._columns = {
            category: ([i for i, (_, c) in enumerate(labels) if c == category], [n for n, c in labels if c == category])
            for category in (RATING, GENERAL, CHARACTER)
        }

    def _run(self, batch):
        try:
            return self.session.run(None, {self.input_name: batch})[0]
        except Exception as e:  # onnxruntime's own exception types; out of memory, mostly
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LoraMakerError(f"the tagger failed on {len(batch)} images on {self.provider}: {first}; try a smaller batch size") from e

    def predict(self, images: list[Image.Image], batch_size: int = 8) -> list[Prediction]:
        """Probabilities for each image, `batch_size` images per inference run."""
        import numpy as np

        step = self.fixed_batch or max(1, batch_size)
        out: list[Prediction] = []
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # resizing releases the GIL
            for at in range(0, len(images), step):
                chunk = list(pool.map(lambda img: prepare(img, self.image_size), images[at : at + step]))
                batch = np.stack(chunk)
                if self.fixed_batch and len(chunk) < self.fixed_batch:
                    padding = np.zeros((self.fixed_batch - len(chunk), *batch.shape[1:]), dtype=batch.dtype)
                    batch = np.concatenate([batch, padding])
                probs = self._run(batch)[: len(chunk)]
                if probs.shape[1] != len(self.labels):
                    raise LoraMakerError(f"{self.model_path} gave {probs.shape[1]} outputs for {len(self.labels)} tags")
                out += [self._prediction(row) for row in probs]
        return out

    def _prediction(self, row) -> Prediction:
        def named(category: int) -> dict[str, float]:
            index, names = self._columns[category]
            return dict(zip(names, row[index].tolist()))

        return Prediction(named(RATING), named(GENERAL), named(CHARACTER))

    def captioner(self, options: TagOptions) -> "TagCaptioner":
        return TagCaptioner(self, options)


class TagCaptioner:
    """A tagger seen as a `captioner.Captioner`: each image's tag list as caption text."""

    def __init__(self, tagger: Tagger, options: TagOptions):
        self.tagger = tagger
        self.options = options
        self.name = tagger.name
        self.provider = tagger.provider
        self.image_size = tagger.image_size

    def caption(self, images: list[Image.Image]) -> list[str]:
        predictions = self.tagger.predict(images, self.options.batch_size)
        return [join_tags(select_tags(p, self.options)) for p in predictions]


TagReport = CaptionReport


def tag_project(project: Project, tagger: Tagger, options: TagOptions | None = None, progress: Progress | None = None) -> TagReport:
    """Tag the dataset's images into their captions as one undoable edit ("tag with <model>")."""
    options = options or TagOptions()
    options.check()
    return caption_project(
        project, tagger.captioner(options), options.existing, progress, options.batch_size, f"tag with {tagger.name}"
    )


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise LoraMakerError(
            "the WD tagger needs onnxruntime: pip install \"onnxruntime>=1.17,<1.27\" "
            "(or onnxruntime-gpu for CUDA) in the WebUI's Python environment"
        ) from e
    return onnxruntime


def _resolve(name_or_dir: str) -> str:
    """A registry model may be named without its owner (`wd-swinv2-tagger-v3`)."""
    for repo in WD_MODELS:
        if name_or_dir == repo.split("/", 1)[1]:
            return repo
    return name_or_dir


def tagger_folder(name_or_dir: str | None = None, cache_dir: Path | None = None, endpoint: str | None = None,
                  http: Http | None = None, progress: Progress | None = None) -> tuple[Path, str, bool]:
    """(folder with model.onnx + selected_tags.csv, model name, whether it was downloaded)."""
    name = name_or_dir or DEFAULT_MODEL
    local = Path(name).expanduser()
    if local.is_dir():
        missing = [f for f in (MODEL_FILE, TAGS_FILE) if not (local / f).is_file()]
        if missing:
            raise LoraMakerError(f"tagger folder {local} lacks {' and '.join(missing)} (it needs {MODEL_FILE} and {TAGS_FILE})")
        return local, local.name, False
    repo = _resolve(name)
    if not hub.is_repo_id(repo):
        raise LoraMakerError(f"{name!r} is neither a folder nor a Hugging Face repo id; known taggers: {', '.join(WD_MODELS)}")
    cache_dir = Path(cache_dir) if cache_dir else paths.default_model_cache()
    # The small tag list first: a wrong repo name fails before a large download starts.
    folder = hub.download_repo_files(repo, [TAGS_FILE, MODEL_FILE], cache_dir, endpoint=endpoint, http=http, progress=progress)
    return folder, repo, True


def _session(ort, model_path: Path, providers: list[str] | None, downloaded: bool):
    available = ort.get_available_providers()
    wanted = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    attempts = [wanted] + ([["CPUExecutionProvider"]] if wanted != ["CPUExecutionProvider"] else [])
    for attempt in attempts:
        try:
            return ort.InferenceSession(str(model_path), providers=attempt)
        except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
            error = e
    fix = "delete it to download it again" if downloaded else "replace it with a complete copy"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise LoraMakerError(f"cannot load the tagger model {model_path} ({first[:200]}): the file is corrupt or incomplete; {fix}")


def load_tagger(name_or_dir: str | None = None, cache_dir: Path | None = None, providers: list[str] | None = None,
                http: Http | None = None, progress: Progress | None = None, endpoint: str | None = None) -> Tagger:
    """A WD tagger from a local folder (model.onnx + selected_tags.csv) or a hub repo id (downloaded
    once into `cache_dir`, default paths.default_model_cache()), on CUDA when onnxruntime offers it."""
    ort = _onnxruntime()  # before any download: say what is missing first
    folder, name, downloaded = tagger_folder(name_or_dir, cache_dir, endpoint, http, progress)
    labels = read_labels(folder / TAGS_FILE)
    return Tagger(_session(ort, folder / MODEL_FILE, providers, downloaded), labels, name, folder / MODEL_FILE)
