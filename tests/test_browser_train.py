"""The Train sub-tab in a real headless Chromium, on the standalone app with a tiny SD1 checkpoint:
live step arithmetic, presets, validation messages, saving, and real training runs started, stopped
with "Stop and save", resumed and finished from the page."""

from __future__ import annotations

import json

import pytest
from conftest import add_image
from test_trainer import FAST
from tiny_hosts import make_checkpoint

from lora_trainer_ext.headless import standalone_studio

pytestmark = pytest.mark.timeout(300)
PLAN = "#lora_maker_train_plan_box"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("model"), "sd1")


@pytest.fixture
def studio(checkpoint, tmp_path):
    studio = standalone_studio(checkpoint=checkpoint, root=tmp_path / "projects", lora_dir=tmp_path / "lora",
                               model_cache=tmp_path / "cache")
    project = studio.project("demo", create=True)
    for i, size in enumerate([(64, 64), (64, 64), (96, 64), (64, 96)]):
        add_image(project, f"{i}.png", "mychar, 1girl, smile", size=size, seed=i)
    project.update_settings(dataset={"activation_tags": ["mychar"], "keep_tokens": 1})
    return studio


def open_train_tab(open_ui, studio):
    ui = open_ui(studio)
    ui.page.click("#lora_maker_tabs .tab-nav button:has-text('Train')")
    ui.page.wait_for_selector(f"{PLAN} .lora-maker-train-line")
    return ui


def fill(page, key: str, value) -> None:
    page.fill(f"#lora_maker_train_{key} :is(input, textarea)", str(value))


def pick(page, key: str, option: str) -> None:
    page.click(f"#lora_maker_train_{key} input")
    page.click(f"#lora_maker_train_{key} ul.options li:has-text('{option}')")


def steps_shown(page, steps: int) -> None:
    page.wait_for_selector(f"{PLAN} .lora-maker-train-line[data-steps='{steps}']")


def test_settings_form_arithmetic_presets_validation_and_saving(open_ui, studio, tmp_path):
    ui = open_train_tab(open_ui, studio)
    page = ui.page
    steps_shown(page, 200)  # the defaults: 4 images x 10 repeats x 10 epochs / batch 2, in 3 buckets (2, 1, 1)
    assert "4 images x 10 repeats x 10 epochs / batch 2 = 200 steps" in page.inner_text(PLAN)
    assert "below the guide's 250-1000" in page.inner_text(PLAN)
    vram_text = page.inner_text("#lora_maker_train_vram_box")
    assert "VRAM estimate" in vram_text and "for the SD1 model training uses" in vram_text and "GiB" in vram_text
    assert str(tmp_path / "lora" / "demo") in page.inner_text("#lora_maker_train_output")
    ui.shot("loaded")

    fill(page, "epochs", 20)
    steps_shown(page, 400)
    fill(page, "repeats", 5)  # odd: the 1-image buckets' half batches round up
    steps_shown(page, 220)
    assert "4 images x 5 repeats x 20 epochs / batch 2 = 200 steps (220 with batches filled per bucket)" in page.inner_text(PLAN)
    fill(page, "max_steps", 300)
    steps_shown(page, 300)
    assert "300 steps = about 28 epochs" in page.inner_text(PLAN)
    fill(page, "max_steps", "")
    page.click("#lora_maker_train_epochs input")  # a cleared box speaks on blur
    steps_shown(page, 220)
    ui.shot("arithmetic")

    pick(page, "purpose", "style")
    pick(page, "tier", "12 GB")
    page.click("#lora_maker_train_apply_preset")
    page.wait_for_function("document.querySelector('#lora_maker_train_network input').value === 'locon'")
    steps_shown(page, 900)  # style aims at 900 steps: 4 images x 30 repeats x 15 epochs / batch 2
    assert page.input_value("#lora_maker_train_repeats input") == "30"
    assert page.input_value("#lora_maker_train_text_encoder_lr input") == "0"
    note = page.inner_text("#lora_maker_train_preset_note")
    assert "style: LoCon 16/8 + conv 8/4" in note and "12 GB: batch 2" in note
    ui.shot("preset")

    # An optimizer with the preset: the notebooks' recommended values, in the form to read and edit.
    pick(page, "preset_optimizer", "Prodigy")
    page.click("#lora_maker_train_apply_preset")
    page.wait_for_function("document.querySelector('#lora_maker_train_unet_lr input').value === '0.5'")
    args = page.input_value("#lora_maker_train_optimizer_args textarea")
    assert "d_coef=2" in args and "safeguard_warmup=True" in args
    assert page.input_value("#lora_maker_train_text_encoder_lr input") == "0"  # a style LoRA stays UNet only
    assert page.input_value("#lora_maker_train_lr_scheduler input") == "constant_with_warmup"
    assert page.input_value("#lora_maker_train_alpha input") == page.input_value("#lora_maker_train_dim input")
    assert "Prodigy with the notebooks' recommended values" in page.inner_text("#lora_maker_train_preset_note")
    page.wait_for_selector(f"{PLAN}:has-text('optimizer Prodigy (weight_decouple=True')")
    fill(page, "optimizer_args", "d_coef=")  # a textbox: its messages in place too
    page.click("#lora_maker_train_dim input")
    page.wait_for_selector(f"{PLAN} [data-invalid]:has-text('optimizer argument d_coef has no value')")
    fill(page, "optimizer_args", "")
    page.click("#lora_maker_train_dim input")
    page.wait_for_selector(f"{PLAN}:has-text(\"the notebooks' recommended arguments\")")

    fill(page, "dim", 0)
    page.wait_for_selector(f"{PLAN} [data-invalid]:has-text('dim must be at least 1 (got 0)')")
    fill(page, "unet_lr", "")
    page.click("#lora_maker_train_dim input")
    page.wait_for_selector(f"{PLAN} [data-invalid]:has-text('setting unet_lr needs a value')")
    assert page.locator(".toast-body").count() == 0  # typing shows messages in place, never toasts
    ui.shot("invalid")
    fill(page, "unet_lr", "0.0002")
    fill(page, "dim", 8)
    steps_shown(page, 900)

    page.click("#lora_maker_train_save")
    page.wait_for_selector("#lora_maker_train_message:has-text('Saved to')")
    saved = json.loads((tmp_path / "projects" / "demo" / "settings.json").read_text(encoding="utf-8"))["train"]
    assert (saved["network"], saved["dim"], saved["unet_lr"], saved["repeats"], saved["epochs"]) == ("locon", 8, 2e-4, 30, 15)
    assert "max_steps" not in saved and saved["gradient_checkpointing"] is False  # defaults are not written down
    ui.shot("saved")

    page.click("#lora_maker_train_reset")
    steps_shown(page, 200)
    page.click("#lora_maker_train_load")
    steps_shown(page, 900)
    assert page.input_value("#lora_maker_train_dim input") == "8"


