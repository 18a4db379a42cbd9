"""The grid routes of the HTTP API on a real uvicorn server on 127.0.0.1, over a standalone Studio with
a tiny SD1 checkpoint, a LoRA trained on it for two epochs and the tiny WD tagger: a grid rendered as a
job, listed, read, its PNGs fetched (and nothing else), and "use this epoch"."""

from __future__ import annotations

import io
import json
import threading

import pytest
from conftest import add_image
from PIL import Image
from test_api import api, raw, wait_job  # noqa: F401 (api: a fixture)
from test_trainer import FAST
from tiny_hosts import make_checkpoint
from tiny_onnx import write_tagger

from lora_trainer_ext.grids.plan import RenderSettings
from lora_trainer_ext.headless import standalone_studio
from lora_trainer_ext.paths import OPT_DEFAULT_TAGGER
from lora_trainer_ext.training import lora_file
from lora_trainer_ext.training.settings import TrainSettings

pytestmark = pytest.mark.timeout(180)
TINY = RenderSettings(sampler="Euler", steps=3, width=64, height=64, seed=42)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """A studio whose project "mychar" has a LoRA trained for two epochs (mychar-000001, mychar)."""
    root = tmp_path_factory.mktemp("api-grids")
    studio = standalone_studio(checkpoint=make_checkpoint(root / "model", "sd1"), root=root / "projects",
                               lora_dir=root / "lora", model_cache=root / "cache")
    studio.render_defaults = lambda: TINY
    studio.option = {OPT_DEFAULT_TAGGER: str(write_tagger(root / "tagger"))}.get
    studio.saved = []
    studio.files_saved = studio.saved.extend  # what refreshes the WebUI's Lora list
    project = studio.project("mychar", create=True)
    for i in range(2):
        add_image(project, f"{i}.png", "mychar, 1girl, red theme", size=(64, 64), seed=i)
    project.update_settings(dataset={"activation_tags": ["mychar"], "keep_tokens": 1, "core_tags": ["red theme"]})
    studio.start_training("mychar", TrainSettings.from_dict({**FAST, "repeats": 1, "max_bucket": 64}))
    assert studio.jobs.wait(120).state == "done"
    return studio




def test_a_grid_job_then_its_list_json_and_pngs_and_nothing_else(api, studio):
    assert api.get("/projects/mychar/grids").json() == []
    for body, status, words in (
            ({"settings": {"steps": "many"}}, 400, "render setting steps must be a whole number"),
            ({"settings": {"steps": 2.5}}, 400, "render setting steps must be a whole number"),
            ({"settings": {"cfg": 7}}, 400, "unknown render settings cfg"),
            ({"settings": {"width": 100}}, 400, "multiple of 8"),
            ({"epochs": "chosen", "chosen": [5]}, 400, "epoch 5 was not saved (saved epochs: 1, 2)"),
            ({"epochs": "some"}, 400, "unknown epoch selection"),
            ({"weights": "0, lots"}, 400, "weights are numbers"),
            ({"weights": [3]}, 400, "LoRA weights must be between 0 and 2"),
            ({"prompts": []}, 400, "at least one prompt"),
            ({"prompts": [["main", "  "]]}, 400, "the prompt 'main' is empty"),
            ({"seeds": [-1]}, 400, "grid seeds are fixed")):
        reply = api.post("/projects/mychar/grids", json=body)
        assert reply.status_code == status and words in reply.json()["error"], (body, reply.json())
    assert api.post("/projects/nothere/grids", json={}).status_code == 404
    assert studio.jobs.current().kind == "train"  # nothing was started

    body = {"epochs": "every", "k": 2, "weights": "0, 1", "prompts": [["red", "mychar, red theme"]], "seeds": [1, 2],
            "settings": {"steps": 2, "cfg_scale": 5}}
    reply = api.post("/projects/mychar/grids", json=body)
    assert reply.status_code == 202 and reply.json()["kind"] == "grid" and reply.json()["title"] == "grid mychar"
    job = wait_job(api)
    assert job["state"] == "done" and job["error"] == "" and "grid rendered: 4 images" in job["summary"]

    (listed,) = api.get("/projects/mychar/grids").json()
    assert listed["epochs"] == [2] and listed["weights"] == [0, 1] and listed["rendered"] == 4
    assert "folder" not in listed  # a server path: files are fetched by name
    assert [g["label"] for g in listed["grids"]] == ["red, seed 1", "red, seed 2"]
    grid = api.get(f"/projects/mychar/grids/{listed['id']}").json()
    assert "folder" not in grid and len(grid["cells"]) == 4 and grid["recommendation"]["text"]
    lora_cell = next(c for c in grid["cells"] if c["weight"] == 1 and c["seed"] == 2)
    assert lora_cell["prompt"] == "mychar, red theme, <lora:mychar:1>" and lora_cell["score"]["likeness"] is not None
    assert "Steps: 2, Sampler: Euler, Schedule type: Automatic, CFG scale: 5, Seed: 2" in lora_cell["infotext"]

    folder = studio.project("mychar").path / "grids" / listed["id"]
    for file in ("grid-01.png", lora_cell["file"]):
        reply = api.get(f"/projects/mychar/grids/{listed['id']}/{file}")
        assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
        assert reply.content == (folder / file).read_bytes()
    image = Image.open(io.BytesIO(api.get(f"/projects/mychar/grids/{listed['id']}/{lora_cell['file']}").content))
    assert image.size == (64, 64) and image.text["parameters"] == lora_cell["infotext"]

    # only listed grids, only the files their grid.json lists
    (folder.parent / "not-a-grid").mkdir()
    port = api.base_url.port
    for path in ("/grids/..", "/grids/%2e%2e", "/grids/..%5Cx", "/grids/a:b", f"/grids/{listed['id']}%5C..%5C.."):
        status, reply = raw(port, "GET", f"/projects/mychar{path}")
        assert status == 400 and b"invalid grid id" in reply, (path, status, reply)
    for path in ("/grids/not-a-grid", "/grids/20990101-000000", "/grids/not-a-grid/grid-00.png"):
        assert raw(port, "GET", f"/projects/mychar{path}")[0] == 404, path
    for file in ("grid.json", "cells", "cells/..%2Fgrid.json", "cells/../grid.json", "%2e%2e/%2e%2e/settings.json",
                 "..%2F..%2Fsettings.json", "grid-07.png", f"{folder}/grid-00.png"):
        status, reply = raw(port, "GET", f"/projects/mychar/grids/{listed['id']}/{file}")
        assert status in (400, 404) and b'"version"' not in reply and b"dataset" not in reply, (file, status, reply)


