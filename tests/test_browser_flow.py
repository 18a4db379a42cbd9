"""Issue 4's "done when", in real headless Chromium on the standalone app with a tiny SD1 checkpoint: a
newcomer makes a LoRA from a tag query to saved epochs without leaving the tab. Create a project,
scrape a loopback Safebooru, trash an image, tag with the tiny ONNX tagger, set an activation tag,
fill the training form, start, stop and save, resume, finish, and find the epochs in Test; then the
files and their kohya metadata are checked on disk. Screenshots of every stage land in test-artifacts/."""

from __future__ import annotations

import json

import pytest
import tiny_onnx
from booru_server import FakePost, no_booru_credentials, serve_booru  # noqa: F401 (a fixture)
from browser import create_project
from test_browser_dataset import BLUE, GREEN, RED, captions, fill_tag_form, names, picture, see, subtab, wait_job
from test_browser_train import PLAN, fill, pick, steps_shown
from tiny_hosts import make_checkpoint

from lora_trainer_ext.headless import standalone_studio
from lora_trainer_ext.training.lora_file import read_lora

pytestmark = pytest.mark.timeout(300)
STATUS = "#lora_maker_job_status"
# Five different 64x64 pictures (one colour each, random shapes): big enough for 64 px training.
POSTS = [
    FakePost(201, picture(RED, 11, "JPEG"), ".jpg", ["1girl", "solo", "red_hair"]),
    FakePost(202, picture(BLUE, 12, "PNG"), ".png", ["1girl", "solo", "blue_hair"]),
    FakePost(203, picture(GREEN, 13, "JPEG"), ".jpg", ["1girl", "comic"]),
    FakePost(204, picture(RED, 14, "JPEG"), ".jpg", ["1girl", "smile"]),
    FakePost(205, picture(BLUE, 15, "PNG"), ".png", ["1girl", "solo"]),
]
REPEATS, EPOCHS = 30, 3  # 4 images x 30 repeats x 3 epochs / batch 2 = 180 steps: a few seconds on a CPU


def main_tab(page, name: str) -> None:
    page.locator("#lora_maker_tabs > .tab-nav button", has_text=name).click()


