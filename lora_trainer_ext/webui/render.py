"""Grid cells rendered by the WebUI's own txt2img pipeline, and grids assembled with its own image helpers.

Each cell is one `StableDiffusionProcessingTxt2Img` with the cell's `<lora:NAME-0000NN:w>` tag in its
prompt, so the user sees exactly what txt2img gives them with that file at that weight (webui-host.md
§4). The processing object is built by hand, so `p.scripts` is None: always-on scripts (ADetailer,
ControlNet...) stay out of the grid. The checkpoint loaded when the grid starts is pinned through
`override_settings`: a model picked in the UI meanwhile waits for the queue lock, which the grid job
holds, instead of being loaded between two cells. "Add network to prompt" and "Add hypernetwork to
prompt" are turned off for the cells, and every cell activates its own networks (none for weight 0),
which takes out whatever the user's last prompt merged into the weights.

The renderer runs inside the grid job, which already holds the WebUI's queue lock: nothing here may
take it (it is not re-entrant).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

from PIL import Image, ImageColor

from ..errors import LoraMakerError, Stopped
from ..grids.image import describe
from ..grids.plan import Cell, GridPlan, RenderSettings
from ..grids.renderer import Rendered, number
from .host import networks_module


def forget_cached_conds() -> None:
    """Drop the WebUI's class-level prompt conditioning caches. They are keyed by the prompt text with
    its `<lora:name:w>` tags, not by the files' contents, so a LoRA file rewritten under the same name
    (a new training run's final file, "use this epoch") would otherwise keep the text encoder's old
    conditioning while its UNet part is reloaded (webui-host.md §4.3)."""
    from modules import processing

    processing.StableDiffusionProcessing.cached_c = [None, None]
    processing.StableDiffusionProcessing.cached_uc = [None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None]


# What a layer's merged networks are called once they may be out of date: no prompt names networks so.
_OUT_OF_DATE = (("lora-maker: a file was rewritten", None, None, None),)


def forget_merged_networks() -> None:
    """Have every layer with LoRA weights merged in put its backup back and merge again at its next
    forward. The WebUI merges LoRAs into the weights in place and merges again only when the names and
    multipliers of the networks change (`networks.network_apply_weights`), so a file rewritten under
    the same name, used at the same weight, would keep the old file's weights. Only the layers' mark
    changes here, never the weights or the loaded networks: a generation running meanwhile ("use this
    epoch" does not wait for the queue lock) merges the networks it has again and is not disturbed."""
    from modules import sd_models

    for model in getattr(sd_models.model_data, "loaded_sd_models", ()):  # A1111's list of models in memory
        for module in model.modules():
            if getattr(module, "network_current_names", ()):
                module.network_current_names = _OUT_OF_DATE
    forget_forge_patches(sd_models.model_data.sd_model)


def forget_forge_patches(model) -> None:
    """Forge's counterpart: it patches the weights again only when the networks' file names or weights
    change (`networks.load_networks` compares the model's `current_lora_hash`, each patcher's
    `LoraLoader` its `loaded_hash`), and it keeps the tensors of the last files read in an lru_cache
    keyed by the file name (`networks.load_lora_state_dict`). Clearing these makes the next generation
    read the files and patch again; nothing else changes."""
    load_lora_state_dict = getattr(networks_module(), "load_lora_state_dict", None)
    if load_lora_state_dict is not None:
        load_lora_state_dict.cache_clear()
    objects = getattr(model, "forge_objects", None)
    if objects is None:  # A1111, or Forge before its first generation
        return
    model.current_lora_hash = None
    for patcher in (objects.unet, objects.clip.patcher):
        patcher.lora_loader.loaded_hash = None


def refresh_loras() -> None:
    """LoRA files were written: rescan the Lora folder (the list the API and the cards show), and forget
    what was computed from files of the same names before (merged weights, prompt conditionings)."""
    networks = networks_module()
    if networks is not None:
        networks.list_available_networks()
        forget_merged_networks()
    forget_cached_conds()


class WebuiRenderer:
    """`render.Renderer` (and `render.GridAssembler`) on the WebUI's loaded model."""

    def __init__(self):
        from modules import sd_models, shared

        if networks_module() is None:
            raise LoraMakerError("the WebUI's built-in Lora extension is off: enable it in Extensions to render grids")
        model = shared.sd_model  # loads the selected checkpoint if none is loaded (the job holds the lock)
        info = getattr(model, "sd_checkpoint_info", None)
        if info is None and hasattr(sd_models, "forge_model_reload"):
            # Forge loads its model in process_images (until then shared.sd_model is a stand-in): the
            # selected checkpoint is the one the first cell will load.
            info = sd_models.select_checkpoint()
        if info is None:
            raise LoraMakerError("no Stable Diffusion model is loaded: pick a checkpoint in the WebUI first")
        self.checkpoint = info.title  # pinned for every cell of this grid

    def refresh(self) -> None:
        refresh_loras()

    def render(self, cell: Cell, settings: RenderSettings) -> Rendered:
        from modules import devices, errors, processing, shared

        state = shared.state
        if state.interrupted or state.stopping_generation:
            raise Stopped("the grid was interrupted")
        check_settings(settings)
        p = processing.StableDiffusionProcessingTxt2Img(
            prompt=cell.full_prompt(), negative_prompt=cell.negative, seed=cell.seed,
            sampler_name=settings.sampler, scheduler=settings.scheduler, steps=settings.steps,
            cfg_scale=number(settings.cfg_scale),  # 7, as the tab's slider gives it: "CFG scale: 7" in the infotext
            width=settings.width, height=settings.height, batch_size=1, n_iter=1,
            restore_faces=False, tiling=False,  # the grid shows the LoRA, not the user's global post-processing
            do_not_save_samples=True, do_not_save_grid=True,  # grids/render.py saves the cells and the grid
            override_settings=self._pinned_settings(),
        )
        p.scripts = None  # the default for a hand-built p, and the point: no always-on scripts in grid cells
        with contextlib.closing(p):
            try:
                processed = processing.process_images(p)
            except devices.NansException as e:
                # A broken cell (an overcooked epoch can make NaNs) is shown black, which scoring flags,
                # instead of failing the whole grid.
                errors.report(f"LoRA Maker: {cell.full_prompt()} (seed {cell.seed}): {e}")
                infotext = processing.create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds, index=0)
                return Rendered(Image.new("RGB", (settings.width, settings.height)), infotext)
            if state.interrupted or not processed.images:  # sampling was cut short: the image is unfinished
                raise Stopped("the grid was interrupted")
            if cell.weight and cell.epoch.lora not in {net.name for net in networks_module().loaded_networks}:
                raise LoraMakerError(f"the WebUI could not load the LoRA {cell.epoch.lora} ({cell.epoch.path}); "
                                     "its console says why")
            return Rendered(processed.images[0], self._infotext(p, processed.infotexts[0], cell))

    def _pinned_settings(self) -> dict:
        from modules import shared

        pinned = {"sd_model_checkpoint": self.checkpoint}
        for key in ("sd_lora", "sd_hypernetwork"):  # "Add network / hypernetwork to prompt"
            if shared.opts.data.get(key, "None") not in ("", "None"):
                pinned[key] = "None"  # set, so in opts.data: process_images restores it afterwards
        return pinned

    @staticmethod
    def _infotext(p, infotext: str, cell: Cell) -> str:
        """The WebUI's infotext with the cell's `<lora:...>` tag put back into the prompt: with no scripts
        to restore `p.prompts`, the WebUI writes the prompt as parsed, with extra networks taken out."""
        from modules import processing

        parsed = p.prompts[0]
        if infotext.startswith(parsed):
            return cell.full_prompt() + infotext[len(parsed):]
        return processing.create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds, index=0)

    # ---- the grid image, as the X/Y/Z plot draws it ----

    def assemble_grid(self, plan: GridPlan, layer: int,
                      image_of: Callable[[Cell], Image.Image | None]) -> tuple[Image.Image, dict]:
        """One layer's grid with `images.image_grid` and `images.draw_grid_annotations`: weights over the
        columns, epochs beside the rows, the layer's label on top (as the X/Y/Z plot labels its Z axis).
        Cells not rendered (after an interrupt) are left in the grid's background colour."""
        from modules import images, shared

        _, rows, cols = plan.shape
        cells = [c for c in plan.cells() if c.layer == layer]
        found = [image_of(c) for c in cells]
        first = next(im for im in found if im is not None)  # grids/render.py assembles layers with an image only
        width, height = first.size
        blank = Image.new("RGB", (width, height), ImageColor.getcolor(shared.opts.grid_background_color, "RGB"))
        grid = images.image_grid([im if im is not None else blank for im in found], rows=rows)
        grid = images.draw_grid_annotations(grid, width, height,
                                            [[images.GridAnnotation(label)] for label in plan.col_labels()],
                                            [[images.GridAnnotation(label)] for label in plan.row_labels()])
        # The helpers return no geometry: the labels' margins are what the image grew by.
        left, top = grid.width - cols * width, grid.height - rows * height
        titled = images.draw_grid_annotations(grid, grid.width, grid.height,
                                              [[images.GridAnnotation(plan.layers[layer][0])]], [[images.GridAnnotation()]])
        layout = AnnotatedLayout(rows, cols, width, height, left, top + titled.height - grid.height)
        return titled, describe(plan, layer, layout)


