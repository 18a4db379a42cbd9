"""LoRA Maker installed in a real WebUI, end to end, on an SDXL model (what the guide's users train; SD1
and SD2 are trained in the WebUI by tests/test_webui_host.py): skipped unless a WebUI 1.10.x is given
(tests/webui_env.py says how); the tiny checkpoint is one the tests make.

The repository is copied into the WebUI's extensions/ folder as "Install from URL" would put it, its
install.py runs as the WebUI runs it, and the WebUI starts as a server on 127.0.0.1 with --api and
--api-auth. First with a module broken on purpose: the WebUI still works and the tab says why. Then:
the API makes a dataset (scrape from a loopback booru, tiny tagger, tag edits) and trains while the
WebUI's own progress reports and its progress bar in the tab show the job; the new LoRA is listed and
renders in txt2img; a grid job through the API renders its epochs as txt2img does; the WebUI's
Interrupt stops a run and saves it for resuming; the Train sub-tab starts a run and the job panel
stops it; and after Reload UI the tab re-attaches to the job. Browser
checks run in headless Chromium (screenshots and the WebUI's logs in test-artifacts/). The WebUI
folder is left as it was: its settings, UI config and caches go to a temporary folder, and the
extension folder is removed again.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import requests
import tiny_onnx
from booru_server import FakePost, serve_booru
from browser import ARTIFACTS, loopback_only
from conftest import image_bytes
from PIL import Image
from webui_env import PYTHON, REPO, WEBUI, needs_webui, webui_folder_status

from lora_trainer_ext.training.presets import preset_names

pytestmark = [
    needs_webui,
    pytest.mark.timeout(1500),
]

EXTENSION = "lora-maker-test"  # the folder name under extensions/
# The WebUI's flags for a CPU-only machine whose environment is already installed (RECIPE of the test box).
CPU_FLAGS = ["--skip-prepare-environment", "--skip-install", "--skip-version-check", "--use-cpu", "all", "--no-half",
             "--precision", "full", "--no-download-sd-model"]
AUTH = ("user", "secret")
PROJECT = "webui-test"
API = "/lora-maker/v1"
# A fast run on the tiny model (tests/test_trainer.py::FAST), long enough to watch its progress (the tab
# looks for a job every 5 s when idle): 4 images x 40 repeats x 2 epochs = 320 steps, 20-30 s.
STEPS = 320
TRAIN = dict(resolution=64, min_bucket=64, max_bucket=128, bucket_step=64, repeats=40, epochs=2, batch_size=1,
             dim=4, alpha=4, conv_dim=2, conv_alpha=2, mixed_precision="no", unet_lr=1e-3, text_encoder_lr=1e-4,
             lr_scheduler="constant", min_snr_gamma=0.0, save_every_n_epochs=1,
             gradient_checkpointing=False, multires_noise_iterations=0)  # (SDXL's defaults: slower on a CPU)
ARTIFACT_DIR = ARTIFACTS / "test_webui_extension"


class WebUI:
    """The running server: requests with the API credentials, and its log for failure messages."""

    def __init__(self, url: str, log: Path, home: Path):
        self.url, self.log, self.home = url, log, home  # home: its settings, projects, Lora folder

    def call(self, method: str, path: str, auth=AUTH, **kw) -> requests.Response:
        kw.setdefault("timeout", 120)
        return requests.request(method, self.url + path, auth=auth, **kw)

    def ok(self, method: str, path: str, **kw):
        r = self.call(method, path, **kw)
        assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text[:2000]}\n{self.log_tail()}"
        return r.json()

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-chars:]

    def wait_job(self, until=lambda job: job is None or job["state"] != "running", timeout: float = 600) -> dict:
        """The job's snapshot once `until(snapshot)` holds (by default: no longer running). A server that
        is reloading its UI doesn't answer for a moment, then answers 404 until our routes are back."""
        deadline, job = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                r = self.call("GET", f"{API}/job", timeout=10)
            except requests.ConnectionError:
                r = None
            if r is not None and r.status_code != 404:
                assert r.status_code == 200, f"GET {API}/job: {r.status_code} {r.text[:2000]}"
                job = r.json()
                if until(job):
                    return job
            time.sleep(0.2)
        raise AssertionError(f"the job's wait timed out after {timeout} s: {job}\n{self.log_tail()}")

    def wait_training(self) -> dict:
        """The running job once it is a few steps into training."""
        def training(job):
            status = (job or {}).get("status") or {}
            assert job and job["state"] == "running", job
            return status.get("phase") == "training" and status.get("step", 0) >= 2

        return self.wait_job(training, timeout=300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Install:
    """A WebUI install the tests launch: its Python, folder, checkpoint and CPU flags, where its logs go,
    and `snapshot()`, what must be the same after a run as before it."""

    python: str | None
    folder: str | None
    checkpoint: str
    flags: list[str]
    artifacts: Path
    snapshot: Callable[[], object] = field(compare=False)
    env: dict = field(default_factory=lambda: dict(os.environ), compare=False)  # the environment it runs in


@pytest.fixture(scope="module")
def a1111(webui_models) -> Install:
    """The WebUI with the tests' tiny SDXL checkpoint (and the offline HF cache it needs)."""
    return Install(PYTHON, WEBUI, webui_models.checkpoint("sdxl"), CPU_FLAGS, ARTIFACT_DIR, webui_folder_status,
                   webui_models.env)


def _install_extension(target: Path, env: dict, python: str | None = PYTHON, webui: str | None = WEBUI) -> None:
    """What Install from URL does: the repository's files (a clone has the tracked ones; untracked,
    not-ignored files stand in for work not committed yet) in extensions/<name>, then its install.py
    once, from the WebUI folder with the WebUI folder on PYTHONPATH (launch_utils.run_extension_installer).
    `python`, `webui`: another WebUI's (Forge's, tests/test_forge_grid.py)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the work tree is not part of the checkout
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    install = subprocess.run([python, str(target / "install.py")], cwd=webui, env={**env, "PYTHONPATH": webui},
                             capture_output=True, text=True, timeout=900)
    complaints = [line for line in install.stdout.splitlines()
                  if line.startswith("LoRA Maker:") and not line.startswith("LoRA Maker: installed")]
    assert install.returncode == 0 and not complaints, install.stdout + install.stderr


@contextlib.contextmanager
def _launched(home: Path, log_name: str, install: Install, change=lambda extension: None, settings: dict | None = None):
    """`install` running with the extension installed (after `change(extension_folder)`) and LoRA Maker's
    `settings`; afterwards the server is stopped, its log kept in the artifacts, and the install's folder
    as it was before."""
    before = install.snapshot()
    target = Path(install.folder) / "extensions" / EXTENSION
    shutil.rmtree(target, ignore_errors=True)  # left over from a run that was killed
    env = {**install.env, "PYTHONDONTWRITEBYTECODE": "1", "SD_WEBUI_CACHE_FILE": str(home / "cache.json"),
           "SD_WEBUI_CACHE_DIR": str(home / "cache")}
    # Our settings in a config.json of the run's own, so the WebUI's config.json stays untouched. No live
    # previews: for SDXL they fetch an approximate decoder the WebUI does not ship (no network here).
    settings = {"lora_maker_projects_root": str(home / "projects"), "lora_maker_model_cache": str(home / "models"),
                "live_previews_enable": False, **(settings or {})}
    (home / "config.json").write_text(json.dumps(settings), encoding="utf-8")
    port = _free_port()
    log = home / log_name
    server = None
    try:
        _install_extension(target, env, python=install.python, webui=install.folder)
        change(target)
        args = [install.python, "launch.py", *install.flags, "--port", str(port), "--api", "--api-auth",
                ":".join(AUTH), "--lora-dir", str(home / "lora"), "--ckpt", install.checkpoint,
                "--ui-settings-file", str(home / "config.json"), "--ui-config-file", str(home / "ui-config.json"),
                "--no-prompt-history"]
        with open(log, "wb") as out:
            server = subprocess.Popen(args, cwd=install.folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        ui = WebUI(f"http://127.0.0.1:{port}", log, home)  # loopback
        _wait_until_up(ui, server)
        yield ui
    finally:
        if server is not None:
            _stop(server)
        if log.is_file():
            install.artifacts.mkdir(parents=True, exist_ok=True)
            shutil.copy(log, install.artifacts / log_name)
        shutil.rmtree(target, ignore_errors=True)
    assert install.snapshot() == before, f"the test changed {install.folder}"


@pytest.fixture(scope="module")
def artifacts():
    shutil.rmtree(ARTIFACT_DIR, ignore_errors=True)
    ARTIFACT_DIR.mkdir(parents=True)
    return ARTIFACT_DIR


@pytest.fixture(scope="module")
def broken_tab(artifacts, tmp_path_factory, chromium, a1111):  # noqa: F811 (the fixture)
    """What a WebUI shows when LoRA Maker's tab can't be built (here: a module that fails to import,
    as a missing dependency would): its page, API and log."""
    def break_a_module(extension: Path) -> None:
        (extension / "lora_trainer_ext" / "tab" / "job_panel.py").write_text(
            'raise ImportError("No module named \'lora_maker_test_missing\'")\n', encoding="utf-8")

    with _launched(tmp_path_factory.mktemp("webui-broken"), "webui-broken.log", a1111, break_a_module) as ui:
        context, page = _open(chromium, ui.url)
        try:
            page.locator("#tabs > .tab-nav button", has_text="LoRA Maker").click()
            message = page.locator("#lora_maker_load_error").text_content()
            shot(page, "00-tab-that-could-not-load")
        finally:
            context.close()
        return {"message": message, "api": ui.call("GET", f"{API}/projects").status_code,
                "txt2img": ui.call("POST", "/sdapi/v1/txt2img", json={"prompt": "a", "steps": 1, "width": 64,
                                                                       "height": 64}).status_code,
                "log": ui.log.read_text(encoding="utf-8", errors="replace")}


@pytest.fixture(scope="module")
def webui(tmp_path_factory, broken_tab, a1111):
    # After broken_tab: one extension folder, one server at a time.
    with _launched(tmp_path_factory.mktemp("webui-run"), "webui.log", a1111) as ui:
        yield ui


def _wait_until_up(ui: WebUI, server: subprocess.Popen, timeout: float = 300) -> None:
    # The Lora extension adds /sdapi/v1/loras in on_app_started, after the WebUI's API is complete
    # (txt2img can fail before that); our routes are added in the same callback round. No request goes
    # out before the WebUI logs "Startup time:": one that reaches the app while the API is still being
    # added makes starlette refuse its middleware ("Cannot add middleware after an application has started").
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the WebUI exited ({server.returncode}):\n{ui.log_tail()}"
        if "Startup time:" not in ui.log.read_text(encoding="utf-8", errors="replace"):
            time.sleep(1)
            continue
        try:
            if requests.get(ui.url + "/sdapi/v1/loras", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(1)
    raise AssertionError(f"the WebUI did not answer in {timeout} s:\n{ui.log_tail()}")


def _stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(30)


# ---- the dataset and the run, through the API ----


@pytest.fixture(scope="module")
def dataset(webui, tmp_path_factory):
    """Project PROJECT scraped from a loopback Safebooru, tagged with the tiny tagger, tags edited."""
    assert webui.ok("POST", f"{API}/projects", json={"name": PROJECT})["name"] == PROJECT
    # Square, so the tagger's white padding leaves the colour alone (the tiny tagger tags by colour).
    colours = [((255, 0, 0), (96, 96)), ((0, 0, 255), (80, 80)), ((0, 255, 0), (64, 64)), ((255, 0, 0), (72, 72))]
    posts = [FakePost(200 + i, image_bytes(size=size, color=colour), ".png", ["1girl", "solo"])
             for i, (colour, size) in enumerate(colours)]
    with serve_booru(posts) as booru:
        job = webui.ok("POST", f"{API}/projects/{PROJECT}/scrape",
                       json={"booru": "safebooru", "tags": "1girl", "api_url": booru.base("safebooru")})
        assert job["kind"] == "scrape"
        scraped = webui.wait_job()
    tagger = tiny_onnx.write_tagger(tmp_path_factory.mktemp("tagger") / "tiny-tagger")
    webui.ok("POST", f"{API}/projects/{PROJECT}/tag", json={"tagger": str(tagger), "existing": "append"})
    tagged = webui.wait_job()
    tags_before = dict(webui.ok("GET", f"{API}/projects/{PROJECT}/tags")["tags"])
    edit = webui.ok("POST", f"{API}/projects/{PROJECT}/tags/edit", json={"activation": "mychar", "remove": "solo"})
    return {"scraped": scraped, "tagged": tagged, "tags_before": tags_before, "edit": edit,
            "tags": dict(webui.ok("GET", f"{API}/projects/{PROJECT}/tags")["tags"])}


def test_a_tab_that_cannot_load_shows_why_and_the_webui_works_on(broken_tab):
    assert "ImportError: No module named 'lora_maker_test_missing'" in broken_tab["message"]
    assert "LoRA Maker: could not build its tab" in broken_tab["log"]
    assert broken_tab["api"] == 200 and broken_tab["txt2img"] == 200


def test_the_api_is_protected_like_the_webui_api(webui):
    assert webui.call("GET", f"{API}/projects", auth=None).status_code == 401
    assert webui.call("GET", f"{API}/projects", auth=("user", "wrong")).status_code == 401
    assert webui.call("GET", f"{API}/projects").status_code == 200


def test_settings_are_registered_with_their_defaults(webui):
    options = webui.ok("GET", "/sdapi/v1/options")
    assert options["lora_maker_projects_root"] == str(webui.home / "projects")
    assert options["lora_maker_tag_threshold"] == 0.35 and options["lora_maker_tag_character_threshold"] == 0.85
    assert options["lora_maker_tagger"].startswith("SmilingWolf/") and options["lora_maker_default_preset"] == ""


def test_dataset_is_scraped_tagged_and_edited_in_the_webui(webui, dataset):
    assert dataset["scraped"]["state"] == "done", dataset["scraped"]
    assert dataset["tagged"]["state"] == "done", dataset["tagged"]
    images = sorted((webui.home / "projects" / PROJECT / "dataset").glob("*.png"))
    assert len(images) == 4
    assert dataset["tags_before"]["red theme"] == 2 and dataset["tags_before"]["blue theme"] == 1, dataset["tags_before"]
    assert dataset["tags_before"]["solo"] == 4 and dataset["edit"]["changed"] == 4
    assert dataset["tags"]["mychar"] == 4 and "solo" not in dataset["tags"]


def _open(chromium, url: str):  # noqa: F811 (the fixture's value)
    """A browser page on the WebUI; requests to anything but the loopback are blocked and listed."""
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.blocked = []
    loopback_only(page, page.blocked)
    page.goto(url, timeout=180_000)  # a big page: slow when the machine is busy
    return context, page


@pytest.fixture(scope="module")
def page(webui, dataset, chromium):  # noqa: F811 (the fixture)
    """The WebUI in headless Chromium on the LoRA Maker tab (opened once the project exists)."""
    context, page = _open(chromium, webui.url)
    page.locator("#tabs > .tab-nav button", has_text="LoRA Maker").click()
    page.wait_for_selector("#tab_lora_maker #lora_maker_job_status")
    yield page
    context.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACT_DIR / f"{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def trained(webui, page):
    """A training run started through the API while the tab is open; what the WebUI's progress
    reports (/sdapi/v1/progress, /internal/progress) and its progress bar showed meanwhile."""
    webui.ok("PUT", f"{API}/projects/{PROJECT}/train/settings", json=TRAIN)
    job = webui.ok("POST", f"{API}/projects/{PROJECT}/train", json={})
    seen = {"api": [], "internal": []}
    done = threading.Event()

    def watch():  # the WebUI's progress routes, as its pages and API clients poll them
        while not done.is_set():
            seen["api"].append(webui.ok("GET", "/sdapi/v1/progress?skip_current_image=true"))
            seen["internal"].append(webui.ok("POST", "/internal/progress", json={"id_task": job["task_id"],
                                                                                 "live_preview": False}))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        # The WebUI's bar (javascript/progressbar.js), once it shows our status line rather than "Waiting...".
        bar_text = page.wait_for_function(
            """() => { const bar = document.querySelector('#tab_lora_maker .progressDiv .progress');
                       return bar && /LoRA Maker/.test(bar.textContent) ? bar.textContent : null; }""",
            timeout=120_000).json_value()
        shot(page, "01-native-progress-bar")
        finished = webui.wait_job()
    finally:
        done.set()
        watcher.join(30)
    return {"job": job, "finished": finished, "seen": seen, "bar_text": bar_text}


def test_training_runs_as_a_webui_job_with_native_progress(webui, trained):
    job, finished = trained["job"], trained["finished"]
    assert job["task_id"].startswith("task(lora-maker-")
    assert finished["state"] == "done", finished
    assert [Path(f).name for f in finished["files"]] == [f"{PROJECT}-000001.safetensors", f"{PROJECT}.safetensors"]
    ours = [p for p in trained["seen"]["api"] if p["state"]["job"] == job["task_id"]]
    training = [p for p in ours if "training" in (p["textinfo"] or "")]
    assert training, trained["seen"]["api"][:5]
    assert all(p["textinfo"].startswith(f"LoRA Maker: train {PROJECT}") and "\n" not in p["textinfo"] for p in ours)
    assert any(p["state"]["job_count"] == STEPS and 0 < p["progress"] <= 1 and p["eta_relative"] > 0
               for p in training)
    active = [p for p in trained["seen"]["internal"] if p["active"]]
    assert active and any(p["progress"] and p["progress"] > 0 for p in active)
    assert trained["bar_text"].startswith(f"LoRA Maker: train {PROJECT}")
    after = webui.ok("POST", "/internal/progress", json={"id_task": job["task_id"], "live_preview": False})
    assert after["completed"] and not after["active"]  # so the WebUI's bar knows it ended


def test_the_new_lora_is_listed_and_renders_in_txt2img(webui, trained):
    names = {lora["name"] for lora in webui.ok("GET", "/sdapi/v1/loras")}
    assert {PROJECT, f"{PROJECT}-000001"} <= names  # refreshed by the job, no restart or refresh call

    def render(prompt: str) -> dict:
        return webui.ok("POST", "/sdapi/v1/txt2img", json={"prompt": prompt, "steps": 2, "width": 64, "height": 64,
                                                            "seed": 1, "sampler_name": "Euler"}, timeout=300)

    plain, with_lora = render("mychar, 1girl"), render(f"mychar, 1girl <lora:{PROJECT}:1>")
    assert f'Lora hashes: "{PROJECT}:' in json.loads(with_lora["info"])["infotexts"][0]
    assert base64.b64decode(with_lora["images"][0]) != base64.b64decode(plain["images"][0])


def test_the_tab_shows_the_project_and_the_finished_job(page, trained):
    page.wait_for_selector('#lora_maker_job_status[data-state="done"]')
    shot(page, "02-finished-job")
    assert f"train {PROJECT}" in page.locator("#lora_maker_job_status").text_content()
    assert page.locator("#tab_lora_maker .progressDiv").count() == 0  # the WebUI's bar went away at the end
    assert page.locator("#lora_maker_job_status svg.lora-maker-loss-chart").count() == 1
    assert page.locator("#lora_maker_load_error").count() == 0
    assert not [u for u in page.blocked if "iframeResizer" not in u], page.blocked
    # The page was loaded after the project was made, but the tab was built before: the page asks for the list.
    assert page.locator("#lora_maker_project input").input_value() == PROJECT


def test_settings_page_has_the_lora_maker_section(webui, page, trained):
    assert "LoRA Maker: no training presets" not in webui.log.read_text(encoding="utf-8", errors="replace")
    page.locator("#tabs > .tab-nav button", has_text="Settings").click()
    page.locator("#settings .tab-nav button", has_text="LoRA Maker").click()
    tagger = page.locator("#setting_lora_maker_tagger")
    tagger.wait_for(state="visible")
    assert page.locator("#setting_lora_maker_gelbooru_api_key input[type=password]").count() == 1
    assert page.locator("#setting_lora_maker_tag_threshold input[type=number]").input_value() == "0.35"
    shot(page, "03-settings-section")
    page.locator("#setting_lora_maker_default_preset input").click()  # "" and the presets (presets.py)
    assert page.locator("#setting_lora_maker_default_preset ul.options li").count() == 1 + len(preset_names())
    page.keyboard.press("Escape")
    page.locator("#tabs > .tab-nav button", has_text="LoRA Maker").click()


def test_a_grid_job_renders_the_epochs_as_txt2img_does(webui, trained):
    """A grid through the API, rendered in the server by the WebUI's txt2img pipeline (webui/render.py):
    a LoRA cell is the very picture /sdapi/v1/txt2img gives for the prompt its infotext carries."""
    render = {"sampler": "Euler", "scheduler": "Automatic", "steps": 2, "cfg_scale": 7, "width": 64, "height": 96,
              "seed": 5}
    job = webui.ok("POST", f"{API}/projects/{PROJECT}/grids",
                   json={"weights": [0, 1], "prompts": [["main", "mychar, 1girl"]], "settings": render})
    done = webui.wait_job()
    assert done["id"] == job["id"] and done["kind"] == "grid" and done["state"] == "done", done
    entry = webui.ok("GET", f"{API}/projects/{PROJECT}/grids")[0]
    grid = webui.ok("GET", f"{API}/projects/{PROJECT}/grids/{entry['id']}")
    assert grid["rendered"] == grid["total"] == 3 and grid["row_labels"] == ["epoch 1", "epoch 2"]
    cell = next(c for c in grid["cells"] if c["lora"] == PROJECT and c["weight"] == 1)
    assert cell["infotext"].startswith(f"mychar, 1girl, <lora:{PROJECT}:1>\n")
    sheet = webui.call("GET", f"{API}/projects/{PROJECT}/grids/{entry['id']}/{grid['grids'][0]['file']}")
    assert sheet.status_code == 200 and sheet.headers["content-type"] == "image/png"
    picture = webui.call("GET", f"{API}/projects/{PROJECT}/grids/{entry['id']}/{cell['file']}")
    assert picture.status_code == 200

    txt2img = webui.ok("POST", "/sdapi/v1/txt2img", timeout=300, json={
        "prompt": cell["prompt"], "seed": 5, "sampler_name": "Euler", "scheduler": "Automatic", "steps": 2,
        "cfg_scale": 7, "width": 64, "height": 96})
    ours, theirs = (Image.open(io.BytesIO(data)).convert("RGB") for data in
                    (picture.content, base64.b64decode(txt2img["images"][0])))
    assert ours.tobytes() == theirs.tobytes()
    infotext = json.loads(txt2img["info"])["infotexts"][0]
    same = ("Prompt", "Seed", "Steps", "Sampler", "Schedule type", "Model", "Lora hashes")
    assert {k: v for k, v in _parse_infotext(cell["infotext"]).items() if k in same} == \
        {k: v for k, v in _parse_infotext(infotext).items() if k in same}


def test_a_grid_cell_is_sent_to_txt2img(webui, page, trained):
    """The Test sub-tab shows the grid the API rendered; a cell's "Send to txt2img" fills the WebUI's
    own txt2img fields from its infotext (the WebUI's paste buttons) and switches to txt2img."""
    entry = webui.ok("GET", f"{API}/projects/{PROJECT}/grids")[0]
    page.locator("#tabs > .tab-nav button", has_text="LoRA Maker").click()
    page.click("#lora_maker_tabs .tab-nav button:has-text('Test')")
    page.wait_for_function("(document.querySelector('#lora_maker_test_grid_pick input') || {}).value"
                           f"?.startsWith({json.dumps(entry['id'])})", timeout=60_000)
    page.click("#lora_maker_test_pick_recommended")
    page.wait_for_selector("#lora_maker_test_cell_info [data-epoch]")
    infotext = page.input_value("#lora_maker_test_infotext textarea")
    assert f"<lora:{PROJECT}" in infotext.split("\n")[0], infotext
    shot(page, "06-test-sub-tab-cell")
    page.click("#lora_maker_test_send")
    page.wait_for_function("document.querySelector('#txt2img_prompt textarea').value.includes('<lora:')")
    assert page.input_value("#txt2img_prompt textarea") == infotext.split("\n")[0]
    assert page.input_value("#txt2img_seed input") == "5" and page.input_value("#txt2img_steps input") == "2"
    assert [page.input_value(f"#txt2img_{side} input[type=number]") for side in ("width", "height")] == ["64", "96"]
    assert page.locator("#tab_txt2img").is_visible()
    shot(page, "07-sent-to-txt2img")
    page.locator("#tabs > .tab-nav button", has_text="LoRA Maker").click()


def _parse_infotext(text: str) -> dict:
    """The prompt and the "key: value" fields of an infotext's last line (enough for plain values)."""
    *prompt, params = text.split("\n")
    fields = dict(item.split(": ", 1) for item in params.split(", ") if ": " in item)
    return {"Prompt": "\n".join(prompt), **fields}


def test_the_webui_interrupt_stops_a_run_and_saves_it_for_resuming(webui, trained):
    job = webui.ok("POST", f"{API}/projects/{PROJECT}/train", json={"settings": {"epochs": 3}})
    webui.wait_training()
    webui.ok("POST", "/sdapi/v1/interrupt")  # the WebUI's Interrupt button does the same
    stopped = webui.wait_job()
    assert stopped["id"] == job["id"] and stopped["state"] == "stopped", stopped
    assert stopped["status"]["step"] < 3 * STEPS // 2
    assert webui.ok("GET", f"{API}/projects/{PROJECT}")["resumable"]
    progress = webui.ok("GET", "/sdapi/v1/progress?skip_current_image=true")
    assert progress["state"]["job"] == "" and not progress["state"]["interrupted"]  # the WebUI is free again

    webui.ok("POST", f"{API}/projects/{PROJECT}/train", json={"settings": {"epochs": 3}, "resume": True})
    resumed = webui.wait_job()
    assert resumed["state"] == "done", resumed["error"]
    assert resumed["status"]["step"] == 3 * STEPS // 2 and resumed["losses"][0][0] > stopped["status"]["step"]


def test_the_train_sub_tab_plans_starts_and_stops_a_run(webui, page, trained):
    """The Train sub-tab on the project's saved settings: its step arithmetic, then Start training and
    the job panel's Stop, clicked in the browser."""
    page.locator("#tabs > .tab-nav button", has_text="LoRA Maker").click()
    picker = page.locator("#lora_maker_project input")
    if picker.input_value() != PROJECT:  # pick it as a user would: refresh the list, choose
        page.locator("#lora_maker_project_refresh").click()
        picker.click()
        page.locator("#lora_maker_project ul.options li", has_text=PROJECT).click()
    page.locator("#lora_maker_tabs > .tab-nav button", has_text="Train").click()
    page.locator("#lora_maker_train_load").click()  # the settings saved through the API after the page loaded
    plan = page.locator("#lora_maker_train_plan_box")
    page.wait_for_function("() => /320/.test(document.querySelector('#lora_maker_train_plan_box')?.textContent)")
    shot(page, "04-train-sub-tab")
    assert "4 images x 40 repeats x 2 epochs" in plan.text_content(), plan.text_content()
    finished = webui.ok("GET", f"{API}/job")["id"]
    page.locator("#lora_maker_train_start").click()
    page.wait_for_selector(f'#lora_maker_job_status[data-state="running"]:not([data-job="{finished}"])')
    job = webui.wait_training()
    page.locator("#lora_maker_job_stop").click()
    stopped = webui.wait_job()
    assert stopped["id"] == job["id"] and stopped["state"] == "stopped" and stopped["kind"] == "train", stopped
    page.wait_for_selector(f'#lora_maker_job_status[data-job="{job["id"]}"][data-state="stopped"]')


def test_reload_ui_keeps_the_job_and_the_tab_reattaches(webui, page, trained):
    """Reload UI runs the extension's script again and builds a new app: the Studio lives on in the
    package, so the new tab and the new routes see the same job (which the reload's interrupt stopped,
    saving it)."""
    job = webui.ok("POST", f"{API}/projects/{PROJECT}/train", json={"settings": {"epochs": 20}, "restart": True})
    webui.wait_training()
    page.locator("#footer a", has_text="Reload UI").click()  # the page reloads itself once the server is back
    after = webui.wait_job(lambda j: j is not None and j["id"] == job["id"] and j["state"] != "running")
    assert after["state"] == "stopped" and after["files"], after
    page.wait_for_selector(f'#lora_maker_job_status[data-job="{job["id"]}"][data-state="stopped"]', state="attached",
                           timeout=180_000)
    page.locator("#tabs > .tab-nav button", has_text="LoRA Maker").click()
    shot(page, "05-after-reload-ui")
    assert page.locator("#lora_maker_load_error").count() == 0
    log = webui.log.read_text(encoding="utf-8", errors="replace")
    assert "Restarting UI..." in log and "LoRA Maker: could not" not in log and "lora_maker.py" not in log
