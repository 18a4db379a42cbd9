"""The Dataset sub-tab in real headless Chromium against the standalone app: scrape from a loopback
Gelbooru (its 401 shown as a toast first), review and trash, duplicates, tagging with the tiny ONNX
tagger, batch edit, undo and the per-image editor, each checked on disk. Screenshots of every stage
land in test-artifacts/."""

from __future__ import annotations

import io

import numpy as np
import tiny_onnx
from booru_server import FakePost, no_booru_credentials, serve_booru  # noqa: F401 (a fixture)
from browser import create_project
from PIL import Image

from lora_trainer_ext.dataset.captions import read_caption
from lora_trainer_ext.dataset.history import History
from lora_trainer_ext.dataset.images import IMAGE_EXTS
from lora_trainer_ext.headless import standalone_studio

KEY, USER = "secret-key", "4242"


def picture(colour: int, seed: int, fmt: str) -> bytes:
    """A strongly coloured 64x64 image (one RGB channel at 200-255, the others 0, so the tiny tagger
    sees that colour) with smooth random shapes that set its perceptual hash apart."""
    field = np.random.default_rng(seed).uniform(200, 255, (4, 4)).astype(np.uint8)
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:, :, colour] = np.asarray(Image.fromarray(field).resize((64, 64), Image.BICUBIC))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    return buf.getvalue()


RED, GREEN, BLUE = 0, 1, 2
POSTS = [
    FakePost(101, picture(RED, 1, "JPEG"), ".jpg", ["1girl", "solo", "red_hair"]),
    FakePost(102, picture(BLUE, 2, "PNG"), ".png", ["1girl", "solo", "blue_hair"]),
    FakePost(103, picture(GREEN, 3, "JPEG"), ".jpg", ["1girl", "solo", "comic"]),
    FakePost(104, picture(RED, 4, "JPEG"), ".jpg", ["1girl", "red_hair", "smile"]),
    # The picture of 101 again, saved as PNG: other bytes (so both are downloaded), the same image.
    FakePost(105, picture(RED, 1, "PNG"), ".png", ["1girl", "solo", "red_hair"]),
]


def names(folder) -> list[str]:
    """The images in a folder (dataset/ or trash/)."""
    return sorted(p.name for p in folder.iterdir() if p.suffix in IMAGE_EXTS) if folder.is_dir() else []


def captions(project) -> dict[str, str | None]:
    return {image.name: read_caption(image) for image in project.images()}


def subtab(page, name: str) -> None:
    page.locator("#lora_maker_dataset_tabs > .tab-nav button", has_text=name).click()


def wait_job(page, kind: str) -> None:
    page.wait_for_selector(f"#lora_maker_job_status[data-kind={kind}][data-state=done]", timeout=30_000)


def see(page, selector: str, text: str, timeout: float = 15_000) -> None:
    """Wait until the element's text (or its text box) contains `text`: gradio updates come asynchronously."""
    page.wait_for_function(
        """([s, t]) => {
            const e = document.querySelector(s);
            const boxes = e ? Array.from(e.querySelectorAll("textarea, input"), box => box.value) : [];
            return e && [e.innerText, ...boxes].some(text => text.includes(t));
        }""", arg=[selector, text], timeout=timeout)


def fill_tag_form(page, tagger_dir, existing: str) -> None:
    """The Tag part, set to tag with the tagger in `tagger_dir` and do `existing` with captions there."""
    subtab(page, "Tag")
    tagger_input = page.locator("#lora_maker_dataset_tagger input")
    tagger_input.fill(str(tagger_dir))
    tagger_input.press("Enter")
    page.locator("#lora_maker_dataset_existing label", has_text=existing).click()


