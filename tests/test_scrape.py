"""Scraping into a real project folder from the fake boorus of booru_server.py: plan, download,
resume, faults, captions from tags (undoable) and provenance."""

from __future__ import annotations

import json
import threading

import pytest
from booru_server import (  # noqa: F401 (no_booru_credentials is a fixture)
    FakePost,
    animated_gif,
    animated_gif_post,
    fast_http,
    make_image,
    make_posts,
    no_booru_credentials,
    serve_booru,
    video_post,
)
from PIL import Image

from lora_trainer_ext.dataset import trash
from lora_trainer_ext.dataset.boorus import make_client
from lora_trainer_ext.dataset.captions import read_caption
from lora_trainer_ext.dataset.history import History
from lora_trainer_ext.dataset.scrape import download, plan, read_sources
from lora_trainer_ext.progress import Progress

pytestmark = [pytest.mark.usefixtures("no_booru_credentials"), pytest.mark.timeout(60)]


def client(server, name="gelbooru", page_size=None, **http):
    c = make_client(name, api_url=server.base(name), http=fast_http(**http))
    if page_size:
        c.page_size = page_size
    return c


def names(project) -> list[str]:
    return [p.name for p in project.images()]


def scrape(project, server, tags="1girl", limit=None, name="gelbooru", **kwargs):
    return download(project, plan(project, client(server, name), tags, limit=limit), **kwargs)


def test_plan_counts_classifies_and_previews(project):
    posts = make_posts(6) + [video_post(110), animated_gif_post(111), FakePost(112, make_posts(1)[0].data, ".jpg")]
    with serve_booru(posts) as server:
        server.duplicates = True
        # One image already in the dataset, one trashed: neither comes back.
        (project.dataset_dir / "gelbooru_101.png").write_bytes(make_image(1, "PNG"))
        (project.dataset_dir / "gelbooru_102.jpg").write_bytes(make_image(2))
        trash.move_to_trash(project, {project.dataset_dir / "gelbooru_102.jpg": "blurry"})

        p = plan(project, client(server, page_size=3), "1girl")
        assert p.count == 9
        assert [post.id for post in p.posts] == [112, 105, 104, 103]  # 100 has 112's picture (same md5)
        assert dict(p.skipped) == {
            "video or animation": 2,
            "already in the dataset": 1,
            "in the trash": 1,
            "same image as another post": 1,
            "listed twice": 2,
        }
        preview = p.preview(first=2)
        assert "9 posts match '1girl'" in preview and p.client.browse_url("1girl") in preview
        assert "Will download 4; already have 2." in preview
        assert "video or animation: 2" in preview and "#112 32x24.jpg, #105 32x24.png and 2 more" in preview


def test_hidden_and_deleted_danbooru_posts_are_skipped(project):
    posts = [
        FakePost(3, make_image(3), ".jpg"),
        FakePost(2, make_image(2), ".jpg", hidden=True),
        FakePost(1, make_image(1), ".jpg", deleted=True),
    ]
    with serve_booru(posts) as server:
        p = plan(project, client(server, "danbooru"), "solo")
        assert [post.id for post in p.posts] == [3]
        assert dict(p.skipped) == {"no file (hidden or banned)": 1, "deleted": 1}


def test_download_names_files_by_post_id_and_normalises_them(project):
    posts = make_posts(4)
    with serve_booru(posts) as server:
        result = scrape(project, server)
    assert names(project) == ["gelbooru_100.jpg", "gelbooru_101.png", "gelbooru_102.jpg", "gelbooru_103.png"]
    assert result.downloaded == project.images() and not result.rejected and not result.failed
    assert (project.dataset_dir / "gelbooru_100.jpg").read_bytes() == posts[0].data  # a plain JPEG is kept as is
    with Image.open(project.dataset_dir / "gelbooru_101.png") as img:
        assert img.mode == "RGB" and img.getpixel((0, 23)) == (255, 255, 255)  # transparency -> white
        assert img.getpixel((101 % 24 + 2, 6)) == (250, 20, 20)  # the opaque block is untouched
    assert not list(project.dataset_dir.glob("*.tmp")) and not list(project.dataset_dir.glob(".*"))


