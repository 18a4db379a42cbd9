"""The training data: a project's images and captions, checked before any GPU work, grouped into
aspect-ratio buckets and served as batches per epoch, with the caption augmentations of sd-scripts
(tag shuffle after the kept leading tags, tag dropout, caption dropout) and random flips.

Everything random comes from (seed, epoch), so a run resumed mid-epoch sees the same batches.
Pixels and captions are separate on purpose: the trainer encodes every (image, flip) once through
`cache_keys()`/`pixels()`, then builds each step's batch from the cached latents with
`epoch_plan()`, whose captions are augmented afresh every time an image comes round.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..dataset.captions import join_tags, read_caption, split_tags
from ..dataset.images import ImageRejected, decode, flatten
from ..errors import LoraMakerError, Stopped
from ..hosts.host import SizeInfo
from ..progress import Progress
from ..project import Project
from .buckets import BucketPlan, Size, flipped, resize_and_crop, size_info
from .plan import StepPlan, step_arithmetic
from .settings import TrainSettings


@dataclass
class Item:
    """One usable image of the dataset."""

    index: int
    image: Path
    caption: str
    width: int
    height: int


_ORIENTATION = 0x0112
_SIDEWAYS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def load_image(path: Path) -> Image.Image:
    """A dataset image fully decoded, upright (EXIF orientation applied) and RGB on white."""
    img = decode(Path(path).read_bytes())
    if img.getexif().get(_ORIENTATION, 1) not in (0, 1):
        img = ImageOps.exif_transpose(img)
    img = flatten(img)
    return img if img.mode == "RGB" else img.convert("RGB")


def _upright_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image as `load_image` returns it; decodes it all, so damage shows."""
    with decode(Path(path).read_bytes()) as img:
        sideways = img.getexif().get(_ORIENTATION, 1) in _SIDEWAYS
        return (img.height, img.width) if sideways else img.size


def _names(entries: list[str], limit: int = 5) -> str:
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return ", ".join(entries[:limit]) + more


def check_dataset(project: Project, progress: Progress | None = None) -> list[Item]:
    """Every dataset image with its caption and size, or a LoraMakerError naming what must be fixed
    first: no images, images without a caption, images that don't decode."""
    paths = project.images()
    if not paths:
        raise LoraMakerError(
            f"project {project.name!r} has no images in {project.dataset_dir}: scrape or import some first"
        )
    progress = progress or Progress()

    def inspect(path: Path):
        """(caption, size, why it has no caption, why it can't be read)."""
        try:
            caption = read_caption(path) or None  # a blank caption file is a missing caption
            uncaptioned = None if caption else path.name
        except LoraMakerError as e:
            caption, uncaptioned = None, f"{path.name} ({e})"
        try:
            return caption, _upright_size(path), uncaptioned, None
        except (ImageRejected, OSError) as e:
            return caption, None, uncaptioned, f"{path.name} ({e})"

    uncaptioned, unreadable, items = [], [], []
    workers = min(8, os.cpu_count() or 1)
    with progress.task("checking images", len(paths)) as task, ThreadPoolExecutor(workers) as pool:
        for path, (caption, size, no_caption, bad) in zip(paths, pool.map(inspect, paths)):  # decoding frees the GIL
            if progress.should_stop():
                raise Stopped("stopped by the user")
            task.advance()
            uncaptioned += [no_caption] if no_caption else []
            unreadable += [bad] if bad else []
            if caption and size:
                items.append(Item(len(items), path, caption, size[0], size[1]))
    problems = []
    if uncaptioned:
        problems.append(f"{len(uncaptioned)} image(s) have no caption: {_names(uncaptioned)} (tag them or remove them)")
    if unreadable:
        problems.append(f"{len(unreadable)} image(s) cannot be read: {_names(unreadable)} (remove or replace them)")
    if problems:
        raise LoraMakerError(f"project {project.name!r} is not ready to train: " + "; ".join(problems))
    return items


def process_caption(
    caption: str,
    rng: random.Random,
    shuffle: bool = True,
    keep_tokens: int = 0,
    tag_dropout: float = 0.0,
    caption_dropout: float = 0.0,
) -> str:
    """One draw of sd-scripts' caption augmentation: the whole caption dropped to "" with
    `caption_dropout`; otherwise the tags after the first `keep_tokens` shuffled and each dropped with
    `tag_dropout`. A caption that nothing changes keeps its exact text (sentences stay intact)."""
    if caption_dropout and rng.random() < caption_dropout:
        return ""
    if not shuffle and not tag_dropout:
        return caption
    tags = split_tags(caption)
    kept, free = tags[:keep_tokens], tags[keep_tokens:]
    if shuffle:
        rng.shuffle(free)
    if tag_dropout:
        free = [t for t in free if rng.random() >= tag_dropout]
    return join_tags(kept + free)


@dataclass
class Sample:
    """One image's place in a batch: which image, mirrored or not, and this step's caption."""

    index: int
    flip: bool
    caption: str


@dataclass
class BatchPlan:
    """One step's worth of samples, all of one bucket."""

    bucket: Size  # (width, height)
    samples: list[Sample]

    @property
    def keys(self) -> list[tuple[int, bool]]:
        """(image index, flip) per sample: the keys of the latent cache."""
        return [(s.index, s.flip) for s in self.samples]

    @property
    def captions(self) -> list[str]:
        return [s.caption for s in self.samples]


