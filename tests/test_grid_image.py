"""The labelled grid image on real pictures: its size, where its labels are drawn, which cell a click
hits, and the PNG's text chunks, with the TrueType font and with the scaled-up bitmap fallback."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image

from lora_trainer_ext.errors import LoraMakerError
from lora_trainer_ext.grids.image import (
    GRID_CHUNK,
    INFOTEXT_CHUNK,
    GridFont,
    GridLayout,
    assemble,
    cell_at,
    cell_in,
    describe,
    find_font,
    layer_grid,
    layout_of,
    read_grid,
    save_grid,
)
from lora_trainer_ext.grids.plan import Epoch, GridPlan, RenderSettings

WHITE = (255, 255, 255)
FONTS = {"truetype": lambda: GridFont.default(), "bitmap": lambda: GridFont(None)}


def photo(size, name="astronaut") -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size, Image.BICUBIC)


def grid_cells(rows, cols, size):
    names = ("astronaut", "coffee", "chelsea", "rocket")
    return [[photo(size, names[(r + c) % len(names)]) for c in range(cols)] for r in range(rows)]


def ink(image: Image.Image, box, background=WHITE) -> int:
    """Pixels in `box` that differ from the background."""
    region = np.asarray(image.crop(box).convert("RGB"), dtype=np.int16)
    return int((np.abs(region - np.array(background)).sum(axis=2) > 60).sum())


def ink_height(image: Image.Image, box, background=WHITE) -> int:
    region = np.asarray(image.crop(box).convert("RGB"), dtype=np.int16)
    rows = np.nonzero((np.abs(region - np.array(background)).sum(axis=2) > 60).any(axis=1))[0]
    return int(rows[-1] - rows[0] + 1) if len(rows) else 0


def test_the_truetype_font_is_found_without_importing_pyplot():
    path = find_font()
    assert path is not None and path.name == "DejaVuSans.ttf" and path.is_file()


@pytest.mark.parametrize("font", FONTS)
def test_grid_size_cells_and_labels(font):
    rows, cols, size = 3, 4, (96, 64)
    images = grid_cells(rows, cols, size)
    images[2][3] = None  # e.g. interrupted before this cell
    col_labels = ["no LoRA", "0.5", "0.8", "1"]
    grid, layout = assemble(images, ["epoch 2", "epoch 4", "epoch 10"], col_labels, "main: mychar, 1girl (seed 1)",
                            font=FONTS[font]())
    # Size = margins + rows x cols cells + the gaps between them.
    assert grid.size == layout.size == (layout.left + cols * 96 + (cols - 1) * layout.gap,
                                        layout.top + rows * 64 + (rows - 1) * layout.gap)
    assert layout.left > 0 and layout.top > 0 and layout.gap > 0
    # Every cell is its picture, pixel for pixel; the missing one is background.
    for r in range(rows):
        for c in range(cols):
            cell = np.asarray(grid.crop(layout.cell_box(r, c)))
            if images[r][c] is None:
                assert (cell == 255).all()
            else:
                assert (cell == np.asarray(images[r][c])).all()
    # Labels are drawn in their boxes: weights over the columns, epochs left of the rows, the title on top.
    for c in range(cols):
        assert ink(grid, layout.col_label_box(c)) > 10, f"column {c} has no label"
    for r in range(rows):
        assert ink(grid, layout.row_label_box(r)) > 10, f"row {r} has no label"
    assert ink(grid, layout.title_box()) > 30 and ink(grid, layout.corner_box()) > 10
    # ...and nowhere else in the margins: the gaps stay background.
    x0, _, x1, _ = layout.cell_box(0, 0)
    assert ink(grid, (x1, layout.top, x1 + layout.gap, grid.height)) == 0
    # Labels are centred over their column: ink on both sides of the middle of "no LoRA".
    x0, y0, x1, y1 = layout.col_label_box(0)
    middle = (x0 + x1) // 2
    assert ink(grid, (x0, y0, middle, y1)) > 5 and ink(grid, (middle, y0, x1, y1)) > 5


@pytest.mark.parametrize("font", FONTS)
@pytest.mark.parametrize("cell", [32, 128, 512])
def test_labels_stay_readable_at_any_cell_size(font, cell):
    grid, layout = assemble([[photo((cell, cell))] * 2], ["epoch 1"], ["no LoRA", "1"], "main", font=FONTS[font]())
    # At least 12 px per line of text, and growing with the cells (7% of the cell width).
    assert layout.font_px == max(12, round(cell * 0.07))
    height = ink_height(grid, layout.row_label_box(0))  # "epoch 1": ascenders and a descender
    assert height >= 0.6 * layout.font_px and height >= 8
    assert ink(grid, layout.col_label_box(0)) > 10 and ink(grid, layout.col_label_box(1)) > 5


@pytest.mark.parametrize("font", FONTS)
def test_long_titles_are_cut_and_colours_come_from_the_arguments(font):
    background, foreground = (30, 30, 40), (250, 200, 0)
    title = "main: " + ", ".join(f"tag number {i}" for i in range(60))
    grid_font = FONTS[font]()
    grid, layout = assemble([[photo((64, 64))]], ["epoch 1"], ["1"], title, background=background,
                            foreground=foreground, font=grid_font)
    text, px = grid_font.fit(title, layout.font_px, grid.width - 2 * layout.pad)
    assert text.endswith(grid_font.ellipsis) and grid_font.measure(text, px)[0] <= grid.width - 2 * layout.pad
    title_pixels = np.asarray(grid.crop(layout.title_box()))
    colours = {tuple(p) for p in title_pixels.reshape(-1, 3)}
    assert background in colours and foreground in colours
    assert grid.getpixel((0, 0)) == background


@pytest.mark.parametrize("rows, cols, size", [(1, 1, (64, 64)), (3, 7, (96, 64)), (10, 7, (512, 512)), (4, 2, (40, 120))])
def test_cell_at_inverts_the_layout(rows, cols, size):
    layout = GridLayout(rows, cols, *size)
    assert layout_of(layout.size, (rows, cols)) == layout
    for r in range(rows):
        for c in range(cols):
            x0, y0, x1, y1 = layout.cell_box(r, c)
            for x, y in ((x0, y0), (x1 - 1, y1 - 1), ((x0 + x1) / 2, (y0 + y1) / 2)):
                assert cell_at(layout.size, (rows, cols), x, y) == (r, c)
            if c + 1 < cols:
                assert layout.cell_at(x1, y0) is None  # the gap between two columns
            if r + 1 < rows:
                assert layout.cell_at(x0, y1) is None
    assert layout.cell_at(layout.left - 1, layout.top + 1) is None  # row labels
    assert layout.cell_at(layout.left + 1, layout.top - 1) is None  # column labels
    assert layout.cell_at(*layout.size) is None


def test_cell_at_refuses_a_shape_that_does_not_fit_the_image():
    layout = GridLayout(3, 7, 96, 64)
    with pytest.raises(LoraMakerError, match="is not a LoRA Maker grid of 3 x 6 cells"):
        cell_at(layout.size, (3, 6), 10, 10)
    with pytest.raises(LoraMakerError, match="at least one row"):
        layout_of(layout.size, (0, 7))


def test_cells_of_another_size_are_resized_and_bad_shapes_refused():
    images = [[photo((64, 48)), photo((128, 96), "coffee")]]
    grid, layout = assemble(images, ["epoch 1"], ["0.5", "1"], "t")
    assert (layout.cell_w, layout.cell_h) == (64, 48)
    with pytest.raises(LoraMakerError, match="same number of images in every row"):
        assemble([[photo((8, 8))], []], ["a", "b"], ["x"], "t")
    with pytest.raises(LoraMakerError, match="1 row and 2 column labels"):
        assemble([[photo((8, 8))]], ["a"], ["x", "y"], "t")
    with pytest.raises(LoraMakerError, match="no image was rendered"):
        assemble([[None]], ["a"], ["x"], "t")


def plan() -> GridPlan:
    epochs = [Epoch(n, f"mychar-{n:06d}", f"mychar-{n:06d}.safetensors") for n in (2, 4)]
    return GridPlan(epochs, [0.0, 0.5, 1.0], [("main", "mychar, 1girl", 11), ("flexibility", "mychar, beach", 11)],
                    "lowres", RenderSettings(width=64, height=64))


def test_a_layer_of_a_plan_and_its_png_round_trip(tmp_path):
    grid_plan = plan()
    pictures = {0.0: photo((64, 64), "coffee"), 0.5: photo((64, 64)), 1.0: photo((64, 64), "chelsea")}
    seen = []

    def image_of(cell):
        seen.append((cell.layer, cell.row, cell.col))
        return pictures[cell.weight]

    grid, layout = layer_grid(grid_plan, 1, image_of)
    assert seen == [(1, r, c) for r in range(2) for c in range(3)]
    assert (layout.rows, layout.cols) == (2, 3)
    description = describe(grid_plan, 1, layout)
    assert description["col_labels"] == ["no LoRA", "0.5", "1"] and description["row_labels"] == ["epoch 2", "epoch 4"]
    assert description["epochs"] == [2, 4] and description["loras"] == ["mychar-000002", "mychar-000004"]
    assert description["label"] == "flexibility" and description["prompt"] == "mychar, beach"

    infotext = ("mychar, beach, <lora:mychar-000004:1>\nNegative prompt: lowres\n"
                "Steps: 20, Sampler: DPM++ 2M, Schedule type: Automatic, CFG scale: 7, Seed: 11, Size: 64x64, "
                "Lora hashes: \"mychar-000004: 0123456789ab\", Comment: ünïcödé ✓")
    path = save_grid(tmp_path / "grids" / "mychar-flexibility.png", grid, infotext, description)
    assert [p.name for p in path.parent.iterdir()] == ["mychar-flexibility.png"]  # atomic: no temporary left
    text, again = read_grid(path)
    assert text == infotext and again == description
    with Image.open(path) as png:  # what the WebUI's PNG Info reads
        assert png.text[INFOTEXT_CHUNK] == infotext and GRID_CHUNK in png.text
        assert png.size == grid.size and (np.asarray(png.convert("RGB")) == np.asarray(grid)).all()
    # The boxes in the description are where the cells are.
    for r, row in enumerate(again["cell_boxes"]):
        for c, box in enumerate(row):
            assert cell_at(grid.size, (again["rows"], again["cols"]), box[0], box[1]) == (r, c)
            assert cell_in(again, box[2] - 1, box[3] - 1) == (r, c)
    assert cell_in(again, 0, 0) is None and cell_in(again, grid.width, grid.height) is None


def test_read_grid_refuses_other_pngs(tmp_path):
    photo((32, 32)).save(tmp_path / "plain.png")
    with pytest.raises(LoraMakerError, match="not a LoRA Maker grid"):
        read_grid(tmp_path / "plain.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(LoraMakerError, match="cannot read the grid image"):
        read_grid(tmp_path / "broken.png")
