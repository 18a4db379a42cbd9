"""The CLI end to end, as a user runs it: a real `python -m lora_trainer_ext` process against a
loopback booru with 60+ posts and faults, the tiny ONNX tagger from a loopback hub, then dedupe,
curation, undo, report and trash."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_onnx
from booru_server import FakePost, animated_gif_post, serve_booru, video_post
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
N_POSTS = 60


def picture(seed: int, colour: tuple[int, int, int]) -> Image.Image:
    """A mostly single-colour picture (the tiny tagger reads colour) with dark blobs placed at random
    (so perceptual hashes of different seeds are far apart)."""
    rng = np.random.default_rng(seed)
    pixels = np.empty((144, 144, 3), np.uint8)  # square: the tagger pads others with white
    pixels[:] = colour
    for _ in range(4):
        y, x = rng.integers(0, 124), rng.integers(0, 124)
        pixels[y : y + 20, x : x + 20] = (rng.integers(0, 40), 0, 0)
    return Image.fromarray(pixels)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def make_dataset_posts() -> list[FakePost]:
    posts = []
    for i in range(N_POSTS):
        colour = (255, 0, 0) if i % 3 else (0, 0, 255)
        data = encoded(picture(i, colour), "PNG" if i % 2 else "JPEG", quality=95)
        tags = ["1girl", "solo", "red_theme" if i % 3 else "blue_theme", "highres"]
        posts.append(FakePost(1000 + i, data, ".png" if i % 2 else ".jpg", tags))
    # the same pictures uploaded again, re-encoded: near duplicates for dedupe
    for i in (1, 2, 4):
        data = encoded(picture(i, (255, 0, 0)), "JPEG", quality=60)
        posts.append(FakePost(2000 + i, data, ".jpg", ["1girl", "solo", "red_theme"]))
    posts += [video_post(3000), animated_gif_post(3001)]
    return posts


def run(*args: str, root: Path, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "lora_trainer_ext", "--root", str(root), *args],
        cwd=REPO, env=full_env, input=stdin, capture_output=True, text=True, timeout=240,
    )


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def fails(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line that says why
    for word in words:
        assert word in lines[0]
    return lines[0]


@pytest.fixture
def env(tmp_path):
    with tiny_onnx.serve_hub() as hub:
        hub.repos["test/tiny-tagger"] = tiny_onnx.hub_files(tiny_onnx.write_tagger(tmp_path / "model-src"))
        yield {
            "HF_ENDPOINT": hub.url,
            "LORA_MAKER_CACHE": str(tmp_path / "model-cache"),
            "LORA_MAKER_GELBOORU_API_KEY": "",
            "LORA_MAKER_GELBOORU_USER_ID": "",
        }


@pytest.mark.timeout(600)
def test_dataset_from_tag_query_to_report(tmp_path, env):
    root = tmp_path / "projects"
    dataset = root / "mychar" / "dataset"
    with serve_booru(make_dataset_posts()) as booru:
        booru.credentials = ("key", "42")
        api = booru.base("gelbooru")
        scrape = ["scrape", "mychar", "--api-url", api, "--tags", "1girl", "--save-tags"]

        # Gelbooru without credentials: the reason and where to get them, nothing downloaded
        fails(run(*scrape, "--yes", root=root, env=env), "401", "api")
        # without --yes and nobody to answer: the count, then a refusal to go on
        result = run(*scrape, "--api-key", "key", "--user-id", "42", root=root, env=env, stdin="")
        assert "65 posts match" in result.stdout
        fails(result, "--yes")
        # answering "n" downloads nothing
        result = run(*scrape, "--api-key", "key", "--user-id", "42", root=root, env=env, stdin="n\n")
        assert ok(result).endswith("nothing downloaded\n") and not any(dataset.glob("*.*"))

        booru.faults.add("api", 429).add("api", 500)
        booru.faults.add("image:1005", "truncated", times=None)
        booru.faults.add("image:1007", "slow")
        out = ok(run(*scrape, "--api-key", "key", "--user-id", "42", "--yes", "--workers", "3",
                     root=root, env={**env, "LORA_MAKER_GELBOORU_API_KEY": "key", "LORA_MAKER_GELBOORU_USER_ID": "42"}))
        images = sorted(p.name for p in dataset.iterdir() if p.suffix != ".txt")
        assert len(images) == N_POSTS + 3 - 1  # everything but the video, the animation and the truncated file
        assert "gelbooru_1005" not in " ".join(images) and "1005" in out
        assert all(name.startswith("gelbooru_") for name in images)
        caption = (dataset / "gelbooru_1001.txt").read_text(encoding="utf-8")
        assert caption == "1girl, solo, red theme"  # booru tags, spaces, meta tag dropped

        # run again: nothing new to fetch
        out = ok(run(*scrape, "--yes", root=root, env={**env, "LORA_MAKER_GELBOORU_API_KEY": "key", "LORA_MAKER_GELBOORU_USER_ID": "42"}))
        assert sorted(p.name for p in dataset.iterdir() if p.suffix != ".txt") == images

    # duplicates: listed, then trashed with their captions, then one restored
    out = ok(run("dedupe", "mychar", root=root))
    assert "3 duplicates in 3 groups" in out and "keep gelbooru_1001.png" in out  # lossless beats JPEG
    assert len(list(dataset.glob("*.*"))) == 2 * len(images)
    ok(run("dedupe", "mychar", "--apply", root=root))
    trash = root / "mychar" / "trash"
    assert sorted(p.name for p in trash.glob("gelbooru_*")) == sorted(
        f"gelbooru_{i}.{ext}" for i in (2001, 2002, 2004) for ext in ("jpg", "txt"))
    assert "duplicate of gelbooru_100" in ok(run("trash", "mychar", root=root))
    ok(run("trash", "mychar", "--restore", "gelbooru_2001.jpg", root=root))
    assert (dataset / "gelbooru_2001.jpg").exists()

    # the tagger, downloaded from the loopback hub, overwriting the booru's tags
    out = ok(run("tag", "mychar", "--tagger", "test/tiny-tagger", "--existing", "overwrite", root=root, env=env))
    assert "CPUExecutionProvider" in out and "images/s" in out
    captions = {p.stem: p.read_text(encoding="utf-8").split(", ") for p in dataset.glob("*.txt")}
    for stem, tags in captions.items():
        blue = stem.startswith("gelbooru_10") and int(stem[-2:]) % 3 == 0  # posts 1000 + i, i % 3 == 0
        assert ("blue theme" if blue else "red theme") in tags, (stem, tags)
        assert "1girl" not in tags and "highres" not in tags  # overwritten; the meta tag is blacklisted
    assert "^_^" in captions["gelbooru_1000"]  # the emoticon keeps its underscore
    assert (tmp_path / "model-cache").is_dir()

    # curation: frequency, activation tag first, prune, merge on a filtered subset, undo
    top = ok(run("tags", "mychar", "--top", "3", root=root)).splitlines()
    reds = sum("red theme" in tags for tags in captions.values())
    assert f"{reds:6d}  red theme" in top[:3] and len([line for line in top if line[:6].strip().isdigit()]) == 3
    blues = [stem for stem, tags in captions.items() if "blue theme" in tags]
    found = ok(run("tags", "mychar", "--include", "blue theme", "--exclude", "red theme", "--list", root=root)).splitlines()
    assert found[0] == f"{len(blues)} of {len(captions)} images match"
    assert sorted(line.split(".")[0] for line in found[1:]) == sorted(blues)
    ok(run("tags", "mychar", "--activation", "mychar", "--remove", "red theme", root=root))
    assert (dataset / "gelbooru_1003.txt").read_text(encoding="utf-8").split(", ") == \
        ["mychar"] + [t for t in captions["gelbooru_1003"] if t != "red theme"]
    ok(run("tags", "mychar", "--replace", "blue theme, ^_^ => blue outfit", "--include", "blue theme", root=root))
    assert (dataset / "gelbooru_1000.txt").read_text(encoding="utf-8").startswith("mychar, blue outfit")
    assert "activation tags: mychar (keep_tokens 1)" in ok(run("tags", "mychar", root=root))
    ok(run("tags", "mychar", "--undo", root=root))
    assert (dataset / "gelbooru_1000.txt").read_text(encoding="utf-8").startswith("mychar, blue theme, ^_^")
    ok(run("tags", "mychar", "--set", "gelbooru_1000.jpg", "mychar, custom", root=root))
    assert (dataset / "gelbooru_1000.txt").read_text(encoding="utf-8") == "mychar, custom"

    report = ok(run("report", "mychar", root=root))
    assert f"{len(images) - 2} images, {len(images) - 2} with captions" in report
    assert "no problems found" not in report  # the pictures are small: flagged for upscaling

    # and the dataset trains: a few steps on a tiny SD1 checkpoint
    from tiny_hosts import make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "model", "sd1")
    settings = {"resolution": 64, "min_bucket": 64, "max_bucket": 128, "max_steps": 3, "batch_size": 4,
                "dim": 4, "alpha": 4, "mixed_precision": "no"}
    out = ok(run("train", "mychar", "--checkpoint", str(checkpoint), *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")],
                 root=root))
    assert "done: 3 steps" in out and (root / "mychar" / "output" / "mychar.safetensors").is_file()


def test_errors_are_one_line(tmp_path):
    root = tmp_path / "projects"
    fails(run("report", "nope", root=root), "no project 'nope'")
    fails(run("tags", "../evil", root=root), "invalid project name")
    assert run("dedupe", root=root).returncode == 2  # usage error from argparse
    ok(run("--help", root=root))
