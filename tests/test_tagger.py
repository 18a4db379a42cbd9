"""The WD tagger end to end on a tiny ONNX model with the real models' contract (tests/tiny_onnx.py),
run by the real onnxruntime, and its download from a loopback imitation of the Hugging Face hub."""

from __future__ import annotations

import sys

import pytest
import tiny_onnx
from PIL import Image

from lora_trainer_ext.dataset import hub
from lora_trainer_ext.dataset.captions import read_caption
from lora_trainer_ext.dataset.history import History
from lora_trainer_ext.dataset.http import Http
from lora_trainer_ext.dataset.tagger import DEFAULT_MODEL, TagOptions, load_tagger, prepare, select_tags, tag_project
from lora_trainer_ext.errors import LoraMakerError
from lora_trainer_ext.progress import Progress
from lora_trainer_ext.project import Project

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
RED_TAGS = r"hatsune miku \(append\), red theme, solo, looking at viewer"
BLUE_TAGS = "blue theme, ^_^"
GREEN_TAGS = "green theme"
REPO = "SmilingWolf/wd-swinv2-tagger-v3"


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory):
    return tiny_onnx.write_tagger(tmp_path_factory.mktemp("models") / "tiny-tagger")


@pytest.fixture(scope="module")
def tagger(tagger_dir):
    return load_tagger(str(tagger_dir))


@pytest.fixture
def project(tmp_path):
    project = Project.open(tmp_path / "projects", "mychar", create=True)
    for name, colour in (("a_red.png", RED), ("b_blue.png", BLUE), ("c_green.jpg", GREEN)):
        Image.new("RGB", (96, 96), colour).save(project.dataset_dir / name, quality=100)
    return project


def captions(project) -> dict[str, str | None]:
    return {image.name: read_caption(image) for image in project.images()}


def fast_http() -> Http:
    return Http(retries=3, backoff=0.01)


# -- tags from the model ----------------------------------------------------------------------------

def test_tags_come_from_the_model_output_in_bgr_order(tagger, project):
    report = tag_project(project, tagger, TagOptions())
    # Red must give the red tags: fed RGB instead of BGR, the model would see blue.
    assert captions(project) == {"a_red.png": RED_TAGS, "b_blue.png": BLUE_TAGS, "c_green.jpg": GREEN_TAGS}
    assert report.captioned == 3 and report.changed == 3 and report.skipped == 0 and not report.unreadable
    assert report.provider == "CPUExecutionProvider" == tagger.provider
    assert report.seconds > 0 and report.images_per_second > 0
    summary = report.summary()
    assert "CPUExecutionProvider" in summary and "images/s" in summary and "3 images" in summary


def test_prediction_has_ratings_general_and_characters(tagger):
    (red,) = tagger.predict([Image.new("RGB", (448, 448), RED)])
    assert set(red.ratings) == {"general", "sensitive", "questionable", "explicit"}
    assert max(red.ratings, key=red.ratings.get) == "sensitive"
    assert red.character["hatsune_miku_(append)"] == pytest.approx(0.9, abs=0.03)
    assert red.general["red_theme"] > 0.95 and red.general["blue_theme"] < 0.01
    assert "sensitive" not in red.general and "kagamine_rin" not in red.general


def test_thresholds(tagger):
    (red, blue) = tagger.predict([Image.new("RGB", (448, 448), RED), Image.new("RGB", (448, 448), BLUE)])
    assert "looking at viewer" not in select_tags(red, TagOptions(threshold=0.5))
    assert "solo" not in select_tags(red, TagOptions(threshold=0.7))
    assert r"sky \(blue\)" in select_tags(blue, TagOptions(threshold=0.25))
    assert "kagamine rin" not in select_tags(red, TagOptions())
    loose = select_tags(red, TagOptions(character_threshold=0.5))
    assert loose[:2] == [r"hatsune miku \(append\)", "kagamine rin"]  # characters first, by confidence
    assert select_tags(red, TagOptions(character_threshold=0.95))[0] == "red theme"


