"""The Train sub-tab: the project's training settings (presets by purpose and VRAM tier, a grouped
form, the step arithmetic and VRAM estimate recomputed as the user types), saving them, and starting
or resuming a run. Progress, the loss chart and the stop buttons belong to the job panel above the
sub-tabs, which follows whatever job runs.

Live updates listen to the inputs' `input` events (user edits only) and number boxes' `blur` (a
cleared box sends no input event), never to `change`: loading a project or a preset sets every input
at once, and those handlers return the arithmetic themselves. Invalid values show their message in
place of the arithmetic instead of raising, so typing never produces a storm of error toasts.
"""

from __future__ import annotations

import html
import threading
from types import SimpleNamespace

import gradio as gr

from ..errors import LoraMakerError
from ..hosts.host import SD1
from ..training import presets
from ..training.network import require_lycoris
from ..training.optimizers import OPTIMIZERS
from ..training.settings import TrainSettings
from .context import TabContext, shows_errors, unavailable
from .train_form import GROUPS, KEYS, component, form_values, settings_from
from .train_summary import error_html, plan_html, vram_html

TIERS = {f"{gb} GB": gb for gb in presets.VRAM_TIERS}
BY_TIER = "by GPU memory"  # the preset's own choice: AdamW, or AdamW8bit on small cards
_PER_ROW = 4  # inputs per row inside a "More" accordion
# Stamps each live update "<page id>:<counter>" in the browser before it is sent.
_STAMP_JS = """(stamp, ...values) => {
    window.loraMakerTrainPage = window.loraMakerTrainPage || Math.random().toString(36).slice(2);
    window.loraMakerTrainCount = (window.loraMakerTrainCount || 0) + 1;
    return [window.loraMakerTrainPage + ":" + window.loraMakerTrainCount, ...values];
}"""


class LiveOrder:
    """Live updates are separate requests (a keystroke, a blur) that gradio runs concurrently, so an
    older one could answer last and show numbers for values no longer in the form. Requests run one
    at a time here, and one older than a request already answered for the same page is dropped."""

    def __init__(self, pages: int = 100):
        self.lock = threading.Lock()
        self.newest: dict[str, int] = {}
        self.pages = pages

    def stale(self, stamp: str) -> bool:
        page, _, count = (stamp or "").rpartition(":")
        if not count.isdigit():
            return False
        if int(count) < self.newest.get(page, 0):
            return True
        self.newest.pop(page, None)  # re-inserted last: the dict stays in least recently used order
        self.newest[page] = int(count)
        if len(self.newest) > self.pages:  # pages that went away
            self.newest.pop(next(iter(self.newest)))
        return False


def preset_defaults(studio) -> tuple[str | None, str | None]:
    """(purpose, tier label) preselected: the WebUI's default preset setting; the tier otherwise
    from the GPU's total memory when one is visible."""
    purpose = tier = None
    name = studio.default_preset()
    if name:
        try:
            purpose, tier = presets.parse_preset_name(name)
        except LoraMakerError:  # a value another version saved: nothing preselected
            pass
    if tier is None:
        memory = studio.gpu_memory()
        tier = presets.tier_for_memory(memory[1]) if memory else None
    return purpose, (f"{tier} GB" if tier else None)


def _notes(lines: list[str], css: str = "lora-maker-note") -> str:
    if not lines:
        return ""
    return f'<ul class="{css}">' + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"


def build(ctx: TabContext, tab) -> None:
    ui = SimpleNamespace()
    _preset_layout(ui, ctx.studio)
    with gr.Row(equal_height=False, elem_id="lora_maker_train_main"):
        _form_layout(ui)
        _side_layout(ui, ctx.studio)
    form = _Form(ctx, ui)
    _wire_form(ctx, tab, ui, form)
    _wire_buttons(ctx, ui, form)


def _preset_layout(ui, studio) -> None:
    purpose_default, tier_default = preset_defaults(studio)
    with gr.Row(elem_id="lora_maker_train_preset_row"):
        ui.purpose = gr.Dropdown(list(presets.PURPOSES), value=purpose_default, label="Preset: what the LoRA learns",
                                 elem_id="lora_maker_train_purpose", scale=2)
        ui.tier = gr.Dropdown(list(TIERS), value=tier_default, label="GPU memory", elem_id="lora_maker_train_tier",
                              scale=1)
        ui.preset_optimizer = gr.Dropdown([BY_TIER, *OPTIMIZERS], value=BY_TIER, scale=1,
                                          label="Optimizer (with its recommended values)",
                                          elem_id="lora_maker_train_preset_optimizer")
        ui.apply = gr.Button("Apply preset", elem_id="lora_maker_train_apply_preset", scale=0, min_width=140)
    ui.preset_note = gr.HTML(elem_id="lora_maker_train_preset_note")


