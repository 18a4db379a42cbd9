"""Scores for each grid cell: likeness, flexibility, overcooking. Pure maths on images and on tagger
predictions; running the tagger is the caller's business (`tagger.Tagger.predict`).

Likeness = recall of the project's core tags (those pruned into the activation tag) on the cell's
image: of the core tags the tagger knows, the share it predicts above its threshold (general tags at
the general threshold, character tags at the character threshold). 0..1; None without predictions
or without known core tags.

Flexibility = the same recall for the tags the layer's prompt requested (the flexibility prompt asks
for a place, an outfit and an action absent from the dataset).

Overcooking, 0..1, against the no-LoRA image of the same prompt and seed (the baseline; without a
weight-0 column, the lowest weight of the same epoch):
  * clipping: the share of pixels with a channel at an end of its range (<= 3 or >= 252 of 255),
    an HSV saturation above 0.9 and a value of at least 0.25 -- the burnt, posterised colour of a
    deep-fried image (darker pixels are left out: their saturation is noise). Only the
    excess over the baseline's share counts; 2% is tolerated and 25% scores 1, linearly between.
  * artefacts: the share of the luminance's spectral energy (Hann-windowed FFT, mean removed) above
    half the Nyquist frequency, divided by the baseline's. Noise, over-sharpened edges and blocky
    artefacts raise it; a different drawing of the same prompt moves it by up to about 2x either
    way, so up to 2x scores 0, and each doubling beyond adds 0.5 (4x: 0.5, 8x: 1).
  * overcooked = the larger of the two: either symptom alone spoils an image.
  * broken images (non-finite pixels, an all-black or flat image: what NaNs decode to) score 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from ..dataset.captions import tag_key
from ..errors import LoraMakerError
from .plan import Cell

CLIP_LOW, CLIP_HIGH = 3 / 255, 252 / 255
CLIP_SATURATION = 0.9
CLIP_VALUE = 0.25  # darker pixels are not vivid, however unstable their hue and saturation
CLIP_TOLERATED, CLIP_FULL = 0.02, 0.25
HF_RADIUS = 0.5  # of the Nyquist frequency
HF_TOLERATED, HF_FULL = 2.0, 8.0
BLACK_LEVEL, BLACK_SHARE = 4 / 255, 0.995
FLAT_STD = 1 / 255
DEFAULT_THRESHOLD, DEFAULT_CHARACTER_THRESHOLD = 0.35, 0.85  # tagger.TagOptions' defaults


def pixels(image) -> np.ndarray:
    """H x W x 3 float64 in 0..1 from a PIL image, or from an array (uint8 0..255, or float 0..1
    that may hold NaN as a decoded latent can)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    array = np.asarray(image)
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    array = array.astype(np.float64) / scale
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return array[:, :, :3]


def broken_reason(px: np.ndarray) -> str:
    """"NaN", "black", "blank" (a flat image), or "" for an image that is a picture."""
    if not np.isfinite(px).all():
        return "NaN"
    if (px.max(axis=2) <= BLACK_LEVEL).mean() >= BLACK_SHARE:
        return "black"
    if _luminance(px).std() < FLAT_STD:
        return "blank"
    return ""


def _luminance(px: np.ndarray) -> np.ndarray:
    return px[:, :, 0] * 0.299 + px[:, :, 1] * 0.587 + px[:, :, 2] * 0.114


def clipped_share(px: np.ndarray) -> float:
    """The share of vivid pixels (HSV value >= CLIP_VALUE, saturation > CLIP_SATURATION) with a
    channel at an end of its range."""
    high, low = px.max(axis=2), px.min(axis=2)
    saturation = (high - low) / np.maximum(high, 1e-12)
    at_edge = (low <= CLIP_LOW) | (high >= CLIP_HIGH)
    return float((at_edge & (saturation > CLIP_SATURATION) & (high >= CLIP_VALUE)).mean())