def test_a_second_run_downloads_nothing_and_a_partial_run_is_completed(project):
    with serve_booru(make_posts(6)) as server:
        first = scrape(project, server, limit=3)
        assert len(first.downloaded) == 3
        assert names(project) == ["gelbooru_103.png", "gelbooru_104.jpg", "gelbooru_105.png"]
        again = plan(project, client(server), "1girl", limit=3)
        assert again.posts == [] and again.skipped["already in the dataset"] == 3
        before = len(server.requested("/images/"))
        assert download(project, again).downloaded == []
        assert len(server.requested("/images/")) == before

        full = scrape(project, server)
        assert len(full.downloaded) == 3 and len(project.images()) == 6
        assert scrape(project, server).downloaded == []


class StopAfter(Progress):
    """Asks to stop once `n` images have been handled."""

    def __init__(self, n: int):
        self.n, self.done = n, 0
        self.lock = threading.Lock()

    def task(self, description, total, unit="img"):
        outer = self

        class Counting:
            def advance(self, n=1, note=""):
                with outer.lock:
                    outer.done += n

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                pass

        return Counting()

    def should_stop(self):
        return self.done >= self.n


def test_stop_keeps_what_is_done_and_a_rerun_finishes(project):
    with serve_booru(make_posts(8)) as server:
        server.image_delay = 0.05
        p = plan(project, client(server), "1girl")
        stopped = download(project, p, workers=1, progress=StopAfter(2))
        assert stopped.stopped and 2 <= len(stopped.downloaded) < 8
        assert len(project.images()) == len(stopped.downloaded)
        rest = scrape(project, server)
        assert len(rest.downloaded) == 8 - len(stopped.downloaded) and len(project.images()) == 8


def test_image_faults_are_retried_rejected_or_reported_never_fatal(project):
    posts = make_posts(8)
    posts[2] = FakePost(102, make_image(102, size=(256, 192)), ".jpg")  # big enough that half keeps the headers
    with serve_booru(posts) as server:
        server.faults.add("image:100", 429, times=2)
        server.faults.add("image:101", "cut", times=1)  # Content-Length lies once: retried
        server.faults.add("image:102", "truncated", times=None)  # a cut file, honestly labelled
        server.faults.add("image:103", "html", times=None)
        server.faults.add("image:104", 500, times=None)
        server.faults.add("image:105", "slow", times=1)
        server.faults.add("image:106", "cut", times=None)
        result = download(project, plan(project, client(server, retries=2), "1girl"))
        assert names(project) == ["gelbooru_100.jpg", "gelbooru_101.png", "gelbooru_105.png", "gelbooru_107.png"]
        rejected = dict(result.rejected)
        assert set(rejected) == {102, 103}
        assert "truncated JPEG" in rejected[102] and "HTML page" in rejected[103]
        failed = dict(result.failed)
        assert set(failed) == {104, 106}
        assert "HTTP 500" in failed[104] and "breaking off" in failed[106]
        assert "rejected 2" in result.summary() and "failed 2" in result.summary()
        assert not [p for p in project.dataset_dir.iterdir() if not p.name.startswith("gelbooru_10")]

        server.faults = type(server.faults)()  # the server recovers: a re-run fetches what is missing
        retried = scrape(project, server).downloaded
        assert [p.name for p in retried] == ["gelbooru_102.jpg", "gelbooru_103.png", "gelbooru_104.jpg", "gelbooru_106.jpg"]


def test_videos_and_animations_are_not_downloaded(project):
    sneaky = FakePost(120, animated_gif(120), ".gif", ["1girl"])  # moves, but not tagged so
    with serve_booru(make_posts(1) + [video_post(110), animated_gif_post(111), sneaky]) as server:
        result = scrape(project, server)
        assert names(project) == ["gelbooru_100.jpg"]
        assert result.rejected == [(120, "animated GIF (3 frames)")]
        assert not server.requested("/images/110/") and not server.requested("/images/111/")


def test_huge_images_come_from_the_sample(project):
    sample = make_image(70, size=(40, 30))
    huge = FakePost(7, make_image(7, size=(64, 48)), ".jpg", width=6000, height=4500, sample=sample)
    no_sample = FakePost(6, make_image(6), ".jpg", width=6000, height=4500)
    with serve_booru([huge, no_sample]) as server:
        result = scrape(project, server)
        assert len(result.downloaded) == 2
        assert server.requested("/images/7/") == [] and len(server.requested("/samples/7/")) == 1
        assert len(server.requested("/images/6/")) == 1
    with Image.open(project.dataset_dir / "gelbooru_7.jpg") as img:
        assert img.size == (40, 30)


