"""The HTTP API on a real uvicorn server on 127.0.0.1, over a real Studio: auth like the WebUI's
--api-auth, names that never leave the projects root, and the whole workflow by HTTP requests:
scrape from the loopback booru, tag with the tiny ONNX tagger, curate, set up and run a tiny training
on the tiny SD1 model, stop-and-save it, resume shown."""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time

import httpx
import pytest
import tiny_onnx
import uvicorn
from booru_server import make_posts, no_booru_credentials, serve_booru  # noqa: F401 (a fixture)
from conftest import add_image
from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from test_trainer import FAST
from tiny_hosts import make_checkpoint

from lora_trainer_ext.api import PREFIX, add_routes, parse_api_auth
from lora_trainer_ext.dataset.captions import read_caption
from lora_trainer_ext.errors import LoraMakerError
from lora_trainer_ext.hosts.standalone import load_checkpoint
from lora_trainer_ext.studio import Studio
from lora_trainer_ext.training.settings import TrainSettings

pytestmark = [pytest.mark.usefixtures("no_booru_credentials"), pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("model"), "sd1")


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory):
    return tiny_onnx.write_tagger(tmp_path_factory.mktemp("models") / "tiny-tagger")


@pytest.fixture
def studio(tmp_path, checkpoint):
    return Studio(
        projects_root=lambda: tmp_path / "projects",
        model_cache=lambda: tmp_path / "cache",
        open_host=lambda settings=None: contextlib.nullcontext(load_checkpoint(checkpoint)),
        model_kind=lambda: "sd1",
        lora_dir=lambda name: tmp_path / "lora" / name,
    )


@contextlib.contextmanager
def serve(studio: Studio, credentials: dict[str, str] | None = None, app: FastAPI | None = None):
    """The API on uvicorn (in `app`, a new one by default) at a free 127.0.0.1 port for the `with`
    block; yields the port."""
    app = app or FastAPI()
    add_routes(app, studio, credentials)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


@pytest.fixture
def api(studio):
    with serve(studio) as port:
        base = f"http://127.0.0.1:{port}{PREFIX}"  # loopback: the server above
        with httpx.Client(base_url=base, timeout=60) as client:
            yield client


@pytest.fixture
def demo(studio):
    """An existing project "demo" with two small captioned images (enough to train)."""
    project = studio.project("demo", create=True)
    for i in range(2):
        add_image(project, f"{i}.png", "mychar, 1girl", size=(64, 64), seed=i)
    return project