def high_frequency(px: np.ndarray) -> float:
    """The share of the luminance's spectral energy above HF_RADIUS of the Nyquist frequency."""
    y = _luminance(px)
    y = (y - y.mean()) * np.outer(np.hanning(y.shape[0]), np.hanning(y.shape[1]))
    power = np.abs(np.fft.rfft2(y)) ** 2
    fy = np.fft.fftfreq(y.shape[0])[:, None] / 0.5
    fx = np.fft.rfftfreq(y.shape[1])[None, :] / 0.5
    radius = np.sqrt(fy**2 + fx**2)
    total = power[radius > 0].sum()
    return float(power[radius > HF_RADIUS].sum() / total) if total > 0 else 0.0


def clipping_score(share: float, baseline_share: float) -> float:
    excess = share - baseline_share
    return float(min(1.0, max(0.0, (excess - CLIP_TOLERATED) / (CLIP_FULL - CLIP_TOLERATED))))


def artefact_score(ratio: float) -> float:
    if not ratio > HF_TOLERATED:
        return 0.0
    return float(min(1.0, math.log2(ratio / HF_TOLERATED) / math.log2(HF_FULL / HF_TOLERATED)))


@dataclass(frozen=True)
class ImageStats:
    problem: str  # "" or why the image is broken
    clipped: float
    high_frequency: float

    @classmethod
    def of(cls, image) -> "ImageStats":
        px = pixels(image)
        problem = broken_reason(px)
        if problem == "NaN":
            return cls(problem, 0.0, 0.0)
        return cls(problem, clipped_share(px), high_frequency(px))


@dataclass(frozen=True)
class Overcooking:
    score: float  # 0..1
    clipping: float  # the excess share of clipped pixels over the baseline's
    artefacts: float  # high-frequency energy / the baseline's
    problem: str  # "" or why the image is broken


def overcooking(image: ImageStats, baseline: ImageStats | None) -> Overcooking:
    """`image` against `baseline` (None or broken: clipping alone, against none)."""
    if image.problem:
        return Overcooking(1.0, 0.0, 0.0, image.problem)
    if baseline is None or baseline.problem:
        base_clipped, ratio = 0.0, 1.0  # no reference for the spectrum: only clipping can tell
    else:
        base_clipped, ratio = baseline.clipped, image.high_frequency / max(baseline.high_frequency, 1e-9)
    clip = clipping_score(image.clipped, base_clipped)
    return Overcooking(max(clip, artefact_score(ratio)), max(0.0, image.clipped - base_clipped), ratio, "")


@dataclass(frozen=True)
class Recall:
    value: float | None  # None: no tag to look for that the tagger knows
    found: tuple[str, ...]
    missing: tuple[str, ...]
    unknown: tuple[str, ...]  # not in the tagger's vocabulary: left out of the recall


def recall(tags: Sequence[str], prediction, threshold: float = DEFAULT_THRESHOLD,
           character_threshold: float = DEFAULT_CHARACTER_THRESHOLD) -> Recall:
    """The share of `tags` a `tagger.Prediction` sees above its thresholds. Tag spellings match by
    `captions.tag_key` (underscores, case and escaped parentheses don't matter)."""
    seen: dict[str, bool] = {}
    for probs, limit in ((prediction.general, threshold), (prediction.character, character_threshold)):
        for name, p in probs.items():
            seen[tag_key(name)] = seen.get(tag_key(name), False) or p > limit
    found, missing, unknown = [], [], []
    for tag in dict.fromkeys(tags):
        key = tag_key(tag)
        (unknown if key not in seen else found if seen[key] else missing).append(tag)
    known = len(found) + len(missing)
    return Recall(len(found) / known if known else None, tuple(found), tuple(missing), tuple(unknown))


