"""Grids rendered by a real WebUI's txt2img pipeline, in its own Python, for each model kind (SD1, SD2-v,
SDXL): skipped unless a WebUI 1.10.x is given (tests/webui_env.py says how).

tests/webui_grid_session.py brings the WebUI up in-process with a tiny checkpoint the tests make, trains a LoRA for two epochs with the
default grid after it in the same WebUI job, renders grids through `webui.render.WebuiRenderer`, and
reports; the WebUI folder is left as it was (its settings, UI config, Lora folder and caches go to a
temporary folder)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from tiny_onnx import write_tagger
from webui_env import MODEL_KINDS, PYTHON, REPO, WEBUI, needs_webui, webui_folder_status

from lora_trainer_ext.grids.plan import DEFAULT_WEIGHTS

pytestmark = [
    needs_webui,
    pytest.mark.timeout(1200),
]
NAME, PROMPT = "gridchar", "gridchar, 1girl, red hair"
# The txt2img defaults saved in the run's ui-config.json (Settings > Defaults writes these keys).
UI_CONFIG = {
    "customscript/sampler.py/txt2img/Sampling method/value": "Euler",
    "customscript/sampler.py/txt2img/Schedule type/value": "No such schedule",  # not a choice: the WebUI ignores it
    "customscript/sampler.py/txt2img/Sampling steps/value": 3,
    "txt2img/CFG Scale/value": 5.5,
    "txt2img/Width/value": 64,
    "txt2img/Height/value": 64,
    "txt2img/Negative prompt/value": "lowres",
}


@pytest.fixture(scope="module", params=MODEL_KINDS)
def session(request, webui_models, tmp_path_factory):
    # What the WebUI does for an extension at start: our install.py in its Python, from its folder.
    install = subprocess.run([PYTHON, str(REPO / "install.py")], cwd=WEBUI, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    work = tmp_path_factory.mktemp(f"webui-grid-{request.param}")
    (work / "ui-config.json").write_text(json.dumps(UI_CONFIG), encoding="utf-8")
    settings = {"lora_maker_projects_root": str(work / "projects"), "lora_maker_model_cache": str(work / "models"),
                "lora_maker_tagger": str(write_tagger(work / "tagger"))}
    (work / "config.json").write_text(json.dumps(settings), encoding="utf-8")
    before = webui_folder_status()
    result = work / "result.json"
    run = subprocess.run([PYTHON, str(REPO / "tests" / "webui_grid_session.py"), str(REPO), str(work),
                          webui_models.checkpoint(request.param), str(result)], cwd=WEBUI,
                         env=webui_models.run_env(work), capture_output=True, text=True, timeout=1100)
    (work / "session.log").write_text(run.stdout + run.stderr, encoding="utf-8")
    assert run.returncode == 0 and result.is_file(), run.stdout[-4000:] + run.stderr[-4000:]
    assert webui_folder_status() == before, "the session changed the WebUI folder"
    return json.loads(result.read_text(encoding="utf-8"))


def test_render_settings_default_to_the_txt2img_tabs(session):
    assert session["defaults"] == {"sampler": "Euler", "scheduler": "Automatic", "steps": 3, "cfg_scale": 5.5,
                                   "width": 64, "height": 64, "seed": 1234, "negative": "lowres"}
    assert session["builtin_defaults"] == {"sampler": "DPM++ 2M", "scheduler": "Automatic", "steps": 20,
                                           "cfg_scale": 7.0, "width": 512, "height": 512, "seed": 1234,
                                           "negative": ""}


def test_training_renders_the_default_grid_in_the_same_webui_job(session):
    job, grid = session["train_job"], session["auto_grid"]
    assert job["state"] == "done" and job["kind"] == "train", job
    assert session["auto_grids"] == 1
    assert grid["plan"]["settings"] == session["defaults"]  # the txt2img tab's defaults
    assert grid["plan"]["negative"] == "lowres"  # and the negative prompt
    assert grid["plan"]["weights"] == list(DEFAULT_WEIGHTS) and [e["number"] for e in grid["plan"]["epochs"]] == [1, 2]
    assert [layer[0] for layer in grid["plan"]["layers"]] == ["main", "flexibility"]
    assert grid["rendered"] == grid["total"] == 2 * (1 + 2 * (len(DEFAULT_WEIGHTS) - 1)) and not grid["stopped"]
    assert [g["file"] for g in grid["grids"]] == ["grid-00.png", "grid-01.png"]
    scores = grid["scores"]
    assert all(s is not None and not s["broken"] for s in scores)
    assert all(s["likeness"] is not None for s in scores)  # the tiny tagger from LoRA Maker's settings scored them
    assert grid["recommendation"]["epoch"] in (1, 2), grid["recommendation"]
    png = grid["png"]
    assert png["description"]["row_labels"] == ["epoch 1", "epoch 2"]
    assert png["description"]["col_labels"] == ["no LoRA", "0.5", "0.6", "0.7", "0.8", "0.9", "1"]
    assert png["boxes_hold_cells"] and png["clicks_map"]
    # The grid ran as a WebUI job: under the queue lock, its progress in shared.state.
    state = session["auto_grid_state"]
    assert state and all(row["locked"] for row in state)
    assert any(row["textinfo"].startswith(f"LoRA Maker: train {NAME}") and row["job_count"] == grid["total"]
               and row["sampling_steps"] == 3 for row in state), state[:3]


def _cell(session, epoch: int, weight: float) -> dict:
    return next(c for c in session["grid"]["cells"] if c["epoch"] == epoch and c["weight"] == weight)


def test_cells_are_what_txt2img_gives_with_the_lora_tag(session):
    grid = session["grid"]
    assert grid["rendered"] == grid["total"] == 1 + 2 * 2 and not grid["stopped"]
    for epoch in (1, 2):
        assert _cell(session, epoch, 0.0)["digest"] != _cell(session, epoch, 1.0)["digest"]
        assert _cell(session, epoch, 0.5)["digest"] not in (_cell(session, epoch, 0.0)["digest"],
                                                           _cell(session, epoch, 1.0)["digest"])
    assert _cell(session, 1, 1.0)["digest"] != _cell(session, 2, 1.0)["digest"]
    assert _cell(session, 1, 0.0)["digest"] == _cell(session, 2, 0.0)["digest"]  # one baseline, rendered once
    assert _cell(session, 1, 0.0)["digest"] == session["plain_no_lora"][0]  # txt2img without the LoRA
    assert _cell(session, 2, 1.0)["digest"] == session["plain_final_lora"][0]  # txt2img with <lora:gridchar:1>


def test_infotexts_parse_back_with_the_lora_tag(session):
    for cell in session["grid"]["cells"]:
        parsed = cell["parsed"]  # infotext_utils.parse_generation_parameters, as "send to txt2img" does
        assert parsed["Prompt"] == cell["prompt"]
        assert (f"<lora:{cell['lora']}:" in parsed["Prompt"]) == (cell["weight"] > 0)
        assert str(parsed["Seed"]) == "42" and str(parsed["Steps"]) == "3" and parsed["Sampler"] == "DPM++ 2M"
        assert parsed["Size-1"] == "64" and parsed["Size-2"] == "64"
        assert ("Lora hashes" in parsed) == (cell["weight"] > 0)
    # Word for word the WebUI's infotext, the prompt line apart (txt2img without scripts drops the tag).
    assert _cell(session, 2, 1.0)["infotext"].splitlines()[1:] == session["plain_final_lora"][1].splitlines()[1:]
    # Without scripts the WebUI itself leaves the tag out of the prompt line; the renderer puts it back.
    assert "<lora:" not in session["raw_infotext_without_scripts"].splitlines()[0]


def test_the_grid_png_is_assembled_with_the_webuis_helpers_and_labelled(session):
    png = session["grid"]["png"]
    description = png["description"]
    assert (description["rows"], description["cols"]) == (2, 3) and description["cell_size"] == [64, 64]
    assert description["row_labels"] == ["epoch 1", "epoch 2"] and description["col_labels"] == ["no LoRA", "0.5", "1"]
    left, top = description["cell_boxes"][0][0][:2]
    assert png["size"] == [left + 3 * 64, top + 2 * 64]  # draw_grid_annotations: labels left and on top
    assert png["boxes_hold_cells"] and png["clicks_map"] and png["cell_in_margin"] is None
    assert png["title_and_column_label_ink"] > 5 and png["row_label_ink"] > 5  # text drawn in the margins
    assert png["infotext"].startswith(PROMPT)


def test_the_loaded_checkpoint_is_pinned_for_the_whole_grid(session):
    if session["other_checkpoint"] is None:
        pytest.skip("the WebUI lists no second checkpoint to pick mid-grid")
    assert session["setting_after"] == session["other_checkpoint"]  # the user picked another one...
    assert session["checkpoint_after"] == session["checkpoint"]  # ...and the grid kept rendering with its own
    model = Path(session["checkpoint"].split(" [")[0]).stem  # "name.safetensors [hash]"
    assert all(c["parsed"]["Model"] == model for c in session["grid"]["cells"])
    assert session["checkpoint_end"] == session["checkpoint"]


def test_the_webuis_interrupt_stops_a_grid_job_cleanly(session):
    job, grid = session["interrupt_job"], session["interrupted_grid"]
    assert job["state"] == "stopped" and job["kind"] == "grid", job
    assert grid["stopped"] and grid["rendered"] == 2 and grid["total"] == 5  # stopped inside the third image
    assert sum(f is not None for f in grid["files"]) == 3  # the baseline (one image, in both rows) and 0.5
    assert [g["file"] for g in grid["grids"]] == ["grid-00.png"]  # what was done, blanks for the rest
    assert session["interrupted_after"] is False  # the WebUI's flag is reset for the next job


def test_a_lora_rewritten_under_the_same_name_renders_its_new_weights(session):
    rewritten = session["rewritten"]
    assert rewritten["before"] != rewritten["epoch1"]
    # The WebUI alone keeps the old file's merged weights and conditionings for the same tag...
    assert rewritten["without_refresh"] == rewritten["before"]
    assert rewritten["after"] == rewritten["epoch1"]  # ...the renderer's refresh renders the new file,
    assert rewritten["txt2img_after_files_saved"] == rewritten["epoch1"]  # and so does txt2img after the save


def test_samplers_and_schedules_the_webui_lacks_are_refused(session):
    # (the WebUI itself would quietly render with its first sampler)
    assert "no sampler 'No such sampler': choose one of DPM++ 2M, " in session["refused"]["sampler"]
    assert "no schedule type 'No such schedule': choose one of Automatic, " in session["refused"]["scheduler"]


def test_nans_give_a_flagged_black_cell_not_a_failed_grid(session):
    grid = session["nan_grid"]
    assert grid["rendered"] == 2 and not grid["stopped"]
    baseline, broken = grid["cells"]
    assert not baseline["score"]["broken"]
    assert broken["score"]["broken"] and broken["score"]["problem"] in ("NaN", "black")
    assert broken["extrema"] == [0, 0]
    assert broken["infotext"].startswith(f"{PROMPT}, <lora:gridchar-nan:1>")
    assert session["plain_after_nan"] == session["plain_no_lora"]  # the NaN weights were taken out again