def test_a_newcomer_makes_a_lora_from_a_tag_query_without_leaving_the_tab(tmp_path, open_ui,
                                                                         no_booru_credentials):  # noqa: F811
    tagger_dir = tiny_onnx.write_tagger(tmp_path / "tiny-tagger")
    lora_dir = tmp_path / "lora"
    studio = standalone_studio(checkpoint=make_checkpoint(tmp_path / "model", "sd1"), root=tmp_path / "projects",
                               lora_dir=lora_dir, model_cache=tmp_path / "cache")
    with serve_booru(POSTS) as server:
        ui = open_ui(studio)
        page = ui.page

        # A project.
        create_project(page, "alice")
        project = studio.project("alice")

        # Scrape: Safebooru (no account needed) at the loopback mirror; Count, then Download.
        page.click("#lora_maker_dataset_booru input")
        page.click("#lora_maker_dataset_booru ul.options li:has-text('safebooru')")
        page.fill("#lora_maker_dataset_tags textarea", "1girl")
        page.fill("#lora_maker_dataset_limit input", "10")
        page.click("#lora_maker_dataset_advanced .label-wrap")  # open the accordion
        page.fill("#lora_maker_dataset_api_url textarea", server.base("safebooru"))
        page.click("#lora_maker_dataset_count")
        see(page, "#lora_maker_dataset_preview", "Will download 5 (limit 10)")
        page.wait_for_function("() => !document.querySelector('#lora_maker_dataset_download').disabled")
        ui.shot("scrape-counted")
        page.click("#lora_maker_dataset_download")
        wait_job(page, "scrape")
        downloaded = ["safebooru_201.jpg", "safebooru_202.png", "safebooru_203.jpg", "safebooru_204.jpg",
                      "safebooru_205.png"]
        assert names(project.dataset_dir) == downloaded
        ui.shot("scrape-done")

        # Review: mark the comic, move it to the trash.
        subtab(page, "Review")
        page.wait_for_function("() => document.querySelectorAll('#lora_maker_dataset_gallery .thumbnail-item').length === 5")
        page.locator('#lora_maker_dataset_gallery img[alt^="safebooru_203.jpg"]').click()
        page.wait_for_selector('#lora_maker_dataset_gallery img[alt^="[trash] safebooru_203.jpg"]')
        ui.shot("review-marked")
        page.click("#lora_maker_dataset_move_marked")
        see(page, "#lora_maker_dataset_review_message", "Moved 1 image to the trash")
        page.wait_for_function("() => document.querySelectorAll('#lora_maker_dataset_gallery .thumbnail-item').length === 4")
        assert names(project.trash_dir) == ["safebooru_203.jpg"]
        kept = [n for n in downloaded if n != "safebooru_203.jpg"]
        assert names(project.dataset_dir) == kept
        ui.shot("review-trashed")

        # Tag with the tiny tagger from its folder, after the booru's tags.
        fill_tag_form(page, tagger_dir, "append")
        page.click("#lora_maker_dataset_tag")
        see(page, "#lora_maker_dataset_tag_message", "Started")
        wait_job(page, "tag")
        tagged = captions(project)
        assert tagged["safebooru_201.jpg"].startswith("1girl, solo, red")
        assert "red theme" in tagged["safebooru_201.jpg"] and "blue theme" in tagged["safebooru_202.png"]
        ui.shot("tagged")

        # Curate: the activation tag goes first in every caption.
        subtab(page, "Curate")
        see(page, "#lora_maker_dataset_tag_table", "red theme")
        page.fill("#lora_maker_dataset_activation textarea", "alicechan")
        page.click("#lora_maker_dataset_apply")
        see(page, "#lora_maker_dataset_curate_message", "Changed 4 captions")
        assert captions(project) == {name: f"alicechan, {caption}" for name, caption in tagged.items()}
        ui.shot("curated")

        # Train: tiny settings typed into the form.
        main_tab(page, "Train")
        # The plan counts the dataset as it is now (the project was opened while it was empty).
        steps_shown(page, 4 * 10 * 10 // 2)  # the default 10 repeats x 10 epochs, batch 2
        page.click("#lora_maker_train_more_images_captions .label-wrap")  # min/max bucket live under "More"
        for key, value in (("resolution", 64), ("min_bucket", 64), ("max_bucket", 128), ("repeats", REPEATS),
                           ("epochs", EPOCHS), ("dim", 4), ("alpha", 4), ("unet_lr", "0.001")):
            fill(page, key, value)
        pick(page, "lr_scheduler", "constant")
        pick(page, "mixed_precision", "no")
        # No grid after training here: rendering one on the CPU takes minutes (the Test tab's own test renders one).
        page.uncheck("#lora_maker_train_grid input[type=checkbox]")
        total = 4 * REPEATS * EPOCHS // 2
        steps_shown(page, total)
        assert f"4 images x {REPEATS} repeats x {EPOCHS} epochs / batch 2 = {total} steps" in page.inner_text(PLAN)
        ui.shot("train-form")

        # Start; the job panel shows the run: its phase, steps and the loss chart.
        page.click("#lora_maker_train_start")
        page.wait_for_selector(f"{STATUS}[data-kind=train][data-state=running] .lora-maker-loss-chart", timeout=60_000)
        facts = page.inner_text(f"{STATUS} .lora-maker-job-facts")
        assert facts.startswith("training") and f"/{total}" in facts and "loss" in facts
        ui.shot("training")
        page.click("#lora_maker_job_stop_save")
        page.wait_for_selector(f"{STATUS}[data-state=stopped]", timeout=60_000)
        page.wait_for_selector("#lora_maker_train_resume", state="visible")
        stopped = studio.jobs.current()
        assert stopped.status.step < total, "the run ended before Stop and save: make it longer"
        step_file = f"alice-step{stopped.status.step:08d}.safetensors"  # what "and save" saved
        assert (lora_dir / "alice" / step_file).is_file()
        ui.shot("stopped")

        # Resume to the end.
        page.click("#lora_maker_train_resume")
        page.wait_for_function(f"(el => el && el.dataset.job !== '{stopped.id}' && el.dataset.state === 'done')"
                               f"(document.querySelector('{STATUS}'))", timeout=120_000)
        assert f"{total}/{total}" in page.inner_text(STATUS)
        page.wait_for_selector("#lora_maker_train_resume", state="hidden")
        ui.shot("resumed-done")

        # Test: the epochs in order (the stopped run's step file among them), then the final LoRA.
        main_tab(page, "Test")
        page.click("#lora_maker_test_files_box .label-wrap")  # open the accordion
        epochs = ["alice-000001.safetensors", "alice-000002.safetensors", "alice.safetensors"]
        see(page, "#lora_maker_test_files", "alice.safetensors")
        listed = page.locator("#lora_maker_test_files tr td:first-child").all_inner_texts()
        assert listed == [*epochs[:2], step_file, epochs[2]]
        ui.shot("test-files")

    # On disk: the files, with the activation tag and the images trained (the trashed one left out).
    assert sorted(p.name for p in (lora_dir / "alice").glob("*.safetensors")) == sorted([*epochs, step_file])
    for number, name in enumerate(epochs, 1):
        _, meta = read_lora(lora_dir / "alice" / name)
        assert meta["ss_epoch"] == str(number) and meta["ss_output_name"] == "alice"
        [frequency] = json.loads(meta["ss_tag_frequency"]).values()
        assert frequency["alicechan"] == 4 and "comic" not in frequency  # the trashed image's tag
        assert meta["ss_num_train_images"] == str(len(kept) * REPEATS)
        assert [d["img_count"] for d in json.loads(meta["ss_dataset_dirs"]).values()] == [len(kept)]
        assert meta["modelspec.trigger_phrase"] == "alicechan"
    assert meta["ss_steps"] == str(total)
    assert all("iframeResizer" in url for url in ui.blocked), ui.blocked  # only gradio's CDN script