@dataclass
class Score:
    layer: int
    row: int
    col: int
    epoch: int
    weight: float
    likeness: float | None  # recall of the core tags, 0..1
    flexibility: float | None  # recall of the tags the layer's prompt requested, 0..1
    overcooked: float  # 0..1
    clipping: float  # the excess share of clipped pixels over the baseline's
    artefacts: float  # high-frequency energy / the baseline's
    broken: bool  # NaN, black or blank
    problem: str = ""  # "NaN", "black", "blank" or ""
    missing_core: tuple[str, ...] = ()
    missing_requested: tuple[str, ...] = ()

    @property
    def merit(self) -> float:
        """One number to rank cells: the mean of the recalls there are (1 without any), times
        1 - overcooked; a broken image is worth 0."""
        if self.broken:
            return 0.0
        recalls = [v for v in (self.likeness, self.flexibility) if v is not None]
        return (sum(recalls) / len(recalls) if recalls else 1.0) * (1.0 - self.overcooked)

    def to_dict(self) -> dict:
        return {**asdict(self), "merit": self.merit}


SORT_KEYS = ("merit", "likeness", "flexibility", "overcooked")


def sort_scores(scores: Sequence[Score], by: str = "merit") -> list[Score]:
    """Best first: highest merit, likeness or flexibility, lowest overcooking; unknown values last."""
    if by not in SORT_KEYS:
        raise LoraMakerError(f"scores sort by {', '.join(SORT_KEYS)}, not {by!r}")
    sign = 1 if by == "overcooked" else -1

    def key(s: Score):
        value = getattr(s, by)
        return (value is None, sign * (value or 0.0), s.layer, s.row, s.col)

    return sorted(scores, key=key)


def _reference(cells: Sequence[Cell], present: Sequence[bool]) -> dict[int, int]:
    """For each cell index, the index of its baseline: the weight-0 cell of the same layer and row
    (else of the same layer), else the lowest weight of the same layer and row."""
    zero_row, zero_layer, lowest = {}, {}, {}
    for i, cell in enumerate(cells):
        if not present[i]:
            continue
        if cell.weight == 0:
            zero_row.setdefault((cell.layer, cell.row), i)
            zero_layer.setdefault(cell.layer, i)
        at = (cell.layer, cell.row)
        if at not in lowest or cell.weight < cells[lowest[at]].weight:
            lowest[at] = i
    out = {}
    for i, cell in enumerate(cells):
        at = (cell.layer, cell.row)
        ref = zero_row.get(at, zero_layer.get(cell.layer, lowest.get(at)))
        if ref is not None:
            out[i] = ref
    return out


def score_cells(cells: Sequence[Cell], images: Sequence, predictions: Sequence | None = None,
                core_tags: Sequence[str] = (), requested_tags: Mapping[int, Sequence[str]] | None = None,
                threshold: float = DEFAULT_THRESHOLD,
                character_threshold: float = DEFAULT_CHARACTER_THRESHOLD) -> list[Score]:
    """A Score per rendered cell. `images[i]` is cell i's image (None: not rendered, no score);
    `predictions[i]` its `tagger.Prediction` (None: no likeness or flexibility); `requested_tags`
    maps a layer to the tags its prompt asked for (layers without any get no flexibility)."""
    if len(images) != len(cells) or (predictions is not None and len(predictions) != len(cells)):
        raise ValueError("one image and one prediction per cell")
    requested_tags = requested_tags or {}
    stats: dict[int, ImageStats] = {}  # by id(): the baseline image is shared by every row

    def stats_of(image) -> ImageStats:
        if id(image) not in stats:
            stats[id(image)] = ImageStats.of(image)
        return stats[id(image)]

    present = [im is not None for im in images]
    reference = _reference(cells, present)
    scores = []
    for i, cell in enumerate(cells):
        if images[i] is None:
            continue
        base = reference.get(i)
        cooked = overcooking(stats_of(images[i]), stats_of(images[base]) if base is not None else None)
        prediction = predictions[i] if predictions is not None else None
        like = recall(core_tags, prediction, threshold, character_threshold) if prediction else None
        wanted = requested_tags.get(cell.layer, ())
        flex = recall(wanted, prediction, threshold, character_threshold) if prediction and wanted else None
        scores.append(Score(
            cell.layer, cell.row, cell.col, cell.epoch.number, cell.weight,
            like.value if like else None, flex.value if flex else None,
            cooked.score, cooked.clipping, cooked.artefacts, bool(cooked.problem), cooked.problem,
            like.missing if like else (), flex.missing if flex else (),
        ))
    return scores
