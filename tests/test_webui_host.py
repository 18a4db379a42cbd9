"""Training on a real WebUI's loaded model, in its own Python: skipped unless a WebUI 1.10.x folder
and its Python are given (LORA_MAKER_WEBUI_DIR, LORA_MAKER_WEBUI_PYTHON; optional
LORA_MAKER_WEBUI_CHECKPOINT, a small SD1 checkpoint in its models/Stable-diffusion; extra environment
for the WebUI, e.g. an offline HF cache, is inherited)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from webui_env import CHECKPOINT, PYTHON, REPO, WEBUI, needs_webui
from webui_session import PARITY_CAPTIONS

from lora_trainer_ext.hosts.standalone import load_checkpoint

pytestmark = [
    needs_webui,
    pytest.mark.timeout(900),
]


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    # What the WebUI does for an extension at start: our install.py in its Python, from its folder.
    install = subprocess.run([PYTHON, str(REPO / "install.py")], cwd=WEBUI, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    checkpoint = CHECKPOINT
    folder = tmp_path_factory.mktemp("webui")
    result = folder / "result.json"
    run = subprocess.run([PYTHON, str(REPO / "tests" / "webui_session.py"), str(REPO), str(folder / "projects"),
                          checkpoint, str(result)], cwd=WEBUI, capture_output=True, text=True, timeout=840)
    assert run.returncode == 0 and result.is_file(), run.stdout[-3000:] + run.stderr[-3000:]
    return {**json.loads(result.read_text(encoding="utf-8")), "folder": folder}


def test_trains_on_the_loaded_model_and_gives_it_back_exactly(session):
    assert session["kind"] == "sd1"
    assert session["merged_changed_weights"] and session["image_merged"] != session["image_base"]
    assert session["unmerged_for_training"]  # the user's merged LoRA was taken out before training
    assert session["weights_unchanged_after_training"] and session["forwards_restored"]
    assert session["image_after"] == session["image_base"]  # the same picture as before any of this
    assert session["files"] == ["lm-trained-000001.safetensors", "lm-trained.safetensors"] and session["steps"] == 8  # 4 images x 2 repeats x 2 epochs / 2


def test_the_trained_lora_loads_in_the_webui(session):
    assert session["image_trained"] != session["image_base"]
    assert session["ss_sd_model_name"].endswith(".safetensors")


def test_the_file_records_the_hashes_the_webui_knows_and_its_random_state_is_kept(session):
    legacy, sha256, webui_legacy, webui_sha256, file_sha256 = session["model_hashes"]
    assert legacy == webui_legacy and len(legacy) == 8  # kohya's ss_sd_model_hash
    assert sha256 == webui_sha256 == file_sha256  # ss_new_sd_model_hash, as the WebUI computed it on load
    assert session["torch_rng_kept"]


def test_what_cannot_train_in_place_is_refused(session):
    assert "--lowvram" in session["lowvram_refused"]
    assert "--medvram" in session["medvram_refused"]
    assert "SD Unet" in session["custom_unet_refused"]
    assert "fp8" in session["fp8_refused"]
    assert "SD3" in session["sd3_refused"]
    assert "no Stable Diffusion model is loaded" in session["no_model_refused"]


def test_token_merging_is_out_of_the_unet_while_it_trains_and_back_afterwards(session):
    assert session["tome_patched_before"] > 0
    assert session["tome_in_training"] == [0]
    assert session["tome_after"] == [0.5, session["tome_patched_before"]]


def test_a_missing_webui_name_turns_training_and_grids_off_and_says_which(session):
    assert session["host_problem"] is None  # this WebUI has every name
    assert "networks.network_apply_weights" in session["problem_when_renamed"]
    assert "networks.network_apply_weights" in session["tab_shows"]
    assert session["start_buttons_interactive"] == [False, False]
    assert session["studio_refused"] == session["problem_when_renamed"]


def test_captions_give_the_same_conditioning_on_both_hosts(session):
    theirs = load_file(str(session["folder"] / "conditioning.safetensors"))["cond"]
    host = load_checkpoint(Path(WEBUI) / CHECKPOINT)
    ours = host.conditioning(PARITY_CAPTIONS)
    assert ours.shape == theirs.shape == (3, 3 * 77, 32)  # BREAK and the long caption make 3 chunks
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-5)  # float noise (torch 2.1 there, newer here)
    literal = host.conditioning([c.replace("BREAK", "break") for c in PARITY_CAPTIONS])
    assert (literal - theirs).abs().max() > 0.01  # what BREAK and the weights change is far above that noise
