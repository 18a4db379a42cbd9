"""The Dataset sub-tab's view helpers on real project folders (paging, cached thumbnails, gallery
labels, the tag table, batch-edit parsing, duplicate groups, trash and history HTML), and that a
missing optional package disables only the feature that needs it. The browser test drives the tab."""

from __future__ import annotations

import os
import sys

import pytest
from conftest import add_image
from PIL import Image

from lora_trainer_ext.dataset import captioner, dedupe, tagger
from lora_trainer_ext.dataset.curate import Edits, Filter, load_captions, set_caption
from lora_trainer_ext.dataset.history import History
from lora_trainer_ext.dataset.trash import TrashEntry
from lora_trainer_ext.errors import LoraMakerError
from lora_trainer_ext.headless import standalone_studio
from lora_trainer_ext.tab import build_tab
from lora_trainer_ext.tab import dataset_views as views
from lora_trainer_ext.tab.context import unavailable
from lora_trainer_ext.tab.dataset_scrape import signature


def test_pages():
    assert [views.page_count(n) for n in (0, 1, 40, 41, 200)] == [1, 1, 1, 2, 5]
    assert views.clamp_page(None, 100) == 1 and views.clamp_page("2", 100) == 2
    assert views.clamp_page(-3, 100) == 1 and views.clamp_page(99, 100) == 3 and views.clamp_page(2.0, 100) == 2
    assert views.page_of(list(range(100)), 3) == list(range(80, 100))
    assert views.page_of(list(range(100)), 7) == list(range(80, 100))  # past the end: the last page
    assert views.page_note(3, 100) == "page 3 of 3 · images 81-100 of 100"
    assert views.page_note(1, 0) == "no images"
    assert views.counted(1, "image") == "1 image" and views.counted(0, "image") == "0 images"


def test_thumbnails_are_small_cached_and_remade_when_the_image_changes(project):
    image = add_image(project, "big.png", size=(1200, 800))
    thumb = views.thumbnail(project, image)
    assert thumb.parent == project.cache_dir / "thumbs"
    with Image.open(thumb) as img:
        assert img.format == "JPEG" and img.size == (256, 171)
    made = thumb.stat().st_mtime_ns
    assert views.thumbnail(project, image) == thumb and thumb.stat().st_mtime_ns == made  # reused

    image.write_bytes(Image.new("RGBA", (300, 300), (0, 0, 0, 0))._repr_png_())  # transparent now
    os.utime(image, ns=(made + 10**9, made + 10**9))
    fresh = views.thumbnail(project, image)
    assert fresh != thumb and not thumb.exists()  # the stale one is gone
    with Image.open(fresh) as img:
        assert img.size == (256, 256) and min(img.convert("RGB").getpixel((128, 128))) > 245  # on white

    assert views.thumbnail(project, image, views.DUPE_SIDE) != fresh  # each size has its own


def test_unreadable_images_get_a_placeholder(project):
    broken = project.dataset_dir / "broken.png"
    broken.write_bytes(b"not an image at all")
    assert views.thumbnail(project, broken).name == "unreadable-256.png"
    assert views.thumbnail(project, project.dataset_dir / "gone.png").name == "unreadable-256.png"


def test_gallery_items_show_names_captions_and_marks(project):
    add_image(project, "a.png", "1girl, smile")
    add_image(project, "b.png", seed=1)
    add_image(project, "c.png", seed=2)
    (project.dataset_dir / "c.txt").write_bytes(b"\xff\xfe bad")  # not UTF-8
    items = views.gallery_items(project, project.images(), marked=["b.png"])
    assert [label for _, label in items] == [
        "a.png · 1girl, smile", "[trash] b.png · (no caption)",
        "c.png · (unreadable caption: c.txt is not UTF-8 text; re-save it as UTF-8)"]
    assert all(os.path.dirname(path) == str(views.thumbs_dir(project)) for path, _ in items)
    assert [p.name for p in views.shown_images(project, "Smile")] == ["a.png"]
    assert len(views.shown_images(project, " ")) == 3


def test_marks_toggle():
    assert views.toggled(["a.png"], "b.png") == ["a.png", "b.png"]
    assert views.toggled(["a.png", "b.png"], "a.png") == ["b.png"]


def test_frequency_rows_follow_the_filter(project):
    add_image(project, "a.png", "1girl, smile, hat")
    add_image(project, "b.png", "1girl, smile", seed=1)
    add_image(project, "c.png", "1boy, hat", seed=2)
    captions = load_captions(project)
    assert views.frequency_rows(captions, Filter()) == ([["1girl", 2], ["hat", 2], ["smile", 2], ["1boy", 1]], 3)
    rows, selected = views.frequency_rows(captions, views.make_filter("1girl", "hat", "all"))
    assert (rows, selected) == ([["1girl", 1], ["smile", 1]], 1)
    rows, selected = views.frequency_rows(captions, views.make_filter("1boy, smile", "", "any"))
    assert selected == 3 and dict(rows)["hat"] == 2


def test_batch_edit_form(project):
    edits = views.make_edits("mychar", "bad, worse", "a, b => c\n\n d =>", "new tag", True, False)
    assert edits == Edits(remove=["bad", "worse"], replace=[(["a", "b"], ["c"]), (["d"], [])], append=["new tag"],
                          dedupe=True, sort=False, activation=["mychar"])
    assert views.make_edits("", "", "", "", False, False) == Edits()
    with pytest.raises(LoraMakerError, match="old tags => new tags"):
        views.make_edits("", "", "a, b", "", False, False)


