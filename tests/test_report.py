"""The dataset report on a real project folder with every kind of problem in it."""

from __future__ import annotations

from conftest import add_image, image_bytes

from lora_trainer_ext.dataset.report import SMALL_SIDE, dataset_report


def test_report_lists_every_problem(project):
    add_image(project, "ok.png", "1girl, smile", size=(768, 512))
    add_image(project, "tall.jpg", "1girl", size=(512, 1024), seed=1)
    add_image(project, "nocap.png", size=(600, 600), seed=2)
    add_image(project, "empty.png", "  ", size=(600, 600), seed=3)
    add_image(project, "small.png", "a", size=(300, 200), seed=4)
    (project.dataset_dir / "broken.jpg").write_bytes(image_bytes(fmt="JPEG", size=(600, 600))[:-500])
    (project.dataset_dir / "orphan.txt").write_text("1girl", encoding="utf-8")
    (project.dataset_dir / "clip.webm").write_bytes(b"\x1aE\xdf\xa3")
    add_image(project, "twin.png", "x", size=(600, 600), seed=5)
    add_image(project, "twin.jpg", size=(600, 600), seed=6)

    report = dataset_report(project)
    assert report.images == 8 and not report.ok
    assert report.uncaptioned == ["broken.jpg", "empty.png", "nocap.png"]
    assert report.orphan_captions == ["orphan.txt"]
    assert [n for n, _ in report.corrupt] == ["broken.jpg"] and "truncated" in report.corrupt[0][1]
    assert report.unsupported == ["clip.webm"]
    assert report.shared_captions == [["twin.jpg", "twin.png"]]
    assert report.small == ["small.png"] and SMALL_SIDE == 512
    assert report.aspects["tall (< 2:3)"] == 1 and report.aspects["wide (> 3:2)"] == 2
    text = report.render()
    assert "8 images, 5 with captions" in text
    assert "short side: min 200, median 600, max 600 px" in text
    assert "1 captions without an image: orphan.txt" in text


def test_clean_dataset_is_ok(project):
    for i in range(3):
        add_image(project, f"{i}.png", "1girl, smile", size=(640, 640), seed=i)
    report = dataset_report(project)
    assert report.ok and report.problems() == []
    assert "no problems found" in report.render()


def test_empty_project_is_not_ok(project):
    report = dataset_report(project)
    assert not report.ok and report.problems() == ["the dataset has no images"]
