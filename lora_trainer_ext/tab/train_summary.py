"""What the Train sub-tab shows beside the form, recomputed on every change: the step arithmetic
(per aspect-ratio bucket, as the trainer fills batches) and the VRAM estimate against the GPU."""

from __future__ import annotations

import html
from pathlib import Path

from ..errors import LoraMakerError
from ..hosts.host import SD1
from ..project import Project
from ..training import vram
from ..training.buckets import BucketPlan
from ..training.settings import TrainSettings, step_arithmetic

_ORIENTATION, _SIDEWAYS = 0x0112, (5, 6, 7, 8)  # EXIF orientations that swap width and height
# path -> ((mtime, size), (width, height)): image headers are read once, then on change only.
_sizes: dict[Path, tuple[tuple[int, int], tuple[int, int]]] = {}


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


def plan_html(project: Project | None, settings: TrainSettings, kind: str | None, advice: list[str]) -> str:
    """The step arithmetic line, its details and the guide's warnings (or why there is none)."""
    if project is None:
        return _box("plan", '<p class="lora-maker-note">Pick a project to see the step arithmetic.</p>')
    images = project.images()
    resolved = settings.resolved(kind or SD1, project)
    sizes = image_sizes(images) if images else None
    buckets = None
    if sizes:
        plan = BucketPlan.build(sizes, resolved.resolution, resolved.bucket_step, resolved.min_bucket,
                                resolved.max_bucket, no_upscale=resolved.bucket_no_upscale, enabled=resolved.buckets)
        buckets = list(plan.counts().values())
    try:
        steps = step_arithmetic(len(images), resolved, buckets)
    except LoraMakerError as e:
        return _box("plan", f'<p class="lora-maker-note">{html.escape(str(e))}</p>')
    facts = [f"{steps.steps_per_epoch} steps per epoch"]
    if buckets and len(buckets) > 1:
        facts.append(f"{len(buckets)} buckets")
    if steps.warmup_steps:
        facts.append(f"{steps.warmup_steps} warmup steps")
    every = settings.save_every_n_epochs
    if every and steps.epochs > 1:
        facts.append(f"a LoRA saved every {every} epochs" if every > 1 else "a LoRA saved each epoch")
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in [*steps.warnings, *advice])
    body = (f'<div class="lora-maker-train-line" data-steps="{steps.total_steps}">{html.escape(steps.render())}</div>'
            f'<div class="lora-maker-note">{html.escape(" · ".join(facts))}</div>'
            + (f'<ul class="lora-maker-train-warnings">{warnings}</ul>' if warnings else ""))
    return _box("plan", body)


def vram_html(settings: TrainSettings, kind: str | None, gpu: tuple[float, float] | None) -> str:
    """The VRAM estimate for the loaded model's kind (SD1 when none is loaded), its parts, and a
    verdict against the GPU's total memory when a GPU is visible."""
    e = html.escape
    estimate = vram.estimate(kind or SD1, settings)
    model = (f"for the {vram.KIND_NAMES[kind]} model training uses" if kind
             else "no model loaded: estimated for an SD1 model")
    lines = [f'<div class="lora-maker-train-title">VRAM estimate <span class="lora-maker-note">{e(model)}</span></div>',
             f'<div class="lora-maker-train-line" data-gib="{estimate.total_gib:.2f}">{e(estimate.summary())}</div>']
    if gpu:
        free, total = gpu
        verdict = vram.fits(estimate, total, settings)
        lines.append(f'<div class="lora-maker-train-verdict lora-maker-train-{verdict.split(":")[0].replace(" ", "-")}">'
                     f"{e(verdict)}</div>")
        lines.append(f'<div class="lora-maker-note">GPU: {free:.1f} GiB free of {total:.1f} GiB '
                     "(the WebUI's loaded model already counts as used)</div>")
    else:
        lines.append('<div class="lora-maker-note">No CUDA GPU visible here: compare with your card\'s memory.</div>')
    rows = "".join(f"<tr><td>{e(p.name)}</td><td>{p.gib:.2f} GiB</td><td>{e(p.note)}</td></tr>" for p in estimate.parts)
    lines.append(f"<details><summary>breakdown</summary><table class=\"lora-maker-table\">{rows}</table>"
                 f'<p class="lora-maker-note">peak while training {estimate.training_gib:.1f} GiB, while caching '
                 f"latents {estimate.caching_gib:.1f} GiB; activation sizes are calibrated on published "
                 "kohya/diffusers reports, so take it as a guide</p></details>")
    return _box("vram", "".join(lines))


def error_html(message: str) -> tuple[str, str]:
    """(plan, vram) boxes for settings that do not validate: the message instead of the numbers."""
    plan = _box("plan", f'<div class="lora-maker-error" data-invalid="1">{html.escape(message)}</div>')
    return plan, _box("vram", '<p class="lora-maker-note">VRAM estimate: fix the settings first.</p>')


def _box(what: str, body: str) -> str:
    return f'<div id="lora_maker_train_{what}_box" class="lora-maker-train-box">{body}</div>'
