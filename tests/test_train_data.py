from __future__ import annotations

import io
import random
from collections import Counter

import pytest
import torch
from conftest import add_image, image_bytes
from PIL import Image

from lora_trainer_ext.errors import LoraMakerError, Stopped
from lora_trainer_ext.hosts.host import SD1, SizeInfo
from lora_trainer_ext.progress import Progress
from lora_trainer_ext.training.data import (
    TrainData,
    check_dataset,
    dataset_dirs,
    metadata_tag_frequency,
    process_caption,
)
from lora_trainer_ext.training.settings import TrainSettings

CAPTION = "zzz, 1girl, smile, blue eyes, hat, outdoors, sky, tree"


def _dataset(project, sizes=((600, 400), (600, 400), (512, 512), (400, 600), (300, 300))):
    for i, size in enumerate(sizes):
        add_image(project, f"{i:02d}.png", f"zzz, tag{i}, common, extra{i}", size=size, seed=i)


def _data(project, **settings) -> TrainData:
    return TrainData.from_project(project, TrainSettings(**settings), SD1)


# ---- checks before training ----


def test_empty_dataset_is_refused(project):
    with pytest.raises(LoraMakerError, match="no images"):
        check_dataset(project)


def test_missing_and_unreadable_images_are_named_together(project):
    add_image(project, "good.png", "1girl")
    add_image(project, "bare.png")  # no caption file
    add_image(project, "blank.png", "  \n")
    truncated = image_bytes(size=(64, 64))
    (project.dataset_dir / "broken.png").write_bytes(truncated[: len(truncated) // 2])
    (project.dataset_dir / "broken.txt").write_text("1girl", encoding="utf-8")
    (project.dataset_dir / "latin.png").write_bytes(image_bytes(size=(64, 64)))
    (project.dataset_dir / "latin.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(LoraMakerError) as e:
        check_dataset(project)
    text = str(e.value)
    assert "3 image(s) have no caption: bare.png, blank.png, latin.png (latin.txt is not UTF-8" in text
    assert "1 image(s) cannot be read: broken.png (truncated PNG" in text
    assert "good.png" not in text and "\n" not in text


def test_check_returns_items_with_upright_sizes(project):
    add_image(project, "a.png", "1girl, smile", size=(96, 64))
    # A phone photo stored landscape with "rotate 90" in its EXIF trains as the portrait it shows.
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = Image.open(io.BytesIO(image_bytes(size=(80, 40), fmt="JPEG")))
    buf = io.BytesIO()
    photo.save(buf, "JPEG", exif=exif.tobytes())
    (project.dataset_dir / "b.jpg").write_bytes(buf.getvalue())
    (project.dataset_dir / "b.txt").write_text("photo of a cat\n", encoding="utf-8")
    items = check_dataset(project)
    assert [(i.index, i.image.name, i.caption, i.width, i.height) for i in items] == [
        (0, "a.png", "1girl, smile", 96, 64),
        (1, "b.jpg", "photo of a cat", 40, 80),
    ]


# ---- caption augmentation ----


def test_captions_untouched_without_shuffle_or_dropout():
    rng = random.Random(0)
    text = "a photo of a cat, sitting on a mat"
    assert all(process_caption(text, rng, shuffle=False) == text for _ in range(20))


def test_keep_tokens_stay_first_while_the_rest_shuffles():
    rng = random.Random(1)
    tags = CAPTION.split(", ")
    orders = set()
    for _ in range(200):
        out = process_caption(CAPTION, rng, shuffle=True, keep_tokens=2).split(", ")
        assert out[:2] == tags[:2] and sorted(out) == sorted(tags)
        orders.add(tuple(out[2:]))
    assert len(orders) > 100
    firsts = Counter(process_caption(CAPTION, rng, keep_tokens=0).split(", ")[0] for _ in range(800))
    assert set(firsts) == set(tags)  # without keep_tokens any tag may lead


def test_dropout_rates_are_honoured():
    rng = random.Random(2)
    draws = [process_caption(CAPTION, rng, keep_tokens=1, caption_dropout=0.2) for _ in range(4000)]
    assert 0.18 < draws.count("") / len(draws) < 0.22

    kept = Counter()
    for _ in range(4000):
        out = process_caption(CAPTION, rng, keep_tokens=1, tag_dropout=0.3).split(", ")
        assert out[0] == "zzz"  # kept tags are never dropped
        kept.update(out[1:])
    for tag in CAPTION.split(", ")[1:]:
        assert 0.66 < kept[tag] / 4000 < 0.74


# ---- batches ----


def test_epoch_plan_is_deterministic_per_seed_and_epoch(project):
    _dataset(project)
    data = _data(project, repeats=3, batch_size=2, flip_aug=True, keep_tokens=1)
    a, b = data.epoch_plan(0), data.epoch_plan(0)
    assert [(p.bucket, p.samples) for p in a] == [(p.bucket, p.samples) for p in b]
    assert [p.samples for p in data.epoch_plan(1)] != [p.samples for p in a]
    other = _data(project, repeats=3, batch_size=2, flip_aug=True, keep_tokens=1, seed=7)
    assert [p.samples for p in other.epoch_plan(0)] != [p.samples for p in a]


def test_every_image_repeats_within_its_bucket(project):
    _dataset(project)
    data = _data(project, repeats=3, batch_size=2)
    assert data.plan.counts() == {(384, 640): 1, (512, 512): 2, (640, 384): 2}
    plans = data.epoch_plan(4)
    assert Counter(s.index for p in plans for s in p.samples) == {i: 3 for i in range(5)}
    for p in plans:
        assert 1 <= len(p.samples) <= 2
        assert all(data.bucket(s.index) == p.bucket for s in p.samples)
    # 3 + 6 + 6 repeated images in batches of 2, filled per bucket: 2 + 3 + 3
    assert len(plans) == data.steps_per_epoch == data.step_plan().steps_per_epoch == 8
    assert data.step_plan().total_steps == 80


def test_batches_are_nchw_float_in_range_with_sizes(project):
    _dataset(project)
    data = _data(project, repeats=1, batch_size=2, shuffle_tags=False)
    seen = 0
    for plan, batch in zip(data.epoch_plan(0), data.batches(0)):
        w, h = plan.bucket
        assert batch.pixels.dtype == torch.float32 and batch.pixels.shape == (len(plan.samples), 3, h, w)
        assert batch.pixels.min() >= -1 and batch.pixels.max() <= 1 and batch.pixels.std() > 0.01
        assert batch.captions == plan.captions == [data.items[i].caption for i in batch.indices]
        assert batch.sizes == data.sizes(plan)
        assert all(size.target == (h, w) for size in batch.sizes)
        seen += len(plan.samples)
    assert seen == 5


def test_cache_keys_cover_both_orientations_and_match_the_batches(project):
    _dataset(project)
    data = _data(project, repeats=4, batch_size=3, flip_aug=True)
    keys = data.cache_keys()
    assert sorted(keys) == sorted((i, f) for i in range(5) for f in (False, True))
    cache = {key: data.pixels(*key)[0] for key in keys}  # what the trainer encodes once
    flips = []
    for plan in data.epoch_plan(0):
        batch = data.load(plan)
        assert torch.equal(batch.pixels, torch.stack([cache[k] for k in plan.keys]))
        flips += batch.flips
    assert 0 < sum(flips) < len(flips)
    assert _data(project, flip_aug=False).cache_keys() == [(i, False) for i in range(5)]


def test_flip_mirrors_pixels_and_crop(project):
    add_image(project, "square.png", "1girl", size=(512, 512))  # exactly its bucket: no resampling
    add_image(project, "wide.png", "1girl", size=(900, 500), seed=3)
    data = _data(project, flip_aug=True)
    plain, size = data.pixels(0)
    mirrored, mirrored_size = data.pixels(0, flip=True)
    assert torch.equal(mirrored, plain.flip(-1)) and mirrored_size == size
    wide, wide_size = data.pixels(1)
    wide_flipped, wide_flipped_size = data.pixels(1, flip=True)
    assert data.bucket(1) == (640, 384)
    # 900x500 covers 640x384 scaled by 384/500 -> 691x384; 25 px cropped on the left, 26 on the right,
    # so the mirrored crop starts 26 px in
    assert wide_size == SizeInfo((500, 900), (0, 25), (384, 640))
    assert wide_flipped_size == SizeInfo((500, 900), (0, 26), (384, 640))
    assert torch.equal(wide_flipped, wide.flip(-1))


def test_captions_are_augmented_per_step(project):
    add_image(project, "a.png", CAPTION)
    data = _data(project, repeats=50, batch_size=1, keep_tokens=1)
    captions = [p.captions[0] for p in data.epoch_plan(0)]
    assert all(c.startswith("zzz, ") for c in captions)
    assert len(set(captions)) > 40


def test_keep_tokens_default_to_the_datasets(project):
    add_image(project, "a.png", CAPTION)
    project.update_settings(dataset={"activation_tags": ["zzz", "1girl"], "keep_tokens": 2})
    data = _data(project, repeats=30, batch_size=1)
    assert data.settings.keep_tokens == 2
    assert all(p.captions[0].startswith("zzz, 1girl, ") for p in data.epoch_plan(0))


def test_unresolved_settings_are_a_programming_error(project):
    add_image(project, "a.png", CAPTION)
    with pytest.raises(ValueError):
        TrainData(check_dataset(project), TrainSettings())


# ---- metadata ----


def test_tag_frequency_and_dataset_dirs(project):
    add_image(project, "a.png", "zzz, Blue Eyes, smile")
    add_image(project, "b.png", "zzz, blue eyes, hat", seed=1)
    add_image(project, "c.png", "zzz", seed=2)
    assert metadata_tag_frequency(project) == {"dataset": {"zzz": 3, "blue eyes": 2, "hat": 1, "smile": 1}}
    assert dataset_dirs(project, repeats=10) == {"dataset": {"n_repeats": 10, "img_count": 3}}


def test_the_check_stops_when_asked(project):
    class StopNow(Progress):
        def should_stop(self) -> bool:
            return True

    add_image(project, "a.png", CAPTION)
    with pytest.raises(Stopped):
        check_dataset(project, StopNow())
