"""Aspect-ratio buckets, as sd-scripts makes them: instead of cropping every image to a square, each
image goes to the bucket (a width x height of about the training area) whose aspect ratio is nearest
its own, is resized to cover the bucket and cropped to it. A batch only holds images of one bucket.

Sizes are (width, height) here, as Pillow has them; `SizeInfo` (SDXL's conditioning) is (height,
width), as the model has it.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

from PIL import Image, ImageOps

from ..dataset.images import flatten
from ..errors import LoraMakerError
from ..hosts.host import SizeInfo

Size = tuple[int, int]  # (width, height)


def bucket_resolutions(resolution: int, step: int = 64, min_side: int = 256, max_side: int = 1024) -> list[Size]:
    """sd-scripts' predefined buckets for a `resolution`² area: the largest square that fits, plus for
    every width from `min_side` to `max_side` (in `step`s) the tallest height within the area and
    `max_side`, and its transpose; sorted."""
    if step < 1 or min_side < step or max_side < min_side:
        raise LoraMakerError(f"bad bucket sides: step {step}, min {min_side}, max {max_side}")
    area = resolution * resolution
    square = math.isqrt(area) // step * step
    found = {(square, square)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            found.add((width, height))
            found.add((height, width))
    return sorted(found)


def assign(width: int, height: int, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio is nearest the image's (the first of equals, in list order)."""
    ratio = width / height
    return min(buckets, key=lambda b: abs(b[0] / b[1] - ratio))


def no_upscale_bucket(width: int, height: int, resolution: int, step: int = 64) -> Size:
    """sd-scripts' `bucket_no_upscale`: an image within the area keeps its size, one above it is
    scaled down to the area (aspect kept); the bucket is that size floored to `step` (never below one
    step, so tiny images still train)."""
    scale = min(1.0, math.sqrt(resolution * resolution / (width * height)))
    w, h = int(width * scale + 0.5), int(height * scale + 0.5)
    return max(step, w // step * step), max(step, h // step * step)


def _cover_size(width: int, height: int, bucket: Size) -> Size:
    """The size an image is resized to so it covers `bucket` with its aspect kept."""
    scale = max(bucket[0] / width, bucket[1] / height)
    return max(bucket[0], int(width * scale + 0.5)), max(bucket[1], int(height * scale + 0.5))


def _size_info(width: int, height: int, bucket: Size, left: int, top: int) -> SizeInfo:
    return SizeInfo(original=(height, width), crop_top_left=(top, left), target=(bucket[1], bucket[0]))


def size_info(width: int, height: int, bucket: Size, flip: bool = False) -> SizeInfo:
    """What `resize_and_crop` (centred) and `flipped` report for an image of this size, without pixels."""
    rw, rh = _cover_size(width, height, bucket)
    left, top = (rw - bucket[0]) // 2, (rh - bucket[1]) // 2
    size = _size_info(width, height, bucket, left, top)
    return mirrored(size) if flip else size


def resize_and_crop(
    img: Image.Image, bucket: Size, random_crop: bool = False, rng: random.Random | None = None
) -> tuple[Image.Image, SizeInfo]:
    """`img` as an RGB image of exactly `bucket` size: resized to cover it, then cropped (centred, or
    at a random offset drawn from `rng`), with the SDXL size conditioning that describes the crop."""
    img = flatten(img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    width, height = img.size
    rw, rh = _cover_size(width, height, bucket)
    if (rw, rh) != (width, height):
        img = img.resize((rw, rh), Image.LANCZOS)
    if random_crop:
        rng = rng or random.Random()
        left, top = rng.randint(0, rw - bucket[0]), rng.randint(0, rh - bucket[1])
    else:
        left, top = (rw - bucket[0]) // 2, (rh - bucket[1]) // 2
    img = img.crop((left, top, left + bucket[0], top + bucket[1]))
    return img, _size_info(width, height, bucket, left, top)


def mirrored(size: SizeInfo) -> SizeInfo:
    """The size conditioning of the horizontally mirrored crop, as sd-scripts mirrors it: the left
    edge is measured from the other side of the resized image."""
    rw, _ = _cover_size(size.original[1], size.original[0], (size.target[1], size.target[0]))
    top, left = size.crop_top_left
    return SizeInfo(size.original, (top, rw - left - size.target[1]), size.target)


def flipped(img: Image.Image, size: SizeInfo) -> tuple[Image.Image, SizeInfo]:
    """A cropped image mirrored left to right, with its size conditioning mirrored to match."""
    return ImageOps.mirror(img), mirrored(size)


@dataclass
class BucketPlan:
    """Which bucket each image of a dataset goes to."""

    sizes: list[Size]  # each image's (width, height)
    assigned: list[Size]  # each image's bucket

    @classmethod
    def build(
        cls,
        sizes: list[Size],
        resolution: int,
        step: int = 64,
        min_side: int = 256,
        max_side: int = 1024,
        no_upscale: bool = False,
        enabled: bool = True,
    ) -> "BucketPlan":
        """Buckets for images of `sizes`; with `enabled` False every image is cropped to the square."""
        if not enabled:
            return cls(list(sizes), [(resolution, resolution)] * len(sizes))
        if no_upscale:
            return cls(list(sizes), [no_upscale_bucket(w, h, resolution, step) for w, h in sizes])
        predefined = bucket_resolutions(resolution, step, min_side, max_side)
        return cls(list(sizes), [assign(w, h, predefined) for w, h in sizes])

    def counts(self) -> dict[Size, int]:
        """Images per bucket, buckets sorted."""
        return dict(sorted(Counter(self.assigned).items()))

    def mean_ar_error(self) -> float:
        """Mean |bucket aspect - image aspect|: how much cropping the buckets cost on average."""
        if not self.sizes:
            return 0.0
        errors = [abs(b[0] / b[1] - w / h) for (w, h), b in zip(self.sizes, self.assigned)]
        return sum(errors) / len(errors)

    def bucket_info(self, repeats: int = 1) -> dict:
        """`ss_bucket_info`: {"buckets": {i: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": x};
        counts include repeats, as sd-scripts counts them."""
        buckets = {
            i: {"resolution": [w, h], "count": n * repeats} for i, ((w, h), n) in enumerate(self.counts().items())
        }
        return {"buckets": buckets, "mean_img_ar_error": self.mean_ar_error()}
