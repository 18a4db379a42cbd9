"""An epoch x weight grid from plan to saved, scored result: what the tab, the API and the CLI run.

    <project>/grids/<YYYYmmdd-HHMMSS>/
        grid.json          the plan, every cell (file, infotext, scores), the recommendation
        grid-<layer>.png   one labelled grid image per layer (prompt or seed), infotext in "parameters"
        cells/*.png        every rendered image, infotext in "parameters" (PNG Info / send to txt2img)

Each distinct cell (`Cell.key()`) is rendered once: the no-LoRA column is one image per layer, shared
by every row. A stop request is honoured between images (and inside one, by a renderer that raises
`net.Stopped`); what was rendered by then is kept, and the grids show the rest as blank cells.
"""

from __future__ import annotations

import datetime
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .. import files
from ..dataset.captions import split_tags, tag_key
from ..dataset.curate import activation_tags, load_captions
from ..errors import LoraMakerError, Stopped
from ..hosts.host import SD1, SD2, SDXL
from ..progress import Progress
from ..project import Project
from ..training import lora_file
from . import image as grid_image
from . import scoring
from .plan import Cell, GridPlan, core_tags, format_weight, saved_epochs
from .recommend import recommend
from .renderer import Renderer

GRID_FILE = "grid.json"
CELLS = "cells"
FORMAT_VERSION = 1


def grids_dir(project: Project) -> Path:
    return project.path / "grids"


@dataclass
class GridResult:
    """What `render_grid` made; shaped as a job result (`files`, `stopped`, `summary()`)."""

    folder: Path
    files: list[Path] = field(default_factory=list)
    stopped: bool = False
    rendered: int = 0  # distinct images rendered
    total: int = 0  # distinct images the plan asks for
    recommendation: dict | None = None
    # seconds per phase: render (the renderer's calls), save (cell PNGs), score, assemble (grid
    # images, saved), write (grid.json); `cell_seconds`: each render call
    timings: dict[str, float] = field(default_factory=dict)
    cell_seconds: list[float] = field(default_factory=list)

    def summary(self) -> str:
        done = f"{self.rendered} of {self.total} images" if self.stopped else f"{self.rendered} images"
        head = f"grid {'stopped after' if self.stopped else 'rendered:'} {done} in {self.folder.name}"
        text = (self.recommendation or {}).get("text")
        return f"{head}; {text}" if text else head


def cell_file(cell: Cell) -> str:
    """The cell's image file name, the same for cells with equal keys of one layer."""
    if not cell.weight:
        return f"{cell.layer:02d}-no-lora.png"
    return f"{cell.layer:02d}-{cell.epoch.lora}-w{format_weight(cell.weight)}.png"


