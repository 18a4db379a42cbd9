"""What the Train sub-tab shows beside the form, recomputed on every change: the step arithmetic
(per aspect-ratio bucket, as the trainer fills batches) and the VRAM estimate against the GPU."""

from __future__ import annotations

import html

from ..training import vram
from ..training.plan import TrainingPlan


def plan_html(plan: TrainingPlan | None) -> str:
    """The step arithmetic line, its details and the guide's warnings (or why there is none)."""
    if plan is None:
        return _box("plan", '<p class="lora-maker-note">Pick a project to see the step arithmetic.</p>')
    steps = plan.steps
    if steps is None:
        return _box("plan", f'<p class="lora-maker-note">{html.escape(plan.problem)}</p>')
    facts = [f"{steps.steps_per_epoch} steps per epoch"]
    if plan.buckets > 1:
        facts.append(f"{plan.buckets} buckets")
    if steps.warmup_steps:
        facts.append(f"{steps.warmup_steps} warmup steps")
    every = plan.settings.save_every_n_epochs
    if every and steps.epochs > 1:
        facts.append(f"a LoRA saved every {every} epochs" if every > 1 else "a LoRA saved each epoch")
    facts.append(plan.optimizer)
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in plan.warnings)
    family = (f'<div class="lora-maker-note lora-maker-train-family">{html.escape(plan.family_defaults)}</div>'
              if plan.family_defaults else "")
    body = (f'<div class="lora-maker-train-line" data-steps="{steps.total_steps}">{html.escape(steps.render())}</div>'
            f'<div class="lora-maker-note">{html.escape(" · ".join(facts))}</div>' + family
            + (f'<ul class="lora-maker-train-warnings">{warnings}</ul>' if warnings else ""))
    return _box("plan", body)


def vram_html(plan: TrainingPlan) -> str:
    """The VRAM estimate for the loaded model's kind (SD1 when none is loaded), its parts, and a
    verdict against the GPU's total memory when a GPU is visible."""
    e, kind, estimate = html.escape, plan.kind, plan.estimate
    model = (f"for the {vram.KIND_NAMES[kind]} model training uses" if kind
             else "no model loaded: estimated for an SD1 model")
    lines = [f'<div class="lora-maker-train-title">VRAM estimate <span class="lora-maker-note">{e(model)}</span></div>',
             f'<div class="lora-maker-train-line" data-gib="{estimate.total_gib:.2f}">{e(estimate.summary())}</div>']
    if plan.gpu:
        free, total = plan.gpu
        verdict = plan.verdict
        lines.append(f'<div class="lora-maker-train-verdict lora-maker-train-{verdict.split(":")[0].replace(" ", "-")}">'
                     f"{e(verdict)}</div>")
        lines.append(f'<div class="lora-maker-note">GPU: {free:.1f} GiB free of {total:.1f} GiB '
                     "(the WebUI's loaded model already counts as used)</div>")
        lines += [f'<div class="lora-maker-note lora-maker-train-memory">{e(note)}</div>' for note in plan.memory_notes]
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