def test_use_this_epoch(api, studio):
    lora = studio.lora_dir("mychar")
    first, last = (lora / "mychar-000001.safetensors").read_bytes(), (lora / "mychar.safetensors").read_bytes()
    for body, words in (({"epoch": 9, "weight": 0.7}, "epoch 9 of mychar is not saved"),
                        ({"epoch": 1, "weight": 0}, "no-LoRA baseline"), ({"epoch": 1}, "weight: field required")):
        reply = api.post("/projects/mychar/use-epoch", json=body)
        assert reply.status_code == 400 and words in reply.json()["error"], (body, reply.json())
    assert api.post("/projects/nothere/use-epoch", json={"epoch": 1, "weight": 1}).status_code == 404

    del studio.saved[:]
    reply = api.post("/projects/mychar/use-epoch", json={"epoch": 1, "weight": 0.7})
    assert reply.status_code == 200
    answer = reply.json()
    assert answer["lora"] == "mychar.safetensors" and (answer["epoch"], answer["weight"]) == (1, 0.7)
    # the last epoch, which only the final file held, is kept under its epoch name
    assert set(answer["files"]) == {"mychar.safetensors", "mychar.json", "mychar-000002.safetensors",
                                    "mychar-000002.json"}
    assert {p.name for p in studio.saved} == set(answer["files"])  # the Lora list is refreshed with them
    assert (lora / "mychar.safetensors").read_bytes() == first
    assert (lora / "mychar-000002.safetensors").read_bytes() == last
    card = json.loads(lora_file.card_path(lora / "mychar.safetensors").read_text(encoding="utf-8"))
    assert card["preferred weight"] == 0.7

    # not while a job works on the project
    release = threading.Event()
    studio.jobs.start("grid mychar", "mychar", lambda control, on_status: release.wait(30), kind="grid")
    try:
        for path, body in (("/projects/mychar/use-epoch", {"epoch": 2, "weight": 1}), ("/projects/mychar/grids", {})):
            reply = api.post(path, json=body)
            assert reply.status_code == 409 and "'grid mychar'" in reply.json()["error"], (path, reply.json())
    finally:
        release.set()
        studio.jobs.wait(30)
    assert (lora / "mychar.safetensors").read_bytes() == first
