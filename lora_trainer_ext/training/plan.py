"""The plan of a run, before it starts: the step arithmetic the guide teaches (images x repeats x
epochs / batch = steps, aim at 250-1000), counted per aspect-ratio bucket as the trainer fills batches,
and the VRAM estimate against the GPU. `training_plan` is the one count the tab, the API, the CLI and
the trainer's first status show.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LoraMakerError
from ..hosts.host import SD1
from ..project import Project
from . import vram
from .buckets import BucketPlan
from .schedules import WARMUP_SCHEDULERS, warmup_steps
from .settings import TrainSettings, family_note

GUIDE_STEPS = (250, 1000)  # the guide's advice for total steps
_ORIENTATION, _SIDEWAYS = 0x0112, (5, 6, 7, 8)  # EXIF orientations that swap width and height
# path -> ((mtime, size), (width, height)): image headers are read once, then on change only.
_sizes: dict[Path, tuple[tuple[int, int], tuple[int, int]]] = {}


@dataclass
class StepPlan:
    images: int
    repeats: int
    batch_size: int
    epochs: int
    steps_per_epoch: int  # batches per epoch (filled per bucket, so possibly more than images x repeats / batch)
    total_steps: int
    warmup_steps: int
    max_steps: int | None = None  # set when the run is counted in steps rather than epochs
    warnings: list[str] = field(default_factory=list)
    accumulation: int = 1  # batches whose gradients make one step

    def render(self) -> str:
        """One line: "40 images x 10 repeats x 10 epochs / batch 2 = 2000 steps"."""
        plain = math.ceil(self.images * self.repeats / (self.batch_size * self.accumulation))
        batch = f"batch {self.batch_size}" + (f" x {self.accumulation} accumulated" if self.accumulation > 1 else "")
        if self.max_steps is not None:
            per_epoch = f"{self.steps_per_epoch} steps" + ("" if plain == self.steps_per_epoch else " filled per bucket")
            return (
                f"{self.total_steps} steps = about {self.epochs} epochs of "
                f"{self.images} images x {self.repeats} repeats / {batch} ({per_epoch})"
            )
        line = (
            f"{self.images} images x {self.repeats} repeats x {self.epochs} epochs / {batch} "
            f"= {plain * self.epochs} steps"
        )
        if plain != self.steps_per_epoch:
            line += f" ({self.total_steps} with batches filled per bucket)"
        return line


def step_arithmetic(images: int, settings: TrainSettings, bucket_sizes: list[int] | None = None) -> StepPlan:
    """The run's steps: images x repeats / (batch x accumulation) per epoch (rounded up, per bucket when
    the images' `bucket_sizes` are given, since a step holds one bucket), times epochs, or `max_steps`."""
    if images < 1:
        raise LoraMakerError("the dataset has no images: nothing to train on")
    counts = bucket_sizes or [images]
    per_step = settings.batch_size * settings.gradient_accumulation_steps
    per_epoch = sum(math.ceil(n * settings.repeats / per_step) for n in counts)
    if settings.max_steps is not None:
        total, epochs = settings.max_steps, math.ceil(settings.max_steps / per_epoch) if per_epoch else 0
    else:
        total, epochs = per_epoch * settings.epochs, settings.epochs
    if total < 1:
        raise LoraMakerError(
            f"{images} images x {settings.repeats} repeats x {settings.epochs} epochs makes 0 steps: "
            "raise repeats or epochs"
        )
    warmup = warmup_steps(total, settings.warmup_ratio) if settings.lr_scheduler in WARMUP_SCHEDULERS else 0
    low, high = GUIDE_STEPS
    knobs = "max_steps" if settings.max_steps is not None else "repeats or epochs"
    warnings = []
    if total < low:
        warnings.append(f"{total} steps is below the guide's {low}-{high}: raise {knobs} (or the LoRA may be undercooked)")
    elif total > high:
        warnings.append(
            f"{total} steps is above the guide's {low}-{high}: lower {knobs} (or raise batch_size) to avoid overcooking"
        )
    saved = (epochs - 1) // settings.save_every_n_epochs if settings.save_every_n_epochs else 0  # before the last
    if settings.keep_last_n_epochs and saved > settings.keep_last_n_epochs:
        warnings.append(f"keep_last_n_epochs={settings.keep_last_n_epochs} deletes the first "
                        f"{saved - settings.keep_last_n_epochs} of {saved} epoch files as training goes on: the grid "
                        "can compare only the rest (0 keeps them all)")
    return StepPlan(images, settings.repeats, settings.batch_size, epochs, per_epoch, total, warmup, settings.max_steps,
                    warnings, settings.gradient_accumulation_steps)


