"""The Test sub-tab: render an epoch x weight grid of the project's saved LoRAs, look at it, click a
cell for its image and generation parameters (send them to txt2img inside the WebUI, copy them
anywhere), read the scores and the recommendation, and make the chosen epoch and weight the final
LoRA ("Use this epoch").

The grid view follows the project picker and the job panel: a finished job (a grid, or a training run
that rendered its grid) shows the newest grid. The grid picker and the layer radio listen to `input`
(user choices only); every handler that changes the grid returns the whole view itself.
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from ..errors import LoraMakerError
from ..grids.plan import (
    DEFAULT_WEIGHTS,
    RenderSettings,
    default_prompts,
    format_weight,
    parse_ints,
    parse_weights,
    saved_epochs,
)
from .context import TabContext, shows_errors
from .evaluate_view import (
    SCORE_HEADERS,
    SCORE_TYPES,
    cell_html,
    cell_image,
    clicked_cell,
    files_html,
    grid_id,
    grid_labels,
    grid_preview,
    layer_index,
    layer_labels,
    open_grid,
    recommendation_html,
    recommended_cell,
    saved_html,
    score_rows,
)

EPOCH_MODES = {"all": "all", "every k-th": "every", "chosen": "chosen"}
# WebUI 1.10.1's samplers and schedule types (the standalone renderer draws Euler and DPM++ 2M).
SAMPLERS = ["DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a",
            "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "DDIM", "DDIM CFG++",
            "PLMS", "UniPC", "LCM"]
SCHEDULERS = ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
              "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"]
# Copies the parameters; outside a secure context (the WebUI over plain http) through a selection.
_COPY_JS = """(text) => {
    if (navigator.clipboard && window.isSecureContext) { navigator.clipboard.writeText(text); return []; }
    const box = gradioApp().querySelector('#lora_maker_test_infotext textarea');
    if (box) { box.select(); document.execCommand('copy'); }
    return [];
}"""


def _with(choices: list[str], value: str) -> list[str]:
    return choices if value in choices else [value, *choices]


def extra_prompts(text: str, first: int) -> list[tuple[str, str]]:
    """More prompts, one per line, labelled "prompt 3", "prompt 4"... after the first `first - 1`."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return [(f"prompt {first + i}", line) for i, line in enumerate(lines)]


def build(ctx: TabContext, tab) -> None:
    defaults = (ctx.studio.render_defaults() if ctx.studio.render_defaults else None) or RenderSettings()
    ui = SimpleNamespace()
    _settings_layout(ui, defaults, not ctx.studio.host_problem())
    _results_layout(ui, ctx.studio)
    view = _View(ctx)
    _wire_browsing(ctx, tab, ui, view)
    _wire_cells(ctx, ui, view)
    _wire_rendering(ctx, ui, defaults)


def _settings_layout(ui, defaults: RenderSettings, can_render: bool) -> None:
    with gr.Accordion("Grid settings", open=True, elem_id="lora_maker_test_settings"):
        with gr.Row():
            ui.mode = gr.Radio(list(EPOCH_MODES), value="all", label="Epochs", elem_id="lora_maker_test_epoch_mode",
                               scale=2)
            ui.every = gr.Number(2, precision=0, minimum=1, label="Every k-th epoch (the last is always in)",
                                 visible=False, elem_id="lora_maker_test_every", scale=1)
            ui.chosen = gr.CheckboxGroup([], label="Epochs to compare", visible=False,
                                         elem_id="lora_maker_test_chosen", scale=2)
            ui.weights = gr.Textbox(", ".join(format_weight(w) for w in DEFAULT_WEIGHTS), lines=1,
                                    label="Weights (0 = the no-LoRA baseline column)",
                                    elem_id="lora_maker_test_weights", scale=2)
        ui.saved = gr.HTML(elem_id="lora_maker_test_saved")
        with gr.Row():
            ui.main = gr.Textbox(lines=2, label="Main prompt (activation tag + the dataset's frequent tags)",
                                 elem_id="lora_maker_test_main")
            ui.flexibility = gr.Textbox(lines=2, label="Flexibility prompt (asks for what the dataset lacks)",
                                        elem_id="lora_maker_test_flexibility")
        with gr.Row():
            ui.extra = gr.Textbox(lines=2, label="More prompts, one per line (one grid each)",
                                  elem_id="lora_maker_test_extra")
            ui.seeds = gr.Textbox(str(defaults.seed), lines=1, label="Seeds (several: one grid per prompt and seed)",
                                  elem_id="lora_maker_test_seeds")
        ui.negative = gr.Textbox(defaults.negative, lines=1, label="Negative prompt", elem_id="lora_maker_test_negative")
        with gr.Row():
            ui.sampler = gr.Dropdown(_with(SAMPLERS, defaults.sampler), value=defaults.sampler, label="Sampler",
                                     allow_custom_value=True, elem_id="lora_maker_test_sampler")
            ui.scheduler = gr.Dropdown(_with(SCHEDULERS, defaults.scheduler), value=defaults.scheduler,
                                       label="Schedule type", allow_custom_value=True,
                                       elem_id="lora_maker_test_scheduler")
            ui.steps = gr.Number(defaults.steps, precision=0, label="Steps", elem_id="lora_maker_test_steps",
                                 min_width=80)
            ui.cfg = gr.Number(defaults.cfg_scale, label="CFG scale", elem_id="lora_maker_test_cfg", min_width=80)
            ui.width = gr.Number(defaults.width, precision=0, label="Width", elem_id="lora_maker_test_width",
                                 min_width=80)
            ui.height = gr.Number(defaults.height, precision=0, label="Height", elem_id="lora_maker_test_height",
                                  min_width=80)
        with gr.Row(elem_id="lora_maker_test_render_row"):
            ui.start = gr.Button("Render grid", variant="primary", elem_id="lora_maker_test_render", scale=0,
                                 min_width=160, interactive=can_render)
            ui.reset_prompts = gr.Button("Default prompts", size="sm", elem_id="lora_maker_test_default_prompts",
                                         scale=0, min_width=140)
            ui.message = gr.HTML(elem_id="lora_maker_test_message")