@dataclass(frozen=True)
class AnnotatedLayout:
    """Where `draw_grid_annotations` put the cells (what `grid_image.describe` records for clicks)."""

    rows: int
    cols: int
    cell_w: int
    cell_h: int
    left: int
    top: int

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        x, y = self.left + col * self.cell_w, self.top + row * self.cell_h
        return x, y, x + self.cell_w, y + self.cell_h


def check_settings(settings: RenderSettings) -> None:
    """Refuse a sampler or schedule type the WebUI lacks (it would silently use its first sampler)."""
    from modules import sd_samplers, sd_schedulers

    if settings.sampler not in sd_samplers.all_samplers_map and settings.sampler.lower() not in sd_samplers.samplers_map:
        names = ", ".join(sd_samplers.visible_sampler_names())
        raise LoraMakerError(f"the WebUI has no sampler {settings.sampler!r}: choose one of {names}")
    if settings.scheduler not in sd_schedulers.schedulers_map:
        labels = ", ".join(s.label for s in sd_schedulers.schedulers)
        raise LoraMakerError(f"the WebUI has no schedule type {settings.scheduler!r}: choose one of {labels}")


@contextlib.contextmanager
def open_renderer() -> Iterator[WebuiRenderer]:
    """`Studio.open_renderer` inside the WebUI: a renderer on the model loaded now, memory freed after."""
    from modules import devices

    try:
        yield WebuiRenderer()
    finally:
        devices.torch_gc()