def test_dataset_tab_end_to_end(tmp_path, open_ui, no_booru_credentials):  # noqa: F811
    tagger_dir = tiny_onnx.write_tagger(tmp_path / "tiny-tagger")
    studio = standalone_studio(root=tmp_path / "projects", lora_dir=tmp_path / "lora", model_cache=tmp_path / "cache")
    with serve_booru(POSTS) as server:
        server.credentials = (KEY, USER)
        ui = open_ui(studio)
        page = ui.page

        # A new project.
        create_project(page, "mychar")
        project = studio.project("mychar")

        # Scrape: without credentials Gelbooru answers 401, which shows as the error toast.
        page.fill("#lora_maker_dataset_tags textarea", "1girl")
        page.fill("#lora_maker_dataset_limit input", "10")
        page.click("#lora_maker_dataset_advanced .label-wrap")  # open the accordion
        page.fill("#lora_maker_dataset_api_url textarea", server.base("gelbooru"))
        page.click("#lora_maker_dataset_count")
        toast = page.locator(".toast-body", has_text="Gelbooru refused the request (HTTP 401)")
        toast.wait_for()
        assert "API key and user id" in toast.inner_text()
        assert page.locator("#lora_maker_dataset_download").is_disabled()
        page.wait_for_function("() => getComputedStyle(document.querySelector('.toast-body')).opacity === '1'")  # faded in
        ui.shot("scrape-401")
        page.locator(".toast-body .toast-close").click()

        page.fill("#lora_maker_dataset_api_key input", KEY)
        page.fill("#lora_maker_dataset_user_id input", USER)
        page.click("#lora_maker_dataset_count")
        see(page, "#lora_maker_dataset_preview", "Will download 5 (limit 10)")
        download = page.locator("#lora_maker_dataset_download")
        page.wait_for_function("() => !document.querySelector('#lora_maker_dataset_download').disabled")
        assert download.inner_text().strip() == "Download 5 images"
        ui.shot("scrape-counted")
        download.click()
        wait_job(page, "scrape")
        assert names(project.dataset_dir) == ["gelbooru_101.jpg", "gelbooru_102.png", "gelbooru_103.jpg",
                                              "gelbooru_104.jpg", "gelbooru_105.png"]
        assert read_caption(project.dataset_dir / "gelbooru_103.jpg") == "1girl, solo, comic"

        # Review: the finished scrape refreshed the gallery; mark the comic and trash it.
        subtab(page, "Review")
        thumbs = page.locator("#lora_maker_dataset_gallery .thumbnail-item")
        page.wait_for_function("() => document.querySelectorAll('#lora_maker_dataset_gallery .thumbnail-item').length === 5")
        sources = [thumbs.nth(i).locator("img").get_attribute("src") for i in range(5)]
        assert all("/file=" in src and src.endswith(".jpg") for src in sources)  # thumbnails, not the originals
        page.locator('#lora_maker_dataset_gallery img[alt^="gelbooru_103.jpg"]').click()
        page.wait_for_selector('#lora_maker_dataset_gallery img[alt^="[trash] gelbooru_103.jpg"]')
        see(page, "#lora_maker_dataset_marked", "gelbooru_103.jpg")
        ui.shot("review-marked")
        page.click("#lora_maker_dataset_move_marked")
        see(page, "#lora_maker_dataset_review_message", "Moved 1 image to the trash")
        assert "gelbooru_103.jpg" not in names(project.dataset_dir)
        assert names(project.trash_dir) == ["gelbooru_103.jpg"] and (project.trash_dir / "gelbooru_103.txt").exists()
        page.wait_for_function("() => document.querySelectorAll('#lora_maker_dataset_gallery .thumbnail-item').length === 4")

        # Duplicates: 101 and 105 are one picture; the PNG (lossless) stays.
        subtab(page, "Duplicates")
        page.click("#lora_maker_dataset_find_dupes")
        see(page, "#lora_maker_dataset_dupes", "1 group: 1 duplicate would go")
        assert page.locator("#lora_maker_dataset_dupes figure.keep figcaption").inner_text().endswith("gelbooru_105.png")
        assert page.locator("#lora_maker_dataset_dupes figure.dupe figcaption").inner_text().endswith("gelbooru_101.jpg")
        ui.shot("duplicates")
        page.click("#lora_maker_dataset_trash_dupes")
        see(page, "#lora_maker_dataset_dupes", "Moved 1 duplicate to the trash")
        assert names(project.dataset_dir) == ["gelbooru_102.png", "gelbooru_104.jpg", "gelbooru_105.png"]

        # Tag with the tiny tagger from its folder, replacing the booru's tags.
        fill_tag_form(page, tagger_dir, "overwrite")
        ui.shot("tag-form")
        page.click("#lora_maker_dataset_tag")
        see(page, "#lora_maker_dataset_tag_message", "Started")
        wait_job(page, "tag")
        tagged = captions(project)
        assert tagged["gelbooru_102.png"].startswith("blue theme") and tagged["gelbooru_104.jpg"].startswith("red theme")
        assert History(project).edits()[-1].description == "tag with tiny-tagger"

        # Curate: the table counts the tags; the activation tag goes first in the red images only.
        subtab(page, "Curate")
        see(page, "#lora_maker_dataset_tag_table", "red theme")
        # Sorted by a header click, a click on a tag adds the tag shown to the chosen field.
        table = page.locator("#lora_maker_dataset_tag_table")
        table.locator("thead th").first.locator(".sort-button").click()
        first = table.locator("tbody tr").first.locator("td").first
        shown_first = first.inner_text().strip()
        assert shown_first == min(tag for caption in tagged.values() for tag in caption.split(", "))
        first.click()
        page.wait_for_function("([s, t]) => document.querySelector(s).value === t",
                               arg=["#lora_maker_dataset_remove textarea", shown_first])
        page.fill("#lora_maker_dataset_remove textarea", "")
        page.fill("#lora_maker_dataset_filter_include textarea", "red theme")
        page.press("#lora_maker_dataset_filter_include textarea", "Enter")
        see(page, "#lora_maker_dataset_filter_note", "2 of 3 images selected")
        page.fill("#lora_maker_dataset_activation textarea", "mychar")
        ui.shot("curate-filtered")
        page.click("#lora_maker_dataset_apply")
        see(page, "#lora_maker_dataset_curate_message", "Changed 2 captions")
        edited = captions(project)
        assert edited["gelbooru_104.jpg"] == "mychar, " + tagged["gelbooru_104.jpg"]
        assert edited["gelbooru_105.png"] == "mychar, " + tagged["gelbooru_105.png"]
        assert edited["gelbooru_102.png"] == tagged["gelbooru_102.png"]
        assert project.settings()["dataset"] == {"activation_tags": ["mychar"], "keep_tokens": 1}
        see(page, "#lora_maker_dataset_history", "activation mychar")
        ui.shot("curate-applied")
        subtab(page, "Review")  # the other parts follow the edit
        page.wait_for_selector(f'#lora_maker_dataset_gallery img[alt="gelbooru_104.jpg · {edited["gelbooru_104.jpg"]}"]')
        subtab(page, "Curate")
        page.click("#lora_maker_dataset_undo")
        see(page, "#lora_maker_dataset_curate_message", "Undid")
        assert captions(project) == tagged
        ui.shot("curate-undone")

        # The per-image editor: a click opens the image, Save writes its caption (undoably).
        subtab(page, "Review")
        page.locator("#lora_maker_dataset_click label", has_text="caption editor").click()
        page.locator('#lora_maker_dataset_gallery img[alt^="gelbooru_102.png"]').click()
        page.wait_for_function("([s, t]) => document.querySelector(s).value === t",
                               arg=["#lora_maker_dataset_caption textarea", tagged["gelbooru_102.png"]])
        page.fill("#lora_maker_dataset_caption textarea", "blue theme, custom tag")
        page.click("#lora_maker_dataset_save_caption")
        see(page, "#lora_maker_dataset_review_message", "Saved the caption of gelbooru_102.png")
        assert read_caption(project.dataset_dir / "gelbooru_102.png") == "blue theme, custom tag"
        page.wait_for_selector('#lora_maker_dataset_gallery img[alt="gelbooru_102.png · blue theme, custom tag"]')
        ui.shot("review-editor")

        # Restore everything from the trash.
        page.click("#lora_maker_dataset_trash .label-wrap")
        see(page, "#lora_maker_dataset_trash_list", "removed in the tab")
        page.click("#lora_maker_dataset_restore_all")
        see(page, "#lora_maker_dataset_review_message", "Restored 2 images")
        assert len(names(project.dataset_dir)) == 5 and not names(project.trash_dir)

        # A reloaded page shows the project's images again at once.
        page.reload()
        subtab(page, "Review")
        page.wait_for_function("() => document.querySelectorAll('#lora_maker_dataset_gallery .thumbnail-item').length === 5")

        # Check: the report on what would trip up training.
        subtab(page, "Check")
        page.click("#lora_maker_dataset_check")
        see(page, "#lora_maker_dataset_report", "5 images")
        ui.shot("check")

    assert all("iframeResizer" in url for url in ui.blocked), ui.blocked  # only gradio's CDN script