def _results_layout(ui, studio) -> None:
    with gr.Row(elem_id="lora_maker_test_picker_row"):
        ui.picker = gr.Dropdown([], label="Grid", elem_id="lora_maker_test_grid_pick", scale=3)
        ui.layer = gr.Radio([], label="Prompt / seed", visible=False, elem_id="lora_maker_test_layer", scale=2)
        ui.refresh = gr.Button("\U0001f504", elem_id="lora_maker_test_refresh", elem_classes="tool", scale=0,
                               min_width=40)
    ui.note = gr.HTML(elem_id="lora_maker_test_note")
    with gr.Column(visible=False, elem_id="lora_maker_test_results") as ui.results:  # shown once there is a grid
        with gr.Row(elem_id="lora_maker_test_advice_row"):
            ui.advice = gr.HTML(elem_id="lora_maker_test_recommendation")
            ui.pick_best = gr.Button("Show the recommended cell", visible=False, size="sm", scale=0, min_width=240,
                                     elem_id="lora_maker_test_pick_recommended")
        with gr.Row(equal_height=False, elem_id="lora_maker_test_view"):
            with gr.Column(scale=3, elem_id="lora_maker_test_grid_column"):
                ui.grid = gr.Image(type="filepath", interactive=False, show_label=False, elem_id="lora_maker_test_grid")
            with gr.Column(scale=2, min_width=320, elem_id="lora_maker_test_cell_column"):
                _cell_layout(ui, studio)
        ui.table = gr.Dataframe(headers=SCORE_HEADERS, datatype=SCORE_TYPES, interactive=False, height=360,
                                label="Scores of the cells with the LoRA, best first (click a header to sort)",
                                elem_id="lora_maker_test_scores")
    with gr.Accordion("Saved LoRA files", open=False, elem_id="lora_maker_test_files_box"):
        ui.files = gr.HTML(elem_id="lora_maker_test_files")
    ui.picked = gr.State(None)  # the clicked cell: {epoch, weight}


def _cell_layout(ui, studio) -> None:
    ui.cell = gr.Image(type="filepath", interactive=False, label="Clicked cell", height=280,
                       elem_id="lora_maker_test_cell")
    ui.info = gr.HTML(elem_id="lora_maker_test_cell_info")
    ui.infotext = gr.Textbox(lines=4, max_lines=8, interactive=False, label="Generation parameters",
                             elem_id="lora_maker_test_infotext")
    with gr.Row():
        if studio.paste_to_txt2img is not None:
            send = gr.Button("Send to txt2img", elem_id="lora_maker_test_send", min_width=120)
            studio.paste_to_txt2img(send, ui.infotext)
        ui.copy = gr.Button("Copy parameters", elem_id="lora_maker_test_copy", min_width=120)
        ui.use = gr.Button("Use this epoch", variant="primary", elem_id="lora_maker_test_use", min_width=120)
    ui.used = gr.HTML(elem_id="lora_maker_test_used")