def test_duplicate_groups_inline_small_thumbnails(project):
    add_image(project, "a.png", size=(300, 200))
    add_image(project, "b.jpg", size=(150, 100))  # the same picture, smaller
    add_image(project, "c.png", seed=5)
    groups = dedupe.find_groups(dedupe.scan(project))
    page = views.duplicates_html(project, groups)
    assert page.startswith("<p>1 group: 1 duplicate would go to the trash")
    assert page.count("data:image/jpeg;base64,") == 2
    assert 0 < page.index("keep 300x200<br>a.png") < page.index("bits apart<br>b.jpg")
    assert views.duplicates_html(project, []) == '<p class="lora-maker-note">No duplicates at this threshold.</p>'


def test_trash_and_history_are_escaped_and_newest_first(project):
    assert "empty" in views.trash_html([])
    html = views.trash_html([TrashEntry("a.png", "a.png", "<b>why</b>", "2025-01-01 00:00:00")])
    assert "&lt;b&gt;why&lt;/b&gt;" in html and "<b>" not in html

    add_image(project, "a.png", "one")
    assert views.history_html([]) == '<p class="lora-maker-note">No edits yet.</p>'
    for text in ("two", "three", "<four>"):
        set_caption(project, "a.png", text)
    html = views.history_html(History(project).edits(), shown=2)
    assert html.index("#3") < html.index("#2") and "#1" not in html and "and 1 older" in html
    assert "(1 file)" in html


def test_undo_message(project):
    add_image(project, "a.png", "one")
    assert views.undo_message(History(project).undo()) == "Nothing to undo."
    set_caption(project, "a.png", "two")
    assert views.undo_message(History(project).undo()) == "Undid #1 'edit caption of a.png' (1 file restored)."
    assert (project.dataset_dir / "a.txt").read_text() == "one"


def test_scrape_preview_signature():
    base = signature("p", "gelbooru", "1girl  solo", 10, "", "", "")
    assert signature("p", "gelbooru", " 1girl solo ", 10.0, " ", "", "") == base
    changed = [signature("q", "gelbooru", "1girl solo", 10, "", "", ""), signature("p", "safebooru", "1girl solo", 10, "", "", ""),
               signature("p", "gelbooru", "1girl", 10, "", "", ""), signature("p", "gelbooru", "1girl solo", 11, "", "", ""),
               signature("p", "gelbooru", "1girl solo", 10, "http://127.0.0.1:1", "", ""),
               signature("p", "gelbooru", "1girl solo", 10, "", "k", ""), signature("p", "gelbooru", "1girl solo", 10, "", "", "u")]
    assert base not in changed and len(set(changed)) == len(changed)


def test_unavailable_names_the_features_own_install_hint(monkeypatch):
    assert unavailable(("onnxruntime",), tagger._onnxruntime) is None
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import` sees when it is not installed
    assert "the WD tagger needs onnxruntime: pip install" in unavailable(("onnxruntime",), tagger._onnxruntime)
    monkeypatch.setitem(sys.modules, "imagehash", None)
    assert "pip install imagehash" in unavailable(("imagehash",), views.need_imagehash)
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert "BLIP captions need torch and transformers" in unavailable(("torch", "transformers"),
                                                                           captioner._blip_modules)


def components(blocks) -> dict:
    return {b.elem_id: b for b in blocks.blocks.values() if getattr(b, "elem_id", None)}


def test_a_missing_package_disables_only_its_feature(tmp_path, monkeypatch):
    studio = standalone_studio(root=tmp_path / "projects", lora_dir=tmp_path / "lora", model_cache=tmp_path / "cache")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    tab = build_tab(studio)
    found = components(tab)
    assert found["lora_maker_dataset_tag"].interactive is False
    for feature in ("lora_maker_dataset_blip", "lora_maker_dataset_find_dupes", "lora_maker_dataset_check",
                    "lora_maker_dataset_count"):
        assert found[feature].interactive is not False, feature
    notes = [b.value for b in tab.blocks.values() if isinstance(getattr(b, "value", None), str)]
    assert any(n.startswith("Tag images is unavailable: the WD tagger needs onnxruntime: pip install") for n in notes)

    monkeypatch.setitem(sys.modules, "imagehash", None)
    found = components(build_tab(studio))
    assert found["lora_maker_dataset_find_dupes"].interactive is False and found["lora_maker_dataset_check"].interactive is False
    assert found["lora_maker_dataset_move_marked"].interactive is not False  # the trash needs no imagehash


def test_without_lycoris_training_is_disabled_with_the_fix_and_the_rest_works(monkeypatch, tmp_path):
    import importlib.util

    from lora_trainer_ext.headless import standalone_studio

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lycoris" else find_spec(name, *a))
    blocks = build_tab(standalone_studio(root=tmp_path))
    by_id = {getattr(b, "elem_id", None): b for b in blocks.blocks.values()}
    assert "pip install &#x27;lycoris-lora&lt;4&#x27;" in by_id["lora_maker_train_missing"].value  # escaped HTML
    assert by_id["lora_maker_train_start"].interactive is False
    assert by_id["lora_maker_dataset_check"].interactive is not False  # only training is off