def png_bytes(image: Image.Image, infotext: str) -> bytes:
    """The image as PNG with the infotext in the "parameters" chunk, as the WebUI saves its images."""
    info = PngInfo()
    info.add_text(grid_image.INFOTEXT_CHUNK, infotext)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def new_grid_folder(project: Project) -> Path:
    """A free `<project>/grids/<timestamp>` path (suffixed -2, -3... within the same second); it is
    made by the first file saved, so a grid that fails at its first image leaves nothing behind."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return files.free_path(grids_dir(project) / stamp)


def absent_tags(project: Project, prompt: str) -> list[str]:
    """The prompt's tags that no caption of the dataset carries: what a flexibility prompt asks of the
    LoRA beyond its training pictures (the activation tag and the dataset's own tags are not asked)."""
    present = {tag_key(t) for tags in load_captions(project).values() for t in tags}
    present |= {tag_key(t) for t in activation_tags(project)}
    return [t for t in split_tags(prompt) if tag_key(t) not in present]


def render_grid(project: Project, plan: GridPlan, renderer: Renderer, *, tagger=None,
                core: Sequence[str] | None = None, requested: Mapping[int, Sequence[str]] | None = None,
                progress: Progress | None = None, out_dir: Path | None = None) -> GridResult:
    """Render, save, score and recommend `plan` into `out_dir` (default: a new timestamped folder
    under `<project>/grids/`).

    `tagger` (a `tagger.Tagger`) scores likeness on the `core` tags (default: `grid_plan.core_tags`)
    and flexibility on each layer's `requested` tags (default: the layer prompt's tags that the
    dataset lacks, `absent_tags`); without a tagger only overcooking is scored."""
    plan.check()
    progress = progress or Progress()
    folder = Path(out_dir) if out_dir else new_grid_folder(project)
    cells = plan.cells()
    distinct = list(dict.fromkeys(cell.key() for cell in cells))
    result = GridResult(folder, total=len(distinct))
    timings = {phase: 0.0 for phase in ("render", "save", "score", "assemble", "write")}
    images: dict[tuple, Image.Image] = {}
    entries: dict[tuple, dict] = {}

    renderer.refresh()  # epochs saved since the last grid
    with progress.task("rendering grid", total=len(distinct), unit="img") as task:
        for cell in cells:
            key = cell.key()
            if key in images:
                continue
            if progress.should_stop():
                result.stopped = True
                break
            start = time.perf_counter()
            try:
                rendered = renderer.render(cell, plan.settings)
            except Stopped:  # interrupted inside an image (the WebUI's Interrupt button)
                result.stopped = True
                break
            seconds = time.perf_counter() - start
            result.cell_seconds.append(seconds)
            timings["render"] += seconds
            start = time.perf_counter()
            path = folder / CELLS / cell_file(cell)
            files.write_bytes(path, png_bytes(rendered.image, rendered.infotext))
            timings["save"] += time.perf_counter() - start
            images[key] = rendered.image
            entries[key] = {"file": f"{CELLS}/{path.name}", "infotext": rendered.infotext}
            result.files.append(path)
            task.advance(1, note=f"epoch {cell.epoch.number}, weight {format_weight(cell.weight)}")
    result.rendered = len(images)

    start = time.perf_counter()
    scores = score(project, plan, cells, images, tagger, core, requested)
    timings["score"] += time.perf_counter() - start

    start = time.perf_counter()
    grids = []
    for layer, (label, _, _) in enumerate(plan.layers):
        first = next((c for c in cells if c.layer == layer and c.key() in entries), None)
        if first is None:
            continue  # stopped before this layer had any image
        image, description = assemble_layer(renderer, plan, layer, lambda c: images.get(c.key()))
        path = grid_image.save_grid(folder / f"grid-{layer:02d}.png", image, entries[first.key()]["infotext"],
                                    description)
        grids.append({"layer": layer, "label": label, "file": path.name, "size": list(image.size)})
        result.files.append(path)
    timings["assemble"] += time.perf_counter() - start

    start = time.perf_counter()
    result.recommendation = recommendation(plan, scores)
    data = _grid_json(project, plan, cells, entries, grids, scores, result)
    files.write_json(folder / GRID_FILE, data)
    timings["write"] += time.perf_counter() - start
    result.files.append(folder / GRID_FILE)
    result.timings = timings
    return result


def _grid_json(project: Project, plan: GridPlan, cells: list, entries: dict, grids: list, scores: list,
               result: GridResult) -> dict:
    """What grid.json holds: the plan, every cell with its file, infotext and score, the recommendation."""
    by_cell = {(s.layer, s.row, s.col): s.to_dict() for s in scores}
    return {
        "version": FORMAT_VERSION,
        "project": project.name,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "stopped": result.stopped,
        "rendered": result.rendered,
        "total": result.total,
        "plan": plan.to_dict(),
        "row_labels": plan.row_labels(),
        "col_labels": plan.col_labels(),
        "grids": grids,
        "cells": [
            {"layer": c.layer, "row": c.row, "col": c.col, "epoch": c.epoch.number, "lora": c.epoch.lora,
             "weight": c.weight, "prompt": c.full_prompt(), "negative": c.negative, "seed": c.seed,
             **entries.get(c.key(), {"file": None, "infotext": None}),
             "score": by_cell.get((c.layer, c.row, c.col))}
            for c in cells
        ],
        "recommendation": result.recommendation,
    }


def assemble_layer(renderer: Renderer, plan: GridPlan, layer: int,
                   image_of: Callable[[Cell], Image.Image | None]) -> tuple[Image.Image, dict]:
    """One layer's labelled grid image and its description: by the renderer when it assembles grids
    with its host's helpers (`render.GridAssembler`: the WebUI's), else by grid_image."""
    assemble = getattr(renderer, "assemble_grid", None)
    if assemble is not None:
        return assemble(plan, layer, image_of)
    image, layout = grid_image.layer_grid(plan, layer, image_of)
    return image, grid_image.describe(plan, layer, layout)


def score(project: Project, plan: GridPlan, cells: list[Cell], images: dict[tuple, Image.Image], tagger,
          core: Sequence[str] | None, requested: Mapping[int, Sequence[str]] | None) -> list[scoring.Score]:
    """Scores of the rendered cells; the tagger sees each distinct image once."""
    cell_images = [images.get(c.key()) for c in cells]
    predictions = None
    if tagger is not None and images:
        keys = list(images)
        by_key = dict(zip(keys, tagger.predict([images[k] for k in keys])))
        predictions = [by_key.get(c.key()) for c in cells]
        core = core_tags(project) if core is None else core
        if requested is None:
            requested = {layer: absent_tags(project, prompt) for layer, (_, prompt, _) in enumerate(plan.layers)}
    return scoring.score_cells(cells, cell_images, predictions, core or (), requested or {})


def recommendation(plan: GridPlan, scores: Sequence[scoring.Score]) -> dict:
    """`recommend.recommend` as JSON, with the epoch's LoRA file name and a one-line `text`."""
    rec = recommend(scores)
    lora = next((e.lora for e in plan.epochs if e.number == rec.epoch), None)
    text = (f"recommended: epoch {rec.epoch} at weight {format_weight(rec.weight)}" if rec.epoch is not None
            else (rec.reasons[0] if rec.reasons else "no recommendation"))
    return {"epoch": rec.epoch, "weight": rec.weight, "lora": lora, "text": text, "reasons": rec.reasons,
            "verdicts": {str(epoch): verdict for epoch, verdict in rec.per_epoch_verdicts.items()}}


# -- saved grids ----------------------------------------------------------------------------------------

def load_grid(path: Path) -> dict:
    """A saved grid's grid.json (`path`: its folder or the file itself), with `folder` added (absolute):
    cell and grid `file` entries are relative to it."""
    path = Path(path)
    file = path / GRID_FILE if path.is_dir() else path
    try:
        data = files.read_json(file)
    except (OSError, ValueError) as e:
        raise LoraMakerError(f"cannot read the grid {file} ({e}): render the grid again") from e
    if data is None:
        raise LoraMakerError(f"no grid at {path}: render one first")
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION or "cells" not in data:
        raise LoraMakerError(f"{file} is not a grid saved by this LoRA Maker: render the grid again")
    return {**data, "folder": str(file.parent.resolve())}


def list_grids(project: Project) -> list[dict]:
    """The project's saved grids, newest first: {id (folder name), folder, created, stopped, rendered,
    total, epochs, weights, grids, recommendation}. Unreadable ones are left out."""
    root = grids_dir(project)
    out = []
    for folder in sorted(root.iterdir() if root.is_dir() else (), key=lambda p: p.name, reverse=True):
        if not (folder / GRID_FILE).is_file():
            continue
        try:
            data = load_grid(folder)
        except LoraMakerError:
            continue
        plan = data.get("plan", {})
        out.append({"id": folder.name, "folder": data["folder"], "created": data.get("created"),
                    "stopped": data.get("stopped"), "rendered": data.get("rendered"), "total": data.get("total"),
                    "epochs": [e.get("number") for e in plan.get("epochs", [])], "weights": plan.get("weights", []),
                    "grids": data.get("grids", []), "recommendation": data.get("recommendation")})
    return out


# -- "use this epoch" -------------------------------------------------------------------------------------

def _kind_of(metadata: Mapping[str, str]) -> str:
    """sd1/sd2/sdxl from a LoRA file's metadata, as the WebUI's Lora cards detect it."""
    if metadata.get("ss_base_model_version", "").startswith("sdxl"):
        return SDXL
    return SD2 if metadata.get("ss_v2") == "True" else SD1


def _copy_lora(source: Path, target: Path) -> list[Path]:
    """Copy a LoRA file and its card (when it has one) atomically; returns what was written."""
    files.write_bytes(target, source.read_bytes())
    written = [target]
    card = lora_file.card_path(source)
    if card.is_file():
        files.write_bytes(lora_file.card_path(target), card.read_bytes())
        written.append(lora_file.card_path(target))
    return written


def use_epoch(project: Project, lora_dir: Path, epoch: int, weight: float) -> list[Path]:
    """"Use this epoch": make epoch `epoch`'s file the final `<name>.safetensors` and write `weight` as
    the card's preferred weight. Returns the files written (for the Lora list refresh).

    The final file is the run's last epoch and exists nowhere else, so before it is replaced it is kept
    as `<name>-<its epoch, 6 digits>.safetensors` (with its card), unless that file exists already
    (then the final is a copy of it from an earlier choice): every epoch stays in the grid's list
    and can be chosen again."""
    if not (0 < weight <= 2):
        raise LoraMakerError(f"pick a cell with the LoRA: weight {format_weight(weight)} is "
                             f"{'the no-LoRA baseline' if weight == 0 else 'outside 0..2'}")
    lora_dir, name = Path(lora_dir), project.name
    epochs = saved_epochs(lora_dir, name)
    chosen = next((e for e in epochs if e.number == epoch), None)
    if chosen is None:
        saved = ", ".join(str(e.number) for e in epochs) or "none"
        raise LoraMakerError(f"epoch {epoch} of {name} is not saved in {lora_dir} (saved epochs: {saved})")
    final = lora_dir / f"{name}.safetensors"
    written: list[Path] = []
    if chosen.path != final:
        current = next((e for e in epochs if e.path == final), None)
        if current is not None:
            keep = lora_dir / f"{name}-{current.number:06d}.safetensors"
            if not keep.exists():
                written += _copy_lora(final, keep)
        written += _copy_lora(chosen.path, final)
    _, metadata = lora_file.read_lora(final)
    written.append(lora_file.write_card(final, _activation_text(project, final), weight, _kind_of(metadata)))
    return list(dict.fromkeys(written))


def _activation_text(project: Project, lora: Path) -> str:
    """The project's activation tags, as training writes them; else what the card already says."""
    tags = activation_tags(project)
    if tags:
        return ", ".join(tags)
    try:
        card = files.read_json(lora_file.card_path(lora), {})
    except (OSError, ValueError):
        card = {}
    return str(card.get("activation text", "")) if isinstance(card, dict) else ""
