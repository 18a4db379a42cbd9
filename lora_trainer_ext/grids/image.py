"""One labelled grid image per layer, for the headless path (inside the WebUI the grid is assembled
with the WebUI's own image helpers instead).

    +-------------------------------------------------+
    | title: the layer's label and prompt, shortened  |
    | weight | no LoRA |  0.5  |  0.6  | ...          |   <- column labels
    | epoch 2| cell    | cell  | cell  |              |
    | epoch 4| cell    | ...                          |   <- row labels on the left
    +-------------------------------------------------+

Every measure of the layout (font size, margins, gaps) follows from the cell width alone, so the
layout, and which cell a click hit, can be recovered from the grid's size and its rows x columns
(`cell_at`). Labels scale with the cells: they stay readable when a grid of 512 px cells is shown
shrunk to a screen's width, and at 64 px cells they are still 12 px high.

The PNG carries the infotext in its "parameters" text chunk, as the WebUI's own images do, and a
JSON description of the grid (labels, cell boxes, epochs, weights) in the "lora-maker-grid" chunk.
"""

from __future__ import annotations

import importlib.util
import io
import json
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from .. import files
from ..errors import LoraMakerError
from .plan import Cell, GridPlan

INFOTEXT_CHUNK = "parameters"  # the WebUI's name: PNG Info and "send to txt2img" read it
GRID_CHUNK = "lora-maker-grid"
CORNER_LABEL = "weight"  # over the row labels, in front of the weights
Colour = tuple[int, int, int]


