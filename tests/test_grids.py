"""The whole headless grid path on the tiny SD1 host: a LoRA trained for two epochs, a plan of both
epochs x three weights plus the no-LoRA baseline over two prompts, rendered by the standalone sampler,
saved (cell PNGs with infotexts, labelled grid PNGs, grid.json), scored with a real (tiny) WD tagger,
stopped half-way, and "use this epoch"."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import add_image
from PIL import Image
from tiny_hosts import make_checkpoint
from tiny_onnx import write_tagger

from lora_trainer_ext.dataset.tagger import load_tagger
from lora_trainer_ext.errors import LoraMakerError, Stopped
from lora_trainer_ext.files import read_json
from lora_trainer_ext.grids import image as grid_image
from lora_trainer_ext.grids.plan import GridPlan, RenderSettings, make_plan, saved_epochs
from lora_trainer_ext.grids.render import absent_tags, list_grids, load_grid, render_grid, use_epoch
from lora_trainer_ext.hosts.host import SD1
from lora_trainer_ext.hosts.standalone import load_checkpoint
from lora_trainer_ext.hosts.standalone_render import StandaloneRenderer
from lora_trainer_ext.jobs import JobProgress
from lora_trainer_ext.progress import Control
from lora_trainer_ext.project import Project
from lora_trainer_ext.training import lora_file
from lora_trainer_ext.training.model_mode import parameter_fingerprint
from lora_trainer_ext.training.settings import TrainSettings
from lora_trainer_ext.training.trainer import train

pytestmark = pytest.mark.timeout(300)

WEIGHTS = (0.0, 0.5, 0.8, 1.0)
PROMPTS = [("main", "mychar, 1girl, red hair"), ("flexibility", "mychar, 1girl, beach, kimono")]
SETTINGS = RenderSettings(sampler="Euler", steps=3, width=64, height=64, seed=42)
DISTINCT = 2 * (1 + 2 * 3)  # per prompt: one baseline + 2 epochs x 3 weights


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("grids")
    host = load_checkpoint(make_checkpoint(root / "model", SD1))
    project = Project.open(root / "projects", "mychar", create=True)
    for i, caption in enumerate(["mychar, 1girl, red hair, smile", "mychar, 1girl, red hair, blue eyes",
                                 "mychar, 1girl, red hair, sitting", "mychar, 1girl, dress"]):
        add_image(project, f"{i}.png", caption, size=(64, 64), seed=i)
    project.update_settings(dataset={"activation_tags": ["mychar"], "keep_tokens": 1})
    settings = TrainSettings.from_dict(dict(
        resolution=64, min_bucket=64, max_bucket=64, repeats=1, epochs=2, batch_size=2, dim=4, alpha=4,
        mixed_precision="no", unet_lr=1e-2, text_encoder_lr=1e-3, lr_scheduler="constant", min_snr_gamma=0.0,
        save_every_n_epochs=1))
    result = train(project, host, settings, root / "lora")
    assert [p.name for p in result.files] == ["mychar-000001.safetensors", "mychar.safetensors"]
    return host, project, root / "lora"


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    return load_tagger(str(write_tagger(tmp_path_factory.mktemp("tagger"))))


def plan_of(lora_dir) -> GridPlan:
    return make_plan(lora_dir, "mychar", PROMPTS, weights=WEIGHTS, settings=SETTINGS)


class Counting:
    """The standalone renderer, counting its calls (and stopping a job after `stop_after` of them)."""

    def __init__(self, host, control: Control | None = None, stop_after: int | None = None):
        self.inner, self.control, self.stop_after = StandaloneRenderer(host), control, stop_after
        self.calls, self.refreshed = [], 0

    def render(self, cell, settings):
        self.calls.append(cell)
        if self.control and len(self.calls) == self.stop_after:
            self.control.stop()
        return self.inner.render(cell, settings)

    def refresh(self):
        self.refreshed += 1
        self.inner.refresh()


def has_ink(image: Image.Image, box) -> bool:
    """Whether a label box holds drawn text: dark pixels on the white margin."""
    return bool((np.asarray(image.crop(box).convert("L")) < 128).any())


def test_the_whole_headless_grid(trained, tagger):
    host, project, lora_dir = trained
    before = parameter_fingerprint(host)
    plan = plan_of(lora_dir)
    assert [e.lora for e in plan.epochs] == ["mychar-000001", "mychar"] and plan.row_labels() == ["epoch 1", "epoch 2"]
    renderer, statuses = Counting(host), []
    # the tiny tagger knows colour tags only: likeness on two of them, flexibility on a third
    result = render_grid(project, plan, renderer, tagger=tagger, core=["red theme", "blue_theme"],
                         requested={1: ["green theme"]}, progress=JobProgress(Control(), statuses.append))

    assert parameter_fingerprint(host) == before
    assert renderer.refreshed == 1 and len(renderer.calls) == result.rendered == result.total == DISTINCT
    assert len({c.key() for c in renderer.calls}) == DISTINCT  # equal cells were rendered once
    assert not result.stopped and result.folder.parent == project.path / "grids"
    assert [s.step for s in statuses[1:]] == list(range(1, DISTINCT + 1)) and statuses[-1].total_steps == DISTINCT
    assert "epoch 2, weight 1" in statuses[-1].message
    assert result.summary().startswith(f"grid rendered: {DISTINCT} images in {result.folder.name}")

    data = load_grid(result.folder)
    assert data["folder"] == str(result.folder.resolve()) and not data["stopped"]
    assert GridPlan.from_dict(data["plan"]) == plan
    cells = data["cells"]
    assert len(cells) == len(plan.cells()) == 16
    assert len({c["file"] for c in cells}) == DISTINCT
    baselines = [c for c in cells if c["weight"] == 0 and c["layer"] == 0]
    assert len(baselines) == 2 and baselines[0]["file"] == baselines[1]["file"] and "<lora:" not in baselines[0]["prompt"]
    for cell in cells:
        image = Image.open(result.folder / cell["file"])
        assert image.size == (64, 64)
        assert image.text["parameters"] == cell["infotext"]  # PNG Info / send to txt2img read this
        first_line = cell["infotext"].split("\n")[0]
        assert first_line == cell["prompt"] and "Seed: 42, Size: 64x64" in cell["infotext"]
        if cell["weight"]:
            assert f"<lora:{cell['lora']}:{cell['weight']:g}>" in first_line and "Lora hashes" in cell["infotext"]
        score = cell["score"]
        assert 0 <= score["overcooked"] <= 1 and 0 <= score["merit"] <= 1 and score["epoch"] == cell["epoch"]
        assert score["likeness"] in (0, 0.5, 1) and (score["flexibility"] in (0, 1) if cell["layer"] else
                                                     score["flexibility"] is None)
    assert data["recommendation"]["text"] and set(data["recommendation"]["verdicts"]) <= {"1", "2"}
    assert data["recommendation"]["epoch"] in (None, 1, 2)

    # one labelled grid image per prompt, every cell pasted where the layout says
    assert [g["file"] for g in data["grids"]] == ["grid-00.png", "grid-01.png"]
    for entry in data["grids"]:
        grid = Image.open(result.folder / entry["file"])
        layout = grid_image.GridLayout(2, 4, 64, 64)
        assert grid.size == layout.size == tuple(entry["size"])
        infotext, description = grid_image.read_grid(result.folder / entry["file"])
        assert description["row_labels"] == ["epoch 1", "epoch 2"]
        assert description["col_labels"] == ["no LoRA", "0.5", "0.8", "1"]
        assert description["prompt"] == PROMPTS[entry["layer"]][1] and infotext.startswith(PROMPTS[entry["layer"]][1])
        for r in range(2):
            assert has_ink(grid, layout.row_label_box(r))
            for c in range(4):
                cell = next(x for x in cells if (x["layer"], x["row"], x["col"]) == (entry["layer"], r, c))
                pasted = np.asarray(grid.crop(layout.cell_box(r, c)))
                assert (pasted == np.asarray(Image.open(result.folder / cell["file"]).convert("RGB"))).all()
        assert all(has_ink(grid, layout.col_label_box(c)) for c in range(4)) and has_ink(grid, layout.title_box())

    listed = list_grids(project)
    assert listed[0]["id"] == result.folder.name and listed[0]["epochs"] == [1, 2] and listed[0]["rendered"] == DISTINCT


def test_a_grid_that_cannot_render_leaves_nothing(trained):
    host, project, lora_dir = trained
    grids = project.path / "grids"

    def folders():
        return {p.name for p in grids.iterdir()} if grids.is_dir() else set()

    before = folders()
    with pytest.raises(LoraMakerError, match="not available headless"):
        render_grid(project, make_plan(lora_dir, "mychar", PROMPTS, settings=RenderSettings(sampler="Euler a")),
                    StandaloneRenderer(host))
    assert folders() == before


def test_flexibility_asks_for_what_the_dataset_lacks(trained):
    _, project, _ = trained
    assert absent_tags(project, PROMPTS[1][1]) == ["beach", "kimono"]
    assert absent_tags(project, "mychar, red_hair, 1girl, Dress") == []


def test_a_stop_keeps_what_was_rendered(trained):
    host, project, lora_dir = trained
    control = Control()
    renderer = Counting(host, control, stop_after=3)
    result = render_grid(project, plan_of(lora_dir), renderer, progress=JobProgress(control, lambda status: None))

    assert result.stopped and result.rendered == len(renderer.calls) == 3 and result.total == DISTINCT
    assert result.summary().startswith(f"grid stopped after 3 of {DISTINCT} images")
    data = load_grid(result.folder)
    assert data["stopped"] and data["rendered"] == 3
    done = [c for c in data["cells"] if c["file"]]
    assert [(c["layer"], c["row"], c["col"]) for c in done] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0)]
    assert all(c["score"] for c in done) and not any(c["score"] for c in data["cells"] if not c["file"])
    assert [g["file"] for g in data["grids"]] == ["grid-00.png"]  # the second prompt got no image
    grid = Image.open(result.folder / "grid-00.png")
    layout = grid_image.GridLayout(2, 4, 64, 64)
    blank = np.asarray(grid.crop(layout.cell_box(1, 3)))
    assert (blank == 255).all()  # not rendered: left blank
    assert sorted(p.name for p in (result.folder / "cells").iterdir()) == sorted(c["file"][6:] for c in done[:3])


def test_an_interrupt_inside_an_image_stops_the_grid(trained):
    host, project, lora_dir = trained

    class Interrupted(Counting):
        def render(self, cell, settings):
            if len(self.calls) == 2:
                raise Stopped("interrupted")  # what a renderer raises when the user interrupts an image
            return super().render(cell, settings)

    result = render_grid(project, plan_of(lora_dir), Interrupted(host))
    assert result.stopped and result.rendered == 2 and load_grid(result.folder)["rendered"] == 2


def test_use_this_epoch(trained, tmp_path):
    _, project, lora_dir = trained
    lora_dir = shutil.copytree(lora_dir, tmp_path / "lora")
    final, first = lora_dir / "mychar.safetensors", lora_dir / "mychar-000001.safetensors"
    last_epoch = final.read_bytes()

    written = use_epoch(project, lora_dir, 1, 0.8)
    assert final.read_bytes() == first.read_bytes()
    assert (lora_dir / "mychar-000002.safetensors").read_bytes() == last_epoch  # the last epoch is kept
    assert set(written) == {final, lora_file.card_path(final), lora_dir / "mychar-000002.safetensors",
                            lora_dir / "mychar-000002.json"}
    card = read_json(lora_file.card_path(final))
    assert card["preferred weight"] == 0.8 and card["activation text"] == "mychar" and card["sd version"] == "SD1"
    assert [e.number for e in saved_epochs(lora_dir, "mychar")] == [1, 2]  # both can still be chosen

    use_epoch(project, lora_dir, 2, 1.0)  # and back
    assert final.read_bytes() == last_epoch and read_json(lora_file.card_path(final))["preferred weight"] == 1.0
    use_epoch(project, lora_dir, 2, 0.7)  # the final itself: only the card changes
    assert final.read_bytes() == last_epoch and read_json(lora_file.card_path(final))["preferred weight"] == 0.7

    with pytest.raises(LoraMakerError, match="no-LoRA baseline"):
        use_epoch(project, lora_dir, 1, 0)
    with pytest.raises(LoraMakerError, match=r"epoch 5 of mychar is not saved .*saved epochs: 1, 2"):
        use_epoch(project, lora_dir, 5, 0.8)


def test_bench_grid_prints_a_consistent_table(capsys):
    from lora_trainer_ext.cli import main

    assert main(["bench", "grid", "--model", "tiny", "--steps", "2", "--sampler", "Euler", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("device: cpu"):].splitlines()  # after what ldm prints on import
    assert "2 epochs x weights 0, 0.5, 1" in lines[1]
    tables = [i for i, line in enumerate(lines) if line.startswith("model ")]
    head, body = ([c.strip() for c in lines[i].split("|")] for i in (tables[0], tables[0] + 2))
    row = dict(zip(head, body))
    assert (row["model"], row["size"], row["steps"], row["images"]) == ("tiny", "64px", "2", "5")
    per_image, generation, overhead = (float(row[k]) for k in ("s/image", "generation s/image", "overhead s/image"))
    assert 0 < generation < per_image and overhead > 0 and float(row["floor s/image"]) > 0
    assert per_image == pytest.approx(generation + overhead, abs=0.002)
    assert float(row["overhead"].rstrip("%")) == pytest.approx(100 * overhead / generation, rel=0.05, abs=0.1)
    phases = dict(zip(*([c.strip() for c in lines[i].split("|")] for i in (tables[1], tables[1] + 2))))
    assert phases["model"] == "tiny" and all(float(phases[f"{k} ms"]) > 0 for k in ("LoRA load", "save", "assemble"))


def test_training_then_the_default_grid_in_one_job(tmp_path):
    from lora_trainer_ext.headless import standalone_studio
    from lora_trainer_ext.paths import OPT_DEFAULT_TAGGER

    studio = standalone_studio(make_checkpoint(tmp_path / "model", SD1), root=tmp_path / "projects",
                               lora_dir=tmp_path / "lora")
    studio.render_defaults = lambda: SETTINGS
    tagger_dir = write_tagger(tmp_path / "tagger")
    studio.option = {OPT_DEFAULT_TAGGER: str(tagger_dir)}.get
    project = studio.project("mychar", create=True)
    for i in range(2):
        add_image(project, f"{i}.png", "mychar, 1girl, red theme", size=(64, 64), seed=i)
    project.update_settings(dataset={"core_tags": ["red theme"]})  # what likeness checks (the tiny tagger knows it)
    settings = TrainSettings.from_dict(dict(resolution=64, min_bucket=64, max_bucket=64, repeats=1, epochs=2,
                                            batch_size=2, dim=4, alpha=4, mixed_precision="no"))
    job = studio.start_training("mychar", settings, grid=True)
    studio.jobs.wait(240)
    assert job.state == "done", job.error
    grids = list_grids(project)
    assert len(grids) == 1
    grid = load_grid(grids[0]["folder"])
    # 2 epochs x the default weights, over the main and the flexibility prompt; one baseline per prompt
    layers, rows, cols = 2, 2, 7
    assert len(grid["cells"]) == layers * rows * cols and grid["rendered"] == layers * (1 + rows * (cols - 1))
    assert grid["recommendation"]["text"] and any(c["score"]["likeness"] is not None for c in grid["cells"])
    with pytest.raises(LoraMakerError, match="no LoRA named other"):
        studio.grid_plan(studio.project("other", create=True).name)