def raw(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """A request with `path` sent exactly as written (no client normalises '..' or escapes away)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, PREFIX + path, body=body, headers=headers)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def wait_job(api, until=lambda job: job["state"] != "running", timeout=90) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = api.get("/job").json()
        if until(job):
            return job
        assert time.monotonic() < deadline, f"job did not get there: {job}"
        time.sleep(0.1)


# -- auth -------------------------------------------------------------------------------------------


def test_parse_api_auth_like_the_webui_but_lenient():
    assert parse_api_auth(None) is None and parse_api_auth("") is None
    assert parse_api_auth("alice:pw,bob:a:b:c, carol:x,") == {"alice": "pw", "bob": "a:b:c", "carol": "x"}
    with pytest.raises(LoraMakerError, match="'nocolon' needs the form user:password"):
        parse_api_auth("alice:pw,nocolon")


def test_with_credentials_every_route_needs_basic_auth(studio, demo):
    with serve(studio, parse_api_auth("alice:s3cret:x,bob:other")) as port:
        base = f"http://127.0.0.1:{port}{PREFIX}"  # loopback: the server above
        with httpx.Client(base_url=base, timeout=30) as client:
            for method, path in (("GET", "/projects"), ("GET", "/projects/demo"), ("GET", "/job"),
                                 ("POST", "/job/stop"), ("PUT", "/projects/demo/train/settings")):
                reply = client.request(method, path)
                assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Basic", (method, path)
            for user, password in (("alice", "s3cret"), ("alice", "other"), ("eve", "s3cret:x"), ("bob", "")):
                reply = client.get("/projects", auth=(user, password))
                assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Basic"
                assert reply.json()["detail"] == "Incorrect username or password"
            reply = client.get("/projects", auth=("alice", "s3cret:x"))
            assert reply.status_code == 200 and reply.json() == [{"name": "demo", "images": 2, "captioned": 2}]
            assert client.get("/projects/demo", auth=("bob", "other")).json()["images"] == 2
    with serve(studio, {}) as port:  # auth on with no users: nobody gets in
        assert raw(port, "GET", "/projects")[0] == 401


def test_answers_do_not_depend_on_the_host_apps_error_handlers(studio, demo):
    app = FastAPI()

    @app.exception_handler(HTTPException)  # like the WebUI's --api: its own shape, headers dropped
    @app.exception_handler(RequestValidationError)
    @app.exception_handler(Exception)
    async def host_handler(request, e):
        return JSONResponse({"host": type(e).__name__}, status_code=500)

    with serve(studio, {"alice": "pw"}, app) as port:
        base = f"http://127.0.0.1:{port}{PREFIX}"  # loopback: the server above
        with httpx.Client(base_url=base, timeout=30) as client:
            reply = client.get("/projects/demo", auth=("alice", "bad"))
            assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Basic"
            refused = "Incorrect username or password"
            assert reply.json() == {"error": refused, "detail": refused}
            for path, status, words in (("/projects/nothere", 404, "no project"), ("/projects/con", 400, "invalid"),
                                        ("/projects/demo/train/plan", 200, None)):
                reply = client.get(path, auth=("alice", "pw"))
                assert reply.status_code == status and (words is None or words in reply.json()["error"])
            reply = client.post("/projects/demo/dedupe", content=b"{", auth=("alice", "pw"))
            assert reply.status_code == 400 and reply.json()["error"].startswith("bad request: ")


def test_without_credentials_the_api_is_open(api, demo):
    assert api.get("/projects").json() == [{"name": "demo", "images": 2, "captioned": 2}]
    assert api.get("/job").json() is None


# -- names ------------------------------------------------------------------------------------------


def test_project_names_never_leave_the_projects_root(api, studio, tmp_path):
    outside = tmp_path / "outside"
    (outside / "dataset").mkdir(parents=True)
    (outside / "settings.json").write_text('{"train": {"epochs": 3}}', encoding="utf-8")
    port = api.base_url.port
    for path in ("/projects/..", "/projects/%2e%2e", "/projects/%2E%2E/train/settings", "/projects/.hidden",
                 "/projects/a%5Cb", "/projects/con", "/projects/%20demo", "/projects/a:b/report"):
        status, body = raw(port, "GET", path)
        assert status == 400 and b"invalid project name" in body, (path, status, body)
    for path in ("/projects/..%2Foutside", "/projects/%2e%2e%2foutside/train/settings", "/projects/../outside"):
        status, body = raw(port, "GET", path)
        assert status in (400, 404) and b"epochs" not in body, (path, status, body)
    status, body = raw(port, "PUT", "/projects/%2e%2e/train/settings", b'{"epochs": 1}')
    assert status == 400
    for name in ("../outside", "a/b", "..", "", "a\\b", "/abs"):
        reply = api.post("/projects", json={"name": name})
        assert reply.status_code == 400 and "invalid project name" in reply.json()["error"], name
    assert api.get("/projects/nothere").status_code == 404
    assert "no project 'nothere'" in api.get("/projects/nothere/tags").json()["error"]
    assert (outside / "settings.json").read_text(encoding="utf-8") == '{"train": {"epochs": 3}}'
    assert studio.projects() == [] and sorted(p.name for p in tmp_path.iterdir()) == ["outside"]


def test_caption_image_names_must_be_dataset_images(api, demo, tmp_path):
    port = api.base_url.port
    (tmp_path / "secret.png").write_bytes(b"not yours")
    (demo.dataset_dir / "link.png").symlink_to(tmp_path / "secret.png")
    (demo.dataset_dir / "notes.md").write_text("x", encoding="utf-8")
    body = b'{"caption": "pwned"}'
    for image in ("..", "%2e%2e", "..%5Csecret.png", "C:secret.png", "%5Cetc%5Cpasswd"):
        status, reply = raw(port, "PUT", f"/projects/demo/captions/{image}", body)
        assert status == 400 and b"invalid image name" in reply, (image, status, reply)
    for image in ("nope.png", "0.txt", "notes.md", "link.png", "..%2Fsettings.json", "%2Ftmp%2Fx.png"):
        status, reply = raw(port, "PUT", f"/projects/demo/captions/{image}", body)
        assert status == 404, (image, status, reply)
    assert not (tmp_path / "secret.txt").exists() and not (demo.path / "settings.txt").exists()
    assert "pwned" not in (read_caption(demo.dataset_dir / "0.png") or "")

    reply = api.put("/projects/demo/captions/0.png", json={"caption": " mychar, smile "})
    assert reply.status_code == 200 and reply.json() == {"image": "0.png", "caption": "mychar, smile", "changed": True}
    assert read_caption(demo.dataset_dir / "0.png") == "mychar, smile"
    assert api.put("/projects/demo/captions/0.png", json={"caption": "mychar, smile"}).json()["changed"] is False
    assert api.put("/projects/demo/captions/0.png", json={}).status_code == 400  # caption is required
    undone = api.post("/projects/demo/tags/undo").json()["undone"]
    assert undone["description"] == "edit caption of 0.png" and undone["files"] == ["dataset/0.txt"]
    assert read_caption(demo.dataset_dir / "0.png") == "mychar, 1girl"


# -- dataset ----------------------------------------------------------------------------------------


def test_create_scrape_preview_and_scrape_job(api, studio):
    reply = api.post("/projects", json={"name": "mychar"})
    assert reply.status_code == 201 and reply.json() == {
        "name": "mychar", "images": 0, "captioned": 0, "activation_tags": [], "keep_tokens": 0,
        "resumable": False, "loras": []}
    assert api.post("/projects", json={"name": "mychar"}).status_code == 200  # already there
    with serve_booru(make_posts(5)) as booru:
        query = {"booru": "gelbooru", "tags": "1girl  solo", "limit": 3, "api_url": booru.base("gelbooru")}
        preview = api.post("/projects/mychar/scrape/preview", json=query).json()
        assert preview["count"] == 5 and preview["planned"] == 3 and preview["skipped"] == {}
        assert preview["tags"] == "1girl solo" and "Will download 3 (limit 3); already have 0." in preview["preview"]
        assert not studio.project("mychar").images()  # a preview downloads nothing

        bad = api.post("/projects/mychar/scrape/preview", json={**query, "booru": "nobooru"})
        assert bad.status_code == 400 and bad.json()["error"].startswith("unknown booru 'nobooru'")
        assert api.post("/projects/mychar/scrape", json={**query, "workers": 0}).status_code == 400

        reply = api.post("/projects/mychar/scrape", json={**query, "workers": 2})
        assert reply.status_code == 202
        started = reply.json()
        assert started["kind"] == "scrape" and started["project"] == "mychar" and started["title"] == "scrape mychar"
        job = wait_job(api)
    assert job["id"] == started["id"] and job["state"] == "done" and "downloaded 3" in job["summary"]
    assert [p.name for p in studio.project("mychar").images()] == ["gelbooru_102.jpg", "gelbooru_103.png",
                                                                    "gelbooru_104.jpg"]
    assert api.get("/projects/mychar").json()["captioned"] == 3  # save_tags is on by default
    report = api.get("/projects/mychar/report").json()
    assert report["images"] == 3 and report["captioned"] == 3 and report["ok"] is True
    assert any("smaller than 512 px" in p for p in report["problems"]) and report["text"].startswith("3 images")


def test_dedupe_lists_groups_and_moves_duplicates_to_the_trash(api, studio):
    project = studio.project("dups", create=True)
    add_image(project, "a.png", "x", size=(96, 64), seed=1)
    (project.dataset_dir / "b.png").write_bytes((project.dataset_dir / "a.png").read_bytes())
    add_image(project, "c.png", "y", size=(96, 64), color=(0, 0, 255))
    groups = api.post("/projects/dups/dedupe", json={}).json()
    assert groups == {"groups": [{"keeper": "a.png", "duplicates": [{"name": "b.png", "distance": 0, "exact": True}]}],
                      "moved": None}
    assert len(project.images()) == 3
    assert api.post("/projects/dups/dedupe", json={"threshold": 99, "apply": True}).status_code == 400
    malformed = api.post("/projects/dups/dedupe", json={"threshold": "many"})
    assert malformed.status_code == 400 and malformed.json()["error"].startswith("bad request: threshold")
    assert api.post("/projects/dups/dedupe", json={"apply": True}).json()["moved"] == 1
    assert [p.name for p in project.images()] == ["a.png", "c.png"] and (project.trash_dir / "b.png").is_file()


def test_tagging_job_then_tag_table_edit_and_undo(api, studio, tagger_dir):
    project = studio.project("colours", create=True)
    for name, colour in (("a_red.png", (255, 0, 0)), ("b_blue.png", (0, 0, 255)), ("c_green.png", (0, 255, 0))):
        Image.new("RGB", (96, 96), colour).save(project.dataset_dir / name)
    assert api.post("/projects/colours/tag", json={"threshold": 2}).status_code == 400
    reply = api.post("/projects/colours/tag", json={"tagger": str(tagger_dir), "existing": "overwrite"})
    assert reply.status_code == 202 and reply.json()["kind"] == "tag"
    job = wait_job(api)
    assert job["state"] == "done" and job["error"] == "" and "3 images" in job["summary"]
    assert read_caption(project.dataset_dir / "c_green.png") == "green theme"

    table = api.get("/projects/colours/tags").json()
    assert table["images"] == 3 and ["red theme", 1] in table["tags"] and ["green theme", 1] in table["tags"]
    assert api.get("/projects/colours/tags", params={"include": "red theme, blue theme"}).json()["images"] == 0
    either = {"include": "red theme, blue theme", "any": "true"}
    assert api.get("/projects/colours/tags", params=either).json()["images"] == 2
    assert api.get("/projects/colours/tags", params={"exclude": "green theme"}).json()["images"] == 2

    assert "nothing to edit" in api.post("/projects/colours/tags/edit", json={}).json()["error"]
    assert "=>" in api.post("/projects/colours/tags/edit", json={"replace": ["no arrow"]}).json()["error"]
    edit = {"activation": "mychar", "replace": ["red theme, blue theme => colourful"], "add": ["flat colour"],
            "exclude": ["green theme"]}
    reply = api.post("/projects/colours/tags/edit", json=edit)
    assert reply.status_code == 200 and reply.json()["changed"] == 2
    assert read_caption(project.dataset_dir / "b_blue.png") == "mychar, colourful, ^_^, flat colour"
    assert read_caption(project.dataset_dir / "c_green.png") == "green theme"  # excluded
    details = api.get("/projects/colours").json()
    assert details["activation_tags"] == ["mychar"] and details["keep_tokens"] == 1 and details["captioned"] == 3
    assert ["mychar", 2] in api.get("/projects/colours/tags", params={"include": "colourful"}).json()["tags"]

    undone = api.post("/projects/colours/tags/undo").json()["undone"]
    assert undone["description"].startswith("replace red theme, blue theme => colourful")
    assert sorted(undone["files"]) == ["dataset/a_red.txt", "dataset/b_blue.txt", "settings.json"]
    assert read_caption(project.dataset_dir / "b_blue.png") == "blue theme, ^_^"  # the tagger's caption again
    assert api.get("/projects/colours").json()["activation_tags"] == []
    assert api.post("/projects/colours/tags/undo").json()["undone"]["description"].startswith("tag")  # the tagger's
    assert api.post("/projects/colours/tags/undo").json() == {"undone": None}


# -- training ---------------------------------------------------------------------------------------


def test_settings_round_trip_bad_values_name_the_key_and_the_plan(api, studio, demo):
    assert api.get("/projects/demo/train/settings").json() == TrainSettings().to_dict()
    saved = api.put("/projects/demo/train/settings", json={**FAST, "epochs": "3"})
    assert saved.status_code == 200 and saved.json() == TrainSettings.from_dict({**FAST, "epochs": 3}).to_dict()
    assert api.get("/projects/demo/train/settings").json()["epochs"] == 3
    for bad, words in (({"epochs": "many"}, "epochs must be a whole number"), ({"epoch": 3}, "did you mean epochs"),
                       ({"resolution": 100}, "resolution must be a multiple of 64"),
                       ({"network": "dora"}, "network must be one of")):
        reply = api.put("/projects/demo/train/settings", json={**FAST, **bad})
        assert reply.status_code == 400 and words in reply.json()["error"], (bad, reply.json())
    assert api.put("/projects/demo/train/settings", json=[1, 2]).status_code == 400
    assert api.get("/projects/demo/train/settings").json()["epochs"] == 3  # refused values are not saved

    plan = api.get("/projects/demo/train/plan").json()
    assert plan["line"] == "2 images x 2 repeats x 3 epochs / batch 2 = 6 steps"
    assert plan["total_steps"] == 6 and plan["steps_per_epoch"] == 2 and plan["epochs"] == 3
    assert len(plan["warnings"]) == 1 and "below the guide's 250-1000" in plan["warnings"][0]
    assert plan["vram"]["model"] == "sd1" and plan["vram"]["verdict"] is None  # no GPU here
    assert 2 < plan["vram"]["estimate_gib"] < 12 and "estimate" in plan["vram"]["summary"]
    studio.project("empty", create=True)
    assert "no images" in api.get("/projects/empty/train/plan").json()["error"]


def test_a_training_run_through_the_api_lists_its_files(api, studio, demo):
    api.put("/projects/demo/train/settings", json={**FAST, "epochs": 1})
    bad = api.post("/projects/demo/train", json={"settings": {"batch_size": 0}})
    assert bad.status_code == 400 and "batch_size must be at least 1" in bad.json()["error"]
    reply = api.post("/projects/demo/train", json={"settings": {"epochs": 2}})
    assert reply.status_code == 202 and reply.json()["kind"] == "train" and reply.json()["state"] == "running"
    job = wait_job(api)
    assert job["state"] == "done" and job["error"] == "" and job["status"]["phase"] == "done"
    assert [step for step, _ in job["losses"]] == [1, 2, 3, 4]
    loras = api.get("/projects/demo/loras").json()
    assert [f["name"] for f in loras] == ["demo-000001.safetensors", "demo.safetensors"]
    assert all(f["size"] > 0 and f["mtime"] > 0 for f in loras)
    assert [p.split("/")[-1] for p in job["files"]] == [f["name"] for f in loras]
    details = api.get("/projects/demo").json()
    assert details["loras"] == loras and details["resumable"] is False  # a finished run leaves nothing to resume
    assert api.get("/projects/demo/train/settings").json()["epochs"] == 1  # the override was for that run only


def test_one_job_at_a_time_stop_and_save_leaves_a_resumable_run(api, studio, demo, tagger_dir):
    assert api.get("/projects/demo").json()["resumable"] is False
    api.put("/projects/demo/train/settings", json={**FAST, "epochs": 500, "save_every_n_epochs": 0})
    assert api.post("/projects/demo/train", json={}).status_code == 202
    wait_job(api, until=lambda job: job["losses"])  # training, not just loading
    for method, path, body in (("POST", "/projects/demo/train", {}), ("POST", "/projects/demo/tag", {}),
                               ("POST", "/projects/demo/scrape", {"booru": "gelbooru", "tags": "x"}),
                               ("POST", "/projects/demo/tags/edit", {"add": ["x"]}),
                               ("PUT", "/projects/demo/captions/0.png", {"caption": "x"}),
                               ("POST", "/projects/demo/tags/undo", None),
                               ("POST", "/projects/demo/dedupe", {"apply": True})):
        reply = api.request(method, path, json=body)
        assert reply.status_code == 409 and "'train demo'" in reply.json()["error"], (path, reply.json())
    assert api.post("/projects/demo/dedupe", json={}).status_code == 200  # looking is fine

    api.post("/job/save-now")
    wait_job(api, until=lambda job: any("-step" in f["name"] for f in api.get("/projects/demo/loras").json()))
    stopping = api.post("/job/stop", json={"save": True}).json()
    assert stopping["kind"] == "train"
    job = wait_job(api)
    assert job["state"] == "stopped" and job["error"] == "" and 0 < len(job["losses"]) < 1000
    details = api.get("/projects/demo").json()
    assert details["resumable"] is True and any("-step" in f["name"] for f in details["loras"])
    assert api.post("/job/stop").json()["state"] == "stopped"  # nothing running: says what the last job did
    assert api.post("/job/save-now").json()["id"] == job["id"]
