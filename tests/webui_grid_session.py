"""Run inside a real WebUI 1.10.x's Python, from its folder (tests/test_webui_grid.py starts it): brings
the WebUI up in-process as webui.py does, trains a LoRA and renders its grids through
`lora_trainer_ext.webui` (the Studio the tab and the API use, and `WebuiRenderer` directly), and writes
what it saw as JSON for the test to check.

    python webui_grid_session.py REPO WORK_DIR CHECKPOINT RESULT_JSON

WORK_DIR holds the run's ui-config.json (the txt2img defaults to read) and config.json (LoRA Maker's
settings); the Lora folder and the projects go there too, so the WebUI folder is left as it was.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from webui_session import start_webui

NAME = "gridchar"
PROMPT = "gridchar, 1girl, red hair"
CAPTIONS = ["gridchar, 1girl, red hair, red theme", "gridchar, 1girl, red hair, blue theme",
            "gridchar, 1girl, red hair, smile", "gridchar, 1girl, dress, green theme"]
COLOURS = ["red", "blue", "white", "green"]


def digest(image) -> str:
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def txt2img(prompt: str, settings) -> tuple[str, str]:
    """A plain txt2img render (what a user gets from the txt2img tab's pipeline): (digest, infotext)."""
    from modules import processing

    from lora_trainer_ext.grids.renderer import number

    p = processing.StableDiffusionProcessingTxt2Img(  # CFG as the tab's slider gives it: 7, not 7.0
        prompt=prompt, seed=settings.seed, sampler_name=settings.sampler, scheduler=settings.scheduler,
        steps=settings.steps, cfg_scale=number(settings.cfg_scale), width=settings.width, height=settings.height,
        do_not_save_samples=True, do_not_save_grid=True)
    processed = processing.process_images(p)
    p.close()
    return digest(processed.images[0]), processed.infotexts[0]


class StateSeen:
    """What `shared.state` and the queue lock look like at each sampling step (a `cfg_denoiser`
    callback), optionally pressing Interrupt at the first step of image number `interrupt_at`."""

    def __init__(self):
        from modules import script_callbacks

        self.rows: list[dict] = []
        self.images = 0
        self.interrupt_at: int | None = None
        script_callbacks.on_cfg_denoiser(self.step, name="lora_maker_grid_test")

    def step(self, params) -> None:
        from modules import call_queue, shared

        if params.denoiser.step == 0:  # a new image: each has its own denoiser
            self.images += 1
            if self.images == self.interrupt_at:
                shared.state.interrupt()  # what the WebUI's Interrupt button calls
        free = call_queue.queue_lock.acquire(blocking=False)  # a FIFOLock has no locked()
        if free:
            call_queue.queue_lock.release()
        state = shared.state
        self.rows.append({"job": state.job, "job_count": state.job_count, "job_no": state.job_no,
                          "textinfo": state.textinfo, "sampling_steps": state.sampling_steps, "locked": not free})


class PickModelMidGrid:
    """A `progress.Progress` that, after the first image, does what picking another checkpoint in the
    UI does while a job holds the queue lock: the setting changes, the model load waits for the lock."""

    def __init__(self, other: str | None):
        self.other = other

    def task(self, description, total, unit="img"):
        progress = self

        class Task:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return None

            def advance(self, n=1, note=""):
                from modules import shared

                if progress.other:
                    shared.opts.data["sd_model_checkpoint"] = progress.other

        return Task()

    def should_stop(self) -> bool:
        return False


def cells_of(folder: Path) -> list[dict]:
    from lora_trainer_ext.grids.render import load_grid

    return load_grid(folder)["cells"]


def image_digest(folder: Path, file: str | None) -> str | None:
    from PIL import Image

    if file is None:
        return None
    with Image.open(folder / file) as image:
        return digest(image)


def grid_findings(folder: Path, layer_file: str) -> dict:
    """The grid PNG: its description, whether each box holds its cell's picture and maps back to it
    with `cell_in`, and whether the label margins have text drawn in them."""
    import numpy as np
    from PIL import Image

    from lora_trainer_ext.grids.image import cell_in, read_grid

    infotext, description = read_grid(folder / layer_file)
    cells = [c for c in cells_of(folder) if c["layer"] == description["layer"]]
    with Image.open(folder / layer_file) as grid:
        grid = grid.convert("RGB")
    boxes_hold_cells, clicks_map = True, True
    for cell in cells:
        x0, y0, x1, y1 = description["cell_boxes"][cell["row"]][cell["col"]]
        if cell["file"] is not None:
            with Image.open(folder / cell["file"]) as im:
                boxes_hold_cells &= digest(grid.crop((x0, y0, x1, y1))) == digest(im)
        clicks_map &= cell_in(description, (x0 + x1) / 2, (y0 + y1) / 2) == (cell["row"], cell["col"])
    first = description["cell_boxes"][0][0]
    pixels = np.asarray(grid)
    dark = lambda region: int((region.min(axis=2) < 128).sum())  # noqa: E731 (text pixels)
    return {"size": list(grid.size), "description": description, "infotext": infotext,
            "boxes_hold_cells": boxes_hold_cells, "clicks_map": clicks_map,
            "title_and_column_label_ink": dark(pixels[:first[1], :]),
            "row_label_ink": dark(pixels[first[1]:, :first[0]]),
            "cell_in_margin": cell_in(description, 1, 1)}


def main(repo: str, work: Path, checkpoint: str) -> dict:
    # --ckpt-dir: the other tiny checkpoints, one of which the user "picks" mid-grid
    start_webui(checkpoint, "--no-prompt-history", "--lora-dir", str(work / "lora"), "--ckpt-dir", str(Path(checkpoint).parent),
                "--ui-config-file", str(work / "ui-config.json"), "--ui-settings-file", str(work / "config.json"))
    sys.path.insert(0, repo)
    from dataclasses import asdict

    from modules import infotext_utils, sd_models, shared
    from PIL import Image

    from lora_trainer_ext.errors import LoraMakerError
    from lora_trainer_ext.grids.plan import Epoch, GridPlan, RenderSettings, make_plan
    from lora_trainer_ext.grids.render import list_grids, load_grid, render_grid, use_epoch
    from lora_trainer_ext.training import lora_file
    from lora_trainer_ext.training.settings import TrainSettings
    from lora_trainer_ext.webui.render import WebuiRenderer, open_renderer, webui_render_defaults
    from lora_trainer_ext.webui.studio import studio

    found: dict = {}
    seen = StateSeen()

    # The txt2img tab's defaults: from ui-config.json, else the WebUI's own.
    found["defaults"] = asdict(webui_render_defaults())
    ui_config = shared.cmd_opts.ui_config_file
    shared.cmd_opts.ui_config_file = str(work / "no-ui-config.json")
    found["builtin_defaults"] = asdict(webui_render_defaults())
    shared.cmd_opts.ui_config_file = ui_config

    # Train, then the default grid in the same WebUI job: the Studio the tab and the API share.
    lm = studio()
    project = lm.project(NAME, create=True)
    for i, (caption, colour) in enumerate(zip(CAPTIONS, COLOURS)):
        Image.new("RGB", (64, 64), colour).save(project.dataset_dir / f"{i}.png")
        (project.dataset_dir / f"{i}.txt").write_text(caption, encoding="utf-8")
    # Likeness is measured on tags the tiny tagger knows (it tags by colour).
    project.update_settings(dataset={"activation_tags": [NAME], "keep_tokens": 1, "core_tags": ["red theme"]})
    settings = TrainSettings.from_dict(dict(
        resolution=64, min_bucket=64, max_bucket=64, repeats=1, epochs=2, batch_size=2, dim=4, alpha=4,
        mixed_precision="no", unet_lr=1e-2, text_encoder_lr=1e-3, lr_scheduler="constant", min_snr_gamma=0.0,
        save_every_n_epochs=1))
    loaded = shared.sd_model.sd_checkpoint_info.title
    found["checkpoint"] = loaded
    start = time.perf_counter()
    lm.start_training(NAME, settings, grid=True)
    job = lm.jobs.wait(900)
    found["train_and_grid_s"] = time.perf_counter() - start
    found["train_job"] = job.snapshot()
    grids = list_grids(project)
    found["auto_grids"] = len(grids)
    if grids:
        auto = load_grid(grids[0]["folder"])
        found["auto_grid"] = {key: auto[key] for key in ("rendered", "total", "stopped", "plan", "grids",
                                                          "recommendation", "row_labels", "col_labels")}
        found["auto_grid"]["scores"] = [c["score"] for c in auto["cells"]]
        found["auto_grid"]["png"] = grid_findings(Path(auto["folder"]), auto["grids"][0]["file"])
    found["auto_grid_state"] = [row for row in seen.rows if row["job"].startswith("task(lora-maker-")]

    # WebuiRenderer directly: 2 epochs x weights 0, 0.5, 1, while the user picks another checkpoint.
    lora_dir = lm.lora_dir(NAME)
    render = RenderSettings(sampler="DPM++ 2M", scheduler="Automatic", steps=3, cfg_scale=7.0, width=64,
                            height=64, seed=42)
    plan = make_plan(lora_dir, NAME, [("main", PROMPT)], weights=(0.0, 0.5, 1.0), settings=render)
    other = next((c.title for c in sd_models.checkpoints_list.values() if c.title != loaded), None)
    found["other_checkpoint"] = other
    with open_renderer() as renderer:
        result = render_grid(project, plan, renderer, progress=PickModelMidGrid(other))
    found["checkpoint_after"] = shared.sd_model.sd_checkpoint_info.title
    found["setting_after"] = shared.opts.data["sd_model_checkpoint"]  # the user's pick, loaded once the lock is free
    shared.opts.data["sd_model_checkpoint"] = loaded
    folder = result.folder
    cells = cells_of(folder)
    found["grid"] = {"rendered": result.rendered, "total": result.total, "stopped": result.stopped,
                     "cells": [{**{k: c[k] for k in ("row", "col", "epoch", "lora", "weight", "prompt", "seed",
                                                     "infotext", "score")},
                                "digest": image_digest(folder, c["file"]),
                                "parsed": infotext_utils.parse_generation_parameters(c["infotext"])}
                               for c in cells]}
    found["grid"]["png"] = grid_findings(folder, "grid-00.png")
    found["plain_no_lora"] = txt2img(PROMPT, render)
    found["plain_final_lora"] = txt2img(f"{PROMPT}, <lora:{NAME}:1>", render)
    # With p.scripts None, the WebUI writes the prompt with its extra networks taken out.
    from modules import processing

    p = processing.StableDiffusionProcessingTxt2Img(
        prompt=f"{PROMPT}, <lora:{NAME}:1>", seed=42, sampler_name="DPM++ 2M", steps=3, width=64, height=64,
        do_not_save_samples=True, do_not_save_grid=True)
    found["raw_infotext_without_scripts"] = processing.process_images(p).infotexts[0]
    p.close()

    # The WebUI's Interrupt during the third image of a grid job.
    seen.interrupt_at, seen.images = 3, 0
    lm.start_grid(NAME, plan)
    job = lm.jobs.wait(600)
    seen.interrupt_at = None
    found["interrupt_job"] = job.snapshot()
    found["interrupted_after"] = shared.state.interrupted
    stopped = load_grid(list_grids(project)[0]["folder"])
    found["interrupted_grid"] = {"stopped": stopped["stopped"], "rendered": stopped["rendered"],
                                 "total": stopped["total"], "files": [c["file"] for c in stopped["cells"]],
                                 "grids": stopped["grids"]}

    # A LoRA file rewritten under the same name ("use this epoch"): the grid renders the new file.
    final, first = Epoch(2, NAME, lora_dir / f"{NAME}.safetensors"), plan.epochs[0]
    one = GridPlan([first, final], [1.0], [("main", PROMPT, 42)], settings=render).cells()
    with open_renderer() as renderer:
        epoch1 = digest(renderer.render(one[0], render).image)
        before = digest(renderer.render(one[1], render).image)
        written = use_epoch(project, lora_dir, 1, 0.8)
        stale = digest(renderer.render(one[1], render).image)  # no refresh: the old file's weights and conds
        lm.files_saved(written)  # what the tab and the API do after "use this epoch"
        txt2img_after = txt2img(f"{PROMPT}, <lora:{NAME}:1>", render)[0]
        renderer.refresh()
        after = digest(renderer.render(one[1], render).image)
    found["rewritten"] = {"epoch1": epoch1, "before": before, "without_refresh": stale, "after": after,
                          "txt2img_after_files_saved": txt2img_after}
    refused = {}
    for field, value in (("sampler", "No such sampler"), ("scheduler", "No such schedule")):
        try:
            WebuiRenderer().render(one[0], RenderSettings(**{**asdict(render), field: value}))
        except LoraMakerError as e:
            refused[field] = str(e)
    found["refused"] = refused

    # A LoRA that makes NaNs: its cells are black and flagged, the grid goes on.
    from safetensors.torch import save_file

    tensors, metadata = lora_file.read_lora(lora_dir / f"{NAME}-000001.safetensors")
    nan = lora_dir / "gridchar-nan.safetensors"  # written directly: LoRA Maker refuses to save NaNs
    save_file({k: v.float() * float("nan") for k, v in tensors.items()}, str(nan), metadata)
    nan_plan = GridPlan([Epoch(1, nan.stem, nan)], [0.0, 1.0], [("main", PROMPT, 42)], settings=render)
    with open_renderer() as renderer:
        nan_result = render_grid(project, nan_plan, renderer)
    nan_cells = cells_of(nan_result.folder)
    found["nan_grid"] = {"rendered": nan_result.rendered, "stopped": nan_result.stopped,
                         "cells": [{"weight": c["weight"], "score": c["score"], "infotext": c["infotext"],
                                    "extrema": list(Image.open(nan_result.folder / c["file"]).convert("L").getextrema())}
                                   for c in nan_cells]}
    found["plain_after_nan"] = txt2img(PROMPT, render)
    found["checkpoint_end"] = shared.sd_model.sd_checkpoint_info.title
    return found


if __name__ == "__main__":
    repo, work, checkpoint, result = sys.argv[1:5]  # read first: starting the WebUI replaces sys.argv
    found = main(repo, Path(work), checkpoint)
    with open(result, "w", encoding="utf-8") as f:  # a file: the WebUI takes over stdout's buffering
        json.dump(found, f, default=str)
