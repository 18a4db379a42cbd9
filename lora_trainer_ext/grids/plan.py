"""What an epoch x weight grid renders: the saved epochs, the weights, the prompts, the fixed seeds.

Rows are epochs and columns are weights (weights are few, epochs many). Weight 0 is the no-LoRA
baseline: its prompt carries no `<lora:...>` tag. An optional third axis of prompts or seeds gives
one grid image per layer, like the X/Y/Z plot's Z.

    plan = make_plan(lora_dir, "mychar", prompts=[("main", main), ("flexibility", flex)])
    for cell in plan.cells(): ...          # layer, then epoch row, then weight column
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

from ..dataset.captions import META_TAGS, split_tags, tag_key
from ..dataset.curate import activation_tags, load_captions, tag_frequency
from ..dataset.history import History
from ..errors import LoraMakerError
from ..project import Project

DEFAULT_WEIGHTS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MAX_WEIGHT = 2.0
EPOCH_MODES = ("all", "every", "chosen")


@dataclass(frozen=True)
class Epoch:
    number: int  # the epoch number (the final file NAME.safetensors counts as the last epoch)
    lora: str  # the file's stem, as a prompt names it: "mychar-000004" or "mychar"
    path: Path


def format_weight(weight: float) -> str:
    """0.8 -> "0.8", 1.0 -> "1", 0.75 -> "0.75": what a user would type in `<lora:name:w>`."""
    return f"{weight:.3f}".rstrip("0").rstrip(".")


def weight_label(weight: float) -> str:
    return "no LoRA" if weight == 0 else format_weight(weight)


def epoch_label(epoch: Epoch) -> str:
    return f"epoch {epoch.number}"


@dataclass(frozen=True)
class Cell:
    row: int
    col: int
    layer: int
    epoch: Epoch
    weight: float  # 0.0 = the baseline: no LoRA
    prompt: str  # the prompt WITHOUT any <lora:...> tag
    negative: str
    seed: int

    def lora_tag(self) -> str:
        return f"<lora:{self.epoch.lora}:{format_weight(self.weight)}>" if self.weight else ""

    def full_prompt(self) -> str:
        """What txt2img gets and what the infotext shows."""
        return ", ".join(p for p in (self.prompt, self.lora_tag()) if p)

    def key(self) -> tuple:
        """Cells with equal keys render the same image: the baseline column is the same in every row."""
        return (self.epoch.lora if self.weight else "", self.weight, self.prompt, self.negative, self.seed)


@dataclass
class RenderSettings:
    """The defaults are the WebUI's txt2img defaults; the seed is fixed so that cells compare."""

    sampler: str = "DPM++ 2M"
    scheduler: str = "Automatic"
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    seed: int = 1234
    negative: str = ""  # the negative prompt a plan starts from (the plan's own `negative` is what renders)

    def check(self) -> None:
        if not self.sampler.strip():
            raise LoraMakerError("pick a sampler for the grid")
        if not 1 <= self.steps <= 150:
            raise LoraMakerError(f"sampling steps must be between 1 and 150, got {self.steps}")
        if not 1.0 <= self.cfg_scale <= 30.0:
            raise LoraMakerError(f"CFG scale must be between 1 and 30, got {self.cfg_scale}")
        for label, value in (("width", self.width), ("height", self.height)):
            if not 64 <= value <= 2048 or value % 8:
                raise LoraMakerError(f"the grid's image {label} must be a multiple of 8 between 64 and 2048, got {value}")
        check_seed(self.seed)

    @classmethod
    def from_dict(cls, data: dict) -> "RenderSettings":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


def check_seed(seed: int) -> None:
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise LoraMakerError(f"grid seeds are fixed so that cells compare: use a whole number from 0 to 4294967295, got {seed}")


