"""LoRA Maker installed in a real Forge (main, gradio 4): its tab builds and its grids render as Forge's
txt2img does; training in Forge is refused. Skipped unless a Forge folder and its Python are given
(LORA_MAKER_FORGE_DIR, LORA_MAKER_FORGE_PYTHON; optional LORA_MAKER_FORGE_CHECKPOINT, an SD1 checkpoint
of the real shape under its models/Stable-diffusion; the environment, e.g. an offline HF cache, is
inherited).

The LoRA is trained first with our standalone CLI on the same checkpoint (2 epochs, 4 images at 64 px),
into the Lora folder Forge is started with. The repository goes into Forge's extensions/ as in
tests/test_webui_extension.py and Forge starts on the CPU as a server on 127.0.0.1 with --api and
--api-auth; its settings, UI config, caches, projects and Lora folder are in a temporary folder, and
the Forge folder is left as it was.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import add_image
from PIL import Image
from test_webui_extension import API, ARTIFACTS, Install, _launched, _parse_infotext
from tiny_onnx import write_tagger
from webui_env import FORGE, FORGE_CHECKPOINT, FORGE_PYTHON, needs_forge

from lora_trainer_ext.project import Project

pytestmark = [
    needs_forge,
    pytest.mark.timeout(900),
]

PROJECT = "forgetest"
# Forge's flags for a CPU-only machine whose environment is already installed.
CPU_FLAGS = ["--skip-prepare-environment", "--skip-install", "--skip-version-check", "--always-cpu",
             "--no-download-sd-model"]
# A LoRA in seconds: 4 images x 1 repeat x 2 epochs / batch 2 = 4 steps, an epoch file after each.
TRAIN = dict(resolution=64, min_bucket=64, max_bucket=128, bucket_step=64, repeats=1, epochs=2, batch_size=2,
             dim=4, alpha=4, mixed_precision="no", unet_lr=1e-3, text_encoder_lr=1e-4, save_every_n_epochs=1)
RENDER = {"sampler": "Euler", "scheduler": "Automatic", "steps": 2, "cfg_scale": 7, "width": 64, "height": 64,
          "seed": 5}
ARTIFACT_DIR = ARTIFACTS / "test_forge_grid"


def _forge_files() -> str | list:
    """The Forge folder as git sees it (ignored files too), or, for a folder that is not a clone, every
    file with its size and modification time: to prove we leave it as we found it."""
    run = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=FORGE, capture_output=True, text=True)
    if run.returncode == 0:
        return run.stdout
    return sorted((str(path), path.lstat().st_size, path.lstat().st_mtime_ns) for path in Path(FORGE).rglob("*")
                  if not path.is_dir() or path.is_symlink())


def _checkpoint() -> Path:
    path = Path(FORGE_CHECKPOINT)
    return path if path.is_absolute() else Path(FORGE) / path


def _train_lora(home: Path) -> None:
    """Project PROJECT with 4 captioned images, and its LoRA (2 epochs) in home/lora/PROJECT, the
    folder Forge's Lora folder gives the project."""
    project = Project.open(home / "projects", PROJECT, create=True)
    for i in range(4):
        add_image(project, f"img{i}.png", "mychar, 1girl, red hair", size=(64, 64), seed=i)
    args = [sys.executable, "-m", "lora_trainer_ext", "--root", str(home / "projects"), "train", PROJECT,
            "--checkpoint", str(_checkpoint()), "--lora-dir", str(home / "lora" / PROJECT), "--device", "cpu"]
    for key, value in TRAIN.items():
        args += ["--set", f"{key}={value}"]
    run = subprocess.run(args, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sorted(p.name for p in (home / "lora" / PROJECT).glob("*.safetensors")) == \
        [f"{PROJECT}-000001.safetensors", f"{PROJECT}.safetensors"]


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    shutil.rmtree(ARTIFACT_DIR, ignore_errors=True)
    home = tmp_path_factory.mktemp("forge")
    _train_lora(home)
    install = Install(FORGE_PYTHON, FORGE, FORGE_CHECKPOINT, CPU_FLAGS, ARTIFACT_DIR, _forge_files)
    tagger = {"lora_maker_tagger": str(write_tagger(home / "tagger"))}
    with _launched(home, "forge.log", install, settings=tagger) as ui:
        yield ui


def test_the_tab_builds_in_forge(forge):
    page = requests.get(forge.url + "/", timeout=120)
    assert page.status_code == 200 and "lora_maker" in page.text
    assert "LoRA Maker: could not" not in forge.log.read_text(encoding="utf-8", errors="replace")


def test_a_grid_job_renders_the_epochs_as_forge_txt2img_does(forge):
    job = forge.ok("POST", f"{API}/projects/{PROJECT}/grids",
                   json={"weights": [0, 1], "prompts": [["main", "mychar, 1girl"]], "settings": RENDER})
    done = forge.wait_job()
    assert done["id"] == job["id"] and done["kind"] == "grid" and done["state"] == "done", done
    entry = forge.ok("GET", f"{API}/projects/{PROJECT}/grids")[0]
    grid = forge.ok("GET", f"{API}/projects/{PROJECT}/grids/{entry['id']}")
    assert grid["rendered"] == grid["total"] == 3 and grid["row_labels"] == ["epoch 1", "epoch 2"]

    def picture(cell) -> bytes:
        reply = forge.call("GET", f"{API}/projects/{PROJECT}/grids/{entry['id']}/{cell['file']}")
        assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
        return Image.open(io.BytesIO(reply.content)).convert("RGB").tobytes()

    baseline = next(c for c in grid["cells"] if c["weight"] == 0)
    cell = next(c for c in grid["cells"] if c["lora"] == PROJECT and c["weight"] == 1)
    assert cell["infotext"].startswith(f"mychar, 1girl, <lora:{PROJECT}:1>\n")
    ours = picture(cell)
    assert ours != picture(baseline)  # the LoRA changes the picture

    txt2img = forge.ok("POST", "/sdapi/v1/txt2img", timeout=300, json={
        "prompt": cell["prompt"], "seed": 5, "sampler_name": "Euler", "scheduler": "Automatic", "steps": 2,
        "cfg_scale": 7, "width": 64, "height": 64})
    theirs = Image.open(io.BytesIO(base64.b64decode(txt2img["images"][0]))).convert("RGB").tobytes()
    assert ours == theirs
    infotext = json.loads(txt2img["info"])["infotexts"][0]
    same = ("Prompt", "Seed", "Steps", "Sampler", "Schedule type", "Model", "Lora hashes")
    assert {k: v for k, v in _parse_infotext(cell["infotext"]).items() if k in same} == \
        {k: v for k, v in _parse_infotext(infotext).items() if k in same}


def test_training_in_forge_is_refused_with_the_reason(forge):
    forge.ok("POST", f"{API}/projects/{PROJECT}/train", json={"settings": TRAIN})
    job = forge.wait_job()
    assert job["kind"] == "train" and job["state"] == "failed", job
    assert "training on Forge's loaded model is not supported" in job["error"], job
