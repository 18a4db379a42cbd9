"""What renders one grid cell, and the text that travels with each image.

A renderer turns a `grid_plan.Cell` into a picture plus its infotext: the WebUI's generation-parameters
text that its PNG Info tab and "send to txt2img" parse (`infotext_utils.parse_generation_parameters`).
The WebUI renderer (lora_trainer_ext/webui/) gets that text from the WebUI itself; the standalone
renderer (hosts/standalone_render.py) writes it with `format_infotext`, in the WebUI's own layout, so a
headless grid's cell can be pasted into txt2img all the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Protocol

if TYPE_CHECKING:
    from PIL import Image

    from .plan import Cell, GridPlan, RenderSettings


@dataclass
class Rendered:
    image: Image.Image
    infotext: str  # the WebUI's infotext (what "send to txt2img" parses)


class Renderer(Protocol):
    def render(self, cell: Cell, settings: RenderSettings) -> Rendered:
        """The cell's image at its weight (weight 0: the model alone), with `settings` and the cell's seed.
        Raises `net.Stopped` when the user interrupts it mid-image (the grid keeps what was done)."""

    def refresh(self) -> None:
        """LoRA files were written or rewritten on disk: look them up again (the WebUI's Lora list)."""


class GridAssembler(Protocol):
    """Optional beside `Renderer`: a renderer that has `assemble_grid` lays out the grid images itself,
    with its host's own helpers (the WebUI's `images.image_grid` and `draw_grid_annotations`); without
    it render.py uses image.py."""

    def assemble_grid(self, plan: GridPlan, layer: int,
                      image_of: Callable[[Cell], Image.Image | None]) -> tuple[Image.Image, dict]:
        """Layer `layer`'s labelled grid image (`image_of(cell)`: the cell's image, None if not rendered)
        and its description (`grid_image.describe`'s keys; `cell_boxes` map clicks: `grid_image.cell_in`)."""


def quote(value) -> str:
    """A parameter value as the WebUI writes it (`infotext_utils.quote`): JSON-quoted when it holds a
    comma, a colon or a newline, which would otherwise end the field."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def number(value: float) -> int | float:
    """7.0 -> 7: the WebUI's sliders hand integral values over as ints, so its infotexts say "CFG scale: 7"."""
    value = float(value)
    return int(value) if value.is_integer() else value


def lora_hash_name(name: str) -> str:
    """The LoRA's name as the WebUI's "Lora hashes" field writes it (`,` and `:` removed)."""
    return name.replace(",", "").replace(":", "")


def format_infotext(cell: Cell, settings: RenderSettings, model_name: str, model_hash: str, *,
                    schedule: str | None = None, lora_hash: str = "", clip_skip: int = 1,
                    extra: Mapping[str, object] | None = None, version: str | None = None) -> str:
    """The infotext of `cell` in the layout of the WebUI's `processing.create_infotext`:

        <prompt with the <lora:...> tag>
        Negative prompt: <negative>                       (only when there is one)
        Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x512,
        Model hash: <10 hex>, Model: <checkpoint stem>, Clip skip: 2, <extra...>,
        Lora hashes: "<lora>: <12 hex>", Version: <version>

    `model_name` is the checkpoint's name without extension, `model_hash` its short sha256 (10 hex
    digits); empty ones are left out. `schedule` is the schedule actually used: the WebUI writes the
    sampler's own one when the setting is "Automatic" (Karras for DPM++ 2M); default: the setting.
    `lora_hash` (the file's `sshs_model_hash`, first 12 digits) is written for a cell with a LoRA.
    `extra` fields (e.g. {"RNG": "CPU"}) go where the WebUI puts its own extra parameters."""
    fields: dict[str, object] = {
        "Steps": settings.steps,
        "Sampler": settings.sampler,
        "Schedule type": schedule or settings.scheduler,
        "CFG scale": number(settings.cfg_scale),
        "Seed": cell.seed,
        "Size": f"{settings.width}x{settings.height}",
        "Model hash": model_hash or None,
        "Model": model_name or None,
        "Clip skip": clip_skip if clip_skip > 1 else None,
        **(extra or {}),
        "Lora hashes": f"{lora_hash_name(cell.epoch.lora)}: {lora_hash}" if cell.weight and lora_hash else None,
        "Version": version,
    }
    params = ", ".join(f"{key}: {quote(value)}" for key, value in fields.items() if value is not None)
    negative = f"\nNegative prompt: {cell.negative}" if cell.negative else ""
    return f"{cell.full_prompt()}{negative}\n{params}".strip()