@dataclass
class GridPlan:
    epochs: list[Epoch]
    weights: list[float]
    layers: list[tuple[str, str, int]]  # (label, prompt, seed) per layer: one grid image each
    negative: str = ""
    settings: RenderSettings = field(default_factory=RenderSettings)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(layers, rows, columns)."""
        return len(self.layers), len(self.epochs), len(self.weights)

    def cells(self) -> list[Cell]:
        """Layer-major, then row (epoch), then column (weight). The baseline column is yielded in every
        row; `Cell.key()` lets a renderer render it once per layer."""
        return [
            Cell(row, col, layer, epoch, weight, prompt, self.negative, seed)
            for layer, (_, prompt, seed) in enumerate(self.layers)
            for row, epoch in enumerate(self.epochs)
            for col, weight in enumerate(self.weights)
        ]

    def render_count(self) -> int:
        """How many images the grid really renders (equal keys are rendered once)."""
        return len({cell.key() for cell in self.cells()})

    def row_labels(self) -> list[str]:
        return [epoch_label(e) for e in self.epochs]

    def col_labels(self) -> list[str]:
        return [weight_label(w) for w in self.weights]

    def check(self) -> None:
        if not self.epochs:
            raise LoraMakerError("no saved epochs to compare: train first")
        check_weights(self.weights)
        if not self.layers:
            raise LoraMakerError("the grid needs at least one prompt")
        for label, prompt, seed in self.layers:
            if not prompt.strip():
                raise LoraMakerError(f"the prompt {label!r} is empty: type a prompt (tags of what the LoRA should draw)")
            check_seed(seed)
        self.settings.check()

    def to_dict(self) -> dict:
        return {
            "epochs": [{"number": e.number, "lora": e.lora, "path": str(e.path)} for e in self.epochs],
            "weights": list(self.weights),
            "layers": [list(layer) for layer in self.layers],
            "negative": self.negative,
            "settings": asdict(self.settings),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "GridPlan":
        try:
            return cls(
                [Epoch(int(e["number"]), str(e["lora"]), Path(e["path"])) for e in data["epochs"]],
                [float(w) for w in data["weights"]],
                [(str(label), str(prompt), int(seed)) for label, prompt, seed in data["layers"]],
                str(data.get("negative", "")),
                RenderSettings.from_dict(data.get("settings", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise LoraMakerError(f"not a grid plan ({type(e).__name__}: {e}): render the grid again") from e


def check_weights(weights: Sequence[float]) -> None:
    if not weights:
        raise LoraMakerError("the grid needs at least one weight (0 is the no-LoRA baseline)")
    for w in weights:
        if not (isinstance(w, (int, float)) and math.isfinite(w) and 0.0 <= w <= MAX_WEIGHT):
            raise LoraMakerError(f"LoRA weights must be between 0 and {format_weight(MAX_WEIGHT)}, got {w}")


def _numbers(text: str, what: str, example: str) -> list[str]:
    items = [t for t in re.split(r"[,\s]+", text or "") if t]
    if not items:
        raise LoraMakerError(f"type the {what}, e.g. {example}")
    return items


def parse_weights(text: str) -> list[float]:
    """"0, 0.5, 1" -> [0.0, 0.5, 1.0]: sorted, duplicates dropped, each checked."""
    try:
        weights = sorted({float(t) for t in _numbers(text, "weights", "0, 0.5, 0.8, 1")})
    except ValueError:
        raise LoraMakerError(f"weights are numbers like 0, 0.5, 0.8, 1; got {text!r}") from None
    check_weights(weights)
    return weights


def parse_ints(text: str, what: str) -> list[int]:
    """Epoch numbers or seeds: "2, 4 10" -> [2, 4, 10] (order kept, duplicates dropped)."""
    try:
        values = [int(t) for t in _numbers(text, what, "2, 4, 6")]
    except ValueError:
        raise LoraMakerError(f"{what} are whole numbers like 2, 4, 6; got {text!r}") from None
    return list(dict.fromkeys(values))


# -- the saved epochs ---------------------------------------------------------------------------------

def lora_metadata(path: Path) -> dict[str, str]:
    """A .safetensors file's header metadata, read without loading any tensor ({} if unreadable)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 * 2**20:
                return {}
            header = json.loads(f.read(size))
        meta = header.get("__metadata__") or {}
        return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
    except (OSError, struct.error, ValueError, AttributeError):
        return {}


def saved_epochs(lora_dir: Path, name: str) -> list[Epoch]:
    """The training run's LoRA files in `lora_dir`, by epoch: NAME-000001.. then NAME (the final file,
    whose epoch number is the one its metadata records, else the one after the last numbered file).

    Only files of the newest run count: a file whose metadata names another output (`ss_output_name`,
    e.g. a project called NAME-2) or another training session (`ss_session_id`; stale epochs of an
    earlier, longer run) is left out. Files without that metadata are kept. `NAME-step*` files saved by
    "stop and save" are not epochs."""
    lora_dir = Path(lora_dir)
    if not lora_dir.is_dir():
        return []
    numbered = re.compile(rf"^{re.escape(name)}-(\d{{6}})$")
    found: list[tuple[Path, int | None, dict[str, str], int]] = []  # (file, number in its name, metadata, mtime)
    for path in lora_dir.glob("*.safetensors"):
        match = numbered.match(path.stem)
        if path.stem != name and not match:
            continue
        meta = lora_metadata(path)
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            continue  # deleted meanwhile (a running training keeps only its last n epochs)
        if meta.get("ss_output_name", name) == name:
            found.append((path, int(match.group(1)) if match else None, meta, mtime))
    if not found:
        return []
    session = max(found, key=lambda f: (f[3], f[1] is None))[2].get("ss_session_id")
    found = [f for f in found if session is None or f[2].get("ss_session_id", session) == session]
    epochs = {number: Epoch(number, path.stem, path) for path, number, _, _ in found if number is not None}
    for path, number, meta, _ in found:
        if number is None:
            last = int(meta["ss_epoch"]) if meta.get("ss_epoch", "").isdigit() else max(epochs, default=0) + 1
            epochs[last] = Epoch(last, path.stem, path)  # the final file wins over a same-epoch copy
    return [epochs[n] for n in sorted(epochs)]