def test_training_runs_stops_and_saves_resumes_and_finishes(open_ui, studio, tmp_path):
    studio.project("demo").update_settings(train=FAST)  # tiny and quick: 64 px, a few steps
    ui = open_train_tab(open_ui, studio)
    page = ui.page
    page.wait_for_selector(f"{PLAN}:has-text('x 2 repeats x 2 epochs / batch 2')")  # saved settings, loaded
    assert page.is_hidden("#lora_maker_train_resume")
    page.uncheck("#lora_maker_train_grid input[type=checkbox]")  # training only (tests/test_browser_test_tab.py has grids)
    page.click("#lora_maker_train_start")
    page.wait_for_selector("#lora_maker_job_status[data-state=done]", timeout=120_000)
    assert (tmp_path / "lora" / "demo" / "demo.safetensors").is_file()
    ui.shot("done")

    fill(page, "repeats", 40)  # long enough to stop halfway
    page.wait_for_selector(f"{PLAN}:has-text('x 40 repeats')")
    total = page.get_attribute(f"{PLAN} .lora-maker-train-line", "data-steps")
    page.click("#lora_maker_train_start")
    page.wait_for_function("(document.querySelector('#lora_maker_job_status[data-state=running]')"
                           " || {innerText: ''}).innerText.includes('training')")
    page.click("#lora_maker_job_stop_save")
    page.wait_for_selector("#lora_maker_job_status[data-state=stopped]", timeout=60_000)
    page.wait_for_selector("#lora_maker_train_resume", state="visible")
    assert list((tmp_path / "lora" / "demo").glob("demo-step*.safetensors"))  # "and save" saved one
    stopped_job = page.get_attribute("#lora_maker_job_status", "data-job")
    ui.shot("stopped")

    page.click("#lora_maker_train_resume")
    page.wait_for_function(f"(el => el && el.dataset.job !== '{stopped_job}' && el.dataset.state === 'done')"
                           "(document.querySelector('#lora_maker_job_status'))", timeout=120_000)
    assert f"{total}/{total}" in page.inner_text("#lora_maker_job_status")
    assert page.locator("#lora_maker_job_status .lora-maker-loss-chart").count() == 1
    page.wait_for_selector("#lora_maker_train_resume", state="hidden")
    ui.shot("resumed")