class _View:
    """What the view shows, as the lists of updates the handlers return."""

    NO_CELL = [None, "", "", None, ""]  # cell, info, infotext, picked, used

    def __init__(self, ctx: TabContext):
        self.ctx, self.studio = ctx, ctx.studio

    def epochs(self, name, checked=()):
        """The saved epochs: the checkbox choices (the checked ones kept, else the last), the note, the
        files list."""
        folder = self.studio.lora_dir(name)
        numbers = [str(e.number) for e in saved_epochs(folder, name)]
        kept = [c for c in checked or () if c in numbers] or numbers[-1:]
        return (gr.CheckboxGroup.update(choices=numbers, value=kept), saved_html(numbers, folder),
                files_html(self.studio.saved_loras(name), folder))

    def grid(self, name, label=None, layer_label=None):
        """The grid picker, layer radio, image, note, table, recommendation, its button and the results
        area: grid `label` (one no longer listed: the newest) at layer `layer_label` (else the first)."""
        project = self.ctx.open(name)
        labels = grid_labels(project)
        if not labels:
            empty = '<p class="lora-maker-note">No grid yet: render one with the settings above.</p>'
            return [gr.Dropdown.update(choices=[], value=None), gr.Radio.update(choices=[], value=None, visible=False),
                    None, empty, {"headers": SCORE_HEADERS, "data": []}, "", gr.Button.update(visible=False),
                    gr.update(visible=False)]
        ids = [grid_id(x) for x in labels]
        label = labels[ids.index(grid_id(label))] if grid_id(label) in ids else labels[0]
        data = open_grid(project, label)
        layers = layer_labels(data)
        index = layer_index(data, layer_label)
        image = grid_preview(project, data, index)
        note = ('<p class="lora-maker-note">Click a cell to see its image and generation parameters.</p>'
                if image else '<p class="lora-maker-note">This grid was stopped before its first image.</p>')
        return [gr.Dropdown.update(choices=labels, value=label),
                gr.Radio.update(choices=layers, value=layers[index] if layers else None, visible=len(layers) > 1),
                str(image) if image else None, note, {"headers": SCORE_HEADERS, "data": score_rows(data)},
                recommendation_html(data), gr.Button.update(visible=recommended_cell(data) is not None),
                gr.update(visible=True)]

    def cell(self, data, found):
        if found is None:
            return self.NO_CELL
        return [str(cell_image(data, found)), cell_html(found), found.get("infotext") or "",
                {"epoch": found["epoch"], "weight": found["weight"]}, ""]


def _wire_browsing(ctx: TabContext, tab, ui, view: _View) -> None:
    """The project, the job panel and the grid picker drive what is shown."""

    @shows_errors
    def open_project(name):
        if not name:
            return [gr.update()] * 3 + ["", "", ""] + [gr.update()] * 8 + view.NO_CELL
        main_prompt, flexible, _, _ = default_prompts(ctx.open(name))
        return [*view.epochs(name), main_prompt, flexible, ""] + view.grid(name) + view.NO_CELL

    @shows_errors
    def fill_prompts(name, main_prompt):
        """The default prompts while the main one is empty: the dataset may have been captioned since the
        project was opened (the flexibility prompt depends on the captions too)."""
        if not name or main_prompt.strip():
            return gr.update(), gr.update()
        main_default, flexible_default, _, _ = default_prompts(ctx.open(name))
        return main_default, flexible_default

    @shows_errors
    def job_changed(name, event, checked):
        if not name:
            return [gr.update()] * 16
        if (event or "").endswith(":running"):
            return [*view.epochs(name, checked)] + [gr.update()] * 13
        return [*view.epochs(name, checked)] + view.grid(name) + view.NO_CELL  # a finished job: the newest grid

    @shows_errors
    def refreshed(name, checked, label, layer_label):
        return [*view.epochs(ctx.open(name).name, checked)] + view.grid(name, label, layer_label)

    @shows_errors
    def pick_grid(name, label):
        return view.grid(name, label) + view.NO_CELL

    @shows_errors
    def pick_layer(name, label, layer_label):
        project = ctx.open(name)
        data = open_grid(project, label)
        image = grid_preview(project, data, layer_index(data, layer_label))
        return str(image) if image else None

    epochs_out = [ui.chosen, ui.saved, ui.files]
    shown = [ui.picker, ui.layer, ui.grid, ui.note, ui.table, ui.advice, ui.pick_best, ui.results]
    cell_out = [ui.cell, ui.info, ui.infotext, ui.picked, ui.used]
    tab.select(fill_prompts, [ctx.project, ui.main], [ui.main, ui.flexibility], queue=False)
    ctx.project.change(open_project, ctx.project, [*epochs_out, ui.main, ui.flexibility, ui.message, *shown,
                                                   *cell_out], queue=False)
    ctx.job_event.change(job_changed, [ctx.project, ctx.job_event, ui.chosen], [*epochs_out, *shown, *cell_out],
                         queue=False)
    ui.refresh.click(refreshed, [ctx.project, ui.chosen, ui.picker, ui.layer], [*epochs_out, *shown], queue=False)
    ui.picker.input(pick_grid, [ctx.project, ui.picker], [*shown, *cell_out], queue=False)
    ui.layer.input(pick_layer, [ctx.project, ui.picker, ui.layer], ui.grid, queue=False)


