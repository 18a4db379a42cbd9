"""The Test sub-tab in a real headless Chromium, on the standalone app with a tiny SD1 checkpoint and
the tiny WD tagger: a training run started from the Train tab renders its grid when it ends and the
Test tab shows it, scored, with a recommendation; a grid of chosen epochs and weights rendered from
the Test tab; a click on a cell shows its image and generation parameters; "Use this epoch" rewrites
the final LoRA file and its card on disk."""

from __future__ import annotations

import json

import pytest
from conftest import add_image
from PIL import Image
from test_trainer import FAST
from tiny_hosts import make_checkpoint
from tiny_onnx import write_tagger

from lora_trainer_ext.grids.image import read_grid
from lora_trainer_ext.grids.plan import RenderSettings, make_plan
from lora_trainer_ext.grids.render import list_grids, load_grid, render_grid
from lora_trainer_ext.grids.renderer import Rendered
from lora_trainer_ext.headless import standalone_studio
from lora_trainer_ext.paths import OPT_DEFAULT_TAGGER
from lora_trainer_ext.project import Project
from lora_trainer_ext.tab.evaluate_view import PREVIEW_WIDTH, clicked_cell, grid_preview, layer_image, open_grid
from lora_trainer_ext.training import lora_file
from lora_trainer_ext.training.settings import TrainSettings, save

pytestmark = pytest.mark.timeout(300)
TINY = RenderSettings(sampler="Euler", steps=3, width=64, height=64, seed=42)
GRID = "#lora_maker_test_grid img"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("model"), "sd1")


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory):
    return write_tagger(tmp_path_factory.mktemp("tagger"))


@pytest.fixture
def studio(checkpoint, tagger_dir, tmp_path):
    studio = standalone_studio(checkpoint=checkpoint, root=tmp_path / "projects", lora_dir=tmp_path / "lora",
                               model_cache=tmp_path / "cache")
    studio.render_defaults = lambda: TINY
    studio.option = {OPT_DEFAULT_TAGGER: str(tagger_dir)}.get  # the tiny tagger: no download
    project = studio.project("mychar", create=True)
    for i, caption in enumerate(["mychar, 1girl, red theme, smile", "mychar, 1girl, red theme",
                                 "mychar, 1girl, red theme, sitting", "mychar, 1girl, dress"]):
        add_image(project, f"{i}.png", caption, size=(64, 64), seed=i)
    project.update_settings(dataset={"activation_tags": ["mychar"], "keep_tokens": 1, "core_tags": ["red theme"]})
    save(project, TrainSettings.from_dict({**FAST, "repeats": 1, "max_bucket": 64}))
    return studio


LAYERS_JS = """() => [...document.querySelectorAll('#lora_maker_test_layer input[type=radio]')]
    .map(input => input.parentElement.innerText.trim())"""


def layers_shown(page) -> list[str]:
    """The prompt/seed layers the radio offers."""
    return page.evaluate(LAYERS_JS)


def click_cell(page, layer_description: dict, row: int, col: int) -> None:
    """Click the middle of cell (row, col) of the grid image as the page shows it (scaled to fit)."""
    x0, y0, x1, y1 = layer_description["cell_boxes"][row][col]
    page.locator(GRID).scroll_into_view_if_needed()
    box = page.evaluate(f"""() => {{
        const img = document.querySelector('{GRID}');
        const r = img.getBoundingClientRect();
        const scale = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
        return {{left: r.left + (r.width - img.naturalWidth * scale) / 2,
                 top: r.top + (r.height - img.naturalHeight * scale) / 2, scale}};
    }}""")
    page.mouse.click(box["left"] + (x0 + x1) / 2 * box["scale"], box["top"] + (y0 + y1) / 2 * box["scale"])