def select_epochs(epochs: Sequence[Epoch], mode: str = "all", k: int = 2, chosen: Sequence[int] = ()) -> list[Epoch]:
    """all; every k-th saved file (the guide's "every 2nd or 5th"), always keeping the last; or the
    `chosen` epoch numbers."""
    epochs = list(epochs)
    if mode == "all":
        return epochs
    if mode == "every":
        if not float(k).is_integer() or k < 1:
            raise LoraMakerError(f"'every k-th epoch' needs a whole k of 1 or more, got {k}")
        picked = epochs[int(k) - 1 :: int(k)]
        if epochs and (not picked or picked[-1] != epochs[-1]):
            picked.append(epochs[-1])
        return picked
    if mode == "chosen":
        by_number = {e.number: e for e in epochs}
        missing = [n for n in chosen if n not in by_number]
        if missing:
            saved = ", ".join(str(n) for n in by_number) or "none"
            raise LoraMakerError(f"epoch {', '.join(map(str, missing))} was not saved (saved epochs: {saved})")
        if not chosen:
            raise LoraMakerError("choose at least one epoch")
        return [by_number[n] for n in sorted(set(chosen))]
    raise LoraMakerError(f"unknown epoch selection {mode!r}: use one of {', '.join(EPOCH_MODES)}")


def prompt_layers(prompts: Sequence[tuple[str, str]], seeds: Sequence[int]) -> list[tuple[str, str, int]]:
    """The third axis: every (label, prompt) with every seed, prompt-major; seeds show in the label
    only when there are several."""
    if not seeds:
        raise LoraMakerError("the grid needs at least one seed")
    return [
        (f"{label}, seed {seed}" if len(seeds) > 1 else label, prompt, seed)
        for label, prompt in prompts
        for seed in seeds
    ]


def make_plan(lora_dir: Path, name: str, prompts: Sequence[tuple[str, str]], *, mode: str = "all", k: int = 2,
              chosen: Sequence[int] = (), weights: Sequence[float] = DEFAULT_WEIGHTS, seeds: Sequence[int] = (),
              negative: str | None = None, settings: RenderSettings | None = None) -> GridPlan:
    """A checked plan for the LoRA `name` saved in `lora_dir` (seeds and the negative prompt default
    to the settings')."""
    settings = settings or RenderSettings()
    negative = settings.negative if negative is None else negative
    epochs = saved_epochs(lora_dir, name)
    if not epochs:
        raise LoraMakerError(f"no LoRA named {name} in {lora_dir}: train first")
    plan = GridPlan(
        select_epochs(epochs, mode, k, chosen),
        sorted(set(weights)),
        prompt_layers(prompts, list(seeds) or [settings.seed]),
        negative,
        settings,
    )
    plan.check()
    return plan


# -- default prompts ----------------------------------------------------------------------------------