def _form_layout(ui) -> None:
    inputs = {}
    with gr.Column(scale=3, elem_id="lora_maker_train_form"):
        for group in GROUPS:
            slug = group.title.lower().replace(" & ", "_").replace(" ", "_")
            with gr.Accordion(group.title, open=True, elem_id=f"lora_maker_train_group_{slug}"):
                with gr.Row():
                    inputs.update((spec.key, component(spec)) for spec in group.main)
                if group.more:
                    with gr.Accordion("More", open=False, elem_id=f"lora_maker_train_more_{slug}"):
                        for first in range(0, len(group.more), _PER_ROW):
                            with gr.Row():
                                inputs.update((s.key, component(s)) for s in group.more[first:first + _PER_ROW])
    ui.fields = [inputs[key] for key in KEYS]


def _side_layout(ui, studio) -> None:
    # Buttons first: the live boxes below them change height as the user types, and must not
    # move a button between the press and the release of a click.
    with gr.Column(scale=2, min_width=320, elem_id="lora_maker_train_side"):
        missing = unavailable(("lycoris",), require_lycoris)  # the form still works; training can't
        if missing:
            gr.HTML(f'<p class="lora-maker-error">{html.escape(missing)}</p>', elem_id="lora_maker_train_missing")
        with gr.Row():
            ui.start = gr.Button("Start training", variant="primary", elem_id="lora_maker_train_start",
                                 interactive=not (missing or studio.host_problem()))
            ui.resume = gr.Button("Resume", visible=False, elem_id="lora_maker_train_resume")
            ui.restart = gr.Button("Start over", visible=False, elem_id="lora_maker_train_restart")
        ui.grid = gr.Checkbox(True, label="Render a test grid when training ends (see the Test tab)",
                              elem_id="lora_maker_train_grid")
        with gr.Row():
            ui.save = gr.Button("Save settings", size="sm", elem_id="lora_maker_train_save")
            ui.load = gr.Button("Load saved", size="sm", elem_id="lora_maker_train_load")
            ui.reset = gr.Button("Reset to defaults", size="sm", elem_id="lora_maker_train_reset")
        ui.message = gr.HTML(elem_id="lora_maker_train_message")
        ui.plan = gr.HTML(elem_id="lora_maker_train_plan")
        ui.estimate = gr.HTML(elem_id="lora_maker_train_vram")
        ui.fit = gr.Button("Fit to my GPU", size="sm", elem_id="lora_maker_train_fit")
        ui.output = gr.HTML(elem_id="lora_maker_train_output")


class _Form:
    """The form's values and the plan beside them, as the lists of updates the handlers return."""

    def __init__(self, ctx: TabContext, ui):
        self.ctx, self.studio = ctx, ctx.studio
        self.outputs = [*ui.fields, ui.plan, ui.estimate]

    def summary(self, name, settings: TrainSettings) -> tuple[str, str]:
        """The plan and the VRAM estimate boxes (the Studio's plan: what the API and the trainer count)."""
        try:
            plan = self.studio.training_plan(name or None, settings)
            return plan_html(plan if name else None), vram_html(plan)
        except LoraMakerError as e:
            return error_html(str(e))

    def shown(self, name, settings: TrainSettings) -> list:
        return [*form_values(settings), *self.summary(name, settings)]

    def of_form(self, name, values) -> tuple[str, str]:
        try:
            settings = settings_from(values)
        except LoraMakerError as e:
            return error_html(str(e))
        return self.summary(name, settings)

    def stopped_run_buttons(self, name):
        """Resume and Start over, shown while the project has a stopped run."""
        try:
            stopped = bool(name) and self.studio.can_resume(name)
        except LoraMakerError:  # the project is gone: the picker shows that
            stopped = False
        return gr.Button.update(visible=stopped), gr.Button.update(visible=stopped)


def _wire_form(ctx: TabContext, tab, ui, form: _Form) -> None:
    """The project's settings into the form, and the plan recomputed as the user types."""
    studio, order = ctx.studio, LiveOrder()

    def live(stamp, name, *values):
        with order.lock:
            if order.stale(stamp):
                return gr.update(), gr.update()
            return form.of_form(name, values)

    def where(name) -> str:
        if not name:
            return ""
        folder = html.escape(str(studio.lora_dir(name)))
        return f'<p class="lora-maker-note">LoRA files go to <code>{folder}</code></p>'

    @shows_errors
    def open_project(name):
        settings = studio.training_settings(name) if name else studio.default_training_settings()
        return [*form.shown(name, settings), where(name), *form.stopped_run_buttons(name), "", "", name or ""]

    def reopened(loaded, name, *values):
        """The tab opened: images may have come or gone since. Until the picked project's settings are in
        the form (`loaded` is the project they are from), the values sent are not the project's: nothing."""
        return form.of_form(name, values) if name and loaded == name else (gr.update(), gr.update())

    stamp = gr.Textbox(visible=False, elem_id="lora_maker_train_stamp")
    live_inputs, boxes = [stamp, ctx.project, *ui.fields], [ui.plan, ui.estimate]
    for field in ui.fields:
        # No progress overlay: it would flicker on every keystroke and shift the buttons under the cursor.
        field.input(live, live_inputs, boxes, queue=False, _js=_STAMP_JS, show_progress="hidden")
        if isinstance(field, gr.Number) and hasattr(field, "blur"):  # Gradio 4 (Forge): no blur; input suffices
            field.blur(live, live_inputs, boxes, queue=False, _js=_STAMP_JS, show_progress="hidden")
    # which project's settings the form holds: set with them, so the browser never has one without the other
    loaded = gr.Textbox(visible=False, elem_id="lora_maker_train_loaded")
    opened = [*form.outputs, ui.output, ui.resume, ui.restart, ui.message, ui.preset_note, loaded]
    ctx.project.change(open_project, ctx.project, opened, queue=False, show_progress="minimal")
    ctx.job_event.change(form.stopped_run_buttons, ctx.project, [ui.resume, ui.restart], queue=False)
    tab.select(reopened, [loaded, ctx.project, *ui.fields], boxes, queue=False, show_progress="hidden")