@dataclass
class Batch:
    """A batch ready for the VAE: pixels in [-1, 1], float32, NCHW."""

    pixels: torch.Tensor
    captions: list[str]
    sizes: list[SizeInfo]
    flips: list[bool]
    indices: list[int]


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image as float32 CHW in [-1, 1]."""
    array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class TrainData:
    """The dataset of one run, over checked `items` and settings already `resolved()` for the model."""

    def __init__(self, items: list[Item], settings: TrainSettings):
        if settings.resolution is None or settings.max_bucket is None or settings.keep_tokens is None:
            raise ValueError("TrainData needs settings.resolved(kind, project)")
        if not items:
            raise LoraMakerError("the dataset has no usable images")
        self.items = items
        self.settings = settings
        self.plan = BucketPlan.build(
            [(i.width, i.height) for i in items],
            settings.resolution,
            settings.bucket_step,
            settings.min_bucket,
            settings.max_bucket,
            no_upscale=settings.bucket_no_upscale,
            enabled=settings.buckets,
        )

    @classmethod
    def from_project(
        cls, project: Project, settings: TrainSettings, kind: str, progress: Progress | None = None
    ) -> "TrainData":
        """The checked dataset of `project` with `settings` resolved for a model of `kind`."""
        return cls(check_dataset(project, progress), settings.resolved(kind, project))

    def bucket(self, index: int) -> Size:
        return self.plan.assigned[index]

    def step_plan(self) -> StepPlan:
        return step_arithmetic(len(self.items), self.settings, list(self.plan.counts().values()))

    @property
    def steps_per_epoch(self) -> int:
        return self.step_plan().steps_per_epoch

    # ---- pixels (once per image and orientation, then cached as latents by the trainer) ----

    def cache_keys(self) -> list[tuple[int, bool]]:
        """Every (image index, flip) a batch may ask for: both orientations with flip_aug."""
        flips = (False, True) if self.settings.flip_aug else (False,)
        return [(item.index, flip) for item in self.items for flip in flips]

    def pixels(self, index: int, flip: bool = False) -> tuple[torch.Tensor, SizeInfo]:
        """Image `index` resized and cropped to its bucket (mirrored with `flip`): CHW in [-1, 1]."""
        with load_image(self.items[index].image) as img:
            cropped, size = resize_and_crop(img, self.bucket(index))
        if flip:
            cropped, size = flipped(cropped, size)
        return to_tensor(cropped), size

    # ---- batches ----

    def epoch_plan(self, epoch: int) -> list[BatchPlan]:
        """The batches of `epoch` (0-based) in order, every image `repeats` times, with its flip and
        augmented caption; the same for the same seed and epoch."""
        return [plan for step in self.epoch_steps(epoch) for plan in step]

    def epoch_steps(self, epoch: int) -> list[list[BatchPlan]]:
        """The steps of `epoch`: each the batches whose gradients it accumulates, together the images a
        batch of batch_size x gradient_accumulation_steps would hold (so accumulating trains the same)."""
        s = self.settings
        rng = random.Random(f"{s.seed}/{epoch}")
        by_bucket: dict[Size, list[int]] = {}
        for item in self.items:
            by_bucket.setdefault(self.bucket(item.index), []).extend([item.index] * s.repeats)
        steps = []
        per_step = s.batch_size * s.gradient_accumulation_steps
        for bucket, indices in sorted(by_bucket.items()):
            rng.shuffle(indices)
            for start in range(0, len(indices), per_step):
                step = indices[start : start + per_step]
                steps.append([BatchPlan(bucket, [Sample(i, False, "") for i in step[first : first + s.batch_size]])
                              for first in range(0, len(step), s.batch_size)])
        rng.shuffle(steps)
        for sample in (sample for step in steps for plan in step for sample in plan.samples):
            # flips and captions drawn in batch order, after the order is fixed
            sample.flip = s.flip_aug and rng.random() < 0.5
            caption = self.items[sample.index].caption
            sample.caption = process_caption(caption, rng, s.shuffle_tags, s.keep_tokens, s.tag_dropout, s.caption_dropout)
        return steps

    def load(self, plan: BatchPlan) -> Batch:
        """The pixels of a planned batch (for training without a latent cache)."""
        loaded = [self.pixels(s.index, s.flip) for s in plan.samples]
        return Batch(
            torch.stack([p for p, _ in loaded]),
            plan.captions,
            [size for _, size in loaded],
            [s.flip for s in plan.samples],
            [s.index for s in plan.samples],
        )

    def batches(self, epoch: int):
        """Yield the loaded batches of `epoch`."""
        for plan in self.epoch_plan(epoch):
            yield self.load(plan)

    def sizes(self, plan: BatchPlan) -> list[SizeInfo]:
        """The SDXL size conditioning of a planned batch, without loading pixels (the crop depends
        only on the image size and its bucket)."""
        return self.sizes_of(plan.keys)

    def sizes_of(self, keys: list[tuple[int, bool]]) -> list[SizeInfo]:
        """The SDXL size conditioning of (image index, flip) keys."""
        return [size_info(self.items[i].width, self.items[i].height, self.bucket(i), flip) for i, flip in keys]


# ---- metadata ----


def dataset_key(project: Project) -> str:
    """The name the `ss_*` metadata files the dataset under (the folder's base name, as sd-scripts)."""
    return project.dataset_dir.name


def metadata_tag_frequency(project: Project) -> dict[str, dict[str, int]]:
    """`ss_tag_frequency`: {dataset folder: {lower-cased tag: occurrences in captions}}."""
    counts: Counter[str] = Counter()
    for image in project.images():
        counts.update(tag.lower() for tag in split_tags(read_caption(image)))
    return {dataset_key(project): dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))}


def dataset_dirs(project: Project, repeats: int, images: int | None = None) -> dict[str, dict[str, int]]:
    """`ss_dataset_dirs`: {dataset folder: {"n_repeats": repeats, "img_count": images}}."""
    count = len(project.images()) if images is None else images
    return {dataset_key(project): {"n_repeats": repeats, "img_count": count}}