MAIN_TAGS = 8  # the dataset's most frequent tags in the main prompt...
MAIN_MIN_SHARE = 0.25  # ...among those on at least a quarter of the images
SUBJECT_TAGS = ("1girl", "1boy", "1other", "2girls", "2boys", "multiple girls", "multiple boys", "no humans")
# What the flexibility prompt asks for: the first tag of each group that the dataset lacks, so the
# prompt shows whether the LoRA can leave its training pictures (a place, an outfit, an action).
FLEXIBILITY_TAGS = (
    ("beach", "snow", "city", "forest", "night sky", "classroom", "library"),
    ("school uniform", "kimono", "maid", "armor", "hoodie", "business suit", "witch hat"),
    ("running", "reading", "holding umbrella", "cooking", "waving", "sleeping", "jumping"),
)
CORE_TAGS = 8
CORE_MIN_SHARE = 0.5
# Character-describing tags: a trait noun at the end, e.g. "long hair", "blue eyes", "animal ears",
# "hair between eyes", "large breasts", "ahoge" -- what the guide prunes into the activation tag.
_TRAIT = re.compile(
    r"^(?:[\w'-]+ ){0,3}(?:hair|eyes?|pupils|sclera|skin|ears|tail|horns?|wings|eyebrows|eyelashes|breasts|chest"
    r"|bangs|sidelocks|ahoge|twintails|ponytail|braids?|buns?|drills|halo|freckles|fangs?|heterochromia"
    r"|mole(?: under \w+)?)$"
)
# ...but not what a tag does with them (an expression, a pose, a hand).
_NOT_TRAIT = re.compile(r"^(?:closed|open|half-closed|covering|covered|looking|hand|hands|holding|grabbing|touching"
                        r"|adjusting|playing|between|wet|bare|bandage)\b")


def is_trait(tag: str) -> bool:
    key = tag_key(tag)
    return bool(_TRAIT.match(key)) and not _NOT_TRAIT.match(key)


def _pruned_traits(project: Project, now: set[str], floor: float) -> list[str]:
    """Trait tags that at least `floor` captions carried before some recorded edit and that no caption
    carries now, by how many captions once carried them."""
    carriers: dict[str, set[str]] = {}
    spelling: dict[str, str] = {}
    for edit in History(project).edits():
        for change in edit.changes:
            if not (change.file.startswith("dataset/") and change.file.endswith(".txt")):
                continue
            for tag in split_tags(change.before):
                key = tag_key(tag)
                if key not in now and is_trait(tag):
                    carriers.setdefault(key, set()).add(change.file)
                    spelling.setdefault(key, tag)
    kept = [k for k, files in carriers.items() if len(files) >= floor]
    return [spelling[k] for k in sorted(kept, key=lambda k: (-len(carriers[k]), k))]


def core_tags(project: Project) -> list[str]:
    """The tags likeness is measured on, the first rule that gives any:
    1. the `core_tags` list in settings.json's "dataset" section, when curation recorded them;
    2. trait tags pruned from the captions (in none now, but before a recorded edit in at least
       CORE_MIN_SHARE of as many captions as there are now): the guide prunes hair, eye and body tags
       so that the activation tag absorbs them;
    3. trait tags on at least CORE_MIN_SHARE of the captioned images (traits that were not pruned).
    At most CORE_TAGS, most frequent first."""
    recorded = project.settings().get("dataset", {}).get("core_tags")
    if recorded:
        return [str(t) for t in recorded][:CORE_TAGS]
    captions = {image: tags for image, tags in load_captions(project).items() if tags}
    frequency = tag_frequency(captions)
    floor = CORE_MIN_SHARE * len(captions)
    pruned = _pruned_traits(project, {tag_key(t) for t, _ in frequency}, floor)
    if pruned:
        return pruned[:CORE_TAGS]
    return [t for t, n in frequency if n >= floor and is_trait(t)][:CORE_TAGS]


def default_prompts(project: Project) -> tuple[str, str, list[str], list[str]]:
    """(main prompt, flexibility prompt, tags the flexibility prompt requests, core tags).

    main = activation tags + the dataset's most frequent tags (up to MAIN_TAGS, on at least
    MAIN_MIN_SHARE of the images, no booru meta tags); flexibility = activation tags + the dataset's
    subject tag (1girl, ...) + the first tag of each FLEXIBILITY_TAGS group that no caption carries.
    Either prompt may be empty when the dataset has no captions and no activation tag."""
    activation = activation_tags(project)
    taken = {tag_key(t) for t in activation} | {tag_key(t) for t in META_TAGS}
    captions = load_captions(project)
    frequency = [(t, n) for t, n in tag_frequency(captions) if tag_key(t) not in taken]
    floor = MAIN_MIN_SHARE * sum(1 for tags in captions.values() if tags)
    main = activation + [t for t, n in frequency if n >= floor][:MAIN_TAGS]
    in_dataset = {tag_key(t) for t, _ in frequency}
    subject = next((t for t, _ in frequency if tag_key(t) in SUBJECT_TAGS), None)
    requested = [next(t for t in group if tag_key(t) not in in_dataset) for group in FLEXIBILITY_TAGS
                 if any(tag_key(t) not in in_dataset for t in group)]
    flexibility = activation + ([subject] if subject else []) + requested
    return ", ".join(main), ", ".join(flexibility), requested, core_tags(project)