def test_train_then_grid_click_a_cell_and_use_its_epoch(open_ui, studio, tmp_path):
    ui = open_ui(studio)
    page = ui.page
    page.click("#lora_maker_tabs .tab-nav button:has-text('Test')")
    page.wait_for_selector("#lora_maker_test_note:has-text('No grid yet')")
    assert "No LoRA saved yet" in page.inner_text("#lora_maker_test_saved")
    assert page.input_value("#lora_maker_test_main textarea") == "mychar, 1girl, red theme, dress, sitting, smile"
    assert page.input_value("#lora_maker_test_flexibility textarea") == "mychar, 1girl, beach, school uniform, running"
    assert page.input_value("#lora_maker_test_sampler input") == "Euler"  # the host's render defaults
    assert page.input_value("#lora_maker_test_width input") == "64"
    page.click("#lora_maker_test_epoch_mode label:has-text('every k-th')")
    page.wait_for_selector("#lora_maker_test_every input", state="visible")
    ui.shot("empty")
    page.click("#lora_maker_tabs .tab-nav button:has-text('Train')")
    assert page.is_checked("#lora_maker_train_grid input[type=checkbox]")  # on by default
    page.click("#lora_maker_train_start")
    page.click("#lora_maker_tabs .tab-nav button:has-text('Test')")
    page.wait_for_selector(GRID, timeout=120_000)  # training, then its grid, then the view follows the job
    ui.shot("after-training")
    project = studio.project("mychar")
    (first,) = list_grids(project)
    assert first["epochs"] == [1, 2] and first["rendered"] == 2 * (1 + 2 * 6)  # the default grid
    assert page.input_value("#lora_maker_test_grid_pick input").startswith(first["id"])
    data = load_grid(first["folder"])
    text = page.inner_text("#lora_maker_test_recommendation")
    assert data["recommendation"]["reasons"][0] in text and "epoch 1:" in text and "epoch 2:" in text
    assert layers_shown(page) == ["main", "flexibility"]
    scores = page.inner_text("#lora_maker_test_scores")
    assert all(h in scores for h in ("epoch", "weight", "likeness", "flexibility", "overcooked", "merit", "problem"))
    page.click("#lora_maker_test_pick_recommended")  # the recommended cell, shown as if clicked
    rec = data["recommendation"]
    page.wait_for_selector(f"#lora_maker_test_cell_info [data-epoch='{rec['epoch']}'][data-weight='{rec['weight']}']")
    assert f"<lora:{rec['lora']}:{rec['weight']:g}>" in page.input_value("#lora_maker_test_infotext textarea")

    # a grid of one chosen epoch, two weights and two seeds: four small grids
    page.click("#lora_maker_test_epoch_mode label:has-text('chosen')")
    page.click("#lora_maker_test_chosen label:has-text('2')")  # the last epoch is checked to begin with
    page.click("#lora_maker_test_chosen label:has-text('1')")
    page.fill("#lora_maker_test_weights textarea", "0, 0.8")
    page.fill("#lora_maker_test_seeds textarea", "42 7")
    page.click("#lora_maker_test_render")
    page.wait_for_selector("#lora_maker_test_message:has-text('Rendering 8 images: 1 epochs x 2 weights x 4')")
    page.wait_for_function(f"""() => {{
        const value = document.querySelector('#lora_maker_test_grid_pick input').value;
        return value && !value.startsWith('{first["id"]}');
    }}""", timeout=60_000)
    second = list_grids(project)[0]
    assert second["epochs"] == [1] and second["weights"] == [0, 0.8] and second["rendered"] == 8
    page.wait_for_selector("#lora_maker_test_layer label:has-text('flexibility, seed 7')")
    assert layers_shown(page) == ["main, seed 42", "main, seed 7", "flexibility, seed 42", "flexibility, seed 7"]
    before = page.get_attribute(GRID, "src")
    page.click("#lora_maker_test_layer label:has-text('flexibility, seed 7')")
    page.wait_for_function(f"document.querySelector('{GRID}').src !== {json.dumps(before)}")
    ui.shot("seeds-grid")

    data = load_grid(second["folder"])
    layer = next(g for g in data["grids"] if g["label"] == "flexibility, seed 7")
    _, description = read_grid(f"{data['folder']}/{layer['file']}")
    click_cell(page, description, 0, 0)  # the no-LoRA baseline
    page.wait_for_selector("#lora_maker_test_cell_info:has-text('no LoRA')")
    assert "<lora:" not in page.input_value("#lora_maker_test_infotext textarea")
    page.click("#lora_maker_test_use")
    page.wait_for_selector(".toast-body:has-text('no-LoRA baseline')")
    page.click(".toast-close")

    click_cell(page, description, 0, 1)
    page.wait_for_selector("#lora_maker_test_cell_info:has-text('epoch 1, weight 0.8')")
    infotext = page.input_value("#lora_maker_test_infotext textarea")
    assert infotext.startswith("mychar, 1girl, beach") and "<lora:mychar-000001:0.8>" in infotext
    assert "Seed: 7, Size: 64x64" in infotext and "Sampler: Euler" in infotext
    page.wait_for_function("document.querySelector('#lora_maker_test_cell img') !== null")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.click("#lora_maker_test_copy")
    assert page.evaluate("navigator.clipboard.readText()") == infotext
    assert not page.is_visible("#lora_maker_test_send")  # standalone: no txt2img to send to
    ui.shot("cell")

    lora = tmp_path / "lora" / "mychar"
    epoch1, last = (lora / "mychar-000001.safetensors").read_bytes(), (lora / "mychar.safetensors").read_bytes()
    page.click("#lora_maker_test_use")
    page.wait_for_selector("#lora_maker_test_used:has-text('mychar.safetensors is now epoch 1')")
    assert (lora / "mychar.safetensors").read_bytes() == epoch1
    assert (lora / "mychar-000002.safetensors").read_bytes() == last  # the last epoch is kept
    card = json.loads(lora_file.card_path(lora / "mychar.safetensors").read_text(encoding="utf-8"))
    assert card["preferred weight"] == 0.8 and card["activation text"] == "mychar"
    page.wait_for_selector("#lora_maker_test_files:has-text('mychar-000002.safetensors')", state="attached")

    # an older grid from the picker
    page.click("#lora_maker_test_grid_pick input")
    page.click(f"#lora_maker_test_grid_pick ul.options li:has-text('{first['id']}')")
    page.wait_for_function(f"({LAYERS_JS})().join('|') === 'main|flexibility'")
    assert page.input_value("#lora_maker_test_infotext textarea") == ""  # the picked cell was of the other grid
    ui.shot("older-grid")

    page.goto(f"{ui.url}?__theme=dark")  # a reloaded page shows the newest grid again, in either theme
    page.click("#lora_maker_tabs .tab-nav button:has-text('Test')")
    page.wait_for_selector("#lora_maker_test_layer label:has-text('flexibility, seed 7')")
    ui.shot("reloaded-dark")
    assert all("cdnjs.cloudflare.com" in url for url in ui.blocked)