def test_ratings_only_when_asked(tagger):
    (red,) = tagger.predict([Image.new("RGB", (448, 448), RED)])
    assert not {"general", "sensitive", "questionable", "explicit"} & set(select_tags(red, TagOptions()))
    assert select_tags(red, TagOptions(include_ratings=True))[-1] == "sensitive"


def test_blacklist_and_spelling(tagger):
    (red, blue) = tagger.predict([Image.new("RGB", (448, 448), RED), Image.new("RGB", (448, 448), BLUE)])
    assert "highres" not in select_tags(red, TagOptions())  # a meta tag, blacklisted by default
    assert "highres" in select_tags(red, TagOptions(blacklist=[]))
    assert "red theme" not in select_tags(red, TagOptions(blacklist=["Red Theme"]))  # any spelling
    raw = select_tags(red, TagOptions(underscores_to_spaces=False, escape_parentheses=False))
    assert raw[:2] == ["hatsune_miku_(append)", "red_theme"]
    assert select_tags(blue, TagOptions())[1] == "^_^"  # emoticons keep their underscore


def test_preprocessing_pads_on_white_and_swaps_to_bgr():
    wide = prepare(Image.new("RGB", (200, 100), RED), 448)
    assert wide.shape == (448, 448, 3) and str(wide.dtype) == "float32"
    assert wide[224, 224].tolist() == [0.0, 0.0, 255.0]  # centre: red, in BGR
    assert wide[5, 224].tolist() == [255.0, 255.0, 255.0]  # padding above: white
    see_through = Image.new("RGBA", (50, 50), (0, 0, 255, 0))
    assert prepare(see_through, 448)[224, 224].tolist() == [255.0, 255.0, 255.0]  # alpha on white


def test_batches_and_fixed_batch_model_give_the_same_tags(tmp_path, tagger):
    images = [Image.new("RGB", (120, 120), c) for c in (RED, BLUE, GREEN, RED, BLUE)]
    options = TagOptions()
    one_by_one = [select_tags(tagger.predict([img])[0], options) for img in images]
    assert [select_tags(p, options) for p in tagger.predict(images, batch_size=2)] == one_by_one
    fixed = load_tagger(str(tiny_onnx.write_tagger(tmp_path / "fixed", batch=1)))
    assert fixed.fixed_batch == 1
    assert [select_tags(p, options) for p in fixed.predict(images, batch_size=4)] == one_by_one


# -- writing captions ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "existing, red_caption",
    [
        ("skip", "old tag, red_theme"),
        ("overwrite", RED_TAGS),
        # merged without duplicates; a tag already there keeps its spelling
        ("append", r"old tag, red_theme, hatsune miku \(append\), solo, looking at viewer"),
        ("prepend", RED_TAGS + ", old tag"),
    ],
)
def test_existing_captions(tagger, project, existing, red_caption):
    (project.dataset_dir / "a_red.txt").write_text("old tag, red_theme\n")
    report = tag_project(project, tagger, TagOptions(existing=existing))
    result = captions(project)
    assert result["a_red.png"] == red_caption
    assert result["b_blue.png"] == BLUE_TAGS  # no caption before: tagged whatever the mode
    assert (report.skipped, report.captioned) == ((1, 2) if existing == "skip" else (0, 3))


def test_activation_tags_stay_first(tagger, project):
    project.update_settings(dataset={"activation_tags": ["mychar", "red theme"], "keep_tokens": 2})
    (project.dataset_dir / "b_blue.txt").write_text("mychar, sky")
    tag_project(project, tagger, TagOptions(existing="append"))
    result = captions(project)
    assert result["a_red.png"] == r"mychar, red theme, hatsune miku \(append\), solo, looking at viewer"
    assert result["b_blue.png"] == "mychar, red theme, sky, blue theme, ^_^"