def _wire_buttons(ctx: TabContext, ui, form: _Form) -> None:
    """Presets, load/reset/save, start, resume and start over."""
    studio = ctx.studio

    @shows_errors
    def load_saved(name):
        p = ctx.open(name)
        return [*form.shown(name, studio.training_settings(p.name)),
                _notes([f"Loaded the settings saved in {p.settings_path}"])]

    def reset_form(name):
        return [*form.shown(name, studio.default_training_settings()), _notes(["Defaults restored (not saved yet)"])]

    @shows_errors
    def apply_preset(name, purpose_value, tier_value, optimizer, *values):
        if not purpose_value or not tier_value:
            raise LoraMakerError("pick what the LoRA learns and your GPU's memory, then Apply preset")
        kind = studio.model_kind()
        images = len(ctx.open(name).images()) if name else 0
        applied = presets.apply_preset_with_notes(settings_from(values), purpose_value, TIERS[tier_value],
                                                  kind or SD1, images or None,
                                                  None if optimizer in (None, BY_TIER) else optimizer)
        notes = list(applied.notes)
        if not kind:
            notes.append("No model loaded: the preset is made for an SD1 model")
        if not images:
            notes.append("No images yet: repeats and epochs were left as they were")
        return [*form.shown(name, applied.settings), _notes(notes, "lora-maker-note lora-maker-train-why")]

    @shows_errors
    def fit_memory(name, *values):
        settings = settings_from(values)
        plan = studio.training_plan(name or None, settings)
        if plan.gpu is None:
            raise LoraMakerError("no CUDA GPU is visible to the WebUI: there is no card to fit")
        fix = plan.memory_fix
        if fix is None:
            return [*form.shown(name, settings), _notes(plan.memory_notes[:1] or ["It fits already"])]
        return [*form.shown(name, fix[0]), _notes(["Changed to fit (not saved yet): " + "; ".join(fix[1])])]

    @shows_errors
    def save_settings(name, *values):
        p = ctx.open(name)
        studio.save_training_settings(p.name, settings_from(values))
        return _notes([f"Saved to {p.settings_path}"])

    def run(name, values, with_grid: bool, resume: bool = False, restart: bool = False):
        p = ctx.open(name)
        settings = settings_from(values)
        studio.start_training(p.name, settings, resume=resume, grid=bool(with_grid), restart=restart)
        studio.save_training_settings(p.name, settings)  # the run's settings stay with the project (Resume uses them)
        what = "Resumed the interrupted run" if resume else "Training started"
        hidden = gr.Button.update(visible=False)
        return _notes([f"{what} (settings saved): progress and the loss chart are above"]), hidden, hidden

    @shows_errors
    def start_training(name, with_grid, *values):
        return run(name, values, with_grid)

    @shows_errors
    def resume_training(name, with_grid, *values):
        return run(name, values, with_grid, resume=True)

    @shows_errors
    def restart_training(name, with_grid, *values):
        return run(name, values, with_grid, restart=True)

    # These set every input: a spinner on each would cover the whole form for a moment.
    ui.apply.click(apply_preset, [ctx.project, ui.purpose, ui.tier, ui.preset_optimizer, *ui.fields], [*form.outputs, ui.preset_note],
                   queue=False, show_progress="minimal")
    ui.load.click(load_saved, ctx.project, [*form.outputs, ui.message], queue=False, show_progress="minimal")
    ui.reset.click(reset_form, ctx.project, [*form.outputs, ui.message], queue=False, show_progress="minimal")
    ui.save.click(save_settings, [ctx.project, *ui.fields], ui.message, queue=False)
    ui.fit.click(fit_memory, [ctx.project, *ui.fields], [*form.outputs, ui.message], queue=False,
                 show_progress="minimal")
    run_inputs, run_outputs = [ctx.project, ui.grid, *ui.fields], [ui.message, ui.resume, ui.restart]
    ui.start.click(start_training, run_inputs, run_outputs, queue=False)
    ui.resume.click(resume_training, run_inputs, run_outputs, queue=False)
    ui.restart.click(restart_training, run_inputs, run_outputs, queue=False)