class Flat:
    """Flat colours at any size, fast: what a preview shows and where a click lands don't depend on
    what the cells hold."""

    def render(self, cell, settings):
        shade = int(255 * cell.weight / 2)
        return Rendered(Image.new("RGB", (settings.width, settings.height), (shade, 64, 255 - shade)),
                        cell.full_prompt())

    def refresh(self):
        pass


def test_big_grids_are_shown_as_a_preview_and_clicks_on_it_find_their_cells(tmp_path):
    project = Project.open(tmp_path / "projects", "mychar", create=True)
    lora = tmp_path / "lora"
    lora.mkdir()
    for stem in ("mychar-000001", "mychar"):
        (lora / f"{stem}.safetensors").write_bytes(b"")
    plan = make_plan(lora, "mychar", [("main", "mychar")], weights=(0, 0.5, 0.8, 1),
                     settings=RenderSettings(width=512, height=768))
    render_grid(project, plan, Flat())
    data = open_grid(project, list_grids(project)[0]["id"])
    full, preview = layer_image(data, 0), grid_preview(project, data, 0)
    shown = Image.open(preview)
    assert Image.open(full).width > PREVIEW_WIDTH == shown.width and preview.suffix == ".jpg"
    assert preview.parent == project.cache_dir / "grid-previews" and grid_preview(project, data, 0) == preview
    _, description = read_grid(full)
    scale = shown.width / Image.open(full).width
    for row in range(2):
        for col in range(4):
            x0, y0, x1, y1 = description["cell_boxes"][row][col]
            for x, y in (((x0 + x1) / 2, (y0 + y1) / 2), (x0 + 2, y0 + 2), (x1 - 2, y1 - 2)):
                cell = clicked_cell(data, 0, x * scale, y * scale)
                assert (cell["row"], cell["col"], cell["epoch"]) == (row, col, row + 1), (row, col, x, y)
    assert clicked_cell(data, 0, 5, 5) is None  # on the labels