@dataclass(frozen=True)
class GridLayout:
    rows: int
    cols: int
    cell_w: int
    cell_h: int

    # -- measures, all from the cell width -----------------------------------------------------------
    @property
    def font_px(self) -> int:
        return max(12, round(self.cell_w * 0.07))

    @property
    def line_h(self) -> int:
        return round(self.font_px * 1.5)

    @property
    def pad(self) -> int:
        return max(2, self.font_px // 3)

    @property
    def gap(self) -> int:
        return max(1, self.font_px // 10)

    @property
    def left(self) -> int:
        return self.font_px * 6  # "epoch 100" fits

    @property
    def top(self) -> int:
        return 2 * self.line_h  # the title line, then the column labels

    @property
    def size(self) -> tuple[int, int]:
        return (self.left + self.cols * self.cell_w + (self.cols - 1) * self.gap,
                self.top + self.rows * self.cell_h + (self.rows - 1) * self.gap)

    # -- boxes (x0, y0, x1, y1), x1 and y1 exclusive ------------------------------------------------
    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        x = self.left + col * (self.cell_w + self.gap)
        y = self.top + row * (self.cell_h + self.gap)
        return x, y, x + self.cell_w, y + self.cell_h

    def col_label_box(self, col: int) -> tuple[int, int, int, int]:
        x0, _, x1, _ = self.cell_box(0, col)
        return x0, self.line_h, x1, self.top

    def row_label_box(self, row: int) -> tuple[int, int, int, int]:
        _, y0, _, y1 = self.cell_box(row, 0)
        return 0, y0, self.left, y1

    def corner_box(self) -> tuple[int, int, int, int]:
        return 0, self.line_h, self.left, self.top

    def title_box(self) -> tuple[int, int, int, int]:
        return 0, 0, self.size[0], self.line_h

    def cell_at(self, x: float, y: float) -> tuple[int, int] | None:
        """(row, col) of the cell under the pixel (x, y); None in the margins and the gaps."""
        if x < self.left or y < self.top:
            return None
        col, dx = divmod(int(x) - self.left, self.cell_w + self.gap)
        row, dy = divmod(int(y) - self.top, self.cell_h + self.gap)
        if col >= self.cols or row >= self.rows or dx >= self.cell_w or dy >= self.cell_h:
            return None
        return row, col


def layout_of(grid_size: tuple[int, int], plan_shape: tuple[int, int]) -> GridLayout:
    """The layout of a grid image of `grid_size` with `plan_shape` = (rows, cols) cells."""
    width, height = grid_size
    rows, cols = plan_shape
    if rows < 1 or cols < 1:
        raise LoraMakerError(f"a grid has at least one row and one column, not {rows} x {cols}")
    # The width grows strictly with the cell width: find it by bisection.
    lo, hi = 1, max(1, width)
    while lo < hi:
        mid = (lo + hi) // 2
        if GridLayout(rows, cols, mid, 1).size[0] < width:
            lo = mid + 1
        else:
            hi = mid
    probe = GridLayout(rows, cols, lo, 1)
    cell_h, rest = divmod(height - probe.top - (rows - 1) * probe.gap, rows)
    layout = GridLayout(rows, cols, lo, cell_h)
    if cell_h < 1 or rest or layout.size != (width, height):
        raise LoraMakerError(f"a {width}x{height} image is not a LoRA Maker grid of {rows} x {cols} cells")
    return layout


def cell_at(grid_size: tuple[int, int], plan_shape: tuple[int, int], x: float, y: float) -> tuple[int, int] | None:
    """Which cell (row, col) a click at image pixel (x, y) hit; None outside the cells."""
    return layout_of(grid_size, plan_shape).cell_at(x, y)


def cell_in(description: dict, x: float, y: float) -> tuple[int, int] | None:
    """(row, col) of the cell under (x, y) from a grid's JSON description (`describe`): works for any
    grid whose description lists its cell boxes, whoever assembled it."""
    for r, row in enumerate(description.get("cell_boxes", [])):
        for c, (x0, y0, x1, y1) in enumerate(row):
            if x0 <= x < x1 and y0 <= y < y1:
                return r, c
    return None


# -- text -----------------------------------------------------------------------------------------

def find_font() -> Path | None:
    """DejaVu Sans from matplotlib's package folder (the WebUI has matplotlib through gradio),
    located without importing matplotlib."""
    spec = importlib.util.find_spec("matplotlib")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return path
    return None


@lru_cache(maxsize=32)
def _truetype(path: str, px: int):
    return ImageFont.truetype(path, px)


class GridFont:
    """A TrueType font at any pixel size, or Pillow's built-in bitmap font scaled up by whole
    factors (Pillow 9.5 has no scalable default font)."""

    def __init__(self, path: Path | None):
        self.path = str(path) if path else None
        self.ellipsis = "\u2026" if path else "..."  # the bitmap font is latin-1 only

    @classmethod
    def default(cls) -> "GridFont":
        return cls(find_font())

    def _scaled(self, px: int) -> tuple[ImageFont.ImageFont, int]:
        base = ImageFont.load_default()
        height = max(1, base.getbbox("Hg")[3])
        return base, max(1, round(px / height))

    def measure(self, text: str, px: int) -> tuple[int, int]:
        if self.path:
            x0, y0, x1, y1 = _truetype(self.path, px).getbbox(text)
            return x1 - x0, y1 - y0
        base, scale = self._scaled(px)
        x0, y0, x1, y1 = base.getbbox(text)
        return (x1 - x0) * scale, (y1 - y0) * scale

    def draw(self, image: Image.Image, xy: tuple[int, int], text: str, px: int, fill: Colour) -> None:
        """Draw `text` with its ink box's top-left corner at `xy`."""
        if not text:
            return
        if self.path:
            font = _truetype(self.path, px)
            x0, y0, _, _ = font.getbbox(text)
            ImageDraw.Draw(image).text((xy[0] - x0, xy[1] - y0), text, font=font, fill=fill)
            return
        base, scale = self._scaled(px)
        x0, y0, x1, y1 = base.getbbox(text)
        if x1 <= x0 or y1 <= y0:
            return
        mask = Image.new("L", (x1 - x0, y1 - y0), 0)
        ImageDraw.Draw(mask).text((-x0, -y0), text, font=base, fill=255)
        mask = mask.resize((mask.width * scale, mask.height * scale), Image.NEAREST)
        image.paste(Image.new("RGB", mask.size, fill), xy, mask)

    def fit(self, text: str, px: int, width: int, min_px: int = 10) -> tuple[str, int]:
        """(text, size) that fits `width`: the size shrinks down to `min_px`, then the text is cut
        with an ellipsis."""
        while px > min_px and self.measure(text, px)[0] > width:
            px -= 1
        if self.measure(text, px)[0] <= width:
            return text, px
        lo, hi = 0, len(text)  # the longest prefix that fits with the ellipsis, by bisection
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.measure(text[:mid] + self.ellipsis, px)[0] <= width:
                lo = mid
            else:
                hi = mid - 1
        return (text[:lo].rstrip() + self.ellipsis if lo else ""), px

    def draw_in(self, image: Image.Image, box: tuple[int, int, int, int], text: str, px: int, fill: Colour,
                align: str = "center", pad: int = 0) -> None:
        """Draw `text` fitted into `box` (shrunk or cut), centred vertically, aligned left/center/right."""
        x0, y0, x1, y1 = box
        text, px = self.fit(text, px, max(1, x1 - x0 - 2 * pad))
        w, h = self.measure(text, px)
        x = {"left": x0 + pad, "right": x1 - pad - w}.get(align, x0 + (x1 - x0 - w) // 2)
        self.draw(image, (x, y0 + (y1 - y0 - h) // 2), text, px, fill)


# -- the grid -------------------------------------------------------------------------------------

def assemble(images: Sequence[Sequence[Image.Image | None]], row_labels: Sequence[str], col_labels: Sequence[str],
             title: str, *, background: Colour = (255, 255, 255), foreground: Colour = (0, 0, 0),
             font: GridFont | None = None) -> tuple[Image.Image, GridLayout]:
    """The grid of `images[row][col]` (None: a blank cell, e.g. after an interrupt), labelled.
    Cells take the first image's size; any other size is resized to it."""
    rows, cols = len(images), len(images[0]) if images else 0
    if not rows or not cols or any(len(r) != cols for r in images):
        raise LoraMakerError(f"a grid needs the same number of images in every row, got {[len(r) for r in images]}")
    if len(row_labels) != rows or len(col_labels) != cols:
        raise LoraMakerError(f"{rows} x {cols} images but {len(row_labels)} row and {len(col_labels)} column labels")
    first = next((im for row in images for im in row if im is not None), None)
    if first is None:
        raise LoraMakerError("no image was rendered for this grid")
    layout = GridLayout(rows, cols, first.width, first.height)
    font = font or GridFont.default()
    grid = Image.new("RGB", layout.size, background)
    for r, row in enumerate(images):
        for c, im in enumerate(row):
            if im is None:
                continue
            if im.size != first.size:
                im = im.resize(first.size, Image.LANCZOS)
            grid.paste(im.convert("RGB"), layout.cell_box(r, c)[:2])
    px, pad = layout.font_px, layout.pad
    font.draw_in(grid, layout.title_box(), title, px, foreground, align="left", pad=pad)
    font.draw_in(grid, layout.corner_box(), CORNER_LABEL, px, foreground, align="right", pad=pad)
    for c, label in enumerate(col_labels):
        font.draw_in(grid, layout.col_label_box(c), label, px, foreground, pad=pad)
    for r, label in enumerate(row_labels):
        font.draw_in(grid, layout.row_label_box(r), label, px, foreground, align="right", pad=pad)
    return grid, layout


def layer_title(plan: GridPlan, layer: int) -> str:
    label, prompt, seed = plan.layers[layer]
    return f"{label}: {prompt} (seed {seed})"


def layer_grid(plan: GridPlan, layer: int, image_of: Callable[[Cell], Image.Image | None],
               **style) -> tuple[Image.Image, GridLayout]:
    """The grid image of one layer of `plan`; `image_of(cell)` gives each cell's image (or None)."""
    _, rows, cols = plan.shape
    cells = [c for c in plan.cells() if c.layer == layer]
    images = [[image_of(cells[r * cols + c]) for c in range(cols)] for r in range(rows)]
    return assemble(images, plan.row_labels(), plan.col_labels(), layer_title(plan, layer), **style)


def describe(plan: GridPlan, layer: int, layout: GridLayout) -> dict:
    """What the grid's JSON chunk holds: enough to map a click to its cell and its epoch and weight."""
    label, prompt, seed = plan.layers[layer]
    return {
        "version": 1,
        "layer": layer, "label": label, "prompt": prompt, "negative": plan.negative, "seed": seed,
        "rows": layout.rows, "cols": layout.cols,
        "row_labels": plan.row_labels(), "col_labels": plan.col_labels(),
        "epochs": [e.number for e in plan.epochs], "loras": [e.lora for e in plan.epochs],
        "weights": list(plan.weights),
        "cell_size": [layout.cell_w, layout.cell_h],
        "cell_boxes": [[list(layout.cell_box(r, c)) for c in range(layout.cols)] for r in range(layout.rows)],
    }


def save_grid(path: Path, image: Image.Image, infotext: str, description: dict) -> Path:
    """Write the grid as PNG atomically, with the infotext and the description in text chunks."""
    info = PngInfo()
    info.add_text(INFOTEXT_CHUNK, infotext)
    info.add_text(GRID_CHUNK, json.dumps(description, ensure_ascii=False))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", pnginfo=info)
    files.write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def read_grid(path: Path) -> tuple[str, dict]:
    """(infotext, description) of a grid PNG saved by `save_grid`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # grids of big cells are big
            with Image.open(path) as image:
                text = dict(getattr(image, "text", {}) or {})
    except (OSError, SyntaxError, ValueError) as e:
        raise LoraMakerError(f"cannot read the grid image {path} ({e}): render the grid again") from e
    if GRID_CHUNK not in text:
        raise LoraMakerError(f"{path} is not a LoRA Maker grid (no {GRID_CHUNK} chunk): render the grid again")
    try:
        return text.get(INFOTEXT_CHUNK, ""), json.loads(text[GRID_CHUNK])
    except ValueError as e:
        raise LoraMakerError(f"{path} has a damaged grid description: render the grid again") from e