def image_sizes(paths: list[Path]) -> list[tuple[int, int]] | None:
    """Each image's upright (width, height) from its header, or None when one cannot be read (the
    arithmetic then counts without buckets; the trainer's own check names the bad file)."""
    from PIL import Image

    sizes = []
    for path in paths:
        try:
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            known = _sizes.get(path)
            if known is None or known[0] != stamp:
                with Image.open(path) as img:
                    width, height = img.size
                    if img.getexif().get(_ORIENTATION, 1) in _SIDEWAYS:
                        width, height = height, width
                known = _sizes[path] = (stamp, (width, height))
            sizes.append(known[1])
        except (OSError, ValueError, Image.DecompressionBombError):
            return None
    return sizes


def bucket_counts(sizes: list[tuple[int, int]], settings: TrainSettings) -> list[int]:
    """How many images fall in each bucket (`settings` resolved), as the trainer assigns them."""
    plan = BucketPlan.build(sizes, settings.resolution, settings.bucket_step, settings.min_bucket,
                            settings.max_bucket, no_upscale=settings.bucket_no_upscale, enabled=settings.buckets)
    return list(plan.counts().values())


@dataclass
class TrainingPlan:
    """What a run of `settings` on a project would do, and whether it fits the GPU."""

    kind: str | None  # the model training would use; None: none loaded (estimated for SD1)
    settings: TrainSettings
    steps: StepPlan | None  # None when the dataset cannot make steps (`problem` says why)
    buckets: int  # how many buckets the images fill (0 when unknown)
    advice: list[str]  # the settings' own advice (legal but unusual values)
    estimate: vram.Estimate
    gpu: tuple[float, float] | None  # free, total GiB of the GPU training would use
    problem: str = ""

    @property
    def family_defaults(self) -> str:
        """The model family's defaults in effect, when they are not SD1.5's ("" otherwise)."""
        return family_note(self.kind)

    @property
    def optimizer(self) -> str:
        """The optimizer with the arguments it will get, and whether they are the recommended ones."""
        s = self.settings
        args = s.resolved(self.kind or SD1).optimizer_args  # the recommended ones when unset
        return (f"optimizer {s.optimizer}" + (f" ({args})" if args else "")
                + (": the notebooks' recommended arguments" if s.optimizer_args is None else ""))

    @property
    def warnings(self) -> list[str]:
        return [*(self.steps.warnings if self.steps else []), *self.advice]

    @property
    def verdict(self) -> str | None:
        """The estimate against the GPU's memory (None without a GPU)."""
        return vram.fits(self.estimate, self.gpu[1], self.settings) if self.gpu else None

    @functools.cached_property
    def _fitting(self) -> tuple[TrainSettings, list[str]] | None:
        """`vram.fitting_settings` for the GPU, searched once per plan (the tab, the API and the CLI ask
        for the fix and the notes)."""
        return vram.fitting_settings(self.kind or SD1, self.settings, self.gpu[1])

    @property
    def memory_fix(self) -> tuple[TrainSettings, list[str]] | None:
        """When the run does not fit the GPU: the cheapest settings that do, and what they change (None when
        it fits, without a GPU, or when nothing makes it fit)."""
        if not self.gpu:
            return None
        fix = self._fitting
        return fix if fix and fix[1] else None

    @property
    def memory_notes(self) -> list[str]:
        """The fix in words (or that none fits), and the system-memory fallback risk near the card's size."""
        if not self.gpu:
            return []
        fix = self._fitting
        notes = [] if fix is None or not fix[1] else ["to fit: " + "; ".join(fix[1])]
        if fix is None:
            notes.append("nothing LoRA Maker can change fits this card: a smaller model, or a card with more memory")
        return [*notes, *filter(None, [vram.sysmem_fallback_note(self.estimate, self.gpu[1])])]


def training_plan(project: Project | None, settings: TrainSettings, kind: str | None,
                  gpu: tuple[float, float] | None = None, model_notes: list[str] = ()) -> TrainingPlan:
    """The plan of training `project` (None: none picked yet, no steps) with `settings` on a model of
    `kind` (checked: LoraMakerError for impossible settings). Steps are counted per bucket from the
    images' headers, as the trainer assigns them."""
    advice = [*settings.validate(kind), *model_notes]
    if settings.network_weights:
        advice.append(f"continues from {Path(settings.network_weights).name}: its weights are the start, and the "
                      "epochs count from 1 again")
    resolved = settings.resolved(kind or SD1, project)
    images = project.images() if project else []
    sizes = image_sizes(images) if images else None
    counts = bucket_counts(sizes, resolved) if sizes else None
    try:
        steps, problem = step_arithmetic(len(images), resolved, counts), ""
    except LoraMakerError as e:
        steps, problem = None, str(e)
    return TrainingPlan(kind, settings, steps, len(counts or []), advice, vram.estimate(kind or SD1, settings), gpu,
                        problem)
