from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image, ImageOps

from lora_trainer_ext.errors import LoraMakerError
from lora_trainer_ext.hosts.host import SizeInfo
from lora_trainer_ext.training.buckets import (
    BucketPlan,
    assign,
    bucket_resolutions,
    flipped,
    no_upscale_bucket,
    resize_and_crop,
    size_info,
)


def test_512_buckets_match_sd_scripts_by_hand():
    # area 512² = 262144; for each width w = 256..1024 step 64: h = min(1024, floor(262144 / w / 64) * 64),
    # e.g. w=320: 262144/320 = 819.2 -> 768; w=704: 372.4 -> 320; w=832: 315.1 -> 256.
    expected = [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
        (512, 512),
        (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
    ]  # fmt: skip
    assert bucket_resolutions(512) == expected


def test_sdxl_buckets_include_the_usual_sdxl_sizes():
    buckets = bucket_resolutions(1024, 64, 256, 2048)
    for size in [(1024, 1024), (896, 1152), (1152, 896), (832, 1216), (768, 1344), (640, 1600)]:
        assert size in buckets
    assert all(w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert all(256 <= min(w, h) and max(w, h) <= 2048 for w, h in buckets)


def test_bucket_sides_must_make_sense():
    with pytest.raises(LoraMakerError):
        bucket_resolutions(512, 64, 1024, 256)


def test_assign_picks_the_nearest_aspect_ratio():
    buckets = bucket_resolutions(512)
    assert assign(512, 512, buckets) == (512, 512)
    assert assign(1000, 1000, buckets) == (512, 512)
    # 1.5: (640, 384) is 1.667 (off by 0.167), (576, 448) is 1.286 (off by 0.214)
    assert assign(600, 400, buckets) == (640, 384)
    assert assign(400, 600, buckets) == (384, 640)
    assert assign(100, 1000, buckets) == (256, 1024)  # thinner than any bucket: the thinnest


def test_no_upscale_keeps_small_images_and_shrinks_big_ones():
    assert no_upscale_bucket(300, 500, 512) == (256, 448)  # below the area: own size floored to 64
    # 2000x1000 is above 512²: scaled by sqrt(262144 / 2e6) to 724x362, floored to 704x320
    assert no_upscale_bucket(2000, 1000, 512) == (704, 320)
    assert no_upscale_bucket(50, 40, 512) == (64, 64)  # never a zero side


def test_plan_counts_and_bucket_info():
    sizes = [(600, 400), (600, 400), (512, 512), (400, 600)]
    plan = BucketPlan.build(sizes, 512)
    assert plan.assigned == [(640, 384), (640, 384), (512, 512), (384, 640)]
    assert plan.counts() == {(384, 640): 1, (512, 512): 1, (640, 384): 2}
    info = json.loads(json.dumps(plan.bucket_info(repeats=10)))
    assert info["buckets"] == {
        "0": {"resolution": [384, 640], "count": 10},
        "1": {"resolution": [512, 512], "count": 10},
        "2": {"resolution": [640, 384], "count": 20},
    }
    error_wide = 640 / 384 - 1.5
    error_tall = abs(384 / 640 - 400 / 600)
    assert info["mean_img_ar_error"] == pytest.approx((2 * error_wide + 0 + error_tall) / 4)


def test_plan_without_buckets_or_with_no_upscale():
    sizes = [(600, 400), (300, 500)]
    assert BucketPlan.build(sizes, 512, enabled=False).assigned == [(512, 512), (512, 512)]
    assert BucketPlan.build(sizes, 512, no_upscale=True).assigned == [(576, 384), (256, 448)]


def _gradient(width, height):
    """An image whose every pixel differs: red grows left to right, green top to bottom."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))


def test_resize_and_crop_covers_the_bucket_and_centres_the_crop():
    img, size = resize_and_crop(_gradient(600, 400), (640, 384))
    assert img.size == (640, 384) and img.mode == "RGB"
    # cover: scale max(640/600, 384/400) = 1.0667 -> 640x427, cropped 21 px from the top
    assert size == SizeInfo(original=(400, 600), crop_top_left=(21, 0), target=(384, 640))
    assert size_info(600, 400, (640, 384)) == size
    reference = _gradient(600, 400).resize((640, 427), Image.LANCZOS).crop((0, 21, 640, 405))
    assert np.array_equal(np.asarray(img), np.asarray(reference))


def test_exact_size_is_left_alone_and_alpha_goes_white():
    rgba = Image.new("RGBA", (512, 512), (0, 0, 0, 0))
    img, size = resize_and_crop(rgba, (512, 512))
    assert img.mode == "RGB" and img.getpixel((10, 10)) == (255, 255, 255)
    assert size == SizeInfo((512, 512), (0, 0), (512, 512))


def test_random_crop_stays_inside_and_depends_on_the_seed():
    source = _gradient(900, 300)  # covers (512, 512) at 1536x512: 1024 px of horizontal play
    lefts = set()
    for seed in range(8):
        img, size = resize_and_crop(source, (512, 512), random_crop=True, rng=random.Random(seed))
        top, left = size.crop_top_left
        assert top == 0 and 0 <= left <= 1024 and img.size == (512, 512)
        again = resize_and_crop(source, (512, 512), random_crop=True, rng=random.Random(seed))[1]
        assert again == size
        lefts.add(left)
    assert len(lefts) > 4


def test_flip_mirrors_pixels_and_crop_like_cropping_the_mirrored_image():
    source = _gradient(900, 300)
    img, size = resize_and_crop(source, (512, 512), random_crop=True, rng=random.Random(3))
    flip_img, flip_size = flipped(img, size)
    top, left = size.crop_top_left
    assert flip_size.original == size.original and flip_size.target == size.target
    assert flip_size.crop_top_left == (top, 1536 - left - 512)
    assert np.array_equal(np.asarray(flip_img), np.asarray(img)[:, ::-1])
    # The mirrored crop is where the flipped pixels sit in the mirrored resized image.
    mirrored = ImageOps.mirror(source).resize((1536, 512), Image.LANCZOS)
    _, new_left = flip_size.crop_top_left
    expected = np.asarray(mirrored.crop((new_left, 0, new_left + 512, 512)), dtype=np.int16)
    assert np.abs(np.asarray(flip_img, dtype=np.int16) - expected).max() <= 2
    assert size_info(900, 300, (512, 512), flip=True) == SizeInfo((300, 900), (0, 512), (512, 512))