def test_original_is_the_fallback_when_the_sample_fails(project):
    post = FakePost(5, make_image(5), ".jpg", width=5000, height=5000, sample=b"<html>gone</html>")
    with serve_booru([post]) as server:
        result = scrape(project, server)
        assert result.downloaded == [project.dataset_dir / "gelbooru_5.jpg"]
        assert len(server.requested("/samples/5/")) == 1 and len(server.requested("/images/5/")) == 1


def test_large_images_are_scaled_down_to_the_pixel_cap(project):
    with serve_booru(make_posts(1)) as server:
        scrape(project, server, max_pixels=16 * 12)
    with Image.open(project.dataset_dir / "gelbooru_100.jpg") as img:
        assert img.width * img.height <= 16 * 12 and img.width < 32


def test_file_names_never_come_from_server_text(project, tmp_path):
    evil = FakePost(5, make_image(5, "PNG"), ".png", ["1girl"], name="../../evil.png")
    liar = FakePost(4, make_image(4, "PNG"), ".jpg", ["1girl"], name="x.jpg")  # a PNG named .jpg
    with serve_booru([evil, liar]) as server:
        for booru in ("gelbooru", "safebooru"):
            scrape(project, server, name=booru)
    assert names(project) == ["gelbooru_4.png", "gelbooru_5.png"]  # safebooru: same md5s, skipped
    assert [p.name for p in tmp_path.rglob("*evil*")] == []


def test_same_picture_on_another_booru_is_not_downloaded_twice(project):
    with serve_booru(make_posts(3)) as server:
        scrape(project, server, name="gelbooru")
        p = plan(project, client(server, "safebooru"), "1girl")
        assert p.posts == [] and p.skipped == {"same image already downloaded": 3}


def test_tags_become_undoable_starting_captions(project):
    tags = ["1girl", "highres", "long_hair", "hatsune_miku_(cosplay)", "absurdres", "^_^", "commentary_request"]
    tags.append("mychar")  # the activation tag, wherever the booru lists it, comes first
    posts = [FakePost(2, make_image(2), ".jpg", tags), FakePost(1, make_image(1), ".jpg", ["solo", "1girl"])]
    project.update_settings(dataset={"activation_tags": ["mychar"], "keep_tokens": 1})
    caption_1 = project.dataset_dir / "gelbooru_1.txt"
    caption_1.write_text("written by hand", encoding="utf-8")  # an existing caption is kept
    with serve_booru(posts) as server:
        result = scrape(project, server, save_tags=True)
    assert result.captioned == 1
    expected = "mychar, 1girl, long hair, hatsune miku \\(cosplay\\), ^_^"
    assert read_caption(project.dataset_dir / "gelbooru_2.jpg") == expected
    assert caption_1.read_text(encoding="utf-8") == "written by hand"
    (edit,) = History(project).edits()
    assert [c.file for c in edit.changes] == ["dataset/gelbooru_2.txt"]
    History(project).undo()
    assert not (project.dataset_dir / "gelbooru_2.txt").exists() and caption_1.exists()
    assert len(project.images()) == 2  # undo is about captions: the images stay


def test_without_save_tags_no_captions_are_written(project):
    with serve_booru(make_posts(2)) as server:
        scrape(project, server)
    assert not list(project.dataset_dir.glob("*.txt")) and History(project).edits() == []


def test_provenance_is_recorded_per_downloaded_image(project):
    posts = [FakePost(3, make_image(3), ".jpg", rating="sensitive", score=7, source="http://127.0.0.1/art/3")]
    with serve_booru(posts) as server:
        scrape(project, server)
        scrape(project, server)  # nothing new: nothing appended
        (record,) = read_sources(project)
        assert record["file"] == "gelbooru_3.jpg" and record["booru"] == "gelbooru" and record["id"] == 3
        assert record["post_url"] == f"{server.base('gelbooru')}/index.php?page=post&s=view&id=3"
        assert record["file_url"].startswith(server.base("gelbooru") + "/images/3/")
        recorded = (record["md5"], record["rating"], record["score"], record["source"])
        assert recorded == (posts[0].md5, "sensitive", 7, "http://127.0.0.1/art/3")
    lines = (project.path / "sources.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == [3]


def test_the_worker_pool_is_bounded(project):
    with serve_booru(make_posts(8)) as server:
        server.image_delay = 0.1
        scrape(project, server, workers=2)
        assert server.max_active_images == 2
    assert len(project.images()) == 8