def _wire_cells(ctx: TabContext, ui, view: _View) -> None:
    """A clicked (or the recommended) cell, its parameters, and making its epoch the final LoRA."""

    @shows_errors
    def click_cell(name, label, layer_label, evt: gr.SelectData):
        data = open_grid(ctx.open(name), label)
        x, y = evt.index
        return view.cell(data, clicked_cell(data, layer_index(data, layer_label), x, y))

    @shows_errors
    def show_recommended(name, label):
        data = open_grid(ctx.open(name), label)
        found = recommended_cell(data)
        if found is None:
            raise LoraMakerError("this grid has no recommendation: render a grid with LoRA weights above 0")
        return view.cell(data, found)

    @shows_errors
    def use_picked(name, choice):
        project = ctx.open(name)
        if not choice:
            raise LoraMakerError("click a cell of the grid first, then Use this epoch")
        ctx.studio.use_epoch(project.name, int(choice["epoch"]), float(choice["weight"]))
        return (f'<p class="lora-maker-note">{project.name}.safetensors is now epoch {choice["epoch"]}, with '
                f'preferred weight {format_weight(choice["weight"])} on its Lora card.</p>')

    cell_out = [ui.cell, ui.info, ui.infotext, ui.picked, ui.used]
    ui.grid.select(click_cell, [ctx.project, ui.picker, ui.layer], cell_out, queue=False)
    ui.pick_best.click(show_recommended, [ctx.project, ui.picker], cell_out, queue=False)
    ui.use.click(use_picked, [ctx.project, ui.picked], ui.used, queue=False).success(
        view.epochs, [ctx.project, ui.chosen], [ui.chosen, ui.saved, ui.files], queue=False)
    ui.copy.click(None, ui.infotext, None, _js=_COPY_JS)


def _wire_rendering(ctx: TabContext, ui, defaults: RenderSettings) -> None:
    """The grid settings and Render grid."""
    studio = ctx.studio

    @shows_errors
    def start_grid(name, mode_label, k, chosen_epochs, weights_text, main_prompt, flexible, more, seeds_text,
                   negative_prompt, sampler_name, scheduler_name, steps_n, cfg_scale, width_px, height_px):
        project = ctx.open(name)
        prompts = [(label, text.strip()) for label, text in (("main", main_prompt), ("flexibility", flexible))
                   if (text or "").strip()]
        prompts += extra_prompts(more, len(prompts) + 1)
        seed_list = parse_ints(seeds_text, "seeds") if (seeds_text or "").strip() else []
        settings = RenderSettings(sampler=(sampler_name or "").strip(), scheduler=(scheduler_name or "").strip(),
                                  steps=int(steps_n or 0), cfg_scale=float(cfg_scale or 0), width=int(width_px or 0),
                                  height=int(height_px or 0), seed=seed_list[0] if seed_list else defaults.seed)
        plan = studio.grid_plan(project.name, prompts, mode=EPOCH_MODES.get(mode_label, "all"), k=int(k or 0),
                                chosen=[int(c) for c in chosen_epochs or []], weights=parse_weights(weights_text),
                                seeds=seed_list, negative=(negative_prompt or "").strip(), settings=settings)
        studio.start_grid(project.name, plan)
        layers, rows, cols = plan.shape
        return (f'<p class="lora-maker-note">Rendering {plan.render_count()} images: {rows} epochs x {cols} weights'
                f'{f" x {layers} prompts/seeds" if layers > 1 else ""}. Progress is above; the grid shows below '
                "when it is done.</p>")

    @shows_errors
    def prompts_of(name):
        main_prompt, flexible, _, _ = default_prompts(ctx.open(name))
        return main_prompt, flexible

    ui.mode.change(lambda m: (gr.Number.update(visible=m == "every k-th"),
                              gr.CheckboxGroup.update(visible=m == "chosen")), ui.mode, [ui.every, ui.chosen],
                   queue=False)
    ui.reset_prompts.click(prompts_of, ctx.project, [ui.main, ui.flexibility], queue=False)
    ui.start.click(start_grid, [ctx.project, ui.mode, ui.every, ui.chosen, ui.weights, ui.main, ui.flexibility,
                                ui.extra, ui.seeds, ui.negative, ui.sampler, ui.scheduler, ui.steps, ui.cfg, ui.width,
                                ui.height], ui.message, queue=False)
