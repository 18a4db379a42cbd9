"""Duplicate finding on real photographs (scikit-image's sample images) and their edited copies."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from PIL import Image, ImageEnhance
from skimage import data

from lora_trainer_ext.dataset import dedupe
from lora_trainer_ext.dataset.dedupe import DEFAULT_THRESHOLD, close_pairs, find_groups, scan, trash_duplicates
from lora_trainer_ext.dataset.trash import list_trash, restore
from lora_trainer_ext.errors import LoraMakerError
from lora_trainer_ext.project import Project

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "horse", "immunohistochemistry",
          "hubble_deep_field", "retina", "brick", "grass", "gravel", "page", "moon", "text", "clock"]


def photo(name: str) -> Image.Image:
    a = getattr(data, name)()
    if a.dtype != np.uint8:
        a = (a * 255).astype(np.uint8) if a.max() <= 1 else a.astype(np.uint8)
    return Image.fromarray(a).convert("RGB")


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def edited_copies(img: Image.Image) -> dict[str, bytes]:
    """What a booru scrape really brings twice: re-encodes, downscales, small tone changes."""
    return {
        "jpeg": encode(img, "JPEG", quality=70),
        "half": encode(img.resize((img.width // 2, img.height // 2), Image.LANCZOS)),
        "bright": encode(ImageEnhance.Brightness(img).enhance(1.1), "JPEG", quality=90),
    }


@pytest.fixture
def photo_project(project):
    for name in PHOTOS:
        (project.dataset_dir / f"{name}.png").write_bytes(encode(photo(name)))
    for name in ["astronaut", "rocket", "coffee"]:
        for kind, blob in edited_copies(photo(name)).items():
            ext = ".jpg" if blob[:2] == b"\xff\xd8" else ".png"
            (project.dataset_dir / f"{name}_{kind}{ext}").write_bytes(blob)
    (project.dataset_dir / "astronaut_exact.png").write_bytes((project.dataset_dir / "astronaut.png").read_bytes())
    Project.caption_path(project.dataset_dir / "rocket_half.png").write_text("rocket, sky", encoding="utf-8")
    return project


def test_default_threshold_separates_copies_from_different_photos(photo_project):
    infos = scan(photo_project)
    groups = {g.keeper.name: g for g in find_groups(infos)}
    # chelsea is in skimage twice (as "cat" too), so it is left out of PHOTOS; every group here is a real copy set
    assert set(groups) == {"astronaut.png", "rocket.png", "coffee.png"}
    for stem in ["astronaut", "rocket", "coffee"]:
        group = groups[f"{stem}.png"]
        names = {d.name for d in group.duplicates}
        assert names == {f.name for f in photo_project.images() if f.name.startswith(stem + "_")}
        assert all(d.distance <= DEFAULT_THRESHOLD for d in group.duplicates)
    exact = [d for d in groups["astronaut.png"].duplicates if d.exact]
    assert [d.name for d in exact] == ["astronaut_exact.png"] and exact[0].distance == 0
    # and unrelated photos are far apart: the default leaves a wide margin
    hashes = {i.name: int(i.phash, 16) for i in infos if "_" not in i.name}
    nearest = min(bin(hashes[a] ^ hashes[b]).count("1") for a, b in itertools.combinations(hashes, 2))
    assert nearest > 2 * DEFAULT_THRESHOLD


def test_keeper_is_the_largest_resolution(project):
    img = photo("astronaut")
    (project.dataset_dir / "a_small.png").write_bytes(encode(img.resize((200, 200))))
    (project.dataset_dir / "z_big.jpg").write_bytes(encode(img, "JPEG", quality=80))
    (project.dataset_dir / "m_mid.png").write_bytes(encode(img.resize((300, 300))))
    [group] = find_groups(scan(project))
    assert group.keeper.name == "z_big.jpg" and (group.keeper.width, group.keeper.height) == (512, 512)
    assert {d.name for d in group.duplicates} == {"a_small.png", "m_mid.png"}


def test_threshold_is_the_users_choice(photo_project):
    infos = scan(photo_project)
    assert find_groups(infos, 0) and all(d.distance == 0 for g in find_groups(infos, 0) for d in g.duplicates)
    # a slightly cropped copy differs in a few bits: found at the default, not when only exact matches count
    img = photo("astronaut")
    (photo_project.dataset_dir / "astronaut_crop.png").write_bytes(encode(img.crop((10, 10, 512, 512))))
    infos = scan(photo_project)
    crop = lambda t: [d for g in find_groups(infos, t) for d in g.duplicates if d.name == "astronaut_crop.png"]
    assert crop(0) == [] and 0 < crop(DEFAULT_THRESHOLD)[0].distance <= DEFAULT_THRESHOLD
    with pytest.raises(LoraMakerError, match="0 to 16"):
        find_groups(infos, 40)


def test_trash_and_restore_with_captions(photo_project):
    before = {p.name: p.read_bytes() for p in photo_project.dataset_dir.iterdir()}
    groups = find_groups(scan(photo_project))
    moved = trash_duplicates(photo_project, groups)
    assert moved == 10
    remaining = {p.name for p in photo_project.images()}
    assert "rocket_half.png" not in remaining and "rocket.png" in remaining
    assert (photo_project.trash_dir / "rocket_half.txt").read_text(encoding="utf-8") == "rocket, sky"
    reasons = {e.original: e.reason for e in list_trash(photo_project)}
    assert reasons["astronaut_exact.png"] == "duplicate of astronaut.png (exact copy)"
    assert reasons["rocket_half.png"].startswith("duplicate of rocket.png (")
    restore(photo_project)
    assert {p.name: p.read_bytes() for p in photo_project.dataset_dir.iterdir()} == before
    assert list_trash(photo_project) == []


def test_trash_never_overwrites(project):
    from conftest import add_image

    from lora_trainer_ext.dataset.trash import move_to_trash

    first = add_image(project, "x.png", "first")
    move_to_trash(project, {first: "test"})
    second = add_image(project, "x.png", "second", seed=5)
    move_to_trash(project, {second: "test"})
    assert sorted(p.name for p in project.trash_dir.iterdir()) == ["manifest.json", "x-2.png", "x-2.txt", "x.png", "x.txt"]
    add_image(project, "x.png", "third", seed=6)
    restored = restore(project, ["x-2.png"])
    assert restored[0].name == "x-2.png" and restored[0].with_suffix(".txt").read_text(encoding="utf-8") == "second"
    with pytest.raises(LoraMakerError, match="not in the trash"):
        restore(project, ["nope.png"])


def test_unreadable_images_are_reported_not_fatal(project):
    from conftest import image_bytes

    good = image_bytes(fmt="JPEG", size=(300, 200))
    (project.dataset_dir / "ok.jpg").write_bytes(good)
    (project.dataset_dir / "cut.jpg").write_bytes(good[: len(good) // 2])
    (project.dataset_dir / "page.png").write_bytes(b"<!DOCTYPE html><html>Too many requests</html>")
    infos = {i.name: i for i in scan(project)}
    assert infos["ok.jpg"].phash and not infos["ok.jpg"].error
    assert "truncated" in infos["cut.jpg"].error and not infos["cut.jpg"].phash
    assert "HTML" in infos["page.png"].error
    assert find_groups(list(infos.values())) == []


def test_scan_cache_reuses_unchanged_files(project, monkeypatch):
    from conftest import add_image

    add_image(project, "a.png")
    add_image(project, "b.png", seed=1)
    scan(project)
    seen = []
    real = dedupe.inspect
    monkeypatch.setattr(dedupe, "inspect", lambda p: seen.append(p.name) or real(p))
    add_image(project, "c.png", seed=2)
    infos = scan(project)
    assert seen == ["c.png"] and [i.name for i in infos] == ["a.png", "b.png", "c.png"]


@pytest.mark.parametrize("threshold", [0, 3, 8, 12, 16])
def test_close_pairs_equals_brute_force(threshold):
    rng = np.random.default_rng(threshold)
    base = rng.integers(0, 2**63, 300, dtype=np.uint64) | (rng.integers(0, 2, 300, dtype=np.uint64) << np.uint64(63))
    copies = base[rng.integers(0, 300, 300)] ^ np.array(
        [sum(1 << int(b) for b in rng.choice(64, rng.integers(0, 18), replace=False)) for _ in range(300)], dtype=np.uint64)
    hashes = np.concatenate([base, copies, base[:5]])
    a, b, d = close_pairs(hashes, threshold, chunk=500)  # small chunks: exercise the chunked path
    got = {(int(x), int(y)): int(z) for x, y, z in zip(a, b, d)}
    want = {}
    for i, j in itertools.combinations(range(len(hashes)), 2):
        dist = bin(int(hashes[i]) ^ int(hashes[j])).count("1")
        if dist <= threshold:
            want[(i, j)] = dist
    assert got == want and len(want) > 5
