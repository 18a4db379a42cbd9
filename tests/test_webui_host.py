"""Training on a real WebUI's loaded model, in its own Python, for each model kind (SD1, SD2-v, SDXL):
skipped unless a WebUI 1.10.x is given (tests/webui_env.py says how). The WebUI loads tiny checkpoints
the tests make themselves; tests/webui_session.py trains a LoRA and a LoCon there and reports."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from webui_env import MODEL_KINDS, PYTHON, REPO, WEBUI, needs_webui, webui_folder_status
from webui_session import PARITY_CAPTIONS, PARITY_SIZES, conditioning_tensors

from lora_trainer_ext.hosts.standalone import load_checkpoint

pytestmark = [
    needs_webui,
    pytest.mark.timeout(900),
]
KINDS = {"sd1": "sd1", "sd2v": "sd2", "sdxl": "sdxl"}  # checkpoint -> the kind the WebUI loads it as
VERSIONS = {"sd1": "sd_v1", "sd2v": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}


# Each model kind, then the WebUI started the way users with 4-12 GB cards start it.
SESSIONS = [(kind, ()) for kind in MODEL_KINDS] + [("sd1", ("--medvram",)), ("sdxl", ("--medvram-sdxl",))]


@pytest.fixture(scope="module", params=SESSIONS, ids=lambda p: "-".join([p[0], *(f.strip("-") for f in p[1])]))
def session(request, webui_models, tmp_path_factory):
    # What the WebUI does for an extension at start: our install.py in its Python, from its folder.
    install = subprocess.run([PYTHON, str(REPO / "install.py")], cwd=WEBUI, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    model, flags = request.param
    folder = tmp_path_factory.mktemp(f"webui-{model}")
    result = folder / "result.json"
    checkpoint = webui_models.checkpoint(model)
    before = webui_folder_status()
    run = subprocess.run([PYTHON, str(REPO / "tests" / "webui_session.py"), str(REPO), str(folder), checkpoint,
                          str(result), *flags], cwd=WEBUI, env=webui_models.run_env(folder), capture_output=True,
                         text=True, timeout=840)
    assert run.returncode == 0 and result.is_file(), run.stdout[-3000:] + run.stderr[-3000:]
    assert webui_folder_status() == before, "the session changed the WebUI folder (its Lora folder, say)"
    return {**json.loads(result.read_text(encoding="utf-8")), "folder": folder, "checkpoint": checkpoint,
            "model": model, "medvram": bool(flags)}


def test_trains_a_lora_and_a_locon_on_the_loaded_model_and_gives_it_back_exactly(session):
    assert session["kind"] == KINDS[session["model"]]
    assert session["merged_changed_weights"] and session["image_merged"] != session["image_base"]
    assert session["unmerged_for_training"]  # the user's merged LoRA was taken out before training
    assert session["unchanged_after_lora"] and session["unchanged_after_locon"] and session["forwards_restored"]
    assert session["image_after"] == session["image_base"]  # the same picture as before any of this
    for network in ("lora", "locon"):  # 4 images x 2 repeats x 2 epochs / batch 1
        assert session[f"files_{network}"] == [f"lm-{network}-000001.safetensors", f"lm-{network}.safetensors"]
        assert session[f"steps_{network}"] == 16


def test_the_webuis_lora_extension_loads_every_key_and_the_render_changes(session):
    for network in ("lora", "locon"):
        assert session[f"unmatched_{network}"] == []  # the extension's DEBUG report of keys it could not place
        assert session[f"loaded_{network}"] == [f"lm-{network}"]
        assert session[f"image_{network}"] != session["image_base"]
        meta = session[f"meta_{network}"]
        assert meta["ss_base_model_version"] == VERSIONS[session["model"]]
        assert meta["ss_sd_model_name"] == Path(session["checkpoint"]).name
    lora, locon = session["keys_lora"], session["keys_locon"]
    assert set(lora) < set(locon) and any(k.endswith(("resnets_0_conv1", "in_layers_2")) for k in locon)  # convs too
    # The text encoders too, under kohya's names: OpenCLIP's fused attention (SD2's, SDXL's second) included.
    prefixes = ["lora_te1_", "lora_te2_"] if session["kind"] == "sdxl" else ["lora_te_"]
    for prefix in prefixes:
        layers = {k.removeprefix(prefix).split(".")[0] for k in lora if k.startswith(prefix)}
        assert {"text_model_encoder_layers_0_self_attn_q_proj", "text_model_encoder_layers_0_self_attn_v_proj",
                "text_model_encoder_layers_0_self_attn_out_proj", "text_model_encoder_layers_0_mlp_fc2"} <= layers
        # the last of the 2 layers: SD2 reads the penultimate one, and kohya's SD2 text encoder lacks it
        last = {"text_model_encoder_layers_1_self_attn_out_proj", "text_model_encoder_layers_1_mlp_fc2"}
        assert (last <= layers) if session["kind"] != "sd2" else not last & layers
    assert session["meta_lora"]["ss_text_encoder_lr"] == "0.0001"


def test_text_encoder_loras_act_where_they_were_trained(session):
    mismatch, effect = session["text_encoder_parity"]
    assert effect > 0.05 and mismatch < 1e-4 * max(1.0, effect)  # the WebUI's merge == our attached modules
    assert session["unchanged_after_parity"]


def test_the_file_records_the_hashes_the_webui_knows_and_its_state_is_kept(session):
    legacy, sha256, webui_legacy, webui_sha256, file_sha256 = session["model_hashes"]
    assert legacy == webui_legacy and len(legacy) == 8  # kohya's ss_sd_model_hash
    assert sha256 == webui_sha256 == file_sha256  # ss_new_sd_model_hash, as the WebUI computed it on load
    assert session["torch_rng_kept"] and session["embedders_kept"]  # SDXL's ucg_rate and the rest, as they were


def test_under_medvram_the_swapping_is_off_for_the_run_and_back_exactly_afterwards(session):
    if not session["medvram"]:
        assert session["medvram_before"] == session["medvram_in_training"] == session["medvram_after"] == [0, False, False]
        return
    hooks, wrapped, flag = session["medvram_before"]
    assert hooks >= 3 and wrapped and flag  # text encoders, VAE and UNet each swapped in by a hook
    assert session["medvram_in_training"] == [0, False, False]
    assert session["medvram_after"] == session["medvram_before"]  # and the picture is the same (the first test)


def test_what_cannot_train_in_place_is_refused(session):
    assert "--lowvram" in session["lowvram_refused"] and "--medvram" in session["lowvram_refused"]
    assert "SD Unet" in session["custom_unet_refused"]
    assert "fp8" in session["fp8_refused"]
    assert "SD3" in session["sd3_refused"]
    assert "no Stable Diffusion model is loaded" in session["no_model_refused"]


def test_token_merging_is_out_of_the_unet_while_it_trains_and_back_afterwards(session):
    assert session["tome_patched_before"] > 0
    assert session["tome_in_training"] == [0]
    assert session["tome_after"] == [0.5, session["tome_patched_before"]]


def test_a_missing_webui_name_turns_training_and_grids_off_and_says_which(session):
    if session["kind"] != "sd1":
        pytest.skip("checked once, with the SD1 model")
    assert session["host_problem"] is None  # this WebUI has every name
    assert "networks.network_apply_weights" in session["problem_when_renamed"]
    assert "networks.network_apply_weights" in session["tab_shows"]
    assert session["start_buttons_interactive"] == [False, False]
    assert session["studio_refused"] == session["problem_when_renamed"]


def test_captions_give_the_same_conditioning_on_both_hosts(session):
    theirs = load_file(str(session["folder"] / "conditioning.safetensors"))
    host = load_checkpoint(Path(session["checkpoint"]))
    ours = conditioning_tensors(host, PARITY_CAPTIONS, PARITY_SIZES)
    assert ours.keys() == theirs.keys() and ours["crossattn"].shape[:2] == (3, 3 * 77)  # BREAK, a long caption: 3 chunks
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=2e-5, atol=1e-5)  # float noise (torch 2.1 there)
    literal = conditioning_tensors(host, [c.replace("BREAK", "break") for c in PARITY_CAPTIONS], PARITY_SIZES)
    assert (literal["crossattn"] - theirs["crossattn"]).abs().max() > 0.01  # what BREAK changes is far above the noise


def test_noobai_v_pred_is_trained_as_v_and_the_plan_says_the_webui_samples_it_as_eps(session):
    if session["kind"] != "sdxl":
        pytest.skip("an SDXL family's marker")
    found = session["v_pred"]
    assert found["webui"] == "eps" and found["host"] == "v"  # WebUI 1.10.1 reads only a yaml; we read the key too
    assert len(found["notes"]) == 1 and "noobai-like-vpred.yaml" in found["notes"][0]


def test_pytorch_optimizer_installs_and_trains_in_the_webuis_python(session):
    if session["kind"] != "sd1":
        pytest.skip("once is enough")
    steps, written = session["came"]
    assert steps == 2 and written == "pytorch_optimizer.optimizer.came.CAME(weight_decay=0.04)"