def test_one_undoable_edit(tagger, project):
    (project.dataset_dir / "a_red.txt").write_text("hand written")
    before = captions(project)
    tag_project(project, tagger, TagOptions(existing="overwrite"))
    edits = History(project).edits()
    assert [e.description for e in edits] == [f"tag with {tagger.name}"] and len(edits[0].changes) == 3
    assert captions(project) != before
    History(project).undo()
    assert captions(project) == before
    assert not (project.dataset_dir / "b_blue.txt").exists()  # captions the tagger created are gone again


def test_unreadable_images_are_reported_not_fatal(tagger, project):
    (project.dataset_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (project.dataset_dir / "page.jpg").write_bytes(b"<!DOCTYPE html><html>rate limited</html>")
    report = tag_project(project, tagger, TagOptions())
    assert sorted(name for name, _ in report.unreadable) == ["broken.png", "page.jpg"]
    assert "HTML" in dict(report.unreadable)["page.jpg"]
    assert report.captioned == 3 and captions(project)["a_red.png"] == RED_TAGS
    assert not (project.dataset_dir / "page.txt").exists()


class StopAfter(Progress):
    def __init__(self, checks: int):
        self.checks = checks

    def should_stop(self) -> bool:
        self.checks -= 1
        return self.checks < 0


def test_stop_keeps_what_was_written_undoable(tagger, project):
    report = tag_project(project, tagger, TagOptions(batch_size=1), progress=StopAfter(1))
    assert report.stopped and report.captioned == 1
    assert captions(project) == {"a_red.png": RED_TAGS, "b_blue.png": None, "c_green.jpg": None}
    History(project).undo()
    assert set(captions(project).values()) == {None}


def test_bad_options_are_refused(tagger, project):
    for options in (TagOptions(threshold=1.5), TagOptions(existing="merge"), TagOptions(batch_size=0)):
        with pytest.raises(LoraMakerError):
            tag_project(project, tagger, options)
    assert set(captions(project).values()) == {None}


# -- loading --------------------------------------------------------------------------------------------

def test_local_folder_needs_both_files(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.onnx").write_bytes(tiny_onnx.tagger_model())
    with pytest.raises(LoraMakerError, match="selected_tags.csv"):
        load_tagger(str(tmp_path / "half"))
    with pytest.raises(LoraMakerError, match="neither a folder nor"):
        load_tagger("no such thing")


def test_corrupt_model_names_the_file(tmp_path):
    folder = tiny_onnx.write_tagger(tmp_path / "corrupt")
    (folder / "model.onnx").write_bytes(tiny_onnx.tagger_model()[:300])
    with pytest.raises(LoraMakerError, match="corrupt or incomplete") as info:
        load_tagger(str(folder))
    assert str(folder / "model.onnx") in str(info.value)


def test_tag_list_must_match_the_model(tmp_path):
    folder = tiny_onnx.write_tagger(tmp_path / "mismatch")
    lines = tiny_onnx.selected_tags_csv().splitlines()
    (folder / "selected_tags.csv").write_text("\n".join(lines[:-2]) + "\n")
    with pytest.raises(LoraMakerError, match="different models"):
        load_tagger(str(folder))


def test_missing_onnxruntime_says_how_to_install(monkeypatch, tagger_dir):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import` sees when it is not installed
    with pytest.raises(LoraMakerError, match="pip install"):
        load_tagger(str(tagger_dir))


# -- download from the hub ------------------------------------------------------------------------------

def test_download_into_cache_once(tmp_path, tagger_dir, monkeypatch):
    cache = tmp_path / "cache"
    with tiny_onnx.serve_hub() as server:
        server.repos[REPO] = tiny_onnx.hub_files(tagger_dir)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        tagger = load_tagger(REPO, cache_dir=cache)
        assert tagger.name == REPO == DEFAULT_MODEL and tagger.provider == "CPUExecutionProvider"
        folder = cache / "SmilingWolf--wd-swinv2-tagger-v3"
        assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "selected_tags.csv"]
        assert (folder / "model.onnx").read_bytes() == (tagger_dir / "model.onnx").read_bytes()
        assert [path for path, _, _ in server.requests] == [
            f"/{REPO}/resolve/main/selected_tags.csv", f"/{REPO}/resolve/main/model.onnx"
        ]
        again = load_tagger("wd-swinv2-tagger-v3", cache_dir=cache)  # the short name of a known model
        assert again.name == REPO and len(server.requests) == 2  # nothing fetched the second time


def test_download_resumes_after_a_dropped_connection(tmp_path):
    big = bytes(range(256)) * 1200  # large enough that some of it reaches the disk before the drop
    with tiny_onnx.serve_hub() as server:
        server.repos["someone/tagger"] = {"model.onnx": big}
        server.drop_after["model.onnx"] = 200_000
        folder = hub.download_repo_files("someone/tagger", ["model.onnx"], tmp_path, endpoint=server.url, http=fast_http())
        assert (folder / "model.onnx").read_bytes() == big
        (first, _, _), (again, resumed, _) = server.requests
        assert first == again == "/someone/tagger/resolve/main/model.onnx"
        assert 0 < int(resumed.removeprefix("bytes=").rstrip("-")) <= 200_000
        assert not list(folder.glob("*.part"))


def test_download_finishes_a_part_left_by_an_earlier_run(tmp_path, tagger_dir):
    model = (tagger_dir / "model.onnx").read_bytes()
    folder = hub.repo_dir(tmp_path, "someone/tagger")
    folder.mkdir(parents=True)
    with tiny_onnx.serve_hub() as server:
        server.repos["someone/tagger"] = tiny_onnx.hub_files(tagger_dir)
        (folder / "model.onnx.part").write_bytes(model[:500])
        hub.download_repo_files("someone/tagger", ["model.onnx"], tmp_path, endpoint=server.url, http=fast_http())
        assert (folder / "model.onnx").read_bytes() == model
        (folder / "model.onnx").unlink()
        (folder / "model.onnx.part").write_bytes(model)  # whole, but the run stopped before the rename
        hub.download_repo_files("someone/tagger", ["model.onnx"], tmp_path, endpoint=server.url, http=fast_http())
        assert (folder / "model.onnx").read_bytes() == model
        assert [rng for _, rng, _ in server.requests] == ["bytes=500-", f"bytes={len(model)}-", None]


def test_missing_and_gated_repos_explain_themselves(tmp_path, tagger_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with tiny_onnx.serve_hub() as server:
        server.repos["someone/no-csv"] = {"model.onnx": (tagger_dir / "model.onnx").read_bytes()}
        server.status["someone/gated"] = 401
        with pytest.raises(hub.HubFileMissing, match="someone/no-csv") as info:
            load_tagger("someone/no-csv", cache_dir=tmp_path, endpoint=server.url)
        assert "selected_tags.csv" in str(info.value)
        with pytest.raises(LoraMakerError, match="HF_TOKEN"):
            load_tagger("someone/gated", cache_dir=tmp_path, endpoint=server.url)
        assert not any(auth for _, _, auth in server.requests)
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        server.status.clear()
        server.repos["someone/gated"] = tiny_onnx.hub_files(tagger_dir)
        load_tagger("someone/gated", cache_dir=tmp_path, endpoint=server.url)
        assert server.requests[-1][2] == "Bearer hf_secret"


def test_bad_repo_names_are_refused_before_any_request(tmp_path):
    for name in ("../etc/passwd", "a/b/c", "x/.."):
        with pytest.raises(LoraMakerError):
            hub.download_repo_files(name, ["model.onnx"], tmp_path, endpoint="http://127.0.0.1:9")
    with pytest.raises(LoraMakerError):
        hub.download_repo_files("someone/tagger", ["../model.onnx"], tmp_path, endpoint="http://127.0.0.1:9")