# ---- the txt2img tab's defaults ----

# RenderSettings field -> the key of the txt2img control in ui-config.json, as `ui_loadsave.UiLoadsave`
# names it ("<tab>/<label>/value", behind "customscript/<file>/" for a script's controls: the sampler
# row is the built-in script modules/processing_scripts/sampler.py).
UI_CONFIG_KEYS = {
    "sampler": "customscript/sampler.py/txt2img/Sampling method/value",
    "scheduler": "customscript/sampler.py/txt2img/Schedule type/value",
    "steps": "customscript/sampler.py/txt2img/Sampling steps/value",
    "cfg_scale": "txt2img/CFG Scale/value",
    "width": "txt2img/Width/value",
    "height": "txt2img/Height/value",
    "negative": "txt2img/Negative prompt/value",
}


def webui_render_defaults() -> RenderSettings:
    """What the txt2img tab starts with: the values saved in the WebUI's ui-config.json (Settings >
    Defaults), else its controls' own defaults (the first visible sampler, Automatic, 20 steps, CFG 7,
    512x512). As the WebUI does, a saved sampler or schedule that is not among the choices is ignored."""
    from modules import sd_samplers, sd_schedulers, shared, ui_loadsave

    saved = ui_loadsave.UiLoadsave(shared.cmd_opts.ui_config_file).ui_settings
    samplers = sd_samplers.visible_sampler_names()
    schedulers = [s.label for s in sd_schedulers.schedulers]
    builtin = RenderSettings(sampler=samplers[0] if samplers else RenderSettings.sampler, scheduler=schedulers[0],
                             steps=20, cfg_scale=7.0, width=512, height=512)
    choices = {"sampler": samplers, "scheduler": schedulers}
    values = {}
    for field, key in UI_CONFIG_KEYS.items():
        value = saved.get(key)
        if value is None or (field in choices and value not in choices[field]):
            continue
        try:
            values[field] = type(getattr(builtin, field))(value)
        except (TypeError, ValueError):
            continue  # not a number: the control's default, as the WebUI's Number controls do
    return RenderSettings(**{**vars(builtin), **values})
